"""The reset bisection: twins share every step before their cut, cut 0 is plain SGD, the bisection's invariant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import divergence_mechanism as dm
from experiments import permuted_mnist


def tiny():
  config = dm.make_config(
    tasks=2,
    tasks_per_chunk=1,
    examples_per_task=40,
    width=8,
    depth=2,
    seeds=2,
    hparams={"cbp": {"replacement_rate": 0.05, "maturity_threshold": 3}},
  )
  rng = np.random.default_rng(0)
  data = {
    "images": jnp.asarray(rng.integers(0, 256, (50, 784)), jnp.uint8),
    "labels": jnp.asarray(rng.integers(0, 10, 50), jnp.int32),
  }
  return config, data


def test_bisect_finds_the_adjacent_pair_around_each_seeds_threshold():
  thresholds = np.array([0, 7, 63, 99])  # A run with cut c diverges iff c > threshold.
  steps = 100

  def run_all(keys, cuts):
    loss = np.ones((len(cuts), steps))
    for s, c in enumerate(cuts):
      if c > thresholds[s]:
        loss[s, 50] = np.nan
    return {"loss": loss}

  diverging = np.array([True, True, True, False])
  lo, hi = dm.bisect(run_all, None, diverging, steps)
  np.testing.assert_array_equal(lo, [0, 7, 63, -1])
  np.testing.assert_array_equal(hi, [1, 8, 64, -1])


def test_twins_share_every_step_before_the_cut_and_cut_zero_is_plain_sgd():
  config, data = tiny()
  run = jax.jit(dm.make_run(config, data, step_size=0.1))
  key = jax.random.key(3)
  never = {k: np.asarray(v) for k, v in run(key, dm.NEVER, -1, jax.random.key(0)).items()}
  resets = np.flatnonzero(never["replaced"])
  assert len(resets) >= 2, "the tiny config must reset units"
  cut = int(resets[1])
  twin = {k: np.asarray(v) for k, v in run(key, cut, -1, jax.random.key(0)).items()}
  np.testing.assert_array_equal(twin["loss"][: cut + 1], never["loss"][: cut + 1])
  assert not np.any(twin["replaced"][cut:]) and np.all(twin["replaced"][:cut] == never["replaced"][:cut])
  assert not np.allclose(twin["loss"][cut + 1 :], never["loss"][cut + 1 :])

  # Cut 0: plain SGD on the same examples, computed here without cbp.
  bp = np.asarray(run(key, 0, -1, jax.random.key(0))["loss"])
  model = permuted_mnist.make_model(config)
  params = model.init(jax.random.fold_in(key, 1), jnp.zeros((1, 784)))["params"]
  losses = []
  steps = config["examples_per_task"]
  for task in range(config["tasks"]):
    perm = permuted_mnist.task_permutation(key, task)
    order = permuted_mnist.task_order(key, task, 50)
    for t in range(steps):
      x, y = permuted_mnist.gather_examples(data, perm, order, t + jnp.arange(1))

      def loss_fn(p, x=x, y=y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y))

      loss, g = jax.value_and_grad(loss_fn)(params)
      losses.append(float(loss))
      params = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
  np.testing.assert_allclose(bp, losses, rtol=1e-5, atol=1e-6)


def test_a_kick_replaces_the_reset_by_a_change_of_its_size():
  config, data = tiny()
  run = jax.jit(dm.make_run(config, data, step_size=0.1))
  key = jax.random.key(3)
  never = {k: np.asarray(v) for k, v in run(key, dm.NEVER, -1, jax.random.key(0)).items()}
  t = int(np.flatnonzero(never["replaced"])[0])
  kicked = {k: np.asarray(v) for k, v in run(key, dm.NEVER, t, jax.random.key(0)).items()}
  np.testing.assert_array_equal(kicked["loss"][: t + 1], never["loss"][: t + 1])
  np.testing.assert_allclose(kicked["change"][t], never["change"][t], rtol=1e-6)
  assert kicked["loss"][t + 1] != never["loss"][t + 1]
