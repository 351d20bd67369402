"""Semantics of cbp(): SPEC steps 1-8, checked against independent expectations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import cbp_jax
from cbp_jax import initializers
from tests.numpy_reference import NumpyUnitStats, consumer_rows


def mlp(hidden=(6, 5), inputs=4, outputs=3, seed=0, **kw):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs, **kw)
  params = model.init(jax.random.key(seed), jnp.ones((1, inputs)))["params"]
  return model, params


def make_step(model, tx):
  def loss_fn(p, x, y):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean((out - y) ** 2), acts

  @jax.jit
  def step(params, state, x, y):
    (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, state = tx.update(g, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, updates, acts

  return step


def batches(n, inputs=4, outputs=3, batch=8, seed=0):
  key = jax.random.key(seed + 100)
  for i in range(n):
    kx, ky = jax.random.split(jax.random.fold_in(key, i))
    yield jax.random.normal(kx, (batch, inputs)), jax.random.normal(ky, (batch, outputs))


# --- Statistics and utilities against NumPy -------------------------------


@pytest.mark.parametrize("kind", [u for u in cbp_jax.utility.UTILITIES if u != "random"])
def test_utilities_match_numpy_over_several_steps(kind):
  model, params = mlp()
  # Maturity beyond the run: statistics evolve, nothing is replaced.
  tx = optax.chain(optax.sgd(0.05), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, utility=kind, decay_rate=0.9,
      maturity_threshold=1000))
  state = tx.init(params)
  step = make_step(model, tx)
  refs = {"Dense_0": NumpyUnitStats(6, 0.9), "Dense_1": NumpyUnitStats(5, 0.9)}
  consumer = {"Dense_0": "Dense_1", "Dense_1": "Dense_2"}
  for x, y in batches(6):
    params, state, _, acts = step(params, state, x, y)
    stats = cbp_jax.unit_stats(state)
    for name, ref in refs.items():
      # Statistics use the post-step weights, i.e. the params just returned.
      w_out = consumer_rows(params[consumer[name]]["kernel"], ref.utility.size)
      expected_u, expected_f = ref.step(np.asarray(acts[name]), params[name]["kernel"], [w_out], kind)
      np.testing.assert_allclose(stats[name]["utility"], expected_u, rtol=2e-4, atol=1e-7)
      np.testing.assert_allclose(stats[name]["mean_activation"], expected_f, rtol=2e-4, atol=1e-7)
      np.testing.assert_array_equal(stats[name]["age"], ref.age)
      assert int(stats[name]["replaced"]) == 0


@pytest.mark.parametrize("kind", ["adaptable_contribution", "feature_by_input"])
def test_a_unit_with_zero_incoming_weights_has_zero_utility_not_nan(kind):
  """All of a unit's inputs replaced at once zero its incoming column: 0, not 0/0."""
  stats = cbp_jax.utility.init_statistics(2)
  h = jnp.asarray([[0.0, 1.0], [0.0, 3.0]])
  out_mag, in_mag = jnp.asarray([0.5, 0.5]), jnp.asarray([0.0, 0.25])
  new, corrected, _, bad = cbp_jax.utility.update_statistics(
      stats, h, out_mag, in_mag, decay=0.5, utility=kind, key=None)
  # Unit 1: f_hat = 2, deviation mean(|h - 2|) = 1, over in_mag 0.25 = 4 (times out_mag 0.5).
  expected = 4.0 * (0.5 if kind == "adaptable_contribution" else 1.0)
  np.testing.assert_allclose(corrected, [0.0, expected], rtol=1e-6)
  assert int(bad) == 0


def test_random_utility_is_uniform_noise_and_still_replaces():
  model, params = mlp()
  tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, utility="random", replacement_rate=0.2,
      maturity_threshold=0))
  state = tx.init(params)
  step = make_step(model, tx)
  for x, y in batches(10):
    params, state, _, _ = step(params, state, x, y)
  stats = cbp_jax.unit_stats(state)
  assert int(stats["Dense_0"]["replaced"]) == math.floor(10 * 0.2 * 6 + 1e-9)


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


