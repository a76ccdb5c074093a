"""Tables 1 and 3 (quality): validation accuracy, cross-entropy, agreement with the primary's argmax and TV to
the primary, with the same evaluator the training loop uses (``tandem_jax.training.evaluation``)."""

from __future__ import annotations

import copy
import os

from tandem_jax import data as data_lib
from tandem_jax import workdir as workdir_lib
from tandem_jax.training import data as data_mod, evaluation

TABLE1 = ("secondary", "secondary_long", "secondary_distil", "tandem", "tandem_distil")


def load_models(workdir: str) -> dict:
  """Every trained model of the chain, by stage (``Loaded`` records of tandem_jax.workdir)."""
  from configs import benchmark as bench_cfg
  return {s: workdir_lib.load_workdir(os.path.join(workdir, s)) for s in bench_cfg.STAGES}


def validation_rows(loaded: dict):
  """The validation split, tokenized with the chain's tokenizer (int32[N, seq_len])."""
  primary = loaded["primary"]
  return data_mod.load(primary.config, os.path.join(primary.workdir, workdir_lib.TOKENIZER_FILE)).val_rows


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


def evaluate(bench, loaded: dict, val_rows) -> dict:
  """{"table1": {model: metrics}, "table3_quality": {model: metrics}, "eval_tokens": n}."""
  primary = loaded["primary"]
  cfg = primary.config
  batches = data_lib.make_eval_batches(val_rows, cfg.train.batch_size, int(bench.eval_batches))
  mesh = workdir_lib.default_mesh(cfg)

  def run(config, model, reference=None):
    return _metrics(evaluation.Evaluator(config, mesh)(model, reference, batches))

  table1 = {}
  for s in ("secondary", "secondary_long", "secondary_distil"):
    table1[s] = run(_as(loaded[s].config, "secondary"), loaded[s].model, primary.model)
  for s in ("tandem", "tandem_distil"):
    table1[s] = run(loaded[s].config, loaded[s].model)
  table1["primary"] = run(_as(cfg, "primary"), primary.model)

  gamma = int(bench.decode.standalone_block_len)
  table3 = {
      "primary": table1["primary"],
      "mid": run(_as(cfg, "secondary"), loaded["mid"].model, primary.model),
      "secondary": table1["secondary"],
      f"tandem_ce@{gamma}": run(_as(loaded["tandem"].config, "tandem", gamma), loaded["tandem"].model),
      f"tandem_distil@{gamma}": run(_as(loaded["tandem_distil"].config, "tandem_distil", gamma),
                                    loaded["tandem_distil"].model),
  }
  return dict(table1=table1, table3_quality=table3, eval_tokens=table1["primary"]["tokens"],
              train_block_len=int(loaded["tandem"].config.tandem.block_len), inference_block_len=gamma)
