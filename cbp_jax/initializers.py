"""The initial weight distributions that CBP redraws replaced units from.

Four are uniform on ``[-bound, bound]`` (Semantics page, step 8) and ``kaiming_normal``
is Gaussian with ``std = gain / sqrt(fan_in)`` (the CIFAR-100 ResNet's), with
PyTorch's conventions so that runs match the reference: a conv kernel's
fan-in is ``C_in * kh * kw`` (every axis but the last) and its fan-out
``C_out * kh * kw``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cbp_jax import prng

INITS = ("kaiming", "default", "xavier", "lecun", "kaiming_normal")
NORMAL_INITS = ("kaiming_normal",)

# torch.nn.init.calculate_gain; swish and elu use ReLU's gain as the reference does.
_GAINS = {
    "linear": 1.0,
    "identity": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "swish": math.sqrt(2.0),
    "elu": math.sqrt(2.0),
    "leaky_relu": math.sqrt(2.0 / (1.0 + 0.01 ** 2)),
    "selu": 0.75,
}
ACTIVATIONS = tuple(_GAINS)


def gain(activation: str) -> float:
  """Returns the initialisation gain of ``activation`` (PyTorch's table)."""
  if activation not in _GAINS:
    raise ValueError(
        f"unknown activation {activation!r} for the initialisation gain; "
        f"expected one of {ACTIVATIONS}")
  return _GAINS[activation]


def scale(init: str, fan_in: int, fan_out: int, activation: str = "relu") -> float:
  """Scale of the initial distribution: the bound ``b`` of ``U(-b, b)`` or the std.

  Args:
    init: ``"kaiming"`` (bound gain * sqrt(3 / fan_in)), ``"default"``
      (bound sqrt(1 / fan_in), PyTorch's Linear/Conv default), ``"xavier"``
      (bound gain * sqrt(6 / (fan_in + fan_out))), ``"lecun"`` (bound
      sqrt(3 / fan_in)) or ``"kaiming_normal"`` (std gain / sqrt(fan_in)).
    fan_in: inputs per unit.
    fan_out: outputs per input.
    activation: hidden activation, for the gain.

  Returns:
    The bound (uniform inits) or standard deviation (`NORMAL_INITS`).
  """
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
  if fan_in <= 0 or fan_out <= 0:
    raise ValueError(f"fan_in and fan_out must be positive, got {fan_in}, {fan_out}")
  g = gain(activation)
  if init == "kaiming_normal":
    return g / math.sqrt(fan_in)
  if init == "kaiming":
    return g * math.sqrt(3.0 / fan_in)
  if init == "default":
    return math.sqrt(1.0 / fan_in)
  if init == "xavier":
    return g * math.sqrt(6.0 / (fan_in + fan_out))
  return math.sqrt(3.0 / fan_in)


def standard_draw(init: str, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Float32 draws of ``init``'s family at unit scale: ``U(-1, 1)`` or ``N(0, 1)``.

  Multiplying by `scale` gives the initial distribution; one draw can thus
  serve several layers of different fans.
  """
  if init in NORMAL_INITS:
    return prng.normal(key, shape)
  return prng.uniform(key, shape, -1.0, 1.0)


def initializer(init: str = "kaiming", activation: str = "relu") -> jax.nn.initializers.Initializer:
  """A flax kernel initializer drawing from the same distribution CBP uses.

  Use it for the hidden layers so that replaced units start like the
  originals did.

  Args:
    init: one of `INITS`.
    activation: hidden activation, for the gain.

  Returns:
    ``init_fn(key, shape, dtype)`` for flax ``kernel_init``.
  """
  gain(activation)
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")

  def init_fn(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1])
    fan_out = shape[-1] * math.prod(shape[:-2])
    s = scale(init, fan_in, fan_out, activation)
    if init in NORMAL_INITS:
      return (s * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.random.uniform(key, shape, jnp.float32, -s, s).astype(dtype)

  return init_fn
