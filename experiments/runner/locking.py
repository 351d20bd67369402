"""The output folder's lock: one run at a time per results or checkpoint folder."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from experiments.runner.errors import OutputLockedError, OutputWriteError

LOCK_NAME = ".cbp_jax_run.lock"
# Locks this process holds: resolved folder -> [file descriptor, depth].
_held_locks: dict[Path, list[int]] = {}


def _lock_holder(lock_path: Path) -> str:
  """Who holds a lock, as its file says (the holder writes it after locking)."""
  try:
    info = json.loads(lock_path.read_text() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "another process (it has not written its pid yet)"
  return (
    f"process {info.get('pid')} on host {info.get('host')} (since {info.get('since')}: {info.get('command')})"
  )


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike):
  """Holds an exclusive lock on ``directory`` (created if missing) while in the block.

  The lock is ``fcntl.flock`` on ``directory/.cbp_jax_run.lock``, which names
  the holder (pid, host, start time, command). The kernel releases it when
  the holder exits or is killed, so a crashed run leaves no stale lock: the
  next run takes it (and rewrites the file). Re-entrant within a process.
  On network file systems ``flock`` may be local to each host.

  Raises:
    OutputLockedError: another process holds the lock; the message names it.
    OutputWriteError: the folder or its lock file cannot be created.
  """
  directory = Path(directory).absolute()
  if directory in _held_locks:
    _held_locks[directory][1] += 1
    try:
      yield
    finally:
      _held_locks[directory][1] -= 1
    return
  lock_path = directory / LOCK_NAME
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise OutputWriteError(e.errno, f"cannot use {directory} as an output folder: {e.strerror or e}") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise OutputLockedError(
      f"{directory} is in use by {_lock_holder(lock_path)}. Two runs writing the same results "
      "and checkpoints would corrupt each other: wait for that run to finish or stop it, or "
      "use another output folder."
    ) from None
  try:
    since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    holder = json.dumps(
      {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": " ".join(sys.argv)}
    ).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
  except OSError:
    pass  # Naming the holder is a courtesy; the flock is the lock.
  _held_locks[directory] = [fd, 1]
  try:
    yield
  finally:
    del _held_locks[directory]
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)  # No holder named once released.
    os.close(fd)  # Releases the flock.
