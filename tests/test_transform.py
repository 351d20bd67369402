"""`cbp_jax/transform.py`: `cbp()`'s counts and eligibility (Semantics page, step 6), the BatchNorm statistics of
replaced units, the magnitude cache, and the state's layout (one `LayerState` per layer), against independent
expectations."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import transform
from tests.cbp_steps import WithBatchNorm, batches, make_step, mlp

# --- Counts, eligibility and selection ------------------------------------


def simulate_counts(steps, width, rate, maturity):
  """Expected accumulate-mode replacements per step, from eligibility alone.

  A unit's age after step t is t (never replaced) or t - s (replaced at step
  s); it is eligible iff its age > maturity. Which units are replaced does
  not change how many are eligible, so this needs no utilities.
  """
  pending, replaced_at, counts = 0.0, [], []
  for t in range(1, steps + 1):
    recent = sum(1 for s in replaced_at if t - s <= maturity)
    eligible = (width if t > maturity else 0) - recent
    pending += rate * eligible
    k = min(math.floor(pending), eligible)
    pending -= k
    replaced_at += [t] * k
    counts.append(k)
  return counts


@pytest.mark.parametrize(
  "maturity,rate,bound",
  [
    (0, 1 / 16, 8),
    (3, 1 / 16, 8),
    (7, 1 / 16, 8),
    # The default static bound, ceil(rate * width): 1 and 2 slots; it must
    # never hold back a replacement (rate * width 0.5, 1.5 and exactly 2).
    (3, 1 / 16, None),
    (3, 3 / 16, None),
    (0, 1 / 4, None),
  ],
)
def test_accumulate_mode_exact_counts_and_only_mature_units(maturity, rate, bound):
  width = 8
  model, params = mlp(hidden=(width,))
  # Dyadic rates, so float32 accumulation is exact.
  tx = optax.chain(
    optax.sgd(0.01),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params),
      key=0,
      replacement_rate=rate,
      maturity_threshold=maturity,
      max_replacements_per_step=bound,
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  expected = simulate_counts(60, width, rate, maturity)
  for t, (x, y) in enumerate(batches(60), start=1):
    ages_before = np.asarray(cbp_jax.unit_stats(state)["Dense_0"]["age"])
    params, state, _, _ = step(params, state, x, y)
    replaced = np.asarray(state[1].last_replaced["Dense_0"])
    assert replaced.sum() == expected[t - 1], f"step {t}"
    # Only mature units: age after this step's increment exceeds maturity.
    assert np.all(ages_before[replaced] + 1 > maturity)
    assert np.all(np.asarray(cbp_jax.unit_stats(state)["Dense_0"]["age"])[replaced] == 0)
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) == sum(expected)


@pytest.mark.parametrize(
  "basis, accumulate, pending, draw, expected",
  [
    # 3 of 8 units eligible, rate 0.5: "eligible" owes 1.5, "layer" 4 (8 units once any is eligible).
    ("eligible", True, 0.25, None, (1, 0.75)),  # floor(0.25 + 1.5) = 1, 0.75 carried.
    ("eligible", True, 0.75, None, (2, 0.25)),  # floor(2.25) = 2.
    ("layer", True, 0.0, None, (2, 1.0)),  # 4 due, only 3 eligible (1 forgiven), bound 2 (1 carried).
    ("eligible", False, 0.3, 0.2, (1, 0.3)),  # 1.5 >= 1: floor(1.5) = 1; pending untouched.
  ],
)
def test_replacement_count_by_hand(basis, accumulate, pending, draw, expected):
  eligible = jnp.asarray([True, False, True, False, False, True, False, False])
  count, new_pending = cbp_jax.transform._replacement_count(
    eligible,
    jnp.float32(pending),
    None if draw is None else jnp.float32(draw),
    rate=0.5,
    count_basis=basis,
    accumulate=accumulate,
    bound=2,
  )
  assert int(count) == expected[0]
  np.testing.assert_allclose(float(new_pending), expected[1], rtol=1e-6)


@pytest.mark.parametrize("draw, expected", [(0.04, 1), (0.06, 0)])
def test_replacement_count_lottery_below_one(draw, expected):
  """rate 0.01 x 5 eligible = 0.05 < 1: one unit when the draw falls under 0.05."""
  eligible = jnp.ones((5,), bool)
  count, pending = cbp_jax.transform._replacement_count(
    eligible,
    jnp.float32(0.0),
    jnp.float32(draw),
    rate=0.01,
    count_basis="eligible",
    accumulate=False,
    bound=1,
  )
  assert (int(count), float(pending)) == (expected, 0.0)


def test_layer_count_basis_counts_the_whole_layer():
  width = 8
  model, params = mlp(hidden=(width,))
  tx = optax.chain(
    optax.sgd(0.01),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params),
      key=0,
      replacement_rate=1 / 32,
      maturity_threshold=4,
      count_basis="layer",
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  for x, y in batches(36):
    params, state, _, _ = step(params, state, x, y)
  # Steps 5..36 have eligible units: 32 steps * 8 units / 32 = 8 replacements.
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) == 8


def test_probabilistic_mode_rate_matches_expectation():
  width = 10
  model, params = mlp(hidden=(width,))
  tx = optax.chain(
    optax.sgd(0.0),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=3, replacement_rate=0.02, maturity_threshold=0, accumulate=False
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  counts = []
  for x, y in batches(400):
    params, state, _, _ = step(params, state, x, y)
    counts.append(int(state[1].last_replaced["Dense_0"].sum()))
  counts = np.array(counts)
  assert counts.max() == 1  # rate * n = 0.2 < 1: one unit with probability 0.2.
  # Binomial(400, 0.2): mean 80, sd 8; 5 sd bounds.
  assert 40 <= counts.sum() <= 120


def test_batch_norm_statistics_of_replaced_units_are_reset():
  model = WithBatchNorm()
  variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
  params = variables["params"]
  graph = cbp_jax.graph_from_params(params)
  assert graph.layers[0].norm == "BatchNorm_0"
  tx = cbp_jax.cbp(graph, key=0, replacement_rate=0.5, maturity_threshold=0, optimizer=optax.sgd(0.01))
  state = tx.init(params)
  batch_stats = {"BatchNorm_0": {"mean": jnp.full((6,), 0.7), "var": jnp.full((6,), 3.0)}}
  x = jax.random.normal(jax.random.key(1), (8, 4))
  out, col = model.apply(
    {"params": params, "batch_stats": batch_stats}, x, mutable=["activations", "batch_stats"]
  )
  acts = cbp_jax.collect_activations(col["activations"])
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params, activations=acts)
  new_stats = cbp_jax.reset_batch_stats(batch_stats, graph, state)
  mask = np.asarray(state.last_replaced["Dense_0"])
  assert mask.sum() == 3
  np.testing.assert_array_equal(new_stats["BatchNorm_0"]["mean"], np.where(mask, 0.0, 0.7).astype(np.float32))
  np.testing.assert_array_equal(new_stats["BatchNorm_0"]["var"], np.where(mask, 1.0, 3.0))


# --- Weight magnitudes refreshed a slice at a time ----------------------------


@pytest.mark.parametrize("every", [2, 3, 7])
def test_magnitude_cache_refreshes_one_slice_per_step_and_is_exact_for_replaced_units(every):
  """Emulates the rotating refresh in NumPy from the observed weights.

  Width 5 and 6: slices of ceil(n / every) units, the last one clamped to end
  at the last unit. Maturity 6 lets replacements start mid-run.
  """
  lr = 0.05
  model, params = mlp(hidden=(6, 5))
  graph = cbp_jax.graph_from_params(params)
  tx = optax.chain(
    optax.sgd(lr),
    cbp_jax.cbp(graph, key=0, replacement_rate=0.2, maturity_threshold=6, magnitude_refresh_every=every),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  grad_fn = jax.jit(
    jax.grad(lambda p, x, y: jnp.mean((cbp_jax.apply_with_activations(model, p, x)[0] - y) ** 2))
  )
  consumer = {"Dense_0": "Dense_1", "Dense_1": "Dense_2"}

  def mags(kernel_in, kernel_out):
    return (
      np.abs(np.asarray(kernel_in, np.float64)).mean(axis=0),
      np.abs(np.asarray(kernel_out, np.float64)).mean(axis=1),
    )

  cache = state[1].magnitudes
  for name in consumer:  # At init: the initial weights' magnitudes.
    want_in, want_out = mags(params[name]["kernel"], params[consumer[name]]["kernel"])
    np.testing.assert_allclose(cache.incoming[name], want_in, rtol=1e-6)
    np.testing.assert_allclose(cache.outgoing[name], want_out, rtol=1e-6)
  expected = {
    n: (np.asarray(cache.incoming[n], np.float64), np.asarray(cache.outgoing[n], np.float64))
    for n in consumer
  }
  replaced_any = 0
  for t, (x, y) in enumerate(batches(20)):
    g = grad_fn(params, x, y)
    pre_reset = jax.tree.map(lambda p, g: p - lr * g, params, g)  # Post-step, before the reset.
    params, state, _, _ = step(params, state, x, y)
    cache = state[1].magnitudes
    assert int(cache.phase) == (t + 1) % every
    for name, width in (("Dense_0", 6), ("Dense_1", 5)):
      size = -(-width // every)
      start = min((t % every) * size, width - size)
      s = slice(start, start + size)
      want_in, want_out = expected[name]
      fresh_in, fresh_out = mags(pre_reset[name]["kernel"], pre_reset[consumer[name]]["kernel"])
      want_in[s], want_out[s] = fresh_in[s], fresh_out[s]
      replaced = np.asarray(state[1].last_replaced[name])
      replaced_any += replaced.sum()
      after_in, _ = mags(params[name]["kernel"], params[consumer[name]]["kernel"])
      want_in[replaced], want_out[replaced] = after_in[replaced], 0.0
      np.testing.assert_allclose(cache.incoming[name], want_in, rtol=1e-5, err_msg=f"{name} t={t}")
      np.testing.assert_allclose(cache.outgoing[name], want_out, rtol=1e-5, err_msg=f"{name} t={t}")
  assert replaced_any > 0


def test_magnitude_refresh_with_constant_weights_gives_the_exact_utilities():
  """lr 0 and no replacement: cached magnitudes never go stale, so utilities equal every=1's."""
  model, params = mlp(hidden=(6, 5))
  graph = cbp_jax.graph_from_params(params)
  runs = {}
  for every in (1, 4):
    tx = optax.chain(
      optax.sgd(0.0), cbp_jax.cbp(graph, key=0, replacement_rate=0.0, magnitude_refresh_every=every)
    )
    state, step, p = tx.init(params), make_step(model, tx), params
    for x, y in batches(9):
      p, state, _, _ = step(p, state, x, y)
    runs[every] = cbp_jax.unit_stats(state)
  for name in runs[1]:
    np.testing.assert_allclose(runs[4][name]["utility"], runs[1][name]["utility"], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, None])
