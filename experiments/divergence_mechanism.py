"""Does a CBP reset start a divergence? Bisection against no-reset twins on permuted MNIST.

`experiments.divergence` counts how often BP and CBP diverge near the
step-size edge. This module asks *why* a seed diverges with CBP and not
with BP. For every seed it runs the reduced permuted-MNIST learner (SGD at
batch 1, then `cbp_jax.cbp`) with resets enabled only before a cut step
``c``: ``c = 0`` is plain BP (CBP without resets returns SGD's updates
unchanged, so the two are the same computation), ``c = inf`` is CBP. All
runs of all seeds are one vmapped program whose only varying input is the
per-seed cut, so every twin shares every computation up to its cut; a
bisection on ``c`` then finds, per seed that diverges with CBP but not with
BP, the adjacent pair ``(c_lo, c_hi)``: finite with resets before
``c_lo``, divergent with resets before ``c_hi = c_lo + 1``. The reset made
at step ``c_lo`` (the *tipping reset*) is what separates the twins.

What it reports per such seed: the tipping reset (step, layer, units), the
steps from it to the first non-finite loss, the twins' losses after it, and
a control: the same run with the tipping reset replaced by a perturbation
of equal size in random directions (does *any* small change there tip the
run, i.e. is the run chaotic at the edge, or is it the reset's content?).

Usage::

  python -m experiments.divergence_mechanism --step-size 0.2 --seeds 32 --tasks 3 \\
      --out results/divergence_mechanism
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from experiments import permuted_mnist, runner

NEVER = np.iinfo(np.int32).max  # A cut after the last step: every reset enabled.
KICK_EVERY_RESET = -2  # perturb_at: every reset replaced by a random change of its size.


def make_config(**overrides: Any) -> dict:
  """Permuted MNIST's reduced config (784-100x3-10, SGD at batch 1, CBP last in the chain)."""
  return permuted_mnist.make_config(permuted_mnist.REDUCED_OVERRIDES, **overrides)


