"""cbp_jax.data and cbp_jax.ppo moved to experiments/: the old names warn and forward, or say where the code went."""

import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import cbp_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOVED = {"cbp_jax.data": "experiments.data", "cbp_jax.ppo": "experiments.ppo"}


@pytest.fixture
def fresh_import(monkeypatch):
  """Imports an old name as if for the first time (this process may have imported it already)."""

  def do(old):
    monkeypatch.delitem(sys.modules, old, raising=False)
    monkeypatch.delattr(cbp_jax, old.split(".")[1], raising=False)
    return importlib.import_module(old)

  return do


@pytest.mark.parametrize("old, new", MOVED.items())
def test_old_name_warns_naming_the_new_place_and_is_the_new_module(fresh_import, old, new):
  with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}\b.*import {new} instead"):
    module = fresh_import(old)
  moved = importlib.import_module(new)
  assert module.__all__ == moved.__all__ and len(moved.__all__) >= 5
  for name in moved.__all__:
    assert getattr(module, name) is getattr(moved, name)  # The same objects, not copies.
  assert module.__file__ == str(ROOT / "cbp_jax" / f"{old.split('.')[1]}.py")  # A module of its own.


def test_from_import_and_attribute_access_give_the_moved_objects(fresh_import, monkeypatch):
  from experiments import data, ppo

  with pytest.warns(DeprecationWarning):
    fresh_import("cbp_jax.ppo")
  from cbp_jax.ppo import gae  # noqa: E402  (after the fresh import above)

  assert gae is ppo.gae
  monkeypatch.delitem(sys.modules, "cbp_jax.data", raising=False)
  monkeypatch.delattr(cbp_jax, "data", raising=False)  # Set by an earlier import of the submodule.
  with pytest.warns(DeprecationWarning, match="cbp_jax.data moved to experiments.data"):
    loader = cbp_jax.data.load_dataset  # After a plain `import cbp_jax`, as before the move.
  assert loader is data.load_dataset
  assert cbp_jax.data._read_idx is data._read_idx  # A private name is looked up in the new module.
  with pytest.raises(AttributeError, match="experiments.data"):
    cbp_jax.data.no_such_name  # noqa: B018


def test_warning_points_at_the_importing_line(fresh_import):
  """Python shows a DeprecationWarning by default only where __main__ triggers it, so it must be
  attributed to the user's import, not to importlib or cbp_jax."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fresh_import("cbp_jax.data")
  (w,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
  assert w.filename == __file__


def test_shown_to_a_script_under_default_warning_filters(tmp_path):
  script = tmp_path / "user.py"
  script.write_text("import cbp_jax.data\n")
  result = subprocess.run(
    [sys.executable, str(script)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={"PYTHONPATH": str(ROOT), "PATH": ""},
  )
  assert result.returncode == 0, result.stderr
  assert f"{script}:1: DeprecationWarning: cbp_jax.data moved to experiments.data" in result.stderr


@pytest.mark.parametrize("old, new", MOVED.items())
def test_without_the_repository_the_import_error_says_where_the_code_went(tmp_path, old, new):
  """An installed cbp_jax (no experiments/ next to it) cannot forward."""
  (tmp_path / "cbp_jax").symlink_to(ROOT / "cbp_jax", target_is_directory=True)
  code = f"try:\n  import {old}\nexcept ImportError as e:\n  print(type(e).__name__, e.name, e)\n"
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(
    f"ImportError {old} {old} moved to {new}, which is not part of the "
    "installed cbp_jax package: it lives in the experiments/ folder"
  )
  assert "Run from a clone's root" in result.stdout
