"""Checkpoints across versions of the code: one written before the redesign resumes, or is refused by name.

The fixture (tests/fixtures/scr_checkpoint_a51cc87) is a real checkpoint written by commit a51cc87, before the
checkpoint format was recorded. A checkpoint that this code cannot continue exactly (another format, a config of
another schema, a carry of another structure) must be refused before anything is compiled or written, with an
error naming the step directory, what differs and what to do (--fresh), never crash in a pytree or orbax call or
load silently wrong.
"""

import json
import runpy
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from experiments import runner
from tests.test_runner import POINTS, run_toy

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "scr_checkpoint_a51cc87"
MODULE = "experiments.slowly_changing_regression"
# The fixture's command (README there), through flags every version of the CLI keeps.
FLAGS = [
  "--seeds",
  "2",
  "--steps",
  "6000",
  "--bin-size",
  "1000",
  "--bins-per-chunk",
  "2",
  "--methods",
  "bp,cbp",
  "--set",
  "cbp.replacement_rate=0.01",
  "--set",
  "cbp.maturity_threshold=10",
  "--checkpoint-every",
  "1",
  "--no-plot",
]


def record(step_dir: Path) -> dict:
  """A checkpoint's JSON record, read straight from its file."""
  return json.loads((step_dir / "meta" / "metadata").read_text())


def cli(monkeypatch, *args: str) -> int:
  """``python -m experiments.slowly_changing_regression FLAGS args`` in this process; its exit status."""
  monkeypatch.setattr(sys, "argv", [MODULE, *FLAGS, *args])
  with pytest.raises(SystemExit) as exit_:
    runpy.run_module(MODULE, run_name="__main__", alter_sys=False)
  return exit_.value.code


@pytest.fixture
def old_checkpoint(tmp_path):
  """A copy of the fixture's checkpoint folder (a resume may write into it)."""
  shutil.copytree(FIXTURE / "checkpoints", tmp_path / "old" / "checkpoints")
  return tmp_path / "old" / "checkpoints"


def must_not_compile(carry, index):
  raise AssertionError("the chunk was traced: the checkpoint was not checked before compiling")


def test_a_checkpoint_written_before_the_redesign_resumes_or_is_refused_by_name(
  tmp_path, monkeypatch, capsys, old_checkpoint
):
  # This code's own checkpoint of the same command says what a resumable one must match.
  assert cli(monkeypatch, "--out", str(tmp_path / "now")) == 0
  now, old = record(tmp_path / "now" / "checkpoints" / "3"), record(old_checkpoint / "2")
  assert "format" not in old and now["format"] == runner.checkpoints.FORMAT
  capsys.readouterr()
  code = cli(monkeypatch, "--out", str(old_checkpoint.parent), "--resume")
  err = capsys.readouterr().err
  if all(old[k] == now[k] for k in ("experiment", "config", "carry_structure", "metrics_structure")) and (
    old["leaves"]["carry"] == now["leaves"]["carry"]
  ):
    # Nothing that the run depends on changed: it continues to the old code's results, byte for byte.
    assert code == 0, err
    assert f"resumed from {old_checkpoint} at chunk 2/3" in err
    assert (old_checkpoint.parent / "results.json").read_bytes() == (FIXTURE / "results.json").read_bytes()
    assert (tmp_path / "now" / "results.json").read_bytes() == (FIXTURE / "results.json").read_bytes()
  else:  # A later change of the carry or the config: refused, saying what to do.
    assert code == 2, err
    assert f"error: refusing to resume from {old_checkpoint}" in err and "--fresh" in err
    assert not (old_checkpoint.parent / "results.json").exists()


def test_an_old_checkpoint_of_another_carry_is_refused_before_compiling(tmp_path, old_checkpoint):
  old = record(old_checkpoint / "2")
  carry = {"key": jax.random.key(0), "learners": {"cbp": (jnp.zeros(3), jnp.zeros(2))}}
  with pytest.raises(runner.IncompatibleCheckpointError) as err:
    runner.run(
      must_not_compile,
      carry,
      num_chunks=3,
      config=old["config"],
      experiment=old["experiment"],
      points_per_chunk=2,
      out_dir=tmp_path / "out",
      checkpoint_dir=old_checkpoint,
      resume=True,
      progress=runner.Progress("scr", 3, stream=None),
    )
  message = str(err.value)
  assert message.startswith(
    f"refusing to resume from {old_checkpoint / '2'} (chunk 2): it was written by "
    "another version of the code (checkpoint format 1, from before the format was "
    f"recorded; this code writes format {runner.checkpoints.FORMAT}): the carry's "
    "structure differs from this code's, at character "
  )
  assert "at character 35:\n  checkpoint: PyTreeDef({'key': *, 'learners': {'bp': ({'Dense_0': " in message
  assert "\n  now:        PyTreeDef({'key': *, 'learners': {'cbp': (*, *)}})\n" in message
  assert f"rerun with --fresh (it deletes {old_checkpoint})" in message
  assert not (tmp_path / "out" / "results.json").exists()


