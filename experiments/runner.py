"""The shared experiment runner: chunked compiled runs, results files, plots, checkpoints.

Every experiment in `experiments/` is written as two pure functions:

* ``init`` building the *carry* (a pytree of arrays: parameters, optimizer
  states, data-stream state, PRNG keys, for all seeds at once), and
* ``chunk(carry, chunk_index) -> (carry, metrics)``: a fixed amount of work
  (e.g. a few bins of 20k SGD steps, ``lax.scan`` inside, ``vmap`` over seeds),
  returning the metrics of the points it finished.

`run` compiles ``chunk`` once (ahead of time, so it can never recompile) and
calls it ``num_chunks`` times from Python; what is not carried (a data set on
the device) goes in ``args``, arguments of the compiled program rather than
constants baked into it. Between chunks, and only there, the host syncs: it
appends the chunk's metrics, rewrites the results file atomically, saves an
orbax checkpoint if asked, and prints a progress line.
Ctrl-C therefore always leaves a valid results file (status ``"interrupted"``)
holding every finished chunk, and ``resume=True`` continues from the last
checkpoint to results identical, bit for bit, to an uninterrupted run.

Results file schema (JSON, ``SCHEMA``; NaN is written as ``null``)::

    {
      "schema": "cbp_jax.experiments.results/1",
      "experiment": str,            # e.g. "slowly_changing_regression"
      "status": "running" | "complete" | "interrupted",
      "config": {...},              # everything that determines the results
      "chunks_done": int, "num_chunks": int,
      "points_per_chunk": int,      # metric points (e.g. bins) per chunk
      "x_label": str,               # what "x" counts, e.g. "examples"
      "x": [float, ...],            # x at each recorded point (len = points done)
      "runs": {label: {...}},       # per run label: method name and hyperparameters
      "metrics": {label: {name: [[v_point0, v_point1, ...],   # seed 0
                                 [...], ...]}},                 # seed 1, ...
      "statistics": {label: {name: {"auc": {"iqm", "ci_low", "ci_high"},
                                    "final": {...}}}}
    }

``statistics`` (added later; a file without it still loads, and
`format_statistics` computes it) summarises every metric over seeds as
rliable does: the interquartile mean of each seed's area under the curve (the
mean over points) and of the last point, with 95% stratified-bootstrap
confidence intervals (`run_statistics`); plots draw the IQM per point with
its interval shaded, and `run_from_cli` prints the main metric's line.

``metrics[label][name]`` is an array of shape ``(seeds, points)``: ``chunk``
returns ``{label: {name: array(seeds, points_per_chunk)}}`` and the runner
concatenates chunks along the last axis. Typical names: ``"error"`` (binned
squared error), ``"accuracy"``, and the plasticity correlates
``"dead_fraction"``, ``"effective_rank"``, ``"weight_magnitude"``. Wall-clock
timings are deliberately *not* in the file (they would break the bit-for-bit
determinism of results); `run` returns them and ``timing.json`` holds them.

The experiments share the rest of their plumbing from here too: configs
(`build_config`, `merge_config`, `require`), seeds (`seed_keys`, and
`batch_over_seeds` / `batched_per_config` batching the per-seed ``init`` and
``chunk``, a single seed unbatched by `map_leading`), the whole run as one
program (`whole_run`), running all seeds (`run_seeds`) and the command line
(`add_run_arguments`, `overrides_from_args`, `parse_hparam_sets`,
`run_from_cli`).

Checkpoints (orbax, one directory per saved chunk boundary) hold the carry
(PRNG key arrays stored as their key data), the metrics so far, the chunk
index, the config, and the dtype, shape and a SHA-256 checksum of every saved
array. Resuming with a different config raises `ConfigMismatchError` naming
every differing entry; a checkpoint orbax cannot read (truncated, garbled or
missing files) or whose arrays do not match their checksum raises
`CorruptCheckpointError` naming the step directory and what to do. Neither
falls back silently to an older checkpoint.

Faults (`run`): the results file is written to a temporary file, flushed to
disk (``fsync``) and renamed over the old one, and orbax finalises a
checkpoint by a rename too, so a full disk or an unwritable folder raises
`OutputWriteError` (saying which file, why, and where the run can resume)
and leaves the previous results file and checkpoints as they were. A run
holds an exclusive lock on its output and checkpoint folders (`output_lock`:
``fcntl.flock`` on a lock file naming the holder's pid and host), so a second
run started on the same folder is refused with `OutputLockedError` naming the
first; the kernel drops the lock when its holder exits or is killed, so a
crashed run leaves no stale lock behind.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbp_jax import sharding

SCHEMA = "cbp_jax.experiments.results/1"
STATUSES = ("running", "complete", "interrupted")


class ConfigMismatchError(ValueError):
  """A checkpoint was written by a run with a different configuration."""


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read, or its arrays differ from what was saved."""


class OutputWriteError(OSError):
  """Writing the results file or a checkpoint failed (full disk, read-only
  folder, ...); what was there before is unchanged."""


class OutputLockedError(RuntimeError):
  """Another process holds the output folder's lock (`output_lock`)."""


@dataclasses.dataclass
class RunResult:
  """What `run` returns.

  Attributes:
    carry: the final carry (device arrays).
    metrics: ``{label: {name: np.ndarray(seeds, points)}}`` of all finished chunks.
    results: the dict last written to the results file.
    chunks_done: finished chunks (including resumed ones).
    status: ``"complete"`` or ``"interrupted"``.
    compile_seconds: time to lower and compile ``chunk``.
    chunk_seconds: wall time of every chunk run in this call (after compiling).
    resumed_from: chunk index the run resumed from (0 for a fresh run).
  """
  carry: Any
  metrics: dict
  results: dict
  chunks_done: int
  status: str
  compile_seconds: float
  chunk_seconds: list[float]
  resumed_from: int


# ---------------------------------------------------------------------------
# JSON helpers.
# ---------------------------------------------------------------------------


def normalize_config(config: Mapping[str, Any]) -> dict:
  """The config as plain JSON data (tuples become lists), as it is stored."""
  return json.loads(json.dumps(config, sort_keys=True))


def _to_json(x: Any) -> Any:
  """NumPy/JAX values to JSON data; NaN and infinities become ``null``."""
  if isinstance(x, Mapping):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return _to_json(np.asarray(x).tolist())
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  return x


