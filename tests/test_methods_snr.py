"""`cbp_jax/methods/_snr.py`: SNR's resets step by step against a NumPy simulation of its rule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import methods as M
from tests.new_methods_helpers import check_unit_reset, mlp


def snr_numpy(acts_list, eta):
  """SNR's rule in NumPy: per step, the units reset (and the statistics after)."""
  width = acts_list[0].shape[-1]
  rate, seen, streak = np.zeros(width), np.zeros(width), np.zeros(width)
  resets = []
  for h in acts_list:
    fired = (h > 0).reshape(-1, width)
    n = fired.shape[0]
    hits = fired.sum(0)
    rate = (rate * seen + hits) / (seen + n)
    seen = seen + n
    streak = np.where(hits > 0, 0, streak + n)
    with np.errstate(divide="ignore"):
      prob = np.where(streak > 0, (1 - rate) ** streak, 1.0)
    reset = prob < eta
    resets.append(set(np.flatnonzero(reset)))
    rate, seen, streak = (np.where(reset, 0, a) for a in (rate, seen, streak))
  return resets


def test_snr_resets_when_the_streak_is_improbable():
  model, params, x, _ = mlp(batch=4)
  graph = cbp_jax.graph_from_params(params)
  rng = np.random.default_rng(3)
  # Unit 0 always fires, then stops; unit 1 fires on ~1 in 8 examples and
  # stays quiet long stretches; unit 2 never fires; the rest fire at random.
  acts_list = []
  for t in range(12):
    h = rng.uniform(-1, 1, size=(4, 6)).astype(np.float32)
    h[:, 0] = 1.0 if t < 2 else -1.0
    h[:, 1] = -1.0
    if t in (0, 5):
      h[0, 1] = 1.0
    h[:, 2] = -1.0
    acts_list.append(h)
  eta = 0.05
  want = snr_numpy(acts_list, eta)
  assert 0 in want[2]  # Fired on all 8 examples, then silent on 4: (1 - 8/12)^4 = 1/81 < eta.
  assert all(2 not in w for w in want)  # Never fired: never reset.
  tx = optax.chain(optax.sgd(0.0), M.snr(graph, key=0, eta=eta))
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = jax.tree.map(jnp.zeros_like, params)
  for t, h in enumerate(acts_list):
    acts = {"Dense_0": jnp.asarray(h), "Dense_1": jnp.ones((4, 6))}
    u, state = update(g, state, params, activations=acts)
    got = set(np.flatnonzero(np.asarray(state[1].last_replaced["Dense_0"])))
    assert got == want[t], f"step {t}: {got} vs {want[t]}"
    if got:
      new = optax.apply_updates(params, u)
      check_unit_reset(params, new, params, "Dense_0", "Dense_1", got)
      assert not np.asarray(state[1].last_replaced["Dense_1"]).any()


def test_snr_statistics_by_hand():
  rate, seen, streak = M.update_firing(
    jnp.array([0.5, 0.0]), jnp.array([4.0, 4.0]), jnp.array([0.0, 4.0]), jnp.array([[1.0, -1.0], [0.0, 0.0]])
  )
  np.testing.assert_allclose(np.asarray(rate), [(2 + 1) / 6, 0.0])
  np.testing.assert_allclose(np.asarray(seen), [6.0, 6.0])
  np.testing.assert_allclose(np.asarray(streak), [0.0, 6.0])
  logp = M.streak_log_probability(jnp.array([0.5, 1.0, 0.3]), jnp.array([3.0, 2.0, 0.0]))
  np.testing.assert_allclose(np.asarray(logp)[[0, 2]], [3 * math.log(0.5), 0.0], rtol=1e-6)
  assert np.asarray(logp)[1] == -np.inf


def test_snr_validates():
  _, params, _, _ = mlp()
  graph = cbp_jax.graph_from_params(params)
  for eta in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="eta"):
      M.snr(graph, key=0, eta=eta)
  tx = M.snr(graph, key=0)
  with pytest.raises(ValueError, match="snr: update needs the keyword argument activations"):
    tx.update(params, tx.init(params), params)
