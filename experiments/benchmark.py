"""Throughput of BP vs CBP (and L2, Shrink & Perturb, ReDo, the newer methods) on the paper's networks.

One command measures everything in one process, so the ratios compare runs
made under the same machine load::

    python -m experiments.benchmark [--quick] [--out results/benchmark.json]
    python -m experiments.benchmark --profile mnist_b1   # op-level breakdown (--methods to choose)

What is measured
----------------
For every net, every method's whole training step (forward, backward with the
activations CBP needs, optimizer update, ``apply_updates``) runs ``steps``
times inside one jitted `jax.lax.scan`. Each program is compiled ahead of time
and run once as a warm-up (compile time and first-run costs are excluded);
each timed call ends with ``block_until_ready``. Methods are *interleaved*:
every repeat times each method once, in a rotated order, and the figure is the
median over repeats. ``ratio`` is BP's median time over the method's, so
``ratio >= 1`` means as fast as BP. The ConvNet is the exception to the scan:
XLA:CPU (jaxlib 0.10.2) runs its weight-gradient convolutions about 15x slower
inside a while loop (they keep a ``f01b_i01o->01bf`` layout that falls off
the fast convolution path), so its step is jitted alone and called from a
Python loop (dispatch costs microseconds against ~0.3 s steps).

Nets (SPEC "Hyperparameters the paper used"):

* ``scr``: slowly-changing regression learner, 20-5-1 ReLU, batch 1, SGD 0.01,
  squared error; CBP rate 1e-4, maturity 10, probabilistic count.
* ``mnist_b1`` / ``mnist_b32``: 784-2000-2000-2000-10, batch 1 and 32, SGD
  0.003, cross-entropy; CBP rate 1e-4, maturity 100.
* ``convnet_b100``: `cbp_jax.models.ConvNet` on 32x32x3, batch 100, SGD 0.01
  with momentum 0.9, two classes; CBP rate 3e-4, maturity 100, ``default``
  init, count basis ``layer``, wrapping the optimizer (``optimizer=``) so the
  momentum of replaced units restarts.
* ``sweep``: the ``scr`` net as a `jax.vmap` over 1, 8 and 64 seeds (the way
  `experiments.slowly_changing_regression` runs); reported per seed-step.
* ``ant`` (only with the ``rl`` extra installed): environment steps/s of the
  slippery-Ant experiment's reduced configuration, one seed, PPO alone and
  PPO+CBP alone (rollouts on Brax MJX, GAE and minibatch updates, each its own
  compiled chunk; `experiments.slippery_ant.benchmark`); ratio = CBP / PPO.

``--quick`` times fewer steps, 3 repeats and only BP, CBP, CBP k10 and L2 (the
full run adds S&P and ReDo and uses 7 repeats).

All CBP runs use ``adaptable_contribution``, decay 0.99 and the next-layer
bias correction. The CBP state is aged past maturity before the warm-up
(every unit's age set to ``maturity + 1``, every layer's pending fraction to
0.99), so the timed steps include real replacements (the ``replaced`` column
counts them, in the first timed call) without first running ``maturity``
untimed steps. Each timed call starts from the same state. Inputs come from a small random buffer on the
device (indexing it costs the same for every method). L2 is
``optax.add_decayed_weights(1e-4)`` before SGD; S&P is
`cbp_jax.methods.shrink_and_perturb` after SGD (noise every step); ReDo is
`cbp_jax.methods.redo` (tau 0, period 1000) after SGD. ``cbp_k10`` and
``cbp_k100`` are CBP with ``magnitude_refresh_every=10`` / ``100`` (weight
magnitudes refreshed for a tenth / a hundredth of the units per step);
``cbp_guard`` is CBP with ``skip_nonfinite=True`` (the cost of the guard).
The newer methods (``upgd``, ``regrama``, ``snr``, ``hare_tortoise``,
``ln_wd``, ``injection``) are built by `experiments.plasticity_methods` with
its default settings, around the net's SGD (UPGD replaces it); ``ln_wd``
adds LayerNorm to the MLPs and is skipped on the ConvNet; ``injection`` is
timed before its injection point (the masked optimizer and the three-part
forward pass cost the same before and after it).
``--quick`` skips ``cbp_k100``, ``cbp_guard``, S&P, ReDo and the newer methods.

Optimizer-state bytes are reported per net for BP and CBP (and CBP wrapping
Adam vs Adam): CBP's state beyond the wrapped optimizer's own is O(units),
a fixed number of bytes per hidden unit plus a few scalars per layer.

``--profile NET`` records one timed call of BP and of CBP (or ``--methods``) with the JAX
profiler and prints the XLA operations that take the time (per step).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from cbp_jax import methods as methods_lib
from cbp_jax import models
from cbp_jax import transform as transform_lib
from experiments import plasticity_methods, runner

SCHEMA = "cbp_jax.experiments.benchmark/1"

# Seeds of the vmapped sweep -> steps per timed call.
SWEEP_STEPS = {1: 100_000, 8: 25_000, 64: 5_000}
SWEEP_QUICK_STEPS = {1: 25_000, 8: 6_000, 64: 1_500}

# Reference PyTorch figures on this machine class (SPEC "Speed of the reference").
REFERENCE = {
  "scr": {"bp": 10_000.0, "cbp": 4_500.0},
  "mnist_b1": {"bp": 96.0, "cbp": 61.0},
  "convnet_b100": {"bp": 22.0, "cbp": 23.0},
}


@dataclasses.dataclass(frozen=True)
class Net:
  """One benchmarked network and its training setup."""

  name: str
  model: Any
  x_shape: tuple[int, ...]
  outputs: int
  batch: int
  loss: str  # "mse" or "xent"
  lr: float
  momentum: float | None
  cbp: dict
  wrap: bool  # CBP wraps the optimizer (optimizer=) instead of following it.
  steps: int  # Steps per timed call (full run).
  quick_steps: int
  # "scan": all steps in one jitted lax.scan; "python": a jitted step called
  # from a Python loop (XLA:CPU runs the ConvNet's weight-gradient
  # convolutions ~15x slower inside a while loop, see BENCHMARKS.md).
  loop: str = "scan"


def nets() -> dict[str, Net]:
  scr_cbp = dict(
    replacement_rate=1e-4,
    maturity_threshold=10,
    decay_rate=0.99,
    utility="adaptable_contribution",
    init="kaiming",
    accumulate=False,
  )
  # The continual-ImageNet ConvNet's CBP settings, for both convolutions.
  conv_cbp = dict(
    replacement_rate=3e-4,
    maturity_threshold=100,
    decay_rate=0.99,
    utility="adaptable_contribution",
    init="default",
    count_basis="layer",
  )
  mnist_cbp = dict(
    replacement_rate=1e-4,
    maturity_threshold=100,
    decay_rate=0.99,
    utility="adaptable_contribution",
    init="kaiming",
  )
  mnist = models.MLP(hidden=(2000, 2000, 2000), outputs=10)
  return {
    "scr": Net(
      "scr",
      models.MLP(hidden=(5,), outputs=1),
      (20,),
      1,
      1,
      "mse",
      0.01,
      None,
      scr_cbp,
      False,
      200_000,
      50_000,
    ),
    "mnist_b1": Net("mnist_b1", mnist, (784,), 10, 1, "xent", 0.003, None, mnist_cbp, False, 100, 25),
    "mnist_b32": Net("mnist_b32", mnist, (784,), 10, 32, "xent", 0.003, None, mnist_cbp, False, 50, 12),
    "convnet_b100": Net(
      "convnet_b100",
      models.ConvNet(outputs=2),
      (32, 32, 3),
      2,
      100,
      "xent",
      0.01,
      0.9,
      conv_cbp,
      True,
      20,
      4,
      loop="python",
    ),
    # The same net with the convolution as patches @ kernel (``conv="im2col"``),
    # which XLA:CPU runs fast inside the scan too.
    "convnet_im2col_b100": Net(
      "convnet_im2col_b100",
      models.ConvNet(outputs=2, conv="im2col"),
      (32, 32, 3),
      2,
      100,
      "xent",
      0.01,
      0.9,
      conv_cbp,
      True,
      20,
      4,
    ),
  }


# --- Methods ----------------------------------------------------------------


def base_optimizer(net: Net) -> optax.GradientTransformation:
  return optax.sgd(net.lr, momentum=net.momentum)


# CBP variants: exact magnitudes (the paper), `magnitude_refresh_every=k`,
# and the paper's CBP with the opt-in `skip_nonfinite=True` guard.
REFRESH_EVERY = {"cbp": 1, "cbp_k10": 10, "cbp_k100": 100, "cbp_guard": 1}


def make_tx(net: Net, method: str, params: Any, key: Any) -> tuple[optax.GradientTransformation, bool]:
  """The method's optimizer and whether its update takes ``activations``."""
  sgd = base_optimizer(net)
  x0 = jnp.zeros((1,) + net.x_shape, jnp.float32)
  graph = plasticity_methods.layer_graph(net.model, params, x0)
  if method == "bp":
    return sgd, False
  if method in REFRESH_EVERY:
    settings = dict(
      net.cbp, magnitude_refresh_every=REFRESH_EVERY[method], skip_nonfinite=method == "cbp_guard"
    )
    if net.wrap:
      return cbp_jax.cbp(graph, key=key, optimizer=sgd, **settings), True
    return optax.chain(sgd, cbp_jax.cbp(graph, key=key, **settings)), True
  if method == "l2":
    return optax.chain(optax.add_decayed_weights(1e-4), sgd), False
  if method == "snp":
    return optax.chain(sgd, methods_lib.shrink_and_perturb(1.0 - net.lr * 1e-4, 1e-4, key=key)), False
  if method == "redo":
    return optax.chain(
      sgd, methods_lib.redo(graph, key=key, tau=0.0, period=1000, init=net.cbp["init"])
    ), True
  if method in NEWER_METHODS:
    hp = {"step_size": net.lr, **plasticity_methods.DEFAULTS[method]}
    return plasticity_methods.optimizer(method, hp, graph, key, init=net.cbp["init"], sgd=sgd), True
  raise ValueError(f"unknown method {method!r}")