def _from_json_metrics(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _from_json_metrics(v) for k, v in tree.items()}
  return np.array(tree, dtype=np.float64)  # null -> nan


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
  """Writes ``data`` as JSON to ``path`` via a temporary file and a rename.

  A reader (or a Ctrl-C, a crash, a power loss) sees either the old file or
  the new one, never a partial write: the temporary file is flushed to disk
  (``fsync``) before it replaces ``path``.

  Raises:
    OutputWriteError: the file could not be written (full disk, read-only
      folder, ...). The temporary file is removed and ``path`` is unchanged.
  """
  path = Path(path)
  text = (json.dumps(_to_json(data), allow_nan=False) + "\n").encode()
  tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      view = memoryview(text)
      while view:
        view = view[os.write(fd, view):]
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise OutputWriteError(
        e.errno, f"cannot write {path}: {e.strerror or e}; the previous {path.name} (if any) "
                 "is unchanged") from e
  _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
  """Makes a rename in ``directory`` durable; best effort (not every file system allows it)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


# ---------------------------------------------------------------------------
# The output folder's lock.
# ---------------------------------------------------------------------------

LOCK_NAME = ".cbp_jax_run.lock"
# Locks this process holds: resolved folder -> [file descriptor, depth].
_held_locks: dict[Path, list[int]] = {}


def _lock_holder(lock_path: Path) -> str:
  """Who holds a lock, as its file says (the holder writes it after locking)."""
  try:
    info = json.loads(lock_path.read_text() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "another process (it has not written its pid yet)"
  return (f"process {info.get('pid')} on host {info.get('host')} (since {info.get('since')}: "
          f"{info.get('command')})")


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike):
  """Holds an exclusive lock on ``directory`` (created if missing) while in the block.

  The lock is ``fcntl.flock`` on ``directory/.cbp_jax_run.lock``, which names
  the holder (pid, host, start time, command). The kernel releases it when
  the holder exits or is killed, so a crashed run leaves no stale lock: the
  next run takes it (and rewrites the file). Re-entrant within a process.
  On network file systems ``flock`` may be local to each host.

  Raises:
    OutputLockedError: another process holds the lock; the message names it.
    OutputWriteError: the folder or its lock file cannot be created.
  """
  directory = Path(directory).absolute()
  if directory in _held_locks:
    _held_locks[directory][1] += 1
    try:
      yield
    finally:
      _held_locks[directory][1] -= 1
    return
  lock_path = directory / LOCK_NAME
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise OutputWriteError(
        e.errno, f"cannot use {directory} as an output folder: {e.strerror or e}") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise OutputLockedError(
        f"{directory} is in use by {_lock_holder(lock_path)}. Two runs writing the same results "
        "and checkpoints would corrupt each other: wait for that run to finish or stop it, or "
        "use another output folder.") from None
  try:
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since,
                         "command": " ".join(sys.argv)}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
  except OSError:
    pass  # Naming the holder is a courtesy; the flock is the lock.
  _held_locks[directory] = [fd, 1]
  try:
    yield
  finally:
    del _held_locks[directory]
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)  # No holder named once released.
    os.close(fd)  # Releases the flock.


def load_results(path: str | os.PathLike) -> dict:
  """Reads a results file; ``metrics`` leaves become float64 arrays (null -> NaN).

  Raises:
    ValueError: if the file does not have the `SCHEMA` this module writes.
  """
  with open(path) as f:
    results = json.load(f)
  if results.get("schema") != SCHEMA:
    raise ValueError(f"{path}: schema {results.get('schema')!r}, expected {SCHEMA!r}")
  results["metrics"] = _from_json_metrics(results["metrics"])
  return results


# ---------------------------------------------------------------------------
# Metrics bookkeeping.
# ---------------------------------------------------------------------------


def _check_metrics(metrics: Any, points_per_chunk: int) -> None:
  if not isinstance(metrics, Mapping):
    raise ValueError(
        f"chunk must return metrics as {{label: {{name: array}}}}, got {type(metrics).__name__}")
  for label, named in metrics.items():
    if not isinstance(named, Mapping):
      raise ValueError(f"metrics[{label!r}] must be a dict of arrays, got {type(named).__name__}")
    for name, leaf in named.items():
      shape = getattr(leaf, "shape", None)
      if shape is None or len(shape) < 1 or shape[-1] != points_per_chunk:
        raise ValueError(
            f"metrics[{label!r}][{name!r}] has shape {shape}; the last axis must be the "
            f"chunk's {points_per_chunk} points")


def _points(parts: list) -> int:
  leaves = jax.tree.leaves(parts[0]) if parts else []
  return int(np.shape(leaves[0])[-1]) if leaves else 0


def _concat(parts: list) -> dict:
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=-1), *parts)


def results_dict(
    *, experiment: str, config: Mapping[str, Any], status: str, chunks_done: int,
    num_chunks: int, points_per_chunk: int, x_step: float, x_label: str,
    runs: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> dict:
  """Builds the results-file dict (see the module docstring for the schema)."""
  if status not in STATUSES:
    raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
  points = chunks_done * points_per_chunk
  metrics = dict(metrics or {})
  if runs:  # Keep the experiment's run order (pytree operations sort dict keys).
    order = [k for k in runs if k in metrics] + [k for k in metrics if k not in runs]
    metrics = {k: metrics[k] for k in order}
  return {
      "schema": SCHEMA,
      "experiment": experiment,
      "status": status,
      "config": normalize_config(config),
      "chunks_done": chunks_done,
      "num_chunks": num_chunks,
      "points_per_chunk": points_per_chunk,
      "x_label": x_label,
      "x": [float(x_step * (i + 1)) for i in range(points)],
      "runs": _to_json(dict(runs or {})),
      "metrics": _to_json(metrics),
      "statistics": _to_json(run_statistics(metrics)),
  }


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Progress.
# ---------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
  """One status line per chunk on stderr (rewritten in place on a terminal).

  Args:
    name: prefix of the line.
    num_chunks: total chunks.
    work_per_chunk: units of work per chunk (e.g. SGD steps summed over all
      runs and seeds) for the rate, or None.
    work_label: the unit's name.
    stream: where to write (default stderr); None silences it.
  """

  def __init__(self, name: str, num_chunks: int, work_per_chunk: float | None = None,
               work_label: str = "steps", stream: Any = "stderr"):
    self.name, self.num_chunks = name, num_chunks
    self.work_per_chunk, self.work_label = work_per_chunk, work_label
    self.stream = sys.stderr if stream == "stderr" else stream
    self._tty = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())

  def update(self, chunks_done: int, seconds: list[float], extra: str = "") -> None:
    if self.stream is None:
      return
    elapsed = sum(seconds)
    per_chunk = elapsed / len(seconds) if seconds else float("nan")
    eta = per_chunk * (self.num_chunks - chunks_done)
    line = f"[{self.name}] chunk {chunks_done}/{self.num_chunks}"
    if self.work_per_chunk and seconds:
      line += f" | {self.work_per_chunk / per_chunk:,.0f} {self.work_label}/s"
    line += f" | elapsed {_fmt_seconds(elapsed)} | eta {_fmt_seconds(eta)}"
    if extra:
      line += f" | {extra}"
    if self._tty:
      self.stream.write("\r\033[K" + line + ("\n" if chunks_done == self.num_chunks else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.stream is None:
      return
    if self._tty:
      self.stream.write("\n")
    self.stream.write(f"[{self.name}] {text}\n")
    self.stream.flush()


# ---------------------------------------------------------------------------
# The run loop.
# ---------------------------------------------------------------------------


def compile_chunk(chunk_fn: Callable, carry: Any, args: tuple = ()) -> tuple[Any, float]:
  """Lowers and compiles ``chunk_fn(carry, int32 chunk index, *args)`` once.

  The returned executable only accepts arguments of exactly these shapes and
  dtypes, so it cannot silently recompile per chunk; call it as
  ``compiled(carry, index, *args)``.

  Returns:
    ``(compiled, seconds)``.
  """
  start = time.perf_counter()
  jitted = chunk_fn if hasattr(chunk_fn, "lower") else jax.jit(chunk_fn)
  compiled = jitted.lower(carry, jnp.zeros((), jnp.int32), *args).compile()
  return compiled, time.perf_counter() - start


def time_chunks(make_batched: Callable[[Mapping[str, Any]], tuple], config: Mapping[str, Any], *,
                chunks: int = 2) -> tuple[float, float]:
  """``(compile_seconds, median seconds per chunk)`` of an experiment's compiled chunk.

  ``init, chunk = make_batched(config)``; the chunk is compiled ahead of time
  (`compile_chunk`, not timed) and run ``chunks`` times from
  ``init(seed_keys(config))``, each call timed to completion.
  """
  init, chunk = make_batched(config)
  carry = init(seed_keys(config))
  compiled, compile_s = compile_chunk(chunk, carry)
  times = []
  for i in range(chunks):
    tic = time.perf_counter()
    carry, metrics = compiled(carry, jnp.asarray(i, jnp.int32))
    jax.block_until_ready((carry, metrics))
    times.append(time.perf_counter() - tic)
  return compile_s, float(np.median(times))


def run(
    chunk_fn: Callable[..., tuple[Any, Any]],
    init_carry: Any,
    *,
    args: tuple = (),
    num_chunks: int,
    config: Mapping[str, Any],
    experiment: str,
    points_per_chunk: int,
    x_step: float = 1.0,
    x_label: str = "points",
    runs: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    results_name: str = "results.json",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    progress: Progress | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    place: Callable[[Any], Any] | None = None,
) -> RunResult:
  """Runs ``chunk_fn`` ``num_chunks`` times, writing results after every chunk.

  Args:
    chunk_fn: ``chunk(carry, chunk_index, *args) -> (carry, metrics)``, pure
      and jittable; ``chunk_index`` is an int32 scalar (traced: one compilation
      serves every chunk). ``metrics`` is ``{label: {name: array(..., P)}}``
      with ``P = points_per_chunk`` on the last axis.
    init_carry: the carry before chunk 0 (also the template for restoring).
    args: further arguments of every chunk that are not carried: e.g. a data
      set on the device, passed to the compiled program as an argument (one
      buffer, never copied, never checkpointed) rather than baked into it as
      a constant.
    num_chunks: how many chunks make the whole run.
    config: JSON-serialisable settings that determine the results; written to
      the results file and checkpoints, compared on resume.
    experiment: the experiment's name.
    points_per_chunk: metric points each chunk adds.
    x_step: x distance between points (e.g. examples per bin); point ``i`` is
      at ``x = (i + 1) * x_step``.
    x_label: what x counts.
    runs: per-label description (method, hyperparameters) for the file.
    out_dir: where the results file (and ``timing.json``) go; None writes nothing.
    results_name: the results file's name in ``out_dir``.
    checkpoint_dir: where orbax checkpoints go; None disables them.
    checkpoint_every: save every this many chunks (and after the last one).
    resume: continue from the latest checkpoint in ``checkpoint_dir`` (a fresh
      run if there is none). Without it, an existing checkpoint is an error.
    progress: a `Progress` (None: a default one on stderr).
    on_chunk: called after every chunk (and its writes) with
      ``(chunks_done, results_dict)``.
    place: puts a carry where the chunks run (e.g. its seed axis sharded over
      devices); applied to the initial carry and to a restored one.

  Returns:
    A `RunResult`.

  Raises:
    KeyboardInterrupt: after rewriting the results file with status
      ``"interrupted"`` (it then holds every chunk finished before Ctrl-C).
    ConfigMismatchError: when resuming from a checkpoint of another config.
    CorruptCheckpointError: when the checkpoint to resume from cannot be read
      or its arrays fail their checksum (no fallback to an older one).
    FileExistsError: when ``checkpoint_dir`` has checkpoints and ``resume`` is False.
    OutputLockedError: another process runs on ``out_dir`` or
      ``checkpoint_dir`` (`output_lock`); raised before compiling.
    OutputWriteError: the results file or a checkpoint could not be written
      (full disk, read-only folder); the previous results file and
      checkpoints are unchanged and the message says where to resume from.
  """
  with contextlib.ExitStack() as locks:
    for directory in dict.fromkeys(d for d in (out_dir, checkpoint_dir) if d is not None):
      locks.enter_context(output_lock(directory))
    return _run_locked(
        chunk_fn, init_carry, args=args, num_chunks=num_chunks, config=config,
        experiment=experiment, points_per_chunk=points_per_chunk, x_step=x_step,
        x_label=x_label, runs=runs, out_dir=out_dir, results_name=results_name,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
        progress=progress, on_chunk=on_chunk, place=place)


def _run_locked(chunk_fn, init_carry, *, args, num_chunks, config, experiment, points_per_chunk,
                x_step, x_label, runs, out_dir, results_name, checkpoint_dir, checkpoint_every,
                resume, progress, on_chunk, place) -> RunResult:
  """`run`'s body, with its folders locked."""
  if num_chunks < 1:
    raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
  config = normalize_config(config)
  progress = progress or Progress(experiment, num_chunks)
  results_path = Path(out_dir) / results_name if out_dir is not None else None

  if resume and checkpoint_dir is None:
    raise ValueError("resume=True needs a checkpoint_dir")
  checkpoints, latest = None, None
  if checkpoint_dir is not None:
    # Checked before compiling, so a wrong --resume fails fast.
    checkpoints = Checkpoints(checkpoint_dir, experiment=experiment, config=config)
    latest = checkpoints.latest()
    if latest is not None and not resume:
      checkpoints.close()
      raise FileExistsError(
          f"{checkpoint_dir} already holds a checkpoint (chunk {latest}); pass resume=True "
          "(--resume) to continue it, or remove the directory to start afresh")
    if latest is not None:
      try:
        checkpoints.check(latest)
      except BaseException:
        checkpoints.close()
        raise

  place = place or (lambda carry: carry)
  try:
    init_carry = place(init_carry)
    compiled, compile_seconds = compile_chunk(chunk_fn, init_carry, args)
    _, metrics_shape = compiled.out_info
    _check_metrics(metrics_shape, points_per_chunk)

    carry, parts, start = init_carry, [], 0
    if latest is not None:
      start, carry, restored = checkpoints.restore(init_carry, metrics_shape)
      carry = place(carry)
      parts = [restored]
      progress.message(f"resumed from {checkpoint_dir} at chunk {start}/{num_chunks}")
  except BaseException:
    if checkpoints is not None:
      checkpoints.close()
    raise

  def write(status: str, chunks_done: int) -> dict:
    res = results_dict(
        experiment=experiment, config=config, status=status, chunks_done=chunks_done,
        num_chunks=num_chunks, points_per_chunk=points_per_chunk, x_step=x_step,
        x_label=x_label, runs=runs, metrics=_concat(parts) if parts else {})
    if results_path is not None:
      write_json_atomic(results_path, res)
    return res

  def stopped(e: OutputWriteError, chunks_done: int, written: int, saved: int | None):
    """``e`` with where the run stopped and where it can resume from."""
    where = (f"{results_path} holds chunk {written}" if results_path is not None
             else "no results file")
    if checkpoints is None:
      todo = "rerun (there are no checkpoints to resume from)"
    elif saved is None:
      todo = f"rerun (no checkpoint was saved yet in {checkpoint_dir})"
    else:
      todo = f"resume (--resume) from the checkpoint of chunk {saved} in {checkpoint_dir}"
    return OutputWriteError(
        e.errno, f"{e.strerror or e}. The run stopped after chunk {chunks_done}/{num_chunks}; "
                 f"{where}. Free space or fix the folder's permissions, then {todo}.")

  chunk_seconds: list[float] = []
  chunks_done, written, saved = start, start, latest
  try:
    results = write("complete" if start == num_chunks else "running", start)
  except OutputWriteError as e:
    if checkpoints is not None:
      checkpoints.close()
    raise stopped(e, start, start, saved) from e
  try:
    for index in range(start, num_chunks):
      tic = time.perf_counter()
      new_carry, metrics = compiled(carry, jnp.asarray(index, jnp.int32), *args)
      metrics = jax.device_get(metrics)  # The one host sync per chunk.
      jax.block_until_ready(new_carry)
      chunk_seconds.append(time.perf_counter() - tic)
      carry = new_carry
      parts = [_concat(parts + [metrics])]
      chunks_done = index + 1
      try:
        results = write("complete" if chunks_done == num_chunks else "running", chunks_done)
        written = chunks_done
        if checkpoints is not None and (
            chunks_done % checkpoint_every == 0 or chunks_done == num_chunks):
          checkpoints.save(chunks_done, carry, parts[0])
          saved = chunks_done
      except OutputWriteError as e:
        raise stopped(e, chunks_done, written, saved) from e
      progress.update(chunks_done, chunk_seconds)
      if on_chunk is not None:
        on_chunk(chunks_done, results)
  except KeyboardInterrupt:
    # Count the chunks from the metrics actually held (Ctrl-C may land between
    # the two assignments above).
    chunks_done = _points(parts) // points_per_chunk
    results = write("interrupted", chunks_done)
    where = f"; partial results in {results_path}" if results_path else ""
    progress.message(f"interrupted after chunk {chunks_done}/{num_chunks}{where}")
    raise
  finally:
    if checkpoints is not None:
      checkpoints.close()
  if results_path is not None:
    write_json_atomic(results_path.with_name("timing.json"), {
        "compile_seconds": compile_seconds, "chunk_seconds": chunk_seconds,
        "resumed_from": start, "chunks_done": chunks_done})
  return RunResult(
      carry=carry, metrics=parts[0] if parts else {}, results=results,
      chunks_done=chunks_done, status="complete", compile_seconds=compile_seconds,
      chunk_seconds=chunk_seconds, resumed_from=start)


