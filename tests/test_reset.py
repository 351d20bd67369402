"""`cbp_jax/reset.py`: the reset kernel (selection, new incoming weights, zeroed outgoing weights, bias
correction; Semantics page, steps 6-8), checked through `cbp()` against independent expectations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import cbp_jax
from cbp_jax import initializers
from tests.cbp_steps import FanOut, batches, conv_graph_params, fan_out_graph, make_step, mlp
from tests.numpy_reference import NumpyUnitStats, consumer_rows


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
  tx = optax.chain(
    optax.sgd(0.05),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params),
      key=0,
      replacement_rate=0.1,
      maturity_threshold=2,
      init=init,
      next_bias_correction=False,
    ),
  )
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
  params = {
    "hidden": {"kernel": jnp.full((fan_in, width), 7.0), "bias": jnp.zeros(width)},
    "head": {"kernel": jnp.ones((width, 2)), "bias": jnp.zeros(2)},
  }
  graph = cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        "hidden", kernel="hidden/kernel", bias="hidden/bias", consumers=(cbp_jax.Consumer("head/kernel"),)
      )
    ]
  )
  layers, _, _ = cbp_jax.graph.resolve(graph, params)
  chosen = jnp.arange(0, 2 * slots, 2)
  updates = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(
    params,
    cbp_jax.reset.reset_units(
      updates, params, layers, {"hidden": cbp_jax.reset.Selection(chosen)}, jax.random.key(3), init=init
    ),
  )
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
  tx = optax.chain(
    optax.sgd(0.0),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params),
      key=0,
      replacement_rate=0.25,
      maturity_threshold=3,
      next_bias_correction=correct,
    ),
  )
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
  tx = optax.chain(
    optax.sgd(0.0),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params),
      key=0,
      replacement_rate=1 / 6,
      maturity_threshold=0,
      max_replacements_per_step=1,
    ),
  )
  state = tx.init(params)
  step = make_step(model, tx)
  x, y = next(batches(1))
  new, state, _, _ = step(params, state, x, y)
  (i,) = np.flatnonzero(state[1].last_replaced["Dense_0"])
  expected = params["Dense_1"]["bias"] + params["Dense_1"]["kernel"][i] * values[i]
  np.testing.assert_allclose(new["Dense_1"]["bias"], expected, rtol=1e-6)


def test_conv_reset_hits_exactly_the_channel_positions_after_flatten():
  model, params = conv_graph_params()
  tx = optax.chain(
    optax.sgd(0.0),
    cbp_jax.cbp(
      cbp_jax.graph_from_params(params),
      key=0,
      replacement_rate=2 / 128,
      maturity_threshold=0,
      count_basis="layer",
    ),
  )
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


def test_several_consumers_and_a_layer_norm():
  model = FanOut()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  params["LayerNorm_0"] = {"scale": jnp.full((6,), 2.0), "bias": jnp.full((6,), 0.3)}
  tx = optax.chain(
    optax.sgd(0.0), cbp_jax.cbp(fan_out_graph(), key=0, replacement_rate=0.5, maturity_threshold=2)
  )
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
