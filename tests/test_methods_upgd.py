"""`cbp_jax/methods/_upgd.py`: UPGD (first and second order) against a NumPy re-computation of the authors'
update, its gate by hand, in a chain, vmapped over keys and traced hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import methods as M
from tests.new_methods_helpers import mlp, np_leaves


def upgd_numpy(params_list, grads_list, key, lr, beta, sigma, wd, hess_list=None):
  """The authors' global protecting UPGD, in NumPy, over a sequence of steps.

  The noise is drawn with jax.random (split the key per step, then one draw
  for all leaves in tree order), the same numbers the transform's fused draws give.
  """
  w = [p.copy() for p in params_list[0]]
  avg = [np.zeros_like(p) for p in w]
  for t, grads in enumerate(grads_list, start=1):
    hess = None if hess_list is None else hess_list[t - 1]
    for i, g in enumerate(grads):
      u = -g * w[i] if hess is None else -g * w[i] + 0.5 * hess[i] * w[i] ** 2
      avg[i] = beta * avg[i] + (1 - beta) * u
    gmax = max(a.max() for a in avg)
    key, noise_key = jax.random.split(key)
    draw = np.asarray(jax.random.normal(noise_key, (sum(g.size for g in grads),)), np.float64)
    offset = 0
    for i, g in enumerate(grads):
      noise = draw[offset : offset + g.size].reshape(g.shape) * sigma
      offset += g.size
      s = 1 / (1 + np.exp(-(avg[i] / (1 - beta**t)) / gmax))
      w[i] = w[i] * (1 - lr * wd) - lr * (g + noise) * (1 - s)
  return w


@pytest.mark.parametrize("order", [1, 2])
def test_upgd_matches_numpy(order):
  _, params, _, _ = mlp()
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(params)
  grads_list = [[rng.normal(size=l.shape) for l in leaves] for _ in range(3)]
  hess_list = [[np.abs(rng.normal(size=l.shape)) for l in leaves] for _ in range(3)]
  lr, beta, sigma, wd = 0.1, 0.9, 0.05, 0.01
  tx = M.upgd(lr, key=7, beta_utility=beta, sigma=sigma, weight_decay=wd, order=order)
  state = tx.init(params)
  p = params
  for t in range(3):
    g = jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in grads_list[t]])
    extra = {}
    if order == 2:
      extra["hessian_diag"] = jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in hess_list[t]])
    u, state = jax.jit(tx.update)(g, state, p, **extra)
    p = optax.apply_updates(p, u)
  want = upgd_numpy(
    [np_leaves(params)], grads_list, jax.random.key(7), lr, beta, sigma, wd, hess_list if order == 2 else None
  )
  for got, w in zip(np_leaves(p), want):
    np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)


def test_upgd_gate_by_hand():
  """One weight of high utility is protected, one of negative utility gets the full step."""
  params = {"w": jnp.array([2.0, 1.0])}
  grads = {"w": jnp.array([-1.0, 1.0])}  # Utilities -g*w: [2, -1]; max 2.
  tx = M.upgd(1.0, key=0, beta_utility=0.0, sigma=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  s = 1 / (1 + np.exp(-np.array([2.0, -1.0]) / 2.0))  # sigmoid(1), sigmoid(-0.5)
  np.testing.assert_allclose(np.asarray(u["w"]), -np.array([-1.0, 1.0]) * (1 - s), rtol=1e-6)


def test_upgd_zero_gradients_are_finite():
  params = {"w": jnp.ones((3,))}
  tx = M.upgd(0.1, key=0, sigma=1.0)
  u, _ = tx.update({"w": jnp.zeros((3,))}, tx.init(params), params)
  # Utility 0 everywhere: the gate is sigmoid(0) = 1/2, the step half the noise.
  noise = jax.random.normal(jax.random.split(jax.random.key(0))[1], (3,))
  np.testing.assert_allclose(np.asarray(u["w"]), -0.1 * 0.5 * np.asarray(noise), rtol=1e-5)


def test_upgd_in_a_chain_equals_upgd():
  _, params, _, _ = mlp()
  g = jax.tree.map(lambda p: jnp.cos(p) * 0.3, params)
  full = M.upgd(0.05, key=3, sigma=0.1)
  chained = optax.chain(
    optax.clip_by_global_norm(1e9), M.scale_by_upgd(key=3, sigma=0.1), optax.scale_by_learning_rate(0.05)
  )
  u1, _ = jax.jit(full.update)(g, full.init(params), params)
  u2, _ = jax.jit(chained.update)(g, chained.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upgd_vmaps_over_keys_and_traced_hyperparameters():
  _, params, _, _ = mlp()
  g = jax.tree.map(lambda p: jnp.sin(p), params)

  def step(key, sigma, lr):
    tx = M.upgd(lr, key=key, sigma=sigma)
    u, _ = tx.update(g, tx.init(params), params)
    return u

  keys = jax.random.split(jax.random.key(0), 3)
  out = jax.jit(jax.vmap(step))(keys, jnp.array([0.0, 0.0, 0.5]), jnp.array([0.1, 0.1, 0.1]))
  k = np.asarray(out["Dense_0"]["kernel"])
  np.testing.assert_array_equal(k[0], k[1])  # No noise: the key does not matter.
  assert not np.allclose(k[0], k[2])
  single = step(keys[2], 0.5, 0.1)
  np.testing.assert_allclose(k[2], np.asarray(single["Dense_0"]["kernel"]), rtol=1e-6, atol=1e-7)


def test_upgd_validates():
  for kwargs, match in (
    ({"beta_utility": 1.0}, "beta_utility"),
    ({"sigma": -1.0}, "sigma"),
    ({"order": 3}, "order"),
    ({"weight_decay": -1.0}, "weight_decay"),
  ):
    with pytest.raises(ValueError, match=match):
      M.upgd(0.1, key=0, **kwargs)
  tx = M.upgd(0.1, key=0, order=2)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="hessian_diag"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="needs params"):
    M.scale_by_upgd(key=0).update(params, M.scale_by_upgd(key=0).init(params))
