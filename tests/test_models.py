"""`cbp_jax/models.py`: the im2col convolution and 2x2 max pooling against XLA's, and the nets' ``conv=`` field."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import cbp_jax
from cbp_jax import resnet
from tests.resnet_helpers import MODELS, STAGES, WIDTH, forward, small_resnet

# --- The im2col convolution -----------------------------------------------


@pytest.mark.parametrize("strides,padding", [((1, 1), "VALID"), ((2, 2), ((1, 1), (1, 1)))])
def test_im2col_convolution_and_gradients_match_xla(strides, padding):
  k = jax.random.normal(jax.random.key(2), (3, 3, 5, 7))
  x = jax.random.normal(jax.random.key(3), (2, 9, 9, 5))
  dn = ("NHWC", "HWIO", "NHWC")

  def f(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, padding, dimension_numbers=dn)))

  np.testing.assert_allclose(
    cbp_jax.models.conv_im2col(x, k, strides, padding, dimension_numbers=dn),
    jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn),
    rtol=1e-5,
    atol=1e-5,
  )
  g1 = jax.jit(jax.grad(f(cbp_jax.models.conv_im2col), argnums=(0, 1)))(x, k)
  g0 = jax.jit(jax.grad(f(jax.lax.conv_general_dilated), argnums=(0, 1)))(x, k)
  for a, b in zip(g1, g0):  # float32 sums in another order: compare to the gradients' scale.
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(b))))


def test_im2col_resnet_and_convnet_match_xla():
  model_x, variables, x = small_resnet("xla")
  model_i = MODELS["im2col"]
  np.testing.assert_allclose(
    forward(model_i, variables, x)[0], forward(model_x, variables, x)[0], rtol=1e-4, atol=1e-5
  )
  # models.ConvNet takes the same field: same parameters, same outputs and activations.
  xc = jax.random.uniform(jax.random.key(4), (3, 32, 32, 3))
  convnets = {conv: cbp_jax.models.ConvNet(outputs=2, conv=conv) for conv in ("xla", "im2col")}
  params = convnets["xla"].init(jax.random.key(0), xc)["params"]
  for a, b in zip(
    jax.tree.leaves(params), jax.tree.leaves(convnets["im2col"].init(jax.random.key(0), xc)["params"])
  ):
    np.testing.assert_array_equal(a, b)

  @functools.partial(jax.jit, static_argnums=1)
  def run(p, conv):
    return cbp_jax.apply_with_activations(convnets[conv], p, xc)

  xla, im2col = (jax.tree.leaves(run(params, c)) for c in ("xla", "im2col"))
  assert len(xla) == 6  # Logits and the five recorded layers (3 conv, 2 dense).
  for a, b in zip(im2col, xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="feature_group_count"):
    cbp_jax.models.conv_im2col(xc, jnp.ones((3, 3, 1, 2)), feature_group_count=3)


def test_models_take_any_convolution_function():
  """A function given as ``conv`` is the one every convolution calls (ConvNet and ResNet18)."""
  calls = []

  def conv(lhs, rhs, *args, **kwargs):
    calls.append(rhs.shape)
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  xc = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3))
  model = cbp_jax.models.ConvNet(outputs=2, conv=conv)
  params = model.init(jax.random.key(0), xc)["params"]
  calls.clear()
  out = model.apply({"params": params}, xc)
  assert calls == [(5, 5, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128)]
  np.testing.assert_array_equal(out, cbp_jax.models.ConvNet(outputs=2).apply({"params": params}, xc))
  calls.clear()
  model_x, variables, x = small_resnet("xla")
  resnet.ResNet18(num_classes=3, width=WIDTH, stage_sizes=STAGES, conv=conv).apply(variables, x, train=False)
  # Stem, two convolutions per block and block2_0's 1x1 shortcut.
  assert calls == [(3, 3, 3, 4), (3, 3, 4, 4), (3, 3, 4, 4), (3, 3, 4, 8), (3, 3, 8, 8), (1, 1, 4, 8)]
  for bad in ("fft", 3):
    with pytest.raises(ValueError, match=repr(bad)):
      cbp_jax.models.ConvNet(conv=bad).init(jax.random.key(0), xc)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 9, 3)])
def test_max_pool_2x2_matches_flax_values_and_gradients(shape):
  """The ConvNet's reshape max-pool: flax's VALID 2x2/2 pool, odd edges dropped."""
  x = jax.random.normal(jax.random.key(5), shape)  # Continuous: no tied maxima.
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(cbp_jax.models.max_pool_2x2(x), ref(x))
  loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x)))
  np.testing.assert_array_equal(jax.grad(loss(cbp_jax.models.max_pool_2x2))(x), jax.grad(loss(ref))(x))
  # A window of tied zeros (a dead ReLU patch) passes no gradient through the ReLU.
  relu_grad = jax.grad(lambda x: jnp.sum(cbp_jax.models.max_pool_2x2(nn.relu(x))))
  np.testing.assert_array_equal(relu_grad(-jnp.abs(x)), np.zeros(shape))
