"""Argument checks shared by the transforms: clear errors before any work.

Hyperparameters may be traced (a vmapped sweep); those cannot be checked at
construction and pass through. Concrete values are checked and a bad one is
named in a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
  """``x`` as a NumPy array, or None when it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def scalar(name: str, value: Any) -> float | None:
  """``float(value)`` for a concrete number, None for a traced one."""
  v = concrete(value)
  if v is None:
    return None
  if v.ndim != 0 or not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
    raise ValueError(f"{name} must be a scalar number, got {value!r}")
  return float(v)


def check_range(name: str, value: Any, low: float, high: float, *, high_open: bool) -> None:
  """Checks ``low <= value <= high`` (``< high`` when ``high_open``)."""
  v = scalar(name, value)
  if v is None:
    return
  ok = low <= v < high if high_open else low <= v <= high
  if not ok or math.isnan(v):
    bracket = ")" if high_open else "]"
    raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def check_nonnegative(name: str, value: Any) -> None:
  v = scalar(name, value)
  if v is not None and not v >= 0.0:  # Also rejects NaN.
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
  v = concrete(value)
  if v is None:
    return
  if v.ndim != 0 or not np.issubdtype(v.dtype, np.integer) or int(v) < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def as_key(key: Any) -> jax.Array:
  """A PRNG key from a key or an int seed."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return key
  if dtype == jnp.uint32 and key.shape[-1:] == (2,):  # A raw (legacy) key.
    return key
  raise ValueError(f"key must be a jax PRNG key or an int seed, got {key!r}")


def check_activations(who: str, layers: Sequence[Any], activations: Any) -> None:
  """Checks ``activations`` against resolved layers (at trace time).

  Args:
    who: the transform's name, for the message.
    layers: `cbp_jax.graph.ResolvedLayer` objects.
    activations: ``{layer_name: h}`` with units on the last axis.
  """
  names = [layer.name for layer in layers]
  if activations is None:
    raise ValueError(f"{who}: update needs the keyword argument activations={{layer: h}}; layers: {names}")
  if not isinstance(activations, Mapping):
    raise ValueError(f"{who}: activations must be a dict, got {type(activations).__name__}")
  for layer in layers:
    name = layer.name
    if name not in activations:
      raise ValueError(f"{who}: activations has no entry for layer '{name}' (got {sorted(activations)})")
    h = activations[name]
    shape = getattr(h, "shape", None)
    if shape is None or len(shape) == 0 or shape[-1] != layer.width:
      raise ValueError(
        f"{who}: activation of layer '{name}' must have the layer's "
        f"{layer.width} units on its last axis, got shape {shape}"
      )
    if not jnp.issubdtype(h.dtype, jnp.floating):
      raise ValueError(f"{who}: activation of layer '{name}' must be floating point, got {h.dtype}")
