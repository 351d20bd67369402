"""The benchmark's machinery (not its figures: speed is never asserted in tests)."""

import dataclasses
import json

import numpy as np

from experiments import benchmark


def test_rows_count_replacements_and_ratios_are_relative_to_bp():
  scr = benchmark.nets()["scr"]
  # Accumulate mode, so the count is exact: pending starts at 0.99 (aged state)
  # and grows by rate * eligible = 1e-4 * 5 per step, 1.0 per 2,000-step call:
  # the warm-up call replaces one unit and leaves 0.99, the timed call one more.
  net = dataclasses.replace(scr, steps=2000, cbp={**scr.cbp, "accumulate": True})
  rows = benchmark.benchmark_net(net, ["bp", "cbp", "cbp_k10"], net.steps, 2, log=lambda _: None)
  by_method = {r["method"]: r for r in rows}
  assert set(by_method) == {"bp", "cbp", "cbp_k10"}
  assert by_method["bp"]["ratio_vs_bp"] == 1.0
  for r in rows:
    assert r["steps_per_s"] > 0 and len(r["ratio_vs_bp_per_repeat"]) == 2
    # ratio = BP's median time / the method's: steps/s of the method over BP's.
    np.testing.assert_allclose(r["ratio_vs_bp"], r["steps_per_s"] / by_method["bp"]["steps_per_s"], rtol=1e-9)
  assert by_method["cbp"]["replaced"] == 1 and by_method["cbp_k10"]["replaced"] == 1
  assert by_method["bp"]["replaced"] is None
  json.dumps(rows)  # What goes into the results file is JSON.


def test_cbp_state_is_thirteen_bytes_per_unit_plus_per_layer_scalars():
  """utility f32 + mean f32 + age i32 + last_replaced bool per unit; pending f32
  and replaced count i32 per layer; nonfinite i32, skipped i32, decay f32, key (2 x u32)."""
  for name in ("scr", "mnist_b1", "convnet_b100"):
    sizes = benchmark.state_sizes(benchmark.nets()[name])
    expected = 13 * sizes["hidden_units"] + 8 * sizes["hidden_layers"] + 4 + 4 + 4 + 8
    assert sizes["cbp_extra_bytes"] == expected, name
    assert sizes["cbp_adam_extra_bytes"] == expected, name
