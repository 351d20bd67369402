"""Continual ImageNet experiment: data plumbing, class-pair tasks, head resets, a tiny run.

The loaders themselves are tested in tests/test_data.py; here: padding
MNIST-like images to 32x32x3, the class array, the class-pair task
construction, the head reset with its momentum, the evaluation, and one tiny
compiled run through the shared runner (synthetic images, 2 tasks).
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import continual_imagenet as ci
from experiments.data import load_dataset, shared_data_dir
from tests.resume_checks import (
  assert_interrupt_and_resume_is_bit_for_bit,
  assert_resume_after_sigkill_is_bit_for_bit,
)

FMNIST = shared_data_dir() / "fashion-mnist"
needs_fmnist = pytest.mark.skipif(
  not any((FMNIST / f).exists() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
  reason=f"Fashion-MNIST IDX files not found in {FMNIST} (tests never download data)",
)


def synthetic_data(classes=4, per_class=5, seed=0):
  """A class array whose every image is constant: 10 * class + index."""
  values = 10 * np.arange(classes)[:, None] + np.arange(per_class)[None, :]
  images = np.broadcast_to(
    values[:, :, None, None, None].astype(np.uint8), (classes, per_class, 32, 32, 3)
  ).copy()
  rng = np.random.default_rng(seed)
  images[:, :, :16] = rng.integers(0, 256, images[:, :, :16].shape, dtype=np.uint8)
  return images


# --- Images and the class array --------------------------------------------


def test_to_32x32x3_pads_centred_and_repeats_the_channel():
  rng = np.random.default_rng(0)
  img = rng.integers(1, 256, (3, 28, 28, 1), dtype=np.uint8)
  out = ci.to_32x32x3(img)
  assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[:, 2:30, 2:30, c], img[..., 0])
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(out[:, border] == 0)
  np.testing.assert_array_equal(ci.to_32x32x3(img[..., 0]), out)  # (N, H, W) works too.
  rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(ci.to_32x32x3(rgb), rgb)
  odd = ci.to_32x32x3(np.full((1, 27, 30, 1), 9, np.uint8))
  assert odd[0, 2:29, 1:31].min() == 9 and odd.sum() == 9 * 27 * 30 * 3
  for bad, message in [
    (np.zeros((1, 33, 33, 3), np.uint8), "larger"),
    (np.zeros((1, 28, 28, 1), np.float32), "uint8"),
    (np.zeros((1, 28, 28, 2), np.uint8), "1 or 3"),
  ]:
    with pytest.raises(ValueError, match=message):
      ci.to_32x32x3(bad)


def test_class_array_takes_the_first_images_of_each_class_in_order():
  labels = np.array([1, 0, 2, 1, 0, 2, 0, 1, 2, 0])
  images = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None], (10, 28, 28, 1))
  arr = ci.class_array(images, labels, 3, 3)
  assert arr.shape == (3, 3, 32, 32, 3)
  for c in range(3):
    np.testing.assert_array_equal(arr[c, :, 16, 16, 0], np.flatnonzero(labels == c)[:3])
  with pytest.raises(ValueError, match="class 1 has 3 images, 4 are needed"):
    ci.class_array(images, labels, 4, 3)


@needs_fmnist
def test_fashion_mnist_class_array_matches_the_idx_files_and_caches(tmp_path):
  config = ci.make_config(dataset="fashion_mnist", train_per_class=6, test_per_class=2, batch_size=4)
  arr = ci.load_class_array(config)
  ds = load_dataset("fashion_mnist", "train", source="local")
  assert arr.shape == (10, 8, 32, 32, 3)
  for c in range(10):
    idx = np.flatnonzero(ds.labels == c)[:8]
    for ch in range(3):
      np.testing.assert_array_equal(arr[c, :, 2:30, 2:30, ch], ds.images[idx, ..., 0])
  cache = tmp_path / "classes.npy"
  np.testing.assert_array_equal(ci.load_class_array(config, cache=cache), arr)  # Written...
  np.save(cache, np.full((10, 9, 32, 32, 3), 7, np.uint8))
  np.testing.assert_array_equal(ci.load_class_array(config, cache=cache), 7)  # ...then read.
  np.save(cache, np.zeros((10, 5, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="class array"):
    ci.load_class_array(config, cache=cache)


# --- Tasks -----------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [10, 7])
def test_tasks_walk_random_permutations_in_pairs(num_classes):
  config = ci.make_config()
  key = ci.seed_key(config, 0)
  pairs_per_pass = num_classes // 2
  passes = [
    np.stack(
      [np.asarray(ci.task_classes(key, p * pairs_per_pass + i, num_classes)) for i in range(pairs_per_pass)]
    )
    for p in range(3)
  ]
  for pairs in passes:
    used = pairs.reshape(-1)
    assert len(set(used.tolist())) == 2 * pairs_per_pass  # Every class at most once a pass.
    assert used.min() >= 0 and used.max() < num_classes
  assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])
  traced = jax.jit(lambda t: ci.task_classes(key, t, num_classes))(jnp.int32(pairs_per_pass + 1))
  np.testing.assert_array_equal(traced, passes[1][1])
  other = np.asarray(ci.task_classes(ci.seed_key(config, 1), 0, num_classes))
  assert not np.array_equal(other, passes[0][0]) or not np.array_equal(
    np.asarray(ci.task_classes(ci.seed_key(config, 1), 1, num_classes)), passes[0][1]
  )


def test_task_data_are_the_two_classes_images_with_labels_0_and_1():
  config = ci.make_config(train_per_class=3, test_per_class=2, batch_size=3)
  images = synthetic_data(classes=4, per_class=5)
  data = {"images": jnp.asarray(images)}
  train_x, train_y, test_x, test_y = ci.task_data(config, data, jnp.array([2, 0]))
  np.testing.assert_array_equal(train_x, np.concatenate([images[2, :3], images[0, :3]]))
  np.testing.assert_array_equal(test_x, np.concatenate([images[2, 3:5], images[0, 3:5]]))
  np.testing.assert_array_equal(train_y, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(test_y, [0, 0, 1, 1])
  key = ci.seed_key(config, 0)
  orders = [np.asarray(ci.epoch_order(key, 3, e, 600)) for e in range(2)]
  for o in orders:
    np.testing.assert_array_equal(np.sort(o), np.arange(600))
  assert not np.array_equal(orders[0], orders[1])
  np.testing.assert_allclose(ci.to_float(jnp.array([0, 51, 255], jnp.uint8)), [0.0, 0.2, 1.0], rtol=1e-6)


# --- Learners --------------------------------------------------------------


def traces(opt_state):
  """{path: array} of every momentum trace leaf in an optimizer state."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "trace" in names:
      out["/".join(names)] = np.asarray(leaf)
  return out


