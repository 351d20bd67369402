"""Class-incremental CIFAR-100 (Dohare et al., Nature 2024), whole-run compiled and vmapped.

The problem (SPEC "Experiments"; reference: ``lop/incremental_cifar``)
---------------------------------------------------------------------
* Data: per class, the first ``val_per_class`` (50) training images form the
  validation set and the next ``train_per_class`` (450) the training set (the
  reference's split); ``test_per_class`` (100) test images. CIFAR-100 comes
  from tfds (`experiments.data.load_dataset`, array_record, no TensorFlow);
  offline, the stand-in is class-incremental MNIST/Fashion-MNIST from
  ``../shared/data`` (10 classes, zero-padded to 32x32, 3 channels). Images sit
  on the device as ``uint8`` class arrays, passed to the compiled program as
  arguments. Pixels are scaled to [0, 1] and normalised per channel (CIFAR-100:
  the reference's mean (0.5071, 0.4865, 0.4409) and std (0.2673, 0.2564,
  0.2762); other data sets: their own training statistics).
* Tasks: each seed draws a class order; task ``t`` trains on the first
  ``classes_per_task * (t + 1)`` classes of it (5 more per task, 20 tasks up to
  100). Classes are relabelled by their rank in the order and the head's
  output ``r`` serves rank ``r`` (the reference indexes head rows by the class
  instead; both heads are i.i.d. at init); logits of classes not yet seen are
  masked out of the loss and the prediction, as the reference's indexing does.
* Training per task (the reference's schedule): ``epochs_per_task`` (200)
  epochs over the current classes' training images, reshuffled each epoch,
  mini-batches of ``batch_size`` (90); SGD, momentum 0.9, weight decay 5e-4
  added to the gradient (PyTorch ``SGD(weight_decay=)``), step size 0.1, times
  0.2 at 30%, 60% and 80% of the task (epochs 60, 120, 160 of 200). Data
  augmentation (``augment``): random horizontal flip, random 32x32 crop of the
  4-pixel reflect-padded image, random rotation by 0-15 degrees (nearest
  neighbour, zero fill), in that order, after normalisation.
* Early stopping (``early_stopping``): after every epoch the validation
  accuracy over the current classes is measured (BatchNorm in inference mode);
  at the end of the task the parameters and BatchNorm statistics of the best
  epoch are restored (the optimizer and CBP states continue), as the reference.
* Measured at the end of each task (after the restore): ``accuracy`` (test
  accuracy over the current classes), ``val_accuracy`` (best), ``train_accuracy``
  (online accuracy of the last epoch), and on a probe of ``probe_size`` training
  images of the current classes (inference mode, no augmentation):
  ``dormant_fraction`` (the reference's rule: a ReLU unit is dormant when it is
  positive on fewer than 1% of the probe's samples x positions; over the stem,
  every block's inner and output units, the last block's output taken after
  pooling), ``dormant_fraction_last`` (the pooled features the head reads),
  ``stable_rank`` and ``effective_rank`` of those pooled features (SPEC: the
  smallest k whose top-k singular values hold 99% of their sum),
  ``weight_magnitude``, and for CBP ``replaced_units``.
* Methods (the reference's ``cfg``): ``plain``; ``head_reset`` (the head
  redrawn at each new task, its momentum restarted); ``full_reset`` (the whole
  network and optimizer re-initialised at each new task: "retrained from
  scratch"); ``snp`` (Gaussian noise of std 1e-5 on every parameter after every
  step, with the base weight decay as the shrink); ``cbp`` (`cbp_jax.cbp` over
  `cbp_jax.resnet.resnet_graph`: the inner units of every residual block,
  ``conv1 -> bn1 -> relu -> conv2``; replacement rate 1e-5, maturity 1000,
  decay 0.99, ``contribution`` utility, ``kaiming_normal`` init (as the
  network's own), the conv references'
  ``count_basis="layer"``, accumulated; BatchNorm statistics of replaced units
  reset with `cbp_jax.reset_batch_stats`; the wrapped optimizer's momentum of
  replaced weights restarts).

Deliberate differences from the reference: CBP replaces only the blocks' inner
units (see `cbp_jax.resnet.resnet_graph`: residual-stream channels have no
removable outgoing weights); its running statistics decay (the reference
accumulates |h| without decay); ``full_reset`` also restarts the momentum.

A real run (20 tasks x 200 epochs of ResNet-18, about 1M SGD steps of batch
90) takes about a day on one GPU and is out of reach of a CPU; the code is
checked on tiny configurations (a narrow ResNet, a few steps) and run at a
reduced scale offline (``--reduced``, `REDUCED_OVERRIDES`).

Program structure (purejaxrl style): `make_train` returns a pure per-seed
``train(key)``; `make_chunked` per-seed ``init(key)`` and ``chunk(carry,
chunk_index, data)`` (a scan over the chunk's tasks; each a scan over epochs,
each epoch a ``fori_loop`` over its mini-batches, whose number grows with the
task, with every method in one body); `run_experiment` vmaps over seeds and
drives it with `experiments.runner.run` (progress, results file, plot, orbax
checkpoints at task boundaries, ``--resume``).

Usage::

  # The paper's setting (needs cifar100 prepared for tfds, and a GPU):
  python -m experiments.incremental_cifar100 --data-dir ~/tensorflow_datasets --out results/icifar
  # The offline stand-in on a tiny net (a smoke run, not a result):
  python -m experiments.incremental_cifar100 --tiny --out results/icifar_tiny
  # Offline stand-in, reduced (class-incremental Fashion-MNIST, 5 tasks of 2
  # classes x 15 epochs of 100 images a class, width-8 ResNet-18, 1 seed;
  # about 20 minutes on one CPU core, compile included):
  python -m experiments.incremental_cifar100 --reduced --out results/icifar_fmnist
"""