@pytest.mark.parametrize("maturity,rate,bound", [
    (0, 1 / 16, 8), (3, 1 / 16, 8), (7, 1 / 16, 8),
    # The default static bound, ceil(rate * width): 1 and 2 slots; it must
    # never hold back a replacement (rate * width 0.5, 1.5 and exactly 2).
    (3, 1 / 16, None), (3, 3 / 16, None), (0, 1 / 4, None)])
def test_accumulate_mode_exact_counts_and_only_mature_units(maturity, rate, bound):
  width = 8
  model, params = mlp(hidden=(width,))
  # Dyadic rates, so float32 accumulation is exact.
  tx = optax.chain(optax.sgd(0.01), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, replacement_rate=rate,
      maturity_threshold=maturity, max_replacements_per_step=bound))
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


@pytest.mark.parametrize("basis, accumulate, pending, draw, expected", [
    # 3 of 8 units eligible, rate 0.5: "eligible" owes 1.5, "layer" 4 (8 units once any is eligible).
    ("eligible", True, 0.25, None, (1, 0.75)),       # floor(0.25 + 1.5) = 1, 0.75 carried.
    ("eligible", True, 0.75, None, (2, 0.25)),       # floor(2.25) = 2.
    ("layer", True, 0.0, None, (2, 1.0)),           # 4 due, only 3 eligible (1 forgiven), bound 2 (1 carried).
    ("eligible", False, 0.3, 0.2, (1, 0.3)),         # 1.5 >= 1: floor(1.5) = 1; pending untouched.
])
def test_replacement_count_by_hand(basis, accumulate, pending, draw, expected):
  eligible = jnp.asarray([True, False, True, False, False, True, False, False])
  count, new_pending = cbp_jax.transform._replacement_count(
      eligible, jnp.float32(pending), None if draw is None else jnp.float32(draw), rate=0.5,
      count_basis=basis, accumulate=accumulate, bound=2)
  assert int(count) == expected[0]
  np.testing.assert_allclose(float(new_pending), expected[1], rtol=1e-6)


@pytest.mark.parametrize("draw, expected", [(0.04, 1), (0.06, 0)])
def test_replacement_count_lottery_below_one(draw, expected):
  """rate 0.01 x 5 eligible = 0.05 < 1: one unit when the draw falls under 0.05."""
  eligible = jnp.ones((5,), bool)
  count, pending = cbp_jax.transform._replacement_count(
      eligible, jnp.float32(0.0), jnp.float32(draw), rate=0.01, count_basis="eligible",
      accumulate=False, bound=1)
  assert (int(count), float(pending)) == (expected, 0.0)


def test_layer_count_basis_counts_the_whole_layer():
  width = 8
  model, params = mlp(hidden=(width,))
  tx = optax.chain(optax.sgd(0.01), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, replacement_rate=1 / 32,
      maturity_threshold=4, count_basis="layer"))
  state = tx.init(params)
  step = make_step(model, tx)
  for x, y in batches(36):
    params, state, _, _ = step(params, state, x, y)
  # Steps 5..36 have eligible units: 32 steps * 8 units / 32 = 8 replacements.
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) == 8


def test_probabilistic_mode_rate_matches_expectation():
  width = 10
  model, params = mlp(hidden=(width,))
  tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=3, replacement_rate=0.02,
      maturity_threshold=0, accumulate=False))
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


def test_lowest_utility_units_are_the_ones_replaced():
  scores = jnp.array([5.0, 1.0, 3.0, jnp.nan, 0.5, 2.0])
  eligible = jnp.array([True, True, True, True, False, True])
  sel = cbp_jax.reset.select_lowest(scores, eligible, jnp.int32(2), 3)
  # Unit 4 is immature, unit 3 non-finite: the two lowest others are 1 and 5.
  np.testing.assert_array_equal(sel.indices, [1, 5, 6])
  np.testing.assert_array_equal(sel.mask(6), [0, 1, 0, 0, 0, 1])


# --- The reset itself -----------------------------------------------------


