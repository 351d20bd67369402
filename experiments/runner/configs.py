"""Experiment configs: merging overrides into the defaults, and the checks every experiment makes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from experiments.runner.results_file import normalize_config


def merge_config(
  base: Mapping[str, Any], over: Mapping[str, Any], *, replace: tuple[str, ...] = (), path: str = ""
) -> dict:
  """``base`` updated with ``over``: nested dicts merge, other values (lists too) are replaced.

  Args:
    base: the full config (e.g. an experiment's defaults).
    over: entries to change; every key must exist in ``base``.
    replace: top-level keys whose dict is replaced as a whole, not merged.
    path: prefix for error messages (used in recursion).

  Raises:
    ValueError: naming an entry of ``over`` that ``base`` does not have.
  """
  out = copy.deepcopy(dict(base))
  for k, v in over.items():
    if k not in out:
      raise ValueError(f"unknown config entry {path}{k!r}; known: {sorted(out)}")
    merge = isinstance(out[k], dict) and isinstance(v, Mapping)
    if merge and not (path == "" and k in replace):
      out[k] = merge_config(out[k], v, path=f"{path}{k}.")
    else:
      out[k] = copy.deepcopy(v)
  return out


def build_config(
  defaults: Mapping[str, Any],
  overrides: Mapping[str, Any] | None,
  kwargs: Mapping[str, Any],
  *,
  validate: Callable[[dict], None],
  replace: tuple[str, ...] = (),
) -> dict:
  """An experiment's ``make_config``: ``defaults`` merged with ``overrides``, then
  ``kwargs`` (`merge_config`), as plain JSON data (`normalize_config`), validated."""
  config = merge_config(defaults, overrides or {}, replace=replace)
  config = normalize_config(merge_config(config, kwargs, replace=replace))
  validate(config)
  return config


def require(ok: bool, message: str) -> None:
  """Raises ``ValueError(message)`` unless ``ok`` (for validating configs)."""
  if not ok:
    raise ValueError(message)


def require_positive_ints(config: Mapping[str, Any], keys: tuple[str, ...]) -> None:
  """Raises ValueError naming the first of ``keys`` whose entry is not an int >= 1."""
  for k in keys:
    v = config[k]
    require(
      isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{k} must be a positive int, got {v!r}"
    )


def require_methods(methods: Any, known: tuple[str, ...]) -> None:
  """Raises ValueError unless ``methods`` is a non-empty list of ``known`` names without repeats."""
  require(
    isinstance(methods, list) and len(methods) > 0 and len(set(methods)) == len(methods),
    f"methods must be a non-empty list without repeats, got {methods}",
  )
  for m in methods:
    require(m in known, f"unknown method {m!r}; expected some of {known}")
