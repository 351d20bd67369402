"""The divergence-rate tool's counting (not its figures: those are measured, see README)."""

import numpy as np
import pytest

from experiments import divergence


def test_first_nonfinite_and_blowup_tasks_per_seed():
  w = np.array(
    [
      [0.02, 0.03, np.nan, np.nan],  # NaN at task 3 (a blow-up too)
      [0.02, 0.05, 0.11, 0.3],  # 5x task 1's 0.02 first passed at task 3
      [0.02, 0.02, 0.099, 0.02],  # never above 0.1
      [0.02, np.inf, 0.02, 0.02],
    ]
  )  # inf counts as non-finite
  got = divergence.diverged(w, 5.0)
  assert got == {"nonfinite": [3, None, None, 2], "blowup": [3, 3, None, 2]}


def test_rates_count_seeds_per_run_label():
  results = {
    "runs": {"bp": {"step_size": 0.05}, "cbp": {"step_size": 0.05}},
    "metrics": {
      "bp": {"weight_magnitude": [[0.02, 0.02], [0.02, 0.2]]},
      "cbp": {"weight_magnitude": [[0.02, float("nan")], [0.02, 0.02]]},
    },
  }
  rows = {r["variant"]: r for r in divergence.rates(results, 5.0)}
  assert (rows["bp"]["nonfinite"], rows["bp"]["blowup"], rows["bp"]["seeds"]) == (0, 1, 2)
  assert (rows["cbp"]["nonfinite"], rows["cbp"]["blowup"], rows["cbp"]["tasks"]) == (1, 1, 2)


def test_variant_configs():
  c = divergence.variant_config("continual_imagenet", "cbp_noopt", [0.05], 16, 20)
  assert c["methods"] == ["cbp"] and c["hparams"]["cbp"]["reset_optimizer"] is False
  assert c["hparams"]["cbp"]["step_size"] == 0.05 and c["dataset"] == "fashion_mnist"
  assert c["seeds"] == 16
  c = divergence.variant_config("permuted_mnist", "cbp_nobias", [0.1, 0.3], 16, 10)
  assert c["sweep"]["cbp"]["step_size"] == [0.1, 0.3]
  assert c["hparams"]["cbp"]["next_bias_correction"] is False
  with pytest.raises(ValueError, match="already follows plain SGD"):
    divergence.variant_config("permuted_mnist", "cbp_noopt", [0.1], 16, 10)