from __future__ import annotations

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
from cbp_jax import resnet
from cbp_jax.methods import reset_optimizer_for
from experiments import optimizers, protocol, runner
from experiments.continual_imagenet import IMAGE_SHAPE, class_array
from experiments.data import load_dataset

METHODS = ("plain", "head_reset", "full_reset", "snp", "cbp")
DATASETS = ("cifar100", "fashion_mnist", "mnist")
SEED_AXES = ("vmap", "map")
HEAD = "fc"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MASKED_LOGIT = -1e9
# Key streams of a seed.
_CLASSES, _INIT, _OPT, _ORDER, _AUGMENT, _RESET = range(6)

_SGD = {"step_size": 0.1, "momentum": 0.9, "weight_decay": 5e-4}

DEFAULT_CONFIG: dict[str, Any] = {
  "seed": 0,
  "seeds": 1,
  "dataset": "cifar100",
  "classes_per_task": 5,
  "tasks": 20,
  "epochs_per_task": 200,
  "tasks_per_chunk": 1,
  "batch_size": 90,
  "eval_batch_size": 500,
  "train_per_class": 450,
  "val_per_class": 50,
  "test_per_class": 100,
  "width": 64,
  "stage_sizes": [2, 2, 2, 2],
  "conv": "auto",
  "augment": True,
  "early_stopping": True,
  "lr_boundaries": [0.3, 0.6, 0.8],
  "lr_decay": 0.2,
  "probe_size": 1000,
  "dormant_threshold": 0.01,
  "seed_axis": "vmap",
  "methods": ["plain", "head_reset", "full_reset", "snp", "cbp"],
  # Every method: SGD at step_size (the task's schedule scales it), momentum
  # and weight decay in the gradient; constants of the program (no sweeps).
  "hparams": {
    **{m: dict(_SGD) for m in ("plain", "head_reset", "full_reset")},
    "snp": {**_SGD, "noise_scale": 1e-5},
    "cbp": {
      **_SGD,
      "replacement_rate": 1e-5,
      "maturity_threshold": 1000,
      "decay_rate": 0.99,
      "utility": "contribution",
      "init": "kaiming_normal",
      "count_basis": "layer",
      "accumulate": True,
      "next_bias_correction": True,
      "reset_optimizer": True,
    },
  },
  "sweep": {},
}

# A smoke-test configuration for a CPU: class-incremental Fashion-MNIST (2 new
# classes per task, 5 tasks), a ResNet-18 of width 4, 3 epochs per task of 100
# images per class. It exercises every code path; its numbers mean nothing.
TINY_OVERRIDES: dict[str, Any] = {
  "dataset": "fashion_mnist",
  "classes_per_task": 2,
  "tasks": 5,
  "epochs_per_task": 3,
  "batch_size": 50,
  "eval_batch_size": 100,
  "train_per_class": 100,
  "val_per_class": 50,
  "test_per_class": 100,
  "width": 4,
  "probe_size": 200,
  "hparams": {"cbp": {"replacement_rate": 1e-3, "maturity_threshold": 10}},
}


