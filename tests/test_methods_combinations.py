"""Methods together: the LayerNorm + weight decay recipe (alone and with CBP) and chains of the 2023-2025 methods,
jitted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cbp_jax
from cbp_jax import methods as M
from tests.new_methods_helpers import grads_and_acts, jitted_step, mlp, np_leaves


def test_layer_norm_weight_decay_recipe():
  """MLP(layer_norm=True) with L2 before SGD: the step is -lr * (g + wd * p), norms in the graph."""
  model, params, x, y = mlp(layer_norm=True)
  graph = cbp_jax.graph_from_params(params)
  assert [l.norm for l in graph.layers] == ["LayerNorm_0", "LayerNorm_1"]
  g, acts = grads_and_acts(model, params, x, y)
  # The recorded activation is the post-norm ReLU output.
  h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = jax.nn.relu(h * params["LayerNorm_0"]["scale"] + params["LayerNorm_0"]["bias"])
  np.testing.assert_allclose(np.asarray(acts["Dense_0"]), np.asarray(h), rtol=1e-5, atol=1e-6)
  tx = optax.chain(M.l2(1e-2), optax.sgd(0.1))
  u, _ = tx.update(g, tx.init(params), params)
  for ui, gi, pi in zip(np_leaves(u), np_leaves(g), np_leaves(params)):
    np.testing.assert_allclose(ui, -0.1 * (gi + 1e-2 * pi), rtol=1e-5, atol=1e-7)


def test_cbp_with_layer_norm_and_weight_decay():
  model, params, x, y = mlp(layer_norm=True)
  graph = cbp_jax.graph_from_params(params)
  params = jax.tree.map(lambda a: a, params)
  params["LayerNorm_0"] = {
    "scale": params["LayerNorm_0"]["scale"] * 2.0 + 0.5,
    "bias": params["LayerNorm_0"]["bias"] + 0.3,
  }
  tx = optax.chain(
    M.l2(1e-3), optax.sgd(0.01), cbp_jax.cbp(graph, key=0, replacement_rate=0.5, maturity_threshold=0)
  )
  state = tx.init(params)
  p, state = jitted_step(model, tx, x, y)(params, state)
  replaced = np.asarray(state[2].last_replaced["Dense_0"])
  assert replaced.any()
  np.testing.assert_array_equal(np.asarray(p["LayerNorm_0"]["scale"])[replaced], 1.0)
  np.testing.assert_array_equal(np.asarray(p["LayerNorm_0"]["bias"])[replaced], 0.0)
  assert (np.asarray(p["LayerNorm_0"]["scale"])[~replaced] != 1.0).all()


def test_chains_of_new_methods_run_jitted():
  """UPGD under CBP's optimizer=, Hare & Tortoise after CBP, SNR after ReGraMa: one jitted step each."""
  model, params, x, y = mlp()
  graph = cbp_jax.graph_from_params(params)
  txs = [
    cbp_jax.cbp(graph, key=0, optimizer=M.upgd(0.01, key=1)),
    optax.chain(optax.sgd(0.01), cbp_jax.cbp(graph, key=0), M.hare_tortoise(0.99, 2)),
    optax.chain(M.regrama(graph, key=0, optimizer=optax.sgd(0.01)), M.snr(graph, key=1)),
  ]
  for tx in txs:
    state = tx.init(params)
    step = jitted_step(model, tx, x, y)
    p = params
    for _ in range(2):
      p, state = step(p, state)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(p))
