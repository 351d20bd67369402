"""Command lines: the flags every experiment has, parsing helpers, and running from the CLI."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments.runner.configs import merge_config
from experiments.runner.errors import (
  ConfigMismatchError,
  CorruptCheckpointError,
  OutputLockedError,
  OutputWriteError,
)
from experiments.runner.locking import output_lock
from experiments.runner.run_loop import RunResult
from experiments.runner.statistics import format_statistics


def add_run_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
  """The flags every experiment's CLI has: ``--out``, ``--checkpoint-every``,
  ``--resume``, ``--fresh``, ``--no-plot``, ``--shard-seeds`` (see `run_from_cli`)."""
  parser.add_argument("--out", default=out, help=f"output directory (default {out})")
  parser.add_argument(
    "--checkpoint-every",
    type=int,
    default=1,
    help="save an orbax checkpoint in OUT/checkpoints every this many chunks (0: never)",
  )
  parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
  parser.add_argument("--fresh", action="store_true", help="delete OUT/checkpoints first")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument(
    "--shard-seeds",
    action="store_true",
    help="lay the seeds over all devices (jax.sharding; seeds must be a "
    "multiple of the device count); the results do not change",
  )


def add_presets(parser: argparse.ArgumentParser, **helps: str) -> None:
  """Mutually exclusive preset flags, ``--name`` for each ``name=help``; other
  flags still override a preset's entries (see `preset_overrides`)."""
  group = parser.add_mutually_exclusive_group()
  for name, text in helps.items():
    group.add_argument(f"--{name}", action="store_true", help=f"{text} (other flags still override)")


def preset_overrides(
  args: argparse.Namespace, defaults: Mapping[str, Any], **presets: Mapping[str, Any]
) -> dict:
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


def overrides_from_args(args: argparse.Namespace, keys: tuple[str, ...] = (), **renamed: str) -> dict:
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


def parse_hparam_sets(
  texts: list[str], defaults: Mapping[str, Mapping[str, Any]], flag: str = "--set"
) -> dict[str, dict]:
  """``--set METHOD.HPARAM=VALUE`` flags as ``{method: {hparam: value}}`` (every method
  of ``defaults`` present), values typed like the defaults' (bool, str or number)."""
  out: dict[str, dict] = {m: {} for m in defaults}
  for text in texts:
    method, name, value = split_assignment(text, flag, tuple(defaults))
    if name not in defaults[method]:
      raise ValueError(
        f"{flag} {text!r}: {method} has no hyperparameter {name!r} ({sorted(defaults[method])})"
      )
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


def run_from_cli(
  args: argparse.Namespace,
  run_experiment: Callable[..., RunResult],
  *,
  summary: Callable[[dict], str],
  plots: tuple[str, ...] = (),
) -> int:
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
      result = run_experiment(
        out_dir=out,
        checkpoint_dir=ckpt,
        checkpoint_every=max(1, args.checkpoint_every),
        resume=args.resume,
        plot=not args.no_plot,
        shard_seeds=args.shard_seeds,
      )
  except KeyboardInterrupt:
    print(
      f"interrupted: partial results in {out}/results.json"
      + (f"; continue with --resume (checkpoints in {ckpt})" if ckpt else ""),
      file=sys.stderr,
    )
    return 130
  except FileExistsError as e:
    return cli_error(f"{e}; or pass --fresh to discard it")
  except (ConfigMismatchError, CorruptCheckpointError, OutputLockedError, OutputWriteError) as e:
    return cli_error(e)
  print(summary(result.results))
  print(format_statistics(result.results))
  line = (
    f"compile {result.compile_seconds:.1f} s, run {sum(result.chunk_seconds):.1f} s, "
    f"total {time.perf_counter() - tic:.1f} s; results {out}/results.json"
  )
  if plots and not args.no_plot:
    line += (", plot " if len(plots) == 1 else ", plots ") + ", ".join(f"{out}/{p}" for p in plots)
  print(line)
  return 0
