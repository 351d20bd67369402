"""Online permuted MNIST (Dohare et al., Nature 2024), whole-run compiled and vmapped.

The problem (SPEC "Experiments"; reference: ``lop/permuted_mnist/online_expr.py``)
---------------------------------------------------------------------------------
* Data: the 60,000 MNIST training images (`experiments.data.load_dataset`, local
  IDX files in ``../shared/data/mnist``; never downloaded), flattened to 784
  pixels and scaled to ``[0, 1]`` (the reference's ``ToTensor``). The data set
  is put on the device **once**, as ``uint8`` (47 MB), and passed to the
  compiled program as an argument (not baked in as a constant); pixels are
  converted to float32 inside the program.
* Tasks: task ``t`` draws a pixel permutation ``perm_t =
  jax.random.permutation(k_t, 784)`` and an example order ``order_t`` (a
  permutation of the 60,000 images; the reference reshuffles every task too).
  Its ``j``-th example is image ``order_t[j mod 60000]`` with pixels gathered
  by ``perm_t`` (``x = image[perm_t]``), label unchanged. Task 0 is permuted
  too, as in the reference. Each task has ``examples_per_task`` examples (the
  paper: 60,000, i.e. one pass; more wraps around like the reference).
  Permutations and orders are computed inside the compiled scan from the
  seed's key: ``k_t = fold_in(fold_in(seed_key, 0), t)``.
* Learner: ``784-width-...-width-10`` ReLU MLP (`cbp_jax.models.MLP`; hidden
  kernels kaiming-uniform, head U(+-sqrt(3/fan_in)), biases 0); default
  ``3 x 2000`` (the paper's net). Softmax cross-entropy on ``batch_size``
  examples per step (the paper: 1).
* Online accuracy: every example is classified by the network *before* the
  step that trains on it (the forward pass of that step). A task's accuracy
  is (correct predictions on its examples) / ``examples_per_task``.
* Plasticity correlates, once per task, at the task's end, on a probe set of
  the first ``probe_size`` examples of that task (default 2,000, as the
  reference; it probes at the start of the next task instead): fraction of
  dead hidden units (never active on the probe set, over all hidden layers),
  effective rank of each hidden layer's probe features (``effective_rank`` is
  their mean, ``effective_rank/Dense_i`` per layer), mean |w| over all kernels
  (``weight_magnitude``), and for CBP the cumulative number of replaced units.
  Also the fraction of linearised units (active on 99% of the probe set) and,
  unless ``--no-probes``, the plasticity probes of
  `experiments.plasticity_probes` (trainability on a fresh random-label task
  and its fresh-initialisation reference, top Hessian eigenvalue, drift from
  initialisation per layer, output churn on held-out inputs: MNIST images
  under a permutation no task uses).
* Methods (the reference's configs, ``lop/permuted_mnist/cfg``; the values its
  figure script ``plots/all_metrics.py`` picks are the defaults here):
  ``bp`` (SGD 0.003), ``adam`` (Adam 1e-4, betas 0.9/0.999, eps 1e-8),
  ``l2`` (SGD 0.003 with ``add_decayed_weights(1e-4)`` before it: PyTorch
  ``weight_decay``), ``snp`` (SGD 0.003, then Shrink & Perturb with
  ``shrink = 1 - lr * 1e-4`` and noise std 1e-5), ``cbp`` (SGD 0.003 then
  `cbp_jax.cbp` last in the chain: replacement rate 1e-6 (figure; the config
  sweeps 1e-4, 1e-5, 1e-6), maturity 100, decay 0.99,
  ``adaptable_contribution``, kaiming, accumulated counts as the reference's
  MLP CBP, next-layer bias correction as the paper intends). Every method's
  hyperparameters are ``config["hparams"][method]``; the step size, and the
  settings the program takes as arrays (the L2 weight decay, S&P's noise, the
  newer methods' numeric settings), can be swept per method
  (``config["sweep"]``); variants of one method are vmapped together.

All methods of one seed see the same permutations, the same example order and
the same initial weights (paired comparison). Seed ``i`` uses
``fold_in(key(config["seed"]), i)``, so adding seeds does not change the
streams of existing ones.

Program structure (purejaxrl style): `make_train` returns a pure per-seed
``train(key)`` (the data set closed over); `make_chunked` returns per-seed
``init(key)`` and ``chunk(carry, chunk_index, data)`` (a ``lax.scan`` over
the chunk's tasks, each a ``lax.scan`` over its steps with every method in
one scan body); `EXPERIMENT` declares them to `experiments.protocol`, whose
`run_experiment` vmaps them over seeds and drives them with
`experiments.runner.run`, the data set an argument of the compiled program
(progress, results file, plot, orbax checkpoints at chunk = task
boundaries, ``--resume``).

Usage::

  # The paper's configuration (10 seeds x 800 tasks x 60,000 examples; weeks on a CPU):
  python -m experiments.permuted_mnist --paper --out results/pmnist_paper
  # The reduced configuration (about 11 CPU-minutes: ~10 minutes on an idle
  # 2-core machine; it took 31 minutes on a shared one at load ~11): BP's
  # accuracy falls task after task, CBP's holds. One run (2 seeds) gave, task 1
  # -> task 40: BP 71.6% -> 48.4%, Adam 78.2% -> 72.6%, L2 70.6% -> 51.7%,
  # S&P 71.4% -> 53.3%, CBP 70.9% -> 72.2% (dead units BP 1% -> 35%, CBP 0%).
  # L2 and S&P keep the paper's strengths, too weak at this step size.
  python -m experiments.permuted_mnist --reduced --out results/pmnist_reduced
  # Steps per second of BP and CBP on the paper's net at batch 1:
  python -m experiments.permuted_mnist --benchmark --benchmark-steps 3000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from cbp_jax import metrics as metrics_lib
from experiments import optimizers, plasticity_methods, plasticity_probes, protocol, runner
from experiments.data import load_dataset

METHODS = ("bp", "adam", "l2", "snp", "cbp") + plasticity_methods.NAMES
# SGD-based methods: --step-size sets theirs.
SGD_METHODS = ("bp", "l2", "snp", "cbp") + plasticity_methods.NAMES
SEED_AXES = ("vmap", "map")
NUM_PIXELS = 784
NUM_CLASSES = 10
# The settings the program takes as float32 arrays, one entry per vmapped
# variant, besides the step size (the others are constants of the program).
TRACED = {
  "l2": ("weight_decay",),
  "snp": ("noise_scale",),
  **{m: tuple(v) for m, v in plasticity_methods.DEFAULTS.items()},
}
# uint8 pixels times this are in [0, 1] (a multiplication: XLA would turn a
# division by 255 into one anyway, so this is what the program computes).
PIXEL_SCALE = np.float32(1.0 / 255.0)

DEFAULT_CONFIG: dict[str, Any] = {
  "seed": 0,
  "seeds": 1,
  "tasks": 800,
  "examples_per_task": 60_000,
  "tasks_per_chunk": 1,
  "batch_size": 1,
  "dataset": "mnist",
  # Learner.
  "width": 2000,
  "depth": 3,
  "probe_size": 2000,
  # How seeds are batched: "vmap" (one batched program) or "map" (lax.map,
  # seeds one after another inside the program; lax.cond stays a branch).
  "seed_axis": "vmap",
  # Methods, their hyperparameters and sweeps ({method: {hparam: [values]}},
  # of the step size and the traced settings, `TRACED`). Run labels are the
  # method names, or "bp@0.003" when a method's step size is swept.
  "methods": ["bp", "adam", "l2", "snp", "cbp"],
  "hparams": {
    "bp": {"step_size": 0.003},
    "adam": {"step_size": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "l2": {"step_size": 0.003, "weight_decay": 1e-4},
    "snp": {"step_size": 0.003, "weight_decay": 1e-4, "noise_scale": 1e-5},
    "cbp": {
      "step_size": 0.003,
      "replacement_rate": 1e-6,
      "maturity_threshold": 100,
      "decay_rate": 0.99,
      "utility": "adaptable_contribution",
      "init": "kaiming",
      "accumulate": True,
      "next_bias_correction": True,
    },
    # The newer methods (`experiments.plasticity_methods`; not in the
    # paper), selectable by name; "injection" injects the output layer at
    # the start of task ``at_task`` (0-based; the middle of the run by default).
    **{m: {"step_size": 0.003, **v} for m, v in plasticity_methods.DEFAULTS.items()},
    "injection": {"step_size": 0.003, "at_task": 400},
  },
  "sweep": {},
  # Plasticity probes at each task's end (`experiments.plasticity_probes`).
  "probes": dict(plasticity_probes.DEFAULT_PROBES),
}

# The paper's figure: 10 runs x 800 tasks x 60,000 examples, 3 x 2000 net.
PAPER_OVERRIDES: dict[str, Any] = {"seeds": 10, "tasks": 800, "examples_per_task": 60_000}

# A configuration that shows the loss of plasticity in about 10 minutes on two
# idle CPU cores (most of it is S&P's per-step noise and CBP): a 3 x 100 net (the paper's width-100 nets lose plasticity
# too), 40 tasks of 3,000 examples, a 10x larger step size (SGD 0.03, Adam 1e-3)
# that speeds the decline, and CBP at a larger replacement rate (1e-4) so that
# replacement keeps pace with the faster decline.
REDUCED_OVERRIDES: dict[str, Any] = {
  "seeds": 2,
  "tasks": 40,
  "examples_per_task": 3_000,
  "tasks_per_chunk": 5,
  "width": 100,
  "probe_size": 1000,
  "hparams": {
    **{m: {"step_size": 0.03} for m in SGD_METHODS},
    "adam": {"step_size": 1e-3},
    "cbp": {"step_size": 0.03, "replacement_rate": 1e-4},
    "injection": {"step_size": 0.03, "at_task": 20},
  },
}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def validate_config(c: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first inconsistent entry (the common entries
  are checked by the protocol)."""
  need = runner.require
  runner.require_positive_ints(
    c, ("tasks", "examples_per_task", "tasks_per_chunk", "batch_size", "width", "depth", "probe_size")
  )
  need(
    c["tasks"] % c["tasks_per_chunk"] == 0,
    f"tasks ({c['tasks']}) must be a multiple of tasks_per_chunk ({c['tasks_per_chunk']})",
  )
  need(
    c["examples_per_task"] % c["batch_size"] == 0,
    f"examples_per_task ({c['examples_per_task']}) must be a multiple of batch_size ({c['batch_size']})",
  )
  need(
    c["dataset"] in ("mnist", "fashion_mnist"),
    f"dataset must be 'mnist' or 'fashion_mnist', got {c['dataset']!r}",
  )
  need(c["seed_axis"] in SEED_AXES, f"seed_axis must be one of {SEED_AXES}, got {c['seed_axis']!r}")
  for m, swept in c["sweep"].items():
    for k in swept:
      need(
        k == "step_size" or k in TRACED.get(m, ()),
        f"sweep.{m}.{k}: {m} sweeps only step_size"
        + "".join(f", {t}" for t in TRACED.get(m, ()))
        + " (the others are constants of the "
        "program; run one config per value)",
      )
  hp = c["hparams"]
  need(0 <= hp["cbp"]["replacement_rate"] <= 1, "hparams.cbp.replacement_rate must be in [0, 1]")
  at = hp["injection"]["at_task"]
  need(
    isinstance(at, int) and not isinstance(at, bool) and at >= 0,
    f"hparams.injection.at_task must be an int >= 0, got {at!r}",
  )
  plasticity_probes.validate(c["probes"])
  for m in ("l2", "snp"):
    for v in protocol.variants(c, m):
      need(v["weight_decay"] >= 0, f"hparams.{m}.weight_decay must be >= 0")
  for v in protocol.variants(c, "snp"):
    need(v["noise_scale"] >= 0, "hparams.snp.noise_scale must be >= 0")
    if "snp" in c["methods"]:
      need(0 < 1 - v["step_size"] * v["weight_decay"] <= 1, "snp: step_size * weight_decay must be in [0, 1)")


