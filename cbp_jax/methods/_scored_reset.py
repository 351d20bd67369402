"""The machinery shared by the unit-reset methods ReDo, ReGraMa and SNR.

Each scores the hidden units of a `cbp_jax.LayerGraph` its own way and
reinitialises the chosen ones with the reset kernel `cbp` uses
(`cbp_jax.reset`); everything else, the two forms (last in a chain, or
wrapping an optimizer whose statistics of reset entries restart), the
bookkeeping, and the `lax.cond` that skips the O(params) rewrite on steps
that reset nothing, is here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cbp_jax import graph as graph_lib
from cbp_jax import initializers, prng, validation
from cbp_jax import reset as reset_lib
from cbp_jax import transform as transform_lib


class RedoState(NamedTuple):
  """State of `redo` and `regrama`.

  Attributes:
    count: steps taken (int32).
    key: PRNG key of the new incoming weights; split every step.
    replaced_total: per layer, units reinitialised so far (int32).
    last_replaced: per layer, boolean mask of the units reinitialised at the
      last step (for logging, or BatchNorm running statistics).
    inner_state: the wrapped optimizer's state (``optimizer=`` form), else
      ``optax.EmptyState()``.
  """

  count: jax.Array
  key: jax.Array
  replaced_total: dict[str, jax.Array]
  last_replaced: dict[str, jax.Array]
  inner_state: optax.OptState


class SnrState(NamedTuple):
  """State of `snr`: `RedoState`'s fields and the per-unit firing statistics.

  Attributes:
    count, key, replaced_total, last_replaced, inner_state: as `RedoState`.
    firing_rate: per layer, float32 ``(width,)``: the fraction of examples on
      which each unit fired (output > 0) since its last reset.
    seen: per layer, float32 ``(width,)``: examples seen since the last reset.
    streak: per layer, float32 ``(width,)``: examples since the unit last
      fired (its current inactivity streak).
  """

  count: jax.Array
  key: jax.Array
  replaced_total: dict[str, jax.Array]
  last_replaced: dict[str, jax.Array]
  inner_state: optax.OptState
  firing_rate: dict[str, jax.Array]
  seen: dict[str, jax.Array]
  streak: dict[str, jax.Array]


# SnrState's per-unit statistics: its fields beyond RedoState's.
_STATS_FIELDS = SnrState._fields[len(RedoState._fields) :]

# The states that resolve a layer graph against real parameters in `init`.
_UNIT_RESET_STATES = (transform_lib.CbpState, RedoState, SnrState)

# cbp and the unit-reset methods cannot be each other's optimizer=: the
# wrapping transform passes no activations on to its optimizer, and
# restarting that optimizer's statistics calls its init on optax's parameter
# placeholder, which theirs cannot take (they resolve the layer graph against
# the real parameters).
_COMPOSE = (
  "wrap a plain optax optimizer in one of them and chain the other after it, e.g. "
  "optax.chain(cbp(graph, ..., optimizer=optax.adam(lr)), redo(graph, ...))"
)


def unit_reset_states(opt_state: Any) -> list[Any]:
  """The `cbp`, `redo`, `regrama` and `snr` states anywhere in ``opt_state``."""
  return [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _UNIT_RESET_STATES))
    if isinstance(s, _UNIT_RESET_STATES)
  ]


def replaced_total(opt_state: Any) -> jax.Array:
  """Units reset so far by every `cbp`/`redo`/`regrama`/`snr` transform in ``opt_state``.

  Summed over their layers (int32; 0 when there is none), e.g. to log a
  method's resets the same way whichever of them a run uses.
  """
  total = jnp.zeros((), jnp.int32)
  for s in unit_reset_states(opt_state):
    for v in s.replaced_total.values():
      total = total + jnp.sum(v).astype(jnp.int32)
  return total


def check_common(who: str, graph: Any, init: str) -> None:
  """Checks the arguments every unit-reset method takes."""
  if not isinstance(graph, graph_lib.LayerGraph):
    raise ValueError(f"{who}: graph must be a cbp_jax.LayerGraph, got {type(graph).__name__}")
  initializers.check_initializer(init)


class Scored(NamedTuple):
  """What a method's ``select`` returns for one step.

  Attributes:
    selections: per layer name, the units to reset (`cbp_jax.reset.Selection`).
    means: per layer, mean activation for the next-layer bias correction, or None.
    stats: the method's own per-unit statistics after this step (before the
      reset; `unit_reset_transform` restarts those of reset units).
  """

  selections: dict[str, reset_lib.Selection]
  means: dict[str, jax.Array] | None
  stats: dict[str, dict[str, jax.Array]]


def unit_reset_transform(
  who: str,
  graph: graph_lib.LayerGraph,
  *,
  key: jax.Array | int,
  init: str,
  optimizer: optax.GradientTransformation | None,
  select: Callable[..., Scored],
  needs_activations: bool,
  init_stats: Callable[[Any], dict[str, dict[str, jax.Array]]] | None = None,
  restart_stats: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A unit-reset transform: ``select`` picks units, the shared kernel resets them.

  Args:
    who: the method's name, for messages.
    graph: the hidden layers.
    key: PRNG key (or int seed) of the new incoming weights.
    init: distribution of new incoming weights.
    optimizer: optional optimizer to wrap (its statistics of reset entries
      restart).
    select: ``select(layers, grads, params, activations, count, stats)`` with
      ``grads`` the updates this transform receives (before a wrapped
      optimizer) and ``stats`` the method's statistics; returns `Scored`.
    needs_activations: whether ``update`` requires ``activations=``.
    init_stats: ``init_stats(layers)`` -> ``{field: {layer: array}}``, the
      method's extra state fields (`SnrState`); None for a `RedoState`.
    restart_stats: ``restart_stats(stats_of_layer, mask)`` -> the layer's
      statistics with those of the reset units (``mask``) restarted.

  Returns:
    The transform; its state is a `RedoState`, or an `SnrState` when
    ``init_stats`` is given.
  """
  key = validation.as_key(key)
  inner = None if optimizer is None else optax.with_extra_args_support(optimizer)

  def init_fn(params):
    if not jax.tree.leaves(params):
      raise ValueError(
        f"{who}: init needs the parameters, got a tree without arrays (as "
        "optax.tree_utils.tree_map_params passes when it is another transform's "
        f"optimizer=, which is not supported: {_COMPOSE})"
      )
    layers, _, _ = graph_lib.resolve(graph, params)
    if inner is not None:
      inner_state = inner.init(params)
      if unit_reset_states(inner_state):
        raise ValueError(f"{who}: optimizer= holds a cbp, redo, regrama or snr transform: {_COMPOSE}")
      reset_lib.state_param_leaves(inner, inner_state, params)  # Fail early.
    else:
      inner_state = optax.EmptyState()
    common = dict(
      count=jnp.zeros((), jnp.int32),
      key=key,
      replaced_total={l.name: jnp.zeros((), jnp.int32) for l in layers},
      last_replaced={l.name: jnp.zeros((l.width,), bool) for l in layers},
      inner_state=inner_state,
    )
    if init_stats is None:
      return RedoState(**common)
    return SnrState(**common, **init_stats(layers))

  def update_fn(updates, state, params=None, *, activations=None, **extra_args):
    if params is None:
      raise ValueError(f"{who}: update needs params (tx.update(grads, state, params, ...))")
    layers, _, _ = graph_lib.resolve(graph, params)
    if needs_activations:
      validation.check_activations(who, layers, activations)
    grads = updates
    if inner is not None:
      updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    else:
      inner_state = state.inner_state

    count = state.count + 1
    key, reinit_key = prng.split(state.key)
    stats = {} if init_stats is None else {f: getattr(state, f) for f in _STATS_FIELDS}
    scored = select(layers, grads, params, activations, count, stats)
    selections = scored.selections

    def reset(operands):
      updates, inner_state = operands
      new_updates = reset_lib.reset_units(
        updates, params, layers, selections, reinit_key, init=init, mean_activation=scored.means
      )
      if inner is not None:
        new_params = optax.apply_updates(params, new_updates)
        touched = reset_lib.touched_slices(layers, selections)
        inner_state = reset_lib.reset_optimizer_state(inner, inner_state, new_params, touched)
      return new_updates, inner_state

    # Unlike cbp, the reset stays under lax.cond. These methods may reset
    # every unit of a layer, so their selections have K = width slots and the
    # kernel draws and gathers a whole kernel of new weights; run on every
    # step, that costs far more than the cond's copy of the updates (XLA's
    # cost analysis of the 784-2000x3 MLP's ReDo step at batch 1 without the
    # cond: 766M flops against plain SGD's 61M, the threefry draw of 9.6M
    # weights).
    any_replaced = jnp.any(jnp.stack([selections[l.name].count(l.width) > 0 for l in layers]))
    updates, inner_state = jax.lax.cond(
      any_replaced, reset, lambda operands: operands, (updates, inner_state)
    )

    replaced_total, last_replaced = {}, {}
    new_stats = {f: {} for f in scored.stats}
    for layer in layers:
      name = layer.name
      mask = selections[name].mask(layer.width)
      replaced_total[name] = state.replaced_total[name] + jnp.sum(mask, dtype=jnp.int32)
      last_replaced[name] = mask
      if scored.stats:
        restarted = restart_stats({f: scored.stats[f][name] for f in scored.stats}, mask)
        for f in scored.stats:
          new_stats[f][name] = restarted[f]
    common = dict(
      count=count,
      key=key,
      replaced_total=replaced_total,
      last_replaced=last_replaced,
      inner_state=inner_state,
    )
    if init_stats is None:
      return updates, RedoState(**common)
    return updates, SnrState(**common, **new_stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
