"""Helpers of the methods' test modules: a small MLP, dead units, bitwise comparisons, the expected reset."""

import jax
import jax.numpy as jnp
import numpy as np

import cbp_jax

NAMES = ("Dense_0", "Dense_1", "Dense_2")  # Two hidden layers and the head.


def bits(a):
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise(a, b, err_msg=""):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
  np.testing.assert_array_equal(bits(a), bits(b), err_msg=err_msg)


def mlp(seed=0, batch=16, inputs=5, hidden=(8, 8), outputs=3):
  model = cbp_jax.models.MLP(hidden=hidden, outputs=outputs)
  x = jax.random.normal(jax.random.key(100 + seed), (batch, inputs))
  y = jax.random.normal(jax.random.key(200 + seed), (batch, outputs))
  params = model.init(jax.random.key(seed), x)["params"]
  return model, params, x, y


def loss_fn(model, x, y):
  def loss(p):
    out, acts = cbp_jax.apply_with_activations(model, p, x)
    return jnp.mean((out - y) ** 2), acts

  return loss