def num_chunks(config: Mapping[str, Any]) -> int:
  return config["tasks"] // config["tasks_per_chunk"]


def hidden_layers(config: Mapping[str, Any]) -> list[str]:
  """Names of the hidden layers in the params (``Dense_0`` ...)."""
  return [f"Dense_{i}" for i in range(config["depth"])]


# ---------------------------------------------------------------------------
# Data and tasks.
# ---------------------------------------------------------------------------


def load_data(config: Mapping[str, Any], data_dir: str | Path | None = None) -> dict[str, jax.Array]:
  """The training set on the device: ``{"images": uint8 (N, 784), "labels": int32 (N,)}``.

  Reads the local IDX files (`experiments.data.load_dataset`, ``source="local"``):
  ``data_dir`` (default ``$CBP_JAX_DATA_DIR``, else ``../shared/data``) must
  hold ``mnist/``. Nothing is downloaded.
  """
  ds = load_dataset(config["dataset"], "train", source="local", data_dir=data_dir)
  images = np.ascontiguousarray(ds.images.reshape(ds.images.shape[0], -1))
  if images.shape[1] != NUM_PIXELS:
    raise ValueError(f"expected {NUM_PIXELS} pixels per image, got {images.shape[1]}")
  return {"images": jax.device_put(images), "labels": jax.device_put(ds.labels.astype(np.int32))}


