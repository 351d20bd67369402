"""`cbp()`: Continual Backpropagation as an Optax gradient transformation.

One step, as data flows ("Per step" on the Semantics page of the documentation):
  updates (from the optimizer) + params -> post-step weights
  activations -> per-unit statistics and utility        (`utility.py`)
  utility, age -> how many and which units to replace    (this module)
  selection -> rewritten updates (+ optimizer statistics) (`reset.py`)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbp_jax import graph as graph_lib
from cbp_jax import initializers, prng, tree_paths, validation
from cbp_jax import reset as reset_lib
from cbp_jax import utility as utility_lib

__all__ = [
  "cbp",
  "CbpState",
  "COUNT_BASES",
  "find_cbp_state",
  "LayerState",
  "reset_batch_stats",
  "unit_stats",
]


COUNT_BASES = ("eligible", "layer")


class LayerState(NamedTuple):
  """The state `cbp` keeps for one hidden layer.

  Attributes:
    statistics: running utility, mean activation and age of each unit.
    pending: accumulated fraction of a replacement still owed (float32).
    replaced_total: units replaced so far (int32).
    last_replaced: boolean mask of the units replaced at the last step (e.g.
      for `reset_batch_stats`).
  """

  statistics: utility_lib.UnitStatistics
  pending: jax.Array
  replaced_total: jax.Array
  last_replaced: jax.Array


# The per-layer fields of the state before `LayerState`: four dicts by layer.
_LEGACY_FIELDS = ("statistics", "pending", "replaced_total", "last_replaced")


class CbpState(NamedTuple):
  """State of `cbp`: O(units) beyond the wrapped optimizer's own state.

  The per-layer views `statistics`, `pending`, `replaced_total` and
  `last_replaced` (dicts by layer name) are read-only properties over
  ``layers``.

  Attributes:
    layers: per layer name, its `LayerState`.
    nonfinite: unit-steps whose statistics were not finite and were skipped.
    skipped: steps dropped whole by ``skip_nonfinite=True`` (int32).
    decay_rate: the decay rate, kept for bias correction in `unit_stats`.
    key: PRNG key for reinitialisation and probabilistic counts.
    magnitudes: the weight magnitudes between refreshes when
      ``magnitude_refresh_every > 1``, else None.
    inner_state: the wrapped optimizer's state (``optimizer=`` form), else
      ``optax.EmptyState()``.
  """

  layers: dict[str, LayerState]
  nonfinite: jax.Array
  skipped: jax.Array
  decay_rate: jax.Array
  key: jax.Array
  magnitudes: utility_lib.MagnitudeCache | None
  inner_state: optax.OptState

  @property
  def statistics(self) -> dict[str, utility_lib.UnitStatistics]:
    """Per layer, running utility, mean activation and age."""
    return {name: layer.statistics for name, layer in self.layers.items()}

  @property
  def pending(self) -> dict[str, jax.Array]:
    """Per layer, accumulated fraction of a replacement still owed."""
    return {name: layer.pending for name, layer in self.layers.items()}

  @property
  def replaced_total(self) -> dict[str, jax.Array]:
    """Per layer, units replaced so far (int32)."""
    return {name: layer.replaced_total for name, layer in self.layers.items()}

  @property
  def last_replaced(self) -> dict[str, jax.Array]:
    """Per layer, boolean mask of the units replaced at the last step."""
    return {name: layer.last_replaced for name, layer in self.layers.items()}


def _init_layer_state(width: int) -> LayerState:
  """A layer's state before the first step: age 0, nothing owed or replaced."""
  return LayerState(
    statistics=utility_lib.init_statistics(width),
    pending=jnp.zeros((), jnp.float32),
    replaced_total=jnp.zeros((), jnp.int32),
    last_replaced=jnp.zeros((width,), bool),
  )


