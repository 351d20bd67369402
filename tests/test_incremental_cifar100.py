"""Class-incremental CIFAR-100 experiment on tiny configurations.

Data plumbing (validation/training split, class-rank order), the step-size
schedule, augmentation, the masked loss over seen classes, head/full resets,
CBP's BatchNorm reset inside the training step, the probe metrics against
NumPy, and one tiny compiled run checking early stopping. Networks are ResNets
of width 2 with one block per stage on synthetic images (nothing downloaded).
"""

import functools
import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbp_jax
from experiments import incremental_cifar100 as ic
from experiments.data import shared_data_dir
from tests.resume_checks import (
  assert_interrupt_and_resume_is_bit_for_bit,
  assert_resume_after_sigkill_is_bit_for_bit,
)

TINY = dict(
  dataset="fashion_mnist",
  classes_per_task=2,
  tasks=2,
  epochs_per_task=3,
  batch_size=10,
  eval_batch_size=10,
  train_per_class=5,
  val_per_class=3,
  test_per_class=4,
  width=2,
  stage_sizes=[1, 1],
  probe_size=10,
  augment=False,
)


class Split(NamedTuple):
  images: np.ndarray
  labels: np.ndarray


def synthetic_split(classes, per_class, seed):
  """Classes interleaved (0, 1, ..., 0, 1, ...); pixel [0, 0, 0] of the k-th image of class c is 20 c + k."""
  rng = np.random.default_rng(seed)
  labels = np.tile(np.arange(classes), per_class)
  index = np.repeat(np.arange(per_class), classes)
  images = rng.integers(0, 256, (labels.size, 28, 28, 1), dtype=np.uint8)
  images[:, 0, 0, 0] = (20 * labels + index) % 256
  return Split(images, labels)


def tiny_data(config, seed=0):
  train = synthetic_split(10, config["val_per_class"] + config["train_per_class"] + 2, seed)
  test = synthetic_split(10, config["test_per_class"] + 1, seed + 1)
  return ic.build_data(config, train, test)


# --- Data ------------------------------------------------------------------


def test_validation_comes_first_then_training_then_test_in_class_rank_order():
  config = ic.make_config(TINY)
  host = tiny_data(config)
  tr, te = host["train"], host["test"]
  assert tr.shape == (10, 8, 32, 32, 3) and te.shape == (10, 4, 32, 32, 3)
  # Padded by 2: pixel [0, 0] of the original sits at [2, 2].
  np.testing.assert_array_equal(tr[:, :, 2, 2, 0], 20 * np.arange(10)[:, None] + np.arange(8))
  np.testing.assert_array_equal(te[:, :, 2, 2, 0], 20 * np.arange(10)[:, None] + np.arange(4))
  pixels = tr[:, 3:].reshape(-1, 3).astype(np.float64) / 255  # Training images only.
  np.testing.assert_allclose(host["mean"], pixels.mean(0), rtol=1e-5)
  np.testing.assert_allclose(host["std"], pixels.std(0), rtol=1e-5)
  data = jax.device_put(host)
  order = ic.class_order(ic.seed_key(config, 0), 10)
  assert sorted(np.asarray(order).tolist()) == list(range(10))
  for split, offset, n in (("val", 0, 3), ("train", 3, 5), ("test", 0, 4)):
    j = jnp.arange(2 * n)
    images, labels = ic.gather(config, data, order, split, j)
    np.testing.assert_array_equal(labels, np.repeat([0, 1], n))  # Labels are class ranks.
    source = te if split == "test" else tr
    expected = np.stack([source[int(order[r]), offset + i] for r in (0, 1) for i in range(n)])
    np.testing.assert_array_equal(images, expected)
  x = ic.normalize(data, images)
  np.testing.assert_allclose(x, (expected / 255.0 - host["mean"]) / host["std"], rtol=1e-5, atol=1e-6)
  cifar = ic.make_config(TINY, dataset="cifar100", classes_per_task=5, batch_size=5)
  np.testing.assert_array_equal(
    ic.build_data(cifar, synthetic_split(100, 8, 0), synthetic_split(100, 4, 1))["mean"],
    np.float32(ic.CIFAR100_MEAN),
  )


