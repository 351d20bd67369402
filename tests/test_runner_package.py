"""The runner package's face: `runner.X` keeps working for every X the repository uses, and importing it stays light."""

import pathlib
import re
import subprocess
import sys

from experiments import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _names_used_as_runner_attributes():
  """Every ``runner.X`` in the experiments, the tests and the docs, read from their text."""
  files = [
    *ROOT.glob("experiments/*.py"),
    *ROOT.glob("tests/*.py"),
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
  ]
  used = set()
  for path in files:
    if path.name == pathlib.Path(__file__).name:
      continue  # This file speaks of "runner.X".
    used |= set(re.findall(r"\brunner\.([A-Za-z_]\w*)", path.read_text()))
  return used - {"py", "X"}  # "runner.py" and the placeholder "runner.X" in prose.


def test_every_name_used_as_runner_x_is_there():
  used = _names_used_as_runner_attributes()
  assert {"run", "run_seeds", "load_results", "plot_results", "Checkpoints"} <= used  # The scan sees them.
  assert sorted(n for n in used if not hasattr(runner, n)) == []


def test_reexports_are_the_modules_own_objects():
  """One object per name: a test patching or an `isinstance` check sees the same thing either way."""
  assert runner.run is runner.run_loop.run
  assert runner.Checkpoints is runner.checkpoints.Checkpoints
  assert runner.OutputWriteError is runner.errors.OutputWriteError
  assert runner.stratified_bootstrap_ci is runner.statistics.stratified_bootstrap_ci


def test_import_loads_neither_orbax_nor_matplotlib():
  """Checkpoints and plots import them when used: a run without either needs neither."""
  code = (
    "import sys; from experiments import runner; "
    "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
  )
  loaded = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
  ).stdout.split()
  assert "experiments" in loaded and "jax" in loaded
  assert not {"orbax", "matplotlib"} & set(loaded)