def test_config_schema_old_shapes_and_flags():
  c = ci.make_config()
  assert all(c["hparams"][m]["momentum"] == 0.9 for m in ci.METHODS)
  with pytest.warns(DeprecationWarning) as record:
    old = ci.make_config(step_size={"bp": 0.02, "cbp": 0.03}, momentum=0.5, cbp={"replacement_rate": 1e-3})
  assert {"'hparams.METHOD.momentum'", "'hparams.cbp'"} <= {str(w.message).split("use ")[-1] for w in record}
  assert old == ci.make_config(
    hparams={
      **{m: {"momentum": 0.5} for m in ci.METHODS},
      "bp": {"step_size": 0.02, "momentum": 0.5},
      "cbp": {"step_size": 0.03, "momentum": 0.5, "replacement_rate": 1e-3},
    }
  )
  with pytest.raises(ValueError, match="no sweeps"):
    ci.make_config(sweep={"bp": {"step_size": [0.1, 0.2]}})
  with pytest.raises(ValueError, match="hparams.l2.momentum must be in"):
    ci.make_config(hparams={"l2": {"momentum": 1.0}})
  args = ci.parse_args(
    ["--reduced", "--step-size", "0.05", "--cbp-rate", "1e-2", "--set", "cbp.reset_optimizer=false"]
  )
  c = ci.config_from_args(args)
  assert {c["hparams"][m]["step_size"] for m in ci.METHODS} == {0.05}
  assert c["hparams"]["cbp"]["replacement_rate"] == 1e-2 and c["hparams"]["cbp"]["reset_optimizer"] is False
  assert c["hparams"]["cbp"]["maturity_threshold"] == 20 and c["dataset"] == "mnist"


