"""`cbp_jax/methods/_l2_init.py`: L2-Init, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import methods as M
from tests.methods_helpers import assert_bitwise


def test_l2_init_pulls_toward_init_by_hand():
  p0 = {"a": jnp.array([1.0, -2.0, 3.0]), "b": {"c": jnp.array([[0.5, 0.0]])}}
  wd, lr = 0.5, 0.1
  tx = optax.chain(M.l2_init(wd), optax.sgd(lr))
  state = tx.init(p0)
  params = jax.tree.map(lambda p: p + 2.0, p0)  # Moved away by 2.
  grads = {"a": jnp.array([1.0, 0.0, -1.0]), "b": {"c": jnp.array([[0.0, 4.0]])}}
  step = jax.jit(tx.update)
  up, state = step(grads, state, params)
  # -lr * (g + wd * (p - p0)) = -0.1 * (g + 1).
  np.testing.assert_allclose(up["a"], [-0.2, -0.1, 0.0], atol=1e-7)
  np.testing.assert_allclose(up["b"]["c"], [[-0.1, -0.5]], atol=1e-7)
  # With zero gradients the distance to the init shrinks by (1 - lr*wd) a step.
  zeros = jax.tree.map(jnp.zeros_like, p0)
  for _ in range(3):
    up, state = step(zeros, state, params)
    params = optax.apply_updates(params, up)
  np.testing.assert_allclose(params["a"] - p0["a"], 2.0 * (1 - lr * wd) ** 3, rtol=1e-6)
  # The state holds the initial parameters, as a copy.
  assert_bitwise(state[0].initial_params["a"], p0["a"])
  assert state[0].initial_params["a"] is not p0["a"]


def test_l2_init_under_vmap_and_needs_params():
  p0 = jnp.stack([jnp.zeros(3), jnp.ones(3)])  # Two seeds.
  tx = M.l2_init(1.0)

  def run(p):
    state = tx.init(p)
    return tx.update(jnp.zeros(3), state, p + 1.0)[0]

  np.testing.assert_allclose(jax.jit(jax.vmap(run))(p0), np.ones((2, 3)))
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
