"""L2-Init (Kumar et al. 2023): weight decay toward the initial parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbp_jax import validation


class L2InitState(NamedTuple):
  """State of `l2_init`: a copy of the parameters it was initialised with."""

  initial_params: Any


def l2_init(weight_decay: float | jax.Array) -> optax.GradientTransformation:
  """L2-Init (Kumar et al. 2023): weight decay toward the initial parameters.

  Adds ``weight_decay * (params - initial_params)`` to the updates, where
  ``initial_params`` are the parameters passed to ``init``. Place it before
  the learning-rate scaling, like `l2`: with
  ``optax.chain(l2_init(wd), optax.sgd(lr))`` the step is
  ``-lr * (g + wd * (params - initial_params))``.

  The initial parameters are state entries that mirror the parameters, so
  `reset_optimizer_for` (and the ``optimizer=`` form of `cbp`/`redo`) resets
  them to the *new* values of reset parameters: a reset head is then pulled
  toward its new initialisation.

  Args:
    weight_decay: the coefficient, >= 0 (traced values are not checked).

  Returns:
    An `optax.GradientTransformation` whose state is an `L2InitState`.

  Raises:
    ValueError: if ``weight_decay`` is negative or not a number.

  Example:
    >>> params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
    >>> tx = optax.chain(cbp_jax.methods.l2_init(1e-3), optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  validation.check_nonnegative("weight_decay", weight_decay)

  def init_fn(params):
    return L2InitState(initial_params=_copy(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("l2_init: update needs params (tx.update(grads, state, params))")

    def pull(g, p, p0):
      if g is None:
        return None
      return (g + weight_decay * (p - p0)).astype(g.dtype)

    updates = jax.tree.map(pull, updates, params, state.initial_params, is_leaf=lambda x: x is None)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _copy(params: Any) -> Any:
  """Copies the array leaves (so the state never aliases donated params).

  Non-array leaves pass through, which keeps `init` usable by
  `optax.tree_utils.tree_map_params` (it calls ``init`` on a placeholder).
  """
  return jax.tree.map(
    lambda p: jnp.array(p, copy=True) if isinstance(p, (jax.Array, np.ndarray)) else p, params
  )
