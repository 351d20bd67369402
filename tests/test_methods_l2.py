"""`cbp_jax/methods/_l2.py`: L2 (and the argument checks it shares with L2-Init), against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import methods as M
from tests.methods_helpers import assert_bitwise, mlp


def test_l2_is_add_decayed_weights_and_adds_wd_params():
  _, params, _, _ = mlp()
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  wd = 0.01
  tx = M.l2(wd)
  up, _ = tx.update(grads, tx.init(params), params)
  jit_up, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref, _ = optax.add_decayed_weights(wd).update(grads, optax.EmptyState(), params)
  for u, j, r, g, p in zip(*map(jax.tree.leaves, (up, jit_up, ref, grads, params))):
    assert_bitwise(u, r)  # The same transform (same arithmetic, both eager).
    np.testing.assert_allclose(j, r, rtol=1e-6)
    np.testing.assert_allclose(u, np.asarray(g) + wd * np.asarray(p), rtol=1e-6)
  # In a chain before the learning rate: p - lr * (g + wd * p).
  lr = 0.1
  chain = optax.chain(M.l2(wd), optax.sgd(lr))
  up, _ = chain.update(grads, chain.init(params), params)
  new = optax.apply_updates(params, up)
  for n, g, p in zip(*map(jax.tree.leaves, (new, grads, params))):
    p = np.asarray(p, np.float64)
    np.testing.assert_allclose(n, p - lr * (np.asarray(g) + wd * p), rtol=1e-5, atol=1e-7)


def test_l2_under_vmap():
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  wds = jnp.array([0.0, 0.1, 1.0])

  def run(wd):
    tx = M.l2(wd)
    return tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params)[0]["w"]

  out = jax.jit(jax.vmap(run))(wds)
  expect = 1.0 + np.asarray(wds)[:, None, None] * np.arange(6.0).reshape(2, 3)
  np.testing.assert_allclose(out, expect, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x"])
def test_l2_and_l2_init_validate(bad):
  with pytest.raises(ValueError, match="weight_decay"):
    M.l2(bad)
  with pytest.raises(ValueError, match="weight_decay"):
    M.l2_init(bad)