@pytest.mark.parametrize("init", initializers.INITS)
def test_reset_zeroes_outgoing_redraws_incoming_and_leaves_the_rest(init):
  model, params = mlp(hidden=(6, 5))
  tx = optax.chain(optax.sgd(0.05), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, replacement_rate=0.1,
      maturity_threshold=2, init=init, next_bias_correction=False))
  state = tx.init(params)
  step = make_step(model, tx)
  seen = 0
  for x, y in batches(30):
    params, state, _, _ = step(params, state, x, y)
    r0 = np.asarray(state[1].last_replaced["Dense_0"])
    r1 = np.asarray(state[1].last_replaced["Dense_1"])
    seen += r0.sum() + r1.sum()
    for name, mask, fan_in, fan_out in (("Dense_0", r0, 4, 6), ("Dense_1", r1, 6, 5)):
      k = np.asarray(params[name]["kernel"])
      if init not in initializers.NORMAL_INITS:
        b = initializers.scale(init, fan_in, fan_out, "relu")
        b *= 2.0 if init in initializers.TRUNCATED_INITS else 1.0  # Truncated at 2 scales.
        assert np.all(np.abs(k[:, mask]) <= b * (1 + 1e-6))
      assert np.all(np.asarray(params[name]["bias"])[mask] == 0)
    assert np.all(np.asarray(params["Dense_1"]["kernel"])[r0, :][:, ~r1] == 0)
    assert np.all(np.asarray(params["Dense_2"]["kernel"])[r1, :] == 0)
  assert seen > 0


GLOROT = nn.initializers.glorot_uniform()  # Depends on fan-out: the callable must see the whole kernel.


@pytest.mark.parametrize("init", initializers.INITS + (GLOROT,))
def test_new_columns_follow_the_initial_distribution(init):
  """Moments and range of 16 x 400 redrawn weights against the initializers' formulas."""
  fan_in, width, slots = 400, 64, 16
  params = {"hidden": {"kernel": jnp.full((fan_in, width), 7.0), "bias": jnp.zeros(width)},
            "head": {"kernel": jnp.ones((width, 2)), "bias": jnp.zeros(2)}}
  graph = cbp_jax.LayerGraph([cbp_jax.Layer("hidden", kernel="hidden/kernel", bias="hidden/bias",
                                            consumers=(cbp_jax.Consumer("head/kernel"),))])
  layers, _, _ = cbp_jax.graph.resolve(graph, params)
  chosen = jnp.arange(0, 2 * slots, 2)
  updates = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, cbp_jax.reset.reset_units(
      updates, params, layers, {"hidden": cbp_jax.reset.Selection(chosen)}, jax.random.key(3),
      init=init))
  k = np.asarray(new["hidden"]["kernel"], np.float64)
  drawn = k[:, np.asarray(chosen)].ravel()
  untouched = np.delete(k, np.asarray(chosen), axis=1)
  np.testing.assert_array_equal(untouched, 7.0)
  gain = math.sqrt(2.0)
  expected_std = {
      "kaiming": gain * math.sqrt(3.0 / fan_in) / math.sqrt(3.0),
      "default": math.sqrt(1.0 / fan_in) / math.sqrt(3.0),
      "xavier": gain * math.sqrt(6.0 / (fan_in + width)) / math.sqrt(3.0),
      "lecun": math.sqrt(3.0 / fan_in) / math.sqrt(3.0),
      "kaiming_normal": gain / math.sqrt(fan_in),
      "lecun_normal": math.sqrt(1.0 / fan_in),  # flax's: variance 1 / fan_in after truncation.
      GLOROT: math.sqrt(6.0 / (fan_in + width)) / math.sqrt(3.0),  # fan-out 64, not the 16 drawn.
  }[init]
  # 6,400 draws: the sample std is within 3% and the mean within 4 standard errors.
  assert abs(drawn.std() / expected_std - 1) < 0.03
  assert abs(drawn.mean()) < 4 * expected_std / math.sqrt(drawn.size)
  if init in initializers.NORMAL_INITS:
    assert np.abs(drawn).max() > math.sqrt(3.0) * expected_std  # Beyond any equal-variance uniform.
  elif init in initializers.TRUNCATED_INITS:
    assert math.sqrt(3.0) * expected_std < np.abs(drawn).max() <= 2.0 * expected_std / 0.8796258
  else:
    assert np.abs(drawn).max() <= math.sqrt(3.0) * expected_std * (1 + 1e-6)
  # Every new column has its own numbers (no column reuses another's draw).
  columns = k[:, np.asarray(chosen)].T
  assert len({c.tobytes() for c in columns}) == slots
  np.testing.assert_array_equal(np.asarray(new["head"]["kernel"])[np.asarray(chosen)], 0.0)


