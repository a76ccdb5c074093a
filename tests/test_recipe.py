"""The drafter recipe for a pretrained primary (tandem_jax.recipe), on a tiny random primary.

Checks what the recipe promises: frozen embeddings and output rows copied from the primary, a draft vocabulary of
the data's most frequent tokens, a resumed run equal to an unbroken one, and lossless decoding with the trained
drafter (greedy, every row, several γ) for Tandem + SPEED and a standalone draft-vocabulary drafter.
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from tandem_jax import recipe, recipe_data
from tandem_jax.decoding import generate
from tandem_jax.workdir import load_workdir


@pytest.fixture(scope="module")
def primary_dir(tmp_path_factory):
  """A tiny random primary written as an imported-model workdir (recipe.tiny_primary)."""
  return recipe.tiny_primary(str(tmp_path_factory.mktemp("tiny") / "primary"))


RC = dataclasses.replace(recipe.PRESETS["tiny"], steps=4, checkpoint_every=2, draft_vocab_size=96)


@pytest.fixture(scope="module")
def trained(primary_dir, tmp_path_factory):
  path, docs = primary_dir
  wd = str(tmp_path_factory.mktemp("drafter"))
  summary = recipe.train(path, wd, RC, documents=docs, progress=lambda _: None)
  return wd, summary


def test_recipe_model_and_data(primary_dir, trained):
  wd, summary = trained
  assert summary["steps"] == RC.steps and 0.0 <= summary["validation"]["agreement"] <= 1.0
  run, primary = load_workdir(wd), load_workdir(primary_dir[0]).model
  tandem = run.model
  sec = tandem.secondary
  ids = np.asarray(sec.draft_ids[...])
  data = np.load(os.path.join(wd, recipe.DATA_DIR, "tokens.npy")), np.load(os.path.join(wd, recipe.DATA_DIR,
                                                                                         "valid.npy"))
  # the draft vocabulary: the most frequent tokens of the data, sorted by id
  assert len(ids) == RC.draft_vocab_size and np.all(np.diff(ids) > 0)
  counts = np.bincount(data[0][data[1]], minlength=primary.cfg.vocab_size)
  assert counts[ids].min() >= np.delete(counts, ids).max()
  # frozen: embedding and output rows are the primary's, untouched by training; the layers did train
  emb = np.asarray(primary.embed.embedding[...])
  np.testing.assert_array_equal(np.asarray(sec.embed.embedding[...]), emb)
  np.testing.assert_array_equal(np.asarray(sec.lm_head.kernel[...]), emb[ids].T)
  np.testing.assert_array_equal(np.asarray(tandem.primary.embed.embedding[...]), emb)
  assert not np.allclose(np.asarray(sec.layers[0].attn.q_proj.kernel[...]),
                         np.asarray(primary.layers[0].attn.q_proj.kernel[...]))
  # the cached labels are the primary's argmax over each sequence
  labels = np.load(os.path.join(wd, recipe.DATA_DIR, "labels.npy"))
  logits = jax.jit(lambda t: primary.forward(t)[0])(data[0][:2])
  np.testing.assert_array_equal(labels[:2], np.argmax(np.asarray(logits), -1))


def test_recipe_resume_equals_unbroken_run(primary_dir, trained, tmp_path):
  wd, _ = trained
  broken = str(tmp_path / "broken")
  shutil.copytree(wd, broken)
  shutil.rmtree(os.path.join(broken, "checkpoints", str(RC.steps)))  # killed after the step-2 checkpoint
  os.remove(os.path.join(broken, recipe.SUMMARY_FILE))  # (written only when a run finishes)
  lines = []
  recipe.train(primary_dir[0], broken, RC, documents=primary_dir[1], progress=lines.append)
  assert any("resumed at step 2" in line for line in lines)
  assert not any("self-distillation" in line for line in lines)  # the cached data were reused
  a, b = load_workdir(wd).model.secondary, load_workdir(broken).model.secondary
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))
  lines.clear()
  recipe.train(primary_dir[0], broken, RC, documents=primary_dir[1], progress=lines.append)
  assert lines == [f"  finished run reused ({broken})"]
  with pytest.raises(ValueError, match="other settings.*lr"):
    recipe.train(primary_dir[0], broken, dataclasses.replace(RC, lr=0.5), documents=primary_dir[1])


def test_recipe_drafters_are_lossless(primary_dir, trained):
  tandem = load_workdir(trained[0]).model
  rng = np.random.default_rng(0)
  v = tandem.primary.cfg.vocab_size
  prompts = [rng.integers(3, v, rng.integers(2, 12)).tolist() for _ in range(5)]
  budgets = rng.integers(1, 16, len(prompts)).tolist()
  ar = generate("ar", prompts, primary=tandem.primary, max_new_tokens=budgets)
  standalone = recipe.build_drafter(tandem.primary, dataclasses.replace(RC, kind="standalone"),
                                    np.asarray(tandem.secondary.draft_ids[...]), seed=3)
  for gamma in (1, 2, 3):  # one compiled program per method (K = 3), every row checked
    ts = generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=budgets, block_len=gamma, max_block_len=3)
    sp = generate("speed", prompts, primary=tandem.primary, drafter=standalone, max_new_tokens=budgets,
                  block_len=gamma, max_block_len=3)
    assert ts.tokens == ar.tokens and sp.tokens == ar.tokens, gamma
  assert ts.stats["accepted"].sum() > 0  # the drafts are not all rejected


def test_exact_top_k_equals_lax_top_k():
  rng = np.random.default_rng(0)
  for shape, k, chunk in (((3, 5000), 32, 32), ((2, 4, 49152), 32, 32), ((5, 1000), 7, 16), ((2, 300), 32, 32)):
    x = rng.normal(size=shape).astype(np.float32)
    vals, ids = recipe_data.exact_top_k(x, k, chunk)
    ref_vals, ref_ids = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))


def test_self_distill_equals_generate_and_a_full_forward(primary_dir):
  """One pass per batch (prefill + cached greedy steps) gives the tokens `generate("ar")` gives and, at every
  valid position, the labels, top-k log-probabilities and hidden states of one full forward over the result."""
  primary = load_workdir(primary_dir[0]).model
  v = primary.cfg.vocab_size
  rng = np.random.default_rng(1)
  prompts = np.full((5, 9), -1, np.int32)
  for r in range(5):  # ragged, -1 padded, as topic_prompts makes them
    n = int(rng.integers(2, 10))
    prompts[r, :n] = rng.integers(3, v, n)
  rows = [[int(t) for t in p if t >= 0] for p in prompts]
  eos = generate("ar", rows[:1], primary=primary, max_new_tokens=8, eos_id=None).tokens[0][3]  # fires in row 0
  out = recipe_data.self_distill(primary, prompts, 8, 3, eos, (0, primary.cfg.num_layers), 8)
  ar = generate("ar", rows, primary=primary, max_new_tokens=8, eos_id=eos).tokens
  assert len(ar[0]) <= 4  # an EOS ended row 0 early
  logits, hidden = jax.jit(lambda t: primary.forward(t, return_hidden=True))(out["tokens"])
  logp = jax.nn.log_softmax(logits, -1)
  ref_vals, ref_ids = jax.lax.top_k(logp, 8)
  for r, row in enumerate(rows):
    n = len(row) + len(ar[r])
    np.testing.assert_array_equal(out["tokens"][r, :n], row + ar[r])
    assert out["valid"][r, :n].all() and not out["valid"][r, n:].any()
    np.testing.assert_array_equal(out["labels"][r, :n], np.argmax(np.asarray(logits[r, :n]), -1))
    np.testing.assert_array_equal(out["top_ids"][r, :n], np.asarray(ref_ids[r, :n]))
    np.testing.assert_allclose(out["top_logp"][r, :n], np.asarray(ref_vals[r, :n]), rtol=2e-3, atol=2e-3)
    for j, m in enumerate((0, primary.cfg.num_layers)):
      np.testing.assert_allclose(out["hidden"][j, r, :n], np.asarray(hidden[m, r, :n]), rtol=2e-3, atol=2e-3)