# The newer methods, built as the experiments build them (ReDo keeps its own
# row above: tau 0, as before).
NEWER_METHODS = tuple(m for m in plasticity_methods.NAMES if m != "redo")


def available_methods(quick: bool = False) -> list[str]:
  out = ["bp", "cbp", "cbp_k10", "l2"]
  if not quick:
    out += ["cbp_k100", "cbp_guard", "snp", "redo", *NEWER_METHODS]
  return out


def net_for(net: Net, method: str) -> Net | None:
  """``net`` as ``method`` trains it (LayerNorm for ``ln_wd``), or None where it does not apply."""
  if not plasticity_methods.layer_norm(method):
    return net
  if not isinstance(net.model, models.MLP):
    return None  # LayerNorm + weight decay is benchmarked on the MLPs only.
  return dataclasses.replace(net, model=net.model.clone(layer_norm=True))


def age_past_maturity(opt_state: Any, maturity: int) -> Any:
  """Makes CBP's first replacements immediate.

  Every unit's age becomes ``maturity + 1`` (eligible now) and every layer's
  pending fraction 0.99 (in accumulate mode its next replacement is due
  at once), so even the ConvNet's short timed calls include replacements.
  """

  def fix(s):
    if isinstance(s, transform_lib.CbpState):
      layers = {}
      for n, l in s.layers.items():
        age = jnp.full_like(l.statistics.age, maturity + 1)
        layers[n] = l._replace(
          statistics=l.statistics._replace(age=age), pending=jnp.full_like(l.pending, 0.99)
        )
      return s._replace(layers=layers)
    return s

  return jax.tree.map(fix, opt_state, is_leaf=lambda s: isinstance(s, transform_lib.CbpState))


