"""Metrics out: ``metrics.jsonl`` and TensorBoard events in the workdir, a progress line (process 0 only)."""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from tandem_jax.progress import Progress, hms


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, label: str = "train"):
    self.enabled = jax.process_index() == 0
    self.total, self.start = total_steps, start_step
    self.t0, self.last_t, self.last_step = time.time(), time.time(), start_step
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._bar = Progress(total_steps, label, start=start_step)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()

  def progress(self, step: int, metrics: dict) -> dict:
    """Logs train metrics with steps/s and ETA; returns the timing it measured."""
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_t, 1e-9)
    self.last_t, self.last_step = now, step
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    timing = {"steps_per_sec": rate}
    if self.enabled:
      shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
      logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self.total, shown, rate, hms(eta))
      self._bar.update(step, **{k: metrics[k] for k in ("loss", "accuracy", "agreement") if k in metrics})
    return timing

  def close(self):
    if self.enabled:
      self._bar.close()
      self._jsonl.close()
      self._tb.close()

