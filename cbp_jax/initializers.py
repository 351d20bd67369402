"""The initial weight distributions that CBP redraws replaced units from.

All four are uniform on ``[-bound, bound]`` (SPEC step 8), with PyTorch's
conventions so that runs match the reference: a conv kernel's fan-in is
``C_in * kh * kw`` (every axis but the last) and its fan-out
``C_out * kh * kw``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INITS = ("kaiming", "default", "xavier", "lecun")

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


def bound(init: str, fan_in: int, fan_out: int, activation: str = "relu") -> float:
  """Half-width of the uniform initial distribution.

  Args:
    init: ``"kaiming"`` (gain * sqrt(3 / fan_in)), ``"default"``
      (sqrt(1 / fan_in), PyTorch's Linear/Conv default), ``"xavier"``
      (gain * sqrt(6 / (fan_in + fan_out))) or ``"lecun"`` (sqrt(3 / fan_in)).
    fan_in: inputs per unit.
    fan_out: outputs per input.
    activation: hidden activation, for the gain.

  Returns:
    The bound ``b`` of ``U(-b, b)``.
  """
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
  if fan_in <= 0 or fan_out <= 0:
    raise ValueError(f"fan_in and fan_out must be positive, got {fan_in}, {fan_out}")
  g = gain(activation)
  if init == "kaiming":
    return g * math.sqrt(3.0 / fan_in)
  if init == "default":
    return math.sqrt(1.0 / fan_in)
  if init == "xavier":
    return g * math.sqrt(6.0 / (fan_in + fan_out))
  return math.sqrt(3.0 / fan_in)


def uniform(init: str = "kaiming", activation: str = "relu") -> jax.nn.initializers.Initializer:
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
    b = bound(init, fan_in, fan_out, activation)
    return jax.random.uniform(key, shape, jnp.float32, -b, b).astype(dtype)

  return init_fn
