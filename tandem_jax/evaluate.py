"""Metrics of a trained model: ``python -m tandem_jax.evaluate --workdir=DIR [--text_file=F] [--json]``.

Reports loss and next-token accuracy on the run's validation split (or on any plain-text file) and, for models
with a primary to compare against, agreement with the primary's argmax and the mean TV distance to it (Table 1).
The standalone secondary is compared with ``--primary_workdir`` (default: the one its config names, if any).
"""

from __future__ import annotations

import json
import os

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir", allow_override=True)
_TEXT = flags.DEFINE_string("text_file", None, "evaluate on this plain-text file instead of the validation split", allow_override=True)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table", allow_override=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", allow_override=True)
_BATCHES = flags.DEFINE_integer("max_batches", None, "evaluate at most this many batches (default: config)", allow_override=True)
_PRIMARY = flags.DEFINE_string("primary_workdir", None, "reference primary for a standalone secondary's agreement/TV", allow_override=True)
flags.mark_flags_as_required(["workdir"])


def evaluate_workdir(workdir: str, text_file: str | None = None, step: int | None = None,
                     max_batches: int | None = None, primary_workdir: str | None = None) -> dict:
  """The metrics dict ``evaluate`` prints (plus "stage", "step", "source")."""
  import numpy as np
  from tandem_jax import data as data_lib
  from tandem_jax import workdir as workdir_lib
  from tandem_jax.training import evaluation, inputs

  loaded = workdir_lib.load_workdir(workdir, step=step)
  config = loaded.config
  mesh = workdir_lib.default_mesh(config)
  seq = config.data.seq_len
  if text_file:
    with open(os.path.expanduser(text_file), encoding="utf-8") as fh:
      text = fh.read()
    rows = data_lib.tokenize_and_pack([text], loaded.tokenizer, seq)
    if len(rows) == 0:
      raise ValueError(f"{text_file!r} has fewer than seq_len={seq} tokens")
    source = os.path.abspath(text_file)
  else:
    _, val_docs = inputs.documents(config)
    rows = data_lib.tokenize_and_pack(val_docs, loaded.tokenizer, seq)
    source = "validation"
  batch_size = max(1, min(int(config.train.batch_size), len(rows)))
  batches = data_lib.make_eval_batches(np.asarray(rows), batch_size, max_batches or config.train.eval_batches)

  reference = None
  if config.stage in ("secondary", "secondary_distil"):
    path = primary_workdir or config.init.primary_workdir
    if path:
      reference = workdir_lib.load_workdir(path, mesh=mesh).model
  model = loaded.model
  metrics = evaluation.Evaluator(config, mesh)(model, reference, batches)
  return {"workdir": loaded.workdir, "stage": loaded.stage, "step": loaded.step, "source": source, **metrics}


def main(argv):
  del argv
  result = evaluate_workdir(_WORKDIR.value, _TEXT.value, _STEP.value, _BATCHES.value, _PRIMARY.value)
  if _JSON.value:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f"{k:>20s}  {v:.4f}" if isinstance(v, float) else f"{k:>20s}  {v}")


if __name__ == "__main__":
  from tandem_jax import cli
  cli.run(main, "evaluate", reads_workdir=True)
