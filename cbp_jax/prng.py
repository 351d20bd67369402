"""Per-step random numbers that compile to one fused operation on every backend.

CBP draws a few random numbers every step (a key split, the new incoming
weights, the probabilistic count). jax lowers its threefry hash on CPU as a
rolled five-iteration loop (to keep compile times short), so each
``jax.random`` call inside a training step becomes a ``while`` of ~18
operations run five times: on a small net that fixed cost is most of CBP's
step. The functions here compute the same threefry-2x32 hash with its twenty
rounds unrolled into plain integer arithmetic, which XLA fuses into the
surrounding work, and give **bitwise the same numbers** as ``jax.random``'s
``split``, ``uniform`` and ``normal`` (float32) with jax's default
partitionable threefry (tested). Keys of other implementations (``rbg``,
``unsafe_rbg``) are passed to ``jax.random`` unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "normal",
  "split",
  "uniform",
]


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as jax computes it."""
  ks = (k1, k2, k1 ^ k2 ^ _PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for group in range(5):
    for r in _ROTATIONS[group % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
    x1 = x1 + ks[(group + 1) % 3]
    x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


def _is_threefry(key: jax.Array) -> bool:
  return (
    jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and str(jax.random.key_impl(key)) == "threefry2x32"
  )


def _hash_counts(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The two hash words of every position of ``shape`` (row-major counter)."""
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f"cbp_jax.prng: at most 2**32 - 1 numbers per call, asked for shape {shape}")
  data = jax.random.key_data(key)
  counts = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _threefry2x32(data[0], data[1], jnp.zeros_like(counts), counts)


def split(key: jax.Array, num: int = 2) -> jax.Array:
  """``jax.random.split(key, num)``, fused."""
  if not _is_threefry(key):
    return jax.random.split(key, num)
  hi, lo = _hash_counts(key, (num,))
  return jax.random.wrap_key_data(jnp.stack([hi, lo], axis=-1), impl="threefry2x32")


def uniform(key: jax.Array, shape: tuple[int, ...], minval: float = 0.0, maxval: float = 1.0) -> jax.Array:
  """``jax.random.uniform(key, shape, jnp.float32, minval, maxval)``, fused."""
  if not _is_threefry(key):
    return jax.random.uniform(key, shape, jnp.float32, minval, maxval)
  hi, lo = _hash_counts(key, tuple(shape))
  # 23 random mantissa bits under the exponent of 1.0: a float in [1, 2).
  mantissa = ((hi ^ lo) >> np.uint32(9)) | np.float32(1.0).view(np.uint32)
  floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  lo_f, hi_f = np.float32(minval), np.float32(maxval)
  return jnp.maximum(lo_f, floats * (hi_f - lo_f) + lo_f)


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``jax.random.normal(key, shape, jnp.float32)``, fused (inverse-erf of a uniform)."""
  if not _is_threefry(key):
    return jax.random.normal(key, shape, jnp.float32)
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform(key, shape, low, 1.0))
