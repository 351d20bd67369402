"""`cbp_jax/graph.py`: the layer graph, declared, inferred from parameter names, and resolved against parameters."""

import jax.numpy as jnp
import pytest

import cbp_jax
from tests.cbp_steps import conv_graph_params, mlp


def test_convnet_graph_is_inferred_with_the_flatten_boundary():
  _, params = conv_graph_params()
  graph = cbp_jax.graph_from_params(params)
  assert graph.names == ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1")
  layers, _, _ = cbp_jax.graph.resolve(graph, params)
  assert [c.positions for l in layers for c in l.consumers] == [
    1,
    1,
    4,
    1,
    1,
  ]  # Conv consumers read each channel once; the flatten 2x2 times.


def test_graph_naming_a_missing_parameter_fails_at_init():
  _, params = mlp()
  graph = cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        "h", kernel="Dense_0/kernel", bias="Dense_0/bias", consumers=[cbp_jax.Consumer("Dense_9/kernel")]
      )
    ]
  )
  with pytest.raises(ValueError, match="layer 'h': no parameter named 'Dense_9/kernel'"):
    cbp_jax.cbp(graph, key=0).init(params)


def test_graph_with_mismatched_consumer_fails_at_init():
  _, params = mlp(hidden=(6, 5))
  graph = cbp_jax.LayerGraph(
    [
      cbp_jax.Layer(
        "Dense_0",
        kernel="Dense_0/kernel",
        bias="Dense_0/bias",
        consumers=[cbp_jax.Consumer("Dense_2/kernel")],
      )
    ]
  )
  with pytest.raises(ValueError, match="consumer kernel 'Dense_2/kernel' must read the 6 units"):
    cbp_jax.cbp(graph, key=0).init(params)


def test_graph_from_params_refuses_what_it_cannot_infer():
  nested = {
    "Block_0": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}},
    "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
  }
  with pytest.raises(ValueError, match="sequential stacks of sibling layers.*Block_0/Dense_0"):
    cbp_jax.graph_from_params(nested)
  odd = {"Embed_0": {"embedding": jnp.ones((10, 4))}, "Dense_0": {"kernel": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match="cannot classify module 'Embed_0'"):
    cbp_jax.graph_from_params(odd)
  chain = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((5, 2))}}
  with pytest.raises(ValueError, match="'Dense_1/kernel' reads 5 inputs, not a multiple of the 4"):
    cbp_jax.graph_from_params(chain)
