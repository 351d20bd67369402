"""Continual ImageNet-32 (Dohare et al., Nature 2024), whole-run compiled and vmapped.

The problem (SPEC "Experiments"; reference: ``lop/imagenet/online_batch_expr.py``)
---------------------------------------------------------------------------------
* Data: ``images[c]`` holds ``train_per_class + test_per_class`` (600 + 100)
  32x32x3 ``uint8`` images of every class ``c``, the first 600 for training and
  the next 100 for testing, as the reference's per-class files. Sources:
  ``imagenet_resized/32x32`` through `experiments.data.load_dataset` (tfds
  array_record, no TensorFlow; the first 700 training images of each class),
  a cached class array (``--class-array``, written on first use), or, offline,
  MNIST/Fashion-MNIST from ``../shared/data`` (the first 700 training images
  of each class, zero-padded from 28x28 to 32x32 and repeated to 3 channels:
  `to_32x32x3`). The class array sits on the device once, as ``uint8``, and
  is passed to the compiled program as an argument; pixels are scaled to
  ``[0, 1]`` inside (no mean subtraction).
* Tasks: task ``t`` is a binary problem between classes ``(a, b) = perm_k[2i],
  perm_k[2i + 1]`` with ``k = t // (C // 2)``, ``i = t % (C // 2)`` and
  ``perm_k`` the ``k``-th random permutation of the ``C`` classes of the seed
  (the reference walks one permutation of the 1000 classes, 500 tasks, then
  repeats it; here every pass draws a new one, so a 10-class stand-in sees all
  45 pairs). Class ``a`` has label 0, ``b`` label 1. A task trains
  ``epochs_per_task`` epochs (the paper: 250) over its 1,200 training images,
  reshuffled every epoch, in mini-batches of ``batch_size`` (100).
* Learner: `cbp_jax.models.ConvNet` (3 conv + 3 dense, the paper's net, hidden
  kernels from the ``"default"`` distribution), softmax cross-entropy, SGD with
  momentum 0.9. The output layer ``Dense_2`` is reset at the start of every
  task (`cbp_jax.methods.reset_layers`; ``head_reset="zero"`` sets it to 0 as
  the reference does, ``"init"`` redraws it) and its momentum restarts
  (`cbp_jax.methods.reset_optimizer_for`; the reference keeps it).
* Measured per task: ``accuracy``, the test accuracy on the task's 200 test
  images after its last epoch (the paper's figure); ``train_accuracy``, the
  online accuracy of the last epoch; on the test images, ``dead_fraction``
  (hidden units, conv channels included, never active), ``effective_rank`` of
  ``Dense_1``'s features, ``weight_magnitude`` (mean |w|) and for CBP
  ``replaced_units`` (cumulative, all layers).
* Methods (the reference's configs ``lop/imagenet/cfg``): ``bp`` (step 0.01),
  ``l2`` (step 0.03, weight decay 3e-6 added to the gradient before momentum,
  PyTorch's ``SGD(weight_decay=)``), ``snp`` (step 0.01, weight decay 1e-5 and
  Gaussian noise of std 1e-5 on every parameter after every step:
  ``shrink_and_perturb(1, 1e-5)`` last in the chain), ``cbp`` (step 0.01;
  `cbp_jax.cbp` over the conv -> flatten -> dense graph inferred by
  `cbp_jax.graph_from_params`: replacement rate 3e-4, maturity 100, decay 0.99,
  ``adaptable_contribution``, ``"default"`` init, the conv references' count
  ``count_basis="layer"`` accumulated, the paper's next-layer bias
  correction). CBP wraps the optimizer (``optimizer=``), so the momentum of
  replaced weights restarts too (the reference keeps it;
  ``hparams.cbp.reset_optimizer = False`` puts cbp last in the chain
  instead). Every method's hyperparameters, its step size and momentum
  (0.9) included, are ``config["hparams"][method]``; the optimizers are
  `experiments.optimizers`' (S&P's weight decay enters the gradient,
  ``snp_decay="gradient"``).

All methods of one seed see the same tasks, image orders and initial weights.
Seed ``i`` uses ``fold_in(key(config["seed"]), i)``.

Compute on CPU: XLA runs convolution gradients inside loops about ten times
slower than outside (https://github.com/jax-ml/jax/issues/12868), so with
``conv="auto"`` on CPU every ``nn.Conv`` of the ConvNet runs as patches @
kernel (`cbp_jax.models.ConvNet`'s ``conv`` field), equal up to float rounding.

Program structure (purejaxrl style): `make_train` returns a pure per-seed
``train(key)`` (the data closed over); `make_chunked` returns per-seed
``init(key)`` and ``chunk(carry, chunk_index, data)`` (a ``lax.scan`` over the
chunk's tasks, each a scan over epochs and mini-batches with every method in
one body); `EXPERIMENT` declares them to `experiments.protocol`, whose
`run_experiment` vmaps them over seeds and drives them with
`experiments.runner.run` (progress, results file, plot, orbax checkpoints at
task boundaries, ``--resume``).

Usage::

  # The paper's setting (needs imagenet_resized/32x32 prepared for tfds, and a GPU):
  python -m experiments.continual_imagenet --paper --data-dir ~/tensorflow_datasets \\
      --class-array ~/imagenet32_classes.npy --out results/cimagenet_paper
  # Offline stand-in, reduced (MNIST pairs, 2 seeds x 24 tasks of 100 steps;
  # about 25 minutes on one CPU core), where BP loses plasticity and CBP holds:
  python -m experiments.continual_imagenet --dataset mnist --reduced --out results/cimagenet_mnist
"""