# ---------------------------------------------------------------------------
# Pieces every experiment uses: configs, seeds, batching over seeds.
# ---------------------------------------------------------------------------


def merge_config(base: Mapping[str, Any], over: Mapping[str, Any], *,
                 replace: tuple[str, ...] = (), path: str = "") -> dict:
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


def build_config(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                 kwargs: Mapping[str, Any], *, validate: Callable[[dict], None],
                 replace: tuple[str, ...] = ()) -> dict:
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
    require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            f"{k} must be a positive int, got {v!r}")


def require_methods(methods: Any, known: tuple[str, ...]) -> None:
  """Raises ValueError unless ``methods`` is a non-empty list of ``known`` names without repeats."""
  require(isinstance(methods, list) and len(methods) > 0 and len(set(methods)) == len(methods),
          f"methods must be a non-empty list without repeats, got {methods}")
  for m in methods:
    require(m in known, f"unknown method {m!r}; expected some of {known}")


def seed_key(config: Mapping[str, Any], index: int | jax.Array) -> jax.Array:
  """The key of seed ``index``: ``fold_in(key(config["seed"]), index)``, so it does
  not depend on how many seeds are run."""
  return jax.random.fold_in(jax.random.key(config["seed"]), index)


def seed_keys(config: Mapping[str, Any]) -> jax.Array:
  """The keys of seeds ``0 .. config["seeds"] - 1``."""
  return jax.vmap(lambda i: seed_key(config, i))(jnp.arange(config["seeds"]))