def _layer_after_step(
  statistics: utility_lib.UnitStatistics, pending: jax.Array, replaced_before: jax.Array, mask: jax.Array
) -> LayerState:
  """A layer's state after this step: replaced units' statistics restart at 0."""
  return LayerState(
    statistics=utility_lib.UnitStatistics(
      utility=jnp.where(mask, 0.0, statistics.utility),
      mean_activation=jnp.where(mask, 0.0, statistics.mean_activation),
      age=jnp.where(mask, 0, statistics.age),
    ),
    pending=pending,
    replaced_total=replaced_before + jnp.sum(mask, dtype=jnp.int32),
    last_replaced=mask,
  )


def _max_per_step(rate: Any, width: int, user_bound: int | None) -> int:
  """Static bound on replacements per step and layer (the ``top_k`` size).

  With a concrete rate the step's amount is at most ``a = rate * n``, and
  ``floor(pending + a)`` with ``pending < 1`` is at most ``ceil(a)`` (taken
  in float32, the precision the count is computed in). Every slot costs a
  compare per kernel entry in the reset, so the bound is kept tight.
  """
  if user_bound is not None:
    return min(width, user_bound)
  rate = validation.concrete(rate)
  if rate is not None:
    amount = np.float32(rate) * np.float32(width)
    return min(width, max(1, math.ceil(float(amount))))
  return width


def _check_state(layers, state: CbpState) -> None:
  """A state of the old layout, or made by ``init`` for other parameters, is refused."""
  if not isinstance(state, CbpState):
    fields = state.keys() if isinstance(state, Mapping) else getattr(state, "_fields", ())
    if set(_LEGACY_FIELDS) <= set(fields):
      raise ValueError(
        "cbp: this state has the old layout, four per-layer dicts (statistics, pending, "
        "replaced_total, last_replaced); CbpState now holds one LayerState per layer in "
        "CbpState.layers (e.g. restored from a checkpoint written before that change). "
        "Start from tx.init(params), or rebuild it: CbpState(layers={name: "
        "LayerState(statistics[name], pending[name], replaced_total[name], "
        "last_replaced[name])}, nonfinite=..., ...) with the other fields as they were"
      )
    raise ValueError(f"cbp: update needs the state that init returned, got {type(state).__name__}")
  for layer in layers:
    name = layer.name
    if name not in state.layers:
      raise ValueError(
        f"cbp: the state has no statistics for layer '{name}' (it has "
        f"{sorted(state.layers)}); was it initialised with another graph?"
      )
    state_width = state.layers[name].statistics.utility.shape[-1]
    if state_width != layer.width:
      raise ValueError(
        f"cbp: layer '{name}' has {layer.width} units in these params but the state was "
        f"initialised for {state_width}; call tx.init(params) for the new parameters"
      )


