"""The training loop: config -> mesh -> data -> (restore | init from source workdirs) -> jitted steps -> metrics,
evaluations and checkpoints. ``tandem_jax.train`` is its command line."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tandem_jax import checkpoint, sharding
from tandem_jax import data as data_lib
from tandem_jax import workdir as workdir_lib
from tandem_jax.data.tokenizer import tokenizer_path
from tandem_jax.interop.hf_tokenizer import save_tokenizer
from tandem_jax.models import bundle as bundle_lib
from tandem_jax.training import evaluation, inputs, program as program_lib, stages
from tandem_jax.training.validate import check_coupling, validate
from tandem_jax.training.writer import MetricWriter


def init_from_sources(config, bundle: nnx.Module, mesh) -> dict:
  """Copies the models named in ``config.init`` into ``bundle`` (see bundle.SPECS); returns their provenance."""
  sources = {}
  for attr, field, _ in bundle_lib.spec(config.stage).sources:
    path = config.init[field]
    if not path:
      if field == "secondary_workdir" and config.stage != "secondary":
        logging.warning("config.init.secondary_workdir is empty: the secondary starts from random weights")
      continue
    loaded = workdir_lib.load_workdir(path, mesh=mesh)
    target = getattr(bundle, attr) if attr else bundle
    if type(loaded.model) is not type(target):
      raise ValueError(f"config.init.{field}: {path!r} holds a {type(loaded.model).__name__} (stage "
                       f"{loaded.stage!r}) but stage {config.stage!r} needs a {type(target).__name__} there")
    nnx.update(target, nnx.state(loaded.model, nnx.Param))
    sources[field] = {"workdir": loaded.workdir, "step": loaded.step, "stage": loaded.stage}
    # A tandem run records its own sources too: keep the chain readable from the last workdir.
    upstream = workdir_lib.read_json(loaded.workdir).get("sources")
    if upstream:
      sources[field]["sources"] = upstream
  return sources


def reference_model(config, mesh):
  """The primary used for agreement/TV metrics of the standalone secondary (optional, from init.primary_workdir)."""
  if config.stage == "secondary" and config.init.primary_workdir:
    return workdir_lib.load_workdir(config.init.primary_workdir, mesh=mesh).model
  return None


def _tokenizer_source(config, workdir: str) -> str | None:
  for path in (workdir,) + tuple(config.init[f] for f in ("tandem_workdir", "primary_workdir", "secondary_workdir")):
    if path and tokenizer_path(path):
      return tokenizer_path(path)
  return None


def _finite(metrics: dict) -> tuple[bool, dict]:
  vals = {k: float(v) for k, v in jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")}).items()}
  return all(math.isfinite(v) for v in vals.values()), vals


class Preemption:
  """Whether to stop (after saving) at a step because of SIGTERM; ``close()`` restores the previous handler.

  One process: a SIGTERM handler sets a flag, read at the next step. Several processes must stop at the same step,
  or the one that stops first leaves the others waiting in a collective (the next train step or the save) for
  ever. There JAX's preemption sync manager, started by ``jax.distributed.initialize``, catches SIGTERM on any
  host and agrees on one step for all (``multihost_utils.reached_preemption_sync_point``, asked at every step);
  installing a Python handler would take SIGTERM away from it.
  """

  def __init__(self):
    self.signalled, self._previous = False, None
    self._sync = jax.process_count() > 1
    if self._sync:
      return
    try:
      self._previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))
    except ValueError:  # not the main thread: no preemption handling
      pass

  def __call__(self, step: int) -> bool:
    if self._sync:
      try:
        self.signalled = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service is off
        logging.warning("no preemption handling across processes: %s", e)
        self._sync = False
    return self.signalled

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None,
          hooks: Sequence[Callable[[int, dict, dict], None]] = ()) -> dict:
  """Trains ``config.stage`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Stops at ``config.train.steps``; or earlier, after saving a checkpoint, on SIGTERM or at ``stop_at_step`` (a
  rerun resumes exactly). A non-finite loss raises FloatingPointError naming the step; checkpoints saved before it
  stay. ``hooks`` are called as ``hook(step, state, metrics)`` after every step. Returns the last train and eval
  metrics: ``{"step", "train", "eval", "stopped_early"}``.
  """
  validate(config, process_count=jax.process_count())
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  tr = config.train
  saved = workdir_lib.read_json(workdir) if os.path.isfile(os.path.join(workdir, workdir_lib.CONFIG_FILE)) else {}
  if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) and config.stage in bundle_lib.TANDEM_STAGES + (
      "router",):  # resuming a tandem: its checkpoint's weights fit only the coupling they were trained with
    check_coupling(config, saved, workdir, "the workdir being resumed")
  mesh = sharding.mesh_from_config(config.mesh)
  mngr = checkpoint.manager(workdir, keep=tr.keep_checkpoints)
  latest = mngr.latest_step()

  data = inputs.load(config, _tokenizer_source(config, workdir))
  prog = program_lib.build_train_program(config, mesh)
  it = data_lib.make_train_loader(data.train_rows, tr.batch_size, tr.seed, shard_index=jax.process_index(),
                                  shard_count=jax.process_count())
  if latest is not None:
    logging.info("resuming %s from step %d", workdir, latest)
    r = checkpoint.restore(mngr, latest, prog.abstract_state, it)
    state = prog.state_from(r["params"], r["frozen"], step=latest, opt_state=r.get("opt_state"))
    start = latest
    sources = saved.get("sources")
  else:
    bundle = sharding.create_sharded(lambda rngs: bundle_lib.build_bundle(config, rngs), mesh, prog.rules, tr.seed)
    sources = init_from_sources(config, bundle, mesh)
    state = prog.init_state(bundle)
    del bundle
    start = 0
  if is_main:
    workdir_lib.save_config(workdir, config, sources)
    if tokenizer_path(workdir) is None:
      save_tokenizer(data.tokenizer, workdir)

  reference = reference_model(config, mesh)
  eval_batches = data_lib.make_eval_batches(data.val_rows, tr.batch_size, tr.eval_batches)
  evaluator = evaluation.Evaluator(config, mesh)

  def run_eval(step):
    if not eval_batches:  # train.eval_batches = 0: no evaluation
      return {}
    model, ref = stages.eval_parts(config.stage, prog.bundle(state), reference)
    metrics = evaluator(model, ref, eval_batches)
    writer.write(step, "eval", metrics)
    if is_main:
      logging.info("eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics

  def save(step, current):
    ok, vals = _finite(current)
    if not ok:
      raise FloatingPointError(f"non-finite {vals} at step {step}")
    checkpoint.save(mngr, step, state, it, force=True)

  writer = MetricWriter(workdir, tr.steps, start, label=config.stage)
  preemption = Preemption()
  base_key = jax.random.key(tr.seed)
  pending, window, last_train, last_eval, stopped = None, [], {}, {}, False
  t_start = time.time()
  try:
    for step in range(start + 1, tr.steps + 1):
      batch = prog.global_batch(next(it))
      state, metrics = prog.step(state, batch, jax.random.fold_in(base_key, step))
      if pending is not None:  # check the previous step while this one runs
        ok, vals = _finite(pending[1])
        if not ok:
          raise FloatingPointError(f"non-finite {vals} at step {pending[0]}")
      pending = (step, metrics)
      window.append(metrics)
      for hook in hooks:
        hook(step, state, metrics)
      if step % tr.log_every == 0 or step == tr.steps:
        host = jax.device_get(window)
        last_train = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        window = []
        last_train.update(writer.progress(step, last_train))
        writer.write(step, "train", last_train)
      preempt = preemption(step) or (stop_at_step is not None and step >= stop_at_step)
      if preempt or step % tr.checkpoint_every == 0 or step == tr.steps:
        save(step, metrics)
      if tr.eval_every and step % tr.eval_every == 0 and step != tr.steps:
        last_eval = run_eval(step)
      if preempt:
        logging.info("stopping at step %d (%s); checkpoint saved", step,
                     "SIGTERM" if preemption.signalled else "stop_at_step")
        stopped = True
        break
    else:
      if pending is not None:
        ok, vals = _finite(pending[1])
        if not ok:
          raise FloatingPointError(f"non-finite {vals} at step {pending[0]}")
      last_eval = run_eval(int(jax.device_get(state["step"])))
  except FloatingPointError as e:
    mngr.wait_until_finished()
    raise FloatingPointError(f"{e}: training stopped; the last good checkpoint is step {mngr.latest_step()} in "
                             f"{mngr.directory}") from None
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    preemption.close()
  final_step = int(jax.device_get(state["step"]))
  return {"step": final_step, "train": last_train, "eval": last_eval, "stopped_early": stopped,
          "seconds": time.time() - t_start, "state": state}