def replaced_total(opt_state: Any) -> int | None:
  """Units replaced so far by CBP (summed over layers and seeds), if CBP is there."""
  try:
    state = transform_lib.find_cbp_state(opt_state)
  except ValueError:
    return None
  return int(sum(np.sum(np.asarray(v)) for v in state.replaced_total.values()))


# --- Programs ---------------------------------------------------------------


def make_data(net: Net, key: jax.Array, buffers: int = 4) -> tuple[jax.Array, jax.Array]:
  kx, ky = jax.random.split(key)
  x = jax.random.uniform(kx, (buffers, net.batch) + net.x_shape, jnp.float32)
  if net.loss == "mse":
    y = jax.random.normal(ky, (buffers, net.batch, net.outputs), jnp.float32)
  else:
    y = jax.random.randint(ky, (buffers, net.batch), 0, net.outputs)
  return x, y


def make_step(net: Net, tx: optax.GradientTransformation, needs_acts: bool, data):
  x_buf, y_buf = data
  buffers = x_buf.shape[0]

  def loss_fn(params, x, y):
    if needs_acts:
      out, acts = plasticity_methods.apply_with_activations(net.model, params, x)
    else:
      out, acts = net.model.apply({"params": params}, x), None
    if net.loss == "mse":
      loss = jnp.mean((out - y) ** 2)
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return loss, acts

  def step(carry, i):
    params, opt_state = carry
    x, y = x_buf[i % buffers], y_buf[i % buffers]
    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    if needs_acts:
      updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def init_carry(net: Net, method: str, key: jax.Array):
  k_params, k_tx = jax.random.split(key)
  x0 = jnp.zeros((net.batch,) + net.x_shape, jnp.float32)
  params = net.model.init(k_params, x0)["params"]
  tx, _ = make_tx(net, method, params, k_tx)
  if method == "injection":
    params = plasticity_methods.injectable(params)
  opt_state = age_past_maturity(tx.init(params), net.cbp["maturity_threshold"])
  return params, opt_state


