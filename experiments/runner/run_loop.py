"""The run loop: a compiled chunk called from Python, with results, checkpoints and progress between chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from experiments.runner.checkpoints import Checkpoints
from experiments.runner.chunks import check_metrics, compile_chunk, concat_points, count_points
from experiments.runner.errors import OutputWriteError
from experiments.runner.locking import output_lock
from experiments.runner.progress import Progress
from experiments.runner.results_file import normalize_config, results_dict, write_json_atomic
from experiments.runner.seeds import seed_keys, seed_placement


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
      chunk_fn,
      init_carry,
      args=args,
      num_chunks=num_chunks,
      config=config,
      experiment=experiment,
      points_per_chunk=points_per_chunk,
      x_step=x_step,
      x_label=x_label,
      runs=runs,
      out_dir=out_dir,
      results_name=results_name,
      checkpoint_dir=checkpoint_dir,
      checkpoint_every=checkpoint_every,
      resume=resume,
      progress=progress,
      on_chunk=on_chunk,
      place=place,
    )


def _run_locked(
  chunk_fn,
  init_carry,
  *,
  args,
  num_chunks,
  config,
  experiment,
  points_per_chunk,
  x_step,
  x_label,
  runs,
  out_dir,
  results_name,
  checkpoint_dir,
  checkpoint_every,
  resume,
  progress,
  on_chunk,
  place,
) -> RunResult:
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
        "(--resume) to continue it, or remove the directory to start afresh"
      )
    if latest is not None:
      try:
        checkpoints.check(latest, init_carry)  # Also the carry's structure: before compiling.
      except BaseException:
        checkpoints.close()
        raise

  place = place or (lambda carry: carry)
  try:
    init_carry = place(init_carry)
    compiled, compile_seconds = compile_chunk(chunk_fn, init_carry, args)
    _, metrics_shape = compiled.out_info
    check_metrics(metrics_shape, points_per_chunk)

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
      experiment=experiment,
      config=config,
      status=status,
      chunks_done=chunks_done,
      num_chunks=num_chunks,
      points_per_chunk=points_per_chunk,
      x_step=x_step,
      x_label=x_label,
      runs=runs,
      metrics=concat_points(parts) if parts else {},
    )
    if results_path is not None:
      write_json_atomic(results_path, res)
    return res

  def stopped(e: OutputWriteError, chunks_done: int, written: int, saved: int | None):
    """``e`` with where the run stopped and where it can resume from."""
    where = f"{results_path} holds chunk {written}" if results_path is not None else "no results file"
    if checkpoints is None:
      todo = "rerun (there are no checkpoints to resume from)"
    elif saved is None:
      todo = f"rerun (no checkpoint was saved yet in {checkpoint_dir})"
    else:
      todo = f"resume (--resume) from the checkpoint of chunk {saved} in {checkpoint_dir}"
    return OutputWriteError(
      e.errno,
      f"{e.strerror or e}. The run stopped after chunk {chunks_done}/{num_chunks}; "
      f"{where}. Free space or fix the folder's permissions, then {todo}.",
    )

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
      parts = [concat_points(parts + [metrics])]
      chunks_done = index + 1
      try:
        results = write("complete" if chunks_done == num_chunks else "running", chunks_done)
        written = chunks_done
        if checkpoints is not None and (chunks_done % checkpoint_every == 0 or chunks_done == num_chunks):
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
    chunks_done = count_points(parts) // points_per_chunk
    results = write("interrupted", chunks_done)
    where = f"; partial results in {results_path}" if results_path else ""
    progress.message(f"interrupted after chunk {chunks_done}/{num_chunks}{where}")
    raise
  finally:
    if checkpoints is not None:
      checkpoints.close()
  if results_path is not None:
    write_json_atomic(
      results_path.with_name("timing.json"),
      {
        "compile_seconds": compile_seconds,
        "chunk_seconds": chunk_seconds,
        "resumed_from": start,
        "chunks_done": chunks_done,
      },
    )
  return RunResult(
    carry=carry,
    metrics=parts[0] if parts else {},
    results=results,
    chunks_done=chunks_done,
    status="complete",
    compile_seconds=compile_seconds,
    chunk_seconds=chunk_seconds,
    resumed_from=start,
  )


def run_seeds(
  make_batched: Callable[[Mapping[str, Any]], tuple],
  config: Mapping[str, Any],
  *,
  experiment: str,
  name: str,
  num_chunks: int,
  points_per_chunk: int,
  x_step: float,
  x_label: str,
  runs: Mapping[str, Any],
  args: tuple = (),
  work_per_run_chunk: float | None = None,
  work_label: str = "run-steps",
  progress: bool = True,
  shard_seeds: bool = False,
  **run_kwargs: Any,
) -> RunResult:
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
  prog = Progress(
    name, num_chunks, work_per_chunk=work, work_label=work_label, stream="stderr" if progress else None
  )
  return run(
    chunk,
    carry,
    args=args,
    num_chunks=num_chunks,
    config=config,
    experiment=experiment,
    points_per_chunk=points_per_chunk,
    x_step=x_step,
    x_label=x_label,
    runs=runs,
    progress=prog,
    place=place,
    **run_kwargs,
  )