# The offline stand-in, sized to run in about 20 minutes on one CPU core
# (measured: a width-8 ResNet-18 steps all five methods on a batch of 50 in
# about 1.1 s, and compiles in about 2 minutes). Class-incremental
# Fashion-MNIST rather than MNIST: MNIST's digits are near 99% for any
# method even from few images (not measured here), leaving no room for a
# difference; Fashion-MNIST's shirt/T-shirt/pullover/coat classes keep the
# all-classes accuracy well below that (~77% at 10 classes here). 2 new classes
# per task, 5 tasks (up to all 10), 1 seed. 100 training images per class (50
# validation, 200 test), batch 50, 15 epochs per task with the paper's
# schedule (x0.2 at epochs 4, 9, 12): task k (1-based) is 60 k steps, 900 in
# all, against the paper's 5,000 k (200 epochs of 5 k x 450 images / 90).
# CBP replaces 1e-3 of a layer per step (6% a layer in the first task; the
# paper's 1e-5 x 5,000 is 5%) once units are 12 steps old (the paper's 1,000
# is a fifth of its first task). S&P: the per-step noise std scaled by
# sqrt(5,000 / 60) ~ 9 so that the noise a task adds has the paper's
# variance (1e-4); the shrink stays the base weight decay. ResNet width 8
# (the paper: 64): width 16 would be several times slower. The measured run
# (README; 19 minutes) shows no loss of plasticity at this length: at 10
# classes plain 77.5%, S&P 77.7%, CBP 76.9%, full reset 75.4%, head reset
# 75.2% (one seed, 2,000 test images: about +-0.9%); no dormant units but
# CBP's 0.2%; last-layer stable rank 59 -> 55-56 for all. The nets still
# underfit (last-epoch training accuracy ~80% at 10 classes), which favours
# the warm-started methods over retraining from scratch.
REDUCED_OVERRIDES: dict[str, Any] = {
  "dataset": "fashion_mnist",
  "classes_per_task": 2,
  "tasks": 5,
  "epochs_per_task": 15,
  "batch_size": 50,
  "eval_batch_size": 100,
  "train_per_class": 100,
  "val_per_class": 50,
  "test_per_class": 200,
  "width": 8,
  "probe_size": 200,
  "hparams": {"snp": {"noise_scale": 1e-4}, "cbp": {"replacement_rate": 1e-3, "maturity_threshold": 12}},
}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def num_classes_of(dataset: str) -> int:
  return 100 if dataset == "cifar100" else 10


