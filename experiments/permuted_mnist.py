"""Online permuted MNIST (Dohare et al., Nature 2024), whole-run compiled and vmapped.

The problem (SPEC "Experiments"; reference: ``lop/permuted_mnist/online_expr.py``)
---------------------------------------------------------------------------------
* Data: the 60,000 MNIST training images (`cbp_jax.data.load_dataset`, local
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
  MLP CBP, next-layer bias correction as the paper intends). Step sizes can
  be swept per method; variants of one method are vmapped together.

All methods of one seed see the same permutations, the same example order and
the same initial weights (paired comparison). Seed ``i`` uses
``fold_in(key(config["seed"]), i)``, so adding seeds does not change the
streams of existing ones.

Program structure (purejaxrl style): `make_train` returns a pure per-seed
``train(key)`` (the data set closed over); `make_chunked` returns per-seed
``init(key)`` and ``chunk(carry, chunk_index, data)`` (a ``lax.scan`` over
the chunk's tasks, each a ``lax.scan`` over its steps with every method in
one scan body); `run_experiment` vmaps them over seeds and drives them with
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
import functools
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
from experiments.data import load_dataset
from cbp_jax.methods import shrink_and_perturb
from experiments import plasticity_methods
from experiments import plasticity_probes
from experiments import runner

EXPERIMENT = "permuted_mnist"
METHODS = ("bp", "adam", "l2", "snp", "cbp") + plasticity_methods.NAMES
# SGD-based methods: --step-size sets theirs.
SGD_METHODS = ("bp", "l2", "snp", "cbp") + plasticity_methods.NAMES
SEED_AXES = ("vmap", "map")
NUM_PIXELS = 784
NUM_CLASSES = 10
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
    # Methods: run labels are the method names, or "bp@0.003" when a method
    # has several step sizes.
    "methods": ["bp", "adam", "l2", "snp", "cbp"],
    "step_sizes": {"bp": [0.003], "adam": [1e-4], "l2": [0.003], "snp": [0.003],
                   "cbp": [0.003], **{m: [0.003] for m in plasticity_methods.NAMES}},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "l2": {"weight_decay": 1e-4},
    "snp": {"weight_decay": 1e-4, "noise_scale": 1e-5},
    "cbp": {
        "replacement_rate": 1e-6,
        "maturity_threshold": 100,
        "decay_rate": 0.99,
        "utility": "adaptable_contribution",
        "init": "kaiming",
        "accumulate": True,
        "next_bias_correction": True,
    },
    # The newer methods (`experiments.plasticity_methods`; not in the paper),
    # selectable by name; "injection" injects the output layer at the start
    # of task ``at_task`` (0-based; the middle of the run by default).
    **plasticity_methods.DEFAULTS,
    "injection": {"at_task": 400},
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
    "step_sizes": {"bp": [0.03], "adam": [1e-3], "l2": [0.03], "snp": [0.03], "cbp": [0.03],
                   **{m: [0.03] for m in plasticity_methods.NAMES}},
    "cbp": {"replacement_rate": 1e-4},
    "injection": {"at_task": 20},
}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def make_config(overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
  """`DEFAULT_CONFIG` updated with ``overrides`` and ``kwargs`` (nested dicts merge), validated."""
  return runner.build_config(DEFAULT_CONFIG, overrides, kwargs, validate=validate_config)


def validate_config(c: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first inconsistent entry."""
  need = runner.require
  runner.require_positive_ints(c, (
      "seeds", "tasks", "examples_per_task", "tasks_per_chunk", "batch_size", "width", "depth",
      "probe_size"))
  need(isinstance(c["seed"], int), f"seed must be an int, got {c['seed']!r}")
  need(c["tasks"] % c["tasks_per_chunk"] == 0,
       f"tasks ({c['tasks']}) must be a multiple of tasks_per_chunk ({c['tasks_per_chunk']})")
  need(c["examples_per_task"] % c["batch_size"] == 0,
       f"examples_per_task ({c['examples_per_task']}) must be a multiple of batch_size "
       f"({c['batch_size']})")
  need(c["dataset"] in ("mnist", "fashion_mnist"),
       f"dataset must be 'mnist' or 'fashion_mnist', got {c['dataset']!r}")
  need(c["seed_axis"] in SEED_AXES, f"seed_axis must be one of {SEED_AXES}, got {c['seed_axis']!r}")
  runner.require_methods(c["methods"], METHODS)
  for m in c["methods"]:
    sizes = c["step_sizes"].get(m)
    need(isinstance(sizes, (list, tuple)) and len(sizes) > 0 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in sizes),
         f"step_sizes[{m!r}] must be a non-empty list of numbers >= 0, got {sizes!r}")
  need(0 <= c["cbp"]["replacement_rate"] <= 1, "cbp.replacement_rate must be in [0, 1]")
  need(c["l2"]["weight_decay"] >= 0, "l2.weight_decay must be >= 0")
  need(c["snp"]["weight_decay"] >= 0 and c["snp"]["noise_scale"] >= 0,
       "snp.weight_decay and snp.noise_scale must be >= 0")
  at = c["injection"]["at_task"]
  need(isinstance(at, int) and not isinstance(at, bool) and at >= 0,
       f"injection.at_task must be an int >= 0, got {at!r}")
  plasticity_probes.validate(c["probes"])
  if "snp" in c["methods"]:
    for lr in c["step_sizes"]["snp"]:
      need(0 < 1 - lr * c["snp"]["weight_decay"] <= 1,
           "snp: step_size * weight_decay must be in [0, 1)")


