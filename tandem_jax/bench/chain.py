"""Trains the benchmark's eight models in one chain, each in ``<workdir>/<stage>/``, skipping finished stages.

  primary -> mid (a second primary-stage run, mid size) -> secondary -> secondary_long (continues secondary alone
  for the tandem's steps: Table 1's equal-training control) -> secondary_distil (teacher: primary, student from
  secondary) -> tandem (Tandem-CE: primary frozen, secondary from secondary) -> tandem_distil (from
  tandem) -> router (on tandem_distil)
"""

from __future__ import annotations

import logging
import os
import time

from configs import benchmark as bench_cfg
from tandem_jax.training import checkpoint, loop

# stage -> {config.init field: source stage}
INIT = {
    "primary": {}, "mid": {},
    "secondary": {"primary_workdir": "primary"},  # the primary only for agreement/TV metrics
    "secondary_long": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "secondary_distil": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "tandem": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "tandem_distil": {"tandem_workdir": "tandem"},
    "router": {"tandem_workdir": "tandem_distil"},
}


def tokenizer_cache(bench, workdir: str) -> str:
  return bench.tokenizer_cache or os.path.join(workdir, "tokenizer_cache")


def finished_step(stage_dir: str) -> int | None:
  if not os.path.isdir(os.path.join(stage_dir, checkpoint.CHECKPOINT_DIR)):
    return None
  mngr = checkpoint.manager(stage_dir, async_save=False)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def stage_configs(bench, workdir: str) -> dict:
  tok = tokenizer_cache(bench, workdir)
  out = {}
  for stage in bench_cfg.STAGES:
    c = bench_cfg.stage_config(bench, stage, tok)
    for field, src in INIT[stage].items():
      c.init[field] = os.path.join(workdir, src)
    out[stage] = c
  return out


def train_all(bench, workdir: str) -> dict:
  """Trains what is missing; returns per stage ``{"seconds", "reused", "step", "eval"}``."""
  report = {}
  for stage, c in stage_configs(bench, workdir).items():
    d = os.path.join(workdir, stage)
    done = finished_step(d)
    if done is not None and done >= c.train.steps:
      logging.info("benchmark: reusing %s (step %d)", d, done)
      report[stage] = dict(seconds=0.0, reused=True, step=done)
      continue
    logging.info("benchmark: training %s (%d steps)", stage, c.train.steps)
    t0 = time.perf_counter()
    r = loop.train(c, d)
    if r.get("stopped_early"):  # SIGTERM: the stage saved a checkpoint; later stages must not use it half-trained
      raise SystemExit(f"benchmark: {stage} stopped early at step {r['step']} of {c.train.steps} (signal); rerun "
                       f"the same command to resume from {d}")
    report[stage] = dict(seconds=time.perf_counter() - t0, reused=False, step=r["step"], eval=r["eval"])
    logging.info("benchmark: %s done in %.0f s: %s", stage, report[stage]["seconds"], r["eval"])
  return report