def test_untouched_entries_are_bitwise_the_plain_update():
  model, params = mlp(hidden=(6, 5))
  graph = cbp_jax.graph_from_params(params)
  sgd = optax.sgd(0.05)
  tx = optax.chain(sgd, cbp_jax.cbp(graph, key=0, replacement_rate=0.1, maturity_threshold=2))
  state = tx.init(params)

  @jax.jit
  def grads_and_acts(p, x, y):
    loss = lambda p: jnp.mean((cbp_jax.apply_with_activations(model, p, x)[0] - y) ** 2)
    return jax.grad(loss)(p), cbp_jax.apply_with_activations(model, p, x)[1]

  cbp_update = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))
  sgd_update = jax.jit(lambda g: sgd.update(g, sgd.init(params))[0])
  replaced_any = False
  for x, y in batches(20):
    grads, acts = grads_and_acts(params, x, y)
    updates, state = cbp_update(grads, state, params, acts)
    plain = optax.apply_updates(params, sgd_update(grads))
    params = optax.apply_updates(params, updates)
    r0 = np.asarray(state[1].last_replaced["Dense_0"])
    r1 = np.asarray(state[1].last_replaced["Dense_1"])
    replaced_any |= r0.any() or r1.any()
    np.testing.assert_array_equal(params["Dense_0"]["kernel"][:, ~r0], plain["Dense_0"]["kernel"][:, ~r0])
    np.testing.assert_array_equal(params["Dense_0"]["bias"][~r0], plain["Dense_0"]["bias"][~r0])
    keep = np.ix_(~r0, ~r1)
    np.testing.assert_array_equal(params["Dense_1"]["kernel"][keep], plain["Dense_1"]["kernel"][keep])
    np.testing.assert_array_equal(params["Dense_2"]["kernel"][~r1], plain["Dense_2"]["kernel"][~r1])
    if not r1.any():  # The head bias only moves by a correction when Dense_1 units go.
      np.testing.assert_array_equal(params["Dense_2"]["bias"], plain["Dense_2"]["bias"])
    if not r0.any():
      np.testing.assert_array_equal(params["Dense_1"]["bias"][~r1], plain["Dense_1"]["bias"][~r1])
  assert replaced_any


def constant_unit_params(params, layer, values):
  """Zero incoming weights and bias=values: the layer's outputs are constant."""
  params = jax.tree.map(lambda x: x, params)
  params[layer] = {"kernel": jnp.zeros_like(params[layer]["kernel"]), "bias": jnp.asarray(values)}
  return params


@pytest.mark.parametrize("correct", [True, False])
def test_bias_correction_preserves_the_function_when_activations_are_constant(correct):
  model, params = mlp(hidden=(6,), inputs=4, outputs=3)
  params = constant_unit_params(params, "Dense_0", jnp.linspace(0.5, 1.5, 6))
  tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, replacement_rate=0.25,
      maturity_threshold=3, next_bias_correction=correct))
  state = tx.init(params)
  step = make_step(model, tx)
  probe = jax.random.normal(jax.random.key(9), (16, 4))
  before = model.apply({"params": params}, probe)
  for x, y in batches(8):
    params, state, _, _ = step(params, state, x, y)
  assert int(cbp_jax.unit_stats(state)["Dense_0"]["replaced"]) > 0
  after = model.apply({"params": params}, probe)
  if correct:
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  else:  # The reference's no-op correction: the output jumps.
    assert np.max(np.abs(after - before)) > 1e-2


