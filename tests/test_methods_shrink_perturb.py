"""`cbp_jax/methods/_shrink_perturb.py`: Shrink & Perturb, by hand and by its noise statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import methods as M
from tests.methods_helpers import assert_bitwise, mlp


def test_shrink_and_perturb_zero_noise_is_scaling():
  _, params, _, _ = mlp()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  lr, shrink = 0.1, 0.9
  tx = optax.chain(optax.sgd(lr), M.shrink_and_perturb(shrink, 0.0, key=0))
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, up)
  for n, p, g in zip(*map(jax.tree.leaves, (new, params, grads))):
    expect = shrink * (np.asarray(p, np.float64) - lr * np.asarray(g))
    np.testing.assert_allclose(n, expect, rtol=1e-6, atol=1e-7)
  # shrink 1, no noise: bitwise the inner updates.
  tx1 = optax.chain(optax.sgd(lr), M.shrink_and_perturb(1.0, 0.0, key=0))
  up1, _ = tx1.update(grads, tx1.init(params), params)
  ref, _ = optax.sgd(lr).update(grads, optax.sgd(lr).init(params), params)
  for a, b in zip(jax.tree.leaves(up1), jax.tree.leaves(ref)):
    assert_bitwise(a, b)


def test_shrink_and_perturb_noise_statistics():
  params = {"w": jnp.full((400, 500), 2.0), "v": jnp.full((400, 500), -1.0)}
  updates = {"w": jnp.full((400, 500), 0.5), "v": jnp.zeros((400, 500))}
  shrink, scale = 0.5, 0.25
  tx = M.shrink_and_perturb(shrink, scale, key=3)
  up, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  new = optax.apply_updates(params, up)
  noise_w = np.asarray(new["w"], np.float64) - shrink * 2.5
  noise_v = np.asarray(new["v"], np.float64) - shrink * -1.0
  for noise in (noise_w, noise_v):
    # 2e5 draws: mean within 5 standard errors, std within 1%.
    assert abs(noise.mean()) < 5 * scale / math.sqrt(noise.size)
    assert abs(noise.std() / scale - 1) < 0.01
  # Leaves get independent noise.
  assert abs(np.corrcoef(noise_w.ravel(), noise_v.ravel())[0, 1]) < 0.02


def test_shrink_and_perturb_every_k_steps():
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  grads = {"w": jnp.full((3, 4), 0.2)}
  lr, shrink, k = 0.1, 0.8, 3
  inner = optax.sgd(lr)
  tx = optax.chain(inner, M.shrink_and_perturb(shrink, 0.0, key=0, every=k))
  noisy = optax.chain(inner, M.shrink_and_perturb(1.0, 0.1, key=0, every=k))
  state, noisy_state = tx.init(params), noisy.init(params)
  step, noisy_step = jax.jit(tx.update), jax.jit(noisy.update)
  ref, _ = inner.update(grads, inner.init(params), params)
  noises = []
  for t in range(1, 7):
    up, state = step(grads, state, params)
    nup, noisy_state = noisy_step(grads, noisy_state, params)
    if t % k:
      assert_bitwise(up["w"], ref["w"])
      assert_bitwise(nup["w"], ref["w"])
    else:
      new = params["w"] + up["w"]
      np.testing.assert_allclose(new, shrink * (params["w"] + ref["w"]), rtol=1e-6, atol=1e-7)
      noises.append(np.asarray(nup["w"] - ref["w"]))
    assert int(state[1].count) == t
  assert len(noises) == 2 and not np.allclose(noises[0], noises[1])  # Fresh noise each time.
  assert all(np.all(n != 0) for n in noises)


def test_shrink_and_perturb_per_seed_noise_under_vmap():
  params = {"w": jnp.zeros((50,))}
  updates = {"w": jnp.zeros((50,))}

  def run(key):
    tx = M.shrink_and_perturb(1.0, 1.0, key=key)
    return tx.update(updates, tx.init(params), params)[0]["w"]

  keys = jax.random.split(jax.random.key(0), 4)
  out = np.asarray(jax.jit(jax.vmap(run))(keys))
  assert out.shape == (4, 50)
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.allclose(out[i], out[j])
  # Same key, same noise (deterministic); int seeds work too.
  np.testing.assert_array_equal(out[1], run(keys[1]))
  a, b = run(7), M.shrink_and_perturb(1.0, 1.0, key=jax.random.key(7))
  np.testing.assert_array_equal(a, b.update(updates, b.init(params), params)[0]["w"])

  # Traced shrink (a vmapped sweep) is accepted and applied.
  def sweep(shrink):
    tx = M.shrink_and_perturb(shrink, 0.0, key=0)
    p = {"w": jnp.ones(3)}
    return optax.apply_updates(p, tx.update({"w": jnp.zeros(3)}, tx.init(p), p)[0])["w"]

  np.testing.assert_allclose(jax.vmap(sweep)(jnp.array([0.5, 1.0])), [[0.5] * 3, [1.0] * 3])


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(shrink=0.0, noise_scale=0.1), "shrink"),
    (dict(shrink=1.5, noise_scale=0.1), "shrink"),
    (dict(shrink=float("nan"), noise_scale=0.1), "shrink"),
    (dict(shrink=0.9, noise_scale=-0.1), "noise_scale"),
    (dict(shrink=0.9, noise_scale=0.1, every=0), "every"),
    (dict(shrink=0.9, noise_scale=0.1, every=1.5), "every"),
  ],
)
def test_shrink_and_perturb_validates(kwargs, name):
  with pytest.raises(ValueError, match=name):
    M.shrink_and_perturb(key=0, **kwargs)