def run_labels(config: Mapping[str, Any]) -> dict[str, dict]:
  """``{label: {"method", "step_size", ...hyperparameters}}`` in config order."""
  out = {}
  for m in config["methods"]:
    sizes = config["step_sizes"][m]
    for lr in sizes:
      label = m if len(sizes) == 1 else f"{m}@{lr:g}"
      info = {"method": m, "step_size": lr}
      if m in ("adam", "l2", "snp", "cbp") + plasticity_methods.NAMES:
        info.update(config[m])
      if m == "snp":
        info["shrink"] = 1.0 - lr * config["snp"]["weight_decay"]
      out[label] = info
  return out


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

  Reads the local IDX files (`cbp_jax.data.load_dataset`, ``source="local"``):
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


def gather_examples(data: Mapping[str, jax.Array], perm: jax.Array, order: jax.Array,
                    positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Examples at ``positions`` (int, any shape ``S``) of a task.

  Returns:
    ``(x, y)``: float32 ``S + (784,)`` pixels in ``[0, 1]`` permuted by
    ``perm``, and int32 ``S`` labels.
  """
  n = data["images"].shape[0]
  idx = order[positions % n]
  x = data["images"][idx[..., None], perm]
  return x.astype(jnp.float32) * PIXEL_SCALE, data["labels"][idx]


def heldout_examples(config: Mapping[str, Any], data: Mapping[str, jax.Array],
                     key: jax.Array) -> jax.Array:
  """The held-out inputs of the churn probe: ``probes.heldout_size`` images under
  a permutation of their own, one no task uses, fixed for the whole run."""
  held = jax.random.fold_in(key, 3)
  perm = jax.random.permutation(jax.random.fold_in(held, 0), NUM_PIXELS)
  order = jax.random.permutation(jax.random.fold_in(held, 1), data["images"].shape[0])
  return gather_examples(data, perm, order, jnp.arange(config["probes"]["heldout_size"]))[0]


def task_examples(config: Mapping[str, Any], data: Mapping[str, jax.Array], key: jax.Array,
                  task: int | jax.Array, positions: jax.Array | None = None):
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
  return cbp_jax.models.MLP(hidden=(config["width"],) * config["depth"], outputs=NUM_CLASSES,
                            layer_norm=layer_norm)


def _hparams(config, method) -> dict[str, jax.Array]:
  """Per-variant hyperparameters of ``method`` as float32 arrays ``(V,)``."""
  lrs = np.asarray(config["step_sizes"][method], np.float32)
  hp = {"step_size": lrs}
  if method == "l2":
    hp["weight_decay"] = np.full_like(lrs, config["l2"]["weight_decay"])
  if method == "snp":
    hp["shrink"] = (1.0 - lrs.astype(np.float64) * config["snp"]["weight_decay"]).astype(np.float32)
    hp["noise_scale"] = np.full_like(lrs, config["snp"]["noise_scale"])
  if method in plasticity_methods.NAMES:
    hp.update({k: np.full_like(lrs, v) for k, v in config[method].items() if k != "at_task"})
  return {k: jnp.asarray(v) for k, v in hp.items()}


def _optimizer(config, method, hp, graph, key):
  if method == "adam":
    a = config["adam"]
    return optax.with_extra_args_support(
        optax.adam(hp["step_size"], b1=a["b1"], b2=a["b2"], eps=a["eps"]))
  if method in plasticity_methods.NAMES:
    return plasticity_methods.optimizer(method, hp, graph, key, init=config["cbp"]["init"])
  sgd = optax.sgd(hp["step_size"])
  if method == "bp":
    return optax.with_extra_args_support(sgd)
  if method == "l2":
    return optax.with_extra_args_support(
        optax.chain(optax.add_decayed_weights(hp["weight_decay"]), sgd))
  if method == "snp":
    return optax.with_extra_args_support(
        optax.chain(sgd, shrink_and_perturb(hp["shrink"], hp["noise_scale"], key=key)))
  c = config["cbp"]
  return optax.chain(sgd, cbp_jax.cbp(
      graph, key=key, replacement_rate=c["replacement_rate"],
      maturity_threshold=c["maturity_threshold"], decay_rate=c["decay_rate"],
      utility=c["utility"], init=c["init"], accumulate=c["accumulate"],
      next_bias_correction=c["next_bias_correction"]))


class _Method:
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
    opt_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), self.index),
                                 variant)
    if self.method == "injection":
      params = plasticity_methods.injectable(params)
    tx = _optimizer(self.config, self.method, hp, self.graph, opt_key)
    return params, tx.init(params)

  def start_task(self, state, key, task):
    """The learner at the start of ``task``: plasticity injection's injection point."""
    if self.method != "injection":
      return state
    x = jnp.zeros((1, NUM_PIXELS), jnp.float32)
    return plasticity_methods.inject(self.model, state, jax.random.fold_in(key, 3), x,
                                     task == self.config["injection"]["at_task"])

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
  validate_config(config)
  methods = [_Method(config, m, i) for i, m in enumerate(config["methods"])]
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
          key, m.hp, jnp.arange(m.variants))
    carry = {"key": key, "learners": learners}
    if probes["enabled"]:  # The held-out logits of the last probe point, for the churn.
      carry["heldout"] = {m.method: jnp.zeros((m.variants, probes["heldout_size"], NUM_CLASSES))
                          for m in methods}
    return carry

  def plasticity(carry, learners, task, probe_x, probe_y, data):
    """``({method: probe metrics (V,)}, fresh-init trainability metrics, {method: held-out logits})``."""
    key, first = carry["key"], methods[0]
    probe_key = jax.random.fold_in(jax.random.fold_in(key, 4), task)
    init_params = first.initial_params(key)
    heldout_x = heldout_examples(config, data, key)
    labels = plasticity_probes.probe_labels(probes, probe_key, NUM_CLASSES)
    fresh = plasticity_probes.fresh_trainability(
        probes, first.logits, lambda k: first.model.init(k, probe_x[:1])["params"], probe_x, labels,
        probe_key)
    out, heldout = {}, {}
    for m in methods:
      # Task 0's churn is measured from the initial network.
      before = jnp.where(task == 0, first.logits(init_params, heldout_x)[None],
                         carry["heldout"][m.method])

      def one(state, before, m=m):
        return plasticity_probes.learner_probes(
            probes, m.logits, plasticity_methods.plain_params(state[0]), init_params, probe_x,
            probe_y, labels, probe_key, before,
            heldout_x)

      out[m.method], heldout[m.method] = runner.map_leading(one, m.variants, (0, 0))(
          learners[m.method], before)
    return out, fresh, heldout

  def one_task(carry, task, data):
    key = carry["key"]
    perm = task_permutation(key, task)
    order = task_order(key, task, data["images"].shape[0])
    start = {m.method: runner.map_leading(m.start_task, m.variants, (0, None, None))(
        carry["learners"][m.method], task_key(key, task), task) for m in methods}

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


