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

from experiments.runner.errors import ConfigMismatchError, CorruptCheckpointError, OutputWriteError
from experiments.runner.results_file import normalize_config


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

  def __init__(self, directory: str | os.PathLike, *, experiment: str,
               config: Mapping[str, Any], max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # Imported here: a plain run needs no orbax.
    self._ocp = ocp
    self.directory = Path(directory).absolute()
    self.experiment = experiment
    self.config = normalize_config(config)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "meta"))
    except OSError as e:
      raise OutputWriteError(
          e.errno, f"cannot use {self.directory} for checkpoints: {e.strerror or e}") from e

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
        "experiment": self.experiment,
        "config": self.config,
        "chunks_done": chunks_done,
        "carry_structure": str(carry_def),
        "metrics_structure": str(metric_def),
        "leaves": {group: _leaf_specs(xs) for group, xs in host.items()},
        "checksums": {group: checksum(xs) for group, xs in host.items()},
    }
    # Orbax writes the step into a temporary folder and renames it when
    # complete, and deletes old steps only after that: a failed save leaves
    # the earlier checkpoints as they were.
    try:
      self._manager.save(chunks_done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax wraps OS errors in its own kinds.
      # Let orbax's writer threads of the failed step finish (or fail) before
      # anything else touches the folder, e.g. a retry of this step.
      with contextlib.suppress(Exception):
        self._manager.wait_until_finished()
      # The first failure is the deepest OS error: orbax's cleanup of the
      # half-written step can fail too, while handling it.
      cause = next((c for c in reversed(_causes(e)) if isinstance(c, OSError)), None)
      earlier = [s for s in self._manager.all_steps() if s < chunks_done and
                 self.step_dir(s).is_dir()]
      kept = (f"the checkpoint of chunk {max(earlier)} is unchanged" if earlier
              else "there is no earlier checkpoint")
      raise OutputWriteError(
          getattr(cause, "errno", None),
          f"cannot save the checkpoint of chunk {chunks_done} in {self.directory}: "
          f"{_first_line(cause or e)}; {kept}") from e

  def step_dir(self, step: int) -> Path:
    """The directory of checkpoint ``step``."""
    return self.directory / str(step)

  def corrupt(self, step: int, what: str) -> CorruptCheckpointError:
    """The error for an unreadable or damaged checkpoint ``step``, saying what to do."""
    earlier = [s for s in self._manager.all_steps() if s < step]
    afresh = f"delete {self.directory} (and drop --resume) to start afresh"
    todo = (f"Delete {self.step_dir(step)} to resume from the previous checkpoint (chunk "
            f"{max(earlier)}) instead, or {afresh}." if earlier else
            f"There is no earlier checkpoint: {afresh}.")
    return CorruptCheckpointError(
        f"refusing to resume from {self.step_dir(step)} (chunk {step}): the checkpoint is "
        f"unreadable or corrupt: {what}. Nothing was restored. {todo}")

  def check(self, step: int) -> dict:
    """Reads checkpoint ``step``'s record.

    Raises:
      ConfigMismatchError: the record is of another experiment or config.
      CorruptCheckpointError: the record cannot be read.
    """
    ocp = self._ocp
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many kinds; all mean "cannot read it".
      raise self.corrupt(step, f"its record cannot be read: {_first_line(e)}") from e
    if not isinstance(meta, dict) or meta.get("chunks_done") != step:
      raise self.corrupt(step, "its record does not describe this checkpoint")
    problems = []
    if meta.get("experiment") != self.experiment:
      problems.append(f"experiment: {meta.get('experiment')!r} in the checkpoint, "
                      f"{self.experiment!r} now")
    problems += _config_diff(meta.get("config"), self.config)
    if problems:
      raise ConfigMismatchError(
          f"refusing to resume from {self.directory} (chunk {step}): it was written with a "
          "different configuration, so continuing would not give the results of either run:\n  "
          + "\n  ".join(problems)
          + "\nRun with the checkpoint's settings, or use another checkpoint directory "
            "(or drop --resume and delete this one) to start afresh.")
    return meta

  def restore(self, carry_template: Any, metrics_template: Any) -> tuple[int, Any, Any]:
    """Restores the latest checkpoint.

    Args:
      carry_template: a carry of the right structure, shapes and dtypes (e.g.
        the fresh initial carry); key arrays in it say which leaves are keys.
      metrics_template: ``{label: {name: ShapeDtypeStruct(..., points_per_chunk)}}``
        of one chunk; the restored leaves have ``chunks_done`` times as many points.

    Returns:
      ``(chunks_done, carry, metrics)``.
    """
    ocp = self._ocp
    step = self.latest()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.check(step)
    carry_leaves, carry_def = jax.tree.flatten(carry_template)
    metric_leaves, metric_def = jax.tree.flatten(metrics_template)
    for what, saved, now in (("carry", meta["carry_structure"], str(carry_def)),
                             ("metrics", meta["metrics_structure"], str(metric_def))):
      if saved != now:
        raise ConfigMismatchError(
            f"refusing to resume from {self.directory}: the {what} structure differs from "
            f"this code's (was the experiment's code changed?)\n  checkpoint: {saved}\n  now: {now}")

    def abstract(x, points_scale=1):
      data = jax.random.key_data(x) if _is_key(x) else x
      shape = tuple(data.shape)
      if points_scale != 1:
        shape = shape[:-1] + (shape[-1] * points_scale,)
      return jax.ShapeDtypeStruct(shape, data.dtype)

    target = {
        "carry": {str(i): abstract(x) for i, x in enumerate(carry_leaves)},
        "metrics": {str(i): abstract(x, step) for i, x in enumerate(metric_leaves)},
    }
    # Checkpoints written before checksums existed have no "leaves"/"checksums".
    for group, saved in (meta.get("leaves") or {}).items():
      now = _leaf_specs(list(target[group].values()))
      if saved != now:
        diffs = [f"{group} leaf {i}: {a} in the checkpoint, {b} now"
                 for i, (a, b) in enumerate(itertools.zip_longest(saved, now)) if a != b]
        raise ConfigMismatchError(
            f"refusing to resume from {self.directory} (chunk {step}): the {group} arrays' "
            "[dtype, shape] differ from this code's (was the experiment's code changed?)\n  "
            + "\n  ".join(diffs[:5]) + ("\n  ..." if len(diffs) > 5 else ""))
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
      host = {group: [np.asarray(state[group][str(i)]) for i in range(len(target[group]))]
              for group in target}
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean "cannot read it".
      raise self.corrupt(step, f"its arrays cannot be read: {_first_line(e)}") from e
    for group, expected in (meta.get("checksums") or {}).items():
      if checksum(host[group]) != expected:
        raise self.corrupt(
            step, f"the {group} arrays read back differ from those saved: their SHA-256 "
                  "checksum does not match the one recorded at save time")
    restored = []
    for x, data in zip(carry_leaves, host["carry"]):
      data = jnp.asarray(data)
      restored.append(jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
                      if _is_key(x) else data)
    return (step, jax.tree.unflatten(carry_def, restored),
            jax.tree.unflatten(metric_def, host["metrics"]))

  def close(self) -> None:
    self._manager.close()
