"""`cbp_jax/methods/_regrama.py`: ReGraMa's scores by hand, its resets, and the wrapped Adam's moments restarted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from cbp_jax import methods as M
from tests.new_methods_helpers import check_unit_reset, grads_and_acts, kill, mlp


def test_gradient_scores_by_hand():
  g = jnp.array([[1.0, 0.0, -2.0], [1.0, 0.0, 4.0]])  # Per unit mean |g| = [1, 0, 3], mean 4/3.
  np.testing.assert_allclose(np.asarray(M.gradient_scores(g)), [0.75, 0.0, 2.25], rtol=1e-6)


def test_regrama_resets_the_unit_without_gradient():
  model, params, x, y = mlp()
  params = kill(params, "Dense_1", 2)  # A dead ReLU gets no gradient on its incoming weights.
  g, _ = grads_and_acts(model, params, x, y)
  kg = np.abs(np.asarray(g["Dense_1"]["kernel"], np.float64)).mean(0)
  scores = kg / kg.mean()
  np.testing.assert_allclose(np.asarray(M.gradient_scores(g["Dense_1"]["kernel"])), scores, rtol=1e-5)
  dead = set(np.flatnonzero(scores == 0))
  assert 2 in dead and len(dead) < 6
  kg0 = np.abs(np.asarray(g["Dense_0"]["kernel"])).mean(0)
  dead0 = set(np.flatnonzero(kg0 == 0))
  plain = optax.apply_updates(params, optax.sgd(0.1).update(g, optax.sgd(0.1).init(params))[0])
  graph = cbp_jax.graph_from_params(params)
  for period, resets in ((1, True), (2, False)):
    tx = M.regrama(graph, key=0, tau=0.0, period=period, optimizer=optax.sgd(0.1))
    state = tx.init(params)
    u, state = jax.jit(tx.update)(g, state, params)
    new = optax.apply_updates(params, u)
    if resets:
      check_unit_reset(params, new, plain, "Dense_1", "Dense_2", dead)
      assert int(state.replaced_total["Dense_1"]) == len(dead)
      assert int(state.replaced_total["Dense_0"]) == len(dead0)
    else:
      for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_regrama_restarts_the_wrapped_adam_moments():
  model, params, x, y = mlp()
  params = kill(params, "Dense_0", 1)
  g, _ = grads_and_acts(model, params, x, y)
  live = np.abs(np.asarray(g["Dense_0"]["kernel"])).mean(0) > 0
  assert not live[1] and live.any()
  graph = cbp_jax.graph_from_params(params)
  tx = M.regrama(graph, key=0, tau=0.0, period=1, optimizer=optax.adam(1e-2))
  state = tx.init(params)
  state = state._replace(inner_state=jax.tree.map(lambda a: a + 1.0, state.inner_state))
  _, state = tx.update(g, state, params)
  mu = state.inner_state[0].mu
  np.testing.assert_array_equal(np.asarray(mu["Dense_0"]["kernel"])[:, 1], 0.0)
  np.testing.assert_array_equal(np.asarray(mu["Dense_1"]["kernel"])[1], 0.0)
  assert (np.asarray(mu["Dense_0"]["kernel"])[:, live] != 0).all()
