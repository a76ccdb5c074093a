"""The primary stage end to end on :tiny: resume after a stop/SIGTERM is bitwise identical, NaN stops the run
naming the step, workdir round trips, local text data."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from tandem_jax import workdir as workdir_lib
from tandem_jax.models import Transformer
from tandem_jax.training import inputs, loop, stages


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizers"))


def stage_config(stage, tok_cache, **train):
  c = base.get_config(stage, "tiny")
  c.data.tokenizer_cache = tok_cache
  for k, v in train.items():
    c.train[k] = v
  return c


def losses_of(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    for line in fh:
      r = json.loads(line)
      if r["split"] == "train":
        out[r["step"]] = r["loss"]
  return out


def leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_after_sigterm_is_bitwise_identical(tmp_path, tok_cache):
  cfg = stage_config("primary", tok_cache, steps=4, checkpoint_every=3, log_every=1)
  full = loop.train(cfg, str(tmp_path / "full"))
  assert full["step"] == 4 and not full["stopped_early"]
  assert set(full["eval"]) >= {"loss", "accuracy"}

  def sigterm_at_1(step, state, metrics):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  part = loop.train(cfg, str(tmp_path / "split"), hooks=[sigterm_at_1])
  assert part["stopped_early"] and part["step"] == 1
  assert workdir_lib.load_workdir(str(tmp_path / "split")).step == 1
  resumed = loop.train(cfg, str(tmp_path / "split"))
  assert resumed["step"] == 4
  assert leaves_equal(full["state"]["params"], resumed["state"]["params"])
  assert leaves_equal(full["state"]["opt_state"], resumed["state"]["opt_state"])
  assert losses_of(str(tmp_path / "full")) == losses_of(str(tmp_path / "split"))

  wd = tmp_path / "full"
  assert {"config.json", "tokenizer.model", "metrics.jsonl", "tb", "checkpoints"} <= set(os.listdir(wd))
  loaded = workdir_lib.load_workdir(str(wd))
  assert isinstance(loaded.model, Transformer) and loaded.step == 4 and loaded.stage == "primary"
  assert leaves_equal(loaded.model.embed.embedding[...], full["state"]["params"]["embed"]["embedding"])

  # write_workdir (used by convert) round trips through load_workdir.
  out = workdir_lib.write_workdir(str(tmp_path / "written"), loaded.config, loaded.model,
                                  os.path.join(wd, "tokenizer.model"))
  again = workdir_lib.load_workdir(out)
  assert again.step == 0 and leaves_equal(jax.tree.leaves(jax.tree.map(np.asarray, again.model)),
                                          jax.tree.leaves(jax.tree.map(np.asarray, loaded.model)))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tok_cache, monkeypatch):
  cfg = stage_config("primary", tok_cache, steps=2, checkpoint_every=1)
  loop.train(cfg, str(tmp_path))
  real = stages.loss_fn

  def poisoned(config, bundle, batch):
    loss, metrics = real(config, bundle, batch)
    return loss * jnp.nan, metrics

  monkeypatch.setattr(stages, "loss_fn", poisoned)
  cfg.train.steps = 4
  with pytest.raises(FloatingPointError, match="at step 3.*last good checkpoint is step 2"):
    loop.train(cfg, str(tmp_path))
  loaded = workdir_lib.load_workdir(str(tmp_path))
  assert loaded.step == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.tree.map(np.asarray, loaded.model)))


def test_missing_workdir_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    workdir_lib.load_workdir(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    workdir_lib.load_workdir(str(tmp_path))


def test_local_text_source(tmp_path, tok_cache):
  docs, _ = inputs.documents(base.get_config("primary", "tiny"))
  for i, d in enumerate(docs[:5]):
    (tmp_path / f"doc{i}.txt").write_text(d)
  c = stage_config("primary", tok_cache)
  c.data.source, c.data.path, c.data.max_documents, c.data.val_fraction = "text", str(tmp_path / "*.txt"), 0, 0.2
  data = inputs.load(c)
  assert data.tokenizer.vocab_size == c.data.vocab_size
  assert data.train_rows.shape[1] == c.data.seq_len and len(data.val_rows) > 0
