"""One progress line per running stage: done/total, the caller's fields, rate and ETA.

On a terminal the line is rewritten in place (``\\r``) at most every ``refresh_s`` seconds; elsewhere (a log file, a
pipe, CI) a full line is printed at most every ``every_s`` seconds, and always at the end. Library code reports
through it; what the user sees is decided here, not by logging levels.
"""

from __future__ import annotations

import sys
import time
from typing import Callable


def hms(seconds: float) -> str:
  """Seconds as H:MM:SS ("?" when unknown)."""
  if seconds != seconds or seconds == float("inf"):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
  """``Progress(total, "train")``; ``update(done, loss=...)``; ``close()``.

  ``out``: where lines go (default: stdout, live on a terminal). ``unit``: what is counted ("steps", "sequences").
  ``start``: work already done before this run (a resumed run), excluded from the rate.
  """

  def __init__(self, total: int, label: str, *, unit: str = "steps", start: int = 0,
               out: Callable[[str], None] | None = None, every_s: float = 30.0, refresh_s: float = 0.5):
    self.total, self.label, self.unit, self.start = int(total), label, unit, int(start)
    self.live = out is None and sys.stdout.isatty()
    self.out = out or (lambda s: print(s, flush=True))
    self.every_s, self.refresh_s = every_s, refresh_s
    self.t0 = time.time()
    self.last_shown = -float("inf")
    self.done, self.fields = self.start, {}
    self._width = 0
    self._first: tuple[float, int] | None = None  # (time, done) at the first update: the rate is measured from it

  def rate(self) -> float:
    """Units per second since the first update (which often includes compiling), else since the start."""
    if self._first is not None and self.done > self._first[1]:
      t, d = self._first
      return (self.done - d) / max(time.time() - t, 1e-9)
    return (self.done - self.start) / max(time.time() - self.t0, 1e-9)

  def eta(self) -> float:
    r = self.rate()
    return (self.total - self.done) / r if r > 0 else float("inf")

  def line(self) -> str:
    fields = "".join(f"  {k} {_fmt(v)}" for k, v in self.fields.items())
    r = self.rate()
    speed = f"{r:.2f} {self.unit}/s" if r >= 0.1 else (f"{1 / r:.1f} s/{self.unit.rstrip('s')}" if r > 0 else "")
    return (f"[{self.label}] {self.done}/{self.total} {self.unit}{fields}  {speed}  "
            f"elapsed {hms(time.time() - self.t0)}  ETA {hms(self.eta())}")

  def update(self, done: int, **fields) -> None:
    if self._first is None:
      self._first = (time.time(), int(done))
    self.done = int(done)
    self.fields.update(fields)
    now = time.time()
    final = self.done >= self.total
    if now - self.last_shown < (self.refresh_s if self.live else self.every_s) and not final:
      return
    self.last_shown = now
    self._show(final)

  def _show(self, final: bool) -> None:
    text = self.line()
    if self.live:
      pad = max(self._width - len(text), 0)
      sys.stdout.write("\r" + text + " " * pad + ("\n" if final else ""))
      sys.stdout.flush()
      self._width = 0 if final else len(text)
    else:
      self.out(text)

  def close(self) -> None:
    """Ends the line (prints the last state if it was not shown as final)."""
    if self.done < self.total or (self.live and self._width):
      self._show(True)
