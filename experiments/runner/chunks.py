"""A chunk: its points scanned in one program, its metrics checked and appended, its compilation and timing.

A chunk is ``chunk(carry, chunk_index, *args) -> (carry, metrics)`` with
``metrics = {label: {name: array(..., points_per_chunk)}}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.runner.seeds import seed_keys


def check_metrics(metrics: Any, points_per_chunk: int) -> None:
  """Raises ValueError unless ``metrics`` is ``{label: {name: array(..., points_per_chunk)}}``."""
  if not isinstance(metrics, Mapping):
    raise ValueError(f"chunk must return metrics as {{label: {{name: array}}}}, got {type(metrics).__name__}")
  for label, named in metrics.items():
    if not isinstance(named, Mapping):
      raise ValueError(f"metrics[{label!r}] must be a dict of arrays, got {type(named).__name__}")
    for name, leaf in named.items():
      shape = getattr(leaf, "shape", None)
      if shape is None or len(shape) < 1 or shape[-1] != points_per_chunk:
        raise ValueError(
          f"metrics[{label!r}][{name!r}] has shape {shape}; the last axis must be the "
          f"chunk's {points_per_chunk} points"
        )


def count_points(parts: list) -> int:
  """Points held in ``parts[0]`` (the metrics so far, concatenated): its leaves' last axis."""
  leaves = jax.tree.leaves(parts[0]) if parts else []
  return int(np.shape(leaves[0])[-1]) if leaves else 0


def concat_points(parts: list) -> dict:
  """The metrics trees of ``parts`` joined along their last (points) axis."""
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=-1), *parts)


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


def time_chunks(
  make_batched: Callable[[Mapping[str, Any]], tuple], config: Mapping[str, Any], *, chunks: int = 2
) -> tuple[float, float]:
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


def scan_points(point: Callable, points_per_chunk: int) -> Callable:
  """A chunk function ``chunk(carry, chunk_index, *args) -> (carry, metrics)`` that
  scans ``point(carry, index, *args) -> (carry, point_metrics)`` over the chunk's
  points ``chunk_index * points_per_chunk + [0, points_per_chunk)``.

  Points get their index in the whole run (a task, a bin), from which they
  derive their own keys, so any chunk computes what the uninterrupted run does.
  """

  def chunk(carry, chunk_index, *args):
    first = chunk_index.astype(jnp.int32) * points_per_chunk
    return jax.lax.scan(
      lambda c, i: point(c, i, *args), carry, first + jnp.arange(points_per_chunk, dtype=jnp.int32)
    )

  return chunk


def whole_run(init: Callable, chunk: Callable, num_chunks: int, *args: Any) -> Callable:
  """The pure per-seed ``train(key) -> metrics`` of a chunked experiment (purejaxrl style).

  ``train`` scans ``chunk(carry, index, *args)`` over all ``num_chunks`` chunks
  from ``init(key)`` and returns the metrics with the points of all chunks on
  one axis. ``args`` are closed over: constants of the program.
  """

  def train(key):
    _, metrics = jax.lax.scan(
      lambda c, i: chunk(c, i, *args), init(key), jnp.arange(num_chunks, dtype=jnp.int32)
    )
    return jax.tree.map(lambda a: a.reshape(-1), metrics)

  return train
