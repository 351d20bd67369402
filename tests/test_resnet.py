"""CBP on residual conv blocks (cbp_jax.resnet), checked against NumPy re-computations.

What tests/test_utility.py, test_reset.py and test_transform.py already cover (conv -> conv and conv -> flatten ->
dense resets, conv utilities, a dense layer's BatchNorm) is not repeated.
Here: the explicit residual-block graph of `cbp_jax.resnet.resnet_graph`
(``conv1 -> bn1 -> relu -> conv2``, skip path beside it), BatchNorm parameters
and running statistics of replaced units, the ``conv2`` bias correction summed
over the 3x3 window, exactness of the block's function away from the padded
border, untouched skip paths, restarted momentum. The im2col convolution and the
models' ``conv`` field are tests/test_models.py's."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cbp_jax
from cbp_jax import initializers, resnet
from tests.numpy_reference import NumpyUnitStats, consumer_rows
from tests.resnet_helpers import STAGES, WIDTH, forward, small_resnet


def cbp_step(model, variables, x, *, rate):
  """One compiled CBP step, maturity 0, wrapping SGD with momentum 0.9 at step size 0.

  Step size 0 leaves every parameter the reset does not touch bitwise as it
  was, while the momentum trace still records the gradient. Returns the new
  variables (BatchNorm statistics reset), the cbp state, the activations and
  conv2 outputs of the step's forward pass, and the gradients.
  """
  return _compiled_step(model, rate)(variables, x)


@functools.cache
def _compiled_step(model, rate):
  graph = resnet.resnet_graph(model)
  tx = cbp_jax.cbp(
    graph,
    key=3,
    replacement_rate=rate,
    maturity_threshold=0,
    count_basis="layer",
    optimizer=optax.sgd(0.0, momentum=0.9),
  )

  @jax.jit
  def step(variables, x):
    state = tx.init(variables["params"])

    def loss_fn(p):
      out, stats, acts, conv2 = forward(model, {**variables, "params": p}, x)
      return jnp.sum(out**2), (stats, acts, conv2)

    (_, (stats, acts, conv2)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, state = tx.update(grads, state, variables["params"], activations=acts)
    params = optax.apply_updates(variables["params"], updates)
    stats = cbp_jax.reset_batch_stats(stats, graph, state)
    return {"params": params, "batch_stats": stats}, state, acts, conv2, grads

  return step


def f32(x):
  """A float32 array that is not weakly typed (same jit signature as the model's leaves)."""
  return jnp.asarray(np.asarray(x, np.float32))


def flat(tree):
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# --- The graph --------------------------------------------------------------


def test_resnet18_graph_is_the_inner_units_of_every_block():
  model = resnet.ResNet18(num_classes=100)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False), jax.random.key(0))
  params = shapes["params"]
  graph = resnet.resnet_graph(model)
  assert graph.names == tuple(f"block{s}_{b}/conv1" for s in (1, 2, 3, 4) for b in (0, 1))
  layers, _, _ = cbp_jax.graph.resolve(graph, params)
  assert [l.width for l in layers] == [64, 64, 128, 128, 256, 256, 512, 512]
  for layer in graph:
    block = layer.name.split("/")[0]
    assert layer.norm == f"{block}/bn1"
    assert [c.kernel for c in layer.consumers] == [f"{block}/conv2/kernel"]
  # fan-in counts the 3x3 window: the init bound of a replaced block2_0 unit.
  l = layers[2]
  assert l.fan_in == 3 * 3 * 64 and l.consumers[0].positions == 1
  # Sequential inference refuses the residual net (it must be declared).
  with pytest.raises(ValueError, match="LayerGraph"):
    cbp_jax.graph_from_params(params)
  # Every ReLU is recorded under the names the graph and the metrics use (shapes only).
  _, col = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats", "activations"]),
    {"params": params, "batch_stats": shapes["batch_stats"]},
    jnp.zeros((2, 32, 32, 3)),
  )
  acts = cbp_jax.collect_activations(col["activations"])
  assert sorted(acts) == sorted(resnet.relu_layer_names(model))
  assert acts["block3_0/conv1"].shape == (2, 8, 8, 256)


# --- Reset semantics against NumPy ----------------------------------------