def map_leading(fn: Callable, n: int, in_axes: tuple) -> Callable:
  """``jax.vmap(fn, in_axes)`` over a leading axis of size ``n``, except for
  ``n == 1``: squeeze, call, expand.

  A size-1 vmap would turn every ``lax.cond`` whose predicate depends on the
  batched state (e.g. CBP's "replace anything this step?") into a ``select``
  that runs both branches every step; calling ``fn`` unbatched keeps it a branch.
  ``in_axes`` entries are 0 (batched) or None (shared).
  """
  if n != 1:
    return jax.vmap(fn, in_axes=in_axes)

  def call(*args):
    args = [jax.tree.map(lambda a: a[0], x) if ax == 0 else x for x, ax in zip(args, in_axes)]
    return jax.tree.map(lambda a: a[None], fn(*args))

  return call


def batch_over_seeds(init: Callable, chunk: Callable, seeds: int, *, seed_axis: str = "vmap",
                     num_args: int = 0, squeeze_single: bool = True) -> tuple[Callable, Callable]:
  """Jitted ``init(keys)`` and ``chunk(carry, index, *args)`` over all seeds, from the
  per-seed ``init(key)`` and ``chunk(carry, index, *args)``.

  Args:
    init, chunk: the per-seed functions (``chunk`` takes ``num_args`` further
      arguments shared by all seeds, e.g. the data set).
    seeds: how many seeds (the carry's leading axis).
    seed_axis: ``"vmap"`` (one batched program) or ``"map"`` (``lax.map``: seeds
      one after another inside the program, each ``lax.cond`` stays a branch).
    squeeze_single: run a single seed unbatched (`map_leading`); False vmaps it.

  Returns:
    ``(init, chunk)``, jitted; metrics leaves get the seed axis first.
  """
  if seed_axis not in ("vmap", "map"):
    raise ValueError(f"seed_axis must be 'vmap' or 'map', got {seed_axis!r}")
  in_axes = (0, None) + (None,) * num_args
  if seed_axis == "map" and seeds > 1:
    def batched_chunk(carry, index, *args):
      return jax.lax.map(lambda c: chunk(c, index, *args), carry)
  elif squeeze_single:
    batched_chunk = map_leading(chunk, seeds, in_axes)
  else:
    batched_chunk = jax.vmap(chunk, in_axes=in_axes)
  batched_init = map_leading(init, seeds, (0,)) if squeeze_single else jax.vmap(init)
  return jax.jit(batched_init), jax.jit(batched_chunk)


