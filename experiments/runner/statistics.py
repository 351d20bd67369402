"""Statistics over seeds: interquartile mean, stratified-bootstrap confidence
intervals (as rliable, Agarwal et al., NeurIPS 2021), area under the curve."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

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
    tuple(values.shape[a] for a in rest) + (-1,)
  )
  ordered = np.sort(pooled, axis=-1)  # NaN last.
  finite = np.sum(np.isfinite(pooled), axis=-1, keepdims=True)
  cut = finite // 4
  position = np.arange(pooled.shape[-1])
  keep = (position >= cut) & (position < finite - cut)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.sum(np.where(keep, ordered, 0.0), axis=-1) / np.sum(keep, axis=-1)


def stratified_bootstrap_ci(
  scores: np.ndarray,
  statistic: Callable[..., np.ndarray] | None = None,
  *,
  reps: int = BOOTSTRAP_REPS,
  confidence: float = CONFIDENCE,
  seed: int = BOOTSTRAP_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    low, high = (
      np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
      if np.isfinite(replicates).any()
      else (np.full(replicates.shape[1:], np.nan),) * 2
    )
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
  seeds = max(
    (np.shape(v)[0] for named in results.get("metrics", {}).values() for v in named.values()), default=0
  )
  width = max(len(label) for label in stats)
  lines = [f"{name}: IQM over {seeds} seeds [95% stratified-bootstrap CI]"]

  def fmt(s):
    if s["iqm"] is None:
      return "n/a"
    return f"{s['iqm']:.4g} [{s['ci_low']:.4g}, {s['ci_high']:.4g}]"

  for label, named in stats.items():
    if name in named:
      lines.append(
        f"  {label:<{width}}  area under curve {fmt(named[name]['auc'])}, "
        f"last point {fmt(named[name]['final'])}"
      )
  return "\n".join(lines)