from __future__ import annotations

import argparse
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
from cbp_jax.methods import reset_layers, reset_optimizer_for
from experiments import optimizers, plasticity_probes, protocol, runner
from experiments.data import load_dataset

METHODS = ("bp", "l2", "snp", "cbp")
DATASETS = ("imagenet_resized/32x32", "fashion_mnist", "mnist")
HEAD_RESETS = ("zero", "init")
SEED_AXES = ("vmap", "map")
IMAGE_SHAPE = (32, 32, 3)
HEAD = "Dense_2"
HIDDEN = ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1")
PIXEL_SCALE = np.float32(1.0 / 255.0)
# Key streams of a seed.
_CLASSES, _INIT, _OPT, _ORDER, _HEAD, _PROBE = range(6)

DEFAULT_CONFIG: dict[str, Any] = {
  "seed": 0,
  "seeds": 1,
  "dataset": "imagenet_resized/32x32",
  "tasks": 5000,
  "epochs_per_task": 250,
  "batch_size": 100,
  "train_per_class": 600,
  "test_per_class": 100,
  "tasks_per_chunk": 1,
  "head_reset": "zero",
  "conv": "auto",
  "seed_axis": "vmap",
  "methods": ["bp", "l2", "snp", "cbp"],
  # Every method's settings are constants of the compiled program: no sweeps.
  "hparams": {
    "bp": {"step_size": 0.01, "momentum": 0.9},
    "l2": {"step_size": 0.03, "momentum": 0.9, "weight_decay": 3e-6},
    "snp": {"step_size": 0.01, "momentum": 0.9, "weight_decay": 1e-5, "noise_scale": 1e-5},
    "cbp": {
      "step_size": 0.01,
      "momentum": 0.9,
      "replacement_rate": 3e-4,
      "maturity_threshold": 100,
      "decay_rate": 0.99,
      "utility": "adaptable_contribution",
      "init": "default",
      "count_basis": "layer",
      "accumulate": True,
      "next_bias_correction": True,
      "reset_optimizer": True,
    },
  },
  "sweep": {},
  # Plasticity probes at each task's end (`experiments.plasticity_probes`), on
  # the task's test images (at most all of them).
  "probes": dict(plasticity_probes.DEFAULT_PROBES),
}

# The paper: 30 runs x 5,000 tasks x 250 epochs (BP's figure stops at 2,000 tasks).
PAPER_OVERRIDES: dict[str, Any] = {"seeds": 30, "tasks": 5000, "epochs_per_task": 250}

