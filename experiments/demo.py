"""`make demo`: loss of plasticity and Continual Backpropagation in about two minutes on 2 CPU cores.

Runs the slowly-changing regression problem (`experiments.slowly_changing_regression`)
at a reduced scale: 16 seeds x 400,000 examples instead of the paper's
100 x 1,000,000, all five methods (BP, CBP, L2, Shrink & Perturb, linear) at
the paper's step size 0.01, everything compiled into one program and vmapped
over seeds. Within 400k examples plain backprop's error already climbs from
about 0.6 to about 1.2, well above the linear learner's (about 0.9), while CBP
stays near its starting error (about 0.55) and L2 and Shrink & Perturb in
between; the full-scale run continues the same curves (`--paper`: BP 0.67 ->
1.35 at 1M examples, linear 0.91, CBP 0.58, as in the paper).

Cost: about 100 s of CPU time (20 s of it compiling) on a 2-core machine; 4.4
min of wall time when that machine was shared with other jobs (load ~10).

Prints an early-vs-late table of binned squared error per method and writes
``results/demo/results.json`` (schema in `experiments.runner`),
``results/demo/scr.png`` (error, dead units, effective rank and weight
magnitude over time: mean +- standard error over seeds) and
``results/demo/timing.json``.

Usage: ``python -m experiments.demo [--seeds N] [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments import runner
from experiments import slowly_changing_regression as scr

DEMO = {
  "seeds": 16,
  "steps": 400_000,
  "bin_size": 20_000,
  "bins_per_chunk": 2,
  "methods": ["bp", "cbp", "l2", "snp", "linear"],
}
LATE_BINS = 2  # "Late" error: mean over the last 40k examples.


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=DEMO["seeds"])
  p.add_argument("--steps", type=int, default=DEMO["steps"])
  p.add_argument("--out", default="results/demo")
  args = p.parse_args(argv)

  start = time.perf_counter()
  try:
    config = scr.make_config({**DEMO, "seeds": args.seeds, "steps": args.steps})
  except ValueError as e:  # Refused before compiling: one line, as every experiment CLI.
    return runner.cli_error(e)
  out = Path(args.out)
  print(
    f"Slowly-changing regression demo: {config['seeds']} seeds x {config['steps']:,} "
    f"examples, 20-5-1 ReLU learner, SGD step size 0.01, batch 1; methods "
    f"{', '.join(scr.run_labels(config))}.\nTarget network and input stream are generated "
    "inside the compiled program; one line per compiled chunk follows.",
    flush=True,
  )
  result = scr.run_experiment(config, out_dir=out, checkpoint_dir=None, plot=True)
  rows = scr.summary(result.results, early_bins=1, late_bins=LATE_BINS)
  print()
  print(
    f"Binned squared error, mean over {config['seeds']} seeds "
    f"(early: first 20k examples; late: last {LATE_BINS * 20}k of {config['steps'] // 1000}k):"
  )
  print(scr.format_summary(result.results, early_bins=1, late_bins=LATE_BINS))
  print(runner.format_statistics(result.results))
  bp, cbp, lin = rows.get("bp"), rows.get("cbp"), rows.get("linear")
  if bp and lin:
    verdict = "above" if bp["late"] > lin["late"] else "not yet above"
    print(
      f"\nBP's error rose from {bp['early']:.2f} to {bp['late']:.2f}, {verdict} the linear "
      f"learner's {lin['late']:.2f}: loss of plasticity."
    )
  if bp and cbp:
    print(
      f"CBP ends at {cbp['late']:.2f} (started at {cbp['early']:.2f}): it keeps learning "
      "each new target as well as at the start."
    )
  elapsed = time.perf_counter() - start
  print(
    f"\nPlot: {out / 'scr.png'}\nResults: {out / 'results.json'}\n"
    f"Took {elapsed:.0f} s (compile {result.compile_seconds:.0f} s, "
    f"run {sum(result.chunk_seconds):.0f} s). The paper-scale run: "
    "python -m experiments.slowly_changing_regression --paper --out results/scr_paper"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
