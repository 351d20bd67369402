"""Plots of a results file: one panel per metric, a curve per run label with its band over seeds."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.runner.results_file import load_results
from experiments.runner.statistics import BAND_LABEL, curve_with_ci

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
  data = {
    k: {n: np.array(v, dtype=np.float64) for n, v in named.items()} for k, named in results["metrics"].items()
  }
  labels = tuple(labels or data)
  if metrics is None:
    present = {n for named in data.values() for n in named}
    metrics = tuple(n for n in METRIC_TITLES if n in present) + tuple(sorted(present - set(METRIC_TITLES)))
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
      (line,) = ax.plot(xs, center, color=colors[label], label=label, linewidth=1.3)
      ax.fill_between(xs, low, high, color=colors[label], alpha=0.25, linewidth=0)
      shown.setdefault(label, line)
    ax.set_title(METRIC_TITLES.get(name, name), fontsize=10)
    ax.set_xlabel(results.get("x_label", "x"))
    ax.grid(alpha=0.3)
  seeds = max((v.shape[0] for named in data.values() for v in named.values()), default=0)
  fig.suptitle(
    title
    or f"{results.get('experiment', '')} ({results.get('status', '')}, "
    f"{BAND_LABEL if band == 'iqm_ci' else 'mean +- s.e.'} over {seeds} seeds)",
    fontsize=10,
  )
  fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
  if shown:
    fig.legend(list(shown.values()), list(shown), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
