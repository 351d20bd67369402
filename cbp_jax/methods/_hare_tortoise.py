"""Hare & Tortoise (Lee et al., ICML 2024): a slow EMA copy and periodic resets to it.

Lee, Cho, Kim, Kim, Min, Choo and Lyle, *Slow and Steady Wins the Race:
Maintaining Plasticity with Hare and Tortoise Networks*, ICML 2024. The
trained network (the hare) learns fast; an exponential moving average of its
weights (the tortoise) integrates knowledge slowly; every ``reset_period``
steps the hare is reset to the tortoise, which restores its plasticity
without discarding what the tortoise has accumulated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cbp_jax import validation


class HareTortoiseState(NamedTuple):
  """State of `hare_tortoise`.

  Attributes:
    count: steps taken (int32).
    tortoise: the slow EMA copy of the parameters (a tree like them).
  """

  count: jax.Array
  tortoise: Any


def hare_tortoise(
  decay: float | jax.Array = 0.999,
  reset_period: int | jax.Array = 1000,
) -> optax.GradientTransformation:
  """Hare & Tortoise (Lee et al., ICML 2024), placed last in a chain.

  With ``new = params + updates`` the hare's weights after this step, every
  step updates the tortoise ``T <- decay * T + (1 - decay) * new`` (``T``
  starts as the parameters given to ``init``), and on steps
  ``reset_period, 2 * reset_period, ...`` the returned updates land the
  parameters on the new ``T`` (the hare reset to the tortoise). On other
  steps the updates pass through unchanged. Because it rewrites the chain's
  final updates, put it last: ``optax.chain(optax.adam(lr),
  hare_tortoise(0.999, 1000))``. The optimizer's statistics are kept across
  resets. Evaluate with the tortoise (`tortoise_params`) or the hare, as the
  paper compares both.

  Args:
    decay: EMA decay of the tortoise, in [0, 1].
    reset_period: reset the hare every this many steps, >= 1.

  Traced ``decay``/``reset_period`` (vmapped sweeps) are not checked. The
  paper's values depend on the benchmark; they are user-chosen here.

  Returns:
    An `optax.GradientTransformation` whose state is a `HareTortoiseState`.

  Raises:
    ValueError: naming an argument out of range; at ``update``, missing params.

  Example:
    >>> params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
    >>> tx = optax.chain(optax.adam(1e-3), cbp_jax.methods.hare_tortoise(0.999, 1000))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> slow = cbp_jax.methods.tortoise_params(state)
  """
  validation.check_range("decay", decay, 0.0, 1.0, high_open=False)
  validation.check_positive_int("reset_period", reset_period)

  def init_fn(params):
    return HareTortoiseState(
      count=jnp.zeros((), jnp.int32), tortoise=jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("hare_tortoise: update needs params (tx.update(grads, state, params))")
    count = state.count + 1
    new = optax.apply_updates(params, updates)
    tortoise = jax.tree.map(
      lambda t, n: (decay * t.astype(jnp.float32) + (1.0 - decay) * n.astype(jnp.float32)).astype(t.dtype),
      state.tortoise,
      new,
    )
    due = count % reset_period == 0
    updates = jax.tree.map(
      lambda u, t, p: jnp.where(due, (t - p).astype(u.dtype), u), updates, tortoise, params
    )
    return updates, HareTortoiseState(count=count, tortoise=tortoise)

  return optax.GradientTransformation(init_fn, update_fn)


def tortoise_params(opt_state: Any) -> Any:
  """The tortoise (slow) parameters of the `hare_tortoise` state inside ``opt_state``.

  Raises:
    ValueError: if ``opt_state`` holds no `HareTortoiseState`, or several.
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, HareTortoiseState))
    if isinstance(s, HareTortoiseState)
  ]
  if len(found) != 1:
    raise ValueError(f"tortoise_params: expected one hare_tortoise state, found {len(found)}")
  return found[0].tortoise