# The offline stand-in, sized to show loss of plasticity within about 25
# minutes on one CPU core (2 seeds; about 12 minutes a seed). MNIST pairs
# rather than Fashion-MNIST: every pair is learnable to ~99%, so a drop is
# not hidden by the spread of pair difficulty (Fashion-MNIST's shirt/T-shirt
# pairs sit near 83%). 200 training images per class (4 steps an epoch) and
# 25 epochs a task: 100 steps on the same 400 images, over-training each
# task as the paper's 250 epochs do, for the same cost per step. 24 tasks
# (2,400 steps). Every method steps at 0.06, 6x the paper's BP step size:
# loss of plasticity comes sooner with larger steps, and at this length it
# needs them (at 0.05, 20 Fashion-MNIST tasks of 100 steps showed no BP
# decline; at 0.07, MNIST, BP fell to chance by task 7 and CBP at rate 1e-3
# by task 12). CBP replaces 3e-3 of a layer per step once mature (30% of
# each layer per task; the paper's 3e-4 x 3,000 steps is 90%), maturity 20
# steps. L2 and S&P: the paper's strengths scaled to the same effect per
# task (L2 wd 4.5e-5, S&P wd 5e-5 and noise 5.5e-5) did not stop the weight
# growth here and both fell to chance before BP, so they shrink by
# lr * wd = 1.2e-4 a step (1.2% a task), with S&P's noise 1e-4 a step.
# 0.06 is near BP's stability edge: in the measured run (README) seed 0's
# BP held 99% for 15 tasks while its dead units rose, then fell to chance;
# seed 1's BP diverged in its first task. CBP ended at ~99% in both.
REDUCED_OVERRIDES: dict[str, Any] = {
  "dataset": "mnist",
  "seeds": 2,
  "tasks": 24,
  "epochs_per_task": 25,
  "train_per_class": 200,
  "tasks_per_chunk": 4,
  "hparams": {
    "bp": {"step_size": 0.06},
    "l2": {"step_size": 0.06, "weight_decay": 2e-3},
    "snp": {"step_size": 0.06, "weight_decay": 2e-3, "noise_scale": 1e-4},
    "cbp": {"step_size": 0.06, "replacement_rate": 3e-3, "maturity_threshold": 20},
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
    c, ("tasks", "epochs_per_task", "batch_size", "train_per_class", "test_per_class", "tasks_per_chunk")
  )
  need(c["dataset"] in DATASETS, f"dataset must be one of {DATASETS}, got {c['dataset']!r}")
  need(
    c["tasks"] % c["tasks_per_chunk"] == 0,
    f"tasks ({c['tasks']}) must be a multiple of tasks_per_chunk ({c['tasks_per_chunk']})",
  )
  need(
    (2 * c["train_per_class"]) % c["batch_size"] == 0,
    f"2 * train_per_class ({2 * c['train_per_class']}) must be a multiple of batch_size ({c['batch_size']})",
  )
  need(c["head_reset"] in HEAD_RESETS, f"head_reset must be one of {HEAD_RESETS}")
  need(c["conv"] in cbp_jax.models.CONV_IMPLS, f"conv must be one of {cbp_jax.models.CONV_IMPLS}")
  need(c["seed_axis"] in SEED_AXES, f"seed_axis must be one of {SEED_AXES}")
  need(
    not c["sweep"],
    "continual ImageNet has no sweeps (every setting is a constant of the "
    f"compiled program; run one config per value), got sweep {c['sweep']}",
  )
  hp = c["hparams"]
  for m in c["methods"]:
    need(hp[m]["step_size"] > 0, f"hparams.{m}.step_size must be > 0, got {hp[m]['step_size']!r}")
    need(0 <= hp[m]["momentum"] < 1, f"hparams.{m}.momentum must be in [0, 1)")
  need(hp["l2"]["weight_decay"] >= 0, "hparams.l2.weight_decay must be >= 0")
  need(
    hp["snp"]["weight_decay"] >= 0 and hp["snp"]["noise_scale"] >= 0,
    "hparams.snp.weight_decay and hparams.snp.noise_scale must be >= 0",
  )
  cb = hp["cbp"]
  need(0 <= cb["replacement_rate"] <= 1, "hparams.cbp.replacement_rate must be in [0, 1]")
  need(0 <= cb["decay_rate"] < 1, "hparams.cbp.decay_rate must be in [0, 1)")
  need(cb["maturity_threshold"] >= 0, "hparams.cbp.maturity_threshold must be >= 0")
  plasticity_probes.validate(c["probes"])


def num_chunks(config: Mapping[str, Any]) -> int:
  return config["tasks"] // config["tasks_per_chunk"]


def steps_per_epoch(config: Mapping[str, Any]) -> int:
  return 2 * config["train_per_class"] // config["batch_size"]


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def to_32x32x3(images: np.ndarray) -> np.ndarray:
  """``uint8 (N, H, W, C)`` images as ``(N, 32, 32, 3)``.

  Smaller images are zero-padded, centred (28x28 MNIST gets 2 pixels on each
  side); one channel is repeated to three. Larger images are refused (no
  resizing is done).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images (N, H, W, 1 or 3), got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype}")
  n, h, w, _ = images.shape
  if h > 32 or w > 32:
    raise ValueError(f"images of {h}x{w} are larger than 32x32; resizing is not supported")
  top, left = (32 - h) // 2, (32 - w) // 2
  out = np.zeros((n, 32, 32, images.shape[-1]), np.uint8)
  out[:, top : top + h, left : left + w] = images
  if out.shape[-1] == 1:
    out = np.repeat(out, 3, axis=-1)
  return out


def class_array(
  images: np.ndarray, labels: np.ndarray, per_class: int, num_classes: int | None = None
) -> np.ndarray:
  """The first ``per_class`` images of every class, in data-set order, as ``(C, per_class, 32, 32, 3)``.

  Raises:
    ValueError: naming a class with fewer than ``per_class`` images.
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  out = np.empty((num_classes, per_class) + IMAGE_SHAPE, np.uint8)
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)[:per_class]
    if idx.size < per_class:
      raise ValueError(f"class {c} has {idx.size} images, {per_class} are needed")
    out[c] = to_32x32x3(images[idx])
  return out


