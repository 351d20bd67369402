"""Faults a long run meets: a full disk, an unwritable folder, a second run on the same folder.

`experiments.runner.run` must give a clear error and leave the previous
results file and checkpoints valid (the run resumes from them to the
uninterrupted run's results, byte for byte), and must refuse to share its
output folder with another live process while taking over a dead one's lock.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import orbax.checkpoint as ocp
import pytest

from experiments import runner
from experiments.runner import results_file
from tests.test_runner import REPO, run_toy

CHUNKS = 4


class FailingOs(types.SimpleNamespace):
  """`os` for the results-file module, whose ``write`` fails once ``armed``: it
  writes half of what it is given, then raises ``OSError(code)``."""

  def __init__(self, code):
    super().__init__(armed=False, code=code, calls=0)

  def __getattr__(self, name):
    return getattr(os, name)

  def write(self, fd, data):
    if not self.armed:
      return os.write(fd, data)
    self.calls += 1
    os.write(fd, bytes(data[: len(data) // 2]))
    raise OSError(self.code, os.strerror(self.code))


def stray_files(folder):
  return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run's results file."""
  out = tmp_path_factory.mktemp("straight")
  run_toy(out, chunks=CHUNKS)
  return (out / "results.json").read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["full-disk", "read-only"])
def test_results_write_failing_midway_keeps_the_previous_file(tmp_path, monkeypatch, straight, code):
  fake = FailingOs(code)
  monkeypatch.setattr(results_file, "os", fake)

  def on_chunk(done, results):
    fake.armed = done == 2  # Chunk 3's results write fails halfway.

  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  with pytest.raises(runner.OutputWriteError) as err:
    run_toy(out, chunks=CHUNKS, checkpoint_dir=ckpt, on_chunk=on_chunk)
  message = str(err.value)
  assert err.value.errno == code and fake.calls == 1
  assert f"cannot write {out / 'results.json'}: {os.strerror(code)}" in message
  assert "the previous results.json (if any) is unchanged" in message
  assert f"stopped after chunk 3/{CHUNKS}; {out / 'results.json'} holds chunk 2" in message
  assert f"resume (--resume) from the checkpoint of chunk 2 in {ckpt}" in message
  # The previous file is whole and valid; no temporary file is left behind.
  res = runner.load_results(out / "results.json")
  assert res["status"] == "running" and res["chunks_done"] == 2
  assert stray_files(out) == []
  # Space freed: resuming gives the uninterrupted run's file, byte for byte.
  monkeypatch.setattr(results_file, "os", os)
  result = run_toy(out, chunks=CHUNKS, checkpoint_dir=ckpt, resume=True)
  assert result.resumed_from == 2
  assert (out / "results.json").read_bytes() == straight


def test_checkpoint_save_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, straight):
  """Orbax has written the arrays of chunk 2's checkpoint when writing its
  JSON record runs out of space: chunk 1's checkpoint stays the latest and
  resumes to the uninterrupted run's results."""
  real = ocp.JsonCheckpointHandler._save_fn
  state = {"armed": False}

  async def full_disk(self, x, directory):
    if not state["armed"]:
      return await real(self, x, directory)
    (directory / self._filename).write_text(json.dumps(x)[:10])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  threads_before = set(threading.enumerate())

  def on_chunk(done, results):
    state["armed"] = done == 1

  with pytest.raises(runner.OutputWriteError) as err:
    run_toy(out, chunks=CHUNKS, checkpoint_dir=ckpt, on_chunk=on_chunk)
  message = str(err.value)
  # Orbax's cleanup of the half-written step races with its writer thread and
  # sometimes fails first ("Directory not empty"); orbax then raises that
  # error, the full disk only in its log. Either way the run stops here.
  assert err.value.errno in (errno.ENOSPC, errno.ENOTEMPTY)
  assert (err.value.errno == errno.ENOSPC) == ("No space left on device" in message)
  assert f"cannot save the checkpoint of chunk 2 in {ckpt}" in message
  assert "the checkpoint of chunk 1 is unchanged" in message
  assert f"{out / 'results.json'} holds chunk 2" in message
  assert f"resume (--resume) from the checkpoint of chunk 1 in {ckpt}" in message
  assert runner.load_results(out / "results.json")["chunks_done"] == 2

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real)
  # In practice the failed run's process has exited before a resume; here,
  # let the failed save's leftover orbax writer threads end first.
  deadline = time.monotonic() + 20
  for thread in set(threading.enumerate()) - threads_before:
    if thread.ident is not None:  # Started.
      thread.join(timeout=max(0.0, deadline - time.monotonic()))
  result = run_toy(out, chunks=CHUNKS, checkpoint_dir=ckpt, resume=True)
  assert result.resumed_from == 1
  assert (out / "results.json").read_bytes() == straight


def test_unusable_output_folder_is_refused_before_any_work(tmp_path):
  """An output "folder" below a regular file cannot be created: the error
  names it, before anything is compiled or run."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  chunks_run = []
  with pytest.raises(runner.OutputWriteError, match=f"cannot use {blocker / 'out'} as an output folder"):
    run_toy(blocker / "out", chunks=2, on_chunk=lambda done, res: chunks_run.append(done))
  assert chunks_run == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  out.chmod(0o555)
  try:
    with pytest.raises(runner.OutputWriteError, match="Permission denied"):
      run_toy(out, chunks=2)
  finally:
    out.chmod(0o755)


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from experiments import runner
    with runner.output_lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


def test_second_process_on_the_same_folder_is_refused_and_a_dead_ones_lock_is_taken(tmp_path, straight):
  out = tmp_path / "out"
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER.format(repo=str(REPO)), str(out)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(runner.OutputLockedError) as err:
      run_toy(out, chunks=CHUNKS)
    message = str(err.value)
    assert f"{out} is in use by process {proc.pid} on host {socket.gethostname()}" in message
    assert "use another output folder" in message
    assert not (out / "results.json").exists()
    # The lock also covers a checkpoint folder elsewhere.
    with pytest.raises(runner.OutputLockedError):
      run_toy(tmp_path / "other", chunks=CHUNKS, checkpoint_dir=out)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  # The killed holder's lock file is still there, naming it; the lock is free.
  assert json.loads((out / runner.LOCK_NAME).read_text())["pid"] == proc.pid
  run_toy(out, chunks=CHUNKS)
  assert (out / "results.json").read_bytes() == straight
  assert (out / runner.LOCK_NAME).read_text() == ""  # Released: no holder named.


def test_lock_is_reentrant_within_a_process(tmp_path):
  with runner.output_lock(tmp_path):
    with runner.output_lock(tmp_path):
      held = json.loads((tmp_path / runner.LOCK_NAME).read_text())
      assert held["pid"] == os.getpid()
    assert json.loads((tmp_path / runner.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert (tmp_path / runner.LOCK_NAME).read_text() == ""
