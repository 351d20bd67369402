"""The newer methods in the experiments: selectable by name, the injection at its task/bin.

Tiny configurations on the real MNIST training set (skipped without it) and
on the slowly-changing regression's generated stream.
"""

import numpy as np
import pytest

from experiments import permuted_mnist as pm
from experiments import plasticity_methods
from experiments import slowly_changing_regression as scr
from experiments.data import shared_data_dir

MNIST = shared_data_dir() / "mnist"
NAMES = list(plasticity_methods.NAMES)


@pytest.mark.skipif(
  not (MNIST / "train-images-idx3-ubyte.gz").exists() and not (MNIST / "train-images-idx3-ubyte").exists(),
  reason=f"MNIST IDX files not found in {MNIST} (tests never download data)",
)
def test_permuted_mnist_runs_newer_methods_on_the_same_stream():
  # Half the names here, the others in the regression test below (compile time).
  methods = ["bp", "injection", "snr", "ln_wd", "regrama"]
  config = pm.make_config(
    dict(
      width=8,
      tasks=3,
      examples_per_task=60,
      tasks_per_chunk=3,
      probe_size=50,
      seeds=1,
      methods=methods,
      hparams={
        **{m: {"step_size": 0.05} for m in methods},
        "injection": {"step_size": 0.05, "at_task": 1},
        "regrama": {"step_size": 0.05, "period": 20},
      },
    )
  )
  metrics = pm.run_experiment(config, plot=False, progress=False).results["metrics"]
  assert list(metrics) == methods
  acc = {m: np.asarray(metrics[m]["accuracy"])[0] for m in methods}
  # Before its injection point the injected learner is BP on the same stream (the
  # injected copies add exactly 0; the compiled programs differ, so to rounding);
  # afterwards it learns differently.
  assert acc["injection"][0] == acc["bp"][0]
  np.testing.assert_allclose(
    np.asarray(metrics["injection"]["weight_magnitude"])[0, 0],
    np.asarray(metrics["bp"]["weight_magnitude"])[0, 0],
    rtol=1e-6,
  )
  assert not np.allclose(
    np.asarray(metrics["injection"]["weight_magnitude"])[0, 1:],
    np.asarray(metrics["bp"]["weight_magnitude"])[0, 1:],
  )
  for m in ("regrama", "snr"):
    replaced = np.asarray(metrics[m]["replaced_units"])[0]
    assert (np.diff(replaced) >= 0).all() and replaced[-1] > 0, m
  for m in methods:
    assert np.isfinite(acc[m]).all() and np.isfinite(np.asarray(metrics[m]["dead_fraction"])).all()


def test_slowly_changing_regression_takes_newer_methods():
  methods = ["bp", "injection", "upgd", "redo", "hare_tortoise"]
  config = scr.make_config(
    dict(
      seeds=1,
      steps=400,
      bin_size=100,
      bins_per_chunk=4,
      methods=methods,
      hparams={"injection": {"at_bin": 2}},
    )
  )
  metrics = scr.run_experiment(config, plot=False, progress=False).results["metrics"]
  err = {m: np.asarray(metrics[m]["error"])[0] for m in methods}
  np.testing.assert_allclose(err["injection"][:2], err["bp"][:2], rtol=1e-6)
  assert not np.allclose(err["injection"][2:], err["bp"][2:], rtol=1e-3)
  assert all(np.isfinite(e).all() for e in err.values())


def test_unknown_method_and_bad_injection_point_are_refused():
  with pytest.raises(ValueError, match="unknown method 'dropout'"):
    pm.make_config(methods=["bp", "dropout"])
  with pytest.raises(ValueError, match="injection.at_task must be an int >= 0"):
    pm.make_config(hparams={"injection": {"at_task": -1}})
  with pytest.raises(ValueError, match="unknown method"):
    plasticity_methods.optimizer("dropout", {"step_size": 0.1}, None, None)