@dataclasses.dataclass
class Program:
  """A compiled ``steps``-step run and the carry its timed calls start from."""

  label: str
  run: Callable
  carry: Any
  steps: int  # Optimizer steps per call, summed over seeds.
  compile_s: float
  replaced: int | None = None


def build(net: Net, method: str, steps: int, seeds: int | None = None) -> Program:
  """Compiles ``steps`` scanned steps (vmapped over ``seeds`` if given)."""
  t0 = time.perf_counter()
  key = jax.random.key(0)
  data = make_data(net, jax.random.fold_in(key, 1))
  x0 = jnp.zeros((net.batch,) + net.x_shape, jnp.float32)
  shape_params = jax.eval_shape(lambda: net.model.init(key, x0)["params"])
  tx, needs_acts = make_tx(net, method, shape_params, jax.random.key(0))
  step = make_step(net, tx, needs_acts, data)

  def run_one(carry):
    carry, losses = jax.lax.scan(step, carry, jnp.arange(steps))
    return carry, losses[-1]

  if seeds is None:
    carry = jax.jit(lambda k: init_carry(net, method, k))(key)
    run = jax.jit(run_one)
  else:
    keys = jax.random.split(key, seeds)
    carry = jax.jit(jax.vmap(lambda k: init_carry(net, method, k)))(keys)
    run = jax.jit(jax.vmap(run_one))
  if net.loop == "python" and seeds is None:
    one = jax.jit(step).lower(carry, np.int32(0)).compile()
    indices = [np.int32(i) for i in range(steps)]

    def compiled(carry):
      loss = None
      for i in indices:
        carry, loss = one(carry, i)
      return carry, loss
  else:
    compiled = run.lower(carry).compile()
  if net.loop == "python" and seeds is None:
    jax.block_until_ready(one(carry, np.int32(0)))  # Warm-up (the state is pre-aged).
  else:
    carry, _ = jax.block_until_ready(compiled(carry))  # Warm-up; also ages the state.
  label = method if seeds is None else f"{method}[{seeds} seeds]"
  return Program(label, compiled, carry, steps * (seeds or 1), time.perf_counter() - t0)


