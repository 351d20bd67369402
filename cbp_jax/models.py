"""The paper's networks as flax linen modules that record their activations.

Hidden kernels are drawn from the uniform distribution CBP redraws replaced
units from (`cbp_jax.initializers.uniform`), so new units start like the
originals did; biases start at 0, as replaced units' biases do.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbp_jax import initializers
from cbp_jax.activations import sow_activation

ACTIVATION_FNS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "leaky_relu": nn.leaky_relu,
    "swish": nn.swish,
    "elu": nn.elu,
    "selu": nn.selu,
    "linear": lambda x: x,
}


def activation_fn(name: str):
  if name not in ACTIVATION_FNS:
    raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATION_FNS)}")
  return ACTIVATION_FNS[name]


class MLP(nn.Module):
  """Fully connected net ``in -> hidden... -> outputs``.

  Attributes:
    hidden: widths of the hidden layers (``Dense_0`` ... in the params).
    outputs: width of the linear head.
    activation: hidden activation name (`ACTIVATION_FNS`).
    init_scheme: initial distribution of hidden kernels (`cbp_jax.initializers.INITS`).
    param_dtype: dtype of the parameters.
  """
  hidden: Sequence[int]
  outputs: int
  activation: str = "relu"
  init_scheme: str = "kaiming"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_fn(self.activation)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      dense = nn.Dense(width, kernel_init=initializers.uniform(self.init_scheme, self.activation),
                       param_dtype=self.param_dtype, dtype=self.param_dtype)
      x = sow_activation(dense, act(dense(x)))
    # The head is drawn like the reference's output layer: U(+-sqrt(3/fan_in)).
    return nn.Dense(self.outputs, kernel_init=initializers.uniform("lecun"),
                    param_dtype=self.param_dtype, dtype=self.param_dtype)(x)


class ConvNet(nn.Module):
  """The paper's continual-ImageNet net: 3 conv + max-pool, then 3 dense.

  ``Conv_0`` 5x5x32, ``Conv_1`` 3x3x64, ``Conv_2`` 3x3x128 (VALID padding,
  ReLU, 2x2 max-pool after each), flatten, ``Dense_0`` 128, ``Dense_1`` 128,
  ``Dense_2`` outputs. The recorded conv activations are taken after pooling,
  as the reference does. On 32x32 inputs the flatten has 2*2*128 = 512 inputs.

  Attributes:
    outputs: number of classes.
    init_scheme: initial distribution of hidden kernels (the paper: ``"default"``).
    param_dtype: dtype of the parameters.
  """
  outputs: int = 2
  init_scheme: str = "default"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init = initializers.uniform(self.init_scheme, "relu")
    for features, size in ((32, 5), (64, 3), (128, 3)):
      conv = nn.Conv(features, (size, size), padding="VALID", kernel_init=kernel_init,
                     param_dtype=self.param_dtype, dtype=self.param_dtype)
      x = nn.max_pool(nn.relu(conv(x)), (2, 2), strides=(2, 2))
      sow_activation(conv, x)
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      dense = nn.Dense(128, kernel_init=kernel_init,
                       param_dtype=self.param_dtype, dtype=self.param_dtype)
      x = sow_activation(dense, nn.relu(dense(x)))
    return nn.Dense(self.outputs, kernel_init=initializers.uniform("default"),
                    param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