def make_run(config: Mapping[str, Any], data: Mapping[str, jax.Array], step_size: float):
  """A pure ``run(key, cut, perturb_at, perturb_key) -> per-step records`` of one seed.

  Resets happen only at steps ``< cut``. At step ``perturb_at`` (at every
  step with a reset if ``perturb_at == KICK_EVERY_RESET``) the reset is not
  applied; instead every parameter the reset would have changed moves by a
  random vector of the same norm as the reset's change (the control).
  Records per step: ``loss`` (before the step), ``replaced`` (units reset
  at the step, all layers), ``change`` (norm of the reset's change to the
  parameters), ``bias_shift`` (norm of the consumers' bias correction),
  ``active`` (fraction of hidden units with a positive output on the
  step's example) and ``grad_norm``.
  """
  c = config["hparams"]["cbp"]
  model = permuted_mnist.make_model(config)
  x0 = jnp.zeros((1, permuted_mnist.NUM_PIXELS), jnp.float32)
  graph = cbp_jax.graph_from_params(model.init(jax.random.key(0), x0)["params"])
  steps_per_task = config["examples_per_task"] // config["batch_size"]
  tasks = config["tasks"]
  sgd = optax.sgd(step_size)
  bias_names = {cons.bias for layer in graph.layers for cons in layer.consumers if cons.bias}

  def transform(rate):
    return optax.chain(
      sgd,
      cbp_jax.cbp(
        graph,
        key=0,
        replacement_rate=rate,
        max_replacements_per_step=1,
        maturity_threshold=c["maturity_threshold"],
        decay_rate=c["decay_rate"],
        utility=c["utility"],
        init=c["init"],
        accumulate=c["accumulate"],
        next_bias_correction=c["next_bias_correction"],
      ),
    )

  def run(key, cut, perturb_at, perturb_key):
    params = model.init(jax.random.fold_in(key, 1), x0)["params"]
    opt_state = optax.chain(
      sgd,
      cbp_jax.cbp(
        graph,
        key=jax.random.fold_in(key, 2),
        replacement_rate=c["replacement_rate"],
        max_replacements_per_step=1,
      ),
    ).init(params)

    def step(carry, t, perm, order):
      params, opt_state = carry
      x, y = permuted_mnist.gather_examples(data, perm, order, t % steps_per_task + jnp.arange(1))

      def loss_fn(p):
        logits, acts = cbp_jax.apply_with_activations(model, p, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), acts

      (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      rate = jnp.where(t < cut, c["replacement_rate"], 0.0)
      updates, new_state = transform(rate).update(grads, opt_state, params, activations=acts)
      # What the reset changed: the updates minus plain SGD's.
      plain, _ = sgd.update(grads, opt_state[0], params)
      delta = jax.tree.map(jnp.subtract, updates, plain)
      change = optax.tree.norm(delta)
      flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): d
        for path, d in jax.tree_util.tree_flatten_with_path(delta)[0]
      }
      bias_shift = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for n, v in flat.items() if n in bias_names))
      # The control: the reset's change replaced by noise of the same norm on the same entries.
      leaves, treedef = jax.tree.flatten(delta)
      keys = jax.random.split(jax.random.fold_in(perturb_key, t), len(leaves))
      noise = [jnp.where(d != 0, jax.random.normal(k, d.shape), 0.0) for k, d in zip(keys, leaves)]
      noise = jax.tree.unflatten(treedef, noise)
      scale = change / jnp.maximum(optax.tree.norm(noise), 1e-30)
      control = jax.tree.map(lambda p, n: p + scale * n, plain, noise)
      kick = (t == perturb_at) | ((perturb_at == KICK_EVERY_RESET) & (change > 0))
      updates = jax.tree.map(lambda u, ctl: jnp.where(kick, ctl, u), updates, control)
      replaced = sum(jnp.sum(m) for m in new_state[1].last_replaced.values())
      active = jnp.mean(jnp.concatenate([(a > 0).reshape(-1) for a in acts.values()]))
      record = {
        "loss": loss,
        "replaced": replaced.astype(jnp.int32),
        "change": change,
        "bias_shift": bias_shift,
        "active": active.astype(jnp.float32),
        "grad_norm": optax.tree.norm(grads),
      }
      return (optax.apply_updates(params, updates), new_state), record

    def one_task(carry, task):
      # The task's permutation and example order once per task (a 60,000-element sort).
      perm = permuted_mnist.task_permutation(key, task)
      order = permuted_mnist.task_order(key, task, data["images"].shape[0])
      steps = task * steps_per_task + jnp.arange(steps_per_task)
      return jax.lax.scan(lambda c, t: step(c, t, perm, order), carry, steps)

    _, records = jax.lax.scan(one_task, (params, opt_state), jnp.arange(tasks))
    return jax.tree.map(lambda r: r.reshape(-1), records)  # (tasks * steps_per_task,)

  return run


def first_nonfinite(loss: np.ndarray) -> np.ndarray:
  """Per seed, the first step whose loss is not finite, or -1."""
  bad = ~np.isfinite(loss)
  return np.where(bad.any(axis=1), np.argmax(bad, axis=1), -1)