def cache_per_config(*, ignore: tuple[str, ...] = (), maxsize: int = 8):
  """Decorator memoising ``build(config)`` by the config's JSON form.

  Running a config again in one process (a resume, a test, a benchmark) then
  reuses what ``build`` made, e.g. jitted functions and their compilations.
  ``ignore`` names top-level entries that do not change what ``build`` makes
  (e.g. the base seed, which only enters through the keys in the carry).
  """
  def decorator(build: Callable[[dict], Any]) -> Callable[[Mapping[str, Any]], Any]:
    cache: collections.OrderedDict[str, Any] = collections.OrderedDict()

    @functools.wraps(build)
    def cached(config: Mapping[str, Any]) -> Any:
      config = normalize_config(config)
      key = json.dumps({k: v for k, v in config.items() if k not in ignore}, sort_keys=True)
      if key in cache:
        cache.move_to_end(key)
      else:
        cache[key] = build(config)
        while len(cache) > maxsize:
          cache.popitem(last=False)
      return cache[key]

    cached.cache_clear = cache.clear
    return cached

  return decorator


def batched_per_config(make_chunked: Callable, *, make_config: Callable[..., dict],
                       num_args: int = 0, squeeze_single: bool = True,
                       ignore: tuple[str, ...] = ()) -> Callable[[Mapping[str, Any]], tuple]:
  """An experiment's ``make_batched(config) -> (init(keys), chunk(carry, index, *args))``.

  ``make_chunked(config)`` gives the per-seed ``init`` and ``chunk``;
  `batch_over_seeds` batches them over ``config["seeds"]`` along
  ``config.get("seed_axis", "vmap")``. The config is completed and validated by
  ``make_config`` first, and the pair is cached per config (`cache_per_config`,
  ``ignore`` as there): running a config again in one process (a resume, a
  test) does not compile again.
  """
  @cache_per_config(ignore=ignore)
  def batched(config: dict) -> tuple:
    init, chunk = make_chunked(config)
    return batch_over_seeds(init, chunk, config["seeds"],
                            seed_axis=config.get("seed_axis", "vmap"), num_args=num_args,
                            squeeze_single=squeeze_single)

  def make_batched(config: Mapping[str, Any]) -> tuple:
    return batched(make_config(config))

  make_batched.cache_clear = batched.cache_clear
  return make_batched


def seed_placement(seeds: int) -> Callable[[Any], Any]:
  """Lays a carry's leading (seed) axis over all devices (`cbp_jax.sharding`).

  Each device then runs ``seeds / devices`` seeds of the same compiled chunk,
  with no communication; the results equal the single-device run's. On a pod
  the same holds after ``jax.distributed.initialize()`` (see
  `cbp_jax.sharding`).
  """
  mesh = sharding.make_mesh("seeds")
  if seeds % mesh.size:
    raise ValueError(
        f"shard_seeds: {seeds} seeds cannot be split evenly over {mesh.size} devices; "
        f"use a multiple of {mesh.size} seeds")
  return lambda carry: sharding.shard_leading_axis(carry, mesh)


def run_seeds(make_batched: Callable[[Mapping[str, Any]], tuple], config: Mapping[str, Any], *,
              experiment: str, name: str, num_chunks: int, points_per_chunk: int,
              x_step: float, x_label: str, runs: Mapping[str, Any], args: tuple = (),
              work_per_run_chunk: float | None = None, work_label: str = "run-steps",
              progress: bool = True, shard_seeds: bool = False, **run_kwargs: Any) -> RunResult:
  """Runs every seed of an experiment with `run`.

  The carry is ``init(seed_keys(config))`` with ``init, chunk =
  make_batched(config)`` (e.g. from `batched_per_config`); the progress line
  (prefix ``name``, on stderr unless ``progress`` is False) reports
  ``work_per_run_chunk`` (the work of one run label and seed in one chunk)
  times seeds times runs per second. ``shard_seeds`` lays the seeds over all
  devices (`seed_placement`; the results do not change, so it is not part of
  the config). ``args`` and ``run_kwargs`` (``out_dir``, ``checkpoint_dir``,
  ``checkpoint_every``, ``resume``, ``on_chunk``, ...) go to `run` as they are.
  """
  init, chunk = make_batched(config)
  place = seed_placement(config["seeds"]) if shard_seeds else None
  keys = seed_keys(config)
  carry = init(keys if place is None else place(keys))
  work = None if work_per_run_chunk is None else work_per_run_chunk * config["seeds"] * len(runs)
  prog = Progress(name, num_chunks, work_per_chunk=work, work_label=work_label,
                  stream="stderr" if progress else None)
  return run(chunk, carry, args=args, num_chunks=num_chunks, config=config, experiment=experiment,
             points_per_chunk=points_per_chunk, x_step=x_step, x_label=x_label, runs=runs,
             progress=prog, place=place, **run_kwargs)


