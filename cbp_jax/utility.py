"""Running per-unit statistics: age, mean activation and utility (steps 1-4 of the Semantics page).

Everything here is O(units) state and elementwise/reduction work; the only
O(params) work per step is the weight-magnitude reductions, which read each
kernel (or, with a refresh interval, a slice of it) once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbp_jax import prng

__all__ = [
  "AGE_CAP",
  "debias",
  "incoming_magnitude",
  "init_statistics",
  "MagnitudeCache",
  "outgoing_magnitude",
  "UnitStatistics",
  "update_statistics",
  "UTILITIES",
]


UTILITIES = (
  "contribution",
  "adaptable_contribution",
  "zero_contribution",
  "adaptation",
  "weight",
  "feature_by_input",
  "random",
)

# Ages saturate here instead of overflowing int32 after 2**31 steps. Only
# `age > maturity` and `decay ** age` read them, and both are settled long
# before this (decay < 1 makes decay ** 2**30 exactly 0 in float32).
AGE_CAP = 2**30


class UnitStatistics(NamedTuple):
  """Running statistics of one layer's units (all shape ``(n,)``).

  Attributes:
    utility: running utility ``u``, not bias-corrected.
    mean_activation: running mean activation ``f``, not bias-corrected.
    age: steps since the unit was created or last replaced (int32).
  """

  utility: jax.Array
  mean_activation: jax.Array
  age: jax.Array


class MagnitudeCache(NamedTuple):
  """Weight magnitudes kept between refreshes (`cbp`'s ``magnitude_refresh_every``).

  Attributes:
    incoming: per layer, ``mean |w_in|`` of each unit, ``(n,)`` float32.
    outgoing: per layer, ``mean |w_out|`` of each unit, ``(n,)`` float32.
    phase: which slice of every layer's units is refreshed next (int32).
  """

  incoming: dict[str, jax.Array]
  outgoing: dict[str, jax.Array]
  phase: jax.Array


def init_statistics(width: int) -> UnitStatistics:
  # Separate buffers, so a training step may donate the whole state.
  return UnitStatistics(
    jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.int32)
  )


def debias(running: jax.Array, decay: jax.Array, age: jax.Array) -> jax.Array:
  """Adam-style bias correction ``running / (1 - decay**age)``; 0 at age 0."""
  correction = 1.0 - jnp.power(jnp.asarray(decay, jnp.float32), age.astype(jnp.float32))
  return jnp.where(age > 0, running / jnp.where(age > 0, correction, 1.0), 0.0)


def _post_step(
  param: jax.Array, update: jax.Array, axis: int, units: tuple[jax.Array, int] | None
) -> jax.Array:
  """``|param + update|`` in float32, only units ``[start, start + size)`` of ``axis``.

  Slicing before the add keeps the work (and memory traffic) to the slice.
  """
  if units is not None:
    start, size = units
    param = jax.lax.dynamic_slice_in_dim(param, start, size, axis)
    update = jax.lax.dynamic_slice_in_dim(update, start, size, axis)
  return jnp.abs(param.astype(jnp.float32) + update.astype(jnp.float32))


def incoming_magnitude(
  kernel: jax.Array, update: jax.Array, units: tuple[jax.Array, int] | None = None
) -> jax.Array:
  """``mean |w_in[i, :]|`` per unit of the post-step kernel ``kernel + update``.

  Units are the last axis; every other axis is averaged over. ``units`` =
  ``(start, size)`` restricts the work to units ``[start, start + size)``.
  """
  k = _post_step(kernel, update, -1, units)
  return jnp.mean(k.reshape(-1, k.shape[-1]), axis=0)


def outgoing_magnitude(consumers, width: int, units: tuple[jax.Array, int] | None = None) -> jax.Array:
  """``mean |w_out[:, i]|`` per unit, averaged over consumers (as the reference).

  Args:
    consumers: ``(kernel, update, layout)`` of each consumer; the post-step
      kernel is ``kernel + update``. Its axis -2 holds ``n * P`` inputs: unit
      ``i`` sits at inputs ``p * n + i`` (channels_last) or ``i * P + p``
      (channels_first). Splitting that axis by a reshape (no transpose) keeps
      this one fused read of the kernel.
    width: the layer's ``n``.
    units: optional ``(start, size)``: only units ``[start, start + size)``.

  Returns:
    ``(n,)`` magnitudes, or ``(size,)`` with ``units``.
  """
  mags = []
  for kernel, update, layout in consumers:
    *spatial, inputs, out = kernel.shape
    positions = inputs // width
    split = (positions, width) if layout == "channels_last" else (width, positions)
    unit_axis = len(spatial) + (1 if layout == "channels_last" else 0)
    k = _post_step(
      kernel.reshape(*spatial, *split, out), update.reshape(*spatial, *split, out), unit_axis, units
    )
    mags.append(jnp.mean(k, axis=tuple(a for a in range(k.ndim) if a != unit_axis)))
  return sum(mags) / len(mags)


def update_statistics(
  stats: UnitStatistics,
  h: jax.Array,
  out_mag: jax.Array,
  in_mag: jax.Array,
  *,
  decay: jax.Array,
  utility: str,
  key: jax.Array,
) -> tuple[UnitStatistics, jax.Array, jax.Array, jax.Array]:
  """Advances one layer's statistics by one batch (Semantics page, steps 1-4).

  Units whose batch statistics are not finite (NaN/inf activations or
  weights) keep their previous running values, so one bad batch cannot
  poison them for ever; they are counted and their utility ranks last-chosen.

  Args:
    stats: the layer's statistics before this batch.
    h: post-activation output, units on the last axis; every other axis
      (batch, conv spatial) is averaged over.
    out_mag: outgoing weight magnitude per unit.
    in_mag: incoming weight magnitude per unit.
    decay: decay rate ``d`` (may be traced).
    utility: one of `UTILITIES`.
    key: PRNG key, used by ``"random"`` only.

  Returns:
    ``(new_stats, corrected_utility, corrected_mean_activation, n_nonfinite)``.
  """
  decay = jnp.asarray(decay, jnp.float32)
  h = h.astype(jnp.float32).reshape(-1, h.shape[-1])
  age = jnp.minimum(stats.age + 1, AGE_CAP)

  batch_mean = jnp.mean(h, axis=0)
  mean_activation = decay * stats.mean_activation + (1.0 - decay) * batch_mean
  f_hat = debias(mean_activation, decay, age)
  if utility in ("contribution",):
    u_new = out_mag * jnp.mean(jnp.abs(h), axis=0)
  elif utility in ("adaptable_contribution", "zero_contribution", "feature_by_input"):
    deviation = jnp.mean(jnp.abs(h - f_hat), axis=0)
    # A unit whose incoming weights are all zero (every input it reads was just
    # replaced, so its column was zeroed) ignores its inputs: its activation is
    # constant and its deviation per unit of input weight is taken as 0, not
    # 0/0 or x/0, so it ranks as useless instead of poisoning the statistics.
    # (NaN magnitudes stay NaN: they are counted as non-finite below.)
    per_input = jnp.where(in_mag == 0, 0.0, deviation / jnp.where(in_mag == 0, 1.0, in_mag))
    if utility == "adaptable_contribution":
      u_new = out_mag * per_input
    elif utility == "zero_contribution":
      u_new = out_mag * deviation
    else:
      u_new = per_input
  elif utility == "adaptation":
    u_new = 1.0 / in_mag
  elif utility == "weight":
    u_new = out_mag
  elif utility == "random":
    u_new = jnp.zeros_like(batch_mean)
  else:
    raise ValueError(f"unknown utility {utility!r}; expected one of {UTILITIES}")

  running = decay * stats.utility + (1.0 - decay) * u_new
  finite = jnp.isfinite(running) & jnp.isfinite(mean_activation)
  running = jnp.where(finite, running, stats.utility)
  mean_activation = jnp.where(finite, mean_activation, stats.mean_activation)
  f_hat = debias(mean_activation, decay, age)
  corrected = debias(running, decay, age)
  if utility == "random":
    corrected = prng.uniform(key, corrected.shape)
  new_stats = UnitStatistics(running, mean_activation, age)
  return new_stats, corrected, f_hat, jnp.sum(~finite).astype(jnp.int32)
