"""Tables 1 and 3 (quality): validation accuracy, cross-entropy, agreement with the primary's argmax and TV to
the primary, with the same evaluator the training loop uses (``tandem_jax.training.evaluation``)."""

from __future__ import annotations

import copy
import os

import jax
import numpy as np
from flax import nnx

from tandem_jax import data as data_lib
from tandem_jax import workdir as workdir_lib
from tandem_jax.training import evaluation, inputs

TABLE1 = ("secondary", "secondary_long", "secondary_distil", "tandem", "tandem_distil")


def load_models(workdir: str) -> dict:
  """Every trained model of the chain, by stage (``Loaded`` records of tandem_jax.workdir)."""
  from configs import benchmark as bench_cfg
  return {s: workdir_lib.load_workdir(os.path.join(workdir, s)) for s in bench_cfg.STAGES}


def validation_rows(loaded: dict):
  """The validation split, tokenized with the chain's tokenizer (int32[N, seq_len])."""
  primary = loaded["primary"]
  return inputs.load(primary.config, os.path.join(primary.workdir, workdir_lib.TOKENIZER_FILE)).val_rows


def _metrics(m: dict) -> dict:
  out = dict(accuracy=m["accuracy"], ce=m["loss"], tokens=m["tokens"])
  if "agreement" in m:
    out.update(agreement=m["agreement"], tv=m["tv"])
  return out


def _as(config, stage: str, block_len: int | None = None):
  c = copy.deepcopy(config)
  c.stage = stage
  if block_len is not None:
    c.tandem.block_len = int(block_len)
  return c


def same_weights(a, b) -> bool:
  """Whether two modules hold the same parameters (same tree, equal values)."""
  pa, pb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
  la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
  return (jax.tree.structure(pa) == jax.tree.structure(pb) and
          all(x.shape == y.shape and bool(np.array_equal(np.asarray(x), np.asarray(y))) for x, y in zip(la, lb)))


def evaluate(bench, loaded: dict, val_rows) -> dict:
  """{"table1": {model: metrics}, "table3_quality": {model: metrics}, "eval_tokens": n}.

  The primary's forward over the validation batches is computed once: it is the reference of every secondary's
  agreement and TV and the input of every tandem (whose frozen primary is checked to be the same weights; one that
  is not runs its own).
  """
  primary = loaded["primary"]
  cfg = primary.config
  batches = data_lib.make_eval_batches(val_rows, cfg.train.batch_size, int(bench.eval_batches))
  mesh = workdir_lib.default_mesh(cfg)
  primary_out = evaluation.Evaluator(_as(cfg, "primary"), mesh).primary_outputs(primary.model, batches)

  def run(config, model, shared=True):
    out = primary_out if shared else None
    return _metrics(evaluation.Evaluator(config, mesh)(model, None if shared else primary.model, batches, out))

  def tandem(stage, block_len=None):
    m = loaded[stage].model
    return run(_as(loaded[stage].config, stage, block_len), m, shared=same_weights(m.primary, primary.model))

  table1 = {}
  for s in ("secondary", "secondary_long", "secondary_distil"):
    table1[s] = run(_as(loaded[s].config, "secondary"), loaded[s].model)
  for s in ("tandem", "tandem_distil"):
    table1[s] = tandem(s)
  table1["primary"] = run(_as(cfg, "primary"), primary.model)

  gamma = int(bench.decode.standalone_block_len)
  table3 = {
      "primary": table1["primary"],
      "mid": run(_as(cfg, "secondary"), loaded["mid"].model),
      "secondary": table1["secondary"],
      f"tandem_ce@{gamma}": tandem("tandem", gamma),
      f"tandem_distil@{gamma}": tandem("tandem_distil", gamma),
  }
  return dict(table1=table1, table3_quality=table3, eval_tokens=table1["primary"]["tokens"],
              train_block_len=int(loaded["tandem"].config.tandem.block_len), inference_block_len=gamma)