def test_block_reset_against_numpy():
  """A replaced conv1 unit: new filter within the kaiming bound, bias 0, bn1 scale 1 /
  offset 0 / running mean 0 / variance 1, conv2 input channel 0, conv2 bias shifted by
  the unit's mean activation times its 3x3 window of outgoing weights; everything
  else (conv2's other channels, bn2, the shortcut, the stem, the head) bitwise as before."""
  model, variables, x = small_resnet()
  params = jax.tree.map(lambda a: a, variables["params"])
  # Non-trivial norm parameters and statistics, so that resets are visible.
  for b in resnet.block_names(STAGES):
    n = params[b]["bn1"]["scale"].shape[0]
    params[b]["bn1"] = {"scale": f32(np.linspace(1.5, 2.5, n)), "bias": f32(np.linspace(0.1, 0.4, n))}
    variables["batch_stats"][b]["bn1"] = {"mean": f32(np.full(n, 0.7)), "var": f32(np.full(n, 3.0))}
  variables = {**variables, "params": params}
  new, state, acts, _, _ = cbp_step(model, variables, x, rate=0.5)
  stats_after_step = flat(forward(model, variables, x)[1])  # The step's own BatchNorm update.
  old_p, new_p = flat(variables["params"]), flat(new["params"])
  old_s, new_s = flat(variables["batch_stats"]), flat(new["batch_stats"])
  touched = set()
  for b in resnet.block_names(STAGES):
    name = f"{b}/conv1"
    mask = np.asarray(state.last_replaced[name])
    n = mask.size
    assert mask.sum() == n // 2  # rate 0.5 of the layer, maturity 0.
    keep = ~mask
    # Incoming: a fresh draw within the kaiming bound (fan-in 3 * 3 * C_in), bias 0.
    kin = new_p[f"{b}/conv1/kernel"]
    bound = initializers.scale("kaiming", math.prod(kin.shape[:-1]), 1, "relu")
    assert np.all(np.abs(kin[..., mask]) <= bound) and not np.array_equal(
      kin[..., mask], old_p[f"{b}/conv1/kernel"][..., mask]
    )
    np.testing.assert_array_equal(kin[..., keep], old_p[f"{b}/conv1/kernel"][..., keep])
    np.testing.assert_array_equal(new_p[f"{b}/conv1/bias"][mask], 0.0)
    # BatchNorm of the unit: parameters and running statistics.
    np.testing.assert_array_equal(new_p[f"{b}/bn1/scale"], np.where(mask, 1.0, old_p[f"{b}/bn1/scale"]))
    np.testing.assert_array_equal(new_p[f"{b}/bn1/bias"], np.where(mask, 0.0, old_p[f"{b}/bn1/bias"]))
    for stat, value in (("mean", 0.0), ("var", 1.0)):
      got = new_s[f"{b}/bn1/{stat}"]
      np.testing.assert_array_equal(got[mask], value)
      np.testing.assert_allclose(got[keep], stats_after_step[f"{b}/bn1/{stat}"][keep], rtol=1e-5)
    # Outgoing: conv2's input channels of the replaced units are zero, the rest as before.
    k2_old, k2_new = old_p[f"{b}/conv2/kernel"], new_p[f"{b}/conv2/kernel"]
    np.testing.assert_array_equal(k2_new[:, :, mask, :], 0.0)
    np.testing.assert_array_equal(k2_new[:, :, keep, :], k2_old[:, :, keep, :])
    # Bias correction: f_hat (age 1: this batch's mean over samples and positions)
    # times the 3x3 window of outgoing weights, summed over replaced units.
    h = np.asarray(acts[name], np.float64)
    f_hat = h.reshape(-1, n).mean(axis=0)
    delta = np.einsum("hwio,i->o", k2_old[:, :, mask, :].astype(np.float64), f_hat[mask])
    np.testing.assert_allclose(
      new_p[f"{b}/conv2/bias"], old_p[f"{b}/conv2/bias"] + delta, rtol=1e-5, atol=1e-6
    )
    touched |= {
      f"{b}/conv1/kernel",
      f"{b}/conv1/bias",
      f"{b}/bn1/scale",
      f"{b}/bn1/bias",
      f"{b}/conv2/kernel",
      f"{b}/conv2/bias",
    }
  # Everything else: bitwise unchanged (lr 0), the skip path included.
  for path in old_p:
    if path not in touched:
      np.testing.assert_array_equal(new_p[path], old_p[path], err_msg=path)
  assert "block2_0/shortcut_conv/kernel" in old_p and "stem_conv/kernel" in old_p
  for path in old_s:
    if "/bn1/" not in path:
      np.testing.assert_allclose(new_s[path], stats_after_step[path], rtol=1e-5, err_msg=path)


def test_block_function_is_preserved_away_from_the_border():
  """Inner units with constant output (zero filters: train-mode BatchNorm maps them to
  relu(offset)): after replacing half of them, conv2's output is unchanged at every
  position whose 3x3 window lies inside the feature map; at the zero-padded border the
  bias correction over-counts, exactly by the padded taps' share."""
  model, variables, x = small_resnet()
  params = jax.tree.map(lambda a: a, variables["params"])
  for b in resnet.block_names(STAGES):
    n = params[b]["conv1"]["bias"].shape[0]
    params[b]["conv1"] = {"kernel": jnp.zeros_like(params[b]["conv1"]["kernel"]), "bias": f32(np.zeros(n))}
    params[b]["bn1"] = {"scale": f32(np.ones(n)), "bias": f32(np.linspace(0.2, 0.8, n))}
  variables = {**variables, "params": params}
  _, _, _, before = forward(model, variables, x)
  new, state, acts, _, _ = cbp_step(model, variables, x, rate=0.5)
  # The skip path feeds block2_0 from block1_0's output, which also depends on
  # block1_0's bn2 batch statistics; compare each block on its own input.
  _, _, _, after = forward(model, new, x)
  b = "block1_0"
  assert np.asarray(state.last_replaced[f"{b}/conv1"]).sum() == WIDTH // 2
  np.testing.assert_allclose(
    np.asarray(after[b])[:, 1:-1, 1:-1], np.asarray(before[b])[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5
  )
  # At a corner, the padded taps' weights times the constant were added in excess.
  mask = np.asarray(state.last_replaced[f"{b}/conv1"])
  k2 = np.asarray(variables["params"][b]["conv2"]["kernel"], np.float64)
  c = np.asarray(acts[f"{b}/conv1"], np.float64)[0, 0, 0]
  padded_taps = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]  # Outside the map at the top-left corner.
  excess = sum(k2[i, j][mask].T @ c[mask] for i, j in padded_taps)
  np.testing.assert_allclose(
    np.asarray(after[b])[:, 0, 0] - np.asarray(before[b])[:, 0, 0],
    np.broadcast_to(excess, (x.shape[0], excess.size)),
    rtol=1e-4,
    atol=1e-5,
  )