seed_key = runner.seed_key
seed_keys = runner.seed_keys


def task_key(key: jax.Array, task: int | jax.Array) -> jax.Array:
  """Key of task ``task`` of the seed with key ``key``."""
  return jax.random.fold_in(jax.random.fold_in(key, 0), task)


def task_permutation(key: jax.Array, task: int | jax.Array) -> jax.Array:
  """The pixel permutation of a task: int32 ``(784,)``; inputs are ``image[perm]``."""
  return jax.random.permutation(jax.random.fold_in(task_key(key, task), 0), NUM_PIXELS)


def task_order(key: jax.Array, task: int | jax.Array, num_images: int) -> jax.Array:
  """The order in which a task visits the images: a permutation of ``num_images``."""
  return jax.random.permutation(jax.random.fold_in(task_key(key, task), 1), num_images)


def gather_examples(
  data: Mapping[str, jax.Array], perm: jax.Array, order: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Examples at ``positions`` (int, any shape ``S``) of a task.

  Returns:
    ``(x, y)``: float32 ``S + (784,)`` pixels in ``[0, 1]`` permuted by
    ``perm``, and int32 ``S`` labels.
  """
  n = data["images"].shape[0]
  idx = order[positions % n]
  x = data["images"][idx[..., None], perm]
  return x.astype(jnp.float32) * PIXEL_SCALE, data["labels"][idx]


def heldout_examples(config: Mapping[str, Any], data: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """The held-out inputs of the churn probe: ``probes.heldout_size`` images under
  a permutation of their own, one no task uses, fixed for the whole run."""
  held = jax.random.fold_in(key, 3)
  perm = jax.random.permutation(jax.random.fold_in(held, 0), NUM_PIXELS)
  order = jax.random.permutation(jax.random.fold_in(held, 1), data["images"].shape[0])
  return gather_examples(data, perm, order, jnp.arange(config["probes"]["heldout_size"]))[0]


def task_examples(
  config: Mapping[str, Any],
  data: Mapping[str, jax.Array],
  key: jax.Array,
  task: int | jax.Array,
  positions: jax.Array | None = None,
):
  """The examples of task ``task`` (all ``examples_per_task`` of them by default)."""
  if positions is None:
    positions = jnp.arange(config["examples_per_task"])
  perm = task_permutation(key, task)
  order = task_order(key, task, data["images"].shape[0])
  return gather_examples(data, perm, order, positions)


# ---------------------------------------------------------------------------
# Learners.
# ---------------------------------------------------------------------------


def make_model(config: Mapping[str, Any], layer_norm: bool = False) -> cbp_jax.models.MLP:
  return cbp_jax.models.MLP(
    hidden=(config["width"],) * config["depth"], outputs=NUM_CLASSES, layer_norm=layer_norm
  )


def _hparams(config, method) -> dict[str, jax.Array]:
  """Per-variant step size and `TRACED` settings of ``method`` as float32 arrays ``(V,)``."""
  vs = protocol.variants(config, method)
  lrs = np.asarray([v["step_size"] for v in vs], np.float32)
  hp = {"step_size": lrs}
  for k in TRACED.get(method, ()):
    hp[k] = np.asarray([v[k] for v in vs], np.float32)
  if method == "snp":
    wd = np.asarray([v["weight_decay"] for v in vs], np.float64)
    hp["shrink"] = (1.0 - lrs.astype(np.float64) * wd).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in hp.items()}


def _optimizer(config, method, hp, graph, key):
  """`experiments.optimizers.optimizer` with the method's traced settings ``hp``."""
  return optimizers.optimizer(
    method, {**config["hparams"][method], **hp}, graph, key, init=config["hparams"]["cbp"]["init"]
  )


class Learner:
  """One method's per-variant init, SGD step and probe metrics (unbatched)."""

  def __init__(self, config, method, index):
    self.config, self.method, self.index = config, method, index
    self.model = make_model(config, plasticity_methods.layer_norm(method))
    self.hp = _hparams(config, method)
    self.variants = int(self.hp["step_size"].shape[0])
    x = jnp.zeros((1, NUM_PIXELS), jnp.float32)
    shapes = jax.eval_shape(lambda k: self.model.init(k, x)["params"], jax.random.key(0))
    self.graph = plasticity_methods.layer_graph(self.model, shapes, x)

  def initial_params(self, key):
    """The seed's initial parameters (the same for every method and variant)."""
    return self.model.init(jax.random.fold_in(key, 1), jnp.zeros((1, NUM_PIXELS), jnp.float32))["params"]

  def logits(self, params, x):
    return self.model.apply({"params": params}, x)

  def init(self, key, hp, variant):
    params = self.initial_params(key)
    opt_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), self.index), variant)
    if self.method == "injection":
      params = plasticity_methods.injectable(params)
    tx = _optimizer(self.config, self.method, hp, self.graph, opt_key)
    return params, tx.init(params)

  def start_task(self, state, key, task):
    """The learner at the start of ``task``: plasticity injection's injection point."""
    if self.method != "injection":
      return state
    x = jnp.zeros((1, NUM_PIXELS), jnp.float32)
    return plasticity_methods.inject(
      self.model, state, jax.random.fold_in(key, 3), x, task == self.config["hparams"]["injection"]["at_task"]
    )

  def step(self, state, hp, x, y):
    """One step on the batch ``(x, y)``; returns the new state and the number of
    examples the network classified correctly *before* the step."""
    params, opt_state = state

    def loss_fn(p):
      logits, acts = plasticity_methods.apply_with_activations(self.model, p, x)
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      return loss, (logits, acts)

    (_, (logits, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == y, dtype=jnp.int32)
    # The optimizer's key lives in its state; this key is never used.
    tx = _optimizer(self.config, self.method, hp, self.graph, jax.random.key(0))
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return (optax.apply_updates(params, updates), opt_state), correct

  def probe(self, state, probe_x):
    params, opt_state = state
    params = plasticity_methods.plain_params(params)
    _, acts = cbp_jax.apply_with_activations(self.model, params, probe_x)
    layers = hidden_layers(self.config)
    out = {"weight_magnitude": metrics_lib.weight_magnitude(params)["overall"]}
    dead = jnp.stack([metrics_lib.dead_unit_fraction(acts[n]) for n in layers])
    ranks = jnp.stack([metrics_lib.effective_rank(acts[n]) for n in layers])
    linear = jnp.stack([metrics_lib.linearised_fraction(acts[n]) for n in layers])
    out["dead_fraction"] = jnp.mean(dead)  # Equal widths: the fraction of all hidden units.
    out["effective_rank"] = jnp.mean(ranks)
    out["linearised_fraction"] = jnp.mean(linear)
    for i, n in enumerate(layers):
      out[f"dead_fraction/{n}"] = dead[i]
      out[f"effective_rank/{n}"] = ranks[i]
      out[f"linearised_fraction/{n}"] = linear[i]
    if self.method == "cbp":
      stats = cbp_jax.unit_stats(opt_state)
      out["replaced_units"] = sum(stats[n]["replaced"] for n in layers).astype(jnp.float32)
    if self.method in ("redo", "regrama", "snr"):
      out["replaced_units"] = cbp_jax.methods.replaced_total(opt_state).astype(jnp.float32)
    return out


# ---------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------


def make_chunked(config: Mapping[str, Any]):
  """Per-seed ``init(key) -> carry`` and ``chunk(carry, chunk_index, data) -> (carry, metrics)``.

  ``data`` is `load_data`'s dict. ``metrics`` is ``{label: {name:
  array(tasks_per_chunk,)}}`` with names ``accuracy`` (online accuracy of each
  task), ``dead_fraction``, ``effective_rank``, ``linearised_fraction``,
  ``weight_magnitude`` (probe set at the task's end), per-layer
  ``dead_fraction/Dense_i``, ``effective_rank/Dense_i``,
  ``linearised_fraction/Dense_i``, for CBP ``replaced_units`` (cumulative,
  all hidden layers), and unless ``probes.enabled`` is false the plasticity
  probes of `experiments.plasticity_probes` (trainability and its fresh-init
  reference, top Hessian eigenvalue, drift per layer, churn on the held-out
  inputs of `heldout_examples`).
  """
  config = runner.normalize_config(config)
  EXPERIMENT.validate_config(config)
  methods = [Learner(config, m, i) for i, m in enumerate(config["methods"])]
  labels = list(run_labels(config))
  tasks_per_chunk = config["tasks_per_chunk"]
  batch = config["batch_size"]
  steps = config["examples_per_task"] // batch
  examples = config["examples_per_task"]
  # The probes use the first examples of the probe set, at most all of them.
  probes = dict(config["probes"], size=min(config["probes"]["size"], config["probe_size"]))

  def init(key):
    learners = {}
    for m in methods:
      learners[m.method] = runner.map_leading(m.init, m.variants, (None, 0, 0))(
        key, m.hp, jnp.arange(m.variants)
      )
    carry = {"key": key, "learners": learners}
    if probes["enabled"]:  # The held-out logits of the last probe point, for the churn.
      carry["heldout"] = {
        m.method: jnp.zeros((m.variants, probes["heldout_size"], NUM_CLASSES)) for m in methods
      }
    return carry

  def plasticity(carry, learners, task, probe_x, probe_y, data):
    """``({method: probe metrics (V,)}, fresh-init trainability metrics, {method: held-out logits})``."""
    key, first = carry["key"], methods[0]
    probe_key = jax.random.fold_in(jax.random.fold_in(key, 4), task)
    init_params = first.initial_params(key)
    heldout_x = heldout_examples(config, data, key)
    labels = plasticity_probes.probe_labels(probes, probe_key, NUM_CLASSES)
    fresh = plasticity_probes.fresh_trainability(
      probes, first.logits, lambda k: first.model.init(k, probe_x[:1])["params"], probe_x, labels, probe_key
    )
    out, heldout = {}, {}
    for m in methods:
      # Task 0's churn is measured from the initial network.
      before = jnp.where(task == 0, first.logits(init_params, heldout_x)[None], carry["heldout"][m.method])

      def one(state, before, m=m):
        return plasticity_probes.learner_probes(
          probes,
          m.logits,
          plasticity_methods.plain_params(state[0]),
          init_params,
          probe_x,
          probe_y,
          labels,
          probe_key,
          before,
          heldout_x,
        )

      out[m.method], heldout[m.method] = runner.map_leading(one, m.variants, (0, 0))(
        learners[m.method], before
      )
    return out, fresh, heldout

  def one_task(carry, task, data):
    key = carry["key"]
    perm = task_permutation(key, task)
    order = task_order(key, task, data["images"].shape[0])
    start = {
      m.method: runner.map_leading(m.start_task, m.variants, (0, None, None))(
        carry["learners"][m.method], task_key(key, task), task
      )
      for m in methods
    }

    def body(learners, step):
      x, y = gather_examples(data, perm, order, step * batch + jnp.arange(batch))
      new, correct = {}, {}
      for m in methods:
        step_fn = runner.map_leading(m.step, m.variants, (0, 0, None, None))
        new[m.method], correct[m.method] = step_fn(learners[m.method], m.hp, x, y)
      return new, correct

    learners, correct = jax.lax.scan(body, start, jnp.arange(steps))
    probe_x, probe_y = gather_examples(data, perm, order, jnp.arange(config["probe_size"]))
    new_carry = {"key": key, "learners": learners}
    if probes["enabled"]:
      extra, fresh, new_carry["heldout"] = plasticity(carry, learners, task, probe_x, probe_y, data)
    out = {}
    for m in methods:
      total = jnp.sum(correct[m.method], axis=0)  # (V,) int32: exact.
      accuracy = total.astype(jnp.float32) / examples
      probed = runner.map_leading(m.probe, m.variants, (0, None))(learners[m.method], probe_x)
      if probes["enabled"]:
        probed.update(extra[m.method])
      for v in range(m.variants):
        label = labels[len(out)]
        out[label] = {"accuracy": accuracy[v], **{k: a[v] for k, a in probed.items()}}
        if probes["enabled"]:
          out[label].update(fresh)
    return new_carry, out

  return init, runner.scan_points(one_task, tasks_per_chunk)


def plot_results(results: Mapping[str, Any] | str | Path, path: str | Path) -> Path:
  """The paper-style figure: online accuracy per task, then one panel per correlate."""
  if not isinstance(results, Mapping):
    results = runner.load_results(results)
  c = results["config"]
  seeds = c.get("seeds", "?")
  return runner.plot_results(
    results,
    path,
    metrics=("accuracy", "dead_fraction", "effective_rank", "weight_magnitude")
    + plasticity_probes.plotted(results),
    title=f"online permuted MNIST (784-{'-'.join([str(c.get('width'))] * c.get('depth', 0))}-10, "
    f"{c.get('examples_per_task'):,} examples/task, batch {c.get('batch_size')}, "
    f"{seeds} seeds, {runner.BAND_LABEL})",
  )


def summary(results: Mapping[str, Any], window: int | None = None) -> dict:
  """``{label: {"first", "best", "last", "last_se"}}``: online accuracy of the first
  task, the best task, and the mean of the last ``window`` tasks (default: the
  last 10%, at least 1), means over seeds; ``last_se`` its standard error."""
  out = {}
  for label, named in results["metrics"].items():
    acc = np.asarray(named["accuracy"], np.float64)
    n = acc.shape[-1]
    w = window or max(1, n // 10)
    last = np.mean(acc[:, n - w :], axis=1)
    out[label] = {
      "first": float(np.mean(acc[:, 0])),
      "best": float(np.max(np.mean(acc, axis=0))),
      "last": float(np.mean(last)),
      "last_se": float(np.std(last, ddof=1) / math.sqrt(len(last))) if len(last) > 1 else 0.0,
    }
  return out


def format_summary(results: Mapping[str, Any], **kwargs) -> str:
  rows = summary(results, **kwargs)
  lines = [f"{'method':<12} {'first task':>10} {'best task':>10} {'last 10%':>10} {'(+- s.e.)':>10}"]
  for label, r in rows.items():
    lines.append(
      f"{label:<12} {100 * r['first']:>9.2f}% {100 * r['best']:>9.2f}% "
      f"{100 * r['last']:>9.2f}% {100 * r['last_se']:>9.2f}%"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Speed.
# ---------------------------------------------------------------------------


def benchmark(
  config: Mapping[str, Any],
  *,
  steps: int = 3000,
  repeats: int = 1,
  data: Mapping[str, jax.Array] | None = None,
) -> dict[str, dict[str, float]]:
  """Steps per second of each method of ``config``, run alone, one seed.

  Each method gets its own program (one task of ``steps`` examples, a tiny
  probe set); it is compiled, run once to warm up, then timed ``repeats``
  times (the best is reported). Besides wall-clock steps/s it reports steps
  per CPU-second of this process, which is less sensitive to other jobs on a
  shared machine (with XLA's multi-threaded CPU runtime it also counts the
  second thread's time). For one-thread timings, comparable with the
  reference's single-threaded PyTorch ones, set
  ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``.

  Returns:
    ``{method: {"steps_per_s", "steps_per_cpu_s", "seconds", "compile_seconds"}}``.
  """
  base = make_config(config)
  data = load_data(base) if data is None else data
  out = {}
  for method in base["methods"]:
    c = make_config(
      base,
      methods=[method],
      seeds=1,
      tasks=1,
      tasks_per_chunk=1,
      examples_per_task=steps * base["batch_size"],
      probe_size=8,
      hparams={method: protocol.variants(base, method)[0]},
      sweep={},
    )
    init, chunk = make_batched(c)
    carry = init(seed_keys(c))
    compiled, compile_s = runner.compile_chunk(chunk, carry, (data,))
    jax.block_until_ready(compiled(carry, jnp.asarray(0, jnp.int32), data))
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
      tic, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(carry, jnp.asarray(0, jnp.int32), data))
      best = min(best, time.perf_counter() - tic)
      best_cpu = min(best_cpu, time.process_time() - cpu)
    out[method] = {
      "steps_per_s": steps / best,
      "steps_per_cpu_s": steps / best_cpu,
      "seconds": best,
      "compile_seconds": compile_s,
    }
  return out


# ---------------------------------------------------------------------------
# The experiment: the protocol runs it (configs, CLI, chunked run, results).
# ---------------------------------------------------------------------------


def _benchmark_command(
  args: argparse.Namespace, config: Mapping[str, Any], data: Mapping[str, jax.Array]
) -> int | None:
  """``--benchmark``: steps/s of each method alone, printed; None without the flag."""
  if not args.benchmark:
    return None
  net = "-".join(["784"] + [str(config["width"])] * config["depth"] + ["10"])
  print(
    f"benchmark: {net}, batch {config['batch_size']}, {args.benchmark_steps} steps, "
    f"one seed, backend {jax.default_backend()}",
    file=sys.stderr,
  )
  for method, r in benchmark(
    config, steps=args.benchmark_steps, repeats=args.benchmark_repeats, data=data
  ).items():
    print(
      f"{method:<6} {r['steps_per_s']:8.1f} steps/s  {r['steps_per_cpu_s']:8.1f} steps/CPU-s  "
      f"({r['seconds']:.1f} s, compile {r['compile_seconds']:.1f} s)"
    )
  return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
  plasticity_probes.add_arguments(p)
  p.add_argument(
    "--benchmark",
    action="store_true",
    help="measure steps/s of each method alone (one seed, one task) and exit",
  )
  p.add_argument("--benchmark-steps", type=int, default=3000)
  p.add_argument("--benchmark-repeats", type=int, default=1)


EXPERIMENT = protocol.Experiment(
  name="permuted_mnist",
  short="pmnist",
  title="Online permuted MNIST (loss of plasticity), compiled and vmapped.",
  defaults=DEFAULT_CONFIG,
  methods=METHODS,
  make_chunked=make_chunked,
  num_chunks=num_chunks,
  points_per_chunk="tasks_per_chunk",
  x_label="task",
  work_per_run_chunk=lambda c: c["examples_per_task"] * c["tasks_per_chunk"] // c["batch_size"],
  validate=validate_config,
  summary=format_summary,
  load_data=load_data,
  plot=lambda results, out: plot_results(results, out / "pmnist.png"),
  plots=("pmnist.png",),
  label=protocol.at_step_size_label,
  run_info=optimizers.snp_shrink,
  presets={
    "paper": (
      "the paper's configuration: 10 seeds x 800 tasks x 60,000 examples, 784-2000-2000-2000-10",
      PAPER_OVERRIDES,
    ),
    "reduced": (
      "the ~10-minute configuration: 2 seeds x 40 tasks x 3,000 examples, width "
      "100, step size 0.03, CBP rate 1e-4",
      REDUCED_OVERRIDES,
    ),
  },
  flags=(
    protocol.flag("--tasks", "tasks", type=int, help="number of tasks (default 800)"),
    protocol.flag("--examples-per-task", "examples_per_task", type=int, help="default 60,000"),
    protocol.flag(
      "--tasks-per-chunk",
      "tasks_per_chunk",
      type=int,
      help="tasks per compiled chunk (progress/checkpoint granularity)",
    ),
    protocol.flag("--batch-size", "batch_size", type=int, help="examples per SGD step (default 1)"),
    protocol.flag("--width", "width", type=int, help="hidden units per layer (default 2000)"),
    protocol.flag("--depth", "depth", type=int, help="hidden layers (default 3)"),
    protocol.flag(
      "--probe-size", "probe_size", type=int, help="probe examples for the correlates (default 2000)"
    ),
    protocol.flag(
      "--seed-axis", "seed_axis", choices=SEED_AXES, help="batch seeds with vmap (default) or lax.map"
    ),
    protocol.flag("--dataset", "dataset", choices=("mnist", "fashion_mnist")),
    protocol.flag(
      "--step-size",
      "hparams.*.step_size",
      SGD_METHODS,
      type=runner.parse_floats,
      help="step size(s) of the SGD methods (all but adam), comma-separated (several: a sweep)",
    ),
    protocol.flag(
      "--adam-step-size",
      "hparams.adam.step_size",
      type=runner.parse_floats,
      help="Adam step size(s), comma-separated",
    ),
    *protocol.method_flags("--cbp-rate", "--cbp-maturity", "--l2", "--snp-weight-decay", "--snp-noise"),
    protocol.flag(
      "--injection-task",
      "hparams.injection.at_task",
      type=int,
      help="task (0-based) at whose start `injection` injects (default: the middle)",
    ),
  ),
  add_arguments=_add_arguments,
  overrides_from_args=plasticity_probes.overrides_from_args,
  command=_benchmark_command,
  describe=lambda c, _: (
    f"permuted MNIST: {c['seeds']} seeds x {c['tasks']} tasks x "
    f"{c['examples_per_task']:,} examples, width {c['width']}, runs "
    f"{', '.join(EXPERIMENT.run_labels(c))}"
  ),
)

# The module's entry points; ``make_batched(config)`` gives the jitted ``init(keys)``
# and ``chunk(carry, index, ...)`` over all seeds, cached per config.
(make_config, run_labels, make_train, make_batched, run_experiment, parse_args, config_from_args, main) = (
  EXPERIMENT.entry_points()
)


if __name__ == "__main__":
  sys.exit(main())
