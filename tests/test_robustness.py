"""Robustness of cbp(): bad inputs, non-finite numbers, long runs.

* Bad inputs are refused with a ValueError naming what is wrong, at trace
  time (under `jax.eval_shape`, i.e. before any computation), and leave the
  optimizer state, parameters and compiled step as they were.
* Non-finite activations and gradients follow the README policy ("Non-finite
  activations"): the affected unit keeps its previous running statistics,
  `CbpState.nonfinite` counts the unit-steps, and a unit whose utility is not
  finite is never selected. A debug mode that raises instead is
  `jax.experimental.checkify` (no library support needed, see
  `test_checkify_debug_mode_raises_on_a_nan_gradient_step`).
* Long runs: ages saturate at `cbp_jax.utility.AGE_CAP`, bias correction
  stays finite, and 100k-step (1M-step with `-m slow`) runs stay finite in
  float32 and bfloat16.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify

import cbp_jax
from cbp_jax.utility import AGE_CAP
from tests.cbp_steps import batches, make_step, mlp
from tests.numpy_reference import NumpyUnitStats, consumer_rows
from tests.test_integration import NnxMLP, graph_of

HIDDEN = (6, 5)
ADAM = optax.adam(1e-2)  # One object, so cached compiled updates are reused.


def snapshot(tree):
  """Copies of every leaf (PRNG keys as their key data)."""

  def copy(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.array(x)

  return [copy(x) for x in jax.tree.leaves(tree)]


def assert_same(tree, snap):
  leaves = jax.tree.leaves(tree)
  assert len(leaves) == len(snap)
  for a, b in zip(snapshot(leaves), snap):
    np.testing.assert_array_equal(a, b)


# --- Shared, compiled once per module ------------------------------------


@functools.cache
def net():
  return mlp(hidden=HIDDEN)


@functools.cache
def grads_and_acts():
  model, _ = net()

  def loss_fn(p, x, y):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean((out - y) ** 2), acts

  @jax.jit
  def fn(p, x, y):
    (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y)
    return g, acts

  return fn


@functools.cache
def cbp_update(**kwargs):
  """(tx, jitted update(updates, state, params, activations)) of cbp(**kwargs)."""
  _, params = net()
  kwargs = {"key": 0, "decay_rate": 0.9, "utility": "adaptable_contribution", **kwargs}
  tx = cbp_jax.cbp(graph_of(params), **kwargs)
  return tx, jax.jit(lambda u, s, p, a: tx.update(u, s, p, activations=a))


def sgd(grads, lr=0.05):
  return jax.tree.map(lambda g: -lr * g, grads)


def warm_state(update, tx, steps=3):
  """Params and state after a few clean steps (no replacement yet when immature)."""
  _, params = net()
  state = tx.init(params)
  for x, y in batches(steps):
    g, acts = grads_and_acts()(params, x, y)
    u, state = update(sgd(g), state, params, acts)
    params = optax.apply_updates(params, u)
  return params, state


# --- Bad inputs: clear errors at trace time, nothing corrupted --------------


BAD_ACTIVATIONS = [
  (
    lambda a: {**a, "Dense_0": a["Dense_0"].astype(jnp.int32)},
    "activation of layer 'Dense_0' must be floating point, got int32",
  ),
  (
    lambda a: {**a, "Dense_1": a["Dense_1"] > 0},
    "activation of layer 'Dense_1' must be floating point, got bool",
  ),
  (
    lambda a: {**a, "Dense_0": a["Dense_0"][:, :4]},
    "layer 'Dense_0' must have the layer's 6 units on its last axis, got shape \\(8, 4\\)",
  ),
  (
    lambda a: {**a, "Dense_1": a["Dense_1"].T},
    "layer 'Dense_1' must have the layer's 5 units on its last axis, got shape \\(5, 8\\)",
  ),
  (
    lambda a: {**a, "Dense_0": jnp.float32(1.0)},
    "layer 'Dense_0' must have the layer's 6 units on its last axis, got shape \\(\\)",
  ),
  (
    lambda a: {**a, "Dense_0": [[1.0] * 6]},
    "layer 'Dense_0' must have the layer's 6 units on its last axis, got shape None",
  ),
  (lambda a: {"Dense_0": a["Dense_0"]}, "activations has no entry for layer 'Dense_1'"),
  (lambda a: list(a.values()), "activations must be a dict, got list"),
]


@pytest.mark.parametrize(
  "corrupt, message",
  BAD_ACTIVATIONS,
  ids=["int", "bool", "narrow", "transposed", "scalar", "list-leaf", "missing", "list"],
)
def test_bad_activations_are_refused_at_trace_time_and_corrupt_nothing(corrupt, message):
  tx, update = cbp_update(replacement_rate=0.2, maturity_threshold=1, optimizer=ADAM)
  params, state = warm_state(update, tx)
  x, y = next(batches(1, seed=7))
  g, acts = grads_and_acts()(params, x, y)
  expected_u, expected_state = update(g, state, params, acts)
  before = snapshot((params, state, g))

  bad = corrupt(acts)
  # Under eval_shape nothing is computed: the error is raised while tracing.
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda g, s, p: tx.update(g, s, p, activations=bad), g, state, params)
  with pytest.raises(ValueError, match=message):
    tx.update(g, state, params, activations=bad)
  if not isinstance(bad, list) and all(hasattr(v, "dtype") for v in bad.values()):
    with pytest.raises(ValueError, match=message):
      update(g, state, params, bad)

  assert_same((params, state, g), before)
  # The compiled step still gives exactly what it gave before the failures.
  u, new_state = update(g, state, params, acts)
  assert_same((u, new_state), snapshot((expected_u, expected_state)))


def test_nnx_optimizer_is_untouched_by_a_refused_update():
  """nnx.Optimizer is stateful: a refused update must not half-apply."""
  model = NnxMLP(nnx.Rngs(0))
  graph = cbp_jax.graph_from_params(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(
    model,
    cbp_jax.cbp(graph, key=0, maturity_threshold=0, replacement_rate=0.5, optimizer=optax.adam(1e-2)),
    wrt=nnx.Param,
  )
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  acts = {"layers/0": jnp.ones((8, 6)), "layers/1": jnp.ones((8, 5))}
  before = snapshot((nnx.state(model), nnx.state(optimizer)))
  bad = {**acts, "layers/1": acts["layers/1"].astype(jnp.int32)}
  with pytest.raises(ValueError, match="layer 'layers/1' must be floating point, got int32"):
    optimizer.update(model, grads, activations=bad)
  with pytest.raises(ValueError, match="activations has no entry for layer 'layers/0'"):
    optimizer.update(model, grads, activations={"layers/1": acts["layers/1"]})
  assert_same((nnx.state(model), nnx.state(optimizer)), before)


def _graph(
  kernel="Dense_0/kernel",
  bias="Dense_0/bias",
  consumer="Dense_1/kernel",
  consumer_bias="Dense_1/bias",
  norm=None,
):
  return cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        "h", kernel=kernel, bias=bias, norm=norm, consumers=[cbp_jax.Consumer(consumer, consumer_bias)]
      )
    ]
  )


@pytest.mark.parametrize(
  "field, path",
  [
    ("kernel", "Dense_7/kernel"),
    ("bias", "Dense_0/b"),
    ("consumer", "Dense_1/kernal"),
    ("consumer_bias", "head/bias"),
  ],
)
def test_graph_naming_a_missing_parameter_is_refused_at_init_and_update(field, path):
  _, params = mlp(hidden=(6,))
  graph = _graph(**{field: path})
  message = f"layer 'h': no parameter named '{path}' in the parameter tree \\(it has: Dense_0/bias"
  tx = cbp_jax.cbp(graph, key=0)
  with pytest.raises(ValueError, match=message):
    tx.init(params)
  # A state made for other params, then an update with these: refused too.
  good_tx = cbp_jax.cbp(_graph(), key=0)
  state = good_tx.init(params)
  before = snapshot(state)
  acts = {"h": jnp.ones((2, 6))}
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda s, p: tx.update(p, s, p, activations=acts), state, params)
  assert_same(state, before)


def test_graph_naming_a_missing_norm_is_refused():
  _, params = mlp(hidden=(6,))
  with pytest.raises(ValueError, match="layer 'h': norm 'LayerNorm_0' has neither 'scale' nor 'bias'"):
    cbp_jax.cbp(_graph(norm="LayerNorm_0"), key=0).init(params)


def test_layer_of_width_zero_is_refused_at_init():
  params = {
    "Dense_0": {"kernel": jnp.ones((4, 0)), "bias": jnp.ones((0,))},
    "Dense_1": {"kernel": jnp.ones((0, 2)), "bias": jnp.ones((2,))},
  }
  with pytest.raises(
    ValueError,
    match="layer 'h': kernel 'Dense_0/kernel' must have at least 2 axes "
    "and units on its last axis, got shape \\(4, 0\\)",
  ):
    cbp_jax.cbp(_graph(), key=0).init(params)


def test_graph_from_params_refuses_a_layer_of_width_zero():
  params = {
    "Dense_0": {"kernel": jnp.ones((4, 0)), "bias": jnp.ones((0,))},
    "Dense_1": {"kernel": jnp.ones((0, 2)), "bias": jnp.ones((2,))},
  }
  with pytest.raises(ValueError, match="Dense_0.*width 0|Dense_0.*0 units"):
    cbp_jax.graph_from_params(params)


@pytest.mark.parametrize(
  "params",
  [
    {
      "Dense_0": {"kernel": jnp.ones((0, 3)), "bias": jnp.ones((3,))},
      "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
    },
    {
      "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
      "Dense_1": {"kernel": jnp.ones((3, 0)), "bias": jnp.ones((0,))},
    },
  ],
  ids=["no-inputs", "no-outputs"],
)
def test_empty_kernels_are_refused_at_init_naming_the_layer(params):
  with pytest.raises(ValueError, match="layer 'h'"):
    cbp_jax.cbp(_graph(), key=0).init(params)


@pytest.mark.parametrize(
  "name, value, message",
  [
    ("replacement_rate", -1e-9, "replacement_rate must be in \\[0.0, 1.0\\], got -1e-09"),
    ("replacement_rate", 1.000001, "replacement_rate must be in \\[0.0, 1.0\\], got 1.000001"),
    ("replacement_rate", float("nan"), "replacement_rate must be in \\[0.0, 1.0\\], got nan"),
    ("replacement_rate", float("inf"), "replacement_rate must be in \\[0.0, 1.0\\], got inf"),
    ("replacement_rate", jnp.float32(2.0), "replacement_rate must be in \\[0.0, 1.0\\], got 2.0"),
    ("replacement_rate", [0.1, 0.2], "replacement_rate must be a scalar number"),
    ("replacement_rate", "0.1", "replacement_rate must be a scalar number"),
    ("maturity_threshold", -1, "maturity_threshold must be >= 0, got -1"),
    ("maturity_threshold", -0.5, "maturity_threshold must be >= 0, got -0.5"),
    ("maturity_threshold", -float("inf"), "maturity_threshold must be >= 0, got -inf"),
    ("decay_rate", -0.1, "decay_rate must be in \\[0.0, 1.0\\), got -0.1"),
    ("decay_rate", 1.0, "decay_rate must be in \\[0.0, 1.0\\), got 1.0"),
    ("decay_rate", 1.5, "decay_rate must be in \\[0.0, 1.0\\), got 1.5"),
    ("decay_rate", float("nan"), "decay_rate must be in \\[0.0, 1.0\\), got nan"),
    ("decay_rate", float("-inf"), "decay_rate must be in \\[0.0, 1.0\\), got -inf"),
  ],
)
def test_hyperparameters_out_of_range_are_refused_at_construction(name, value, message):
  _, params = net()
  with pytest.raises(ValueError, match=message):
    cbp_jax.cbp(graph_of(params), key=0, **{name: value})


def test_hyperparameters_at_the_edges_of_their_ranges_are_accepted():
  _, params = net()
  for kwargs in (
    {"replacement_rate": 0.0},
    {"replacement_rate": 1.0},
    {"decay_rate": 0.0},
    {"decay_rate": 0.999999},
    {"maturity_threshold": 0},
  ):
    cbp_jax.cbp(graph_of(params), key=0, **kwargs).init(params)


@pytest.mark.parametrize(
  "value, message",
  [
    (float("nan"), "maturity_threshold must be >= 0, got nan"),
    ("3", "maturity_threshold must be a scalar number"),
    ([1, 2], "maturity_threshold must be a scalar number"),
  ],
  ids=["nan", "string", "array"],
)
def test_maturity_threshold_that_is_not_a_number_is_refused(value, message):
  _, params = net()
  with pytest.raises(ValueError, match=message):
    cbp_jax.cbp(graph_of(params), key=0, maturity_threshold=value)


@pytest.mark.parametrize("key", [None, "seed", 1.5], ids=["none", "string", "float"])
def test_bad_key_is_refused_at_construction(key):
  _, params = net()
  with pytest.raises(ValueError, match="key"):
    cbp_jax.cbp(graph_of(params), key=key)


# --- Non-finite numbers: the README policy -------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_activation_of_one_unit_for_one_step(bad):
  """One unit's activation is non-finite for one step (one batch entry).

  That unit keeps its previous running utility and mean activation (bitwise)
  while its age advances; every other unit's statistics are bitwise those of
  the same step with clean activations; `nonfinite` counts exactly one
  unit-step; the next clean step continues from the kept values (checked
  against the NumPy re-computation).
  """
  tx, update = cbp_update(maturity_threshold=1000)  # Statistics only: nothing replaced.
  params, state = warm_state(update, tx)
  x, y = next(batches(1, seed=11))
  g, acts = grads_and_acts()(params, x, y)
  bad_acts = {**acts, "Dense_0": acts["Dense_0"].at[1, 2].set(bad)}
  u_clean, clean = update(sgd(g), state, params, acts)
  u_bad, after = update(sgd(g), state, params, bad_acts)

  assert int(state.nonfinite) == 0 and int(after.nonfinite) == 1
  prev, got, ref = state.statistics["Dense_0"], after.statistics["Dense_0"], clean.statistics["Dense_0"]
  np.testing.assert_array_equal(got.utility[2], prev.utility[2])
  np.testing.assert_array_equal(got.mean_activation[2], prev.mean_activation[2])
  np.testing.assert_array_equal(got.age, prev.age + 1)
  others = np.arange(6) != 2
  np.testing.assert_array_equal(got.utility[others], ref.utility[others])
  np.testing.assert_array_equal(got.mean_activation[others], ref.mean_activation[others])
  assert_same(after.statistics["Dense_1"], snapshot(clean.statistics["Dense_1"]))
  assert_same(u_bad, snapshot(u_clean))
  assert np.all(np.isfinite(cbp_jax.unit_stats(after)["Dense_0"]["utility"]))

  # The next, clean step continues from the kept statistics.
  params = optax.apply_updates(params, u_bad)
  x, y = next(batches(1, seed=12))
  g, acts = grads_and_acts()(params, x, y)
  u, later = update(sgd(g), after, params, acts)
  assert int(later.nonfinite) == 1
  post = optax.apply_updates(params, u)
  ref = NumpyUnitStats(6, 0.9)
  ref.utility = np.asarray(got.utility, np.float64)
  ref.mean = np.asarray(got.mean_activation, np.float64)
  ref.age = np.asarray(got.age, np.int64)
  expected_u, expected_f = ref.step(
    np.asarray(acts["Dense_0"]),
    post["Dense_0"]["kernel"],
    [consumer_rows(post["Dense_1"]["kernel"], 6)],
    "adaptable_contribution",
  )
  stats = cbp_jax.unit_stats(later)["Dense_0"]
  np.testing.assert_allclose(stats["utility"], expected_u, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(stats["mean_activation"], expected_f, rtol=2e-4, atol=1e-7)


def test_nonfinite_gradient_counts_exactly_the_units_it_reaches():
  """A NaN gradient in Dense_1's kernel entry [3, 0] makes the post-step
  outgoing magnitude of Dense_0's unit 3 and the incoming magnitude of
  Dense_1's unit 0 NaN: two unit-steps, both units keep their statistics,
  all other units are bitwise as with a clean gradient."""
  tx, update = cbp_update(maturity_threshold=1000)
  params, state = warm_state(update, tx)
  x, y = next(batches(1, seed=13))
  g, acts = grads_and_acts()(params, x, y)
  bad_g = jax.tree.map(lambda a: a, g)
  bad_g["Dense_1"]["kernel"] = g["Dense_1"]["kernel"].at[3, 0].set(jnp.nan)
  _, clean = update(sgd(g), state, params, acts)
  _, after = update(sgd(bad_g), state, params, acts)

  assert int(after.nonfinite) == 2
  for name, unit, width in (("Dense_0", 3, 6), ("Dense_1", 0, 5)):
    prev, got, ref = state.statistics[name], after.statistics[name], clean.statistics[name]
    np.testing.assert_array_equal(got.utility[unit], prev.utility[unit])
    np.testing.assert_array_equal(got.mean_activation[unit], prev.mean_activation[unit])
    others = np.arange(width) != unit
    np.testing.assert_array_equal(got.utility[others], ref.utility[others])
    np.testing.assert_array_equal(got.mean_activation[others], ref.mean_activation[others])


def mature_state(tx, params, utility, mean, age=50):
  """tx.init(params) with given Dense_0 running statistics and all ages ``age``."""
  state = tx.init(params)
  stats = {n: s._replace(age=jnp.full_like(s.age, age)) for n, s in state.statistics.items()}
  stats["Dense_0"] = stats["Dense_0"]._replace(
    utility=jnp.asarray(utility, jnp.float32), mean_activation=jnp.asarray(mean, jnp.float32)
  )
  return state._replace(layers={n: l._replace(statistics=stats[n]) for n, l in state.layers.items()})


def test_unit_with_nonfinite_utility_is_never_replaced():
  """Even at rate 1 (every eligible unit due every step), a unit whose running
  utility is NaN is never selected; each step counts it once in `nonfinite`."""
  tx, update = cbp_update(replacement_rate=1.0, maturity_threshold=0)
  _, params = net()
  utility = np.array([0.5, 0.4, 0.3, 0.2, np.nan, 0.1])
  state = mature_state(tx, params, utility, np.full(6, 0.2))
  for t, (x, y) in enumerate(batches(4, seed=3), start=1):
    g, acts = grads_and_acts()(params, x, y)
    u, state = update(sgd(g), state, params, acts)
    params = optax.apply_updates(params, u)
    np.testing.assert_array_equal(state.last_replaced["Dense_0"], np.arange(6) != 4)
    assert np.isnan(state.statistics["Dense_0"].utility[4])
    assert int(state.nonfinite) == t
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  assert int(state.replaced_total["Dense_0"]) == 4 * 5


def test_unit_with_a_nonfinite_activation_is_ranked_by_its_kept_utility():
  """At the bad step the unit's utility is its kept (finite) one, so it is
  still ranked; here it is the lowest and is replaced, and the consumer's
  bias absorbs w_out * f_hat with the kept, finite mean activation."""
  tx, update = cbp_update(replacement_rate=1 / 6, maturity_threshold=0)
  _, params = net()
  utility = np.array([0.5, 0.4, 0.01, 0.3, 0.2, 0.6])
  mean = np.array([0.1, 0.2, 0.7, 0.3, 0.4, 0.5])
  state = mature_state(tx, params, utility, mean)
  x, y = next(batches(1, seed=5))
  g, acts = grads_and_acts()(params, x, y)
  acts = {**acts, "Dense_0": acts["Dense_0"].at[:, 2].set(jnp.nan)}
  u, after = update(sgd(g), state, params, acts)

  assert int(after.nonfinite) == 1
  np.testing.assert_array_equal(after.last_replaced["Dense_0"], np.arange(6) == 2)
  plain = sgd(g)
  f_hat = np.float32(mean[2]) / (1 - np.float32(0.9) ** 51)  # Kept mean, age 51.
  w_out = np.asarray(params["Dense_1"]["kernel"][2]) + np.asarray(plain["Dense_1"]["kernel"][2])
  expected = np.asarray(plain["Dense_1"]["bias"]) + w_out * f_hat
  new_bias = np.asarray(u["Dense_1"]["bias"])
  keep = ~np.asarray(after.last_replaced["Dense_1"])  # Replaced Dense_1 units' biases are 0.
  np.testing.assert_allclose(new_bias[keep], expected[keep], rtol=1e-5, atol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(u))


def test_checkify_debug_mode_raises_on_a_nan_gradient_step():
  """Debug mode, the JAX way: wrap the (jitted) training step with checkify.

      from jax.experimental import checkify

      checked_step = jax.jit(checkify.checkify(step, errors=checkify.float_checks))
      err, (params, opt_state, loss) = checked_step(params, opt_state, x, y)
      err.throw()  # checkify.JaxRuntimeError: "nan generated by primitive: ..."

  `float_checks` flags the first operation that produces a NaN (here the
  forward pass of a batch holding a NaN) and division by zero, so it raises
  where cbp's policy would silently keep the previous statistics. Clean steps,
  with replacements, raise nothing. (It also flags NaNs cbp would absorb,
  e.g. an ``adaptable_contribution`` 0/0 for a unit whose incoming weights
  are all exactly zero.)
  """
  model, params = net()
  tx = optax.chain(
    optax.sgd(0.05),
    cbp_jax.cbp(
      graph_of(params), key=0, replacement_rate=0.2, maturity_threshold=1, utility="adaptable_contribution"
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)  # A jitted step; checkify handles the jit inside.
  checked_step = jax.jit(checkify.checkify(step, errors=checkify.float_checks))
  for x, y in batches(4):
    err, (params, state, _, _) = checked_step(params, state, x, y)
    err.throw()  # Nothing to report.
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) > 0
  x = x.at[0, 1].set(jnp.nan)
  err, _ = checked_step(params, state, x, y)
  with pytest.raises(checkify.JaxRuntimeError, match="nan generated by primitive"):
    err.throw()


# --- Long runs --------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 0.999999])
def test_bias_correction_is_finite_at_both_ends_of_the_age_range(decay):
  running = jnp.array([0.25, 1.0, -3.0], jnp.float32)
  at_cap = cbp_jax.utility.debias(running, decay, jnp.full((3,), AGE_CAP, jnp.int32))
  np.testing.assert_array_equal(at_cap, running)  # decay ** 2**30 is exactly 0.
  young = cbp_jax.utility.debias(running, decay, jnp.ones((3,), jnp.int32))
  assert np.all(np.isfinite(young))
  np.testing.assert_allclose(young, running / (1 - np.float32(decay)), rtol=1e-5)
  np.testing.assert_array_equal(cbp_jax.utility.debias(running, decay, jnp.zeros((3,), jnp.int32)), 0.0)


def test_ages_near_the_cap_saturate_and_units_stay_replaceable():
  """Ages start 1-2 steps below AGE_CAP (2**30); after a few steps they sit at
  the cap (no int32 wrap-around), bias-corrected statistics equal the running
  ones and are finite, and mature units at the cap are still replaced."""
  tx, update = cbp_update(replacement_rate=1 / 16, maturity_threshold=10)
  _, params = net()
  state = tx.init(params)
  rng = np.random.default_rng(0)
  stats = {}
  for name, s in state.statistics.items():
    n = s.age.shape[0]
    stats[name] = s._replace(
      age=jnp.asarray(AGE_CAP - rng.integers(0, 3, n), jnp.int32),
      utility=jnp.asarray(rng.uniform(0.1, 1, n), jnp.float32),
      mean_activation=jnp.asarray(rng.uniform(0.1, 1, n), jnp.float32),
    )
  state = state._replace(layers={n: l._replace(statistics=stats[n]) for n, l in state.layers.items()})
  replaced = {n: np.zeros(s.age.shape, bool) for n, s in stats.items()}
  for x, y in batches(6):
    g, acts = grads_and_acts()(params, x, y)
    u, state = update(sgd(g), state, params, acts)
    params = optax.apply_updates(params, u)
    for name in replaced:
      replaced[name] |= np.asarray(state.last_replaced[name])
  view = cbp_jax.unit_stats(state)
  for name, s in state.statistics.items():
    age = np.asarray(s.age)
    assert np.all((age >= 0) & (age <= AGE_CAP))
    np.testing.assert_array_equal(age[~replaced[name]], AGE_CAP)
    assert np.all(age[replaced[name]] <= 6)
    old = ~replaced[name]
    np.testing.assert_array_equal(np.asarray(view[name]["utility"])[old], np.asarray(s.utility)[old])
    np.testing.assert_array_equal(
      np.asarray(view[name]["mean_activation"])[old], np.asarray(s.mean_activation)[old]
    )
    assert np.all(np.isfinite(view[name]["utility"])) and np.all(np.isfinite(view[name]["mean_activation"]))
  assert replaced["Dense_0"].any() and replaced["Dense_1"].any()
  assert int(state.nonfinite) == 0


def regression_stream(key, t):
  """Slowly-changing regression (SPEC): 20 bits, the first 15 redrawn every
  10,000 steps; the target a fixed random 20-100-1 net of linear threshold
  units (weights +-1, threshold 0.7 * 20 - #negative weights)."""
  kw, kv, kslow, kfast = jax.random.split(key, 4)
  w = jnp.where(jax.random.bernoulli(kw, 0.5, (20, 100)), 1.0, -1.0)
  v = jnp.where(jax.random.bernoulli(kv, 0.5, (100,)), 1.0, -1.0)
  theta = 0.7 * 20 - jnp.sum(w < 0, axis=0)
  slow = jax.random.bernoulli(jax.random.fold_in(kslow, t // 10_000), 0.5, (15,))
  fast = jax.random.bernoulli(jax.random.fold_in(kfast, t), 0.5, (5,))
  x = jnp.concatenate([slow, fast]).astype(jnp.float32)[None]
  y = ((x @ w > theta).astype(jnp.float32) @ v)[None, None]
  return x, y


def classification_stream(key, t):
  """MNIST-sized stream: 784 uniform pixels, the label a fixed random linear
  function of them, one-hot."""
  w = jax.random.normal(key, (784, 10))
  x = jax.random.uniform(jax.random.fold_in(key, t), (1, 784))
  return x, jax.nn.one_hot(jnp.argmax(x @ w, axis=-1), 10)


def long_run(steps, dtype, *, hidden, inputs, outputs, stream, lr, rate, maturity):
  """`steps` steps of SGD + cbp (batch 1) in one scan; returns (params, state, losses, seconds)."""
  model, params = mlp(hidden=hidden, inputs=inputs, outputs=outputs, param_dtype=dtype)
  tx = optax.chain(
    optax.sgd(lr),
    cbp_jax.cbp(
      graph_of(params),
      key=1,
      replacement_rate=rate,
      maturity_threshold=maturity,
      decay_rate=0.99,
      utility="adaptable_contribution",
      init="kaiming",
    ),
  )
  step = make_step(model, tx)
  key = jax.random.key(0)
  head_input, head = f"Dense_{len(hidden) - 1}", f"Dense_{len(hidden)}"

  @jax.jit
  def run(params):
    def body(carry, t):
      p, s = carry
      x, y = stream(key, t)
      p2, s, _, acts = step(p, s, x.astype(dtype), y.astype(dtype))
      # The batch's loss before the step, from the last hidden layer and the head.
      out = acts[head_input] @ p[head]["kernel"] + p[head]["bias"]
      return (p2, s), jnp.mean((out.astype(jnp.float32) - y) ** 2)

    (p, s), losses = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return p, s, losses

  start = time.perf_counter()
  p, s, losses = jax.block_until_ready(run(params))
  return p, s, np.asarray(losses), time.perf_counter() - start


def check_long_run(params, state, losses, dtype, steps, rate, maturity):
  assert all(x.dtype == dtype for x in jax.tree.leaves(params))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert np.all(np.isfinite(losses))
  assert int(state[1].nonfinite) == 0
  for name, s in cbp_jax.unit_stats(state).items():
    assert np.all(np.isfinite(s["utility"])) and np.all(np.isfinite(s["mean_activation"]))
    assert np.all((s["age"] >= 0) & (s["age"] <= steps))
    width = s["age"].shape[0]
    # Accumulate mode: rate * n_eligible per step; at most `width` units are
    # immature at a time and only for `maturity` steps after a replacement.
    upper = rate * width * steps
    assert upper * 0.9 - 1 <= int(s["replaced"]) <= upper + 1, name
    assert 0.0 <= float(state[1].pending[name]) < 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_100k_steps_of_slowly_changing_regression_stay_finite(dtype):
  """The paper's 20-5-1 net, batch 1, SGD 0.01, CBP rate 1e-3, maturity 10."""
  params, state, losses, seconds = long_run(
    100_000,
    dtype,
    hidden=(5,),
    inputs=20,
    outputs=1,
    stream=regression_stream,
    lr=0.01,
    rate=1e-3,
    maturity=10,
  )
  check_long_run(params, state, losses, dtype, 100_000, 1e-3, 10)
  if dtype == jnp.float32:  # It learns (deterministic: fixed keys and data).
    assert np.mean(losses[-10_000:]) < np.mean(losses[:1_000])
  print(f"100k steps ({np.dtype(dtype).name}), compile included: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_1m_steps_of_slowly_changing_regression_stay_finite(dtype):
  params, state, losses, seconds = long_run(
    1_000_000,
    dtype,
    hidden=(5,),
    inputs=20,
    outputs=1,
    stream=regression_stream,
    lr=0.01,
    rate=1e-3,
    maturity=10,
  )
  check_long_run(params, state, losses, dtype, 1_000_000, 1e-3, 10)
  print(f"1M steps ({np.dtype(dtype).name}), compile included: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_100k_steps_of_the_mnist_sized_net_stay_finite(dtype):
  """784-2000-2000-2000-10, batch 1, SGD 0.003, CBP rate 1e-4, maturity 100
  (the paper's online permuted MNIST configuration)."""
  params, state, losses, _ = long_run(
    100_000,
    dtype,
    hidden=(2000, 2000, 2000),
    inputs=784,
    outputs=10,
    stream=classification_stream,
    lr=0.003,
    rate=1e-4,
    maturity=100,
  )
  check_long_run(params, state, losses, dtype, 100_000, 1e-4, 100)


# --- skip_nonfinite=True: a bad step is dropped whole -----------------------


def drop_skipped(state):
  """The state's leaves without the `skipped` counter (compared separately)."""
  return snapshot(state._replace(skipped=jnp.zeros((), jnp.int32)))


def assert_leaves_equal(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["gradient", "activation"])
def test_skip_nonfinite_drops_the_step_and_keeps_the_state(where):
  """A NaN gradient entry (or activation) under `skip_nonfinite=True`: zero
  updates, the whole state (Adam's moments and count, unit statistics, key,
  pending counts) bitwise as before, `skipped` 1; the next clean step is
  bitwise the step the unguarded transform takes from the same state."""
  kwargs = dict(replacement_rate=0.2, maturity_threshold=1, optimizer=ADAM)
  tx, update = cbp_update(skip_nonfinite=True, **kwargs)
  plain_tx, plain_update = cbp_update(**kwargs)
  params, state = warm_state(update, tx)
  assert int(state.skipped) == 0
  x, y = next(batches(1, seed=21))
  g, acts = grads_and_acts()(params, x, y)
  if where == "gradient":
    g = jax.tree.map(lambda a: a, g)
    g["Dense_0"]["kernel"] = g["Dense_0"]["kernel"].at[1, 2].set(jnp.nan)
  else:
    acts = {**acts, "Dense_1": acts["Dense_1"].at[0, 4].set(jnp.inf)}
  before = drop_skipped(state)
  u, after = update(g, state, params, acts)

  assert int(after.skipped) == 1
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  assert_leaves_equal(drop_skipped(after), before)

  x, y = next(batches(1, seed=22))
  g, acts = grads_and_acts()(params, x, y)
  u_guarded, guarded = update(g, after, params, acts)
  u_plain, plain = plain_update(g, state, params, acts)
  assert_same(u_guarded, snapshot(u_plain))
  assert int(guarded.skipped) == 1 and int(plain.skipped) == 0
  assert_leaves_equal(drop_skipped(guarded), drop_skipped(plain))


def test_skip_nonfinite_changes_nothing_on_finite_steps():
  """Over steps that replace units, the guarded transform's updates and state
  are bitwise the unguarded one's, and `skipped` stays 0."""
  kwargs = dict(replacement_rate=0.2, maturity_threshold=1, optimizer=ADAM)
  tx, update = cbp_update(skip_nonfinite=True, **kwargs)
  plain_tx, plain_update = cbp_update(**kwargs)
  _, params = net()
  state, plain = tx.init(params), plain_tx.init(params)
  for x, y in batches(6, seed=23):
    g, acts = grads_and_acts()(params, x, y)
    u, state = update(g, state, params, acts)
    u_plain, plain = plain_update(g, plain, params, acts)
    assert_same(u, snapshot(u_plain))
    params = optax.apply_updates(params, u)
  assert int(state.skipped) == 0
  assert sum(int(v) for v in state.replaced_total.values()) > 0
  assert_leaves_equal(drop_skipped(state), drop_skipped(plain))


def test_skip_nonfinite_skips_each_vmapped_seed_on_its_own():
  """Two seeds vmapped, a NaN gradient in seed 1 only: seed 0 takes its step,
  seed 1 keeps its state and counts one skip."""
  tx, update = cbp_update(skip_nonfinite=True, replacement_rate=0.2, maturity_threshold=1, optimizer=ADAM)
  params, state = warm_state(update, tx)
  x, y = next(batches(1, seed=24))
  g, acts = grads_and_acts()(params, x, y)
  bad = jax.tree.map(lambda a: a, g)
  bad["Dense_1"]["bias"] = g["Dense_1"]["bias"].at[0].set(jnp.nan)
  stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  u, after = jax.vmap(update, in_axes=(0, None, None, None))(stack(g, bad), state, params, acts)
  u_clean, clean = update(g, state, params, acts)
  assert [int(s) for s in after.skipped] == [0, 1]
  # Seed 0 as the unbatched step, up to the rounding of a batched fusion.
  for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[0], u)), jax.tree.leaves(u_clean)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for leaf in jax.tree.leaves(jax.tree.map(lambda a: a[1], u)):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  np.testing.assert_array_equal(
    after.inner_state[0].mu["Dense_0"]["kernel"][1], state.inner_state[0].mu["Dense_0"]["kernel"]
  )


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_skip_nonfinite_must_be_a_bool(bad):
  _, params = net()
  with pytest.raises(ValueError, match="skip_nonfinite must be a bool, got"):
    cbp_jax.cbp(graph_of(params), key=0, skip_nonfinite=bad)
