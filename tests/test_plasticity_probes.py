"""The plasticity probes permuted MNIST and continual ImageNet record at each task's end
(`experiments.plasticity_probes`), checked against direct calls of `cbp_jax.metrics` on a network whose
parameters are known: BP at step size 0 never leaves its initial parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import metrics as M
from experiments import continual_imagenet as ci
from experiments import permuted_mnist as pm
from experiments import plasticity_probes as pp
from tests.test_continual_imagenet import TINY_RUN, synthetic_data
from tests.test_permuted_mnist import CONFIG, pytestmark  # noqa: F401  (skips without MNIST)

PROBE_NAMES = {
  "trainability",
  "trainability_loss",
  "trainability_fresh_init",
  "trainability_loss_fresh_init",
  "hessian_top_eigenvalue",
  "drift",
  "output_churn",
  "prediction_churn",
}


@pytest.fixture(scope="module")
def data():
  return pm.load_data(pm.make_config())


def test_permuted_mnist_records_the_probes_at_each_task_and_they_match_direct_calls(data):
  config = pm.make_config(CONFIG)
  init, chunk = pm.make_batched(config)
  keys = pm.seed_keys(config)
  carry = init(keys)
  per_task = []
  for task in range(2):
    carry, metrics = chunk(carry, jnp.asarray(task, jnp.int32), data)
    per_task.append(jax.tree.map(np.asarray, metrics))
  for label in ("bp@0", "bp@0.5", "cbp"):
    names = set(per_task[0][label])
    assert PROBE_NAMES | {"drift/Dense_0", "drift/Dense_3", "linearised_fraction/Dense_2"} <= names
    for name in names:
      assert np.all(np.isfinite(per_task[1][label][name])), (label, name)

  # BP at step size 0 is the initial network at every probe point: no drift, no churn, and its trainability and
  # curvature are those of the initial parameters on the task's probe set.
  frozen = per_task[1]["bp@0"]
  assert np.all(frozen["drift"] == 0) and np.all(frozen["output_churn"] == 0)
  assert np.all(frozen["prediction_churn"] == 0)
  assert np.all(per_task[1]["bp@0.5"]["drift"] > 0) and np.all(per_task[1]["bp@0.5"]["output_churn"] > 0)
  probes = dict(config["probes"], size=min(config["probes"]["size"], config["probe_size"]))
  model = pm.make_model(config)
  logits = lambda p, x: model.apply({"params": p}, x)
  loss = pp.cross_entropy(logits)
  task = 1
  for s in range(1):  # Seed 0 (the others are the same program).
    params = model.init(jax.random.fold_in(keys[s], 1), jnp.zeros((1, 784)))["params"]
    probe_key = jax.random.fold_in(jax.random.fold_in(keys[s], 4), task)
    x, y = pm.task_examples(config, data, keys[s], task, jnp.arange(config["probe_size"]))
    n = probes["size"]
    labels = jax.random.randint(jax.random.fold_in(probe_key, 0), (n,), 0, 10)
    direct = M.trainability_probe(
      loss, params, x[:n], labels, optax.sgd(probes["trainability_step_size"]), probes["trainability_steps"]
    )
    assert frozen["trainability"][s, 0] == pytest.approx(float(direct["loss_reduction"]), rel=1e-4, abs=1e-6)
    eig = M.top_hessian_eigenvalue(
      lambda p: loss(p, x[:n], y[:n]), params, jax.random.fold_in(probe_key, 2), probes["hessian_iterations"]
    )
    assert frozen["hessian_top_eigenvalue"][s, 0] == pytest.approx(float(eig), rel=1e-3)
    fresh = model.init(jax.random.fold_in(probe_key, 1), jnp.zeros((1, 784)))["params"]
    ref = M.trainability_probe(
      loss, fresh, x[:n], labels, optax.sgd(probes["trainability_step_size"]), probes["trainability_steps"]
    )
    assert per_task[1]["cbp"]["trainability_fresh_init"][s, 0] == pytest.approx(
      float(ref["loss_reduction"]), rel=1e-4, abs=1e-6
    )
    assert per_task[1]["cbp"]["trainability_loss_fresh_init"][s, 0] == pytest.approx(
      float(ref["loss_after"]), rel=1e-4
    )
  # The held-out inputs are fixed for the run and are not any task's inputs.
  heldout = np.asarray(pm.heldout_examples(config, data, keys[0]))
  assert heldout.shape == (config["probes"]["heldout_size"], 784)
  np.testing.assert_array_equal(heldout, np.asarray(pm.heldout_examples(config, data, keys[0])))


def test_no_probes_records_none_and_carries_nothing(data):
  config = pm.make_config(CONFIG, probes={"enabled": False})
  init, chunk = pm.make_batched(config)
  carry = init(pm.seed_keys(config))
  assert "heldout" not in carry
  _, metrics = jax.eval_shape(chunk, carry, jnp.asarray(0, jnp.int32), data)  # traced, not compiled
  assert not PROBE_NAMES & set(metrics["cbp"])
  assert "linearised_fraction" in metrics["cbp"]
  args = pm.parse_args(["--no-probes", "--probe-steps", "5"])
  assert pm.config_from_args(args)["probes"] == {
    **pp.DEFAULT_PROBES,
    "enabled": False,
    "trainability_steps": 5,
  }
  with pytest.raises(ValueError, match="trainability_step_size"):
    pm.make_config(probes={"trainability_step_size": 0})


def test_continual_imagenet_records_the_probes(tmp_path):
  config = ci.make_config(TINY_RUN)  # the run test_continual_imagenet compiles: cached in one pytest process
  data = {"images": jnp.asarray(synthetic_data(classes=4, per_class=60))}
  result = ci.run_experiment(config, data=data, out_dir=tmp_path, progress=False, plot=False)
  for method in ("bp", "cbp"):
    named = result.metrics[method]
    assert PROBE_NAMES | {"drift/Conv_0", "drift/Dense_2"} <= set(named)
    assert all(np.all(np.isfinite(v)) for v in named.values())
    assert np.all(named["drift"] > 0)
  heldout = np.asarray(ci.heldout_images(config, data))
  # Test images of the 4 classes in turn, then the next test image of each.
  n_train = config["train_per_class"]
  np.testing.assert_array_equal(
    heldout[5], np.asarray(data["images"][1, n_train + 1], np.float32) * ci.PIXEL_SCALE
  )
  assert result.results["statistics"]["cbp"]["trainability"]["final"]["iqm"] is not None