def scan_points(point: Callable, points_per_chunk: int) -> Callable:
  """A chunk function ``chunk(carry, chunk_index, *args) -> (carry, metrics)`` that
  scans ``point(carry, index, *args) -> (carry, point_metrics)`` over the chunk's
  points ``chunk_index * points_per_chunk + [0, points_per_chunk)``.

  Points get their index in the whole run (a task, a bin), from which they
  derive their own keys, so any chunk computes what the uninterrupted run does.
  """
  def chunk(carry, chunk_index, *args):
    first = chunk_index.astype(jnp.int32) * points_per_chunk
    return jax.lax.scan(lambda c, i: point(c, i, *args), carry,
                        first + jnp.arange(points_per_chunk, dtype=jnp.int32))

  return chunk


def whole_run(init: Callable, chunk: Callable, num_chunks: int, *args: Any) -> Callable:
  """The pure per-seed ``train(key) -> metrics`` of a chunked experiment (purejaxrl style).

  ``train`` scans ``chunk(carry, index, *args)`` over all ``num_chunks`` chunks
  from ``init(key)`` and returns the metrics with the points of all chunks on
  one axis. ``args`` are closed over: constants of the program.
  """
  def train(key):
    _, metrics = jax.lax.scan(lambda c, i: chunk(c, i, *args), init(key),
                              jnp.arange(num_chunks, dtype=jnp.int32))
    return jax.tree.map(lambda a: a.reshape(-1), metrics)

  return train


# ---------------------------------------------------------------------------
# Command lines.
# ---------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
  """The flags every experiment's CLI has: ``--out``, ``--checkpoint-every``,
  ``--resume``, ``--fresh``, ``--no-plot``, ``--shard-seeds`` (see `run_from_cli`)."""
  parser.add_argument("--out", default=out, help=f"output directory (default {out})")
  parser.add_argument("--checkpoint-every", type=int, default=1,
                      help="save an orbax checkpoint in OUT/checkpoints every this many chunks "
                           "(0: never)")
  parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
  parser.add_argument("--fresh", action="store_true", help="delete OUT/checkpoints first")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--shard-seeds", action="store_true",
                      help="lay the seeds over all devices (jax.sharding; seeds must be a "
                           "multiple of the device count); the results do not change")


def add_presets(parser: argparse.ArgumentParser, **helps: str) -> None:
  """Mutually exclusive preset flags, ``--name`` for each ``name=help``; other
  flags still override a preset's entries (see `preset_overrides`)."""
  group = parser.add_mutually_exclusive_group()
  for name, text in helps.items():
    group.add_argument(f"--{name}", action="store_true",
                       help=f"{text} (other flags still override)")


def preset_overrides(args: argparse.Namespace, defaults: Mapping[str, Any],
                     **presets: Mapping[str, Any]) -> dict:
  """The config of the preset flag given (`add_presets`), merged over
  ``defaults``; ``{}`` when none is."""
  for name, over in presets.items():
    if getattr(args, name):
      return merge_config(defaults, over)
  return {}


def parse_number(text: str) -> int | float:
  """``"3"`` -> 3, ``"3.0"``, ``"1e3"`` -> float."""
  v = float(text)
  return int(v) if v.is_integer() and "e" not in text.lower() and "." not in text else v


def parse_floats(text: str) -> list[float]:
  """``"0.1,0.03"`` -> ``[0.1, 0.03]`` (an argparse ``type``)."""
  return [float(v) for v in text.split(",") if v]


def parse_ints(text: str) -> list[int]:
  """``"32,128"`` -> ``[32, 128]`` (an argparse ``type``)."""
  return [int(v) for v in text.split(",") if v]


def split_names(text: str) -> list[str]:
  """``"bp, cbp"`` -> ``["bp", "cbp"]``."""
  return [m.strip() for m in text.split(",") if m.strip()]


def overrides_from_args(args: argparse.Namespace, keys: tuple[str, ...] = (),
                        **renamed: str) -> dict:
  """Config entries given on the command line: ``keys`` (the flag's dest is the
  entry's name) and ``renamed`` (entry = dest), those not None; ``--methods``
  split at commas."""
  over = {k: getattr(args, k) for k in keys}
  over.update({k: getattr(args, dest) for k, dest in renamed.items()})
  over = {k: v for k, v in over.items() if v is not None}
  if getattr(args, "methods", None):
    over["methods"] = split_names(args.methods)
  return over


def split_assignment(text: str, flag: str, methods: tuple[str, ...]) -> tuple[str, str, str]:
  """``"cbp.maturity_threshold=100"`` -> ``("cbp", "maturity_threshold", "100")``."""
  try:
    lhs, rhs = text.split("=", 1)
    method, name = lhs.split(".", 1)
  except ValueError:
    raise ValueError(f"{flag} {text!r}: expected METHOD.HPARAM=VALUE") from None
  if method not in methods:
    raise ValueError(f"{flag} {text!r}: unknown method {method!r}")
  return method, name, rhs


def parse_hparam_sets(texts: list[str], defaults: Mapping[str, Mapping[str, Any]],
                      flag: str = "--set") -> dict[str, dict]:
  """``--set METHOD.HPARAM=VALUE`` flags as ``{method: {hparam: value}}`` (every method
  of ``defaults`` present), values typed like the defaults' (bool, str or number)."""
  out: dict[str, dict] = {m: {} for m in defaults}
  for text in texts:
    method, name, value = split_assignment(text, flag, tuple(defaults))
    if name not in defaults[method]:
      raise ValueError(f"{flag} {text!r}: {method} has no hyperparameter {name!r} "
                       f"({sorted(defaults[method])})")
    default = defaults[method][name]
    if isinstance(default, bool):
      out[method][name] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, str):
      out[method][name] = value
    else:
      out[method][name] = parse_number(value)
  return out


def cli_error(e: BaseException) -> int:
  """Prints ``error: ...`` on stderr; returns the exit status 2."""
  print(f"error: {e}", file=sys.stderr)
  return 2


