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

One module per concern; every name below is also importable from here, as
``from experiments import runner; runner.run(...)``:

* `errors`: the errors a run raises (config mismatch, incompatible or
  corrupt checkpoint, a failed write, a folder locked by another run).
* `results_file`: the schema, JSON conversion, atomic writes, `load_results`.
* `locking`: `output_lock`, one run at a time per folder.
* `chunks`: `scan_points`, `whole_run`, `compile_chunk`, `time_chunks`, and
  checking and appending a chunk's metrics.
* `checkpoints`: `Checkpoints` (orbax, verified on restore).
* `progress`: `Progress`, the line printed after every chunk.
* `run_loop`: `run`, `run_seeds`, `RunResult`.
* `configs`: `merge_config`, `build_config`, `require*`.
* `seeds`: `seed_keys`, `batch_over_seeds`, `batched_per_config`, `seed_placement`.
* `cli`: `add_run_arguments`, the parsing helpers, `run_from_cli`.
* `statistics`: IQM, stratified-bootstrap intervals, `run_statistics`.
* `plots`: `plot_results`.

Checkpoints (orbax, one directory per saved chunk boundary) hold the carry
(PRNG key arrays stored as their key data), the metrics so far, the chunk
index, the config, the checkpoint format (`checkpoints.FORMAT`), every carry
leaf's key path, and the dtype, shape and a SHA-256 checksum of every saved
array. Resuming with a different config raises `ConfigMismatchError` naming
every differing entry; a checkpoint written by another version of the code (a
format this code does not read, a config of another schema, a carry of
another structure, leaf paths, dtypes or shapes) raises
`IncompatibleCheckpointError` before anything is compiled, naming the step
directory and what differs and saying to start afresh (``--fresh``); a
checkpoint orbax cannot read (truncated, garbled or missing files) or whose
arrays do not match their checksum raises `CorruptCheckpointError` naming the
step directory and what to do. None falls back silently to an older
checkpoint.

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

# Re-exported: the experiments and their tests use these as ``runner.X``.
from experiments.runner.checkpoints import Checkpoints, checksum
from experiments.runner.chunks import compile_chunk, scan_points, time_chunks, whole_run
from experiments.runner.cli import (
  add_presets,
  add_run_arguments,
  cli_error,
  overrides_from_args,
  parse_floats,
  parse_hparam_sets,
  parse_ints,
  parse_number,
  preset_overrides,
  run_from_cli,
  split_assignment,
  split_names,
)
from experiments.runner.configs import (
  build_config,
  merge_config,
  require,
  require_methods,
  require_positive_ints,
)
from experiments.runner.errors import (
  ConfigMismatchError,
  CorruptCheckpointError,
  IncompatibleCheckpointError,
  OutputLockedError,
  OutputWriteError,
)
from experiments.runner.locking import LOCK_NAME, output_lock
from experiments.runner.plots import METRIC_TITLES, mean_and_stderr, plot_results
from experiments.runner.progress import Progress
from experiments.runner.results_file import (
  SCHEMA,
  STATUSES,
  load_results,
  normalize_config,
  results_dict,
  write_json_atomic,
)
from experiments.runner.run_loop import RunResult, run, run_seeds
from experiments.runner.seeds import (
  batch_over_seeds,
  batched_per_config,
  cache_per_config,
  map_leading,
  seed_key,
  seed_keys,
  seed_placement,
)
from experiments.runner.statistics import (
  BAND_LABEL,
  BOOTSTRAP_REPS,
  BOOTSTRAP_SEED,
  CONFIDENCE,
  MAIN_METRICS,
  area_under_curve,
  curve_with_ci,
  format_statistics,
  interquartile_mean,
  run_statistics,
  stratified_bootstrap_ci,
)

__all__ = [
  "add_presets",
  "add_run_arguments",
  "area_under_curve",
  "BAND_LABEL",
  "batch_over_seeds",
  "batched_per_config",
  "BOOTSTRAP_REPS",
  "BOOTSTRAP_SEED",
  "build_config",
  "cache_per_config",
  "Checkpoints",
  "checksum",
  "cli_error",
  "compile_chunk",
  "CONFIDENCE",
  "ConfigMismatchError",
  "CorruptCheckpointError",
  "curve_with_ci",
  "format_statistics",
  "IncompatibleCheckpointError",
  "interquartile_mean",
  "load_results",
  "LOCK_NAME",
  "MAIN_METRICS",
  "map_leading",
  "mean_and_stderr",
  "merge_config",
  "METRIC_TITLES",
  "normalize_config",
  "output_lock",
  "OutputLockedError",
  "OutputWriteError",
  "overrides_from_args",
  "parse_floats",
  "parse_hparam_sets",
  "parse_ints",
  "parse_number",
  "plot_results",
  "preset_overrides",
  "Progress",
  "require",
  "require_methods",
  "require_positive_ints",
  "results_dict",
  "run",
  "run_from_cli",
  "run_seeds",
  "run_statistics",
  "RunResult",
  "scan_points",
  "SCHEMA",
  "seed_key",
  "seed_keys",
  "seed_placement",
  "split_assignment",
  "split_names",
  "STATUSES",
  "stratified_bootstrap_ci",
  "time_chunks",
  "whole_run",
  "write_json_atomic",
]
