"""The initial weight distributions that CBP redraws replaced units from.

Four are uniform on ``[-bound, bound]`` (the paper's ``kaiming``, ``default``,
``xavier``, ``lecun``), ``kaiming_normal`` is Gaussian with
``std = gain / sqrt(fan_in)`` (the CIFAR-100 ResNet's) and ``lecun_normal`` is
flax's default kernel initializer (a normal truncated at two standard
deviations, variance ``1 / fan_in``, no gain). Fans follow PyTorch's
conventions so that runs match the reference: a conv kernel's fan-in is
``C_in * kh * kw`` (every axis but the last) and its fan-out ``C_out * kh * kw``.

`cbp_jax.cbp` also takes any ``jax.nn.initializers``-style callable
``init(key, shape, dtype)`` instead of a name (see `is_initializer`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cbp_jax import prng

# `standard_draw` and `check_initializer` serve the reset kernel and the transforms.
__all__ = [
  "ACTIVATIONS",
  "gain",
  "initializer",
  "INITS",
  "is_initializer",
  "NORMAL_INITS",
  "scale",
  "TRUNCATED_INITS",
]


INITS = ("kaiming", "default", "xavier", "lecun", "kaiming_normal", "lecun_normal")
NORMAL_INITS = ("kaiming_normal",)
TRUNCATED_INITS = ("lecun_normal",)
# Standard deviation of N(0, 1) truncated to [-2, 2], as flax's truncated-normal initializers divide by.
_TRUNCATED_STD = 0.87962566103423978

# torch.nn.init.calculate_gain; swish and elu use ReLU's gain as the reference does.
_GAINS = {
  "linear": 1.0,
  "identity": 1.0,
  "sigmoid": 1.0,
  "tanh": 5.0 / 3.0,
  "relu": math.sqrt(2.0),
  "swish": math.sqrt(2.0),
  "elu": math.sqrt(2.0),
  "leaky_relu": math.sqrt(2.0 / (1.0 + 0.01**2)),
  "selu": 0.75,
  "silu": math.sqrt(2.0),  # The same function as swish.
  # PyTorch has no GELU gain; this is Kaiming's rule 1 / sqrt(E[gelu(z)^2]), z ~ N(0, 1)
  # (the same rule gives ReLU's sqrt(2)).
  "gelu": 1.5335304411955326,
}
ACTIVATIONS = tuple(_GAINS)


def gain(activation: str) -> float:
  """Returns the initialisation gain of ``activation`` (PyTorch's table)."""
  if activation not in _GAINS:
    raise ValueError(
      f"unknown activation {activation!r} for the initialisation gain; expected one of {ACTIVATIONS}"
    )
  return _GAINS[activation]


def scale(init: str, fan_in: int, fan_out: int, activation: str = "relu") -> float:
  """Scale of the initial distribution: the bound ``b`` of ``U(-b, b)`` or the std.

  Args:
    init: ``"kaiming"`` (bound gain * sqrt(3 / fan_in)), ``"default"``
      (bound sqrt(1 / fan_in), PyTorch's Linear/Conv default), ``"xavier"``
      (bound gain * sqrt(6 / (fan_in + fan_out))), ``"lecun"`` (bound
      sqrt(3 / fan_in)), ``"kaiming_normal"`` (std gain / sqrt(fan_in)) or
      ``"lecun_normal"`` (std sqrt(1 / fan_in) / 0.8796 of a normal truncated
      at +-2, flax's default; no gain).
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
  if init == "lecun_normal":
    return math.sqrt(1.0 / fan_in) / _TRUNCATED_STD
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
  """Float32 draws of ``init``'s family at unit scale: ``U(-1, 1)``, ``N(0, 1)`` or ``N(0, 1)`` truncated to ``[-2, 2]``.

  Multiplying by `scale` gives the initial distribution; one draw can thus
  serve several layers of different fans.
  """
  if init in NORMAL_INITS:
    return prng.normal(key, shape)
  if init in TRUNCATED_INITS:
    # Inverse CDF of the uniform on [Phi(-2), Phi(2)], as jax.random.truncated_normal does.
    low, high = (0.5 * (1.0 + math.erf(b / math.sqrt(2.0))) for b in (-2.0, 2.0))
    u = prng.uniform(key, shape, low, high)
    return jnp.clip(math.sqrt(2.0) * jax.lax.erf_inv(2.0 * u - 1.0), -2.0, 2.0)
  return prng.uniform(key, shape, -1.0, 1.0)


def is_initializer(init) -> bool:
  """True for a name in `INITS` or a callable ``init(key, shape, dtype)``."""
  return callable(init) or init in INITS


def check_initializer(init) -> None:
  """Raises ValueError unless ``init`` is a name in `INITS` or a working initializer callable.

  A callable is tried once, abstractly (`jax.eval_shape`), on a small kernel.
  """
  if isinstance(init, str) or not callable(init):
    if init not in INITS:
      raise ValueError(f"init must be one of {INITS} or a callable init(key, shape, dtype), got {init!r}")
    return
  try:
    out = jax.eval_shape(lambda key: init(key, (3, 2), jnp.float32), jax.random.key(0))
  except Exception as e:  # Whatever the callable raises, say which argument it was.
    raise ValueError(
      f"init={init!r} is not a jax.nn.initializers-style callable init(key, shape, dtype): "
      f"calling it on a (3, 2) kernel failed with {type(e).__name__}: {e}"
    ) from e
  if getattr(out, "shape", None) != (3, 2):
    raise ValueError(
      f"init={init!r} must return an array of the requested shape; for (3, 2) it returned "
      f"{getattr(out, 'shape', out)}"
    )


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
    if init in TRUNCATED_INITS:
      return (s * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)
    return jax.random.uniform(key, shape, jnp.float32, -s, s).astype(dtype)

  return init_fn
