"""Kill a run with SIGKILL after its first checkpoint, resume it, compare with an uninterrupted run.

Shared by the experiments' resume tests. ``cmd`` is a command line that
accepts ``--out DIR`` (results in ``DIR/results.json``, orbax checkpoints in
``DIR/checkpoints``) and ``--resume``, as every experiment's CLI does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
  path = os.environ.get("PYTHONPATH")
  return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _tail(path: Path, lines: int = 30) -> str:
  return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_cli(cmd: list[str], log: Path, timeout: float) -> None:
  """Runs ``cmd`` to completion (output in ``log``); fails the test, showing the log, if it fails."""
  with open(log, "w") as f:
    rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                        timeout=timeout).returncode
  assert rc == 0, f"{' '.join(cmd)} exited with {rc}:\n{_tail(log)}"


def assert_resume_after_sigkill_is_bit_for_bit(cmd: list[str], tmp_path: Path, *,
                                               timeout: float = 600) -> int:
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
    proc = subprocess.Popen(cmd + ["--out", str(cut)], cwd=ROOT, env=_env(), stdout=f,
                            stderr=subprocess.STDOUT)
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
