"""The benchmark's eight models, trained by the one chain of :mod:`tandem_jax.training.chain`, each in
``<workdir>/<stage>/``, skipping finished stages.

  primary -> mid (a second primary-stage run, mid size) -> secondary -> secondary_long (continues secondary alone
  for the tandem's steps: Table 1's equal-training control) -> secondary_distil (teacher: primary, student from
  secondary) -> tandem (Tandem-CE: primary frozen, secondary from secondary) -> tandem_distil (from
  tandem) -> router (on tandem_distil)
"""

from __future__ import annotations

import os

from configs import benchmark as bench_cfg
from tandem_jax.training import chain


def tokenizer_cache(bench, workdir: str) -> str:
  return bench.tokenizer_cache or os.path.join(workdir, "tokenizer_cache")


def stage_configs(bench, workdir: str) -> dict:
  tok = tokenizer_cache(bench, workdir)
  configs = {stage: bench_cfg.stage_config(bench, stage, tok) for stage in bench_cfg.STAGES}
  return chain.wire(configs, os.path.abspath(os.path.expanduser(workdir)))


def train_all(bench, workdir: str) -> dict:
  """Trains what is missing; returns per stage ``{"seconds", "reused", "step", "eval"}``. Raises SystemExit when
  a stage stops early (SIGTERM)."""
  report = chain.train_chain(stage_configs(bench, workdir), workdir)
  return {s: {k: r[k] for k in ("seconds", "reused", "step", "eval") if k in r} for s, r in report.items()}
