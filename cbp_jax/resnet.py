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

`conv_im2col` computes a convolution as patches times a matrix. XLA's CPU
backend runs the kernel gradient of a convolution inside a loop (``lax.scan``,
``while``) about ten times slower than outside one
(https://github.com/jax-ml/jax/issues/12868); whole-run-compiled training
loops hit exactly that, so on CPU the models here use `conv_im2col`
(``conv="auto"``), which only needs matrix products. Results agree with
``lax.conv_general_dilated`` to float rounding (tested).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbp_jax.activations import sow_activation
from cbp_jax.graph import Consumer, Layer, LayerGraph

CONV_IMPLS = ("auto", "xla", "im2col")
RESNET18_STAGES = (2, 2, 2, 2)


# ---------------------------------------------------------------------------
# Convolution as matrix products.
# ---------------------------------------------------------------------------


def conv_im2col(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int] = (1, 1),
                padding: str | Sequence[tuple[int, int]] = "VALID", lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                precision=None, preferred_element_type=None) -> jax.Array:
  """A 2-D NHWC x HWIO convolution as patches @ kernel (``lax.conv_general_dilated``'s signature).

  Supports what the models here use: any kernel size, strides and padding
  (``"VALID"``, ``"SAME"`` or explicit pairs), no dilation, one feature group,
  flax's default NHWC/HWIO/NHWC dimension numbers.

  Args:
    lhs: inputs ``(N, H, W, C)``.
    rhs: kernel ``(kh, kw, C, O)``.
    window_strides: ``(sh, sw)``.
    padding: ``"VALID"``, ``"SAME"`` or ``((lo, hi), (lo, hi))``.
    lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
    precision, preferred_element_type: accepted for compatibility; dilations
      must be 1 and the group count 1.

  Returns:
    ``(N, H', W', O)``.
  """
  for name, d in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
    if d is not None and any(int(v) != 1 for v in d):
      raise ValueError(f"conv_im2col: {name} must be 1, got {d}")
  if feature_group_count != 1:
    raise ValueError(f"conv_im2col: feature_group_count must be 1, got {feature_group_count}")
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(
        f"conv_im2col: expected NHWC inputs and an HWIO kernel, got shapes {lhs.shape}, {rhs.shape}")
  del dimension_numbers, preferred_element_type  # NHWC/HWIO (flax's default) is assumed.
  kh, kw, c, out = rhs.shape
  if lhs.shape[-1] != c:
    raise ValueError(f"conv_im2col: input has {lhs.shape[-1]} channels, kernel expects {c}")
  sh, sw = (int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
  else:
    pads = [tuple(int(v) for v in p) for p in padding]
  x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  h = (x.shape[1] - kh) // sh + 1
  w = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (w - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  # Patch entry (i * kw + j) * C + c meets kernel[i, j, c]: the HWIO reshape order.
  y = jnp.dot(patches.reshape(-1, kh * kw * c), rhs.reshape(kh * kw * c, out),
              precision=precision)
  return y.reshape(lhs.shape[0], h, w, out)


def resolve_conv(conv: str) -> str:
  """``"auto"`` -> ``"im2col"`` on CPU, ``"xla"`` elsewhere; others unchanged."""
  if conv not in CONV_IMPLS:
    raise ValueError(f"conv must be one of {CONV_IMPLS}, got {conv!r}")
  if conv == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return conv


def conv_function(conv: str):
  """The ``conv_general_dilated`` for flax ``nn.Conv``: None (XLA's) or `conv_im2col`."""
  return conv_im2col if resolve_conv(conv) == "im2col" else None


def im2col_interceptor(next_fun, args, kwargs, context):
  """A `flax.linen.intercept_methods` interceptor running every ``nn.Conv`` with `conv_im2col`.

  For models that do not expose their convolution function (e.g.
  `cbp_jax.models.ConvNet`): ``with nn.intercept_methods(im2col_interceptor):
  model.apply(...)``. Convolutions it cannot express (dilation, groups,
  circular padding, masks, unshared weights) and initialisation run as usual.
  """
  module = context.module
  if (not isinstance(module, nn.Conv) or context.method_name != "__call__"
      or module.is_initializing() or kwargs or len(args) != 1):
    return next_fun(*args, **kwargs)
  ones = (None, 1, (1, 1), [1, 1])
  padding = module.padding
  if (module.input_dilation not in ones or module.kernel_dilation not in ones
      or module.feature_group_count != 1 or module.mask is not None
      or not module.shared_weights or args[0].ndim != 4
      or (isinstance(padding, str) and padding not in ("SAME", "VALID"))):
    return next_fun(*args, **kwargs)
  params = module.variables["params"]
  kernel = params["kernel"]
  x = args[0]
  x, kernel, bias = module.promote_dtype(x, kernel, params.get("bias"), dtype=module.dtype)
  strides = module.strides or 1
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  if not isinstance(padding, str):
    padding = nn.linear.canonicalize_padding(padding, 2)
  y = conv_im2col(x, kernel, strides, padding, precision=module.precision)
  return y if bias is None else y + bias


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
  conv: str = "auto"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(
        nn.Conv, use_bias=True, kernel_init=conv_kernel_init, conv_general_dilated=conv_function(self.conv),
        param_dtype=self.param_dtype, dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, param_dtype=self.param_dtype, dtype=self.param_dtype)
    conv1 = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")
    h = sow_activation(conv1, nn.relu(norm(name="bn1")(conv1(x))))
    y = norm(name="bn2")(conv(self.features, (3, 3), padding=1, name="conv2")(h))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), strides=self.strides, padding=0,
                      name="shortcut_conv")(x)
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
    conv: ``"auto"``, ``"xla"`` or ``"im2col"`` (`resolve_conv`).
    param_dtype: dtype of parameters and computation.
  """
  num_classes: int = 100
  width: int = 64
  stage_sizes: Sequence[int] = RESNET18_STAGES
  conv: str = "auto"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True, return_features: bool = False):
    stem = nn.Conv(self.width, (3, 3), padding=1, use_bias=True, kernel_init=conv_kernel_init,
                   conv_general_dilated=conv_function(self.conv), name="stem_conv",
                   param_dtype=self.param_dtype, dtype=self.param_dtype)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="stem_bn",
                     param_dtype=self.param_dtype, dtype=self.param_dtype)(stem(x))
    x = sow_activation(stem, nn.relu(x))
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        x = BasicBlock(self.width * 2 ** s, strides=2 if s > 0 and b == 0 else 1,
                       conv=self.conv, param_dtype=self.param_dtype,
                       name=block_name(s, b))(x, train)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=head_kernel_init, name="fc",
                      param_dtype=self.param_dtype, dtype=self.param_dtype)(features)
    return (logits, features) if return_features else logits


def block_name(stage: int, block: int) -> str:
  """Module name of block ``block`` of stage ``stage`` (both from 0): ``block{s+1}_{b}``."""
  return f"block{stage + 1}_{block}"


def block_names(stage_sizes: Sequence[int] = RESNET18_STAGES) -> list[str]:
  return [block_name(s, b) for s, n in enumerate(stage_sizes) for b in range(n)]


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
    layers.append(Layer(
        name=f"{name}/conv1", kernel=f"{name}/conv1/kernel", bias=f"{name}/conv1/bias",
        norm=f"{name}/bn1",
        consumers=(Consumer(kernel=f"{name}/conv2/kernel", bias=f"{name}/conv2/bias"),),
        activation="relu"))
  return LayerGraph(tuple(layers))


def relu_layer_names(model_or_stage_sizes: ResNet18 | Sequence[int] = RESNET18_STAGES) -> list[str]:
  """Names of every recorded ReLU output, in forward order (stem, then per block conv1 and output)."""
  stages = getattr(model_or_stage_sizes, "stage_sizes", model_or_stage_sizes)
  names = ["stem_conv"]
  for name in block_names(tuple(stages)):
    names += [f"{name}/conv1", name]
  return names
