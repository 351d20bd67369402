"""Name the leaves of any parameter pytree by "/"-joined paths.

Linen params are nested dicts, nnx params are `nnx.State` objects and users may
bring their own containers. The layer graph names parameters by paths such as
``"Dense_0/kernel"`` or ``"layers/0/kernel"``, and this module resolves those
names against whatever pytree the optimizer receives, without assuming a type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def key_to_str(key: Any) -> str:
  """Returns the readable name of one pytree key entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


# nnx.State leaves are Variables whose array sits under one of these attributes;
# the parameter's name is the path to the Variable.
_VARIABLE_ATTRS = ("value", "raw_value")


def path_to_str(path: Sequence[Any]) -> str:
  """Joins a jax key path into ``"a/b/c"`` (nnx's Variable wrapper dropped)."""
  keys = [key_to_str(k) for k in path]
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] in _VARIABLE_ATTRS:
    keys = keys[:-1]
  return "/".join(keys)


def flatten_by_path(tree: Any) -> tuple[dict[str, int], list[Any], Any]:
  """Flattens ``tree`` and indexes its leaves by path.

  Args:
    tree: any pytree.

  Returns:
    ``(index, leaves, treedef)`` where ``index[path]`` is the position of the
    leaf named ``path`` in ``leaves``; ``jax.tree.unflatten(treedef, leaves)``
    rebuilds the tree.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  index = {path_to_str(p): i for i, (p, _) in enumerate(with_path)}
  return index, [leaf for _, leaf in with_path], treedef


def lookup(index: dict[str, int], path: str, what: str) -> int:
  """Returns ``index[path]`` or raises a ValueError naming the missing path."""
  if path not in index:
    known = ", ".join(sorted(index)[:12])
    more = " ..." if len(index) > 12 else ""
    hint = ""
    if f"params/{path}" in index:
      hint = "; this looks like a whole variables dict: pass variables['params']"
    raise ValueError(
      f"{what}: no parameter named '{path}' in the parameter tree (it has: {known}{more}){hint}"
    )
  return index[path]
