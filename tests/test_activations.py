"""`cbp_jax/activations.py`: recording post-activation outputs on the producing module, linen and nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import cbp_jax


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    fc1 = nn.Dense(6, name="fc1")
    return nn.Dense(2, name="fc2")(cbp_jax.sow_activation(fc1, nn.relu(fc1(x))))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(5)
    h = cbp_jax.sow_activation(dense, jnp.tanh(dense(x)))
    return Block(name="block")(h)


def test_linen_records_are_keyed_by_the_producing_modules_path():
  x = jax.random.normal(jax.random.key(0), (3, 4))
  params = Net().init(jax.random.key(1), x)["params"]
  out, acts = cbp_jax.apply_with_activations(Net(), params, x)
  assert set(acts) == {"Dense_0", "block/fc1"}
  h0 = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  fc1 = params["block"]["fc1"]
  np.testing.assert_allclose(acts["Dense_0"], h0, rtol=1e-6)
  np.testing.assert_allclose(acts["block/fc1"], jax.nn.relu(h0 @ fc1["kernel"] + fc1["bias"]), rtol=1e-5)
  np.testing.assert_array_equal(out, Net().apply({"params": params}, x))


def test_collect_activations_keeps_the_newest_of_repeated_sows():
  records = {"Dense_0": {"post_activation": (jnp.zeros(2), jnp.ones(2))}}
  np.testing.assert_array_equal(cbp_jax.collect_activations(records)["Dense_0"], jnp.ones(2))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)])

  def __call__(self, x):
    h = cbp_jax.sow_activation(self.layers[0], nnx.relu(self.layers[0](x)))
    return self.layers[1](h)


def test_nnx_records_of_one_call_only():
  model, x = NnxNet(nnx.Rngs(0)), jnp.ones((2, 4))
  _, first = cbp_jax.capture_activations(model, x)
  out, acts = cbp_jax.capture_activations(model, 2 * x)
  assert set(acts) == {"layers/0"}
  np.testing.assert_allclose(acts["layers/0"], jax.nn.relu(model.layers[0](2 * x)), rtol=1e-6)
  assert not np.allclose(acts["layers/0"], first["layers/0"])
  np.testing.assert_allclose(out, model.layers[1](jax.nn.relu(model.layers[0](2 * x))), rtol=1e-6)


def test_what_is_not_a_module_is_refused():
  with pytest.raises(ValueError, match="needs a flax linen or nnx module, got int"):
    cbp_jax.sow_activation(3, jnp.ones(2))
  with pytest.raises(ValueError, match="capture_activations needs an nnx.Module, got Net"):
    cbp_jax.capture_activations(Net(), jnp.ones((1, 4)))
