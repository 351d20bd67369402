"""ResNet-18 for class-incremental CIFAR-100, and its CBP layer graph.

The network is the one of the loss-of-plasticity reference
(``lop/nets/torchvision_modified_resnet.py``): torchvision's ResNet-18 with a
3x3 stride-1 stem, no max-pool, biases in every convolution, BatchNorm after
every convolution, global average pooling and one dense head. Parameters
(flax linen, NHWC):

* ``stem_conv`` (3x3, ``width``), ``stem_bn``;
* blocks ``block{s}_{b}`` for stage ``s = 1..4`` (``width * 2**(s-1)``
  channels, stride 2 in the first block of stages 2-4) and block ``b``:
  ``conv1 -> bn1 -> relu -> conv2 -> bn2 (+ shortcut) -> relu``, the shortcut
  being ``shortcut_conv`` (1x1, strided) + ``shortcut_bn`` where the shape
  changes and the identity elsewhere;
* ``fc``: the head.

Initialisation as the reference's ``kaiming_init_resnet_module``: conv
kernels ``N(0, 2 / fan_in)``, head ``N(0, 1 / fan_in)``, biases 0, BatchNorm
scale 1 and offset 0. BatchNorm as PyTorch's: momentum 0.1 (flax 0.9), eps 1e-5.

Recorded activations (`cbp_jax.sow_activation`, collection ``activations``):
every ReLU output. ``block{s}_{b}/conv1`` is the output of the block's inner
units (the ones CBP maintains, see `resnet_graph`); ``block{s}_{b}`` is the
block's output (the residual stream after the final ReLU) and ``stem_conv``
the stem's. ``__call__(..., return_features=True)`` also returns the pooled
features the head reads (the "last layer" of the plasticity metrics).

The convolution is a field, ``conv`` (`cbp_jax.models.conv_function`):
``"auto"`` (the default) runs `conv_im2col` on CPU, where XLA's convolution
gradients inside whole-run-compiled loops are about ten times slower, and
XLA's convolution elsewhere; ``"xla"``, ``"im2col"`` or a function with
``lax.conv_general_dilated``'s signature choose explicitly. `cbp_jax.models.ConvNet`
takes the same field.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbp_jax.activations import sow_activation
from cbp_jax.graph import Consumer, Layer, LayerGraph

# The convolution choice (``conv`` field) is shared with `cbp_jax.models.ConvNet`.
from cbp_jax.models import conv_function

__all__ = [
  "BasicBlock",
  "block_names",
  "conv_kernel_init",
  "head_kernel_init",
  "relu_layer_names",
  "RESNET18_STAGES",
  "ResNet18",
  "resnet_graph",
]


RESNET18_STAGES = (2, 2, 2, 2)


# ---------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------

# PyTorch kaiming_normal_ (fan_in): gain**2 / fan_in with gain sqrt(2) (ReLU) or 1 (linear head).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
head_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class BasicBlock(nn.Module):
  """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; records both ReLUs."""

  features: int
  strides: int = 1
  conv: str | Callable = "auto"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(
      nn.Conv,
      use_bias=True,
      kernel_init=conv_kernel_init,
      conv_general_dilated=conv_function(self.conv),
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )
    conv1 = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")
    h = sow_activation(conv1, nn.relu(norm(name="bn1")(conv1(x))))
    y = norm(name="bn2")(conv(self.features, (3, 3), padding=1, name="conv2")(h))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
      shortcut = norm(name="shortcut_bn")(shortcut)
    else:
      shortcut = x
    return sow_activation(self, nn.relu(y + shortcut))


class ResNet18(nn.Module):
  """The reference's CIFAR ResNet-18 (module docstring).

  Attributes:
    num_classes: outputs of the head.
    width: channels of the stem and the first stage (64 for ResNet-18;
      stages have ``width * (1, 2, 4, 8)``). Small widths make test-sized nets.
    stage_sizes: blocks per stage (``(2, 2, 2, 2)`` is ResNet-18).
    conv: ``"auto"``, ``"xla"``, ``"im2col"`` or a
      ``lax.conv_general_dilated``-like function
      (`cbp_jax.models.conv_function`).
    param_dtype: dtype of parameters and computation.
  """

  num_classes: int = 100
  width: int = 64
  stage_sizes: Sequence[int] = RESNET18_STAGES
  conv: str | Callable = "auto"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True, return_features: bool = False):
    stem = nn.Conv(
      self.width,
      (3, 3),
      padding=1,
      use_bias=True,
      kernel_init=conv_kernel_init,
      conv_general_dilated=conv_function(self.conv),
      name="stem_conv",
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      name="stem_bn",
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )(stem(x))
    x = sow_activation(stem, nn.relu(x))
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        x = BasicBlock(
          self.width * 2**s,
          strides=2 if s > 0 and b == 0 else 1,
          conv=self.conv,
          param_dtype=self.param_dtype,
          name=_block_name(s, b),
        )(x, train)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(
      self.num_classes,
      kernel_init=head_kernel_init,
      name="fc",
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )(features)
    return (logits, features) if return_features else logits


def _block_name(stage: int, block: int) -> str:
  """Module name of block ``block`` of stage ``stage`` (both from 0): ``block{s+1}_{b}``."""
  return f"block{stage + 1}_{block}"


def block_names(stage_sizes: Sequence[int] = RESNET18_STAGES) -> list[str]:
  return [_block_name(s, b) for s, n in enumerate(stage_sizes) for b in range(n)]


def resnet_graph(model_or_stage_sizes: ResNet18 | Sequence[int] = RESNET18_STAGES) -> LayerGraph:
  """The CBP layer graph of a `ResNet18`: the inner units of every residual block.

  One hidden layer per block, ``block{s}_{b}/conv1``: its units are produced
  by ``conv1`` (kernel and bias), normalised by ``bn1`` (whose scale, offset
  and running statistics belong to them) and read only by the same block's
  ``conv2``. Replacing such a unit redraws its ``conv1`` filter, resets its
  ``bn1`` entries, zeroes its input channel of ``conv2`` and (bias correction)
  shifts ``conv2``'s bias; the skip path never sees these units, so it is
  untouched and the block's output does not jump.

  The channels of the residual stream (the stem's, ``conv2``'s and the
  shortcuts' outputs) are *not* layers here: each is a sum of several
  producers (every block adds into it) read by every later block through the
  identity paths, so no single set of outgoing weights can be zeroed to
  remove one. The reference (``res_gnt.py``) treats the network as a chain
  and replaces those too, zeroing only the next ``conv1``'s input channel
  while the skip path keeps carrying them; we do not.

  Args:
    model_or_stage_sizes: a `ResNet18` or its ``stage_sizes``.

  Returns:
    A `cbp_jax.LayerGraph` whose layer names are the keys ``conv1``'s
    activations have in `cbp_jax.collect_activations` output.
  """
  stages = getattr(model_or_stage_sizes, "stage_sizes", model_or_stage_sizes)
  layers = []
  for name in block_names(tuple(stages)):
    layers.append(
      Layer(
        name=f"{name}/conv1",
        kernel=f"{name}/conv1/kernel",
        bias=f"{name}/conv1/bias",
        norm=f"{name}/bn1",
        consumers=(Consumer(kernel=f"{name}/conv2/kernel", bias=f"{name}/conv2/bias"),),
        activation="relu",
      )
    )
  return LayerGraph(tuple(layers))


def relu_layer_names(model_or_stage_sizes: ResNet18 | Sequence[int] = RESNET18_STAGES) -> list[str]:
  """Names of every recorded ReLU output, in forward order (stem, then per block conv1 and output)."""
  stages = getattr(model_or_stage_sizes, "stage_sizes", model_or_stage_sizes)
  names = ["stem_conv"]
  for name in block_names(tuple(stages)):
    names += [f"{name}/conv1", name]
  return names