def load_class_array(
  config: Mapping[str, Any], data_dir: str | Path | None = None, cache: str | Path | None = None
) -> np.ndarray:
  """The class array of ``config["dataset"]`` (host ``uint8``, ``(C, 700, 32, 32, 3)``).

  ``cache``: a ``.npy`` file holding a class array. Read if it exists (it must
  hold at least ``train_per_class + test_per_class`` images per class), else
  written after building it from the data set (worth it for ImageNet-32,
  whose 1.28M PNG images take long to decode). Nothing is ever downloaded:
  MNIST/Fashion-MNIST are read from the local IDX files, ImageNet-32 from a
  prepared tfds data_dir (`experiments.data.load_dataset`).
  """
  per_class = config["train_per_class"] + config["test_per_class"]
  if cache is not None and Path(cache).exists():
    arr = np.load(cache, mmap_mode="r")
    if arr.ndim != 5 or arr.shape[2:] != IMAGE_SHAPE or arr.dtype != np.uint8 or arr.shape[1] < per_class:
      raise ValueError(
        f"{cache}: expected a uint8 class array (C, >={per_class}, 32, 32, 3), got {arr.dtype} {arr.shape}"
      )
    return np.ascontiguousarray(arr[:, :per_class])
  source = "tfds" if config["dataset"].startswith("imagenet") else "local"
  ds = load_dataset(config["dataset"], "train", source=source, data_dir=data_dir)
  arr = class_array(ds.images, ds.labels, per_class, ds.num_classes)
  if cache is not None:
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, arr)
  return arr


