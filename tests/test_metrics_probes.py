"""Tests for cbp_jax.metrics' saturation/linearisation counts, drift, churn, trainability and curvature probes,
each against an independent NumPy computation or a hand-computed value."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbp_jax import metrics as M


def np_saturated_fraction(h, low, high, margin, threshold):
  units = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  out = []
  for i in range(units.shape[1]):
    at_end = [(v <= low + margin) or (v >= high - margin) for v in units[:, i]]
    out.append(sum(at_end) / len(at_end) >= threshold)
  return float(np.mean(out))


def np_linearised_fraction(h, threshold):
  units = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  return float(
    np.mean([np.count_nonzero(units[:, i] > 0) / units.shape[0] >= threshold for i in range(units.shape[1])])
  )


# ------------------------------------------------------------------------------------------------------------
# Saturated and linearised units.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "activation, fn, low, high",
  [("tanh", np.tanh, -1.0, 1.0), ("sigmoid", lambda z: 1 / (1 + np.exp(-z)), 0.0, 1.0)],
)
@pytest.mark.parametrize("shape", [(64, 12), (8, 3, 3, 12)])
def test_saturated_fraction_against_numpy(activation, fn, low, high, shape):
  rng = np.random.default_rng(0)
  # Pre-activations with per-unit scales from 0.1 (linear regime) to 30 (saturated): every kind of unit.
  z = rng.normal(size=shape) * np.geomspace(0.1, 30, shape[-1]) + rng.normal(size=shape[-1])
  h = fn(z).astype(np.float32)
  for margin, threshold in ((0.05, 0.99), (0.1, 0.8), (0.01, 0.5)):
    got = float(M.saturated_fraction(h, activation, margin, threshold))
    assert got == pytest.approx(np_saturated_fraction(h, low, high, margin, threshold), abs=1e-6)


def test_saturated_fraction_hand_computed_and_ignores_dead_units():
  # tanh: unit 0 saturated at both ends, unit 1 exactly 0 (a "dead" tanh unit is not saturated), unit 2 half.
  h = np.array([[0.99, 0.0, 0.999], [-0.97, 0.0, 0.2]], np.float32)
  assert float(M.saturated_fraction(h, "tanh", 0.05, 0.99)) == pytest.approx(1 / 3)
  assert float(M.saturated_fraction(h, "tanh", 0.05, 0.5)) == pytest.approx(2 / 3)
  # sigmoid: 0.0 is the low end of the range, so the unit stuck at 0 is saturated.
  assert float(M.saturated_fraction(h, "sigmoid", 0.05, 0.99)) == pytest.approx(2 / 3)


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.5])
def test_linearised_fraction_against_numpy(threshold):
  rng = np.random.default_rng(1)
  z = rng.normal(size=(50, 4, 20)) + np.linspace(-3, 3, 20)  # from always-off to always-on units
  h = np.maximum(z, 0).astype(np.float32)
  assert float(M.linearised_fraction(h, threshold)) == pytest.approx(
    np_linearised_fraction(h, threshold), abs=1e-6
  )


def test_layer_metrics_picks_the_counts_that_fit_the_activation():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(40, 6)) * np.array([0.1, 0.1, 50, 50, 1, 1])
  acts = {
    "t": np.tanh(z).astype(np.float32),
    "r": np.maximum(z + 1, 0).astype(np.float32),
    "s": np.tanh(z).astype(np.float32),
  }
  out = M.layer_metrics(acts, activation={"t": "tanh", "r": "relu", "s": "swish"})
  common = {"dormant_fraction", "effective_rank", "stable_rank", "approximate_rank", "feature_norm"}
  assert set(out["t"]) == common | {"saturated_fraction"}
  assert set(out["r"]) == common | {"dead_fraction", "rarely_active_fraction", "linearised_fraction"}
  assert set(out["s"]) == common
  assert float(out["t"]["saturated_fraction"]) == pytest.approx(
    np_saturated_fraction(acts["t"], -1, 1, 0.05, 0.99)
  )
  assert float(out["r"]["linearised_fraction"]) == pytest.approx(np_linearised_fraction(acts["r"], 0.99))
  # Without an activation the keys are those of earlier versions.
  assert set(M.layer_metrics(acts)["t"]) == common | {"dead_fraction", "rarely_active_fraction"}
  one = jax.jit(lambda a: M.layer_metrics(a, activation="sigmoid"))(acts)
  assert "saturated_fraction" in one["r"]


def test_unit_count_errors_name_the_problem():
  h = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="activation.*'relu'"):
    M.saturated_fraction(h, "relu")
  with pytest.raises(ValueError, match="margin"):
    M.saturated_fraction(h, "tanh", margin=0.7)
  with pytest.raises(ValueError, match="threshold"):
    M.linearised_fraction(h, 0.0)
  with pytest.raises(ValueError, match="no entry for layer 'b'"):
    M.layer_metrics({"a": h, "b": h}, activation={"a": "tanh"})


# ------------------------------------------------------------------------------------------------------------
# Drift and churn.
# ------------------------------------------------------------------------------------------------------------


def test_parameter_drift_against_numpy():
  rng = np.random.default_rng(3)
  init = {
    "Dense_0": {"kernel": rng.normal(size=(5, 4)), "bias": rng.normal(size=4)},
    "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4))},
  }
  now = jax.tree.map(lambda a: a + rng.normal(size=a.shape), init)
  init, now = jax.tree.map(lambda a: np.asarray(a, np.float32), (init, now))
  out = M.parameter_drift(now, init)
  expected = {
    k: np.linalg.norm((now[k]["kernel"] - init[k]["kernel"]).astype(np.float64).ravel())
    for k in ("Dense_0", "Conv_0")
  }
  assert set(out) == {"Dense_0/kernel", "Conv_0/kernel", "overall"}  # biases are not kernels
  for k, v in expected.items():
    assert float(out[f"{k}/kernel"]) == pytest.approx(v, rel=1e-5)
  assert float(out["overall"]) == pytest.approx(np.sqrt(sum(v**2 for v in expected.values())), rel=1e-5)
  assert float(M.parameter_drift(init, init)["overall"]) == 0.0


def test_parameter_drift_rejects_mismatched_trees():
  a = {"Dense_0": {"kernel": np.zeros((2, 3))}}
  with pytest.raises(ValueError, match="'Dense_0/kernel'.*shape"):
    M.parameter_drift(a, {"Dense_0": {"kernel": np.zeros((3, 3))}})
  with pytest.raises(ValueError, match="missing"):
    M.parameter_drift(a, {"Dense_1": {"kernel": np.zeros((2, 3))}})


def test_churn_against_numpy():
  rng = np.random.default_rng(4)
  before = rng.normal(size=(30, 10)).astype(np.float32)
  after = (before + rng.normal(size=(30, 10)) * 0.7).astype(np.float32)
  assert float(M.output_churn(before, after)) == pytest.approx(
    np.mean([np.linalg.norm(after[i] - before[i]) for i in range(30)]), rel=1e-5
  )
  assert float(M.prediction_churn(before, after)) == pytest.approx(
    np.mean([np.argmax(after[i]) != np.argmax(before[i]) for i in range(30)])
  )
  assert float(M.prediction_churn(before, before)) == 0.0
  with pytest.raises(ValueError, match="shape"):
    M.output_churn(before, after[:5])


# ------------------------------------------------------------------------------------------------------------
# Trainability probe.
# ------------------------------------------------------------------------------------------------------------


def test_trainability_probe_against_numpy_gradient_descent():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = rng.normal(size=16).astype(np.float32)
  w0 = rng.normal(size=3).astype(np.float32)
  loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
  out = M.trainability_probe(loss, jnp.asarray(w0), x, y, optax.sgd(0.05), steps=7)
  w = w0.astype(np.float64)
  np_loss = lambda w: float(np.mean((x @ w - y) ** 2))
  before = np_loss(w)
  for _ in range(7):
    w = w - 0.05 * (2 / 16) * x.T @ (x @ w - y)  # the gradient of the mean squared error
  assert float(out["loss_before"]) == pytest.approx(before, rel=1e-5)
  assert float(out["loss_after"]) == pytest.approx(np_loss(w), rel=1e-4)
  assert float(out["loss_reduction"]) == pytest.approx((before - np_loss(w)) / before, rel=1e-4)


class _Tanh(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(16)(x)))


def test_trainability_probe_sees_a_saturated_net_learn_less_and_vmaps():
  model = _Tanh()
  x = jax.random.normal(jax.random.key(0), (32, 4))
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  fresh = model.init(jax.random.key(2), x)["params"]
  # Saturate the hidden layer: every tanh unit sits at +-1, its gradient ~0.
  saturated = jax.tree.map(lambda a: a, fresh)
  saturated["Dense_0"] = {"kernel": fresh["Dense_0"]["kernel"] * 200.0, "bias": fresh["Dense_0"]["bias"]}

  def loss(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y))

  probe = jax.jit(lambda p: M.trainability_probe(loss, p, x, labels, optax.sgd(0.5), steps=30))
  fresh_out, sat_out = probe(fresh), probe(saturated)
  assert float(fresh_out["loss_reduction"]) > float(sat_out["loss_reduction"]) + 0.05
  both = jax.vmap(probe)(jax.tree.map(lambda a, b: jnp.stack([a, b]), fresh, saturated))
  np.testing.assert_allclose(
    both["loss_reduction"], [fresh_out["loss_reduction"], sat_out["loss_reduction"]], rtol=1e-4, atol=1e-6
  )


def test_trainability_probe_errors():
  loss = lambda w, x, y: jnp.sum(w)
  with pytest.raises(ValueError, match="steps"):
    M.trainability_probe(loss, jnp.zeros(2), None, None, optax.sgd(0.1), steps=0)
  with pytest.raises(ValueError, match="optimizer"):
    M.trainability_probe(loss, jnp.zeros(2), None, None, 0.1, steps=2)


# ------------------------------------------------------------------------------------------------------------
# Top Hessian eigenvalue.
# ------------------------------------------------------------------------------------------------------------


class _SmallNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jnp.tanh(nn.Dense(4)(x)))


def _small_net_loss():
  model = _SmallNet()
  x = jax.random.normal(jax.random.key(0), (12, 3))
  y = jax.random.randint(jax.random.key(1), (12,), 0, 2)
  params = model.init(jax.random.key(2), x)["params"]
  # Trained a little so the Hessian is not dominated by the initialisation's structure.
  loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y))
  train = jax.jit(
    lambda p: jax.lax.fori_loop(
      0, 20, lambda _, p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)), p
    )
  )
  return loss, train(params)


def test_top_hessian_eigenvalue_against_numpy_eigvalsh_of_the_explicit_hessian():
  loss, params = _small_net_loss()
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = np.asarray(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat), np.float64)
  eigenvalues = np.linalg.eigvalsh((hessian + hessian.T) / 2)
  top = eigenvalues[-1]
  assert abs(eigenvalues[0]) < top  # a case where power iteration and Lanczos agree on the target
  n = flat.size  # 26 parameters: n Lanczos steps span the whole space
  exact = float(M.top_hessian_eigenvalue(loss, params, jax.random.key(3), num_iterations=n))
  assert exact == pytest.approx(top, rel=2e-3)
  # A few iterations already give the top eigenvalue (it converges first), from any start, under vmap.
  few = jax.jit(jax.vmap(lambda k: M.top_hessian_eigenvalue(loss, params, k, num_iterations=12)))(
    jax.random.split(jax.random.key(4), 3)
  )
  np.testing.assert_allclose(few, top, rtol=1e-2)
  assert np.all(np.asarray(few) <= top * (1 + 1e-3))  # Ritz values approach from below


def test_top_hessian_eigenvalue_is_the_most_positive_not_the_largest_magnitude():
  scales = jnp.array([-5.0, 1.0, 2.0])  # power iteration would return -5
  loss = lambda w: 0.5 * jnp.sum(scales * w**2)
  assert float(M.top_hessian_eigenvalue(loss, jnp.ones(3), jax.random.key(0))) == pytest.approx(2.0, rel=1e-5)
  # Breakdown after one step (H = -I: every vector is an eigenvector); padding cannot raise the result above -1.
  neg = lambda p: -0.5 * jnp.sum(p["w"] ** 2)
  assert float(M.top_hessian_eigenvalue(neg, {"w": jnp.ones(4)}, jax.random.key(1), 10)) == pytest.approx(
    -1.0
  )


def test_top_hessian_eigenvalue_errors():
  with pytest.raises(ValueError, match="num_iterations"):
    M.top_hessian_eigenvalue(lambda w: jnp.sum(w**2), jnp.ones(2), jax.random.key(0), num_iterations=0)
  with pytest.raises(ValueError, match="no entries"):
    M.top_hessian_eigenvalue(lambda w: 0.0, {}, jax.random.key(0))
