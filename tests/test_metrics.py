"""Tests for cbp_jax.metrics: every metric against an independent NumPy computation and hand-computed values."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbp_jax import metrics as M

# ------------------------------------------------------------------------------------------------------------
# Independent NumPy references (float64, loops where that is clearer).
# ------------------------------------------------------------------------------------------------------------


def np_dead_fraction(h):
  h = np.asarray(h, np.float64)
  units = h.reshape(-1, h.shape[-1])
  dead = [np.all(units[:, i] <= 0) for i in range(units.shape[1])]
  return float(np.mean(dead))


def np_rarely_active_fraction(h, threshold):
  h = np.asarray(h, np.float64)
  units = h.reshape(-1, h.shape[-1])
  fractions = [np.count_nonzero(units[:, i] > 0) / units.shape[0] for i in range(units.shape[1])]
  return float(np.mean([f == 0 or f < threshold for f in fractions]))


def np_dormant_scores(h):
  h = np.asarray(h, np.float64)
  units = np.abs(h.reshape(-1, h.shape[-1]))
  per_unit = units.mean(axis=0)
  layer = per_unit.mean()
  return np.zeros_like(per_unit) if layer == 0 else per_unit / layer


def np_sv(x):
  x = np.asarray(x, np.float64)
  return np.linalg.svd(x.reshape(-1, x.shape[-1]), compute_uv=False)


def np_effective_rank(x):
  sv = np_sv(x)
  if sv.sum() == 0:
    return 0.0
  p = sv / sv.sum()
  entropy = -sum(pi * math.log(pi) for pi in p if pi > 0)
  return math.exp(entropy)


def np_cumulative_rank(values, threshold):
  values = sorted(values, reverse=True)
  total = sum(values)
  if total == 0:
    return 0
  acc = 0.0
  for k, v in enumerate(values, start=1):
    acc += v
    if acc >= threshold * total:
      return k
  return len(values)


def np_approximate_rank(x, threshold=0.99):
  return np_cumulative_rank(np_sv(x) ** 2, threshold)


def np_stable_rank(x, threshold=0.99):
  return np_cumulative_rank(np_sv(x), threshold)


def np_feature_norm(h):
  h = np.asarray(h, np.float64)
  return float(np.mean([np.sqrt(np.sum(h[b] ** 2)) for b in range(h.shape[0])]))


def rng(seed=0):
  return np.random.default_rng(seed)


def low_rank(seed, n=50, d=20, r=3):
  g = rng(seed)
  return (g.normal(size=(n, r)) @ g.normal(size=(r, d))).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Dead and dormant units.
# ------------------------------------------------------------------------------------------------------------


def test_dead_fraction_two_always_zero_units():
  n = 7
  h = np.abs(rng(1).normal(size=(32, n))).astype(np.float32) + 0.1
  h[:, 2] = 0.0
  h[:, 5] = 0.0
  assert float(M.dead_unit_fraction(h)) == pytest.approx(2 / n)
  assert float(M.dead_unit_fraction(h)) == pytest.approx(np_dead_fraction(h))


def test_unit_negative_on_all_inputs_then_relu_is_dead():
  g = rng(2)
  x = g.uniform(0.1, 1.0, size=(64, 5)).astype(np.float32)  # positive inputs
  w = g.normal(size=(5, 4)).astype(np.float32)
  w[:, 0] = (
    -np.abs(w[:, 0]) - 0.1
  )  # unit 0: negative weights on positive inputs -> always negative pre-activation
  w[:, 1:] = np.abs(w[:, 1:]) + 0.1  # others always positive
  h = jax.nn.relu(jnp.asarray(x) @ jnp.asarray(w))
  assert float(M.dead_unit_fraction(h)) == pytest.approx(0.25)
  # A unit active on a single sample is not dead.
  h2 = np.asarray(h).copy()
  h2[17, 0] = 0.3
  assert float(M.dead_unit_fraction(h2)) == 0.0


def test_dead_fraction_conv_spatial_axes_are_samples():
  g = rng(3)
  h = np.maximum(g.normal(size=(4, 5, 5, 6)), 0).astype(np.float32)
  h[..., 1] = 0.0
  h[..., 4] = 0.0
  h[2, 3, 1, 4] = 1.0  # channel 4 active at one position of one image -> alive
  assert float(M.dead_unit_fraction(h)) == pytest.approx(np_dead_fraction(h))
  assert float(M.dead_unit_fraction(h)) == pytest.approx(1 / 6)


def test_rarely_active_fraction_hand_computed():
  # Unit i is active on exactly i of the 4 samples: fractions 0, 1/4, 1/2, 3/4, 1.
  h = np.zeros((4, 5), np.float32)
  for i in range(5):
    h[:i, i] = 1.0 + i
  h[3, 0] = -2.0  # Negative outputs are not active.
  np.testing.assert_array_equal(M.active_fractions(h), [0.0, 0.25, 0.5, 0.75, 1.0])
  assert M.active_fractions(h).dtype == jnp.float32
  for threshold, expected in [
    (0.0, 1 / 5),
    (0.25, 1 / 5),
    (0.26, 2 / 5),
    (0.5, 2 / 5),
    (0.51, 3 / 5),
    (1.0, 4 / 5),
  ]:
    assert float(M.rarely_active_fraction(h, threshold)) == pytest.approx(expected), threshold
    assert float(M.rarely_active_fraction(h, threshold)) == pytest.approx(
      np_rarely_active_fraction(h, threshold)
    )
  assert float(M.rarely_active_fraction(h)) == pytest.approx(1 / 5)  # Default 1%: only the never-active unit.


def test_rarely_active_fraction_threshold_zero_is_dead_fraction():
  g = rng(5)
  h = np.maximum(g.normal(size=(3, 4, 4, 9)) - 1.5, 0).astype(np.float32)  # Sparse ReLU conv outputs.
  h[..., 2] = 0.0
  h[..., 7] = 0.0
  h[1, 2, 3, 7] = 0.5  # Active at one position of one image: not dead, but rarely active.
  assert float(M.rarely_active_fraction(h, 0.0)) == pytest.approx(float(M.dead_unit_fraction(h)))
  assert float(M.rarely_active_fraction(h, 0.0)) == pytest.approx(1 / 9)
  fractions = M.active_fractions(h)  # Over 3 * 4 * 4 = 48 positions.
  assert float(fractions[2]) == 0.0 and float(fractions[7]) == pytest.approx(1 / 48)
  for threshold in (0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0):
    expected = np_rarely_active_fraction(h, threshold)
    assert float(M.rarely_active_fraction(h, threshold)) == pytest.approx(expected), threshold
    assert float(jax.jit(M.rarely_active_fraction)(h, threshold)) == pytest.approx(expected), threshold
  np.testing.assert_allclose(M.active_fractions(h), (h.reshape(-1, 9) > 0).mean(axis=0), rtol=1e-6)


def test_dormant_scores_hand_computed():
  h = np.array([[1.0, 0.0, 2.0, -2.0], [1.0, 0.0, 4.0, 2.0], [1.0, 0.0, 0.0, -2.0]], np.float32)
  # per-unit mean |h| = [1, 0, 2, 2]; layer mean = 5/4; scores = [0.8, 0, 1.6, 1.6]
  np.testing.assert_allclose(M.dormant_scores(h), [0.8, 0.0, 1.6, 1.6], rtol=1e-6)
  np.testing.assert_allclose(M.dormant_scores(h), np_dormant_scores(h), rtol=1e-6)
  assert M.dormant_scores(h).shape == (4,)
  assert M.dormant_scores(h).dtype == jnp.float32
  assert float(M.dormant_fraction(h)) == pytest.approx(0.25)  # tau=0: only the zero unit
  assert float(M.dormant_fraction(h, tau=0.79)) == pytest.approx(0.25)
  assert float(M.dormant_fraction(h, tau=0.81)) == pytest.approx(0.5)
  assert float(M.dormant_fraction(h, tau=1.61)) == pytest.approx(1.0)


def test_dormant_scores_random_conv_against_numpy():
  h = rng(4).normal(size=(3, 4, 4, 8)).astype(np.float32) * np.arange(8, dtype=np.float32)
  np.testing.assert_allclose(M.dormant_scores(h), np_dormant_scores(h), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(jnp.mean(M.dormant_scores(h))), 1.0, rtol=1e-5)
  for tau in (0.0, 0.1, 0.5, 1.0):
    expected = float(np.mean(np_dormant_scores(h) <= tau))
    assert float(M.dormant_fraction(h, tau)) == pytest.approx(expected)


def test_all_zero_layer_no_nan():
  h = np.zeros((10, 6), np.float32)
  scores = M.dormant_scores(h)
  assert not np.any(np.isnan(scores))
  np.testing.assert_array_equal(scores, np.zeros(6))
  assert float(M.dormant_fraction(h)) == 1.0
  assert float(M.dead_unit_fraction(h)) == 1.0
  assert float(M.feature_norm(h)) == 0.0


# ------------------------------------------------------------------------------------------------------------
# Ranks.
# ------------------------------------------------------------------------------------------------------------


def test_rank3_matrix():
  x = low_rank(5)
  assert int(M.approximate_rank(x)) == 3
  assert int(M.stable_rank(x)) <= 3
  assert int(M.stable_rank(x)) == np_stable_rank(x)
  er = float(M.effective_rank(x))
  assert 1.0 <= er <= 3.0 + 1e-3
  assert er == pytest.approx(np_effective_rank(x), rel=1e-3)


def test_equal_singular_values_effective_rank_is_d():
  d = 6
  assert float(M.effective_rank(np.eye(d, dtype=np.float32))) == pytest.approx(d, rel=1e-5)
  # Orthogonal columns scaled equally, in a tall matrix: all singular values equal 2.5.
  q, _ = np.linalg.qr(rng(6).normal(size=(40, d)))
  x = (2.5 * q).astype(np.float32)
  assert float(M.effective_rank(x)) == pytest.approx(d, rel=1e-4)
  assert int(M.approximate_rank(x)) == d
  assert int(M.stable_rank(x)) == d
  # A zero column keeps a zero singular value: 0*log0 = 0, effective rank d-1, no NaN.
  x0 = x.copy()
  x0[:, 0] = 0.0
  assert float(M.effective_rank(x0)) == pytest.approx(d - 1, rel=1e-4)


def test_ranks_hand_computed_spectrum():
  x = np.diag([3.0, 2.0, 1.0]).astype(np.float32)
  # p = [1/2, 1/3, 1/6]
  expected_er = math.exp(-(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6)))
  assert float(M.effective_rank(x)) == pytest.approx(expected_er, rel=1e-5)
  # squared spectrum 9, 4, 1 / 14 -> cumulative 0.643, 0.929, 1
  assert int(M.approximate_rank(x, threshold=0.5)) == 1
  assert int(M.approximate_rank(x, threshold=0.9)) == 2
  assert int(M.approximate_rank(x, threshold=0.95)) == 3
  assert int(M.approximate_rank(x, threshold=1.0)) == 3
  # spectrum 3, 2, 1 / 6 -> cumulative 0.5, 0.833, 1
  assert int(M.stable_rank(x, threshold=0.4)) == 1
  assert int(M.stable_rank(x, threshold=0.8)) == 2
  assert int(M.stable_rank(x, threshold=0.9)) == 3
  assert int(M.stable_rank(x, threshold=1.0)) == 3


def test_ranks_random_against_numpy():
  g = rng(7)
  # Decaying spectrum so that thresholds fall between cumulative fractions.
  u, _ = np.linalg.qr(g.normal(size=(60, 15)))
  v, _ = np.linalg.qr(g.normal(size=(15, 15)))
  s = 0.7 ** np.arange(15)
  x = (u * s) @ v.T
  x = x.astype(np.float32)
  for t in (0.5, 0.9, 0.99):
    assert int(M.approximate_rank(x, t)) == np_approximate_rank(x, t)
    assert int(M.stable_rank(x, t)) == np_stable_rank(x, t)
  assert float(M.effective_rank(x)) == pytest.approx(np_effective_rank(x), rel=1e-4)
  # Conv-shaped features are reshaped to (-1, d).
  x4 = x.reshape(5, 3, 4, 15)
  assert float(M.effective_rank(x4)) == pytest.approx(np_effective_rank(x), rel=1e-4)
  assert int(M.approximate_rank(x4)) == np_approximate_rank(x)
  np.testing.assert_allclose(M.singular_values(x4), np_sv(x), rtol=1e-4, atol=1e-6)


def test_rank_dtypes():
  x = low_rank(8)
  assert M.effective_rank(x).dtype == jnp.float32
  assert M.approximate_rank(x).dtype == jnp.int32
  assert M.stable_rank(x).dtype == jnp.int32
  assert M.approximate_rank(x).shape == ()


def test_all_zero_matrix_ranks_are_zero_no_nan():
  z = np.zeros((20, 5), np.float32)
  er = float(M.effective_rank(z))
  assert er == 0.0 and not math.isnan(er)
  assert int(M.approximate_rank(z)) == 0
  assert int(M.stable_rank(z)) == 0
  assert er == np_effective_rank(z)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
  n=st.integers(1, 6),
  d=st.integers(1, 6),
  seed=st.integers(0, 2**31 - 1),
  threshold=st.floats(0.05, 1.0),
)
def test_rank_properties(n, d, seed, threshold):
  # Pad to a fixed shape so that jit compiles once; zero rows add no singular value.
  x = np.zeros((6, 6), np.float32)
  x[:n, :d] = rng(seed).normal(size=(n, d))
  er = float(_jit_er(x))
  ar = int(_jit_ar(x, threshold))
  sr = int(_jit_sr(x, threshold))
  r = min(n, d)
  assert 1.0 - 1e-4 <= er <= r + 1e-3
  assert 1 <= ar <= sr <= r  # squared spectrum is more concentrated than the spectrum
  assert er == pytest.approx(np_effective_rank(x), rel=1e-3)


_jit_er = jax.jit(M.effective_rank)
_jit_ar = jax.jit(M.approximate_rank)
_jit_sr = jax.jit(M.stable_rank)


# ------------------------------------------------------------------------------------------------------------
# Magnitudes.
# ------------------------------------------------------------------------------------------------------------


def test_weight_magnitude_hand_made():
  params = {
    "Dense_0": {"kernel": np.array([[1.0, -2.0], [3.0, -4.0]], np.float32), "bias": np.array([100.0, 100.0])},
    "Dense_1": {"kernel": np.array([[-1.0], [1.0]], np.float32), "bias": np.array([-50.0])},
    "LayerNorm_0": {"scale": np.array([7.0, 7.0]), "bias": np.array([9.0, 9.0])},
  }
  out = M.weight_magnitude(params)
  assert set(out) == {"Dense_0/kernel", "Dense_1/kernel", "overall"}
  assert float(out["Dense_0/kernel"]) == pytest.approx(2.5)  # (1+2+3+4)/4
  assert float(out["Dense_1/kernel"]) == pytest.approx(1.0)
  assert float(out["overall"]) == pytest.approx(2.0)  # 12 / 6, weighted by size (not (2.5+1)/2)
  assert all(v.dtype == jnp.float32 for v in out.values())
  jitted = jax.jit(M.weight_magnitude)(params)
  assert {k: float(v) for k, v in jitted.items()} == pytest.approx({k: float(v) for k, v in out.items()})


def test_weight_magnitude_sequence_and_flax_params():
  params = {
    "layers": [{"kernel": np.full((2, 2), -3.0, np.float32)}, {"kernel": np.ones((4, 1), np.float32)}]
  }
  out = M.weight_magnitude(params)
  assert float(out["layers/0/kernel"]) == 3.0
  assert float(out["layers/1/kernel"]) == 1.0
  assert float(out["overall"]) == pytest.approx((12 + 4) / 8)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      x = nn.LayerNorm()(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  variables = Net().init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
  out = M.weight_magnitude(variables["params"])
  assert set(out) == {"Conv_0/kernel", "Dense_0/kernel", "overall"}
  conv = np.asarray(variables["params"]["Conv_0"]["kernel"])
  dense = np.asarray(variables["params"]["Dense_0"]["kernel"])
  assert float(out["Conv_0/kernel"]) == pytest.approx(np.abs(conv).mean(), rel=1e-6)
  assert float(out["Dense_0/kernel"]) == pytest.approx(np.abs(dense).mean(), rel=1e-6)
  overall = (np.abs(conv).sum() + np.abs(dense).sum()) / (conv.size + dense.size)
  assert float(out["overall"]) == pytest.approx(overall, rel=1e-6)
  # Whole variables dict: same numbers with a "params/" prefix.
  assert float(M.weight_magnitude(variables)["params/Dense_0/kernel"]) == pytest.approx(
    float(out["Dense_0/kernel"])
  )


def test_weight_magnitude_nnx_state():
  from flax import nnx

  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  out = M.weight_magnitude(nnx.state(layer, nnx.Param))
  assert set(out) == {"kernel", "overall"}
  assert float(out["kernel"]) == pytest.approx(np.abs(np.asarray(layer.kernel[...])).mean(), rel=1e-6)


def test_weight_magnitude_without_kernel_raises():
  with pytest.raises(ValueError, match="kernel"):
    M.weight_magnitude({"Dense_0": {"bias": np.ones(3)}})


def test_feature_norm_hand_and_numpy():
  assert float(M.feature_norm(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))) == pytest.approx(2.5)
  h = rng(9).normal(size=(6, 3, 3, 4)).astype(np.float32)
  assert float(M.feature_norm(h)) == pytest.approx(np_feature_norm(h), rel=1e-5)
  assert M.feature_norm(h).dtype == jnp.float32


def test_gradient_norm():
  grads = {"a": np.array([3.0], np.float32), "b": {"c": np.array([[4.0]], np.float32)}, "d": [np.zeros(3)]}
  assert float(M.gradient_norm(grads)) == pytest.approx(5.0)
  g = rng(10)
  tree = {"w": g.normal(size=(5, 7)).astype(np.float32), "b": (g.normal(size=(7,)).astype(np.float32),)}
  flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).astype(np.float64)
  assert float(M.gradient_norm(tree)) == pytest.approx(np.linalg.norm(flat), rel=1e-6)
  assert float(M.gradient_norm(tree)) == pytest.approx(float(optax.tree.norm(tree)), rel=1e-6)
  assert float(M.gradient_norm({})) == 0.0
  # bf16 leaves: squares accumulated in float32 (300**2 * 1000 would be inexact in bf16 accumulation).
  big = jnp.full((1000,), 300.0, jnp.bfloat16)
  assert float(M.gradient_norm(big)) == pytest.approx(300.0 * math.sqrt(1000), rel=1e-6)
  assert M.gradient_norm(big).dtype == jnp.float32


# ------------------------------------------------------------------------------------------------------------
# layer_metrics, jit, vmap, bf16.
# ------------------------------------------------------------------------------------------------------------


def test_layer_metrics_matches_individual_functions():
  g = rng(11)
  acts = {
    "conv": np.maximum(g.normal(size=(4, 3, 3, 5)), 0).astype(np.float32),
    "fc": np.maximum(low_rank(12, n=30, d=8), 0),
    "zero": np.zeros((5, 4), np.float32),
  }
  acts["fc"][:, 0] = 0.0
  out = jax.jit(M.layer_metrics, static_argnames=())(acts, 0.1, activity_threshold=0.3)
  keys = {
    "dead_fraction",
    "rarely_active_fraction",
    "dormant_fraction",
    "effective_rank",
    "stable_rank",
    "approximate_rank",
    "feature_norm",
  }
  assert set(out) == set(acts)
  for name, h in acts.items():
    m = out[name]
    assert set(m) == keys
    assert float(m["dead_fraction"]) == pytest.approx(np_dead_fraction(h))
    assert float(m["rarely_active_fraction"]) == pytest.approx(np_rarely_active_fraction(h, 0.3))
    assert float(m["dormant_fraction"]) == pytest.approx(float(np.mean(np_dormant_scores(h) <= 0.1)))
    assert float(m["effective_rank"]) == pytest.approx(np_effective_rank(h), rel=1e-4)
    assert int(m["approximate_rank"]) == np_approximate_rank(h)
    assert int(m["stable_rank"]) == np_stable_rank(h)
    assert float(m["feature_norm"]) == pytest.approx(np_feature_norm(h), rel=1e-5)
    for v in m.values():
      assert not np.isnan(float(v))
  assert M.layer_metrics({}) == {}


def test_jit_matches_eager():
  x = low_rank(13)
  h = np.maximum(x, 0)
  for fn in (M.dead_unit_fraction, M.dormant_scores, M.effective_rank, M.feature_norm):
    np.testing.assert_allclose(jax.jit(fn)(h), fn(h), rtol=1e-5)
  assert int(jax.jit(M.approximate_rank)(x)) == int(M.approximate_rank(x))
  assert int(jax.jit(M.stable_rank, static_argnums=1)(x, 0.9)) == int(M.stable_rank(x, 0.9))
  # threshold and tau may also be traced arguments
  assert int(jax.jit(M.stable_rank)(x, 0.9)) == int(M.stable_rank(x, 0.9))
  assert float(jax.jit(M.dormant_fraction)(h, 0.5)) == pytest.approx(float(M.dormant_fraction(h, 0.5)))


def test_vmap_over_seed_axis_equals_loop():
  seeds = 3
  xs = np.stack([np.maximum(low_rank(20 + s, n=24, d=10, r=2 + s), 0) for s in range(seeds)])
  xs[1, :, 4] = 0.0

  def all_metrics(h):
    return {
      "dead": M.dead_unit_fraction(h),
      "rare": M.rarely_active_fraction(h, 0.4),
      "active": M.active_fractions(h),
      "dormant": M.dormant_fraction(h, 0.2),
      "scores": M.dormant_scores(h),
      "er": M.effective_rank(h),
      "ar": M.approximate_rank(h, 0.95),
      "sr": M.stable_rank(h, 0.95),
      "fn": M.feature_norm(h),
    }

  batched = jax.jit(jax.vmap(all_metrics))(xs)
  for s in range(seeds):
    single = all_metrics(xs[s])
    for k in single:
      np.testing.assert_allclose(batched[k][s], single[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert batched["ar"].dtype == jnp.int32
  # vmapped weight magnitude / gradient norm over stacked params
  params = {"Dense_0": {"kernel": jnp.asarray(xs)}}
  wm = jax.vmap(M.weight_magnitude)(params)
  np.testing.assert_allclose(wm["overall"], np.abs(xs).reshape(seeds, -1).mean(1), rtol=1e-5)
  np.testing.assert_allclose(
    jax.vmap(M.gradient_norm)(params), np.linalg.norm(xs.reshape(seeds, -1), axis=1), rtol=1e-5
  )
  # and the layer_metrics convenience
  lm = jax.vmap(M.layer_metrics)({"fc": jnp.asarray(xs)})
  for s in range(seeds):
    assert int(lm["fc"]["approximate_rank"][s]) == np_approximate_rank(xs[s])


def test_bf16_inputs():
  x = low_rank(14)
  h = np.maximum(x, 0)
  xb = jnp.asarray(x, jnp.bfloat16)
  hb = jnp.asarray(h, jnp.bfloat16)
  xr = np.asarray(xb.astype(jnp.float32))  # the values the bf16 array really holds
  hr = np.asarray(hb.astype(jnp.float32))
  assert M.effective_rank(xb).dtype == jnp.float32
  assert float(M.effective_rank(xb)) == pytest.approx(np_effective_rank(xr), rel=1e-3)
  assert int(M.approximate_rank(xb)) == 3
  assert int(M.stable_rank(xb)) == np_stable_rank(xr)
  assert float(M.dead_unit_fraction(hb)) == pytest.approx(np_dead_fraction(hr))
  assert float(M.rarely_active_fraction(hb, 0.5)) == pytest.approx(np_rarely_active_fraction(hr, 0.5))
  np.testing.assert_allclose(M.dormant_scores(hb), np_dormant_scores(hr), rtol=1e-4)
  assert M.dormant_scores(hb).dtype == jnp.float32
  assert float(M.feature_norm(hb)) == pytest.approx(np_feature_norm(hr), rel=1e-4)
  out = M.weight_magnitude({"Dense_0": {"kernel": xb}})
  assert out["overall"].dtype == jnp.float32
  assert float(out["overall"]) == pytest.approx(np.abs(xr).mean(), rel=1e-5)
  m = jax.jit(M.layer_metrics)({"fc": hb})
  assert int(m["fc"]["approximate_rank"]) == np_approximate_rank(hr)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "fn",
  [
    M.dead_unit_fraction,
    M.active_fractions,
    M.rarely_active_fraction,
    M.dormant_scores,
    M.dormant_fraction,
    M.feature_norm,
  ],
)
def test_1d_activations_raise(fn):
  with pytest.raises(ValueError, match=r"`h`.*ndim >= 2.*\(5,\)"):
    fn(np.ones(5, np.float32))
  with pytest.raises(ValueError, match="ndim"):
    jax.jit(fn)(np.ones(5, np.float32))


@pytest.mark.parametrize("fn", [M.effective_rank, M.approximate_rank, M.stable_rank, M.singular_values])
def test_1d_features_raise(fn):
  with pytest.raises(ValueError, match=r"`features`.*ndim >= 2"):
    fn(np.ones(5, np.float32))
  with pytest.raises(ValueError, match="ndim"):
    fn(np.float32(1.0))


def test_empty_axes_raise():
  with pytest.raises(ValueError, match="no units"):
    M.dead_unit_fraction(np.ones((4, 0), np.float32))
  with pytest.raises(ValueError, match="no samples"):
    M.effective_rank(np.ones((0, 3), np.float32))


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.1, float("nan")])
@pytest.mark.parametrize("fn", [M.approximate_rank, M.stable_rank])
def test_threshold_out_of_range_raises(fn, threshold):
  with pytest.raises(ValueError, match=r"`threshold` must be in \(0, 1\]"):
    fn(np.eye(3, dtype=np.float32), threshold)
  with pytest.raises(ValueError, match="threshold"):
    M.layer_metrics({"fc": np.eye(3, dtype=np.float32)}, threshold=threshold)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_activity_threshold_out_of_range_raises(threshold):
  with pytest.raises(ValueError, match=r"`threshold` must be in \[0, 1\], got " + repr(threshold)):
    M.rarely_active_fraction(np.eye(3, dtype=np.float32), threshold)
  with pytest.raises(ValueError, match=r"`activity_threshold` must be in \[0, 1\]"):
    M.layer_metrics({"fc": np.eye(3, dtype=np.float32)}, activity_threshold=threshold)


def test_negative_tau_raises():
  with pytest.raises(ValueError, match="`tau`"):
    M.dormant_fraction(np.eye(3, dtype=np.float32), tau=-0.1)


def test_layer_metrics_bad_inputs():
  with pytest.raises(ValueError, match="mapping"):
    M.layer_metrics([np.eye(3)])
  with pytest.raises(ValueError, match=r"layer_metrics\['fc'\].*ndim"):
    M.layer_metrics({"fc": np.ones(3, np.float32)})