def bisect(run_all, keys, diverging: np.ndarray, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per seed with ``diverging``, adjacent cuts ``(lo, hi)``: finite at ``lo``, divergent at ``hi``.

  Seeds not bisected keep ``lo = hi = -1``. Invariant for bisected seeds:
  the run with cut ``lo`` stays finite, the one with cut ``hi`` diverges.
  """
  n = len(diverging)
  lo = np.zeros(n, np.int64)  # Cut 0: BP, finite by selection.
  hi = np.full(n, total_steps, np.int64)  # Every reset: divergent by selection.
  while np.any(diverging & (hi - lo > 1)):
    mid = np.where(diverging, (lo + hi) // 2, NEVER)
    bad = first_nonfinite(np.asarray(run_all(keys, mid)["loss"])) >= 0
    hi = np.where(diverging & bad & (hi - lo > 1), mid, hi)
    lo = np.where(diverging & ~bad & (hi - lo > 1), mid, lo)
  return np.where(diverging, lo, -1), np.where(diverging, hi, -1)


def analyse(config: Mapping[str, Any], data, step_size: float, seeds: int) -> dict:
  """The rates, the tipping resets and the controls (see the module docstring)."""
  run = make_run(config, data, step_size)
  total = config["tasks"] * config["examples_per_task"] // config["batch_size"]
  keys = runner.seed_keys(dict(config, seeds=seeds))
  never = np.full(seeds, -1, np.int32)
  pkeys = jax.random.split(jax.random.key(12345), seeds)

  @jax.jit
  def run_all(keys, cuts, perturb_at=never, perturb_keys=pkeys):
    return jax.vmap(run)(keys, jnp.asarray(cuts, jnp.int32), jnp.asarray(perturb_at, jnp.int32), perturb_keys)

  bp = {k: np.asarray(v) for k, v in run_all(keys, np.zeros(seeds, np.int32)).items()}
  cbp = {k: np.asarray(v) for k, v in run_all(keys, np.full(seeds, NEVER, np.int32)).items()}
  bp_first, cbp_first = first_nonfinite(bp["loss"]), first_nonfinite(cbp["loss"])
  only_cbp = (cbp_first >= 0) & (bp_first < 0)
  lo, hi = bisect(run_all, keys, only_cbp, total)
  seeds_out = []
  # The tipping reset is the last one made before cut hi, i.e. at step lo (cuts between resets
  # give the same run, so the bisection stops next to a reset step).
  tipping = np.where(only_cbp, lo, -1)
  twin_hi = {k: np.asarray(v) for k, v in run_all(keys, np.where(only_cbp, hi, NEVER)).items()}
  twin_lo = {k: np.asarray(v) for k, v in run_all(keys, np.where(only_cbp, lo, NEVER)).items()}
  control = {
    k: np.asarray(v)
    for k, v in run_all(
      keys, np.where(only_cbp, hi, NEVER), np.where(only_cbp, tipping, -1).astype(np.int32)
    ).items()
  }
  control_first = first_nonfinite(control["loss"])
  for s in np.flatnonzero(only_cbp):
    t = int(tipping[s])
    div = int(first_nonfinite(twin_hi["loss"][s : s + 1])[0])
    window = slice(t, min(t + 50, total))
    seeds_out.append(
      {
        "seed": int(s),
        "cbp_first_nonfinite_step": int(cbp_first[s]),
        "tipping_reset_step": t,
        "task_of_reset": t // (total // config["tasks"]),
        "units_replaced_at_reset": int(twin_hi["replaced"][s, t]),
        "reset_change_norm": float(twin_hi["change"][s, t]),
        "bias_shift_norm": float(twin_hi["bias_shift"][s, t]),
        "steps_to_nonfinite": div - t,
        "twin_with_reset_loss_next_50": twin_hi["loss"][s, window].tolist(),
        "twin_without_reset_loss_next_50": twin_lo["loss"][s, window].tolist(),
        "control_first_nonfinite_step": int(control_first[s]),
        "resets_before_tipping": int(np.sum(twin_hi["replaced"][s, :t])),
      }
    )
  return {
    "step_size": step_size,
    "seeds": seeds,
    "tasks": config["tasks"],
    "examples_per_task": config["examples_per_task"],
    "bp_nonfinite": int(np.sum(bp_first >= 0)),
    "cbp_nonfinite": int(np.sum(cbp_first >= 0)),
    "bp_first_nonfinite_step": bp_first.tolist(),
    "cbp_first_nonfinite_step": cbp_first.tolist(),
    "cbp_only": int(np.sum(only_cbp)),
    "bp_only": int(np.sum((bp_first >= 0) & (cbp_first < 0))),
    "resets_total_cbp": np.sum(cbp["replaced"], axis=1).tolist(),
    "cbp_only_seeds": seeds_out,
  }


def kick_control(config: Mapping[str, Any], data, step_size: float, seeds: int) -> dict:
  """BP, CBP and CBP with every reset replaced by a random change of the same size.

  If CBP diverged more than BP only because a reset perturbs a trajectory
  at the edge, the kicked runs would diverge as often as CBP. Also returns
  per task and method the mean fraction of hidden units active on the
  examples and the mean gradient norm.
  """
  run = make_run(config, data, step_size)
  keys = runner.seed_keys(dict(config, seeds=seeds))
  pkeys = jax.random.split(jax.random.key(54321), seeds)
  steps_per_task = config["examples_per_task"] // config["batch_size"]

  @jax.jit
  def run_all(cuts, perturb_at):
    return jax.vmap(run)(keys, jnp.asarray(cuts, jnp.int32), jnp.asarray(perturb_at, jnp.int32), pkeys)

  variants = {"bp": (0, -1), "cbp": (NEVER, -1), "cbp_kicks": (NEVER, KICK_EVERY_RESET)}
  out = {"step_size": step_size, "seeds": seeds, "tasks": config["tasks"]}
  for name, (cut, perturb) in variants.items():
    r = {k: np.asarray(v) for k, v in run_all(np.full(seeds, cut), np.full(seeds, perturb)).items()}
    first = first_nonfinite(r["loss"])
    finite = first < 0  # Per-task means over the seeds that stayed finite.

    def per_task(x):
      return np.mean(x.reshape(-1, config["tasks"], steps_per_task), axis=(0, 2))

    out[name] = {
      "nonfinite": int(np.sum(~finite)),
      "first_nonfinite_step": first.tolist(),
      "active_per_task": per_task(r["active"][finite]).tolist() if finite.any() else None,
      "grad_norm_per_task": per_task(r["grad_norm"][finite]).tolist() if finite.any() else None,
      "resets": np.sum(r["replaced"], axis=1).tolist(),
    }
  return out


def format_kicks(r: Mapping[str, Any]) -> str:
  lines = [f"step {r['step_size']:g}, {r['seeds']} seeds x {r['tasks']} tasks (one program):"]
  for name in ("bp", "cbp", "cbp_kicks"):
    v = r[name]
    active = ", ".join(f"{a:.2f}" for a in v["active_per_task"] or [])
    grad = ", ".join(f"{g:.2f}" for g in v["grad_norm_per_task"] or [])
    lines.append(
      f"  {name}: non-finite {v['nonfinite']}/{r['seeds']}; finite seeds' active fraction per "
      f"task {active}; gradient norm per task {grad}"
    )
  return "\n".join(lines)


def format_report(r: Mapping[str, Any]) -> str:
  lines = [
    f"step {r['step_size']:g}, {r['seeds']} seeds x {r['tasks']} tasks: non-finite BP "
    f"{r['bp_nonfinite']}/{r['seeds']}, CBP {r['cbp_nonfinite']}/{r['seeds']} "
    f"(CBP only {r['cbp_only']}, BP only {r['bp_only']})"
  ]
  for s in r["cbp_only_seeds"]:
    ctl = s["control_first_nonfinite_step"]
    lines.append(
      f"  seed {s['seed']}: tipping reset at step {s['tipping_reset_step']} (task "
      f"{s['task_of_reset'] + 1}, after {s['resets_before_tipping']} earlier resets), change norm "
      f"{s['reset_change_norm']:.3g} (bias shift {s['bias_shift_norm']:.3g}); non-finite "
      f"{s['steps_to_nonfinite']} steps later; control (same-size random change): "
      + ("finite" if ctl < 0 else f"non-finite at step {ctl}")
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m experiments.divergence_mechanism", description=__doc__.split("\n")[0]
  )
  p.add_argument("--step-size", type=float, required=True)
  p.add_argument("--seeds", type=int, default=32)
  p.add_argument("--tasks", type=int, default=3)
  p.add_argument("--examples-per-task", type=int)
  p.add_argument("--data-dir")
  p.add_argument(
    "--kicks",
    action="store_true",
    help="only the control: BP, CBP, and CBP with every reset replaced by a random change",
  )
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  over = {"tasks": args.tasks, "tasks_per_chunk": 1, "seeds": args.seeds}
  if args.examples_per_task:
    over["examples_per_task"] = args.examples_per_task
  config = make_config(**over)
  data = permuted_mnist.load_data(config, args.data_dir)
  out = Path(args.out)
  if args.kicks:
    report = kick_control(config, data, args.step_size, args.seeds)
    print(format_kicks(report), flush=True)
    runner.write_json_atomic(out / f"kicks_{args.step_size:g}.json", report)
    return 0
  report = analyse(config, data, args.step_size, args.seeds)
  print(format_report(report), flush=True)
  runner.write_json_atomic(out / f"mechanism_{args.step_size:g}.json", report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
