"""The progress line a run prints after every chunk."""

from __future__ import annotations

import math
import sys
from typing import Any


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
  """One status line per chunk on stderr (rewritten in place on a terminal).

  Args:
    name: prefix of the line.
    num_chunks: total chunks.
    work_per_chunk: units of work per chunk (e.g. SGD steps summed over all
      runs and seeds) for the rate, or None.
    work_label: the unit's name.
    stream: where to write (default stderr); None silences it.
  """

  def __init__(
    self,
    name: str,
    num_chunks: int,
    work_per_chunk: float | None = None,
    work_label: str = "steps",
    stream: Any = "stderr",
  ):
    self.name, self.num_chunks = name, num_chunks
    self.work_per_chunk, self.work_label = work_per_chunk, work_label
    self.stream = sys.stderr if stream == "stderr" else stream
    self._tty = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())

  def update(self, chunks_done: int, seconds: list[float], extra: str = "") -> None:
    if self.stream is None:
      return
    elapsed = sum(seconds)
    per_chunk = elapsed / len(seconds) if seconds else float("nan")
    eta = per_chunk * (self.num_chunks - chunks_done)
    line = f"[{self.name}] chunk {chunks_done}/{self.num_chunks}"
    if self.work_per_chunk and seconds:
      line += f" | {self.work_per_chunk / per_chunk:,.0f} {self.work_label}/s"
    line += f" | elapsed {_fmt_seconds(elapsed)} | eta {_fmt_seconds(eta)}"
    if extra:
      line += f" | {extra}"
    if self._tty:
      self.stream.write("\r\033[K" + line + ("\n" if chunks_done == self.num_chunks else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.stream is None:
      return
    if self._tty:
      self.stream.write("\n")
    self.stream.write(f"[{self.name}] {text}\n")
    self.stream.flush()
