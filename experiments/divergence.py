"""Divergence rates of BP and CBP variants near the stability edge (issue: CBP vs BP stability).

For each experiment, variant and step size, runs every seed (vmapped, one
program per variant) through the experiment's own `run_experiment` and counts

* ``nonfinite``: seeds whose parameters became NaN/inf (the mean |w| probe
  recorded after some task is not finite), and
* ``blowup``: seeds whose mean |w| rose above ``blowup`` times its value
  after the first task at some task, or became non-finite (the blow-up
  that precedes NaNs, e.g. 0.02 -> 0.35 on the continual-ImageNet stand-in),

each as seeds diverged / seeds run, and the first task each seed crossed.

Variants: ``bp``; ``cbp`` (the experiment's CBP); ``cbp_noopt`` (CBP last in
the chain, so the momentum of replaced weights is kept; continual ImageNet
only, permuted MNIST's CBP already follows plain SGD); ``cbp_nobias``
(``next_bias_correction=False``).

Usage::

  python -m experiments.divergence --experiment continual_imagenet --step-sizes 0.05 \\
      --seeds 16 --tasks 20 --variants bp,cbp,cbp_noopt,cbp_nobias --out results/divergence_ci
  python -m experiments.divergence --experiment permuted_mnist --step-sizes 0.1,0.3 \\
      --seeds 16 --tasks 10 --out results/divergence_pm
  # Rates of any results file (e.g. BP and CBP vmapped together by the experiment's CLI):
  python -m experiments.divergence --experiment continual_imagenet --summarize results/x/results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from experiments import continual_imagenet, permuted_mnist, runner

VARIANTS = ("bp", "cbp", "cbp_noopt", "cbp_nobias")


def variant_config(experiment: str, variant: str, step_sizes: list[float], seeds: int, tasks: int) -> dict:
  """The experiment's reduced config for one variant (permuted MNIST: all step sizes at once)."""
  method = "bp" if variant == "bp" else "cbp"
  cbp = {}
  if variant == "cbp_noopt":
    if experiment != "continual_imagenet":
      raise ValueError("cbp_noopt: permuted MNIST's CBP already follows plain SGD (no momentum)")
    cbp["reset_optimizer"] = False
  if variant == "cbp_nobias":
    cbp["next_bias_correction"] = False
  if experiment == "continual_imagenet":
    (step_size,) = step_sizes  # One step size per method in this experiment's config.
    hparams = {m: {"step_size": step_size} for m in continual_imagenet.METHODS}
    hparams["cbp"].update(cbp)
    return continual_imagenet.make_config(
      continual_imagenet.REDUCED_OVERRIDES,
      dataset="fashion_mnist",
      seeds=seeds,
      tasks=tasks,
      tasks_per_chunk=1,
      methods=[method],
      hparams=hparams,
      # The probes never touch the learners; off, the grid costs 1/1.35 of the time.
      probes={"enabled": False},
    )
  # One step size: the method's; several: a sweep, vmapped (labels "cbp@0.1").
  sweep = {method: {"step_size": list(step_sizes)}} if len(step_sizes) > 1 else {}
  return permuted_mnist.make_config(
    permuted_mnist.REDUCED_OVERRIDES,
    seeds=seeds,
    tasks=tasks,
    tasks_per_chunk=1,
    methods=[method],
    hparams={method: {"step_size": step_sizes[0]}, "cbp": cbp},
    sweep=sweep,
  )


def diverged(weight_magnitude: np.ndarray, blowup: float) -> dict:
  """Per-seed first task (1-based) that is non-finite / blown up, or None."""
  w = np.asarray(weight_magnitude, np.float64)
  bad = ~np.isfinite(w)
  big = bad | (np.nan_to_num(w, nan=np.inf) > blowup * w[:, :1])

  def first(mask):
    return [int(np.argmax(row)) + 1 if row.any() else None for row in mask]

  return {"nonfinite": first(bad), "blowup": first(big)}


def rates(results: dict, blowup: float, variant: str | None = None) -> list[dict]:
  """One row per run label of a results file: diverged seeds and their first tasks."""
  rows = []
  for label, named in results["metrics"].items():
    run = results["runs"][label]
    firsts = diverged(named["weight_magnitude"], blowup)
    seeds, tasks = np.shape(named["weight_magnitude"])
    rows.append(
      {
        "variant": variant or label,
        "step_size": run["step_size"],
        "seeds": seeds,
        "tasks": tasks,
        **{k: sum(t is not None for t in v) for k, v in firsts.items()},
        "first_task": firsts,
      }
    )
  return rows


def format_row(experiment: str, row: dict) -> str:
  return (
    f"{experiment} {row['variant']}@{row['step_size']:g}: non-finite "
    f"{row['nonfinite']}/{row['seeds']}, blow-up {row['blowup']}/{row['seeds']} "
    f"({row['tasks']} tasks); first tasks {row['first_task']}"
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.divergence", description=__doc__.split("\n")[0])
  p.add_argument("--experiment", choices=("continual_imagenet", "permuted_mnist"), required=True)
  p.add_argument("--variants", default="bp,cbp,cbp_nobias", help=f"from {','.join(VARIANTS)}")
  p.add_argument("--step-sizes", type=runner.parse_floats)
  p.add_argument("--seeds", type=int, default=16)
  p.add_argument("--tasks", type=int, default=20)
  p.add_argument("--blowup", type=float, default=5.0, help="mean |w| factor over task 1 counted as blow-up")
  p.add_argument("--out", help="output folder (one results file per variant, and divergence.json)")
  p.add_argument(
    "--summarize",
    nargs="+",
    metavar="RESULTS",
    help="only print the rates of existing results files (labels as variants)",
  )
  args = p.parse_args(argv)
  if args.summarize:
    for path in args.summarize:
      for row in rates(runner.load_results(path), args.blowup):
        print(format_row(args.experiment, row))
    return 0
  if not args.step_sizes or not args.out:
    p.error("--step-sizes and --out are needed to run")
  module = continual_imagenet if args.experiment == "continual_imagenet" else permuted_mnist
  out = Path(args.out)
  table = []
  # Continual ImageNet takes one step size per run; permuted MNIST vmaps them.
  groups = [[lr] for lr in args.step_sizes] if args.experiment == "continual_imagenet" else [args.step_sizes]
  for sizes in groups:
    for variant in runner.split_names(args.variants):
      config = variant_config(args.experiment, variant, sizes, args.seeds, args.tasks)
      name = f"{variant}@{','.join(f'{lr:g}' for lr in sizes)}"
      result = module.run_experiment(config, out_dir=out / name, plot=False)
      for row in rates(result.results, args.blowup, variant):
        table.append(row)
        print(format_row(args.experiment, row), flush=True)
      runner.write_json_atomic(
        out / "divergence.json", {"experiment": args.experiment, "blowup": args.blowup, "rows": table}
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