def test_block_utilities_match_numpy_over_steps():
  """contribution utility of the inner units: conv2's mean |w_out| per input channel
  (over the window and outputs) times mean |h| over batch and positions, running."""
  model, variables, x = small_resnet()
  graph = resnet.resnet_graph(model)
  tx = cbp_jax.cbp(
    graph,
    key=0,
    utility="contribution",
    decay_rate=0.9,
    maturity_threshold=1000,
    count_basis="layer",
    optimizer=optax.sgd(0.05, momentum=0.9),
  )
  state = tx.init(variables["params"])
  refs = {f"{b}/conv1": NumpyUnitStats(WIDTH * 2**s, 0.9) for s, b in enumerate(resnet.block_names(STAGES))}

  @jax.jit
  def step(variables, state, x):
    def loss_fn(p):
      out, stats, acts, _ = forward(model, {**variables, "params": p}, x)
      return jnp.mean(out**2), (stats, acts)

    (_, (stats, acts)), g = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, state = tx.update(g, state, variables["params"], activations=acts)
    return {"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats}, state, acts

  for i in range(4):
    xi = x + 0.1 * i
    variables, state, acts = step(variables, state, xi)
    stats = cbp_jax.unit_stats(state)
    for name, ref in refs.items():
      block = name.split("/")[0]
      w_out = consumer_rows(variables["params"][block]["conv2"]["kernel"], ref.utility.size)
      u, f = ref.step(
        np.asarray(acts[name]), variables["params"][block]["conv1"]["kernel"], [w_out], "contribution"
      )
      np.testing.assert_allclose(stats[name]["utility"], u, rtol=1e-4, atol=1e-8)
      np.testing.assert_allclose(stats[name]["mean_activation"], f, rtol=1e-4, atol=1e-7)


def test_momentum_of_replaced_block_entries_restarts():
  """Wrapped SGD with momentum: after one step the trace is the gradient,
  except at the replaced units' conv1 filter and bias, bn1 entries and conv2 input
  channel, where it restarts at 0; the shortcut's trace is the plain one."""
  model, variables, x = small_resnet()
  new, state, _, _, grads = cbp_step(model, variables, x, rate=0.5)
  trace = flat(state.inner_state[0].trace)
  g = flat(grads)
  for b in resnet.block_names(STAGES):
    mask = np.asarray(state.last_replaced[f"{b}/conv1"])
    for path, axis in (
      (f"{b}/conv1/kernel", -1),
      (f"{b}/conv1/bias", -1),
      (f"{b}/bn1/scale", -1),
      (f"{b}/bn1/bias", -1),
      (f"{b}/conv2/kernel", -2),
    ):
      expected = g[path].copy()
      index = [slice(None)] * expected.ndim
      index[axis] = mask
      expected[tuple(index)] = 0.0
      np.testing.assert_array_equal(trace[path], expected, err_msg=path)
    np.testing.assert_array_equal(trace[f"{b}/conv2/bias"], g[f"{b}/conv2/bias"])
  np.testing.assert_array_equal(trace["block2_0/shortcut_conv/kernel"], g["block2_0/shortcut_conv/kernel"])


def test_replaced_unit_count_follows_the_layer_rule():
  """count_basis="layer" and accumulate: rate * n per step once mature, so over 5 steps
  a 4-unit layer at rate 0.1 replaces floor(5 * 0.4) = 2 units and an 8-unit one 4."""
  model, variables, x = small_resnet()
  graph = resnet.resnet_graph(model)
  tx = cbp_jax.cbp(
    graph, key=0, replacement_rate=0.1, maturity_threshold=0, count_basis="layer", optimizer=optax.sgd(0.0)
  )
  state = tx.init(variables["params"])
  _, _, acts, _ = forward(model, variables, x)
  zeros = jax.tree.map(jnp.zeros_like, variables["params"])
  update = jax.jit(lambda s: tx.update(zeros, s, variables["params"], activations=acts)[1])
  for _ in range(5):
    state = update(state)
  totals = {k: int(v["replaced"]) for k, v in cbp_jax.unit_stats(state).items()}
  assert totals == {"block1_0/conv1": 2, "block2_0/conv1": 4}
