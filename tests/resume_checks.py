"""Interrupt a run, resume it from its checkpoint, compare with an uninterrupted run.

Shared by the experiments' resume tests: in process (`assert_interrupt_and_resume_is_bit_for_bit`,
an exception raised after the first chunk) and as a real process killed with SIGKILL after its
first checkpoint (`assert_resume_after_sigkill_is_bit_for_bit`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


class Stop(Exception):
  """Raised from ``on_chunk`` to stop a run between chunks."""


def assert_same_carry(a: Any, b: Any) -> None:
  """Two carries are equal leaf for leaf, bit for bit (PRNG keys by their key data)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_interrupt_and_resume_is_bit_for_bit(run: Callable[..., Any], tmp_path: Path):
  """``run(out_dir=, checkpoint_dir=, on_chunk=, resume=)`` (an experiment's
  ``run_experiment`` with its config bound) straight through, and again stopped
  after its first chunk and resumed from the checkpoint: the results files are
  byte-identical and the final carries bit-identical.

  Returns:
    ``(full, resumed, ckpt)``: both `RunResult`s and the checkpoint directory.
  """
  full = run(out_dir=tmp_path / "full")

  def stop(done, results):
    if done == 1:
      raise Stop

  out, ckpt = tmp_path / "cut", tmp_path / "cut" / "checkpoints"
  with pytest.raises(Stop):
    run(out_dir=out, checkpoint_dir=ckpt, on_chunk=stop)
  partial = json.loads((out / "results.json").read_text())
  assert partial["chunks_done"] == 1 and partial["status"] == "running"
  with pytest.raises(FileExistsError):  # No silent restart over a checkpoint.
    run(out_dir=out, checkpoint_dir=ckpt)
  resumed = run(out_dir=out, checkpoint_dir=ckpt, resume=True)
  assert resumed.resumed_from == 1
  assert (out / "results.json").read_bytes() == (tmp_path / "full" / "results.json").read_bytes()
  assert_same_carry(resumed.carry, full.carry)
  return full, resumed, ckpt


def _env() -> dict:
  path = os.environ.get("PYTHONPATH")
  return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _tail(path: Path, lines: int = 30) -> str:
  return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_cli(cmd: list[str], log: Path, timeout: float) -> None:
  """Runs ``cmd`` to completion (output in ``log``); fails the test, showing the log, if it fails."""
  with open(log, "w") as f:
    rc = subprocess.run(
      cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
    ).returncode
  assert rc == 0, f"{' '.join(cmd)} exited with {rc}:\n{_tail(log)}"


def assert_resume_after_sigkill_is_bit_for_bit(
  cmd: list[str], tmp_path: Path, *, timeout: float = 600
) -> int:
  """Runs ``cmd`` straight through, and again killed (SIGKILL) as soon as its first
  checkpoint exists, then ``--resume``d; asserts both results files are byte-identical.

  Returns:
    The chunks the killed run had finished (at least 1, fewer than all).
  """
  full, cut = tmp_path / "full", tmp_path / "cut"
  run_cli(cmd + ["--out", str(full)], tmp_path / "full.log", timeout)
  total = json.loads((full / "results.json").read_text())["num_chunks"]
  log = tmp_path / "cut.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(
      cmd + ["--out", str(cut)], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT
    )
  try:
    deadline = time.monotonic() + timeout
    while not (cut / "checkpoints" / "1").is_dir():
      assert proc.poll() is None, f"the run ended before its first checkpoint:\n{_tail(log)}"
      assert time.monotonic() < deadline, f"no checkpoint within {timeout} s:\n{_tail(log)}"
      time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it was killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  done = json.loads((cut / "results.json").read_text())["chunks_done"]
  assert 1 <= done < total, (done, total)
  run_cli(cmd + ["--out", str(cut), "--resume"], tmp_path / "resume.log", timeout)
  resumed = (cut / "results.json").read_bytes()
  assert json.loads(resumed)["status"] == "complete"
  assert resumed == (full / "results.json").read_bytes()
  return done