def validate_config(c: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first inconsistent entry (the common entries
  are checked by the protocol)."""
  need = runner.require
  runner.require_positive_ints(
    c,
    (
      "classes_per_task",
      "tasks",
      "epochs_per_task",
      "tasks_per_chunk",
      "batch_size",
      "eval_batch_size",
      "train_per_class",
      "val_per_class",
      "test_per_class",
      "width",
      "probe_size",
    ),
  )
  need(c["dataset"] in DATASETS, f"dataset must be one of {DATASETS}, got {c['dataset']!r}")
  classes = num_classes_of(c["dataset"])
  need(
    c["classes_per_task"] * c["tasks"] <= classes,
    f"classes_per_task * tasks ({c['classes_per_task']} * {c['tasks']}) exceeds the "
    f"{classes} classes of {c['dataset']}",
  )
  need(c["tasks"] % c["tasks_per_chunk"] == 0, "tasks must be a multiple of tasks_per_chunk")
  need(
    (c["classes_per_task"] * c["train_per_class"]) % c["batch_size"] == 0,
    "classes_per_task * train_per_class must be a multiple of batch_size (whole batches)",
  )
  need(
    c["probe_size"] % c["eval_batch_size"] == 0 or c["probe_size"] < c["eval_batch_size"],
    "probe_size must be a multiple of eval_batch_size (or smaller)",
  )
  need(
    c["probe_size"] <= c["classes_per_task"] * c["train_per_class"],
    "probe_size must not exceed the first task's training images",
  )
  need(
    isinstance(c["stage_sizes"], list)
    and len(c["stage_sizes"]) >= 1
    and all(isinstance(s, int) and s >= 1 for s in c["stage_sizes"]),
    f"stage_sizes must be a list of positive ints, got {c['stage_sizes']!r}",
  )
  need(c["conv"] in cbp_jax.models.CONV_IMPLS, f"conv must be one of {cbp_jax.models.CONV_IMPLS}")
  need(c["seed_axis"] in SEED_AXES, f"seed_axis must be one of {SEED_AXES}")
  need(
    not c["sweep"],
    "incremental CIFAR-100 has no sweeps (every setting is a constant of "
    f"the compiled program; run one config per value), got sweep {c['sweep']}",
  )
  for m in c["methods"]:
    hp = c["hparams"][m]
    need(
      hp["step_size"] > 0 and 0 <= hp["momentum"] < 1 and hp["weight_decay"] >= 0,
      f"hparams.{m}: need step_size > 0, momentum in [0, 1), weight_decay >= 0",
    )
  need(
    all(0 < b < 1 for b in c["lr_boundaries"]) and 0 < c["lr_decay"] <= 1,
    "lr_boundaries must be fractions in (0, 1) and lr_decay in (0, 1]",
  )
  need(0 < c["dormant_threshold"] < 1, "dormant_threshold must be in (0, 1)")
  need(c["hparams"]["snp"]["noise_scale"] >= 0, "hparams.snp.noise_scale must be >= 0")
  cb = c["hparams"]["cbp"]
  need(0 <= cb["replacement_rate"] <= 1, "hparams.cbp.replacement_rate must be in [0, 1]")
  need(0 <= cb["decay_rate"] < 1, "hparams.cbp.decay_rate must be in [0, 1)")
  need(cb["maturity_threshold"] >= 0, "hparams.cbp.maturity_threshold must be >= 0")


def num_chunks(config: Mapping[str, Any]) -> int:
  return config["tasks"] // config["tasks_per_chunk"]


def learning_rate(config: Mapping[str, Any], epoch: jax.Array, step_size: float) -> jax.Array:
  """The step size at epoch ``epoch`` (0-based, within the task) of a method
  whose base step size is ``step_size``."""
  e = config["epochs_per_task"]
  bounds = jnp.asarray([round(b * e) for b in config["lr_boundaries"]], jnp.int32)
  k = jnp.sum(epoch >= bounds)
  return step_size * jnp.power(jnp.float32(config["lr_decay"]), k.astype(jnp.float32))


def active_classes(config: Mapping[str, Any], task: int | jax.Array) -> jax.Array:
  return config["classes_per_task"] * (task + 1)


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def build_data(config: Mapping[str, Any], train: Any, test: Any) -> dict[str, np.ndarray]:
  """Host arrays from two `experiments.data.Dataset`-like splits (``images``, ``labels``).

  Returns:
    ``{"train": uint8 (C, val_per_class + train_per_class, 32, 32, 3)}`` (per
    class: validation images first, then training images, in data-set order),
    ``"test": uint8 (C, test_per_class, 32, 32, 3)``, and the per-channel
    ``"mean"``/``"std"`` (float32 (3,)) used for normalisation.
  """
  c = num_classes_of(config["dataset"])
  tr = class_array(train.images, train.labels, config["val_per_class"] + config["train_per_class"], c)
  te = class_array(test.images, test.labels, config["test_per_class"], c)
  if config["dataset"] == "cifar100":
    mean, std = np.asarray(CIFAR100_MEAN, np.float32), np.asarray(CIFAR100_STD, np.float32)
  else:
    pixels = tr[:, config["val_per_class"] :].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=0).astype(np.float32), pixels.std(axis=0).astype(np.float32)
  return {"train": tr, "test": te, "mean": mean, "std": std}


def load_data(config: Mapping[str, Any], data_dir: str | Path | None = None) -> dict[str, jax.Array]:
  """`build_data` of the config's data set, on the device. Never downloads."""
  source = "tfds" if config["dataset"] == "cifar100" else "local"
  train = load_dataset(config["dataset"], "train", source=source, data_dir=data_dir)
  test = load_dataset(config["dataset"], "test", source=source, data_dir=data_dir)
  return jax.device_put(build_data(config, train, test))


seed_key = runner.seed_key
seed_keys = runner.seed_keys


def class_order(key: jax.Array, num_classes: int) -> jax.Array:
  """The seed's class order: rank ``r`` is class ``order[r]``."""
  return jax.random.permutation(jax.random.fold_in(key, _CLASSES), num_classes).astype(jnp.int32)


def gather(
  config: Mapping[str, Any], data: Mapping[str, jax.Array], order: jax.Array, split: str, j: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Examples ``j`` (flat index, any shape) of ``split`` in class-rank order.

  ``split`` is ``"train"``, ``"val"`` or ``"test"``; example ``j`` is the
  ``j % n``-th image of the class of rank ``j // n`` (``n`` images per class
  in the split). Returns uint8 images and int32 labels (= ranks).
  """
  n = {"train": config["train_per_class"], "val": config["val_per_class"], "test": config["test_per_class"]}[
    split
  ]
  rank, i = j // n, j % n
  cls = order[rank]
  if split == "train":
    images = data["train"][cls, config["val_per_class"] + i]
  elif split == "val":
    images = data["train"][cls, i]
  else:
    images = data["test"][cls, i]
  return images, rank.astype(jnp.int32)


def normalize(data: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32) * np.float32(1.0 / 255.0)
  return (x - data["mean"]) / data["std"]


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
  """Rotates ``(H, W, C)`` counter-clockwise by ``degrees`` about its centre; nearest, zero fill."""
  h, w = image.shape[:2]
  theta = jnp.deg2rad(degrees)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  # Output pixel (y, x) reads the input at the inverse rotation of its offset;
  # y grows downwards, so a counter-clockwise turn on screen (torchvision's
  # convention) is x' = cos x + sin y, y' = -sin x + cos y.
  dy, dx = yy - cy, xx - cx
  sx = cx + jnp.cos(theta) * dx - jnp.sin(theta) * dy
  sy = cy + jnp.sin(theta) * dx + jnp.cos(theta) * dy
  iy, ix = jnp.round(sy).astype(jnp.int32), jnp.round(sx).astype(jnp.int32)
  inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
  out = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
  return jnp.where(inside[..., None], out, 0.0)


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """Random flip, 4-pixel reflect-pad crop and 0-15 degree rotation of ``(B, 32, 32, C)``."""
  kf, kc, kr = jax.random.split(key, 3)
  b, h, w, c = x.shape
  flip = jax.random.bernoulli(kf, 0.5, (b,))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
  padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
  offsets = jax.random.randint(kc, (b, 2), 0, 9)
  x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
  angles = jax.random.uniform(kr, (b,), minval=0.0, maxval=15.0)
  return jax.vmap(rotate)(x, angles)


# ---------------------------------------------------------------------------
# Learners.
# ---------------------------------------------------------------------------


def make_model(config: Mapping[str, Any]) -> resnet.ResNet18:
  return resnet.ResNet18(
    num_classes=num_classes_of(config["dataset"]),
    width=config["width"],
    stage_sizes=tuple(config["stage_sizes"]),
    conv=config["conv"],
  )


def masked_logits(logits: jax.Array, n_active: jax.Array) -> jax.Array:
  """Logits of classes of rank ``>= n_active`` (not seen yet) set to a large negative value."""
  return jnp.where(jnp.arange(logits.shape[-1]) < n_active, logits, MASKED_LOGIT)


class Learner:
  """One method on one seed: state ``{"params", "batch_stats", "opt_state"}``."""

  def __init__(self, config, method, index):
    self.config, self.method, self.index = config, method, index
    self.hp = config["hparams"][method]
    # The resets are BP's optimizer with resets between tasks.
    self.kind = method if method in ("snp", "cbp") else "bp"
    self.model = make_model(config)
    self.graph = resnet.resnet_graph(self.model)

  def _hp(self, lr):
    return self.hp if lr is None else {**self.hp, "step_size": lr}

  def inner(self, lr=None):
    """SGD with momentum and weight decay (PyTorch ``SGD(weight_decay=)``) at step
    size ``lr`` (default the method's)."""
    return optimizers.base(self.kind, self._hp(lr), snp_decay="gradient")

  def tx(self, key, lr=None):
    return optimizers.optimizer(self.kind, self._hp(lr), self.graph, key, snp_decay="gradient")

  def init_network(self, key):
    x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
    variables = self.model.init(key, x, train=False)
    return variables["params"], variables["batch_stats"]

  def init(self, key):
    params, batch_stats = self.init_network(jax.random.fold_in(key, _INIT))
    opt_key = jax.random.fold_in(jax.random.fold_in(key, _OPT), self.index)
    return {"params": params, "batch_stats": batch_stats, "opt_state": self.tx(opt_key).init(params)}

  def _reset_inner_state(self, opt_state, params, path):
    if self.method == "cbp" and self.hp["reset_optimizer"]:
      return opt_state._replace(
        inner_state=reset_optimizer_for(self.inner(), opt_state.inner_state, params, path)
      )
    if self.method in ("cbp", "snp"):
      return (reset_optimizer_for(self.inner(), opt_state[0], params, path),) + tuple(opt_state[1:])
    return reset_optimizer_for(self.inner(), opt_state, params, path)

  def new_task(self, state, key, task):
    """At the start of task ``task > 0``: the head or full reset of those methods."""
    reset_key = jax.random.fold_in(jax.random.fold_in(key, _RESET), task)
    if self.method == "head_reset":
      params = dict(state["params"])
      head = params[HEAD]
      params[HEAD] = {
        "kernel": resnet.head_kernel_init(reset_key, head["kernel"].shape, head["kernel"].dtype),
        "bias": jnp.zeros_like(head["bias"]),
      }
      opt_state = self._reset_inner_state(state["opt_state"], params, HEAD)
      new = {**state, "params": params, "opt_state": opt_state}
    elif self.method == "full_reset":
      params, batch_stats = self.init_network(reset_key)
      opt_key = jax.random.fold_in(reset_key, self.index)
      new = {"params": params, "batch_stats": batch_stats, "opt_state": self.tx(opt_key).init(params)}
    else:
      return state
    return jax.tree.map(lambda a, b: jnp.where(task > 0, a, b), new, state)

  def forward_train(self, params, batch_stats, x):
    logits, updates = self.model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats", "activations"]
    )
    return logits, updates["batch_stats"], cbp_jax.collect_activations(updates["activations"])

  def step(self, state, x, y, n_active, lr):
    """One SGD step; returns the new state and the number classified correctly before it."""
    params = state["params"]

    def loss_fn(p):
      logits, batch_stats, acts = self.forward_train(p, state["batch_stats"], x)
      logits = masked_logits(logits, n_active)
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      return loss, (logits, batch_stats, acts)

    (_, (logits, batch_stats, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == y, dtype=jnp.int32)
    # The optimizer's keys live in its state; this one is never used.
    updates, opt_state = self.tx(jax.random.key(0), lr).update(
      grads, state["opt_state"], params, activations=acts
    )
    if self.method == "cbp":
      batch_stats = cbp_jax.reset_batch_stats(batch_stats, self.graph, opt_state)
    return {
      "params": optax.apply_updates(params, updates),
      "batch_stats": batch_stats,
      "opt_state": opt_state,
    }, correct

  def predict(self, state, x, return_features=False):
    return self.model.apply(
      {"params": state["params"], "batch_stats": state["batch_stats"]},
      x,
      train=False,
      return_features=return_features,
      mutable=["activations"] if return_features else False,
    )


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def evaluate_accuracy(config, data, order, learner, state, split, n_active):
  """Accuracy over the ``split`` examples of the first ``n_active`` classes (inference mode)."""
  bs = config["eval_batch_size"]
  per_class = config["val_per_class" if split == "val" else "test_per_class"]
  count = n_active * per_class
  num_batches = (count + bs - 1) // bs

  def body(b, correct):
    j = b * bs + jnp.arange(bs)
    valid = j < count
    images, labels = gather(config, data, order, split, jnp.where(valid, j, 0))
    logits = masked_logits(learner.predict(state, normalize(data, images)), n_active)
    hit = (jnp.argmax(logits, axis=-1) == labels) & valid
    return correct + jnp.sum(hit, dtype=jnp.int32)

  correct = jax.lax.fori_loop(0, num_batches, body, jnp.zeros((), jnp.int32))
  return correct.astype(jnp.float32) / count.astype(jnp.float32)


def dormant_layer_names(config: Mapping[str, Any]) -> list[str]:
  """The reference's layers for the dormant count, before the pooled features (see module docstring)."""
  return resnet.relu_layer_names(tuple(config["stage_sizes"]))[:-1]


def probe(config, data, order, learner, state, n_active):
  """Dormant fractions, ranks of the pooled features and weight magnitude on the probe set."""
  p = config["probe_size"]
  bs = min(config["eval_batch_size"], p)
  names = dormant_layer_names(config)
  count = n_active * config["train_per_class"]
  # Probe examples spread evenly over the current classes' training images.
  j_all = (jnp.arange(p) * count) // p

  def body(b, carry):
    active, features = carry
    j = jax.lax.dynamic_slice(j_all, (b * bs,), (bs,))
    images, _ = gather(config, data, order, "train", j)
    (_, feats), col = learner.predict(state, normalize(data, images), return_features=True)
    acts = cbp_jax.collect_activations(col["activations"])
    active = {n: active[n] + jnp.sum(acts[n] > 0, axis=(0, 1, 2)).astype(jnp.float32) for n in names}
    features = jax.lax.dynamic_update_slice(features, feats.astype(jnp.float32), (b * bs, 0))
    return active, features

  shapes = jax.eval_shape(
    lambda s: learner.predict(s, jnp.zeros((bs,) + IMAGE_SHAPE), return_features=True), state
  )
  (_, feat_shape), col_shape = shapes
  act_shapes = cbp_jax.collect_activations(col_shape["activations"])
  active0 = {n: jnp.zeros((act_shapes[n].shape[-1],), jnp.float32) for n in names}
  features0 = jnp.zeros((p, feat_shape.shape[-1]), jnp.float32)
  active, features = jax.lax.fori_loop(0, p // bs, body, (active0, features0))
  threshold = config["dormant_threshold"]
  dormant, units = 0.0, 0
  for n in names:
    positions = act_shapes[n].shape[1] * act_shapes[n].shape[2]
    dormant = dormant + jnp.sum(active[n] / (p * positions) < threshold)
    units += act_shapes[n].shape[-1]
  last = jnp.sum(jnp.mean((features != 0).astype(jnp.float32), axis=0) < threshold)
  units += features.shape[-1]
  out = {
    "dormant_fraction": (dormant + last).astype(jnp.float32) / units,
    "dormant_fraction_last": last.astype(jnp.float32) / features.shape[-1],
    "stable_rank": metrics_lib.stable_rank(features).astype(jnp.float32),
    "effective_rank": metrics_lib.effective_rank(features),
    "weight_magnitude": metrics_lib.weight_magnitude(state["params"])["overall"],
  }
  if learner.method == "cbp":
    stats = cbp_jax.unit_stats(state["opt_state"])
    out["replaced_units"] = sum(s["replaced"] for s in stats.values()).astype(jnp.float32)
  return out


# ---------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------


def make_chunked(config: Mapping[str, Any]):
  """Per-seed ``init(key)`` and ``chunk(carry, chunk_index, data) -> (carry, metrics)``.

  ``metrics`` is ``{method: {name: array(tasks_per_chunk,)}}`` (names in the
  module docstring).
  """
  config = EXPERIMENT.make_config(config)
  learners = [Learner(config, m, i) for i, m in enumerate(config["methods"])]
  batch = config["batch_size"]
  num_classes = num_classes_of(config["dataset"])
  total_train = num_classes * config["train_per_class"]

  def init(key):
    return {"key": key, "learners": {l.method: l.init(key) for l in learners}}

  def one_task(carry, task, data):
    key = carry["key"]
    order = class_order(key, num_classes)
    n_active = active_classes(config, task)
    n_examples = n_active * config["train_per_class"]
    steps = n_examples // batch
    states = {l.method: l.new_task(carry["learners"][l.method], key, task) for l in learners}
    best = {
      l.method: {
        "params": states[l.method]["params"],
        "batch_stats": states[l.method]["batch_stats"],
        "accuracy": jnp.full((), -1.0, jnp.float32),
      }
      for l in learners
    }

    def epoch_body(carry, epoch):
      states, best = carry
      lr = {l.method: learning_rate(config, epoch, l.hp["step_size"]) for l in learners}
      epoch_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _ORDER), task), epoch)
      # A random order of the current classes' examples: those sort first.
      j = jnp.arange(total_train)
      u = jax.random.uniform(epoch_key, (total_train,))
      perm = jnp.argsort(jnp.where(j < n_examples, u, 2.0))
      aug_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _AUGMENT), task), epoch)

      def step_body(s, inner):
        states, correct = inner
        idx = jax.lax.dynamic_slice(perm, (s * batch,), (batch,))
        images, y = gather(config, data, order, "train", idx)
        x = normalize(data, images)
        if config["augment"]:
          x = augment(jax.random.fold_in(aug_key, s), x)
        new, new_correct = {}, {}
        for l in learners:
          new[l.method], c = l.step(states[l.method], x, y, n_active, lr[l.method])
          new_correct[l.method] = correct[l.method] + c
        return new, new_correct

      zero = {l.method: jnp.zeros((), jnp.int32) for l in learners}
      states, correct = jax.lax.fori_loop(0, steps, step_body, (states, zero))
      new_best = {}
      for l in learners:
        acc = evaluate_accuracy(config, data, order, l, states[l.method], "val", n_active)
        b = best[l.method]
        better = acc > b["accuracy"]
        candidate = {
          "params": states[l.method]["params"],
          "batch_stats": states[l.method]["batch_stats"],
          "accuracy": acc,
        }
        new_best[l.method] = jax.tree.map(lambda a, o: jnp.where(better, a, o), candidate, b)
      train_acc = {k: v.astype(jnp.float32) / n_examples.astype(jnp.float32) for k, v in correct.items()}
      return (states, new_best), train_acc

    (states, best), train_acc = jax.lax.scan(
      epoch_body, (states, best), jnp.arange(config["epochs_per_task"])
    )
    out = {}
    for l in learners:
      s = states[l.method]
      if config["early_stopping"]:
        s = {**s, "params": best[l.method]["params"], "batch_stats": best[l.method]["batch_stats"]}
        states[l.method] = s
      out[l.method] = {
        "accuracy": evaluate_accuracy(config, data, order, l, s, "test", n_active),
        "val_accuracy": best[l.method]["accuracy"],
        "train_accuracy": train_acc[l.method][-1],
        **probe(config, data, order, l, s, n_active),
      }
    return {"key": key, "learners": states}, out

  return init, runner.scan_points(one_task, config["tasks_per_chunk"])


