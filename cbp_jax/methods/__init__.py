"""The methods CBP is compared with, as Optax transforms and tree helpers.

Every method composes in `optax.chain` and keeps its state in the optimizer
state, so a whole training step stays one pure, jittable, vmappable function:

* `l2`: weight decay toward 0 (``optax.add_decayed_weights``);
* `l2_init`: weight decay toward the initial parameters (Kumar et al. 2023);
* `shrink_and_perturb`: scale the parameters and add Gaussian noise
  (Ash & Adams 2020), placed last in a chain;
* `redo`: reinitialise tau-dormant units every ``period`` steps (Sokar et al.
  2023), with the same reset kernel as `cbp_jax.cbp` (`cbp_jax.reset`);
* `reset_layers` / `reset_optimizer_for`: task-boundary resets (e.g. the
  output layer per task in continual ImageNet);
* `upgd` / `scale_by_upgd`: utility-based perturbed gradient descent
  (Elsayed & Mahmood 2024);
* `regrama`: reset units of small incoming gradient on ReDo's schedule
  (Liu et al. 2025);
* `snr`: self-normalized resets of units whose silence is improbable under
  their own firing rate (Farias & Jozefiak 2025);
* `hare_tortoise`: a slow EMA copy and periodic resets of the fast weights
  to it (Lee et al. 2024);
* `plasticity_injection` (`injectable` / `injection_apply` /
  `injection_optimizer` / `inject`): plasticity injection (Nikishin et al. 2023).

ReDo, ReGraMa and SNR share their machinery (`_scored_reset`) and the reset
kernel of `cbp_jax.cbp` (`cbp_jax.reset`); each other method lives in its own
private module, re-exported here. LayerNorm + weight decay (Lyle et al.
2024) needs no transform: ``cbp_jax.models.MLP(..., layer_norm=True)`` with
`l2` before the optimizer (or ``optax.adamw``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbp_jax import graph as graph_lib
from cbp_jax import metrics
from cbp_jax import prng
from cbp_jax import reset as reset_lib
from cbp_jax import tree_paths
from cbp_jax import validation
from cbp_jax.methods import _scored_reset as scored_reset
from cbp_jax.methods._hare_tortoise import hare_tortoise
from cbp_jax.methods._hare_tortoise import HareTortoiseState
from cbp_jax.methods._hare_tortoise import tortoise_params
from cbp_jax.methods._injection import inject
from cbp_jax.methods._injection import injectable
from cbp_jax.methods._injection import InjectedParams
from cbp_jax.methods._injection import injection_apply
from cbp_jax.methods._injection import injection_optimizer
from cbp_jax.methods._injection import InjectionRecipe
from cbp_jax.methods._injection import InjectionState
from cbp_jax.methods._injection import plasticity_injection
from cbp_jax.methods._regrama import gradient_scores
from cbp_jax.methods._regrama import regrama
from cbp_jax.methods._scored_reset import RedoState
from cbp_jax.methods._scored_reset import replaced_total
from cbp_jax.methods._scored_reset import SnrState
from cbp_jax.methods._snr import snr
from cbp_jax.methods._snr import streak_log_probability
from cbp_jax.methods._snr import update_firing
from cbp_jax.methods._upgd import scale_by_upgd
from cbp_jax.methods._upgd import ScaleByUpgdState
from cbp_jax.methods._upgd import scaled_utilities
from cbp_jax.methods._upgd import upgd
from cbp_jax.methods._upgd import utilities as upgd_utilities

# The public names, also those of the private per-method modules (the API
# reference documents what is listed here).
__all__ = [
    "gradient_scores", "hare_tortoise", "HareTortoiseState", "inject", "injectable",
    "InjectedParams", "injection_apply", "injection_optimizer", "InjectionRecipe", "InjectionState",
    "l2", "plasticity_injection",
    "l2_init", "L2InitState", "redo", "RedoState", "regrama", "replaced_total",
    "reset_layers", "reset_optimizer_for", "scale_by_upgd", "ScaleByUpgdState",
    "scaled_utilities", "shrink_and_perturb", "ShrinkPerturbState", "snr", "SnrState",
    "streak_log_probability", "tortoise_params", "update_firing", "upgd", "upgd_utilities",
]


def _copy(params: Any) -> Any:
  """Copies the array leaves (so the state never aliases donated params).

  Non-array leaves pass through, which keeps `init` usable by
  `optax.tree_utils.tree_map_params` (it calls ``init`` on a placeholder).
  """
  return jax.tree.map(
      lambda p: jnp.array(p, copy=True) if isinstance(p, (jax.Array, np.ndarray)) else p,
      params)


# --- L2 -------------------------------------------------------------------


def l2(weight_decay: float | jax.Array | optax.Schedule) -> optax.GradientTransformation:
  """L2 regularisation: adds ``weight_decay * params`` to the updates.

  This is exactly ``optax.add_decayed_weights(weight_decay)`` (returned as
  is, after checking the argument). Place it *before* the learning-rate
  scaling, so the step is ``-lr * (g + weight_decay * params)`` as with
  PyTorch's ``SGD(weight_decay=...)`` that the paper's L2 runs use.

  Args:
    weight_decay: the L2 coefficient, >= 0 (a traced value or an optax
      schedule is not checked). The paper's slippery-Ant runs use 1e-4 (with
      Adam) and its CIFAR-100 runs 5e-4; other values are user-chosen.

  Returns:
    ``optax.add_decayed_weights(weight_decay)``.

  Raises:
    ValueError: if ``weight_decay`` is negative or not a number.

  Example:
    >>> tx = optax.chain(cbp_jax.methods.l2(1e-4), optax.sgd(0.01))
  """
  if not callable(weight_decay):
    validation.check_nonnegative("weight_decay", weight_decay)
  return optax.add_decayed_weights(weight_decay)


# --- L2-Init --------------------------------------------------------------


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

    updates = jax.tree.map(pull, updates, params, state.initial_params,
                           is_leaf=lambda x: x is None)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


# --- Shrink and Perturb ---------------------------------------------------


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
      raise ValueError(
          "shrink_and_perturb: update needs params (tx.update(grads, state, params))")
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
        new = ((shrink - 1.0) * pi.astype(jnp.float32) + shrink * ui.astype(jnp.float32)
               + noise_scale * noise)
        out.append(new.astype(ui.dtype))
      return jax.tree.unflatten(treedef, out)

    if validation.concrete(every) == 1:  # A cond would force the update tree through memory.
      updates = perturb(updates)
    else:  # Noise costs O(params): skip it on the other steps.
      updates = jax.lax.cond(count % every == 0, perturb, lambda u: u, updates)
    return updates, ShrinkPerturbState(count=count, key=key)

  return optax.GradientTransformation(init_fn, update_fn)


# --- ReDo -----------------------------------------------------------------


def redo(
    graph: graph_lib.LayerGraph,
    *,
    key: jax.Array | int,
    tau: float | jax.Array = 0.0,
    period: int | jax.Array = 1000,
    init: str = "kaiming",
    optimizer: optax.GradientTransformation | None = None,
    next_bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """ReDo (Sokar et al. 2023): recycle tau-dormant units every ``period`` steps.

  On steps ``period, 2 * period, ...`` every unit whose dormancy score
  (`cbp_jax.metrics.dormant_scores` of this step's activations: its mean
  ``|h|`` over the batch divided by the layer's average) is ``<= tau`` is
  reinitialised with the reset kernel `cbp` uses (`cbp_jax.reset`): incoming
  weights redrawn from ``init``, bias (and a norm's offset) 0, norm scale 1,
  outgoing weights 0. Other steps pass the updates through untouched (the
  reset is skipped with `jax.lax.cond`). Untouched entries keep exactly the
  update they had. ``tau = 0`` recycles units whose output is exactly 0 on
  the batch (dead ReLUs); ReDo used e.g. ``tau = 0.025`` or ``0.1`` and
  ``period = 1000``.

  Two forms, as for `cbp`:

  * last in a chain, ``optax.chain(optax.adam(lr), redo(graph, ...))``: the
    earlier transforms' statistics of reset units are kept;
  * wrapping, ``redo(graph, ..., optimizer=optax.adam(lr))``: the wrapped
    optimizer's per-parameter statistics (Adam moments, ...) of every reset
    parameter entry also restart (as ReDo does), for any optax optimizer.

  ``update`` needs ``params`` and the keyword extra argument ``activations``
  (the same dict `cbp` takes, e.g. from `cbp_jax.apply_with_activations`),
  on every step: shapes are static under `jax.jit`.

  With `cbp`, chain the two rather than nesting one as the other's
  ``optimizer=`` (refused: neither would get the activations), e.g.
  ``optax.chain(cbp(graph, ..., optimizer=optax.adam(lr)), redo(graph, ...))``:
  each resets its own units, and `reset_optimizer_for` handles the chain.

  Args:
    graph: the hidden layers (`cbp_jax.graph_from_params` or `LayerGraph`).
    key: PRNG key (or int seed) for the new incoming weights.
    tau: dormancy threshold, >= 0.
    period: reset every this many steps, >= 1.
    init: distribution of new incoming weights, as `cbp_jax.cbp`'s ``init``
      (a name in `cbp_jax.initializers.INITS` or an initializer callable).
    optimizer: optional optimizer to wrap (second form above).
    next_bias_correction: if True, each consumer's bias absorbs
      ``w_out[i] * mean_batch(h_i)`` of a reset unit ``i`` (its mean
      contribution on this batch), so the function jumps less for ``tau > 0``.
      ReDo does not do this (default False); for ``tau = 0`` and non-negative
      activations the correction is 0 anyway.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `RedoState`.

  Raises:
    ValueError: naming an invalid argument; in ``init``, an ``optimizer``
      holding a `cbp` or `redo` transform, or ``redo`` itself nested as
      another transform's ``optimizer``; at trace time, a graph that does not
      match the params or missing/misshaped activations.

  Example:
    >>> model = cbp_jax.models.MLP(hidden=(16, 16), outputs=1)
    >>> x = jnp.ones((4, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = cbp_jax.methods.redo(cbp_jax.graph_from_params(params), key=1,
    ...                           tau=0.025, period=1000, optimizer=optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> def loss(p):
    ...   y, acts = cbp_jax.apply_with_activations(model, p, x)
    ...   return jnp.mean(y ** 2), acts
    >>> (l, acts), g = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, state = tx.update(g, state, params, activations=acts)
    >>> params = optax.apply_updates(params, updates)
  """
  scored_reset.check_common("redo", graph, init)
  validation.check_nonnegative("tau", tau)
  validation.check_positive_int("period", period)

  def select(layers, grads, params, activations, count, stats):
    del grads, params, stats
    due = count % period == 0
    selections, means = {}, {}
    for layer in layers:
      name = layer.layer.name
      h = activations[name]
      scores = metrics.dormant_scores(h)
      eligible = (scores <= tau) & due
      n = jnp.sum(eligible).astype(jnp.int32)
      selections[name] = reset_lib.select_lowest(scores, eligible, n, layer.width)
      means[name] = jnp.mean(h.astype(jnp.float32), axis=tuple(range(h.ndim - 1)))
    return scored_reset.Scored(selections, means if next_bias_correction else None, {})

  return scored_reset.unit_reset_transform(
      "redo", graph, key=key, init=init, optimizer=optimizer, select=select,
      needs_activations=True)


# --- Task-boundary resets -------------------------------------------------


def _paths_list(paths: str | Sequence[str], fn: str) -> list[str]:
  if isinstance(paths, str):
    paths = [paths]
  paths = list(paths)
  for p in paths:
    if not isinstance(p, str) or not p.strip("/"):
      raise ValueError(f"{fn}: paths must be non-empty strings like 'Dense_2', got {p!r}")
  return [p.strip("/") for p in paths]


def _leaves_under(index: dict[str, int], paths: list[str], fn: str) -> set[int]:
  """Positions of the leaves at or below each path; fails on an unknown one."""
  chosen: set[int] = set()
  for path in paths:
    hits = [i for name, i in index.items() if name == path or name.startswith(path + "/")]
    if not hits:
      known = sorted({name.rsplit("/", 1)[0] for name in index} | set(index))
      raise ValueError(
          f"{fn}: no parameter at or under path '{path}' (known paths: "
          f"{', '.join(known[:16])}{' ...' if len(known) > 16 else ''})")
    chosen.update(hits)
  return chosen


def reset_layers(params: Any, fresh_params: Any, paths: str | Sequence[str]) -> Any:
  """Replaces the parameters under ``paths`` with those of ``fresh_params``.

  For task-boundary resets, e.g. the output layer per task in continual
  ImageNet: ``fresh = model.init(new_key, x)["params"]`` then
  ``params = reset_layers(params, fresh, ["Dense_2"])``; follow it with
  `reset_optimizer_for` to restart the optimizer statistics of those
  parameters. A full reset (retraining from scratch) needs no helper:
  ``params = model.init(new_key, x)["params"]; opt_state = tx.init(params)``.

  Args:
    params: the current parameter pytree.
    fresh_params: a tree of the same structure and shapes (a fresh init).
    paths: module or leaf paths, "/"-joined as in the tree
      (``"Dense_2"``, ``"Dense_2/kernel"``, ``"layers/3"``); a single string
      is one path. Every leaf at or below each path is replaced.

  Returns:
    ``params`` with those leaves taken from ``fresh_params`` (the others are
    the same objects as in ``params``).

  Raises:
    ValueError: naming a path with no parameter under it, or when the two
      trees differ in structure or in the shape/dtype of a replaced leaf.

  Example:
    >>> model, x = cbp_jax.models.MLP(hidden=(8, 8), outputs=2), jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.sgd(0.01, momentum=0.9)
    >>> opt_state = tx.init(params)
    >>> task = 1  # a new task begins: a fresh output layer
    >>> fresh = model.init(jax.random.key(task), x)["params"]
    >>> params = cbp_jax.methods.reset_layers(params, fresh, ["Dense_2"])
    >>> opt_state = cbp_jax.methods.reset_optimizer_for(tx, opt_state, params, ["Dense_2"])
  """
  paths = _paths_list(paths, "reset_layers")
  index, leaves, treedef = tree_paths.flatten_by_path(params)
  _, fresh, fresh_def = tree_paths.flatten_by_path(fresh_params)
  if treedef != fresh_def:
    raise ValueError(
        "reset_layers: fresh_params must have the structure of params, got "
        f"{fresh_def} vs {treedef}")
  names = {i: name for name, i in index.items()}
  out = list(leaves)
  for i in sorted(_leaves_under(index, paths, "reset_layers")):
    old, new = leaves[i], fresh[i]
    if (getattr(old, "shape", None), getattr(old, "dtype", None)) != (
        getattr(new, "shape", None), getattr(new, "dtype", None)):
      raise ValueError(
          f"reset_layers: '{names[i]}' has shape/dtype {getattr(old, 'shape', None)}/"
          f"{getattr(old, 'dtype', None)} in params but {getattr(new, 'shape', None)}/"
          f"{getattr(new, 'dtype', None)} in fresh_params")
    out[i] = new
  return jax.tree.unflatten(treedef, out)


def _mirror_positions(positions: Any, params_def: Any, chosen: set[int]) -> set[int]:
  """State leaf positions of the chosen parameters, in every subtree shaped like the parameters.

  ``positions`` is the state with each leaf replaced by its position. A
  subtree whose tree structure is the parameters' mirrors them leaf by leaf
  (moments, traces, `l2_init`'s initial parameters); per-unit statistics,
  counts and keys have other structures.
  """
  hits: set[int] = set()
  for sub in jax.tree.leaves(positions, is_leaf=lambda t: jax.tree.structure(t) == params_def):
    if jax.tree.structure(sub) == params_def:
      hits.update(pos for i, pos in enumerate(jax.tree.leaves(sub)) if i in chosen)
  return hits


def reset_optimizer_for(
    tx: optax.GradientTransformation,
    opt_state: Any,
    new_params: Any,
    paths: str | Sequence[str],
) -> Any:
  """Restarts ``tx``'s per-parameter statistics of the parameters under ``paths``.

  Every state entry that mirrors a parameter under ``paths`` (moments,
  momentum traces, accumulators, `l2_init`'s initial parameters, ...) is
  replaced by its value in ``tx.init(new_params)``: zeros for moments, the
  new parameters for `l2_init`. Shared scalars such as Adam's step count are
  kept: the other parameters still need them. A full reset is
  ``tx.init(new_params)``.

  Entries are found with `optax.tree_utils.tree_map_params`, which works for
  plain optax optimizers and chains of them. `cbp` and `redo` transforms (as
  ``tx``, or in a chain) need real parameters in ``init``, which that search
  cannot give; for their states every subtree with the parameters' tree
  structure is taken as mirroring them (a wrapped optimizer's moments inside
  ``inner_state``, earlier transforms' statistics in a chain). Their own
  per-unit statistics (utilities, ages, replacement counts) are not
  per-parameter and are kept.

  Args:
    tx: the optimizer that made ``opt_state`` (e.g. ``optax.adam(...)``,
      ``cbp(graph, ..., optimizer=optax.adam(...))`` or a chain holding one).
    opt_state: its state.
    new_params: the parameters after the reset (e.g. from `reset_layers`).
    paths: module or leaf paths, as for `reset_layers`.

  Returns:
    The new optimizer state, of the same structure.

  Raises:
    ValueError: naming a path with no parameter under it, when
      ``opt_state`` does not have the structure of ``tx.init(new_params)``,
      or when the statistics of ``tx`` cannot be located.

  Example:
    >>> model, x = cbp_jax.models.MLP(hidden=(8, 8), outputs=2), jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> graph = cbp_jax.graph_from_params(params)
    >>> tx = cbp_jax.cbp(graph, key=0, optimizer=optax.adam(1e-3))
    >>> opt_state = tx.init(params)
    >>> fresh = model.init(jax.random.key(1), x)["params"]
    >>> params = cbp_jax.methods.reset_layers(params, fresh, "Dense_2")
    >>> opt_state = cbp_jax.methods.reset_optimizer_for(tx, opt_state, params, "Dense_2")
  """
  paths = _paths_list(paths, "reset_optimizer_for")
  index, _, p_def = tree_paths.flatten_by_path(new_params)
  chosen = _leaves_under(index, paths, "reset_optimizer_for")
  state_leaves, state_def = jax.tree.flatten(opt_state)
  try:
    mirrored = reset_lib.state_param_leaves(tx, opt_state, new_params)
    hits = {pos for pos, leaf in mirrored.items() if leaf in chosen}
  except ValueError as e:  # optax cannot locate the statistics (cbp/redo need real params).
    if not scored_reset.unit_reset_states(opt_state):
      raise ValueError(f"reset_optimizer_for: {e}") from e
    positions = jax.tree.unflatten(state_def, list(range(len(state_leaves))))
    hits = _mirror_positions(positions, p_def, chosen)
  fresh, fresh_def = jax.tree.flatten(tx.init(new_params))
  if fresh_def != state_def:
    raise ValueError(
        "reset_optimizer_for: opt_state does not have the structure of "
        f"tx.init(new_params): {state_def} vs {fresh_def}")
  out = list(state_leaves)
  for pos in hits:
    if getattr(fresh[pos], "shape", None) == getattr(out[pos], "shape", None):
      out[pos] = fresh[pos].astype(out[pos].dtype) if hasattr(out[pos], "dtype") else fresh[pos]
  return jax.tree.unflatten(state_def, out)
