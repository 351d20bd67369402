"""The results file: its schema, JSON conversion, atomic writes and reading it back.

The schema (``SCHEMA``) is described in `experiments.runner`'s docstring.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.runner.errors import OutputWriteError
from experiments.runner.statistics import run_statistics

SCHEMA = "cbp_jax.experiments.results/1"
STATUSES = ("running", "complete", "interrupted")


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
        view = view[os.write(fd, view) :]
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise OutputWriteError(
      e.errno, f"cannot write {path}: {e.strerror or e}; the previous {path.name} (if any) is unchanged"
    ) from e
  _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
  """Makes a rename in ``directory`` durable; best effort (not every file system allows it)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


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


def results_dict(
  *,
  experiment: str,
  config: Mapping[str, Any],
  status: str,
  chunks_done: int,
  num_chunks: int,
  points_per_chunk: int,
  x_step: float,
  x_label: str,
  runs: Mapping[str, Any] | None,
  metrics: Mapping[str, Any] | None,
) -> dict:
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