def plot_results(results: Mapping[str, Any] | str | Path, path: str | Path) -> Path:
  if not isinstance(results, Mapping):
    results = runner.load_results(results)
  c = results["config"]
  return runner.plot_results(
    results,
    path,
    metrics=("accuracy", "dormant_fraction", "dormant_fraction_last", "stable_rank", "weight_magnitude"),
    title=f"class-incremental {c.get('dataset')} (ResNet-18 width {c.get('width')}, "
    f"{c.get('epochs_per_task')} epochs/task, {c.get('seeds')} seed(s))",
  )


def format_summary(results: Mapping[str, Any]) -> str:
  lines = [f"{'method':<11} {'test acc (last task)':>20} {'dormant':>8} {'stable rank':>12}"]
  for label, named in results["metrics"].items():
    acc = np.asarray(named["accuracy"])[:, -1].mean()
    dormant = np.asarray(named["dormant_fraction"])[:, -1].mean()
    rank = np.asarray(named["stable_rank"])[:, -1].mean()
    lines.append(f"{label:<11} {100 * acc:>19.2f}% {100 * dormant:>7.2f}% {rank:>12.1f}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# The experiment: the protocol runs it (configs, CLI, chunked run, results).
# ---------------------------------------------------------------------------

EXPERIMENT = protocol.Experiment(
  name="incremental_cifar100",
  short="icifar",
  title="Class-incremental CIFAR-100 with ResNet-18.",
  defaults=DEFAULT_CONFIG,
  methods=METHODS,
  make_chunked=make_chunked,
  num_chunks=num_chunks,
  points_per_chunk="tasks_per_chunk",
  x_label="classes",
  x_step=lambda c: float(c["classes_per_task"]),
  work_per_run_chunk=None,
  validate=validate_config,
  summary=format_summary,
  load_data=load_data,
  plot=lambda results, out: plot_results(results, out / "icifar.png"),
  plots=("icifar.png",),
  shared_hparams=("step_size", "momentum", "weight_decay"),
  presets={
    "tiny": ("a smoke-test configuration on Fashion-MNIST with a width-4 net", TINY_OVERRIDES),
    "reduced": (
      "the CPU stand-in (about 20 minutes on one core): class-incremental "
      "Fashion-MNIST, 5 tasks x 2 classes x 15 epochs of 100 images a class, "
      "width-8 ResNet-18",
      REDUCED_OVERRIDES,
    ),
  },
  flags=(
    protocol.flag("--dataset", "dataset", choices=DATASETS),
    protocol.flag("--tasks", "tasks", type=int),
    protocol.flag("--classes-per-task", "classes_per_task", type=int),
    protocol.flag("--epochs-per-task", "epochs_per_task", type=int),
    protocol.flag("--width", "width", type=int),
    protocol.flag("--conv", "conv", choices=cbp_jax.models.CONV_IMPLS),
    protocol.flag("--no-augment", "augment", action="store_const", const=False),
    protocol.flag("--no-early-stopping", "early_stopping", action="store_const", const=False),
  ),
  describe=lambda c, _: (
    f"class-incremental {c['dataset']}: {c['tasks']} tasks x "
    f"{c['classes_per_task']} classes x {c['epochs_per_task']} epochs, "
    f"ResNet-18 width {c['width']}, methods {', '.join(c['methods'])}"
  ),
)

# The module's entry points; ``make_batched(config)`` gives the jitted ``init(keys)``
# and ``chunk(carry, index, ...)`` over all seeds, cached per config.
(make_config, run_labels, make_train, make_batched, run_experiment, parse_args, config_from_args, main) = (
  EXPERIMENT.entry_points()
)


if __name__ == "__main__":
  sys.exit(main())
