"""The runner's statistics over seeds: interquartile mean, stratified-bootstrap intervals, area under the curve,
and their place in the results file, the summary line and the plots."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import runner
from tests.test_runner import POINTS, SEEDS, run_toy


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 13])
def test_interquartile_mean_is_scipy_trim_mean(n):
  x = np.random.default_rng(n).normal(size=(n, 5))
  np.testing.assert_allclose(runner.interquartile_mean(x), scipy_stats.trim_mean(x, 0.25, axis=0), rtol=1e-12)
  # Pooled axes: the IQM of all runs and tasks together.
  y = np.random.default_rng(n).normal(size=(n, 3, 4))
  np.testing.assert_allclose(
    runner.interquartile_mean(y, axis=(0, 1)),
    scipy_stats.trim_mean(y.reshape(3 * n, 4), 0.25, axis=0),
    rtol=1e-12,
  )


def test_interquartile_mean_ignores_nan_runs():
  x = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, 5.0], [100.0, np.nan], [np.nan, np.nan]])
  got = runner.interquartile_mean(x)
  assert got[0] == pytest.approx(2.5)  # 4 finite values: drop 1 and 100
  assert got[1] == 5.0


def numpy_stratified_bootstrap(scores, reps, confidence, seed):
  """The definition, one replicate and one task at a time, with SciPy's trimmed mean as the statistic."""
  runs, tasks = scores.shape[:2]
  rng = np.random.default_rng(seed)
  replicates = []
  for _ in range(reps):
    resampled = np.empty_like(scores)
    for t in range(tasks):
      idx = rng.integers(0, runs, size=runs)
      resampled[:, t] = scores[idx, t]
    replicates.append(
      scipy_stats.trim_mean(resampled.reshape((runs * tasks,) + scores.shape[2:]), 0.25, axis=0)
    )
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(np.array(replicates), [tail, 100 - tail], axis=0)
  return scipy_stats.trim_mean(scores.reshape((runs * tasks,) + scores.shape[2:]), 0.25, axis=0), low, high


@pytest.mark.parametrize("shape", [(5, 3), (10, 1, 6), (2, 4, 3)])
def test_stratified_bootstrap_ci_against_direct_numpy_resampling(shape):
  scores = np.random.default_rng(7).gamma(2.0, size=shape)
  got = runner.stratified_bootstrap_ci(scores, reps=300, confidence=0.9, seed=11)
  want = numpy_stratified_bootstrap(scores, reps=300, confidence=0.9, seed=11)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-12)
  assert np.all(got[1] <= got[0] + 1e-12) and np.all(got[0] <= got[2] + 1e-12)


def test_stratified_bootstrap_ci_behaves_like_an_interval():
  rng = np.random.default_rng(0)
  # Identical runs: nothing to resample, a zero-width interval.
  est, low, high = runner.stratified_bootstrap_ci(np.full(6, 0.3))
  assert est == low == high == pytest.approx(0.3)
  # More runs, narrower interval; and the interval of the mean covers the true mean most of the time.
  widths = [np.ptp(runner.stratified_bootstrap_ci(rng.normal(size=n), np.mean)[1:]) for n in (10, 1000)]
  assert widths[1] < widths[0] / 5
  covered = [
    float(low) <= 0.0 <= float(high)
    for low, high in (
      runner.stratified_bootstrap_ci(rng.normal(size=30), np.mean, reps=400, seed=s)[1:] for s in range(60)
    )
  ]
  assert np.mean(covered) > 0.8
  with pytest.raises(ValueError, match="confidence"):
    runner.stratified_bootstrap_ci(np.ones(3), confidence=1.0)


def test_area_under_curve_is_the_mean_height_and_skips_nan_points():
  values = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, np.nan, 1.0, np.nan]])
  np.testing.assert_allclose(runner.area_under_curve(values), [3.0, 0.5])


def test_results_file_summary_line_and_plot_carry_the_statistics(tmp_path):
  result = run_toy(tmp_path, chunks=2)
  res = json.loads((tmp_path / "results.json").read_text())
  assert set(res["statistics"]) == {"a", "b"} and set(res["statistics"]["a"]) == {"value", "square"}
  value = np.asarray(res["metrics"]["a"]["value"])
  assert value.shape == (SEEDS, 2 * POINTS)
  auc = res["statistics"]["a"]["value"]["auc"]
  est, low, high = numpy_stratified_bootstrap(
    value.mean(axis=1)[:, None], runner.BOOTSTRAP_REPS, runner.CONFIDENCE, runner.BOOTSTRAP_SEED
  )
  assert [auc["iqm"], auc["ci_low"], auc["ci_high"]] == pytest.approx([est, low, high], rel=1e-9)
  final = res["statistics"]["b"]["value"]["final"]
  assert final["iqm"] == pytest.approx(scipy_stats.trim_mean(-value[:, -1], 0.25))
  assert result.results["statistics"] == res["statistics"]
  line = runner.format_statistics(runner.load_results(tmp_path / "results.json"))
  assert line.splitlines()[0].startswith("square: IQM over 4 seeds") and "area under curve" in line
  # A file written before statistics existed: computed on the fly, the same numbers.
  del res["statistics"]
  old = runner.format_statistics(
    {**res, "metrics": {k: {n: np.asarray(v) for n, v in m.items()} for k, m in res["metrics"].items()}}
  )
  assert old == line
  path = runner.plot_results(tmp_path / "results.json", tmp_path / "ci.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="band"):
    runner.plot_results(tmp_path / "results.json", tmp_path / "x.png", band="sd")