def run_from_cli(args: argparse.Namespace, run_experiment: Callable[..., RunResult], *,
                 summary: Callable[[dict], str], plots: tuple[str, ...] = ()) -> int:
  """Runs an experiment from its CLI; returns the exit status.

  Calls ``run_experiment(out_dir=, checkpoint_dir=, checkpoint_every=, resume=,
  plot=, shard_seeds=)`` as the `add_run_arguments` flags say, then prints ``summary(results)``
  and a line with the compile and run times and where the results file and the
  ``plots`` (file names in ``--out``) are.

  Returns:
    0; 130 after Ctrl-C (partial results written); 2 when the checkpoint
    directory is in the way, a checkpoint is of another config or corrupt,
    another run holds ``--out`` or the results or a checkpoint cannot be
    written (the message says why and what to do).
  """
  out = Path(args.out)
  ckpt = out / "checkpoints" if args.checkpoint_every > 0 else None
  tic = time.perf_counter()
  try:
    with output_lock(out):  # Taken before --fresh deletes anything; `run` re-enters it.
      if args.fresh and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
      result = run_experiment(out_dir=out, checkpoint_dir=ckpt,
                              checkpoint_every=max(1, args.checkpoint_every), resume=args.resume,
                              plot=not args.no_plot, shard_seeds=args.shard_seeds)
  except KeyboardInterrupt:
    print(f"interrupted: partial results in {out}/results.json"
          + (f"; continue with --resume (checkpoints in {ckpt})" if ckpt else ""), file=sys.stderr)
    return 130
  except FileExistsError as e:
    return cli_error(f"{e}; or pass --fresh to discard it")
  except (ConfigMismatchError, CorruptCheckpointError, OutputLockedError, OutputWriteError) as e:
    return cli_error(e)
  print(summary(result.results))
  print(format_statistics(result.results))
  line = (f"compile {result.compile_seconds:.1f} s, run {sum(result.chunk_seconds):.1f} s, "
          f"total {time.perf_counter() - tic:.1f} s; results {out}/results.json")
  if plots and not args.no_plot:
    line += (", plot " if len(plots) == 1 else ", plots ") + ", ".join(f"{out}/{p}" for p in plots)
  print(line)
  return 0


# ---------------------------------------------------------------------------
# Statistics over seeds: interquartile mean, stratified-bootstrap confidence
# intervals (as rliable, Agarwal et al., NeurIPS 2021), area under the curve.
# ---------------------------------------------------------------------------

BOOTSTRAP_REPS = 2000
CONFIDENCE = 0.95
# A fixed seed: the intervals are a deterministic function of the results, so
# a resumed run's file equals an uninterrupted one's.
BOOTSTRAP_SEED = 0
BAND_LABEL = "IQM, 95% bootstrap CI"
# What each experiment is judged by (the summary line's metric), in order of preference.
MAIN_METRICS = ("accuracy", "error", "episode_return")


def interquartile_mean(values: np.ndarray, axis: int | tuple[int, ...] = 0) -> np.ndarray:
  """The mean of the middle half of ``values`` along ``axis``, ignoring NaN.

  Like ``scipy.stats.trim_mean(values, 0.25)`` (rliable's IQM): of the ``n``
  finite values, the ``floor(n / 4)`` smallest and largest are dropped. With
  fewer than 4 values it is the plain mean; with none it is NaN.

  Args:
    values: an array; ``axis`` may be a tuple (those axes are pooled).

  Returns:
    ``values`` without ``axis``, float64.
  """
  values = np.asarray(values, np.float64)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(a % values.ndim for a in axes)
  rest = [a for a in range(values.ndim) if a not in axes]
  # Pooled values on the last axis, contiguous: sorting along it is the cost.
  pooled = np.ascontiguousarray(values.transpose(tuple(rest) + axes)).reshape(
      tuple(values.shape[a] for a in rest) + (-1,))
  ordered = np.sort(pooled, axis=-1)  # NaN last.
  finite = np.sum(np.isfinite(pooled), axis=-1, keepdims=True)
  cut = finite // 4
  position = np.arange(pooled.shape[-1])
  keep = (position >= cut) & (position < finite - cut)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.sum(np.where(keep, ordered, 0.0), axis=-1) / np.sum(keep, axis=-1)


