"""`cbp_jax/methods/_hare_tortoise.py`: Hare & Tortoise against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import methods as M
from tests.new_methods_helpers import mlp, np_leaves


def test_hare_tortoise_matches_numpy():
  _, params, _, _ = mlp()
  rng = np.random.default_rng(1)
  leaves, treedef = jax.tree.flatten(params)
  lr, decay, period = 0.1, 0.8, 3
  tx = optax.chain(optax.sgd(lr), M.hare_tortoise(decay, period))
  state = tx.init(params)
  p = params
  hare = np_leaves(params)
  tortoise = [h.copy() for h in hare]
  for t in range(1, 8):
    g = [rng.normal(size=l.shape) for l in leaves]
    u, state = jax.jit(tx.update)(
      jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in g]), state, p
    )
    p = optax.apply_updates(p, u)
    hare = [h - lr * gi for h, gi in zip(hare, g)]
    tortoise = [decay * s + (1 - decay) * h for s, h in zip(tortoise, hare)]
    if t % period == 0:
      hare = [s.copy() for s in tortoise]
    for got, want in zip(np_leaves(p), hare):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
  for got, want in zip(np_leaves(M.tortoise_params(state)), tortoise):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hare_tortoise_validates():
  with pytest.raises(ValueError, match="decay"):
    M.hare_tortoise(1.5, 10)
  with pytest.raises(ValueError, match="reset_period"):
    M.hare_tortoise(0.9, 0)
  with pytest.raises(ValueError, match="expected one hare_tortoise state"):
    M.tortoise_params(optax.sgd(0.1).init({"w": jnp.ones(2)}))