def test_bias_correction_amount_is_w_out_times_mean_activation():
  model, params = mlp(hidden=(6,), inputs=4, outputs=3)
  values = jnp.linspace(0.5, 1.5, 6)
  params = constant_unit_params(params, "Dense_0", values)
  tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, replacement_rate=1 / 6,
      maturity_threshold=0, max_replacements_per_step=1))
  state = tx.init(params)
  step = make_step(model, tx)
  x, y = next(batches(1))
  new, state, _, _ = step(params, state, x, y)
  (i,) = np.flatnonzero(state[1].last_replaced["Dense_0"])
  expected = params["Dense_1"]["bias"] + params["Dense_1"]["kernel"][i] * values[i]
  np.testing.assert_allclose(new["Dense_1"]["bias"], expected, rtol=1e-6)


# --- Graph shapes: conv, flatten, fan-out, norms --------------------------


def conv_graph_params():
  model = cbp_jax.models.ConvNet(outputs=2)
  params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
  return model, params


def test_convnet_graph_is_inferred_with_the_flatten_boundary():
  _, params = conv_graph_params()
  graph = cbp_jax.graph_from_params(params)
  assert graph.names == ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1")
  layers, _, _ = cbp_jax.graph.resolve(graph, params)
  assert [c.positions for l in layers for c in l.consumers] == [1, 1, 4, 1, 1]  # Conv consumers read each channel once; the flatten 2x2 times.


def test_conv_utilities_average_over_batch_and_space():
  model, params = conv_graph_params()
  tx = optax.chain(optax.sgd(0.01), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, utility="adaptable_contribution",
      maturity_threshold=100))
  state = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  y = jax.random.normal(jax.random.key(2), (4, 2))
  step = make_step(model, tx)
  refs = {"Conv_1": NumpyUnitStats(64, 0.99), "Conv_2": NumpyUnitStats(128, 0.99)}
  consumers = {"Conv_1": "Conv_2", "Conv_2": "Dense_0"}
  for _ in range(3):
    params, state, _, acts = step(params, state, x, y)
    stats = cbp_jax.unit_stats(state)
    for name, ref in refs.items():
      w_out = consumer_rows(params[consumers[name]]["kernel"], ref.utility.size)
      u, _ = ref.step(np.asarray(acts[name]), params[name]["kernel"], [w_out], "adaptable_contribution")
      np.testing.assert_allclose(stats[name]["utility"], u, rtol=5e-4, atol=1e-8)


def test_conv_reset_hits_exactly_the_channel_positions_after_flatten():
  model, params = conv_graph_params()
  tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(
      cbp_jax.graph_from_params(params), key=0, replacement_rate=2 / 128,
      maturity_threshold=0, count_basis="layer"))
  state = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  new, state, _, _ = make_step(model, tx)(params, state, x, jnp.zeros((2, 2)))
  replaced = np.flatnonzero(state[1].last_replaced["Conv_2"])
  assert replaced.size == 2
  rows = np.arange(512)
  hit = np.isin(rows % 128, replaced)  # flax flattens NHWC: input p * 128 + c.
  # Columns of Dense_0's own replaced units are redrawn (the later reset wins).
  cols = ~np.asarray(state[1].last_replaced["Dense_0"])
  kernel, old = new["Dense_0"]["kernel"][:, cols], params["Dense_0"]["kernel"][:, cols]
  np.testing.assert_array_equal(kernel[hit], 0)
  np.testing.assert_array_equal(kernel[~hit], old[~hit])
  # Conv -> conv: the consumer's input channels of replaced Conv_1 units are zero.
  r1 = np.asarray(state[1].last_replaced["Conv_1"])
  keep = ~np.asarray(state[1].last_replaced["Conv_2"])
  np.testing.assert_array_equal(new["Conv_2"]["kernel"][:, :, r1, :][..., keep], 0)
  b = initializers.scale("kaiming", 3 * 3 * 32, 3 * 3 * 64, "relu")
  assert np.all(np.abs(new["Conv_1"]["kernel"][..., r1]) <= b)


