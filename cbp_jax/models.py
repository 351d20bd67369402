"""The paper's networks as flax linen modules that record their activations.

Hidden kernels are drawn from the uniform distribution CBP redraws replaced
units from (`cbp_jax.initializers.initializer`), so new units start like the
originals did; biases start at 0, as replaced units' biases do.

Convolutional models (`ConvNet` here, `cbp_jax.resnet.ResNet18`) take their
convolution as a field, ``conv``: ``"xla"`` (``lax.conv_general_dilated``),
``"im2col"`` (`conv_im2col`), ``"auto"`` (im2col on CPU, XLA elsewhere) or any
function with ``lax.conv_general_dilated``'s signature. XLA's CPU backend runs
the kernel gradient of a convolution inside a loop (``lax.scan``, ``while``)
about ten times slower than outside one
(https://github.com/jax-ml/jax/issues/12868); whole-run-compiled training
loops hit exactly that, and `conv_im2col` avoids it by computing the
convolution as patches times a matrix. The two agree to float rounding
(tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbp_jax import initializers
from cbp_jax.activations import sow_activation

__all__ = [
  "ACTIVATION_FNS",
  "conv_function",
  "conv_im2col",
  "CONV_IMPLS",
  "ConvNet",
  "max_pool_2x2",
  "MLP",
  "resolve_conv",
]


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


CONV_IMPLS = ("auto", "xla", "im2col")


def _activation_fn(name: str):
  if name not in ACTIVATION_FNS:
    raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATION_FNS)}")
  return ACTIVATION_FNS[name]


# ---------------------------------------------------------------------------
# Convolution implementations.
# ---------------------------------------------------------------------------


def conv_im2col(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int] = (1, 1),
  padding: str | Sequence[tuple[int, int]] = "VALID",
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """A 2-D NHWC x HWIO convolution as patches @ kernel (``lax.conv_general_dilated``'s signature).

  Supports what the models here use: any kernel size, strides and padding
  (``"VALID"``, ``"SAME"`` or explicit pairs), no dilation, one feature group,
  flax's default NHWC/HWIO/NHWC dimension numbers.

  Args:
    lhs: inputs ``(N, H, W, C)``.
    rhs: kernel ``(kh, kw, C, O)``.
    window_strides: ``(sh, sw)``.
    padding: ``"VALID"``, ``"SAME"`` or ``((lo, hi), (lo, hi))``.
    lhs_dilation: None or all ones (no dilation).
    rhs_dilation: None or all ones.
    dimension_numbers: ignored; flax's default NHWC/HWIO/NHWC is assumed.
    feature_group_count: must be 1.
    precision: passed on to the patches @ kernel product.
    preferred_element_type: ignored, accepted for compatibility.

  Returns:
    ``(N, H', W', O)``.

  Raises:
    ValueError: naming a dilation, group count or shape it does not support.
  """
  for name, d in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
    if d is not None and any(int(v) != 1 for v in d):
      raise ValueError(f"conv_im2col: {name} must be 1, got {d}")
  if feature_group_count != 1:
    raise ValueError(f"conv_im2col: feature_group_count must be 1, got {feature_group_count}")
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(
      f"conv_im2col: expected NHWC inputs and an HWIO kernel, got shapes {lhs.shape}, {rhs.shape}"
    )
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
  cols = [
    x[:, i : i + sh * (h - 1) + 1 : sh, j : j + sw * (w - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  # Patch entry (i * kw + j) * C + c meets kernel[i, j, c]: the HWIO reshape order.
  y = jnp.dot(patches.reshape(-1, kh * kw * c), rhs.reshape(kh * kw * c, out), precision=precision)
  return y.reshape(lhs.shape[0], h, w, out)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2, VALID (an odd last row/column is dropped), NHWC.

  The same forward values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, as
  a reshape and a max: XLA:CPU runs ``reduce_window`` and its gradient
  (select-and-scatter) about 2.5x slower inside a training loop. Gradients
  agree except where a window holds tied maxima: ``jnp.max`` splits the
  gradient among them, ``reduce_window`` gives it to one; after a ReLU the
  usual tie is at 0, where the ReLU's own gradient is 0 anyway.
  """
  n, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def resolve_conv(conv: str) -> str:
  """``"auto"`` -> ``"im2col"`` on CPU, ``"xla"`` elsewhere; others unchanged.

  Raises:
    ValueError: if ``conv`` is not one of `CONV_IMPLS`.
  """
  if conv not in CONV_IMPLS:
    raise ValueError(f"conv must be one of {CONV_IMPLS}, got {conv!r}")
  if conv == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return conv


def conv_function(conv: str | Callable) -> Callable | None:
  """The ``conv_general_dilated`` argument of flax ``nn.Conv`` for a model's ``conv`` field.

  Args:
    conv: a name in `CONV_IMPLS` or a function with
      ``lax.conv_general_dilated``'s signature (returned as is).

  Returns:
    None for XLA's convolution (flax's default), `conv_im2col`, or ``conv``.

  Raises:
    ValueError: if ``conv`` is neither a known name nor callable.
  """
  if callable(conv):
    return conv
  if not isinstance(conv, str):
    raise ValueError(f"conv must be one of {CONV_IMPLS} or a function, got {conv!r}")
  return conv_im2col if resolve_conv(conv) == "im2col" else None


class MLP(nn.Module):
  """Fully connected net ``in -> hidden... -> outputs``.

  Attributes:
    hidden: widths of the hidden layers (``Dense_0`` ... in the params).
    outputs: width of the linear head.
    activation: hidden activation name (`ACTIVATION_FNS`).
    init_scheme: initial distribution of hidden kernels (`cbp_jax.initializers.INITS`).
    param_dtype: dtype of the parameters.
    layer_norm: if True, a LayerNorm (``LayerNorm_i``) between each hidden
      layer and its activation, as in the LayerNorm + weight decay baseline
      (Lyle et al. 2024); `cbp_jax.graph_from_params` pairs each with its layer.
  """

  hidden: Sequence[int]
  outputs: int
  activation: str = "relu"
  init_scheme: str = "kaiming"
  param_dtype: jnp.dtype = jnp.float32
  layer_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation_fn(self.activation)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      dense = nn.Dense(
        width,
        kernel_init=initializers.initializer(self.init_scheme, self.activation),
        param_dtype=self.param_dtype,
        dtype=self.param_dtype,
      )
      x = dense(x)
      if self.layer_norm:
        x = nn.LayerNorm(param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
      x = sow_activation(dense, act(x))
    # The head is drawn like the reference's output layer: U(+-sqrt(3/fan_in)).
    return nn.Dense(
      self.outputs,
      kernel_init=initializers.initializer("lecun"),
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )(x)


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
    conv: the convolution (`conv_function`): ``"xla"`` (default),
      ``"im2col"``, ``"auto"`` or a ``lax.conv_general_dilated``-like
      function. Parameters do not depend on it.
  """

  outputs: int = 2
  init_scheme: str = "default"
  param_dtype: jnp.dtype = jnp.float32
  conv: str | Callable = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init = initializers.initializer(self.init_scheme, "relu")
    conv_fn = conv_function(self.conv)
    for features, size in ((32, 5), (64, 3), (128, 3)):
      conv = nn.Conv(
        features,
        (size, size),
        padding="VALID",
        kernel_init=kernel_init,
        conv_general_dilated=conv_fn,
        param_dtype=self.param_dtype,
        dtype=self.param_dtype,
      )
      x = max_pool_2x2(nn.relu(conv(x)))
      sow_activation(conv, x)
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      dense = nn.Dense(128, kernel_init=kernel_init, param_dtype=self.param_dtype, dtype=self.param_dtype)
      x = sow_activation(dense, nn.relu(dense(x)))
    return nn.Dense(
      self.outputs,
      kernel_init=initializers.initializer("default"),
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )(x)