def _magnitudes(
  layer, p: list, u: list, cache: utility_lib.MagnitudeCache | None, refresh_every: int
) -> tuple[jax.Array, jax.Array]:
  """This step's ``(out_mag, in_mag)`` of one layer: all units, or a slice + cache."""
  consumers = [(p[c.kernel], u[c.kernel], c.layout) for c in layer.consumers]
  if cache is None:
    return (
      utility_lib.outgoing_magnitude(consumers, layer.width),
      utility_lib.incoming_magnitude(p[layer.kernel], u[layer.kernel]),
    )
  name = layer.name
  size = -(-layer.width // refresh_every)
  # The last slice is clamped to end at the last unit (static size).
  start = jnp.minimum(cache.phase * size, layer.width - size)
  units = (start, size)
  out_mag = jax.lax.dynamic_update_slice_in_dim(
    cache.outgoing[name], utility_lib.outgoing_magnitude(consumers, layer.width, units), start, 0
  )
  in_mag = jax.lax.dynamic_update_slice_in_dim(
    cache.incoming[name], utility_lib.incoming_magnitude(p[layer.kernel], u[layer.kernel], units), start, 0
  )
  return out_mag, in_mag


def _initial_magnitudes(layers, params: Any, refresh_every: int) -> utility_lib.MagnitudeCache:
  """The magnitude cache before the first step: every unit's, of the initial weights."""
  p = jax.tree.leaves(params)
  zero = [jnp.zeros_like(x) for x in p]
  initial = {l.name: _magnitudes(l, p, zero, None, refresh_every) for l in layers}
  return utility_lib.MagnitudeCache(
    incoming={name: in_mag for name, (_, in_mag) in initial.items()},
    outgoing={name: out_mag for name, (out_mag, _) in initial.items()},
    phase=jnp.zeros((), jnp.int32),
  )


def _cache_after_reset(
  layers, p: list, new_u: list, selections: dict, magnitudes: dict, phase: jax.Array, refresh_every: int
) -> utility_lib.MagnitudeCache:
  """The magnitude cache for the next step, exact for this step's replaced units.

  Their outgoing weights are now 0 and their incoming ones new: read only
  those ``K`` columns, so a fresh unit is not ranked by its predecessor's
  weights until its slice comes round.
  """
  incoming, outgoing = {}, {}
  for layer in layers:
    name = layer.name
    idx = selections[name].indices
    out_mag, in_mag = magnitudes[name]
    columns = reset_lib.take_post_step(p[layer.kernel], new_u[layer.kernel], idx, axis=-1)
    fresh = jnp.mean(jnp.abs(columns).reshape(-1, idx.shape[0]), axis=0)
    incoming[name] = in_mag.at[idx].set(fresh, mode="drop")
    outgoing[name] = out_mag.at[idx].set(0.0, mode="drop")
  return utility_lib.MagnitudeCache(incoming, outgoing, (phase + 1) % refresh_every)


def _replacement_count(
  eligible: jax.Array,
  pending: jax.Array,
  draw: jax.Array | None,
  *,
  rate: Any,
  count_basis: str,
  accumulate: bool,
  bound: int,
) -> tuple[jax.Array, jax.Array]:
  """Units owed this step (Semantics page, step 6) and the new pending fraction.

  Args:
    eligible: ``(n,)`` bool, the mature units.
    pending: the fraction of a replacement carried over (accumulate mode).
    draw: a uniform number in [0, 1), used when not accumulating.
    rate: the replacement rate (may be traced).
    count_basis: ``"eligible"`` or ``"layer"``.
    accumulate: accumulate fractions (True) or draw a lottery (False).
    bound: the static bound on replacements per step (`_max_per_step`).

  Returns:
    ``(count, new_pending)``.
  """
  width = eligible.shape[0]
  n_eligible = jnp.sum(eligible).astype(jnp.float32)
  if count_basis == "eligible":
    base = n_eligible
  else:
    base = jnp.where(n_eligible > 0, float(width), 0.0)
  amount = jnp.asarray(rate, jnp.float32) * base
  if accumulate:
    total = pending + amount
    due = jnp.floor(total)
    # Units owed beyond the eligible ones are forgiven (as the reference's
    # top_k would fail); only the static-bound overflow carries over.
    owed = jnp.minimum(due, n_eligible)
    count = jnp.minimum(owed, bound)
    return count.astype(jnp.int32), total - count - (due - owed)
  lucky = draw < amount
  count = jnp.where(amount < 1.0, lucky.astype(jnp.float32), jnp.floor(amount))
  count = jnp.minimum(jnp.minimum(count, n_eligible), bound)
  return count.astype(jnp.int32), pending


def _skip_if_nonfinite(updates, new_state, state, bad_statistics):
  """``(0, state)`` with ``skipped + 1`` if the step is not finite, else the step.

  Selects rather than a `lax.cond`, as for the reset: the check fuses with
  the update, and vmapped seeds skip independently.
  """
  finite = jnp.logical_not(bad_statistics)
  for x in jax.tree.leaves(updates):
    finite = finite & jnp.all(jnp.isfinite(x))
  updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return updates, kept._replace(skipped=state.skipped + (~finite).astype(jnp.int32))


def _check_arguments(
  graph,
  *,
  replacement_rate,
  decay_rate,
  maturity_threshold,
  utility,
  init,
  count_basis,
  max_replacements_per_step,
  magnitude_refresh_every,
  skip_nonfinite,
) -> None:
  """`cbp`'s arguments, refused with a ValueError naming the bad one."""
  if not isinstance(graph, graph_lib.LayerGraph):
    raise ValueError(f"cbp: graph must be a cbp_jax.LayerGraph, got {type(graph).__name__}")
  validation.check_range("replacement_rate", replacement_rate, 0.0, 1.0, high_open=False)
  validation.check_range("decay_rate", decay_rate, 0.0, 1.0, high_open=True)
  validation.check_nonnegative("maturity_threshold", maturity_threshold)
  if utility not in utility_lib.UTILITIES:
    raise ValueError(f"utility must be one of {utility_lib.UTILITIES}, got {utility!r}")
  initializers.check_initializer(init)
  if count_basis not in COUNT_BASES:
    raise ValueError(f"count_basis must be one of {COUNT_BASES}, got {count_basis!r}")
  if max_replacements_per_step is not None and (
    not isinstance(max_replacements_per_step, int) or max_replacements_per_step < 1
  ):
    raise ValueError(f"max_replacements_per_step must be a positive int, got {max_replacements_per_step!r}")
  if not isinstance(magnitude_refresh_every, int) or magnitude_refresh_every < 1:
    raise ValueError(f"magnitude_refresh_every must be a positive int, got {magnitude_refresh_every!r}")
  if not isinstance(skip_nonfinite, bool):
    raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")


def cbp(
  graph: graph_lib.LayerGraph,
  *,
  key: jax.Array | int,
  replacement_rate: float | jax.Array = 1e-4,
  maturity_threshold: int | jax.Array = 100,
  decay_rate: float | jax.Array = 0.99,
  utility: str = "contribution",
  init: str | Callable[..., jax.Array] = "kaiming",
  accumulate: bool = True,
  count_basis: str = "eligible",
  next_bias_correction: bool = True,
  optimizer: optax.GradientTransformation | None = None,
  max_replacements_per_step: int | None = None,
  magnitude_refresh_every: int = 1,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Continual Backpropagation (Dohare et al., Nature 2024).

  Tracks a running utility per hidden unit and, every step, reinitialises a
  small fraction of mature, low-utility units: incoming weights redrawn from
  the initial distribution, outgoing weights zeroed (the network's function
  does not jump), consumers' biases absorbing the unit's mean contribution.

  Two forms:

  * last in a chain, ``optax.chain(optax.sgd(lr), cbp(graph, ...))``: the
    reset acts on the chain's updates. Earlier transforms' statistics (e.g.
    Adam's moments) of replaced units are *not* reset; use the second form
    for stateful optimizers.
  * wrapping, ``cbp(graph, ..., optimizer=optax.adam(lr))``: additionally
    restarts the wrapped optimizer's per-parameter statistics of every
    replaced parameter entry, for any optax optimizer (found with
    `optax.tree_utils.tree_map_params`; reset to what a fresh ``init`` gives).

  ``update`` needs ``params`` and the keyword extra argument ``activations``:
  a dict mapping each layer name to its post-activation output, units on the
  last axis (see `cbp_jax.collect_activations`). Statistics and the reset use
  the weights *after* this step's update, as in the reference.

  Args:
    graph: the hidden layers (`cbp_jax.graph_from_params` or `LayerGraph`).
    key: PRNG key (or int seed) for new weights and probabilistic counts.
    replacement_rate: fraction of units replaced per step, in [0, 1]. May be
      a traced value (vmapped sweeps); then set ``max_replacements_per_step``
      or the static bound becomes the layer width.
    maturity_threshold: a unit is eligible once ``age > maturity_threshold``.
    decay_rate: decay of the running averages, in [0, 1).
    utility: one of ``"contribution"``, ``"adaptable_contribution"``,
      ``"zero_contribution"``, ``"adaptation"``, ``"weight"``,
      ``"feature_by_input"``, ``"random"``.
    init: distribution of new incoming weights: ``"kaiming"`` (uniform,
      bound ``gain * sqrt(3 / fan_in)``), ``"default"`` (uniform,
      ``sqrt(1 / fan_in)``), ``"xavier"`` (uniform,
      ``gain * sqrt(6 / (fan_in + fan_out))``), ``"lecun"`` (uniform,
      ``sqrt(3 / fan_in)``), ``"kaiming_normal"`` (std
      ``gain / sqrt(fan_in)``), ``"lecun_normal"`` (flax's default kernel
      init), with the gain of each layer's activation (`cbp_jax.initializers`);
      or any ``jax.nn.initializers``-style callable ``init(key, shape,
      dtype)``, e.g. the model's own ``kernel_init``, called with the
      kernel's full shape on steps that replace units.
    accumulate: True accumulates fractional replacements and replaces
      ``floor`` of the total (exact long-run counts); False replaces one unit
      with probability ``rate * base`` when that is below 1.
    count_basis: ``"eligible"``: ``rate * n_eligible`` per step (the MLP
      reference); ``"layer"``: ``rate * n`` once any unit is eligible (the
      conv references).
    next_bias_correction: consumers' biases absorb ``w_out * f_hat`` of
      replaced units, as the paper intends (default). False reproduces the
      reference code, where this correction is a no-op.
    optimizer: optional optimizer to wrap (second form above).
    max_replacements_per_step: static bound on replacements per layer and
      step; the default derives it from a concrete rate. Replacements beyond
      it carry over to later steps in accumulate mode.
    magnitude_refresh_every: 1 (default) computes every unit's weight
      magnitudes from the post-step weights at every step, as the paper
      does; that reads every hidden kernel once more per step, the largest
      part of CBP's cost on big dense nets at small batches. ``k > 1``
      refreshes a rotating ``1/k`` slice of each layer's units per step and
      keeps the rest from earlier steps (at most ``k`` steps old; replaced
      units' entries are set exactly at the reset), an approximation that
      cuts this cost ``k``-fold. Outside ``vmap`` over the state the slice
      is a contiguous read; under ``vmap`` it becomes a gather.
    skip_nonfinite: True drops a step whose updates (after the reset) or
      any unit's batch statistics are not finite: it returns zero updates
      and the state as it was (wrapped optimizer's statistics, unit
      statistics, PRNG key), except ``CbpState.skipped``, which counts such
      steps. One bad batch in a long run then costs one step instead of the
      run. The cost is one finiteness check of every update entry and a
      select over updates and state per step (see BENCHMARKS.md). Off by
      default: a non-finite step then goes through, and the unit statistics
      keep their previous values (counted in ``CbpState.nonfinite``).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `CbpState`.

  Example:
    >>> model = cbp_jax.models.MLP(hidden=(16, 16), outputs=1)
    >>> x = jnp.ones((4, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = cbp_jax.cbp(cbp_jax.graph_from_params(params), key=1,
    ...                  optimizer=optax.adam(1e-3), maturity_threshold=10)
    >>> state = tx.init(params)
    >>> def loss(p):
    ...   y, acts = cbp_jax.apply_with_activations(model, p, x)
    ...   return jnp.mean(y ** 2), acts
    >>> (l, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, state = tx.update(g, state, params, activations=acts)
    >>> params = optax.apply_updates(params, updates)
  """
  _check_arguments(
    graph,
    replacement_rate=replacement_rate,
    decay_rate=decay_rate,
    maturity_threshold=maturity_threshold,
    utility=utility,
    init=init,
    count_basis=count_basis,
    max_replacements_per_step=max_replacements_per_step,
    magnitude_refresh_every=magnitude_refresh_every,
    skip_nonfinite=skip_nonfinite,
  )
  key = validation.as_key(key)
  inner = None if optimizer is None else optax.with_extra_args_support(optimizer)

  def init_fn(params):
    if not jax.tree.leaves(params):
      raise ValueError(
        "cbp: init needs the parameters, got a tree without arrays (as "
        "optax.tree_utils.tree_map_params passes when cbp is another transform's optimizer=, "
        "which is not supported; chain the transforms instead)"
      )
    layers, _, _ = graph_lib.resolve(graph, params)
    if inner is not None:
      inner_state = inner.init(params)
      reset_lib.state_param_leaves(inner, inner_state, params)  # Fail early.
    else:
      inner_state = optax.EmptyState()
    magnitudes = None
    if magnitude_refresh_every > 1:
      magnitudes = _initial_magnitudes(layers, params, magnitude_refresh_every)
    return CbpState(
      layers={l.name: _init_layer_state(l.width) for l in layers},
      nonfinite=jnp.zeros((), jnp.int32),
      skipped=jnp.zeros((), jnp.int32),
      decay_rate=jnp.asarray(decay_rate, jnp.float32),
      key=key,
      magnitudes=magnitudes,
      inner_state=inner_state,
    )

  def update_fn(updates, state, params=None, *, activations=None, **extra_args):
    if params is None:
      raise ValueError("cbp: update needs params (tx.update(grads, state, params, activations=...))")
    layers, p, _ = graph_lib.resolve(graph, params)
    _check_state(layers, state)
    validation.check_activations("cbp", layers, activations)
    if inner is not None:
      updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    else:
      inner_state = state.inner_state
    u = jax.tree.leaves(updates)
    chex.assert_equal(len(u), len(p))

    # Few PRNG calls per step, whatever the depth, through `prng` (fused: a
    # jax.random call is a loop on CPU, its overhead rivalling a small net's step).
    key, reinit_key, count_key, util_key = prng.split(state.key, 4)
    lottery = None if accumulate else prng.uniform(count_key, (len(layers),))
    util_keys = prng.split(util_key, len(layers)) if utility == "random" else [None] * len(layers)
    statistics, pending, selections, f_hats, magnitudes = {}, {}, {}, {}, {}
    nonfinite = state.nonfinite
    for n, layer in enumerate(layers):
      name = layer.name
      out_mag, in_mag = _magnitudes(layer, p, u, state.magnitudes, magnitude_refresh_every)
      magnitudes[name] = (out_mag, in_mag)
      stats, corrected, f_hat, bad = utility_lib.update_statistics(
        state.layers[name].statistics,
        activations[name],
        out_mag,
        in_mag,
        decay=decay_rate,
        utility=utility,
        key=util_keys[n],
      )
      nonfinite = nonfinite + bad
      eligible = stats.age > maturity_threshold
      bound = _max_per_step(replacement_rate, layer.width, max_replacements_per_step)
      count, pending[name] = _replacement_count(
        eligible,
        state.layers[name].pending,
        None if lottery is None else lottery[n],
        rate=replacement_rate,
        count_basis=count_basis,
        accumulate=accumulate,
        bound=bound,
      )
      selections[name] = reset_lib.select_lowest(corrected, eligible, count, bound)
      statistics[name], f_hats[name] = stats, f_hat

    # No lax.cond around the reset: its edits are masked selects that fuse
    # with the update, while a cond would force the whole update tree into
    # memory on every step (measured about 3x slower at batch 1).
    updates = reset_lib.reset_units(
      updates,
      params,
      layers,
      selections,
      reinit_key,
      init=init,
      mean_activation=f_hats if next_bias_correction else None,
    )
    if inner is not None:
      touched = reset_lib.touched_slices(layers, selections)
      inner_state = reset_lib.reset_optimizer_state(
        inner, inner_state, optax.apply_updates(params, updates), touched
      )

    new_layers = {
      l.name: _layer_after_step(
        statistics[l.name],
        pending[l.name],
        state.layers[l.name].replaced_total,
        selections[l.name].mask(l.width),
      )
      for l in layers
    }
    cache = None
    if state.magnitudes is not None:
      cache = _cache_after_reset(
        layers,
        p,
        jax.tree.leaves(updates),
        selections,
        magnitudes,
        state.magnitudes.phase,
        magnitude_refresh_every,
      )
    new_state = CbpState(
      layers=new_layers,
      nonfinite=nonfinite,
      skipped=state.skipped,
      decay_rate=state.decay_rate,
      key=key,
      magnitudes=cache,
      inner_state=inner_state,
    )
    if skip_nonfinite:
      return _skip_if_nonfinite(updates, new_state, state, nonfinite > state.nonfinite)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_cbp_state(opt_state: Any) -> CbpState:
  """Returns the `CbpState` inside ``opt_state`` (a chain, MultiSteps, ...).

  An `nnx.Optimizer`'s ``opt_state`` (Variables) is accepted too.
  """
  opt_state = nnx.as_pure(opt_state)
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, CbpState))
    if isinstance(s, CbpState)
  ]
  if not found:
    raise ValueError("no cbp state found in this optimizer state")
  return found[0]


def unit_stats(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-layer unit statistics, found wherever the cbp state sits.

  Args:
    opt_state: any optimizer state containing a `CbpState`.

  Returns:
    ``{layer: {"utility", "age", "mean_activation", "replaced"}}``: the
    bias-corrected utilities and mean activations, ages, and the number of
    units replaced so far.
  """
  state = find_cbp_state(opt_state)
  out = {}
  for name, layer in state.layers.items():
    s = layer.statistics
    out[name] = {
      "utility": utility_lib.debias(s.utility, state.decay_rate, s.age),
      "age": s.age,
      "mean_activation": utility_lib.debias(s.mean_activation, state.decay_rate, s.age),
      "replaced": layer.replaced_total,
    }
  return out


def reset_batch_stats(batch_stats: Any, graph: graph_lib.LayerGraph, opt_state: Any) -> Any:
  """Resets BatchNorm running statistics of the units replaced last step.

  Running statistics live outside the params the optimizer sees, so a
  training step that uses BatchNorm calls this after ``tx.update``.

  Args:
    batch_stats: the ``batch_stats`` collection (linen) or `nnx.BatchStat`
      state, holding ``{norm}/mean`` and ``{norm}/var`` for each layer's norm.
    graph: the layer graph passed to `cbp`.
    opt_state: the optimizer state after the update.

  Returns:
    ``batch_stats`` with mean 0 and variance 1 for replaced units.
  """
  state = find_cbp_state(opt_state)
  index, leaves, treedef = tree_paths.flatten_by_path(batch_stats)
  leaves = list(leaves)
  normed = [layer for layer in graph if layer.norm is not None]
  expected = [f"{layer.norm}/{stat}" for layer in normed for stat in ("mean", "var")]
  if normed and not any(path in index for path in expected):
    hint = ""
    if any(path.startswith("batch_stats/") for path in index):
      hint = " It looks like a whole variables dict: pass variables['batch_stats']."
    elif any(path.startswith(("params/",)) or path.endswith(("/kernel", "/scale")) for path in index):
      hint = " It holds parameters: pass the running statistics (nnx.state(model, nnx.BatchStat))."
    raise ValueError(
      f"reset_batch_stats: batch_stats has none of the norms' running statistics "
      f"({', '.join(expected[:4])}{' ...' if len(expected) > 4 else ''}); it has "
      f"{sorted(index)[:6]}.{hint}"
    )
  for layer in normed:
    mask = state.layers[layer.name].last_replaced
    for stat, value in (("mean", 0.0), ("var", 1.0)):
      path = f"{layer.norm}/{stat}"
      if path in index:
        i = index[path]
        leaves[i] = jnp.where(mask, jnp.asarray(value, leaves[i].dtype), leaves[i])
  return jax.tree.unflatten(treedef, leaves)