def load_data(
  config: Mapping[str, Any], data_dir: str | Path | None = None, cache: str | Path | None = None
) -> dict[str, jax.Array]:
  """``{"images": uint8 (C, train_per_class + test_per_class, 32, 32, 3)}`` on the device."""
  return {"images": jax.device_put(load_class_array(config, data_dir, cache))}


seed_key = runner.seed_key
seed_keys = runner.seed_keys


def task_classes(key: jax.Array, task: int | jax.Array, num_classes: int) -> jax.Array:
  """The two classes of task ``task``: int32 ``(2,)``, label 0 then label 1 (module docstring)."""
  pairs = num_classes // 2
  perm = jax.random.permutation(
    jax.random.fold_in(jax.random.fold_in(key, _CLASSES), task // pairs), num_classes
  )
  return jax.lax.dynamic_slice(perm, (2 * (task % pairs),), (2,)).astype(jnp.int32)


def task_data(config: Mapping[str, Any], data: Mapping[str, jax.Array], classes: jax.Array):
  """The task's images: ``(train_x, train_y, test_x, test_y)``, uint8 images, int32 labels.

  Training images are class ``classes[0]``'s first ``train_per_class`` then
  ``classes[1]``'s; test images the next ``test_per_class`` of each.
  """
  n_train, n_test = config["train_per_class"], config["test_per_class"]
  imgs = data["images"][classes]  # (2, per_class, 32, 32, 3)
  train_x = imgs[:, :n_train].reshape((2 * n_train,) + IMAGE_SHAPE)
  test_x = imgs[:, n_train : n_train + n_test].reshape((2 * n_test,) + IMAGE_SHAPE)
  train_y = jnp.repeat(jnp.arange(2, dtype=jnp.int32), n_train)
  test_y = jnp.repeat(jnp.arange(2, dtype=jnp.int32), n_test)
  return train_x, train_y, test_x, test_y


def heldout_images(config: Mapping[str, Any], data: Mapping[str, jax.Array]) -> jax.Array:
  """The churn probe's held-out inputs (float32), the same for the whole run:
  ``probes.heldout_size`` test images, of every class in turn (class 0's
  first, class 1's first, ..., class 0's second, ...; repeating once all
  were taken, which only a tiny data set needs)."""
  num_classes = data["images"].shape[0]
  k = jnp.arange(config["probes"]["heldout_size"])
  image = config["train_per_class"] + (k // num_classes) % config["test_per_class"]
  return to_float(data["images"][k % num_classes, image])


def epoch_order(key: jax.Array, task: int | jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
  """The order in which an epoch visits the task's ``n`` training images."""
  return jax.random.permutation(
    jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _ORDER), task), epoch), n
  )


def to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) * PIXEL_SCALE


# ---------------------------------------------------------------------------
# Learners.
# ---------------------------------------------------------------------------


def make_model(conv: str = "xla") -> cbp_jax.models.ConvNet:
  return cbp_jax.models.ConvNet(outputs=2, init_scheme="default", conv=conv)