def test_a_long_structure_text_is_shown_around_its_first_difference():
  saved, now = "a" * 200 + "X" + "b" * 200, "a" * 200 + "Y"
  assert runner.checkpoints._where_texts_differ(saved, now, context=5) == (
    "at character 200:\n  checkpoint: ...aaaaaXbbbbb...\n  now:        ...aaaaaY"
  )


def test_an_old_checkpoint_of_another_config_schema_is_refused_by_name(tmp_path, old_checkpoint):
  old = record(old_checkpoint / "2")

  def resume(config):
    runner.run(
      must_not_compile,
      {"x": jnp.zeros(1)},
      num_chunks=3,
      config=config,
      experiment=old["experiment"],
      points_per_chunk=2,
      checkpoint_dir=old_checkpoint,
      resume=True,
      progress=runner.Progress("scr", 3, stream=None),
    )

  renamed = json.loads(json.dumps(old["config"]))
  renamed["hparams"]["bp"]["lr"] = renamed["hparams"]["bp"].pop("step_size")
  with pytest.raises(runner.IncompatibleCheckpointError) as err:
    resume(renamed)
  message = str(err.value)
  assert "its config has other entries than this code's (the experiment's config schema changed)" in message
  assert "hparams.bp.lr: absent in the checkpoint, 0.01 now" in message
  assert "hparams.bp.step_size: 0.01 in the checkpoint, absent now" in message
  assert "--fresh" in message
  # Other values of the same entries are the user's settings, not a code change.
  with pytest.raises(runner.ConfigMismatchError) as err:
    resume({**old["config"], "seeds": 3})
  assert not isinstance(err.value, runner.IncompatibleCheckpointError)
  assert "seeds: 2 in the checkpoint, 3 now" in str(err.value) and "--fresh" in str(err.value)


def test_the_format_is_recorded_and_an_unknown_one_refused_by_name(tmp_path):
  ckpt = tmp_path / "ckpt"
  run_toy(tmp_path / "out", chunks=2, checkpoint_dir=ckpt)
  meta = record(ckpt / "2")
  assert meta["format"] == runner.checkpoints.FORMAT == 2
  assert meta["carry_paths"] == ["['key']", "['x']"]
  meta["format"] = 3
  (ckpt / "2" / "meta" / "metadata").write_text(json.dumps(meta))
  with pytest.raises(
    runner.IncompatibleCheckpointError,
    match=r"\(checkpoint format 3; this code writes format 2\): this code reads formats "
    r"\[1, 2\] only\. Nothing was restored",
  ):
    run_toy(tmp_path / "out", chunks=2, checkpoint_dir=ckpt, resume=True)


class State(NamedTuple):
  a: jax.Array
  b: jax.Array


def _state_swapped():
  class State(NamedTuple):  # Same name and structure text, fields in the other order.
    b: jax.Array
    a: jax.Array

  return State


def state_chunk(carry, index):
  return carry, {"run": {"v": jnp.zeros((POINTS,))}}


def test_reordered_fields_of_the_same_structure_text_are_refused(tmp_path):
  """The structure's text names a NamedTuple's type, not its fields: the recorded leaf paths do."""
  swapped = _state_swapped()
  carry = State(a=jnp.zeros(2), b=jnp.ones(2))
  assert str(jax.tree.structure(carry)) == str(jax.tree.structure(swapped(b=carry.b, a=carry.a)))
  kwargs = dict(
    num_chunks=2,
    config={"n": 1},
    experiment="state",
    points_per_chunk=POINTS,
    checkpoint_dir=tmp_path / "ckpt",
    progress=runner.Progress("state", 2, stream=None),
  )
  runner.run(state_chunk, carry, **kwargs)
  with pytest.raises(runner.IncompatibleCheckpointError, match=r"the carry's leaves are in another order"):
    runner.run(state_chunk, swapped(b=carry.b, a=carry.a), resume=True, **kwargs)