def test_step_size_schedule_of_the_paper():
  config = ic.make_config()  # 200 epochs per task: 0.1, x0.2 at epochs 60, 120, 160.
  step_size = config["hparams"]["plain"]["step_size"]
  lrs = [
    float(ic.learning_rate(config, jnp.int32(e), step_size)) for e in (0, 59, 60, 119, 120, 159, 160, 199)
  ]
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rtol=1e-6)


def test_rotation_and_augmentation():
  rng = np.random.default_rng(0)
  img = jnp.asarray(rng.normal(size=(32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(ic.rotate(img, 0.0), img)
  # 90 degrees counter-clockwise maps the pixel grid onto itself.
  np.testing.assert_allclose(ic.rotate(img, 90.0), np.rot90(np.asarray(img), 1, axes=(0, 1)), atol=1e-6)
  corners = np.asarray(ic.rotate(img, 15.0))[[0, 0, -1, -1], [0, -1, 0, -1]]
  assert np.all(corners == 0)  # Zero fill where the rotated image does not reach.
  x = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
  augment = jax.jit(ic.augment)
  a, b = augment(jax.random.key(0), x), augment(jax.random.key(0), x)
  np.testing.assert_array_equal(a, b)
  assert a.shape == x.shape and not np.array_equal(a, augment(jax.random.key(1), x))
  const = jnp.ones((16, 32, 32, 3))  # Flip and reflect-crop keep a constant image; rotation zero-fills.
  centre = np.asarray(augment(jax.random.key(2), const))[:, 8:24, 8:24]
  np.testing.assert_array_equal(centre, 1.0)


# --- Learners --------------------------------------------------------------


def test_cbp_step_masks_unseen_classes_and_resets_batch_norm_of_replaced_units():
  config = ic.make_config(
    TINY,
    hparams={"cbp": {"weight_decay": 0.0, "momentum": 0.0, "replacement_rate": 0.5, "maturity_threshold": 0}},
  )
  learner = ic.Learner(config, "cbp", 4)
  state = learner.init(ic.seed_key(config, 0))
  x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
  y = jnp.array([0, 1, 2, 3, 0, 1])
  new, correct = jax.jit(lambda s: learner.step(s, x, y, jnp.int32(4), jnp.float32(0.1)))(state)
  head0, head1 = np.asarray(state["params"]["fc"]["kernel"]), np.asarray(new["params"]["fc"]["kernel"])
  np.testing.assert_array_equal(head1[:, 4:], head0[:, 4:])  # Unseen classes: no gradient.
  assert not np.array_equal(head1[:, :4], head0[:, :4])
  np.testing.assert_array_equal(new["params"]["fc"]["bias"][4:], 0.0)
  _, stats, _ = jax.jit(learner.forward_train)(state["params"], state["batch_stats"], x)
  masks = {k: np.asarray(v) for k, v in new["opt_state"].last_replaced.items()}
  assert all(m.sum() == m.size // 2 for m in masks.values())
  for name, mask in masks.items():
    block = name.split("/")[0]
    for stat, value in (("mean", 0.0), ("var", 1.0)):
      got = np.asarray(new["batch_stats"][block]["bn1"][stat])
      np.testing.assert_array_equal(got[mask], value)  # Replaced units: reset exactly.
      np.testing.assert_allclose(got[~mask], np.asarray(stats[block]["bn1"][stat])[~mask], rtol=1e-5)
    np.testing.assert_allclose(
      new["batch_stats"][block]["bn2"]["mean"], stats[block]["bn2"]["mean"], rtol=1e-5, atol=1e-8
    )
  assert 0 <= int(correct) <= 6


@pytest.mark.parametrize("method", ["head_reset", "full_reset", "plain"])
def test_new_task_resets(method):
  config = ic.make_config(TINY)
  learner = ic.Learner(config, method, ic.METHODS.index(method))
  key = ic.seed_key(config, 0)
  state = learner.init(key)
  ones = jax.tree.map(jnp.ones_like, state["params"])
  state["opt_state"] = learner.inner().update(ones, state["opt_state"], state["params"])[1]
  same = learner.new_task(state, key, jnp.int32(0))  # Task 0: nothing happens.
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  new = learner.new_task(state, key, jnp.int32(1))
  flat_old = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  flat_new = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(new)[0]}
  for path, old in flat_old.items():
    changed = not np.array_equal(flat_new[path], old)
    in_head = "'fc'" in path
    if method == "plain":
      assert not changed, path
    elif method == "head_reset":
      if in_head and "opt_state" in path:
        assert np.all(np.asarray(flat_new[path]) == 0), path  # Momentum of the head restarts.
      elif in_head and "kernel" in path:
        assert changed, path
      elif not in_head:
        assert not changed, path
    elif "params" in path and "kernel" in path:
      assert changed, path  # Full reset: every kernel redrawn...
    elif "opt_state" in path:
      assert np.all(np.asarray(flat_new[path]) == 0), path  # ...and the optimizer restarted.
  if method == "full_reset":
    np.testing.assert_array_equal(new["batch_stats"]["stem_bn"]["var"], 1.0)


def test_probe_metrics_against_numpy():
  config = ic.make_config(TINY, probe_size=10, eval_batch_size=5)
  host = tiny_data(config)
  data = jax.device_put(host)
  learner = ic.Learner(config, "plain", 0)
  state = learner.init(ic.seed_key(config, 0))
  order = ic.class_order(ic.seed_key(config, 0), 10)
  out = jax.jit(lambda s: ic.probe(config, data, order, learner, s, jnp.int32(4)))(state)
  predict = jax.jit(learner.predict, static_argnames="return_features")
  # The probe: 10 examples spread over the 4 classes' 20 training images.
  j = (np.arange(10) * 20) // 10
  images, _ = ic.gather(config, data, order, "train", jnp.asarray(j))
  (_, feats), col = predict(state, ic.normalize(data, images), return_features=True)
  acts = cbp_jax.collect_activations(col["activations"])
  names = ic.dormant_layer_names(config)
  dormant = sum(int(np.sum(np.mean(np.asarray(acts[n]) > 0, axis=(0, 1, 2)) < 0.01)) for n in names)
  f = np.asarray(feats, np.float64)
  last = int(np.sum(np.mean(f != 0, axis=0) < 0.01))
  units = sum(acts[n].shape[-1] for n in names) + f.shape[1]
  assert float(out["dormant_fraction"]) == pytest.approx((dormant + last) / units)
  assert float(out["dormant_fraction_last"]) == pytest.approx(last / f.shape[1])
  sv = np.linalg.svd(f, compute_uv=False)
  expected_rank = int(np.sum(np.cumsum(sv) / sv.sum() < 0.99) + 1)
  assert int(out["stable_rank"]) == expected_rank
  # Accuracy over the seen classes' test images, unseen classes masked.
  acc = jax.jit(lambda s: ic.evaluate_accuracy(config, data, order, learner, s, "test", jnp.int32(4)))(state)
  ti, tl = ic.gather(config, data, order, "test", jnp.arange(16))
  logits = np.asarray(predict(state, ic.normalize(data, ti)))
  pred = np.argmax(np.where(np.arange(10) < 4, logits, -np.inf), axis=-1)
  assert float(acc) == pytest.approx(np.mean(pred == np.asarray(tl)))


# --- A whole (tiny) run -------------------------------------------------------


# The tiny run the run tests share (compiled once: `make_batched` caches it).
TINY_RUN = dict(TINY, methods=["cbp"], hparams={"cbp": {"replacement_rate": 0.05, "maturity_threshold": 0}})


def test_tiny_run_with_early_stopping(tmp_path):
  config = ic.make_config(TINY_RUN)
  data = jax.device_put(tiny_data(config))
  result = ic.run_experiment(config, data=data, out_dir=tmp_path, progress=False)
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["status"] == "complete" and res["x"] == [2.0, 4.0]
  named = res["metrics"]["cbp"]
  for name in (
    "accuracy",
    "val_accuracy",
    "train_accuracy",
    "dormant_fraction",
    "dormant_fraction_last",
    "stable_rank",
    "effective_rank",
    "weight_magnitude",
    "replaced_units",
  ):
    assert np.asarray(named[name]).shape == (1, 2) and np.all(np.isfinite(named[name])), name
  assert named["replaced_units"][0][1] > 0
  assert (tmp_path / "icifar.png").stat().st_size > 0
  # Early stopping: the network left after the last task is the best-validation one,
  # and the reported test accuracy is that network's.
  state = jax.tree.map(lambda a: a[0], result.carry["learners"]["cbp"])
  order = ic.class_order(ic.seed_keys(config)[0], 10)
  learner = ic.Learner(config, "cbp", 0)
  evaluate = jax.jit(
    lambda s: [
      ic.evaluate_accuracy(config, data, order, learner, s, split, jnp.int32(4)) for split in ("val", "test")
    ]
  )
  val, test = evaluate(state)
  assert float(val) == pytest.approx(named["val_accuracy"][0][1])
  assert float(test) == pytest.approx(named["accuracy"][0][1])
  assert "cbp" in ic.format_summary(result.results)
  shapes = jax.eval_shape(jax.vmap(ic.make_train(config, data)), ic.seed_keys(config))
  assert shapes["cbp"]["stable_rank"].shape == (1, 2)


def test_interrupt_and_resume_is_bit_identical(tmp_path):
  """Stopped after its first task (chunk) and resumed from the checkpoint: the same
  results file and final carry (best-epoch states included) as the uninterrupted run."""
  config = ic.make_config(TINY_RUN)
  assert_interrupt_and_resume_is_bit_for_bit(
    functools.partial(
      ic.run_experiment, config, data=jax.device_put(tiny_data(config)), plot=False, progress=False
    ),
    tmp_path,
  )


FMNIST = shared_data_dir() / "fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(
  not any((FMNIST / f).exists() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
  reason=f"Fashion-MNIST IDX files not found in {FMNIST} (tests never download data)",
)
def test_cli_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """SIGKILL the CLI (--tiny: class-incremental Fashion-MNIST, width-4 ResNet-18) after
  its first checkpoint, then --resume: the uninterrupted run's results, byte for byte."""
  args = ["--tiny", "--tasks", "3", "--epochs-per-task", "1", "--methods", "plain,cbp", "--no-plot"]
  assert_resume_after_sigkill_is_bit_for_bit(
    [sys.executable, "-m", "experiments.incremental_cifar100"] + args, tmp_path
  )


def test_reduced_preset_is_a_valid_fashion_mnist_config():
  """--reduced (the CPU stand-in) builds a valid config; not a run of it."""
  config = ic.make_config(ic.REDUCED_OVERRIDES)
  assert config["dataset"] == "fashion_mnist"
  assert config["classes_per_task"] * config["tasks"] == ic.num_classes_of(config["dataset"])
  assert config["methods"] == list(ic.METHODS)
  # Nested entries merge with the defaults.
  assert config["hparams"]["cbp"]["utility"] == "contribution"
  assert config["hparams"]["cbp"]["replacement_rate"] == 1e-3
  with pytest.warns(DeprecationWarning) as record:  # The old shape: shared SGD settings.
    old = ic.make_config(ic.REDUCED_OVERRIDES, step_size=0.05, weight_decay=0.0)
  assert any("hparams.METHOD.step_size" in str(w.message) for w in record)
  assert {(hp["step_size"], hp["weight_decay"]) for hp in old["hparams"].values()} == {(0.05, 0.0)}
  args = ic.parse_args(["--reduced", "--epochs-per-task", "3"])
  assert ic.config_from_args(args) == ic.make_config(ic.REDUCED_OVERRIDES, epochs_per_task=3)
  assert ic.config_from_args(ic.parse_args(["--reduced"])) == config
  with pytest.raises(SystemExit):  # --tiny and --reduced are exclusive.
    ic.parse_args(["--tiny", "--reduced"])
