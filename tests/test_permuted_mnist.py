"""Online permuted MNIST experiment: tasks, online accuracy, resume, determinism.

Tiny configurations only (width 16, a few hundred examples per task) on the
real MNIST training set in ../shared/data/mnist (skipped if it is absent;
nothing is ever downloaded).
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import permuted_mnist as pm
from experiments import runner
from experiments.data import shared_data_dir
from tests.resume_checks import (
  assert_interrupt_and_resume_is_bit_for_bit,
  assert_resume_after_sigkill_is_bit_for_bit,
)

MNIST = shared_data_dir() / "mnist"

pytestmark = pytest.mark.skipif(
  not (MNIST / "train-images-idx3-ubyte.gz").exists() and not (MNIST / "train-images-idx3-ubyte").exists(),
  reason=f"MNIST IDX files not found in {MNIST} (tests never download data)",
)

TINY = dict(width=16, tasks=3, examples_per_task=100, tasks_per_chunk=1, probe_size=100)
# The one configuration the run tests share (compiled once, `make_batched` caches
# it): BP frozen (step size 0) and learning (0.5), and CBP at a high rate and low
# maturity, so that units are replaced within 3 tasks of 100 examples.
CONFIG = dict(
  TINY,
  methods=["bp", "cbp"],
  seeds=2,
  sweep={"bp": {"step_size": [0.0, 0.5]}},
  hparams={"cbp": {"step_size": 0.01, "replacement_rate": 1e-2, "maturity_threshold": 20}},
)


@pytest.fixture(scope="module")
def data():
  return pm.load_data(pm.make_config())


@pytest.fixture(scope="module")
def images(data):
  return np.asarray(data["images"]), np.asarray(data["labels"])


def test_tasks_are_the_images_gathered_by_their_permutation(data, images):
  imgs, labels = images
  config = pm.make_config(TINY)
  key = pm.seed_key(config, 0)
  positions = jnp.arange(300)
  seen = []
  for task in range(3):
    perm = np.asarray(pm.task_permutation(key, task))
    order = np.asarray(pm.task_order(key, task, imgs.shape[0]))
    np.testing.assert_array_equal(np.sort(perm), np.arange(784))
    np.testing.assert_array_equal(np.sort(order), np.arange(imgs.shape[0]))
    x, y = pm.task_examples(config, data, key, task, positions)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == np.float32 and x.shape == (300, 784)
    np.testing.assert_array_equal(x, imgs[order[:300]][:, perm].astype(np.float32) * pm.PIXEL_SCALE)
    np.testing.assert_array_equal(y, labels[order[:300]])
    seen.append((perm, order, x))
  for (p0, o0, _), (p1, o1, _) in [(seen[0], seen[1]), (seen[1], seen[2])]:
    assert not np.array_equal(p0, p1) and not np.array_equal(o0, o1)
  # The same image under two tasks' permutations: same pixels, other places.
  img = imgs[123].astype(np.float32) * pm.PIXEL_SCALE
  a, b = img[seen[0][0]], img[seen[1][0]]
  assert not np.array_equal(a, b) and np.array_equal(np.sort(a), np.sort(b))
  # Positions past the data set wrap around to the start of the task's order.
  n = imgs.shape[0]
  xw, yw = pm.task_examples(config, data, key, 0, jnp.array([n, n + 1]))
  np.testing.assert_array_equal(np.asarray(xw), seen[0][2][:2])
  # Other seeds see other tasks.
  assert not np.array_equal(np.asarray(pm.task_permutation(pm.seed_key(config, 1), 0)), seen[0][0])


def test_online_accuracy_counts_predictions_before_each_step(data, images):
  """Online accuracy, checked two ways on the first 2 tasks of `CONFIG`.

  * By hand: seed 0's head is set to always predict class 3; at step size 0
    the network never changes, so a task's accuracy is the fraction of 3s
    among its labels.
  * By re-computation: for every seed and BP step size (0 and 0.5), an
    independent loop of SGD steps over `task_examples` counts the examples
    the network classifies correctly *before* the step on them; the
    experiment's accuracy is that count / examples (not the count after).
  """
  imgs, labels = images
  config = pm.make_config(CONFIG)
  n = config["examples_per_task"]
  lrs = config["sweep"]["bp"]["step_size"]
  init, chunk = pm.make_batched(config)
  keys = pm.seed_keys(config)
  carry = init(keys)
  params, opt_state = carry["learners"]["bp"]  # Leaves (seeds, step sizes, ...).
  head = params["Dense_3"]
  constant = {
    "kernel": head["kernel"].at[0].set(0.0),
    "bias": head["bias"].at[0].set(jnp.zeros(10).at[3].set(1.0)),
  }
  params = {**params, "Dense_3": constant}
  carry = {**carry, "learners": {**carry["learners"], "bp": (params, opt_state)}}
  accs = []
  for task in range(2):  # One task per chunk.
    carry, metrics = chunk(carry, jnp.asarray(task, jnp.int32), data)
    labels_bp = [k for k in metrics if k.startswith("bp")]
    assert labels_bp == [f"bp@{lr:g}" for lr in lrs]  # One run label per step size.
    accs.append(np.stack([np.asarray(metrics[k]["accuracy"])[:, 0] for k in labels_bp], axis=1))
  acc = np.stack(accs, axis=-1)
  assert acc.shape == (2, 2, 2)  # (seeds, step sizes, tasks)

  for task in range(2):
    order = np.asarray(pm.task_order(keys[0], task, imgs.shape[0]))
    threes = int(np.sum(labels[order[:n]] == 3))
    assert 0 < threes < n
    np.testing.assert_allclose(acc[0, 0, task], threes / n, rtol=1e-6)

  model = pm.make_model(config)

  @jax.jit
  def step(p, x, y, lr):
    def loss(p):
      logits = model.apply({"params": p}, x[None])
      return -jax.nn.log_softmax(logits)[0, y], jnp.argmax(logits[0]) == y

    (_, ok), g = jax.value_and_grad(loss, has_aux=True)(p)
    new = jax.tree.map(lambda a, b: a - lr * b, p, g)
    after = jnp.argmax(model.apply({"params": new}, x[None])[0]) == y
    return new, ok, after

  differs = []
  for s in range(2):
    for v, lr in enumerate(lrs):
      p = jax.tree.map(lambda a: a[s, v], params)
      for task in range(2):
        xs, ys = (np.asarray(a) for a in pm.task_examples(config, data, keys[s], task))
        before = after = 0
        for x, y in zip(xs, ys):
          p, ok, ok_after = step(p, x, y, lr)
          before, after = before + int(ok), after + int(ok_after)
        assert round(float(acc[s, v, task]) * n) == before, (s, lr, task)
        np.testing.assert_allclose(acc[s, v, task], before / n, rtol=1e-6)
        if lr > 0:
          differs.append(after != before)
  assert any(differs)  # The check tells "before" from "after".


def test_resume_after_interruption_is_bit_for_bit(tmp_path, data):
  config = pm.make_config(CONFIG)
  full, _, ckpt = assert_interrupt_and_resume_is_bit_for_bit(
    functools.partial(pm.run_experiment, config, data=data, plot=False, progress=False), tmp_path
  )
  assert full.status == "complete"
  assert np.all(full.metrics["cbp"]["replaced_units"][:, -1] > 0)
  # Another config refuses to resume from these checkpoints.
  with pytest.raises(runner.ConfigMismatchError, match="width"):
    pm.run_experiment(
      {**config, "width": 8},
      data=data,
      out_dir=tmp_path / "other",
      checkpoint_dir=ckpt,
      resume=True,
      plot=False,
      progress=False,
    )


def test_runs_are_deterministic_and_seeds_differ(tmp_path, data):
  config = pm.make_config(CONFIG)
  a = pm.run_experiment(config, data=data, out_dir=tmp_path / "a", plot=True, progress=False)
  pm.run_experiment(config, data=data, out_dir=tmp_path / "b", plot=False, progress=False)
  assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
  assert (tmp_path / "a" / "pmnist.png").stat().st_size > 0
  acc = a.metrics["cbp"]["accuracy"]
  assert acc.shape == (2, 3) and np.all((acc > 0) & (acc <= 1))
  assert not np.array_equal(acc[0], acc[1])
  assert list(a.results["runs"]) == ["bp@0", "bp@0.5", "cbp"]
  assert a.results["x"] == [1.0, 2.0, 3.0] and a.results["x_label"] == "task"
  for name in ("dead_fraction", "effective_rank", "weight_magnitude", "effective_rank/Dense_2"):
    assert np.all(np.isfinite(a.metrics["cbp"][name]))
  text = pm.format_summary(a.results)
  assert "bp@0.5" in text and "cbp" in text


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of batch_size"):
    pm.make_config(examples_per_task=10, batch_size=3)
  with pytest.raises(ValueError, match="multiple of tasks_per_chunk"):
    pm.make_config(tasks=5, tasks_per_chunk=2)
  with pytest.raises(ValueError, match="unknown method"):
    pm.make_config(methods=["bp", "sgd"])
  with pytest.raises(ValueError, match="unknown config entry"):
    pm.make_config(hidden=3)
  reduced = pm.config_from_args(pm.parse_args(["--reduced"]))
  assert reduced["width"] == 100 and reduced["hparams"]["cbp"]["replacement_rate"] == 1e-4
  assert reduced["hparams"]["cbp"]["maturity_threshold"] == 100
  paper = pm.config_from_args(pm.parse_args(["--paper"]))
  assert (paper["width"], paper["depth"], paper["batch_size"]) == (2000, 3, 1)
  assert (paper["tasks"], paper["examples_per_task"]) == (800, 60_000)
  assert paper["hparams"]["bp"]["step_size"] == 0.003
  assert paper["hparams"]["cbp"]["maturity_threshold"] == 100
  swept = pm.config_from_args(pm.parse_args(["--step-size", "0.1,0.2", "--methods", "bp,adam"]))
  assert swept["sweep"]["bp"] == {"step_size": [0.1, 0.2]} and "adam" not in swept["sweep"]
  assert list(pm.run_labels(swept)) == ["bp@0.1", "bp@0.2", "adam"]
  with pytest.raises(ValueError, match="cbp sweeps only step_size"):
    pm.make_config(sweep={"cbp": {"replacement_rate": [1e-3, 1e-4]}})


def test_old_config_shapes_convert_with_a_deprecation_warning():
  with pytest.warns(DeprecationWarning) as record:
    old = pm.make_config(
      TINY,
      methods=["bp", "cbp"],
      seeds=2,
      step_sizes={"bp": [0.0, 0.5], "cbp": [0.01]},
      cbp={"replacement_rate": 1e-2, "maturity_threshold": 20},
    )
  assert any("use 'hparams.cbp'" in str(w.message) for w in record)
  assert old == pm.make_config(CONFIG)


@pytest.mark.slow
def test_cli_resume_after_sigkill_is_bit_for_bit(tmp_path):
  """The real thing: SIGKILL the CLI after its first checkpoint, then --resume."""
  args = [
    "--width",
    "16",
    "--tasks",
    "6",
    "--examples-per-task",
    "3000",
    "--probe-size",
    "100",
    "--methods",
    "bp,cbp",
    "--seeds",
    "2",
    "--cbp-rate",
    "1e-3",
    "--no-plot",
  ]
  assert_resume_after_sigkill_is_bit_for_bit(
    [sys.executable, "-m", "experiments.permuted_mnist"] + args, tmp_path
  )