def time_interleaved(
  programs: list[Program], repeats: int, cpu_times: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
  """Times each program once per repeat, in a rotated order; returns seconds.

  Wall-clock seconds are returned; process CPU seconds (all threads) are
  appended to ``cpu_times`` when given.
  """
  cpu_times = {} if cpu_times is None else cpu_times
  times: dict[str, list[float]] = {p.label: [] for p in programs}
  before = {p.label: replaced_total(p.carry[1]) for p in programs}
  for r in range(repeats):
    order = programs[r % len(programs) :] + programs[: r % len(programs)]
    for p in order:
      t0, c0 = time.perf_counter(), time.process_time()
      out = p.run(p.carry)
      jax.block_until_ready(out)
      times[p.label].append(time.perf_counter() - t0)
      cpu_times.setdefault(p.label, []).append(time.process_time() - c0)
      if r == 0 and before[p.label] is not None:
        p.replaced = replaced_total(out[0][1]) - before[p.label]
  return times


# --- State size -------------------------------------------------------------


def _key_data(tree: Any) -> Any:
  """Typed PRNG keys as their raw uint32 data (so their bytes can be counted)."""
  return jax.tree.map(
    lambda l: jax.random.key_data(l) if jnp.issubdtype(l.dtype, jax.dtypes.prng_key) else l, tree
  )


def tree_bytes(tree: Any) -> int:
  """Bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(l.shape) * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(tree))


def state_sizes(net: Net) -> dict:
  """Optimizer-state bytes of BP and CBP (and CBP wrapping Adam vs Adam)."""
  key = jax.random.key(0)
  x0 = jnp.zeros((net.batch,) + net.x_shape, jnp.float32)
  params = jax.eval_shape(lambda: net.model.init(key, x0)["params"])
  graph = cbp_jax.graph_from_params(params)
  layers, _, _ = cbp_jax.graph.resolve(graph, params)
  units = sum(l.width for l in layers)
  sizes = {}
  for label, tx in (
    ("bp", make_tx(net, "bp", params, key)[0]),
    ("cbp", make_tx(net, "cbp", params, key)[0]),
    ("adam", optax.adam(1e-3)),
    ("cbp(adam)", cbp_jax.cbp(graph, key=key, optimizer=optax.adam(1e-3), **net.cbp)),
  ):
    sizes[label] = tree_bytes(jax.eval_shape(lambda p: _key_data(tx.init(p)), params))
  return {
    "net": net.name,
    "params_bytes": tree_bytes(params),
    "hidden_layers": len(layers),
    "hidden_units": units,
    "bp_state_bytes": sizes["bp"],
    "cbp_state_bytes": sizes["cbp"],
    "cbp_extra_bytes": sizes["cbp"] - sizes["bp"],
    "adam_state_bytes": sizes["adam"],
    "cbp_adam_state_bytes": sizes["cbp(adam)"],
    "cbp_adam_extra_bytes": sizes["cbp(adam)"] - sizes["adam"],
    "extra_bytes_per_unit": (sizes["cbp"] - sizes["bp"]) / units,
  }


# --- Machine ----------------------------------------------------------------


def _shell(cmd: str) -> str:
  try:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
  except Exception:  # pragma: no cover - best effort
    return ""


def machine_info() -> dict:
  return {
    "date": _shell("date") or datetime.datetime.now().isoformat(),
    "nproc": _shell("nproc") or str(os.cpu_count()),
    "lscpu": _shell("lscpu | head -n 14").splitlines(),
    "platform": platform.platform(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def _jaxlib_version() -> str:
  try:
    import jaxlib

    return jaxlib.__version__
  except Exception:  # pragma: no cover
    return ""


# --- Main -------------------------------------------------------------------


def benchmark_net(net: Net, methods: list[str], steps: int, repeats: int, log) -> list[dict]:
  programs = []
  for m in methods:
    if net_for(net, m) is None:
      log(f"  skipped {net.name}/{m} (not applicable)")
      continue
    p = build(net_for(net, m), m, steps)
    log(f"  compiled {net.name}/{m} ({p.compile_s:.1f} s incl. warm-up)")
    programs.append(p)
  times = time_interleaved(programs, repeats)
  bp = float(np.median(times["bp"]))
  rows = []
  for p in programs:
    t = np.asarray(times[p.label])
    med = float(np.median(t))
    rows.append(
      {
        "net": net.name,
        "method": p.label,
        "batch": net.batch,
        "seeds": 1,
        "loop": net.loop,
        "steps_per_call": p.steps,
        "repeats": repeats,
        "steps_per_s": p.steps / med,
        "steps_per_s_min": p.steps / float(t.max()),
        "steps_per_s_max": p.steps / float(t.min()),
        "ratio_vs_bp": bp / med,
        "ratio_vs_bp_per_repeat": (np.asarray(times["bp"]) / t).tolist(),
        "replaced": p.replaced,
        "compile_s": p.compile_s,
        "reference_steps_per_s": REFERENCE.get(net.name, {}).get(p.label),
      }
    )
  return rows


def benchmark_sweep(net: Net, steps: dict[int, int], repeats: int, log) -> list[dict]:
  programs = []
  for s, n in steps.items():
    for m in ("bp", "cbp"):
      p = build(net, m, n, seeds=s)
      log(f"  compiled sweep/{p.label} ({p.compile_s:.1f} s incl. warm-up)")
      programs.append((s, m, p))
  times = time_interleaved([p for _, _, p in programs], repeats)
  rows = []
  for s, m, p in programs:
    med = float(np.median(times[p.label]))
    bp = float(np.median(times[f"bp[{s} seeds]"]))
    rows.append(
      {
        "net": "sweep",
        "method": m,
        "batch": net.batch,
        "seeds": s,
        "steps_per_call": p.steps,
        "repeats": repeats,
        "steps_per_s": p.steps / med,  # seed-steps per second
        "wall_steps_per_s": p.steps / s / med,
        "ratio_vs_bp": bp / med,
        "replaced": p.replaced,
        "compile_s": p.compile_s,
      }
    )
  return rows


def brax_available() -> bool:
  return importlib.util.find_spec("brax") is not None


def benchmark_ant(repeats: int, log) -> list[dict]:
  """Environment steps/s of slippery-Ant PPO and PPO+CBP (one seed, reduced config).

  Each method is its own compiled chunk (`experiments.slippery_ant.make_batched`),
  warmed up by one chunk; then ``repeats`` rounds time one further chunk of each,
  interleaved in alternating order (each run continues its own carry, so the
  timed chunks are the run's chunks 1..repeats). Ratio = CBP's steps/s over PPO's.
  """
  from experiments import slippery_ant

  runs = {}
  for method in ("ppo", "cbp"):
    config = slippery_ant.make_config({"seeds": 1, "methods": [method]})
    init, chunk = slippery_ant.make_batched(config)
    compiled, compile_s = runner.compile_chunk(chunk, init(runner.seed_keys(config)))
    carry, _ = jax.block_until_ready(compiled(init(runner.seed_keys(config)), jnp.asarray(0, jnp.int32)))
    runs[method] = {
      "config": config,
      "compiled": compiled,
      "carry": carry,
      "compile_s": compile_s,
      "times": [],
    }
    log(f"  compiled ant/{method} ({compile_s:.0f} s) and ran its first chunk")
  for r in range(repeats):
    for method in ("ppo", "cbp") if r % 2 == 0 else ("cbp", "ppo"):
      run = runs[method]
      tic = time.perf_counter()
      run["carry"], metrics = run["compiled"](run["carry"], jnp.asarray(r + 1, jnp.int32))
      jax.block_until_ready((run["carry"], metrics))
      run["times"].append(time.perf_counter() - tic)
  rows = []
  for method, run in runs.items():
    per = float(np.median(run["times"]))
    steps = slippery_ant.steps_per_chunk(run["config"])
    rows.append(
      {
        "net": "ant",
        "method": method,
        "batch": run["config"]["num_envs"],
        "seeds": 1,
        "repeats": repeats,
        "steps_per_s": steps / per,
        "seconds_per_chunk": per,
        "seconds_per_chunk_all": run["times"],
        "compile_s": run["compile_s"],
      }
    )
  for row in rows:
    row["ratio_vs_bp"] = row["steps_per_s"] / rows[0]["steps_per_s"]
  return rows


def format_table(rows: list[dict]) -> str:
  head = f"{'net':14s} {'method':13s} {'batch':>5s} {'seeds':>5s} {'steps/s':>10s} {'ratio':>6s} {'replaced':>8s}  reference (PyTorch)"
  lines = [head, "-" * len(head)]
  for r in rows:
    ref = r.get("reference_steps_per_s")
    lines.append(
      f"{r['net']:14s} {r['method']:13s} {r['batch']:5d} {r['seeds']:5d} "
      f"{r['steps_per_s']:10.1f} {r['ratio_vs_bp']:6.2f} "
      f"{'' if r.get('replaced') is None else r['replaced']:>8}  {'' if ref is None else f'{ref:,.0f}'}"
    )
  return "\n".join(lines)


def format_state_table(sizes: list[dict]) -> str:
  head = (
    f"{'net':14s} {'units':>6s} {'params B':>11s} {'BP state':>9s} {'CBP state':>10s} "
    f"{'extra':>7s} {'B/unit':>6s} {'Adam':>11s} {'CBP(Adam)':>11s} {'extra':>7s}"
  )
  lines = [head, "-" * len(head)]
  for s in sizes:
    lines.append(
      f"{s['net']:14s} {s['hidden_units']:6d} {s['params_bytes']:11,d} {s['bp_state_bytes']:9,d} "
      f"{s['cbp_state_bytes']:10,d} {s['cbp_extra_bytes']:7,d} {s['extra_bytes_per_unit']:6.1f} "
      f"{s['adam_state_bytes']:11,d} {s['cbp_adam_state_bytes']:11,d} {s['cbp_adam_extra_bytes']:7,d}"
    )
  return "\n".join(lines)


def profile(net: Net, steps: int, methods: list[str], top: int = 25) -> None:
  """Prints, per method, the XLA operations that take the time (ms per step)."""
  from jax._src.lib import _profile_data  # Private, but ships with jaxlib.

  programs = [build(net, m, steps) for m in methods]
  for p in programs:
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d)
      jax.block_until_ready(p.run(p.carry))
      jax.profiler.stop_trace()
      files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
      data = _profile_data.ProfileData.from_file(files[0])
    total = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for ev in line.events:
          name = ev.name
          if name.startswith("$") or "Execute" in name or "Pjit" in name or "Thunk" in name:
            continue
          total[name] += ev.duration_ns
    ops = sum(total.values()) / 1e6 / steps
    print(f"\n{net.name}/{p.label}: {ops:.2f} ms/step in XLA operations; top {top}:")
    for name, ns in total.most_common(top):
      print(f"  {ns / 1e6 / steps:8.3f} ms  {name}")


def main(argv: list[str] | None = None) -> dict | None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="fewer steps and repeats, methods bp,cbp,cbp_k10,l2 only"
  )
  parser.add_argument("--out", default="results/benchmark.json", help="JSON output path")
  parser.add_argument(
    "--nets",
    default=None,
    help="comma-separated subset of: scr,mnist_b1,mnist_b32,convnet_b100,convnet_im2col_b100,sweep,ant "
    "(ant: slippery-Ant PPO env steps/s, needs the rl extra; default when installed)",
  )
  parser.add_argument(
    "--methods", default=None, help=f"comma-separated subset of {','.join(available_methods())}"
  )
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument(
    "--profile",
    default=None,
    metavar="NET",
    help="print an op-level profile of NET instead (BP and CBP, or --methods)",
  )
  args = parser.parse_args(argv)

  all_nets = nets()
  methods = available_methods(args.quick)
  if args.methods:
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(available_methods())
    if unknown:
      parser.error(f"unknown or unavailable methods {sorted(unknown)}")
    if "bp" not in methods:
      methods = ["bp"] + methods
  if args.profile:
    net = all_nets[args.profile]
    profile(net, net.quick_steps, methods if args.methods else ["bp", "cbp"])
    return None
  selected = list(all_nets) + ["sweep"] + (["ant"] if brax_available() else [])
  if args.nets:
    selected = [n for n in args.nets.split(",") if n]
    unknown = set(selected) - set(all_nets) - {"sweep", "ant"}
    if unknown:
      parser.error(f"unknown nets {sorted(unknown)}")
    if "ant" in selected and not brax_available():
      parser.error("net 'ant' needs brax and mujoco-mjx: pip install -e .[rl]")
  repeats = args.repeats or (3 if args.quick else 7)

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  started = time.perf_counter()
  info = machine_info()
  log(f"jax {info['jax']} on {info['backend']} ({info['nproc']} cores), {info['date']}")
  rows, sizes = [], []
  for name in selected:
    if name == "ant":
      log("ant: slippery-Ant PPO vs PPO+CBP, environment steps/s")
      rows += benchmark_ant(2 if args.quick else 3, log)
      continue
    if name == "sweep":
      net = all_nets["scr"]
      steps = SWEEP_QUICK_STEPS if args.quick else SWEEP_STEPS
      log(f"sweep: scr net vmapped over seeds, {steps} steps per call")
      rows += benchmark_sweep(net, steps, repeats, log)
      continue
    net = all_nets[name]
    steps = net.quick_steps if args.quick else net.steps
    log(f"{name}: {steps} steps per call, {repeats} repeats, methods {methods}")
    rows += benchmark_net(net, methods, steps, repeats, log)
    sizes.append(state_sizes(net))

  table = format_table(rows)
  state_table = format_state_table(sizes)
  print(table)
  print()
  print("Optimizer-state bytes (CBP extra = CBP state - BP state; B/unit = extra / hidden units)")
  print(state_table)
  elapsed = time.perf_counter() - started
  result = {
    "schema": SCHEMA,
    "command": " ".join(["python -m experiments.benchmark"] + (argv if argv is not None else sys.argv[1:])),
    "quick": args.quick,
    "repeats": repeats,
    "machine": info,
    "elapsed_s": elapsed,
    "results": rows,
    "state_bytes": sizes,
    "reference_pytorch": REFERENCE,
  }
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    log(f"wrote {args.out} ({elapsed:.0f} s)")
  return result


if __name__ == "__main__":
  main()