def make_train(config: Mapping[str, Any], data: Mapping[str, jax.Array] | None = None):
  """A pure ``train(key) -> {label: {name: array(tasks,)}}`` for one seed.

  purejaxrl style: ``jax.jit(jax.vmap(make_train(config)))(seed_keys(config))``
  runs every seed of the whole experiment as one program. ``data`` (default:
  `load_data`) is closed over, so it becomes a constant of that program
  (a slower compile); `run_experiment` passes it as an argument instead.
  """
  config = make_config(config)
  data = load_data(config) if data is None else data
  return runner.whole_run(*make_chunked(config), num_chunks(config), data)


# Jitted ``init(keys)`` and ``chunk(carry, index, data)`` over all seeds (vmap, or
# lax.map with ``seed_axis="map"``; a single seed unbatched, see
# `experiments.runner.map_leading`), cached per config; metrics ``(seeds, tasks)``.
make_batched = runner.batched_per_config(make_chunked, make_config=make_config, num_args=1)


def run_experiment(config: Mapping[str, Any], *, data: Mapping[str, jax.Array] | None = None,
                   data_dir: str | Path | None = None, out_dir: str | Path | None = None,
                   plot: bool = True, progress: bool = True,
                   **run_kwargs: Any) -> runner.RunResult:
  """Runs the experiment with `experiments.runner.run`.

  Writes ``out_dir/results.json`` (runner schema; ``x`` = task number, one
  point per task), ``out_dir/timing.json`` and ``out_dir/pmnist.png``.
  ``run_kwargs`` (``checkpoint_dir``, ``checkpoint_every``, ``resume``,
  ``on_chunk``) go to `experiments.runner.run`.
  """
  config = make_config(config)
  data = load_data(config, data_dir) if data is None else data
  result = runner.run_seeds(
      make_batched, config, args=(data,), experiment=EXPERIMENT, name="pmnist",
      num_chunks=num_chunks(config), points_per_chunk=config["tasks_per_chunk"], x_step=1.0,
      x_label="task", runs=run_labels(config),
      work_per_run_chunk=config["examples_per_task"] * config["tasks_per_chunk"]
      // config["batch_size"], progress=progress, out_dir=out_dir, **run_kwargs)
  if plot and out_dir is not None:
    plot_results(result.results, Path(out_dir) / "pmnist.png")
  return result


def plot_results(results: Mapping[str, Any] | str | Path, path: str | Path) -> Path:
  """The paper-style figure: online accuracy per task, then one panel per correlate."""
  if not isinstance(results, Mapping):
    results = runner.load_results(results)
  c = results["config"]
  seeds = c.get("seeds", "?")
  return runner.plot_results(
      results, path, metrics=("accuracy", "dead_fraction", "effective_rank", "weight_magnitude")
      + plasticity_probes.plotted(results),
      title=f"online permuted MNIST (784-{'-'.join([str(c.get('width'))] * c.get('depth', 0))}-10, "
            f"{c.get('examples_per_task'):,} examples/task, batch {c.get('batch_size')}, "
            f"{seeds} seeds, {runner.BAND_LABEL})")


def summary(results: Mapping[str, Any], window: int | None = None) -> dict:
  """``{label: {"first", "best", "last", "last_se"}}``: online accuracy of the first
  task, the best task, and the mean of the last ``window`` tasks (default: the
  last 10%, at least 1), means over seeds; ``last_se`` its standard error."""
  out = {}
  for label, named in results["metrics"].items():
    acc = np.asarray(named["accuracy"], np.float64)
    n = acc.shape[-1]
    w = window or max(1, n // 10)
    last = np.mean(acc[:, n - w:], axis=1)
    out[label] = {"first": float(np.mean(acc[:, 0])),
                  "best": float(np.max(np.mean(acc, axis=0))),
                  "last": float(np.mean(last)),
                  "last_se": float(np.std(last, ddof=1) / math.sqrt(len(last)))
                  if len(last) > 1 else 0.0}
  return out


def format_summary(results: Mapping[str, Any], **kwargs) -> str:
  rows = summary(results, **kwargs)
  lines = [f"{'method':<12} {'first task':>10} {'best task':>10} {'last 10%':>10} {'(+- s.e.)':>10}"]
  for label, r in rows.items():
    lines.append(f"{label:<12} {100 * r['first']:>9.2f}% {100 * r['best']:>9.2f}% "
                 f"{100 * r['last']:>9.2f}% {100 * r['last_se']:>9.2f}%")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Speed.
# ---------------------------------------------------------------------------


def benchmark(config: Mapping[str, Any], *, steps: int = 3000, repeats: int = 1,
              data: Mapping[str, jax.Array] | None = None) -> dict[str, dict[str, float]]:
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
    c = make_config(base, methods=[method], seeds=1, tasks=1, tasks_per_chunk=1,
                    examples_per_task=steps * base["batch_size"], probe_size=8,
                    step_sizes={method: base["step_sizes"][method][:1]})
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
    out[method] = {"steps_per_s": steps / best, "steps_per_cpu_s": steps / best_cpu,
                   "seconds": best, "compile_seconds": compile_s}
  return out


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m experiments.permuted_mnist",
      description="Online permuted MNIST (loss of plasticity), compiled and vmapped.")
  runner.add_presets(
      p, paper="the paper's configuration: 10 seeds x 800 tasks x 60,000 examples, "
               "784-2000-2000-2000-10",
      reduced="the ~10-minute configuration: 2 seeds x 40 tasks x 3,000 examples, width 100, "
              "step size 0.03, CBP rate 1e-4")
  p.add_argument("--seeds", type=int)
  p.add_argument("--seed", type=int, help="base seed (default 0)")
  p.add_argument("--tasks", type=int, help="number of tasks (default 800)")
  p.add_argument("--examples-per-task", type=int, help="default 60,000")
  p.add_argument("--tasks-per-chunk", type=int,
                 help="tasks per compiled chunk (progress/checkpoint granularity)")
  p.add_argument("--batch-size", type=int, help="examples per SGD step (default 1)")
  p.add_argument("--width", type=int, help="hidden units per layer (default 2000)")
  p.add_argument("--depth", type=int, help="hidden layers (default 3)")
  p.add_argument("--probe-size", type=int, help="probe examples for the correlates (default 2000)")
  p.add_argument("--seed-axis", choices=SEED_AXES, help="batch seeds with vmap (default) or lax.map")
  p.add_argument("--dataset", choices=("mnist", "fashion_mnist"))
  p.add_argument("--data-dir", help="root holding mnist/ (default $CBP_JAX_DATA_DIR or ../shared/data)")
  p.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)}")
  p.add_argument("--step-size", type=runner.parse_floats,
                 help="step size(s) of the SGD methods (all but adam), comma-separated")
  p.add_argument("--adam-step-size", type=runner.parse_floats, help="Adam step size(s), comma-separated")
  p.add_argument("--cbp-rate", type=float, help="CBP replacement rate (default 1e-6)")
  p.add_argument("--cbp-maturity", type=int, help="CBP maturity threshold (default 100)")
  p.add_argument("--l2", type=float, help="L2 weight decay (default 1e-4)")
  p.add_argument("--snp-weight-decay", type=float, help="S&P weight decay: shrink = 1 - lr * wd")
  p.add_argument("--snp-noise", type=float, help="S&P noise standard deviation (default 1e-5)")
  p.add_argument("--injection-task", type=int,
                 help="task (0-based) at whose start `injection` injects (default: the middle)")
  plasticity_probes.add_arguments(p)
  runner.add_run_arguments(p, out="results/pmnist")
  p.add_argument("--benchmark", action="store_true",
                 help="measure steps/s of each method alone (one seed, one task) and exit")
  p.add_argument("--benchmark-steps", type=int, default=3000)
  p.add_argument("--benchmark-repeats", type=int, default=1)
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> dict:
  over = runner.preset_overrides(args, DEFAULT_CONFIG, paper=PAPER_OVERRIDES,
                                 reduced=REDUCED_OVERRIDES)
  over.update(runner.overrides_from_args(
      args, ("seeds", "seed", "tasks", "examples_per_task", "tasks_per_chunk", "batch_size",
             "width", "depth", "probe_size", "seed_axis", "dataset")))
  sizes = dict(over.get("step_sizes", DEFAULT_CONFIG["step_sizes"]))
  if args.step_size:
    sizes.update({m: list(args.step_size) for m in SGD_METHODS})
  if args.adam_step_size:
    sizes["adam"] = list(args.adam_step_size)
  over["step_sizes"] = sizes
  cbp = dict(over.get("cbp", {}))
  if args.cbp_rate is not None:
    cbp["replacement_rate"] = args.cbp_rate
  if args.cbp_maturity is not None:
    cbp["maturity_threshold"] = args.cbp_maturity
  if cbp:
    over["cbp"] = cbp
  if args.l2 is not None:
    over["l2"] = {"weight_decay": args.l2}
  snp = {}
  if args.snp_weight_decay is not None:
    snp["weight_decay"] = args.snp_weight_decay
  if args.snp_noise is not None:
    snp["noise_scale"] = args.snp_noise
  if snp:
    over["snp"] = snp
  if args.injection_task is not None:
    over["injection"] = {"at_task": args.injection_task}
  over.update(plasticity_probes.overrides_from_args(args))
  return make_config(over)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config = config_from_args(args)
    data = load_data(config, args.data_dir)
  except (FileNotFoundError, ValueError) as e:
    return runner.cli_error(e)
  if args.benchmark:
    net = "-".join(["784"] + [str(config["width"])] * config["depth"] + ["10"])
    print(f"benchmark: {net}, batch {config['batch_size']}, {args.benchmark_steps} steps, "
          f"one seed, backend {jax.default_backend()}", file=sys.stderr)
    for method, r in benchmark(config, steps=args.benchmark_steps,
                                   repeats=args.benchmark_repeats, data=data).items():
      print(f"{method:<6} {r['steps_per_s']:8.1f} steps/s  {r['steps_per_cpu_s']:8.1f} steps/CPU-s  "
            f"({r['seconds']:.1f} s, compile {r['compile_seconds']:.1f} s)")
    return 0
  out = Path(args.out)
  print(f"permuted MNIST: {config['seeds']} seeds x {config['tasks']} tasks x "
        f"{config['examples_per_task']:,} examples, width {config['width']}, runs "
        f"{', '.join(run_labels(config))}; results -> {out}/results.json", file=sys.stderr)
  return runner.run_from_cli(args, functools.partial(run_experiment, config, data=data),
                             summary=format_summary, plots=("pmnist.png",))


if __name__ == "__main__":
  sys.exit(main())
