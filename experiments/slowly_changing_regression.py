"""Slowly-changing regression (Dohare et al., Nature 2024), whole-run compiled and vmapped.

The problem (SPEC "Experiments"; reference: ``lop/slowly_changing_regression``)
---------------------------------------------------------------------------
* Inputs: ``m = 20`` bits. The first ``f = 15`` ("slow") bits are constant
  within each period of ``T = 10,000`` examples; at every change point
  ``t = k T`` they are **all redrawn**, i.i.d. fair coin flips (SPEC's
  "redrawn every 10,000 examples"; also what the reference's data generator
  does by default, ``flip_one=False``, and hence what made the paper's
  figures). ``slow_bits_mode="flip_one"`` instead flips exactly one slow bit,
  chosen uniformly, at each change point (the reference's ``flip_one``
  option and the paper text's "bit-flipping" description). The last
  ``m - f = 5`` bits are fresh coin flips every example. No constant-1 input
  is appended: the target and the learner both have biases (as in the
  reference).
* Target: a fixed random ``20-100-1`` network of linear threshold units
  (LTUs), all weights and biases ``+-1`` with equal probability. With
  ``W`` (20 x 100), ``b`` (100), ``v`` (100), ``c`` all in ``{-1, +1}``,
  hidden unit ``i`` fires (outputs 1, else 0) iff

      ``sum_j W[j, i] x_j + b_i  >  theta_i``,
      ``theta_i = beta * (m + 1) - S_i``,  ``S_i = (m - sum_j W[j, i] + b_i) / 2``,

  with ``beta = 0.7``, and the target is ``y = sum_i v_i f_i + c``. This is
  the reference's ``FixLTUNet`` exactly: ``S_i`` is meant to count the
  negative input weights (``(m - sum_j W[j, i]) / 2`` does), and the
  reference adds ``b_i / 2`` to it; we keep that so our targets are the ones
  the paper's numbers come from. Here ``theta_i = 14.7 - S_i`` with ``2 S_i``
  an integer, so ``theta_i`` is at least 0.2 away from every integer: the
  (integer) pre-activation never ties with it, and float32 and float64 agree.
* Learner: ``20-5-1`` MLP (`cbp_jax.models.MLP`, hidden kaiming-uniform,
  head U(+-sqrt(3/5)), biases 0; ReLU by default; tanh, sigmoid,
  leaky_relu, swish, elu, selu selectable), plain SGD on the squared error
  ``(y_hat - y)^2`` of one example per step (PyTorch's ``mse_loss``, as in the
  reference). The recorded error of an example is measured *before* the step
  on it (online error). Errors are averaged in bins of 20,000 examples.
* Methods (all SGD at ``step_size``, default 0.01, the paper's):
  ``linear`` (a 20-1 linear learner, head init U(+-sqrt(3/20))), ``bp``
  (plain backprop), ``l2`` (``add_decayed_weights(wd)`` before SGD, i.e.
  PyTorch SGD ``weight_decay``; default 1e-2), ``snp`` (Shrink & Perturb:
  `cbp_jax.methods.shrink_and_perturb` last in the chain with
  ``shrink = 1 - step_size * weight_decay`` and Gaussian ``noise_scale``,
  the reference's S&P = SGD weight decay + noise after every step; default
  wd 1e-2, noise 1e-4),
  ``cbp`` (`cbp_jax.cbp` last in the chain: replacement rate ``1e-4``,
  maturity 10, decay 0.99, ``adaptable_contribution``, kaiming, the
  reference's probabilistic count ``accumulate=False``, paper's intended
  next-layer bias correction). Any numeric hyperparameter can be swept per
  method (``config["sweep"]``, ``--sweep``); the variants of one method are
  vmapped together. How the defaults were chosen: see `HPARAMS`.

Everything, target network and input stream included, is generated inside
the compiled program from the seed (no data files). Seed ``i`` uses
``fold_in(key(config["seed"]), i)``; all methods of one seed see the same
target, the same input stream and the same initial weights (paired
comparison), and adding seeds does not change existing ones.

Program structure (purejaxrl style): `make_train` returns a pure per-seed
``train(key)``; `make_chunked` returns per-seed ``init(key)`` and
``chunk(carry, chunk_index)`` (a ``lax.scan`` over bins, each generating its
20,000 inputs vectorised then ``lax.scan``-ning SGD steps, all methods in
one scan body); `EXPERIMENT` declares them to the protocol
(`experiments.protocol`), whose `run_experiment` vmaps them over seeds and
drives them with `experiments.runner.run` (progress, results file, plot,
checkpoints), and whose `main` is the command line.

Usage::

  python -m experiments.slowly_changing_regression --seeds 30 --steps 1000000 \\
      --methods bp,cbp,l2,snp,linear --out results/scr
  python -m experiments.slowly_changing_regression --paper --out results/scr_paper
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from cbp_jax import metrics as metrics_lib
from experiments import optimizers, plasticity_methods, protocol, runner

METHODS = ("linear", "bp", "l2", "snp", "cbp") + plasticity_methods.NAMES
ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "swish", "elu", "selu")
SLOW_BITS_MODES = ("redraw", "flip_one")

# Hyperparameters of every method; the numeric ones may be swept (the variants
# of a method run vmapped in one program). SPEC gives only CBP's settings
# (rate swept 1e-6..1e-2, maturity 10, decay 0.99, adaptable_contribution,
# kaiming); the rate, the L2 weight decay and the S&P weight decay and noise
# were chosen by a sweep (10 seeds x 1M examples, error over the last 100k):
#   CBP rate   1e-6: 0.98  1e-5: 0.69  1e-4: 0.52  1e-3: 0.55  1e-2: 0.69
#   L2 wd      1e-4: 1.06  3e-4: 1.22  1e-3: 0.79  3e-3: 0.73  1e-2: 0.71
#              3e-2: 0.97  1e-1: 1.05  3e-1: 1.24
#   S&P wd x noise (1e-5 / 1e-4 / 1e-3):  wd 1e-4: 1.05 / 1.19 / 0.91
#              wd 1e-3: 0.81 / 0.76 / 0.68   wd 1e-2: 0.63 / 0.57 / 0.58
#   (BP 1.22, linear 0.85 in the same runs.) S&P's wd 1e-2 is also the
#   reference config's (relu_snp.json, which sweeps only the noise).
HPARAMS: dict[str, dict[str, Any]] = {
  "linear": {"step_size": 0.01},
  "bp": {"step_size": 0.01},
  "l2": {"step_size": 0.01, "weight_decay": 1e-2},
  "snp": {"step_size": 0.01, "weight_decay": 1e-2, "noise_scale": 1e-4},
  "cbp": {
    "step_size": 0.01,
    "replacement_rate": 1e-4,
    "maturity_threshold": 10,
    "decay_rate": 0.99,
    "utility": "adaptable_contribution",
    "init": "kaiming",
    "accumulate": False,
    "next_bias_correction": True,
  },
  # The newer methods (`experiments.plasticity_methods`; not in the paper,
  # settings not tuned for this problem). "injection" injects the learner's
  # hidden and output layers at the start of bin ``at_bin`` (the middle of
  # the default 50 bins).
  **{m: {"step_size": 0.01, **v} for m, v in plasticity_methods.DEFAULTS.items()},
  "injection": {"step_size": 0.01, "at_bin": 25},
}
SHORT_NAMES = protocol.SHORT_NAMES

DEFAULT_CONFIG: dict[str, Any] = {
  "seed": 0,
  "seeds": 30,
  "steps": 1_000_000,
  "bin_size": 20_000,
  "bins_per_chunk": 5,
  # Problem.
  "num_inputs": 20,
  "num_slow_bits": 15,
  "change_every": 10_000,
  "slow_bits_mode": "redraw",
  "target_hidden": 100,
  "beta": 0.7,
  # Learner.
  "hidden": 5,
  "activation": "relu",
  "probe_size": 2000,
  # Methods, their hyperparameters, and sweeps: {method: {numeric hparam:
  # [values]}}; a method's variants are the Cartesian product of its swept
  # values (vmapped together), labelled e.g. "bp[lr=0.003]".
  "methods": ["bp", "cbp", "l2", "snp", "linear"],
  "hparams": HPARAMS,
  "sweep": {},
}

# The paper's figure: 100 runs x 1M examples; BP and the linear learner at step
# sizes 0.01, 0.003 and 0.001.
PAPER_OVERRIDES: dict[str, Any] = {
  "seeds": 100,
  "steps": 1_000_000,
  "sweep": {"bp": {"step_size": [0.01, 0.003, 0.001]}, "linear": {"step_size": [0.01, 0.003, 0.001]}},
}


def validate_config(c: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first inconsistent entry of the problem or a
  method's hyperparameters (the common entries are checked by the protocol)."""
  need = runner.require
  runner.require_positive_ints(
    c,
    (
      "seeds",
      "steps",
      "bin_size",
      "bins_per_chunk",
      "num_inputs",
      "change_every",
      "target_hidden",
      "hidden",
      "probe_size",
    ),
  )
  need(
    isinstance(c["num_slow_bits"], int) and 0 <= c["num_slow_bits"] <= c["num_inputs"],
    f"num_slow_bits must be in [0, num_inputs], got {c['num_slow_bits']}",
  )
  need(
    c["steps"] % (c["bin_size"] * c["bins_per_chunk"]) == 0,
    f"steps ({c['steps']}) must be a multiple of bin_size * bins_per_chunk "
    f"({c['bin_size']} * {c['bins_per_chunk']})",
  )
  need(
    c["slow_bits_mode"] in SLOW_BITS_MODES,
    f"slow_bits_mode must be one of {SLOW_BITS_MODES}, got {c['slow_bits_mode']!r}",
  )
  need(c["activation"] in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {c['activation']!r}")
  for m in c["methods"]:
    for hp in protocol.variants(c, m):
      need(hp["step_size"] > 0, f"{m}: step_size must be > 0, got {hp['step_size']}")
      if m in ("l2", "snp"):
        need(hp["weight_decay"] >= 0, f"{m}: weight_decay must be >= 0")
      if m == "snp":
        need(hp["noise_scale"] >= 0, "snp: noise_scale must be >= 0")
        need(
          0 <= hp["step_size"] * hp["weight_decay"] < 1,
          "snp: step_size * weight_decay must be in [0, 1) (shrink = 1 - lr * wd)",
        )
      if m == "cbp":
        need(0 <= hp["replacement_rate"] <= 1, "cbp: replacement_rate must be in [0, 1]")
        need(0 <= hp["decay_rate"] < 1, "cbp: decay_rate must be in [0, 1)")
        need(hp["maturity_threshold"] >= 0, "cbp: maturity_threshold must be >= 0")


def num_chunks(config: Mapping[str, Any]) -> int:
  return config["steps"] // (config["bin_size"] * config["bins_per_chunk"])


seed_key = runner.seed_key
seed_keys = runner.seed_keys


# ---------------------------------------------------------------------------
# Keys, target network, input stream.
# ---------------------------------------------------------------------------


seed_key = runner.seed_key
seed_keys = runner.seed_keys


def _data_keys(key: jax.Array) -> dict[str, jax.Array]:
  data = jax.random.fold_in(key, 0)
  names = ("target", "slow", "flip", "fast", "probe")
  return {n: jax.random.fold_in(data, i) for i, n in enumerate(names)}


def _signs(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(jnp.float32)


def make_target(config: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """The seed's target LTU network: ``{"W": (m, n), "b": (n,), "v": (n,), "c": (), "theta": (n,)}``.

  Weights and biases are +-1; ``theta`` is the threshold (module docstring).
  """
  m, n = config["num_inputs"], config["target_hidden"]
  kw, kb, kv, kc = jax.random.split(_data_keys(key)["target"], 4)
  w, b, v, c = _signs(kw, (m, n)), _signs(kb, (n,)), _signs(kv, (n,)), _signs(kc, ())
  s = (m - jnp.sum(w, axis=0) + b) / 2.0
  theta = config["beta"] * (m + 1) - s
  return {"W": w, "b": b, "v": v, "c": c, "theta": theta}


def target_output(target: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """``y`` for inputs ``x`` of shape ``(..., m)``; returns shape ``(...)``."""
  pre = x @ target["W"] + target["b"]
  features = (pre > target["theta"]).astype(jnp.float32)
  return features @ target["v"] + target["c"]


def _segment_bits(config, keys, segment):
  return jax.random.bernoulli(jax.random.fold_in(keys["slow"], segment), 0.5, (config["num_slow_bits"],))


def init_stream(config: Mapping[str, Any], key: jax.Array) -> jax.Array:
  """Stream state before bin 0: the slow bits of segment 0 (bool, (f,))."""
  return _segment_bits(config, _data_keys(key), 0)


def stream_bin(
  config: Mapping[str, Any], key: jax.Array, bin_index: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The inputs and targets of one bin.

  Args:
    config: the experiment config.
    key: the seed's key.
    bin_index: which bin (int32 scalar, may be traced).
    state: the slow bits of the segment holding the previous bin's last
      example (`init_stream` for bin 0).

  Returns:
    ``(x, y, state)``: ``x`` float32 ``(bin_size, m)`` of 0/1, ``y`` float32
    ``(bin_size,)``, and the new state (slow bits of this bin's last segment).
  """
  L, T, f = config["bin_size"], config["change_every"], config["num_slow_bits"]
  m = config["num_inputs"]
  keys = _data_keys(key)
  start = bin_index.astype(jnp.int32) * L
  t = start + jnp.arange(L, dtype=jnp.int32)
  first, last = start // T, (start + L - 1) // T
  n_seg = (L - 1) // T + 2  # Static bound on the segments one bin touches.
  segments = first + jnp.arange(n_seg, dtype=jnp.int32)
  if config["slow_bits_mode"] == "redraw":
    seg_bits = jax.vmap(lambda s: _segment_bits(config, keys, s))(segments)
  else:  # flip_one: segment s = segment s-1 with one uniformly chosen bit flipped.

    def advance(bits_prev, s):
      j = jax.random.randint(jax.random.fold_in(keys["flip"], s), (), 0, f)
      flipped = bits_prev ^ (jnp.arange(f) == j)
      # `state` holds segment first-1's bits, or segment `first`'s when the
      # bin starts mid-segment (or at t = 0) and nothing flips at `first`.
      new = jnp.where((s > 0) & (s * T >= start) & (s <= last), flipped, bits_prev)
      return new, new

    _, seg_bits = jax.lax.scan(advance, state, segments)
  slow = seg_bits[t // T - first]
  fast = jax.random.bernoulli(jax.random.fold_in(keys["fast"], bin_index), 0.5, (L, m - f))
  x = jnp.concatenate([slow, fast], axis=1).astype(jnp.float32)
  y = target_output(make_target(config, key), x)
  new_state = seg_bits[last - first]
  return x, y, new_state


def probe_inputs(config: Mapping[str, Any], key: jax.Array) -> jax.Array:
  """The seed's fixed probe set for the plasticity correlates: ``probe_size``
  uniformly random 20-bit inputs (all bits random, i.e. every slow setting)."""
  return jax.random.bernoulli(
    _data_keys(key)["probe"], 0.5, (config["probe_size"], config["num_inputs"])
  ).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Learners.
# ---------------------------------------------------------------------------


def _model(config, method):
  if method == "linear":
    return cbp_jax.models.MLP(hidden=(), outputs=1, activation="linear")
  return cbp_jax.models.MLP(
    hidden=(config["hidden"],),
    outputs=1,
    activation=config["activation"],
    layer_norm=plasticity_methods.layer_norm(method),
  )


def _hparams(config, method) -> dict[str, jax.Array]:
  """Numeric hyperparameters of ``method``'s variants as float32 arrays ``(V,)``."""
  vs = protocol.variants(config, method)
  hp = {k: np.asarray([v[k] for v in vs], np.float64) for k, x in vs[0].items() if protocol.is_number(x)}
  if method == "snp":
    hp["shrink"] = 1.0 - hp["step_size"] * hp["weight_decay"]
  return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}


def _optimizer(config, method, hp, graph, key):
  """`experiments.optimizers.optimizer` with the method's traced settings ``hp``."""
  settings = {**config["hparams"][method], **hp}
  bound = None
  if method == "cbp":
    # Numeric settings arrive traced (vmapped variants): bound the replacements
    # per step statically from the largest rate, as the concrete-rate default would.
    max_rate = max(v["replacement_rate"] for v in protocol.variants(config, "cbp"))
    bound = min(config["hidden"], math.ceil(max_rate * config["hidden"]) + 1)
  return optimizers.optimizer(
    method, settings, graph, key, max_replacements_per_step=bound, init=config["hparams"]["cbp"]["init"]
  )


class Learner:
  """One method's per-variant init, SGD step and probe metrics (unbatched)."""

  def __init__(self, config, method, index):
    self.config, self.method, self.index = config, method, index
    self.model = _model(config, method)
    self.hp = _hparams(config, method)
    self.variants = int(self.hp["step_size"].shape[0])
    x = jnp.zeros((1, config["num_inputs"]), jnp.float32)
    shapes = jax.eval_shape(lambda k: self.model.init(k, x)["params"], jax.random.key(0))
    self.graph = None
    if method != "linear":
      self.graph = plasticity_methods.layer_graph(self.model, shapes, x, config["activation"])

  def init(self, key, hp, variant):
    x = jnp.zeros((1, self.config["num_inputs"]), jnp.float32)
    params = self.model.init(jax.random.fold_in(key, 1), x)["params"]
    opt_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), self.index), variant)
    if self.method == "injection":
      params = plasticity_methods.injectable(params)
    tx = _optimizer(self.config, self.method, hp, self.graph, opt_key)
    return params, tx.init(params)

  def start_bin(self, state, hp, key, bin_index):
    """The learner at the start of bin ``bin_index``: plasticity injection's injection point."""
    if self.method != "injection":
      return state
    x = jnp.zeros((1, self.config["num_inputs"]), jnp.float32)
    return plasticity_methods.inject(
      self.model, state, jax.random.fold_in(key, 3), x, bin_index == hp["at_bin"]
    )

  def step(self, state, hp, x, y):
    params, opt_state = state

    def loss_fn(p):
      out, acts = plasticity_methods.apply_with_activations(self.model, p, x[None])
      return jnp.mean((out[0, 0] - y) ** 2), acts

    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # The optimizer's key lives in its state; this key is never used.
    tx = _optimizer(self.config, self.method, hp, self.graph, jax.random.key(0))
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return (optax.apply_updates(params, updates), opt_state), loss

  def probe(self, state, probe_x):
    params, opt_state = state
    params = plasticity_methods.plain_params(params)
    out = {"weight_magnitude": metrics_lib.weight_magnitude(params)["overall"]}
    if self.method == "linear":
      nan = jnp.full((), jnp.nan, jnp.float32)
      out["dead_fraction"], out["effective_rank"] = nan, nan
    else:
      _, acts = cbp_jax.apply_with_activations(self.model, params, probe_x)
      h = acts["Dense_0"]
      out["dead_fraction"] = metrics_lib.dead_unit_fraction(h)
      out["effective_rank"] = metrics_lib.effective_rank(h)
    if self.method == "cbp":
      out["replaced_units"] = cbp_jax.unit_stats(opt_state)["Dense_0"]["replaced"].astype(jnp.float32)
    if self.method in ("redo", "regrama", "snr"):
      out["replaced_units"] = cbp_jax.methods.replaced_total(opt_state).astype(jnp.float32)
    return out


# ---------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------


def make_chunked(config: Mapping[str, Any]):
  """Per-seed ``init(key) -> carry`` and ``chunk(carry, chunk_index) -> (carry, metrics)``.

  ``metrics`` is ``{label: {name: array(bins_per_chunk,)}}`` with names
  ``error`` (mean squared error of the bin's examples, measured before each
  step), ``dead_fraction``, ``effective_rank`` (hidden layer on the probe set
  at the bin's end), ``weight_magnitude`` (mean |w| over all kernels) and,
  for CBP, ``replaced_units`` (cumulative). Vmap both over seed keys.
  """
  config = runner.normalize_config(config)
  EXPERIMENT.validate_config(config)
  methods = [Learner(config, m, i) for i, m in enumerate(config["methods"])]
  labels = list(run_labels(config))
  bins_per_chunk = config["bins_per_chunk"]

  def init(key):
    learners = {}
    for m in methods:
      learners[m.method] = jax.vmap(m.init, in_axes=(None, 0, 0))(key, m.hp, jnp.arange(m.variants))
    return {"key": key, "stream": init_stream(config, key), "learners": learners}

  def one_bin(carry, bin_index):
    key = carry["key"]
    x, y, stream = stream_bin(config, key, bin_index, carry["stream"])
    bin_key = jax.random.fold_in(jax.random.fold_in(key, 4), bin_index)
    start = {
      m.method: jax.vmap(m.start_bin, in_axes=(0, 0, None, None))(
        carry["learners"][m.method], m.hp, bin_key, bin_index
      )
      for m in methods
    }

    def body(learners, xy):
      xt, yt = xy
      new, losses = {}, {}
      for m in methods:
        new[m.method], losses[m.method] = jax.vmap(m.step, in_axes=(0, 0, None, None))(
          learners[m.method], m.hp, xt, yt
        )
      return new, losses

    learners, losses = jax.lax.scan(body, start, (x, y))
    probe_x = probe_inputs(config, key)
    out = {}
    for m in methods:
      err = jnp.mean(losses[m.method], axis=0)  # (V,)
      probed = jax.vmap(m.probe, in_axes=(0, None))(learners[m.method], probe_x)
      for v in range(m.variants):
        label = labels[len(out)]
        out[label] = {"error": err[v], **{k: a[v] for k, a in probed.items()}}
    return {"key": key, "stream": stream, "learners": learners}, out

  return init, runner.scan_points(one_bin, bins_per_chunk)  # Metrics (bins_per_chunk,).


def plot_results(results: Mapping[str, Any], out_dir: Path) -> None:
  """``out_dir/scr.png``: error, dead units, effective rank and weight magnitude per bin."""
  c = results["config"]
  runner.plot_results(
    results,
    out_dir / "scr.png",
    metrics=("error", "dead_fraction", "effective_rank", "weight_magnitude"),
    title=f"slowly-changing regression ({c['activation']}, {c['seeds']} seeds, {runner.BAND_LABEL})",
  )


def summary(results: Mapping[str, Any], early_bins: int = 1, late_bins: int | None = None) -> dict:
  """``{label: {"early": mean error of the first bins, "late": of the last bins}}``
  (means over seeds; ``late_bins`` defaults to the last 10% of bins, at least 1)."""
  out = {}
  for label, named in results["metrics"].items():
    err = np.asarray(named["error"], np.float64)
    n = err.shape[-1]
    late = late_bins or max(1, n // 10)
    out[label] = {
      "early": float(np.mean(err[:, :early_bins])),
      "late": float(np.mean(err[:, n - late :])),
      "late_se": float(np.std(np.mean(err[:, n - late :], axis=1), ddof=1) / math.sqrt(err.shape[0]))
      if err.shape[0] > 1
      else 0.0,
    }
  return out


def format_summary(results: Mapping[str, Any], **kwargs) -> str:
  """A small table of `summary`: early and late binned error per run."""
  rows = summary(results, **kwargs)
  w = max([len("method")] + [len(k) for k in rows])
  lines = [f"{'method':<{w}}  {'early error':>11}  {'late error':>10}  {'+- s.e.':>7}"]
  for label, r in rows.items():
    lines.append(f"{label:<{w}}  {r['early']:>11.3f}  {r['late']:>10.3f}  {r['late_se']:>7.3f}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# The experiment: the protocol runs it (configs, CLI, chunked run, results).
# ---------------------------------------------------------------------------

EXPERIMENT = protocol.Experiment(
  name="slowly_changing_regression",
  short="scr",
  title="Slowly-changing regression (loss of plasticity), compiled and vmapped.",
  defaults=DEFAULT_CONFIG,
  methods=METHODS,
  make_chunked=make_chunked,
  num_chunks=num_chunks,
  points_per_chunk="bins_per_chunk",
  x_label="examples",
  x_step=lambda c: c["bin_size"],
  work_per_run_chunk=lambda c: c["bin_size"] * c["bins_per_chunk"],
  validate=validate_config,
  summary=format_summary,
  plot=plot_results,
  plots=("scr.png",),
  run_info=optimizers.snp_shrink,
  squeeze_single=False,
  # The base seed only enters through the keys in the carry, not the program.
  cache_ignore=("seed",),
  presets={
    "paper": (
      "the paper's configuration: 100 seeds x 1M examples, BP and linear at step sizes 0.01, 0.003, 0.001",
      PAPER_OVERRIDES,
    )
  },
  flags=(
    protocol.flag("--steps", "steps", type=int, help="examples per run (default 1,000,000)"),
    protocol.flag("--bin-size", "bin_size", type=int, help="examples per error bin (default 20,000)"),
    protocol.flag(
      "--bins-per-chunk",
      "bins_per_chunk",
      type=int,
      help="bins per compiled chunk: progress, partial-results and checkpoint granularity (default 5)",
    ),
    protocol.flag("--activation", "activation", choices=ACTIVATIONS),
    protocol.flag("--hidden", "hidden", type=int, help="learner hidden units (default 5)"),
    protocol.flag("--slow-bits-mode", "slow_bits_mode", choices=SLOW_BITS_MODES),
    protocol.flag(
      "--change-every", "change_every", type=int, help="examples between slow-bit changes (10,000)"
    ),
    protocol.flag(
      "--step-size", "hparams.*.step_size", type=float, help="step size of every method (default 0.01)"
    ),
    *protocol.method_flags("--cbp-rate"),
    protocol.flag(
      "--cbp-accumulate",
      "hparams.cbp.accumulate",
      action="store_const",
      const=True,
      help="accumulate fractional replacements (default: probabilistic, as the reference)",
    ),
    *protocol.method_flags("--l2", "--snp-weight-decay", "--snp-noise"),
  ),
  describe=lambda c, _: (
    f"slowly-changing regression: {c['seeds']} seeds x {c['steps']:,} "
    f"examples, runs {', '.join(EXPERIMENT.run_labels(c))}"
  ),
)

# The module's entry points; ``make_batched(config)`` gives the jitted ``init(keys)``
# and ``chunk(carry, index, ...)`` over all seeds, cached per config.
(make_config, run_labels, make_train, make_batched, run_experiment, parse_args, config_from_args, main) = (
  EXPERIMENT.entry_points()
)
variants = protocol.variants


if __name__ == "__main__":
  sys.exit(main())
