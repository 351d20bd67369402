"""`cbp_jax/utility.py`: running statistics and the utility types (Semantics page, steps 1-5), against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from tests.cbp_steps import batches, conv_graph_params, make_step, mlp
from tests.numpy_reference import NumpyUnitStats, consumer_rows


@pytest.mark.parametrize("kind", [u for u in cbp_jax.utility.UTILITIES if u != "random"])
def test_utilities_match_numpy_over_several_steps(kind):
  model, params = mlp()
  # Maturity beyond the run: statistics evolve, nothing is replaced.
  tx = optax.chain(
    optax.sgd(0.05),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, utility=kind, decay_rate=0.9, maturity_threshold=1000
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  refs = {"Dense_0": NumpyUnitStats(6, 0.9), "Dense_1": NumpyUnitStats(5, 0.9)}
  consumer = {"Dense_0": "Dense_1", "Dense_1": "Dense_2"}
  for x, y in batches(6):
    params, state, _, acts = step(params, state, x, y)
    stats = cbp_jax.unit_stats(state)
    for name, ref in refs.items():
      # Statistics use the post-step weights, i.e. the params just returned.
      w_out = consumer_rows(params[consumer[name]]["kernel"], ref.utility.size)
      expected_u, expected_f = ref.step(np.asarray(acts[name]), params[name]["kernel"], [w_out], kind)
      np.testing.assert_allclose(stats[name]["utility"], expected_u, rtol=2e-4, atol=1e-7)
      np.testing.assert_allclose(stats[name]["mean_activation"], expected_f, rtol=2e-4, atol=1e-7)
      np.testing.assert_array_equal(stats[name]["age"], ref.age)
      assert int(stats[name]["replaced"]) == 0


@pytest.mark.parametrize("kind", ["adaptable_contribution", "feature_by_input"])
def test_a_unit_with_zero_incoming_weights_has_zero_utility_not_nan(kind):
  """All of a unit's inputs replaced at once zero its incoming column: 0, not 0/0."""
  stats = cbp_jax.utility.init_statistics(2)
  h = jnp.asarray([[0.0, 1.0], [0.0, 3.0]])
  out_mag, in_mag = jnp.asarray([0.5, 0.5]), jnp.asarray([0.0, 0.25])
  new, corrected, _, bad = cbp_jax.utility.update_statistics(
    stats, h, out_mag, in_mag, decay=0.5, utility=kind, key=None
  )
  # Unit 1: f_hat = 2, deviation mean(|h - 2|) = 1, over in_mag 0.25 = 4 (times out_mag 0.5).
  expected = 4.0 * (0.5 if kind == "adaptable_contribution" else 1.0)
  np.testing.assert_allclose(corrected, [0.0, expected], rtol=1e-6)
  assert int(bad) == 0


def test_random_utility_is_uniform_noise_and_still_replaces():
  model, params = mlp()
  tx = optax.chain(
    optax.sgd(0.0),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, utility="random", replacement_rate=0.2, maturity_threshold=0
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  for x, y in batches(10):
    params, state, _, _ = step(params, state, x, y)
  stats = cbp_jax.unit_stats(state)
  assert int(stats["Dense_0"]["replaced"]) == math.floor(10 * 0.2 * 6 + 1e-9)


def test_conv_utilities_average_over_batch_and_space():
  model, params = conv_graph_params()
  tx = optax.chain(
    optax.sgd(0.01),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, utility="adaptable_contribution", maturity_threshold=100
    ),
  )
  state = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  y = jax.random.normal(jax.random.key(2), (4, 2))
  step = make_step(model, tx)
  refs = {"Conv_1": NumpyUnitStats(64, 0.99), "Conv_2": NumpyUnitStats(128, 0.99)}
  consumers = {"Conv_1": "Conv_2", "Conv_2": "Dense_0"}
  for _ in range(3):
    params, state, _, acts = step(params, state, x, y)
    stats = cbp_jax.unit_stats(state)
    for name, ref in refs.items():
      w_out = consumer_rows(params[consumers[name]]["kernel"], ref.utility.size)
      u, _ = ref.step(np.asarray(acts[name]), params[name]["kernel"], [w_out], "adaptable_contribution")
      np.testing.assert_allclose(stats[name]["utility"], u, rtol=5e-4, atol=1e-8)