@pytest.mark.parametrize("method", ci.METHODS)
@pytest.mark.parametrize("head_reset", ci.HEAD_RESETS)
def test_head_reset_resets_the_head_and_only_its_momentum(method, head_reset):
  config = ci.make_config(head_reset=head_reset)
  m = ci.Learner(config, method, ci.METHODS.index(method))
  key = ci.seed_key(config, 0)
  params, opt_state = m.init(key)
  ones = jax.tree.map(jnp.ones_like, params)
  inner = m.inner()
  # Give every parameter a momentum trace.
  if method == "cbp":
    opt_state = opt_state._replace(inner_state=inner.update(ones, opt_state.inner_state, params)[1])
  elif method == "snp":
    opt_state = (inner.update(ones, opt_state[0], params)[1],) + tuple(opt_state[1:])
  else:
    opt_state = inner.update(ones, opt_state, params)[1]
  before = traces(opt_state)
  assert before and all(np.all(v != 0) for v in before.values())
  new_params, new_state = m.reset_head((params, opt_state), key, jnp.int32(3))
  head = new_params[ci.HEAD]
  if head_reset == "zero":
    assert np.all(np.asarray(head["kernel"]) == 0) and np.all(np.asarray(head["bias"]) == 0)
  else:
    bound = np.sqrt(1 / 128)  # The head's "default" distribution, U(+-sqrt(1 / fan_in)).
    assert np.all(np.abs(np.asarray(head["kernel"])) <= bound)
    assert not np.array_equal(head["kernel"], params[ci.HEAD]["kernel"])
    other, _ = m.reset_head((params, opt_state), key, jnp.int32(4))
    assert not np.array_equal(other[ci.HEAD]["kernel"], head["kernel"])
  for name in ci.HIDDEN:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(new_params[name][leaf], params[name][leaf])
  after = traces(new_state)
  assert after.keys() == before.keys()
  for path, value in after.items():
    if f"/{ci.HEAD}/" in f"/{path}/":
      assert np.all(value == 0), path
    else:
      np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_evaluation_counts_and_dead_units():
  config = ci.make_config()
  m = ci.Learner(config, "cbp", 3)
  key = ci.seed_key(config, 0)
  params, opt_state = m.init(key)
  # A head that always says 1.
  params = {**params, ci.HEAD: {"kernel": jnp.zeros((128, 2)), "bias": jnp.array([0.0, 1.0])}}
  x = jax.random.uniform(jax.random.key(5), (6, 32, 32, 3))
  y = jnp.array([0, 1, 1, 1, 0, 1])
  out = jax.jit(m.evaluate)((params, opt_state), x, y)
  assert float(out["accuracy"]) == pytest.approx(4 / 6)
  _, acts = jax.jit(m.apply)(params, x)
  dead = sum(
    int(np.sum(~np.any(np.asarray(acts[n]) > 0, axis=(0, 1, 2) if acts[n].ndim == 4 else 0)))
    for n in ci.HIDDEN
  )
  total = sum(acts[n].shape[-1] for n in ci.HIDDEN)
  assert float(out["dead_fraction"]) == pytest.approx(dead / total)
  assert float(out["replaced_units"]) == 0.0


# --- A whole (tiny) run -------------------------------------------------------


# The tiny run the run tests share (compiled once: `make_batched` caches it).
TINY_RUN = dict(
  dataset="fashion_mnist",
  tasks=2,
  epochs_per_task=2,
  train_per_class=50,
  test_per_class=10,
  tasks_per_chunk=1,
  methods=["bp", "cbp"],
  hparams={"cbp": {"replacement_rate": 0.05, "maturity_threshold": 0}},
)


def test_tiny_run_through_the_runner(tmp_path):
  config = ci.make_config(TINY_RUN)
  data = {"images": jnp.asarray(synthetic_data(classes=4, per_class=60))}
  result = ci.run_experiment(config, data=data, out_dir=tmp_path, progress=False)
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["status"] == "complete" and res["x"] == [1.0, 2.0] and list(res["metrics"]) == ["bp", "cbp"]
  for method, named in res["metrics"].items():
    for name in ("accuracy", "train_accuracy", "dead_fraction", "effective_rank", "weight_magnitude"):
      values = np.asarray(named[name])
      assert values.shape == (1, 2) and np.all(np.isfinite(values)), (method, name)
    assert all(0 <= a <= 1 for a in named["accuracy"][0])
  # CBP replaced units (maturity 0), cumulatively.
  replaced = res["metrics"]["cbp"]["replaced_units"][0]
  assert 0 < replaced[0] < replaced[1]
  assert (tmp_path / "cimagenet.png").stat().st_size > 0
  # 2 epochs of one 100-image step: one point per task, accuracies are multiples of 1/100 and 1/20.
  for a in res["metrics"]["bp"]["train_accuracy"][0]:
    assert abs(a * 100 - round(a * 100)) < 1e-4
  for a in res["metrics"]["bp"]["accuracy"][0]:
    assert abs(a * 20 - round(a * 20)) < 1e-4
  assert "bp" in ci.format_summary(result.results)
  # make_train is the pure whole-run program (shapes only: no second compile).
  shapes = jax.eval_shape(jax.vmap(ci.make_train(config, data)), ci.seed_keys(config))
  assert shapes["cbp"]["replaced_units"].shape == (1, 2)


def test_interrupt_and_resume_is_bit_identical(tmp_path):
  """Stopped after its first task (chunk) and resumed from the checkpoint: the same
  results file and final carry as the uninterrupted run."""
  data = {"images": jnp.asarray(synthetic_data(classes=4, per_class=60))}
  assert_interrupt_and_resume_is_bit_for_bit(
    functools.partial(ci.run_experiment, ci.make_config(TINY_RUN), data=data, plot=False, progress=False),
    tmp_path,
  )


@pytest.mark.slow
@needs_fmnist
def test_cli_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """SIGKILL the CLI (Fashion-MNIST pairs, full-size ConvNet) after its first
  checkpoint, then --resume: the uninterrupted run's results file, byte for byte."""
  args = [
    "--dataset",
    "fashion_mnist",
    "--tasks",
    "4",
    "--epochs-per-task",
    "1",
    "--methods",
    "bp,cbp",
    "--cbp-maturity",
    "0",
    "--no-plot",
  ]
  assert_resume_after_sigkill_is_bit_for_bit(
    [sys.executable, "-m", "experiments.continual_imagenet"] + args, tmp_path
  )
