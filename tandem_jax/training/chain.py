"""The paper's chain of training runs (PAPER_NOTES §1.3-1.4): each run in ``<root>/<name>/``, initialised from the
workdirs of earlier runs, finished runs reused. The one copy of it: the quickstart, the benchmark
(:mod:`tandem_jax.bench.chain`) and the tests' tiny chain call :func:`train_chain`.

  primary -> secondary -> secondary_distil (teacher: primary, student from secondary) -> tandem (Tandem-CE:
  primary frozen, secondary from secondary) -> tandem_distil (from tandem) -> router (on tandem_distil);
  llm_to_slm (primary + secondary); the benchmark adds mid (a second primary run) and secondary_long (secondary
  continued alone for the tandem's steps).

A run stopped early by SIGTERM has saved a checkpoint but is not finished: the chain stops there (SystemExit), as
later runs would build on a half-trained model; rerunning the same command resumes it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping

import ml_collections

from tandem_jax import checkpoint
from tandem_jax.training import loop

# run name -> {config.init field: name of the run it is initialised from}
INIT = {
    "primary": {}, "mid": {},
    "secondary": {"primary_workdir": "primary"},  # the primary only for agreement/TV metrics
    "secondary_long": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "secondary_distil": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "tandem": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "tandem_distil": {"tandem_workdir": "tandem"},
    "llm_to_slm": {"primary_workdir": "primary", "secondary_workdir": "secondary"},
    "router": {"tandem_workdir": "tandem_distil"},
}


def finished_step(run_dir: str) -> int | None:
  """The latest checkpointed step of a workdir, or None without checkpoints."""
  if not os.path.isdir(os.path.join(run_dir, checkpoint.CHECKPOINT_DIR)):
    return None
  mngr = checkpoint.manager(run_dir, async_save=False)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def wire(configs: Mapping[str, ml_collections.ConfigDict], root: str) -> dict[str, ml_collections.ConfigDict]:
  """Sets each config's ``init`` fields to the workdirs of the runs :data:`INIT` names (in place; returned)."""
  unknown = sorted(set(configs) - set(INIT))
  if unknown:
    raise ValueError(f"no chain wiring for runs {unknown}; known runs: {sorted(INIT)}")
  for name, c in configs.items():
    for field, src in INIT[name].items():
      if src not in configs:
        raise ValueError(f"run {name!r} is initialised from run {src!r} (config.init.{field}), which the chain "
                         f"does not have; runs: {list(configs)}")
      c.init[field] = os.path.join(root, src)
  return dict(configs)


def train_chain(configs: Mapping[str, ml_collections.ConfigDict], root: str) -> dict[str, dict]:
  """Trains the runs in order (``{run name: config}``, names from :data:`INIT`), each in ``<root>/<name>``.

  A run whose workdir already holds a checkpoint at its ``train.steps`` is reused. Returns per run the result of
  :func:`loop.train` (``step``, ``train``, ``eval``, ``state``, ...) plus ``seconds``, ``reused`` and ``workdir``;
  a reused run has only ``step``, ``seconds`` (0), ``reused`` and ``workdir``. Raises SystemExit when a run stops
  early (SIGTERM), naming the run and its workdir.
  """
  root = os.path.abspath(os.path.expanduser(root))
  report = {}
  for name, c in wire(configs, root).items():
    d = os.path.join(root, name)
    done = finished_step(d)
    if done is not None and done >= c.train.steps:
      logging.info("chain: reusing %s (step %d)", d, done)
      report[name] = dict(seconds=0.0, reused=True, step=done, workdir=d)
      continue
    logging.info("chain: training %s (%d steps)", name, c.train.steps)
    t0 = time.perf_counter()
    r = loop.train(c, d)
    if r.get("stopped_early"):  # the run saved a checkpoint; later runs must not use it half-trained
      raise SystemExit(f"chain: {name} stopped early at step {r['step']} of {c.train.steps} (signal); rerun the "
                       f"same command to resume from {d}")
    report[name] = dict(r, seconds=time.perf_counter() - t0, reused=False, workdir=d)
    logging.info("chain: %s done in %.0f s: %s", name, report[name]["seconds"], r.get("eval"))
  return report
