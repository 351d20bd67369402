"""Task-boundary resets: fresh parameters for some layers and their optimizer statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from cbp_jax import reset as reset_lib
from cbp_jax import tree_paths
from cbp_jax.methods import _scored_reset as scored_reset


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
        f"{', '.join(known[:16])}{' ...' if len(known) > 16 else ''})"
      )
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
      f"reset_layers: fresh_params must have the structure of params, got {fresh_def} vs {treedef}"
    )
  names = {i: name for name, i in index.items()}
  out = list(leaves)
  for i in sorted(_leaves_under(index, paths, "reset_layers")):
    old, new = leaves[i], fresh[i]
    if (getattr(old, "shape", None), getattr(old, "dtype", None)) != (
      getattr(new, "shape", None),
      getattr(new, "dtype", None),
    ):
      raise ValueError(
        f"reset_layers: '{names[i]}' has shape/dtype {getattr(old, 'shape', None)}/"
        f"{getattr(old, 'dtype', None)} in params but {getattr(new, 'shape', None)}/"
        f"{getattr(new, 'dtype', None)} in fresh_params"
      )
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
      f"tx.init(new_params): {state_def} vs {fresh_def}"
    )
  out = list(state_leaves)
  for pos in hits:
    if getattr(fresh[pos], "shape", None) == getattr(out[pos], "shape", None):
      out[pos] = fresh[pos].astype(out[pos].dtype) if hasattr(out[pos], "dtype") else fresh[pos]
  return jax.tree.unflatten(state_def, out)