def stratified_bootstrap_ci(
    scores: np.ndarray, statistic: Callable[..., np.ndarray] | None = None, *,
    reps: int = BOOTSTRAP_REPS, confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A statistic of runs and its percentile confidence interval by stratified bootstrap.

  ``scores[run, task, ...]``: within each task (stratum) the runs are
  resampled with replacement, independently of the other tasks, ``reps``
  times; the interval holds the middle ``confidence`` of the statistic over
  the resamples (rliable's ``StratifiedBootstrap`` with the percentile
  method). Replicate ``r`` draws, task by task, ``runs`` indices with
  ``numpy.random.default_rng(seed).integers(0, runs, (reps, tasks, runs))``;
  the trailing axes (e.g. the points of a curve) share a run's resampling, so
  a curve is resampled whole.

  Args:
    scores: ``(runs, tasks, ...)``; a 1-D array is one task's runs.
    statistic: ``statistic(array, axis=(i, j))`` pools the runs and tasks
      axes ``i, j`` of an array (as ``np.mean`` does); default
      `interquartile_mean`.
    reps: bootstrap replicates.
    confidence: in (0, 1).
    seed: the resampling's seed.

  Returns:
    ``(estimate, low, high)``, each of shape ``scores.shape[2:]``.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim == 1:
    scores = scores[:, None]
  if scores.ndim < 2 or scores.shape[0] < 1:
    raise ValueError(f"scores must have shape (runs, tasks, ...) with runs >= 1, got {scores.shape}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps!r}")
  statistic = statistic or interquartile_mean
  runs, tasks = scores.shape[:2]
  idx = np.random.default_rng(seed).integers(0, runs, size=(reps, tasks, runs))
  # resampled[r, i, t] = scores[idx[r, t, i], t]
  resampled = scores[idx.transpose(0, 2, 1), np.arange(tasks)[None, None, :]]
  replicates = np.asarray(statistic(resampled, axis=(1, 2)))
  tail = 100 * (1 - confidence) / 2
  with np.errstate(invalid="ignore"):
    low, high = np.nanpercentile(replicates, [tail, 100 - tail], axis=0) if np.isfinite(
        replicates).any() else (np.full(replicates.shape[1:], np.nan),) * 2
  return np.asarray(statistic(scores, axis=(0, 1))), np.asarray(low), np.asarray(high)


def area_under_curve(values: np.ndarray) -> np.ndarray:
  """Per run, the area under a metric's curve over equally spaced points,
  divided by the x range: the mean over points, ignoring NaN points.

  Args:
    values: ``(runs, points)``.

  Returns:
    ``(runs,)`` float64 (NaN for a run with no finite point).
  """
  values = np.asarray(values, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.nansum(values, axis=-1) / np.sum(np.isfinite(values), axis=-1)


def _interval(estimate, low, high) -> dict:
  return {"iqm": float(estimate), "ci_low": float(low), "ci_high": float(high)}


def run_statistics(metrics: Mapping[str, Mapping[str, Any]]) -> dict:
  """Summaries over seeds of every metric of every run label, as the results file holds them.

  For each ``metrics[label][name]`` of shape ``(seeds, points)``: ``"auc"``,
  the interquartile mean over seeds of `area_under_curve` with its
  stratified-bootstrap 95% interval, and ``"final"``, the same for the last
  point (`stratified_bootstrap_ci`, fixed seed: deterministic).

  Returns:
    ``{label: {name: {"auc": {"iqm", "ci_low", "ci_high"}, "final": {...}}}}``
    (empty for no points).
  """
  out: dict = {}
  for label, named in metrics.items():
    for name, values in named.items():
      values = np.asarray(values, np.float64)
      values = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
      if values.shape[-1] == 0:
        continue
      out.setdefault(label, {})[name] = {
          "auc": _interval(*stratified_bootstrap_ci(area_under_curve(values))),
          "final": _interval(*stratified_bootstrap_ci(values[:, -1])),
      }
  return out


def curve_with_ci(values: np.ndarray, reps: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per point of ``values (seeds, points)``, the interquartile mean over seeds
  and its 95% stratified-bootstrap interval (whole curves resampled), for a
  plot's band: ``(iqm, low, high)``. Fewer replicates than the file's
  summaries: a band need not be exact to the third digit, and a long run's
  curves are big."""
  values = np.asarray(values, np.float64)
  return stratified_bootstrap_ci(values[:, None, :], reps=reps)


def format_statistics(results: Mapping[str, Any], name: str | None = None) -> str:
  """One line per run label: IQM over seeds of the area under ``name``'s curve
  and of its last point, with 95% stratified-bootstrap intervals.

  ``name`` defaults to the main measure: the first of `MAIN_METRICS` the
  file has, else its first metric name. Reads
  ``results["statistics"]``, or computes it for a file written before it existed.
  """
  stats = results.get("statistics") or run_statistics(results.get("metrics", {}))
  if not stats:
    return ""
  present = [n for named in stats.values() for n in named]
  name = name or next((n for n in MAIN_METRICS if n in present), present[0])
  seeds = max((np.shape(v)[0] for named in results.get("metrics", {}).values()
               for v in named.values()), default=0)
  width = max(len(label) for label in stats)
  lines = [f"{name}: IQM over {seeds} seeds [95% stratified-bootstrap CI]"]

  def fmt(s):
    if s["iqm"] is None:
      return "n/a"
    return f"{s['iqm']:.4g} [{s['ci_low']:.4g}, {s['ci_high']:.4g}]"

  for label, named in stats.items():
    if name in named:
      lines.append(f"  {label:<{width}}  area under curve {fmt(named[name]['auc'])}, "
                   f"last point {fmt(named[name]['final'])}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------

METRIC_TITLES = {
    "error": "squared error (binned)",
    "accuracy": "accuracy",
    "dead_fraction": "dead units (fraction)",
    "effective_rank": "effective rank",
    "weight_magnitude": "mean |w|",
    "trainability": "trainability (fresh-task loss removed)",
    "hessian_top_eigenvalue": "top Hessian eigenvalue",
}


def mean_and_stderr(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard error over axis 0 (seeds), ignoring NaN seeds.

  The standard error is ``std(ddof=1) / sqrt(n)``; 0 with a single seed.
  """
  values = np.asarray(values, dtype=np.float64)
  n = np.sum(np.isfinite(values), axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = np.nanmean(values, axis=0) if values.size else values
    if values.shape[0] > 1:
      se = np.nanstd(values, axis=0, ddof=1) / np.sqrt(n)
    else:
      se = np.zeros_like(mean)
  return mean, np.where(np.isfinite(se), se, 0.0)


def plot_results(
    results: Mapping[str, Any] | str | os.PathLike,
    path: str | os.PathLike,
    *,
    metrics: tuple[str, ...] | None = None,
    labels: tuple[str, ...] | None = None,
    title: str | None = None,
    band: str = "iqm_ci",
) -> Path:
  """Plots each run label's curve over seeds with a shaded band; one panel per metric.

  The line is the interquartile mean over seeds and the band its 95%
  stratified-bootstrap interval (`curve_with_ci`, `BAND_LABEL`), or with
  ``band="mean_se"`` the mean and +- one standard error.

  Args:
    results: a results dict (as `run` writes or `load_results` reads) or a path.
    path: the PNG to write.
    metrics: metric names (panels) in order; default: every name present, with
      the `METRIC_TITLES` ones first. Labels lacking a metric or having only
      NaN values for it are left out of that panel.
    labels: run labels to draw (default: all, in file order).
    title: figure title (default: the experiment name and status).
    band: ``"iqm_ci"`` or ``"mean_se"``.

  Returns:
    The path written.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if band not in ("iqm_ci", "mean_se"):
    raise ValueError(f"band must be 'iqm_ci' or 'mean_se', got {band!r}")
  if not isinstance(results, Mapping):
    results = load_results(results)
  data = {k: {n: np.array(v, dtype=np.float64) for n, v in named.items()}
          for k, named in results["metrics"].items()}
  labels = tuple(labels or data)
  if metrics is None:
    present = {n for named in data.values() for n in named}
    metrics = tuple(n for n in METRIC_TITLES if n in present) + tuple(
        sorted(present - set(METRIC_TITLES)))
  x = np.asarray(results["x"], dtype=np.float64)
  panels = max(1, len(metrics))
  width = 4.0 * panels
  longest = max([len(l) for l in labels] + [1])
  ncol = max(1, min(len(labels), int(width / (0.6 + 0.075 * longest))))
  legend_rows = math.ceil(len(labels) / ncol)
  legend_height = 0.25 + 0.2 * legend_rows
  fig, axes = plt.subplots(1, panels, figsize=(width, 3.4 + legend_height), squeeze=False)
  cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
  colors = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
  shown: dict[str, Any] = {}
  for ax, name in zip(axes[0], metrics):
    for label in labels:
      values = data.get(label, {}).get(name)
      if values is None or values.size == 0 or not np.isfinite(values).any():
        continue
      values = values.reshape(-1, values.shape[-1])
      if band == "iqm_ci":
        center, low, high = curve_with_ci(values)
      else:
        center, se = mean_and_stderr(values)
        low, high = center - se, center + se
      xs = x[: center.shape[0]]
      line, = ax.plot(xs, center, color=colors[label], label=label, linewidth=1.3)
      ax.fill_between(xs, low, high, color=colors[label], alpha=0.25, linewidth=0)
      shown.setdefault(label, line)
    ax.set_title(METRIC_TITLES.get(name, name), fontsize=10)
    ax.set_xlabel(results.get("x_label", "x"))
    ax.grid(alpha=0.3)
  seeds = max((v.shape[0] for named in data.values() for v in named.values()), default=0)
  fig.suptitle(title or f"{results.get('experiment', '')} ({results.get('status', '')}, "
               f"{BAND_LABEL if band == 'iqm_ci' else 'mean +- s.e.'} over {seeds} seeds)",
               fontsize=10)
  fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
  if shown:
    fig.legend(list(shown.values()), list(shown), loc="lower center", ncol=ncol, fontsize=8,
               frameon=False)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
