"""Shrink and Perturb (Ash & Adams 2020): scale the parameters and add noise."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cbp_jax import prng, validation


class ShrinkPerturbState(NamedTuple):
  """State of `shrink_and_perturb`.

  Attributes:
    count: steps taken (int32).
    key: PRNG key of the noise; split every step.
  """

  count: jax.Array
  key: jax.Array


def shrink_and_perturb(
  shrink: float | jax.Array,
  noise_scale: float | jax.Array,
  *,
  key: jax.Array | int,
  every: int | jax.Array = 1,
) -> optax.GradientTransformation:
  """Shrink and Perturb (Ash & Adams 2020), placed last in a chain.

  On every ``every``-th step (steps ``every, 2 * every, ...``) the returned
  updates make the new parameters

      ``shrink * (params + updates) + noise_scale * N(0, 1)``

  (fresh independent noise per entry); on the other steps the updates pass
  through unchanged. With ``shrink = 1`` and ``noise_scale = 0`` the updates
  are bitwise unchanged. Because it rewrites the chain's final updates, put
  it last: ``optax.chain(optax.sgd(lr), shrink_and_perturb(...))``.

  The loss-of-plasticity reference implements S&P as the optimizer's weight
  decay (shrink ``~= 1 - lr * weight_decay`` each step, the two differ by
  ``O(lr**2 * weight_decay)``) plus ``N(0, perturb_scale**2)`` noise added
  after every step. The paper does not state its S&P values: they are
  user-chosen (sweep ``shrink`` just below 1, e.g. ``1 - 1e-5 .. 1 - 1e-3``,
  and ``noise_scale`` around ``1e-5 .. 1e-3`` times the weights' scale).

  The noise key lives in the state: give each seed its own ``key`` (e.g.
  build the transform or call ``init`` inside a `jax.vmap` over keys) to get
  independent noise per seed. Non-floating leaves are left unchanged.

  Args:
    shrink: factor in (0, 1].
    noise_scale: standard deviation of the noise, >= 0.
    key: PRNG key (or int seed) of the noise.
    every: apply every this many steps, >= 1.

  Traced ``shrink``/``noise_scale``/``every`` (vmapped sweeps) are not
  checked.

  Returns:
    An `optax.GradientTransformation` whose state is a `ShrinkPerturbState`.

  Raises:
    ValueError: naming an argument out of range.

  Example:
    >>> params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
    >>> tx = optax.chain(optax.sgd(0.01),
    ...                  cbp_jax.methods.shrink_and_perturb(1 - 1e-4, 1e-4, key=0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  v = validation.scalar("shrink", shrink)
  if v is not None and not 0.0 < v <= 1.0:
    raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")
  validation.check_nonnegative("noise_scale", noise_scale)
  validation.check_positive_int("every", every)
  key = validation.as_key(key)

  def init_fn(params):
    del params
    return ShrinkPerturbState(count=jnp.zeros((), jnp.int32), key=key)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("shrink_and_perturb: update needs params (tx.update(grads, state, params))")
    count = state.count + 1
    key, noise_key = prng.split(state.key)

    def perturb(updates):
      u, treedef = jax.tree.flatten(updates)
      p = jax.tree.leaves(params)
      keys = prng.split(noise_key, max(len(u), 1))
      out = []
      for k, ui, pi in zip(keys, u, p):
        if not jnp.issubdtype(ui.dtype, jnp.floating):
          out.append(ui)
          continue
        noise = prng.normal(k, ui.shape)
        new = (shrink - 1.0) * pi.astype(jnp.float32) + shrink * ui.astype(jnp.float32) + noise_scale * noise
        out.append(new.astype(ui.dtype))
      return jax.tree.unflatten(treedef, out)

    if validation.concrete(every) == 1:  # A cond would force the update tree through memory.
      updates = perturb(updates)
    else:  # Noise costs O(params): skip it on the other steps.
      updates = jax.lax.cond(count % every == 0, perturb, lambda u: u, updates)
    return updates, ShrinkPerturbState(count=count, key=key)

  return optax.GradientTransformation(init_fn, update_fn)
