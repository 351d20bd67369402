"""Seeds: their keys, and an experiment's per-seed ``init`` and ``chunk`` batched over them."""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cbp_jax import sharding
from experiments.runner.results_file import normalize_config


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


def batch_over_seeds(
  init: Callable,
  chunk: Callable,
  seeds: int,
  *,
  seed_axis: str = "vmap",
  num_args: int = 0,
  squeeze_single: bool = True,
) -> tuple[Callable, Callable]:
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


def batched_per_config(
  make_chunked: Callable,
  *,
  make_config: Callable[..., dict],
  num_args: int = 0,
  squeeze_single: bool = True,
  ignore: tuple[str, ...] = (),
) -> Callable[[Mapping[str, Any]], tuple]:
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
    return batch_over_seeds(
      init,
      chunk,
      config["seeds"],
      seed_axis=config.get("seed_axis", "vmap"),
      num_args=num_args,
      squeeze_single=squeeze_single,
    )

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
      f"use a multiple of {mesh.size} seeds"
    )
  return lambda carry: sharding.shard_leading_axis(carry, mesh)