class Learner:
  """One method: init, training step, head reset and probe (one seed, unbatched)."""

  def __init__(self, config, method, index):
    self.config, self.method, self.index = config, method, index
    self.hp = config["hparams"][method]
    self.model = make_model(config["conv"])
    x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
    shapes = jax.eval_shape(lambda k: self.model.init(k, x)["params"], jax.random.key(0))
    self.graph = cbp_jax.graph_from_params(shapes)
    assert self.graph.names == HIDDEN, self.graph.names

  # The optimizer: ``inner`` is plain SGD (+ L2); ``tx`` what the step uses.
  def inner(self):
    return optimizers.base(self.method, self.hp, snp_decay="gradient")

  def tx(self, key):
    return optimizers.optimizer(self.method, self.hp, self.graph, key, snp_decay="gradient")

  def apply(self, params, x):
    return cbp_jax.apply_with_activations(self.model, params, x)

  def logits(self, params, x):
    return self.model.apply({"params": params}, x)

  def initial_params(self, key):
    """The seed's initial parameters (the same for every method)."""
    return self.model.init(jax.random.fold_in(key, _INIT), jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))[
      "params"
    ]

  def init(self, key):
    params = self.initial_params(key)
    opt_key = jax.random.fold_in(jax.random.fold_in(key, _OPT), self.index)
    return params, self.tx(opt_key).init(params)

  def reset_head(self, state, key, task):
    """Resets ``Dense_2`` (zeros or a fresh draw) and restarts its optimizer statistics."""
    params, opt_state = state
    if self.config["head_reset"] == "zero":
      fresh = jax.tree.map(jnp.zeros_like, params)
    else:
      x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
      head_key = jax.random.fold_in(jax.random.fold_in(key, _HEAD), task)
      fresh = self.model.init(head_key, x)["params"]
    params = reset_layers(params, fresh, HEAD)
    if self.method == "cbp" and self.hp["reset_optimizer"]:
      opt_state = opt_state._replace(
        inner_state=reset_optimizer_for(self.inner(), opt_state.inner_state, params, HEAD)
      )
    elif self.method in ("cbp", "snp"):  # chain(inner, cbp | shrink_and_perturb)
      opt_state = (reset_optimizer_for(self.inner(), opt_state[0], params, HEAD),) + tuple(opt_state[1:])
    else:
      opt_state = reset_optimizer_for(self.inner(), opt_state, params, HEAD)
    return params, opt_state

  def step(self, state, x, y):
    """One SGD step on ``(x, y)``; returns the new state and the correct count before it."""
    params, opt_state = state

    def loss_fn(p):
      logits, acts = self.apply(p, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), (logits, acts)

    (_, (logits, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == y, dtype=jnp.int32)
    # The optimizer's key lives in its state; this one is never used.
    updates, opt_state = self.tx(jax.random.key(0)).update(grads, opt_state, params, activations=acts)
    return (optax.apply_updates(params, updates), opt_state), correct

  def evaluate(self, state, x, y):
    """Test accuracy and the probe metrics on ``(x, y)``."""
    params, opt_state = state
    logits, acts = self.apply(params, x)
    out = {"accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))}
    widths = [acts[n].shape[-1] for n in HIDDEN]
    dead = jnp.stack([metrics_lib.dead_unit_fraction(acts[n]) for n in HIDDEN])
    out["dead_fraction"] = jnp.sum(dead * jnp.asarray(widths, jnp.float32)) / sum(widths)
    out["effective_rank"] = metrics_lib.effective_rank(acts["Dense_1"])
    out["weight_magnitude"] = metrics_lib.weight_magnitude(params)["overall"]
    if self.method == "cbp":
      stats = cbp_jax.unit_stats(opt_state)
      out["replaced_units"] = sum(stats[n]["replaced"] for n in HIDDEN).astype(jnp.float32)
    return out


# ---------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------


def make_chunked(config: Mapping[str, Any]):
  """Per-seed ``init(key) -> carry`` and ``chunk(carry, chunk_index, data) -> (carry, metrics)``.

  ``data`` is `load_data`'s dict. ``metrics`` is ``{method: {name:
  array(tasks_per_chunk,)}}`` with names ``accuracy``, ``train_accuracy``,
  ``dead_fraction``, ``effective_rank``, ``weight_magnitude``, for CBP
  ``replaced_units``, and unless ``probes.enabled`` is false the plasticity
  probes of `experiments.plasticity_probes` on the task's test images
  (trainability and its fresh-init reference, top Hessian eigenvalue, drift
  per layer, churn on `heldout_images`).
  """
  config = make_config(config)
  methods = [Learner(config, m, i) for i, m in enumerate(config["methods"])]
  batch = config["batch_size"]
  n_train = 2 * config["train_per_class"]
  steps = steps_per_epoch(config)
  epochs = config["epochs_per_task"]
  tasks_per_chunk = config["tasks_per_chunk"]
  probes = dict(config["probes"], size=min(config["probes"]["size"], 2 * config["test_per_class"]))

  def init(key):
    carry = {"key": key, "learners": {m.method: m.init(key) for m in methods}}
    if probes["enabled"]:  # The held-out logits of the last probe point, for the churn.
      carry["heldout"] = {m.method: jnp.zeros((probes["heldout_size"], 2)) for m in methods}
    return carry

  def plasticity(carry, learners, task, x, y, data):
    """``({method: probe metrics}, fresh-init trainability metrics, {method: held-out logits})``."""
    key, first = carry["key"], methods[0]
    probe_key = jax.random.fold_in(jax.random.fold_in(key, _PROBE), task)
    init_params = first.initial_params(key)
    heldout_x = heldout_images(config, data)
    labels = plasticity_probes.probe_labels(probes, probe_key, 2)
    fresh = plasticity_probes.fresh_trainability(
      probes, first.logits, lambda k: first.model.init(k, heldout_x[:1])["params"], x, labels, probe_key
    )
    out, heldout = {}, {}
    for m in methods:
      # Task 0's churn is measured from the initial network.
      before = jnp.where(task == 0, first.logits(init_params, heldout_x), carry["heldout"][m.method])
      out[m.method], heldout[m.method] = plasticity_probes.learner_probes(
        probes, m.logits, learners[m.method][0], init_params, x, y, labels, probe_key, before, heldout_x
      )
    return out, fresh, heldout

  def one_task(carry, task, data):
    key = carry["key"]
    num_classes = data["images"].shape[0]
    classes = task_classes(key, task, num_classes)
    train_x, train_y, test_x, test_y = task_data(config, data, classes)
    learners = {m.method: m.reset_head(carry["learners"][m.method], key, task) for m in methods}

    def epoch_body(learners, epoch):
      order = epoch_order(key, task, epoch, n_train)

      def step_body(learners, s):
        idx = jax.lax.dynamic_slice(order, (s * batch,), (batch,))
        x, y = to_float(train_x[idx]), train_y[idx]
        new, correct = {}, {}
        for m in methods:
          new[m.method], correct[m.method] = m.step(learners[m.method], x, y)
        return new, correct

      learners, correct = jax.lax.scan(step_body, learners, jnp.arange(steps))
      return learners, {k: jnp.sum(v) for k, v in correct.items()}

    learners, correct = jax.lax.scan(epoch_body, learners, jnp.arange(epochs))
    new_carry = {"key": key, "learners": learners}
    if probes["enabled"]:
      extra, fresh, new_carry["heldout"] = plasticity(carry, learners, task, to_float(test_x), test_y, data)
    out = {}
    for m in methods:
      out[m.method] = m.evaluate(learners[m.method], to_float(test_x), test_y)
      out[m.method]["train_accuracy"] = correct[m.method][-1].astype(jnp.float32) / n_train
      if probes["enabled"]:
        out[m.method].update(extra[m.method], **fresh)
    return new_carry, out

  return init, runner.scan_points(one_task, tasks_per_chunk)


def plot_results(results: Mapping[str, Any] | str | Path, path: str | Path) -> Path:
  """Test accuracy per task, then the correlates, one panel each."""
  if not isinstance(results, Mapping):
    results = runner.load_results(results)
  c = results["config"]
  return runner.plot_results(
    results,
    path,
    metrics=("accuracy", "train_accuracy", "dead_fraction", "effective_rank", "weight_magnitude")
    + plasticity_probes.plotted(results),
    title=f"continual ImageNet-32 protocol on {c.get('dataset')} ({c.get('epochs_per_task')} "
    f"epochs/task, {c.get('seeds')} seed(s), {runner.BAND_LABEL})",
  )


def summary(results: Mapping[str, Any], window: int | None = None) -> dict:
  """``{method: {"first", "last", "last_se", "dead_last"}}``: mean test accuracy of the
  first and the last ``window`` tasks (default: a fifth of the tasks, at least 1),
  means over seeds, and the dead-unit fraction at the end."""
  out = {}
  for label, named in results["metrics"].items():
    acc = np.asarray(named["accuracy"], np.float64)
    n = acc.shape[-1]
    w = window or max(1, n // 5)
    last = np.mean(acc[:, n - w :], axis=1)
    out[label] = {
      "first": float(np.mean(acc[:, :w])),
      "last": float(np.mean(last)),
      "last_se": float(np.std(last, ddof=1) / math.sqrt(len(last))) if len(last) > 1 else 0.0,
      "dead_last": float(np.mean(np.asarray(named["dead_fraction"])[:, -1])),
    }
  return out


def format_summary(results: Mapping[str, Any], **kwargs) -> str:
  rows = summary(results, **kwargs)
  lines = [f"{'method':<8} {'first tasks':>12} {'last tasks':>12} {'(+- s.e.)':>10} {'dead (end)':>11}"]
  for label, r in rows.items():
    lines.append(
      f"{label:<8} {100 * r['first']:>11.2f}% {100 * r['last']:>11.2f}% "
      f"{100 * r['last_se']:>9.2f}% {100 * r['dead_last']:>10.2f}%"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# The experiment: the protocol runs it (configs, CLI, chunked run, results).
# ---------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--class-array", help="a .npy cache of the class array: read if present, else written")
  plasticity_probes.add_arguments(p)


def _describe(config: Mapping[str, Any], data: Mapping[str, Any]) -> str:
  return (
    f"continual ImageNet protocol on {config['dataset']} ({data['images'].shape[0]} classes): "
    f"{config['seeds']} seed(s) x {config['tasks']} tasks x {config['epochs_per_task']} "
    f"epochs, methods {', '.join(config['methods'])}; conv "
    f"{cbp_jax.models.resolve_conv(config['conv'])}"
  )


EXPERIMENT = protocol.Experiment(
  name="continual_imagenet",
  short="cimagenet",
  title="Continual ImageNet-32 (binary tasks over class pairs), compiled and vmapped.",
  defaults=DEFAULT_CONFIG,
  methods=METHODS,
  make_chunked=make_chunked,
  num_chunks=num_chunks,
  points_per_chunk="tasks_per_chunk",
  x_label="task",
  work_per_run_chunk=lambda c: c["tasks_per_chunk"] * c["epochs_per_task"] * steps_per_epoch(c),
  validate=validate_config,
  summary=format_summary,
  load_data=load_data,
  plot=lambda results, out: plot_results(results, out / "cimagenet.png"),
  plots=("cimagenet.png",),
  shared_hparams=("momentum",),
  presets={
    "paper": ("30 seeds x 5,000 tasks x 250 epochs", PAPER_OVERRIDES),
    "reduced": (
      "the CPU stand-in (about 25 minutes on one core): MNIST pairs, 2 seeds, 24 "
      "tasks x 25 epochs of 200 images a class, step size 0.06",
      REDUCED_OVERRIDES,
    ),
  },
  flags=(
    protocol.flag("--dataset", "dataset", choices=DATASETS),
    protocol.flag("--tasks", "tasks", type=int),
    protocol.flag("--epochs-per-task", "epochs_per_task", type=int),
    protocol.flag("--tasks-per-chunk", "tasks_per_chunk", type=int),
    protocol.flag("--batch-size", "batch_size", type=int),
    protocol.flag("--head-reset", "head_reset", choices=HEAD_RESETS),
    protocol.flag("--conv", "conv", choices=cbp_jax.models.CONV_IMPLS),
    protocol.flag("--seed-axis", "seed_axis", choices=SEED_AXES),
    protocol.flag("--step-size", "hparams.*.step_size", type=float, help="one step size for every method"),
    *protocol.method_flags("--cbp-rate", "--cbp-maturity"),
  ),
  add_arguments=_add_arguments,
  overrides_from_args=plasticity_probes.overrides_from_args,
  cli_data=lambda config, args: load_data(config, args.data_dir, args.class_array),
  describe=_describe,
)

# The module's entry points; ``make_batched(config)`` gives the jitted ``init(keys)``
# and ``chunk(carry, index, ...)`` over all seeds, cached per config.
(make_config, run_labels, make_train, make_batched, run_experiment, parse_args, config_from_args, main) = (
  EXPERIMENT.entry_points()
)


if __name__ == "__main__":
  sys.exit(main())
