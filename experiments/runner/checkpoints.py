"""Orbax checkpoints of a chunked run, verified on restore (config, structure, checksums)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.runner.errors import (
  ConfigMismatchError,
  CorruptCheckpointError,
  IncompatibleCheckpointError,
  OutputWriteError,
)
from experiments.runner.results_file import normalize_config

# The checkpoint format this code writes, recorded in every checkpoint's record
# (``"format"``). Bump it when a change of the runner, or of a state the
# experiments carry (e.g. ``cbp()``'s), would make an earlier checkpoint restore
# wrongly while its structure still matches, and drop the old number from
# `READABLE_FORMATS`: such checkpoints are then refused by name.
#   1: no "format" entry (the runner before it recorded one, up to commit a51cc87).
#   2: "format" and "carry_paths" (every carry leaf's key path, so a renamed or
#      reordered field is seen even where the structure's text is the same).
FORMAT = 2
READABLE_FORMATS = (1, 2)


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _config_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(now, dict):
    out = []
    for k in sorted(set(saved) | set(now)):
      name = f"{prefix}.{k}" if prefix else str(k)
      if k not in saved:
        out.append(f"{name}: absent in the checkpoint, {now[k]!r} now")
      elif k not in now:
        out.append(f"{name}: {saved[k]!r} in the checkpoint, absent now")
      else:
        out.extend(_config_diff(saved[k], now[k], name))
    return out
  if saved != now:
    return [f"{prefix or 'config'}: {saved!r} in the checkpoint, {now!r} now"]
  return []


def _entry_paths(config: Any, prefix: str = "") -> set[str]:
  """The dotted names of every entry of a nested config: its schema, without the values."""
  if not isinstance(config, dict):
    return set()
  out = set()
  for k, v in config.items():
    name = f"{prefix}.{k}" if prefix else str(k)
    out |= {name} | _entry_paths(v, name)
  return out


def _where_texts_differ(saved: str, now: str, context: int = 70) -> str:
  """Both texts around their first difference (a structure's text can be thousands of characters)."""
  i = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
  start = max(0, i - context)

  def excerpt(text):
    end = i + 1 + context  # The first differing character and ``context`` either side.
    return ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")

  return f"at character {i}:\n  checkpoint: {excerpt(saved)}\n  now:        {excerpt(now)}"


def _stored_spec(x: Any, points_scale: int = 1) -> jax.ShapeDtypeStruct:
  """How leaf ``x`` is stored (a key as its key data), its last axis ``points_scale`` times as long."""
  data = jax.random.key_data(x) if _is_key(x) else x
  shape = tuple(data.shape)
  if points_scale != 1:
    shape = shape[:-1] + (shape[-1] * points_scale,)
  return jax.ShapeDtypeStruct(shape, data.dtype)


def _leaf_paths(tree: Any) -> list[str]:
  """Every leaf's key path, e.g. ``"['learners']['cbp'][1].age"``, in flattening order."""
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _leaf_specs(leaves: list) -> list[list]:
  """``[[dtype, shape], ...]`` of arrays, as stored in a checkpoint's record."""
  return [[np.dtype(x.dtype).str, list(np.shape(x))] for x in leaves]


def checksum(leaves: list) -> str:
  """SHA-256 over the arrays' dtypes, shapes and bytes, in order (hex digest)."""
  h = hashlib.sha256()
  for i, x in enumerate(leaves):
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{i}:{x.dtype.str}:{x.shape};".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _first_line(e: BaseException, limit: int = 400) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
  return text if len(text) <= limit else text[:limit] + " ..."


def _causes(e: BaseException) -> list[BaseException]:
  """``e`` and the exceptions it was raised from (``__cause__`` / ``__context__``)."""
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


class Checkpoints:
  """Orbax checkpoints of a chunked run, saved at chunk boundaries.

  Each checkpoint (orbax step = chunks done) holds ``{"carry": leaves,
  "metrics": leaves}`` (PRNG keys as key data) plus a JSON record of the
  experiment, config, chunk index, carry structure, and per group the leaves'
  ``[dtype, shape]`` (``"leaves"``) and the `checksum` of their bytes
  (``"checksums"``), verified on restore.

  Args:
    directory: where the checkpoints live (created if missing).
    experiment: experiment name, checked on restore.
    config: the run's config, checked on restore.
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(
    self, directory: str | os.PathLike, *, experiment: str, config: Mapping[str, Any], max_to_keep: int = 2
  ):
    import orbax.checkpoint as ocp  # Imported here: a plain run needs no orbax.

    self._ocp = ocp
    self.directory = Path(directory).absolute()
    self.experiment = experiment
    self.config = normalize_config(config)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    except OSError as e:
      raise OutputWriteError(
        e.errno, f"cannot use {self.directory} for checkpoints: {e.strerror or e}"
      ) from e

  def latest(self) -> int | None:
    """Chunks done at the latest checkpoint, or None if there is none."""
    return self._manager.latest_step()

  def save(self, chunks_done: int, carry: Any, metrics: Any) -> None:
    ocp = self._ocp
    carry_leaves, carry_def = jax.tree.flatten(carry)
    metric_leaves, metric_def = jax.tree.flatten(metrics)
    host = {
      "carry": [np.asarray(jax.random.key_data(x) if _is_key(x) else x) for x in carry_leaves],
      "metrics": [np.asarray(x) for x in metric_leaves],
    }
    state = {group: {str(i): x for i, x in enumerate(xs)} for group, xs in host.items()}
    meta = {
      "format": FORMAT,
      "experiment": self.experiment,
      "config": self.config,
      "chunks_done": chunks_done,
      "carry_structure": str(carry_def),
      "carry_paths": _leaf_paths(carry),
      "metrics_structure": str(metric_def),
      "leaves": {group: _leaf_specs(xs) for group, xs in host.items()},
      "checksums": {group: checksum(xs) for group, xs in host.items()},
    }
    # Orbax writes the step into a temporary folder and renames it when
    # complete, and deletes old steps only after that: a failed save leaves
    # the earlier checkpoints as they were.
    try:
      self._manager.save(
        chunks_done,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
      )
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax wraps OS errors in its own kinds.
      # Let orbax's writer threads of the failed step finish (or fail) before
      # anything else touches the folder, e.g. a retry of this step.
      with contextlib.suppress(Exception):
        self._manager.wait_until_finished()
      # The first failure is the deepest OS error: orbax's cleanup of the
      # half-written step can fail too, while handling it.
      cause = next((c for c in reversed(_causes(e)) if isinstance(c, OSError)), None)
      earlier = [s for s in self._manager.all_steps() if s < chunks_done and self.step_dir(s).is_dir()]
      kept = (
        f"the checkpoint of chunk {max(earlier)} is unchanged"
        if earlier
        else "there is no earlier checkpoint"
      )
      raise OutputWriteError(
        getattr(cause, "errno", None),
        f"cannot save the checkpoint of chunk {chunks_done} in {self.directory}: "
        f"{_first_line(cause or e)}; {kept}",
      ) from e

  def step_dir(self, step: int) -> Path:
    """The directory of checkpoint ``step``."""
    return self.directory / str(step)

  def corrupt(self, step: int, what: str) -> CorruptCheckpointError:
    """The error for an unreadable or damaged checkpoint ``step``, saying what to do."""
    earlier = [s for s in self._manager.all_steps() if s < step]
    afresh = f"delete {self.directory} (and drop --resume) to start afresh"
    todo = (
      f"Delete {self.step_dir(step)} to resume from the previous checkpoint (chunk "
      f"{max(earlier)}) instead, or {afresh}."
      if earlier
      else f"There is no earlier checkpoint: {afresh}."
    )
    return CorruptCheckpointError(
      f"refusing to resume from {self.step_dir(step)} (chunk {step}): the checkpoint is "
      f"unreadable or corrupt: {what}. Nothing was restored. {todo}"
    )

  def incompatible(self, step: int, meta: dict, what: str) -> IncompatibleCheckpointError:
    """The error for checkpoint ``step`` written by another version of the code, saying what to do."""
    version = meta.get("format", 1)
    written = (
      f"checkpoint format {version}"
      if "format" in meta
      else "checkpoint format 1, from before the format was recorded"
    )
    what = what.rstrip("\n")
    return IncompatibleCheckpointError(
      f"refusing to resume from {self.step_dir(step)} (chunk {step}): it was written by another "
      f"version of the code ({written}; this code writes format {FORMAT}): {what}"
      + ("\n" if "\n" in what else ". ")
      + "Nothing was restored: resuming would fail or continue a different run than the one saved. "
      f"To start afresh, rerun with --fresh (it deletes {self.directory}) or delete that folder; "
      "to finish the saved run, resume it with the version of the code that wrote it."
    )

  def check(self, step: int, carry_template: Any = None) -> dict:
    """Reads checkpoint ``step``'s record and checks that this run can resume from it.

    Args:
      step: the checkpoint (chunks done).
      carry_template: this run's initial carry; if given, the checkpoint's
        carry must have its structure, leaf paths, dtypes and shapes. Checked
        here, before anything is compiled.

    Raises:
      IncompatibleCheckpointError: the checkpoint was written by another
        version of the code: a format this code does not read, a config of
        another schema (entries present on one side only), or a carry of
        another structure. The message says what differs and to use --fresh.
      ConfigMismatchError: the record is of another experiment or of other
        config values.
      CorruptCheckpointError: the record cannot be read.
    """
    ocp = self._ocp
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many kinds; all mean "cannot read it".
      raise self.corrupt(step, f"its record cannot be read: {_first_line(e)}") from e
    if not isinstance(meta, dict) or meta.get("chunks_done") != step:
      raise self.corrupt(step, "its record does not describe this checkpoint")
    if meta.get("format", 1) not in READABLE_FORMATS:
      raise self.incompatible(step, meta, f"this code reads formats {list(READABLE_FORMATS)} only")
    if meta.get("experiment") != self.experiment:
      raise ConfigMismatchError(
        f"refusing to resume from {self.directory} (chunk {step}): it is a checkpoint of "
        f"experiment {meta.get('experiment')!r}, not {self.experiment!r}. Use another checkpoint "
        "directory, or --fresh to delete this one and start afresh."
      )
    problems = _config_diff(meta.get("config"), self.config)
    if problems and _entry_paths(meta.get("config")) != _entry_paths(self.config):
      # Overrides cannot add or remove entries (`merge_config`): the code's config schema changed.
      raise self.incompatible(
        step,
        meta,
        "its config has other entries than this code's (the experiment's config "
        "schema changed):\n  "
        + "\n  ".join(problems[:12])
        + (f"\n  ... ({len(problems)} differences)" if len(problems) > 12 else "")
        + "\n",
      )
    if problems:
      raise ConfigMismatchError(
        f"refusing to resume from {self.directory} (chunk {step}): it was written with a "
        "different configuration, so continuing would not give the results of either run:\n  "
        + "\n  ".join(problems)
        + "\nRun with the checkpoint's settings, or use another checkpoint directory "
        "(or drop --resume and delete this one, or pass --fresh) to start afresh."
      )
    if carry_template is not None:
      self._check_structure(step, meta, "carry", carry_template)
    return meta

  def _check_structure(self, step: int, meta: dict, group: str, template: Any, points_scale: int = 1) -> None:
    """Raises `IncompatibleCheckpointError` unless the checkpoint's ``group`` ("carry" or
    "metrics") has ``template``'s structure, leaf paths (where recorded), dtypes and shapes."""
    leaves, treedef = jax.tree.flatten(template)
    saved_paths = meta.get(f"{group}_paths")
    paths = _leaf_paths(template)
    if saved_paths is not None and saved_paths != paths:
      gone = [p for p in saved_paths if p not in set(paths)]
      new = [p for p in paths if p not in set(saved_paths)]
      what = (
        f"the {group}'s leaves differ: only in the checkpoint {gone[:6]}"
        + (f" (+{len(gone) - 6} more)" if len(gone) > 6 else "")
        + f", only in this code {new[:6]}"
        + (f" (+{len(new) - 6} more)" if len(new) > 6 else "")
        if gone or new
        else f"the {group}'s leaves are in another order"
      )
      raise self.incompatible(step, meta, what)
    saved = meta.get(f"{group}_structure")
    if saved != str(treedef):
      raise self.incompatible(
        step,
        meta,
        f"the {group}'s structure differs from this code's, "
        + (
          _where_texts_differ(saved, str(treedef)) + "\n"
          if isinstance(saved, str)
          else "the record does not describe it\n"
        ),
      )
    # Checkpoints written before checksums existed have no "leaves".
    saved = (meta.get("leaves") or {}).get(group)
    now = _leaf_specs([_stored_spec(x, points_scale) for x in leaves])
    if saved is not None and saved != now:
      diffs = [
        f"{group} leaf {i}: {a} in the checkpoint, {b} now" + (f" ({paths[i]})" if i < len(paths) else "")
        for i, (a, b) in enumerate(itertools.zip_longest(saved, now))
        if a != b
      ]
      raise self.incompatible(
        step,
        meta,
        f"the {group} arrays' [dtype, shape] differ from this code's:\n  "
        + "\n  ".join(diffs[:5])
        + ("\n  ..." if len(diffs) > 5 else "")
        + "\n",
      )

  def restore(self, carry_template: Any, metrics_template: Any) -> tuple[int, Any, Any]:
    """Restores the latest checkpoint.

    Args:
      carry_template: a carry of the right structure, shapes and dtypes (e.g.
        the fresh initial carry); key arrays in it say which leaves are keys.
      metrics_template: ``{label: {name: ShapeDtypeStruct(..., points_per_chunk)}}``
        of one chunk; the restored leaves have ``chunks_done`` times as many points.

    Returns:
      ``(chunks_done, carry, metrics)``.

    Raises:
      As `check`, and CorruptCheckpointError when the arrays cannot be read
      or fail their checksum.
    """
    ocp = self._ocp
    step = self.latest()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.check(step, carry_template)
    self._check_structure(step, meta, "metrics", metrics_template, points_scale=step)
    carry_leaves, carry_def = jax.tree.flatten(carry_template)
    metric_leaves, metric_def = jax.tree.flatten(metrics_template)
    target = {
      "carry": {str(i): _stored_spec(x) for i, x in enumerate(carry_leaves)},
      "metrics": {str(i): _stored_spec(x, step) for i, x in enumerate(metric_leaves)},
    }
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
        "state"
      ]
      host = {
        group: [np.asarray(state[group][str(i)]) for i in range(len(target[group]))] for group in target
      }
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean "cannot read it".
      raise self.corrupt(step, f"its arrays cannot be read: {_first_line(e)}") from e
    for group, expected in (meta.get("checksums") or {}).items():
      if checksum(host[group]) != expected:
        raise self.corrupt(
          step,
          f"the {group} arrays read back differ from those saved: their SHA-256 "
          "checksum does not match the one recorded at save time",
        )
    restored = []
    for x, data in zip(carry_leaves, host["carry"]):
      data = jnp.asarray(data)
      restored.append(jax.random.wrap_key_data(data, impl=jax.random.key_impl(x)) if _is_key(x) else data)
    return (step, jax.tree.unflatten(carry_def, restored), jax.tree.unflatten(metric_def, host["metrics"]))

  def close(self) -> None:
    self._manager.close()
