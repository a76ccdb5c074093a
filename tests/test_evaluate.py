"""`python -m tandem_jax.evaluate --json` on a tiny primary, on the validation split and on a text file."""

import json

import pytest
from absl import flags

from configs import base
from tandem_jax import evaluate
from tandem_jax.training import loop


@pytest.fixture(scope="module")
def primary_workdir(tmp_path_factory):
  c = base.get_config("primary", "tiny")
  c.data.tokenizer_cache = str(tmp_path_factory.mktemp("tok"))
  c.train.steps, c.train.eval_batches = 1, 1
  wd = str(tmp_path_factory.mktemp("primary"))
  result = loop.train(c, wd)
  return wd, result["eval"]


def test_evaluate_json_matches_training_eval(primary_workdir, capsys, tmp_path):
  wd, train_eval = primary_workdir
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["evaluate", f"--workdir={wd}", "--json"])
  evaluate.main([])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["stage"] == "primary" and out["step"] == 1 and out["source"] == "validation"
  assert abs(out["loss"] - train_eval["loss"]) < 1e-5 and out["accuracy"] == train_eval["accuracy"]

  text = tmp_path / "t.txt"
  text.write_text("We the People of the United States, in Order to form a more perfect Union, " * 20)
  res = evaluate.evaluate_workdir(wd, text_file=str(text))
  assert res["source"] == str(text) and res["tokens"] > 0 and res["loss"] > 0
  flags.FLAGS.unparse_flags()