def test_magnitude_refresh_every_must_be_a_positive_int(bad):
  _, params = mlp()
  with pytest.raises(ValueError, match="magnitude_refresh_every"):
    cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0, magnitude_refresh_every=bad)


# --- The state: one LayerState per layer ----------------------------------


def one_step(model, params, tx, state):
  x, y = next(batches(1))
  return make_step(model, tx)(params, state, x, y)[1]


def test_state_holds_one_layer_state_per_layer_and_the_old_views_read_it():
  model, params = mlp()
  tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0, replacement_rate=0.5, maturity_threshold=0)
  state = one_step(model, params, tx, tx.init(params))
  assert set(state.layers) == {"Dense_0", "Dense_1"}
  assert all(isinstance(l, cbp_jax.LayerState) for l in state.layers.values())
  for name, layer in state.layers.items():
    assert state.statistics[name] is layer.statistics
    assert state.pending[name] is layer.pending
    assert state.replaced_total[name] is layer.replaced_total
    assert state.last_replaced[name] is layer.last_replaced
    # rate 0.5 of 6 (5) eligible units: 3 (2) replaced, and the count says so.
    assert int(layer.replaced_total) == int(np.sum(layer.last_replaced)) == {"Dense_0": 3, "Dense_1": 2}[name]
  with pytest.raises(AttributeError):
    state.statistics = {}  # A view, not a field.