class FanOut(nn.Module):
  """x -> Dense_0 -> LayerNorm -> relu -> (Dense_1 + Dense_2)."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(6)
    h = cbp_jax.sow_activation(dense, nn.relu(nn.LayerNorm()(dense(x))))
    return nn.Dense(2)(h) + nn.Dense(2)(h)


def fan_out_graph():
  return cbp_jax.LayerGraph([cbp_jax.Layer(
      name="Dense_0", kernel="Dense_0/kernel", bias="Dense_0/bias", norm="LayerNorm_0",
      consumers=[cbp_jax.Consumer("Dense_1/kernel", "Dense_1/bias"),
                 cbp_jax.Consumer("Dense_2/kernel", "Dense_2/bias")])])


def test_several_consumers_and_a_layer_norm():
  model = FanOut()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  params["LayerNorm_0"] = {"scale": jnp.full((6,), 2.0), "bias": jnp.full((6,), 0.3)}
  tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(
      fan_out_graph(), key=0, replacement_rate=0.5, maturity_threshold=2))
  state = tx.init(params)
  ref = NumpyUnitStats(6, 0.99)
  step = make_step(model, tx)
  for x, y in batches(3, outputs=2):
    new, state, _, acts = step(params, state, x, y)
    w_outs = [consumer_rows(params[c]["kernel"], 6) for c in ("Dense_1", "Dense_2")]
    u, _ = ref.step(np.asarray(acts["Dense_0"]), params["Dense_0"]["kernel"], w_outs, "contribution")
    mask = np.asarray(state[1].last_replaced["Dense_0"])
    if not mask.any():
      np.testing.assert_allclose(cbp_jax.unit_stats(state)["Dense_0"]["utility"], u, rtol=2e-4)
    params = new
  assert mask.sum() == 3  # Step 3: 0.5 * 6 eligible units.
  for c in ("Dense_1", "Dense_2"):
    np.testing.assert_array_equal(params[c]["kernel"][mask], 0)
  np.testing.assert_array_equal(params["LayerNorm_0"]["scale"][mask], 1.0)
  np.testing.assert_array_equal(params["LayerNorm_0"]["scale"][~mask], 2.0)
  np.testing.assert_array_equal(params["LayerNorm_0"]["bias"][mask], 0.0)


class WithBatchNorm(nn.Module):

  @nn.compact
  def __call__(self, x, train=True):
    dense = nn.Dense(6)
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(dense(x)))
    return nn.Dense(2)(cbp_jax.sow_activation(dense, h))


def test_batch_norm_statistics_of_replaced_units_are_reset():
  model = WithBatchNorm()
  variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
  params = variables["params"]
  graph = cbp_jax.graph_from_params(params)
  assert graph.layers[0].norm == "BatchNorm_0"
  tx = cbp_jax.cbp(graph, key=0, replacement_rate=0.5, maturity_threshold=0,
                   optimizer=optax.sgd(0.01))
  state = tx.init(params)
  batch_stats = {"BatchNorm_0": {"mean": jnp.full((6,), 0.7), "var": jnp.full((6,), 3.0)}}
  x = jax.random.normal(jax.random.key(1), (8, 4))
  out, col = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         mutable=["activations", "batch_stats"])
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
  tx = optax.chain(optax.sgd(lr), cbp_jax.cbp(
      graph, key=0, replacement_rate=0.2, maturity_threshold=6,
      magnitude_refresh_every=every))
  state = tx.init(params)
  step = make_step(model, tx)
  grad_fn = jax.jit(jax.grad(
      lambda p, x, y: jnp.mean((cbp_jax.apply_with_activations(model, p, x)[0] - y) ** 2)))
  consumer = {"Dense_0": "Dense_1", "Dense_1": "Dense_2"}

  def mags(kernel_in, kernel_out):
    return (np.abs(np.asarray(kernel_in, np.float64)).mean(axis=0),
            np.abs(np.asarray(kernel_out, np.float64)).mean(axis=1))

  cache = state[1].magnitudes
  for name in consumer:  # At init: the initial weights' magnitudes.
    want_in, want_out = mags(params[name]["kernel"], params[consumer[name]]["kernel"])
    np.testing.assert_allclose(cache.incoming[name], want_in, rtol=1e-6)
    np.testing.assert_allclose(cache.outgoing[name], want_out, rtol=1e-6)
  expected = {n: (np.asarray(cache.incoming[n], np.float64), np.asarray(cache.outgoing[n], np.float64))
              for n in consumer}
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
    tx = optax.chain(optax.sgd(0.0), cbp_jax.cbp(graph, key=0, replacement_rate=0.0,
                                                 magnitude_refresh_every=every))
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
