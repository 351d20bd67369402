"""experiments.ppo (PPO pieces) against hand computations and plain NumPy loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ppo


def numpy_gae(r, v, nv, term, end, gamma, lam):
  """GAE as a plain backwards loop over one environment's time axis."""
  T = len(r)
  adv = np.zeros(T)
  nxt = 0.0
  for t in reversed(range(T)):
    delta = r[t] + gamma * (1.0 - term[t]) * nv[t] - v[t]
    nxt = delta + gamma * lam * (1.0 - end[t]) * nxt
    adv[t] = nxt
  return adv, adv + v


def test_gae_matches_numpy_loop_with_terminal_and_truncated_steps():
  rng = np.random.default_rng(0)
  T, N = 9, 3
  r, v, nv = (rng.normal(size=(T, N)) for _ in range(3))
  term = np.zeros((T, N))
  end = np.zeros((T, N))
  term[2, 0] = end[2, 0] = 1.0  # terminal
  end[5, 1] = 1.0  # truncated (time limit): bootstraps through nv
  term[8, 2] = end[8, 2] = 1.0  # terminal on the last step
  adv, ret = ppo.gae(r, v, nv, term, end, gamma=0.99, lam=0.95)
  for n in range(N):
    a, g = numpy_gae(r[:, n], v[:, n], nv[:, n], term[:, n], end[:, n], 0.99, 0.95)
    np.testing.assert_allclose(adv[:, n], a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret[:, n], g, rtol=1e-5, atol=1e-5)


def test_gae_by_hand_two_steps():
  # r = [1, 2], v = [0.5, 0.25], next values [0.25, 4], no episode end.
  adv, ret = ppo.gae(
    jnp.array([1.0, 2.0]),
    jnp.array([0.5, 0.25]),
    jnp.array([0.25, 4.0]),
    jnp.zeros(2),
    jnp.zeros(2),
    gamma=0.5,
    lam=0.5,
  )
  d1 = 2.0 + 0.5 * 4.0 - 0.25  # 3.75
  d0 = 1.0 + 0.5 * 0.25 - 0.5  # 0.625
  np.testing.assert_allclose(adv, [d0 + 0.25 * d1, d1], rtol=1e-6)
  np.testing.assert_allclose(ret, [d0 + 0.25 * d1 + 0.5, d1 + 0.25], rtol=1e-6)
  # Terminal at step 1: no bootstrap there; terminal at step 0 also cuts the recursion.
  adv, _ = ppo.gae(
    jnp.array([1.0, 2.0]),
    jnp.array([0.5, 0.25]),
    jnp.array([0.25, 4.0]),
    jnp.array([1.0, 1.0]),
    jnp.array([1.0, 1.0]),
    gamma=0.5,
    lam=0.5,
  )
  np.testing.assert_allclose(adv, [1.0 - 0.5, 2.0 - 0.25], rtol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
  r = np.array([1.0, 0.0, 2.0, 1.0])
  v = np.array([0.3, -0.2, 0.1, 0.7])
  nv = np.array([-0.2, 0.1, 0.7, 5.0])
  adv, ret = ppo.gae(r, v, nv, np.zeros(4), np.zeros(4), gamma=0.9, lam=1.0)
  mc = [sum(0.9 ** (k - t) * r[k] for k in range(t, 4)) + 0.9 ** (4 - t) * 5.0 for t in range(4)]
  np.testing.assert_allclose(ret, mc, rtol=1e-5)
  np.testing.assert_allclose(adv, np.array(mc) - v, rtol=1e-5)


def test_gae_shape_mismatch_raises():
  with pytest.raises(ValueError, match="one shape"):
    ppo.gae(jnp.zeros(3), jnp.zeros(3), jnp.zeros(4), jnp.zeros(3), jnp.zeros(3), gamma=1, lam=1)


def test_normalize_advantages():
  a = np.array([1.0, 2.0, 3.0, 6.0])
  np.testing.assert_allclose(ppo.normalize_advantages(a), (a - a.mean()) / a.std(), rtol=1e-5)
  np.testing.assert_array_equal(ppo.normalize_advantages(jnp.full(5, 3.0)), np.zeros(5))


def test_gaussian_log_prob_matches_closed_form():
  rng = np.random.default_rng(1)
  mean = rng.normal(size=(4, 3))
  log_std = rng.normal(size=(3,)) * 0.3
  a = rng.normal(size=(4, 3))
  std = np.exp(log_std)
  want = np.sum(-0.5 * ((a - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)
  np.testing.assert_allclose(ppo.gaussian_log_prob(mean, log_std, a), want, rtol=1e-5)
  # Standard normal at 0 in one dimension.
  np.testing.assert_allclose(
    ppo.gaussian_log_prob(jnp.zeros((1, 1)), jnp.zeros(1), jnp.zeros((1, 1))),
    [-0.5 * math.log(2 * math.pi)],
    rtol=1e-6,
  )


def test_clipped_surrogate_by_hand():
  eps = 0.2
  ratios = np.array([1.5, 1.5, 0.5, 0.5, 1.1])
  advs = np.array([2.0, -2.0, 2.0, -2.0, 1.0])
  old = np.zeros(5)
  new = np.log(ratios)
  # Per sample, max(-r A, -clip(r) A):
  #   r=1.5, A=2: max(-3, -2.4) = -2.4 (clipped: no extra credit)
  #   r=1.5, A=-2: max(3, 2.4) = 3 (unclipped: full penalty)
  #   r=0.5, A=2: max(-1, -1.6) = -1
  #   r=0.5, A=-2: max(1, 1.6) = 1.6
  #   r=1.1, A=1: -1.1 (inside the clip range)
  want = np.mean([-2.4, 3.0, -1.0, 1.6, -1.1])
  loss, info = ppo.clipped_surrogate_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(advs), eps)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(info.clip_fraction, 0.8, rtol=1e-6)
  kl = np.mean((ratios - 1) - np.log(ratios))
  np.testing.assert_allclose(info.approx_kl, kl, rtol=1e-5)


def test_clipped_surrogate_gradient_vanishes_where_clipped():
  adv = jnp.array([1.0, -1.0])
  old = jnp.zeros(2)
  g = jax.grad(lambda lp: ppo.clipped_surrogate_loss(lp, old, adv, 0.2)[0])(jnp.log(jnp.array([1.5, 0.5])))
  np.testing.assert_allclose(g, [0.0, 0.0], atol=1e-7)  # both outside the trust region
  g = jax.grad(lambda lp: ppo.clipped_surrogate_loss(lp, old, adv, 0.2)[0])(jnp.zeros(2))
  np.testing.assert_allclose(g, [-0.5, 0.5], rtol=1e-6)  # d/dlp of -mean(r A) at r = 1


def test_value_loss():
  np.testing.assert_allclose(
    ppo.value_loss(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 2.0, 1.0])), (1 + 0 + 4) / 3, rtol=1e-6
  )


def test_minibatch_indices_partition():
  idx = np.asarray(ppo.minibatch_indices(jax.random.key(0), 12, 4))
  assert idx.shape == (4, 3) and idx.dtype == np.int32
  np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(12))
  other = np.asarray(ppo.minibatch_indices(jax.random.key(1), 12, 4))
  assert not np.array_equal(idx, other)
  with pytest.raises(ValueError, match="divide"):
    ppo.minibatch_indices(jax.random.key(0), 10, 4)