def test_layer_after_step_restarts_exactly_the_replaced_units():
  stats = cbp_jax.utility.UnitStatistics(
    utility=jnp.array([1.0, 2.0, 3.0]),
    mean_activation=jnp.array([0.5, 0.75, 0.25]),
    age=jnp.array([10, 20, 30], jnp.int32),
  )
  mask = jnp.array([False, True, False])
  after = transform._layer_after_step(stats, jnp.float32(0.25), jnp.int32(4), mask)
  np.testing.assert_array_equal(after.statistics.utility, [1.0, 0.0, 3.0])
  np.testing.assert_array_equal(after.statistics.mean_activation, [0.5, 0.0, 0.25])
  np.testing.assert_array_equal(after.statistics.age, [10, 0, 30])
  assert float(after.pending) == 0.25
  assert int(after.replaced_total) == 5
  np.testing.assert_array_equal(after.last_replaced, mask)


OldCbpState = collections.namedtuple(
  "OldCbpState",
  [
    "statistics",
    "pending",
    "replaced_total",
    "last_replaced",
    "nonfinite",
    "skipped",
    "decay_rate",
    "key",
    "magnitudes",
    "inner_state",
  ],
)


@pytest.mark.parametrize("form", ["namedtuple", "dict"])
def test_a_state_of_the_old_layout_is_refused_saying_what_changed(form):
  model, params = mlp()
  tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0)
  new = tx.init(params)
  fields = dict(
    statistics=new.statistics,
    pending=new.pending,
    replaced_total=new.replaced_total,
    last_replaced=new.last_replaced,
    nonfinite=new.nonfinite,
    skipped=new.skipped,
    decay_rate=new.decay_rate,
    key=new.key,
    magnitudes=new.magnitudes,
    inner_state=new.inner_state,
  )
  old = OldCbpState(**fields) if form == "namedtuple" else fields
  with pytest.raises(ValueError, match=r"old layout.*one LayerState per layer in CbpState.layers"):
    one_step(model, params, tx, old)


def test_a_state_of_another_kind_is_refused():
  model, params = mlp()
  tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=0)
  with pytest.raises(ValueError, match="needs the state that init returned, got EmptyState"):
    one_step(model, params, tx, optax.EmptyState())
