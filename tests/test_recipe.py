"""The drafter recipe for a pretrained primary (tandem_jax.recipe), on a tiny random primary.

Checks what the recipe promises: frozen embeddings and output rows copied from the primary, a draft vocabulary of
the data's most frequent tokens, a resumed run equal to an unbroken one, and lossless decoding with the trained
drafter (greedy, every row, several γ) for Tandem + SPEED and a standalone draft-vocabulary drafter.
"""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
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


def test_corpus_windows_join_the_data_teacher_forced(primary_dir, tmp_path):
  """``num_corpus_sequences`` (the ``cpu_long`` preset's extra data): corpus windows the primary reads teacher-forced
  join the generated rows, every position valid, with the labels and hidden states of a full forward."""
  assert recipe.PRESETS["cpu_long"].num_corpus_sequences > 0
  path, docs = primary_dir
  run = load_workdir(path)
  primary, tok = run.model, run.tokenizer
  rc = dataclasses.replace(RC, num_corpus_sequences=3)
  layers = (primary.cfg.num_layers,)
  data = recipe.build_data(primary, tok, docs, rc, layers, str(tmp_path / "data"))
  t = rc.prompt_len + rc.gen_len
  assert data["tokens"].shape == (rc.num_sequences + 3, t) and data["hidden"].shape[1] == rc.num_sequences + 3
  windows = recipe_data.corpus_prompts(tok, docs, 3, t, rc.seed + 1)
  logits, hidden = jax.jit(lambda x: primary.forward(x, return_hidden=True))(windows)
  for w in range(3):
    rows = np.flatnonzero((data["tokens"] == windows[w]).all(1))
    assert len(rows) == 1, "each corpus window is one row of the data"
    r = int(rows[0])
    assert data["valid"][r].all()
    np.testing.assert_array_equal(data["labels"][r], np.argmax(np.asarray(logits[w]), -1))
    np.testing.assert_allclose(data["hidden"][0, r], np.asarray(hidden[layers[0], w]), rtol=2e-3, atol=2e-3)
  # the cache is keyed by the setting: the same call reuses it, a run without the windows rebuilds
  again = recipe.build_data(primary, tok, docs, rc, layers, str(tmp_path / "data"))
  np.testing.assert_array_equal(again["tokens"], data["tokens"])
  plain = recipe.build_data(primary, tok, docs, RC, layers, str(tmp_path / "data"))
  assert plain["tokens"].shape[0] == RC.num_sequences


def test_self_distill_sampled_continuations(primary_dir):
  """temperature > 0: the continuations are draws from the primary's softmax(logits / T) (first generated token
  of 1,024 rows of one prompt against the primary's probabilities, its five likeliest tokens within 5 sigma), the kept labels / top-k still match a full
  forward over the sampled tokens, and a temperature near 0 gives the greedy continuation."""
  primary = load_workdir(primary_dir[0]).model
  v = primary.cfg.vocab_size
  prompt = np.random.default_rng(2).integers(3, v, (1, 6)).astype(np.int32)
  greedy = recipe_data.self_distill(primary, prompt, 5, 1, None, None, 4)
  cold = recipe_data.self_distill(primary, prompt, 5, 1, None, None, 4, temperature=1e-4, seed=3)
  np.testing.assert_array_equal(cold["tokens"], greedy["tokens"])
  n = 1024
  for temperature in (8.0, 3.0):  # the tiny primary is peaked (its top token ~0.99 at T = 1): spread it
    out = recipe_data.self_distill(primary, np.repeat(prompt, n, 0), 3, 256, None, None, 4,
                                   temperature=temperature, seed=4)
    logits = np.asarray(jax.jit(lambda t: primary.forward(t)[0])(out["tokens"][:8]), np.float64)
    np.testing.assert_array_equal(out["labels"][:8], np.argmax(logits, -1))
    p = np.exp(logits[0, 5] / temperature - np.max(logits[0, 5] / temperature))
    p /= p.sum()
    freq = np.bincount(out["tokens"][:, 6], minlength=v) / n
    top = np.argsort(-p)[:5]
    sigma = np.sqrt(p[top] * (1 - p[top]) / n)
    assert np.all(np.abs(freq[top] - p[top]) <= 5 * sigma + 1e-9), (temperature, freq[top], p[top])
    assert len(np.unique(out["tokens"][:, 6])) > 1 and (out["tokens"][:, 6:] != greedy["tokens"][:, 6:9]).any()


def test_router_heads_learn_on_text_the_secondary_never_trained_on(trained):
  """train_router: both heads on cached sampled continuations (``greedy_head="greedy"``: the greedy head on the
  greedy data, which the secondary trained on); the greedy label is the argmax mismatch against the primary's top-1;
  data and router cached, the router reused while its settings match and retrained when they change."""
  from tandem_jax import recipe_router
  wd = trained[0]
  kw = dict(steps=3, gamma_max=3, top_k=2, hidden=8, batch_size=4, progress=lambda _: None)
  out = recipe_router.train_router(wd, sampled_sequences=4, **kw)
  meta = os.path.join(wd, recipe_router.SAMPLED_DIR, "meta.json")
  assert os.path.isfile(meta) and os.path.isfile(os.path.join(wd, recipe_router.ROUTER_META))
  sampled = np.load(os.path.join(wd, recipe_router.SAMPLED_DIR, "tokens.npy"))
  greedy = np.load(os.path.join(wd, recipe.DATA_DIR, "tokens.npy"))
  assert sampled.shape == (4, greedy.shape[1])
  rows = [0, 4, 5, 6]  # one of the 4 validation rows (16 sequences, a quarter held out), three training rows
  np.testing.assert_array_equal(sampled[:, :RC.prompt_len], greedy[rows, :RC.prompt_len])
  assert (sampled[:, RC.prompt_len:] != greedy[rows, RC.prompt_len:]).any()
  val = out["validation"]
  assert 0.0 < val["sampled_label"] <= 1.0 and 0.0 <= val["greedy_label"] <= 1.0 and val["router_loss"] > 0
  mtime = os.path.getmtime(os.path.join(wd, recipe_router.ROUTER_FILE)), os.path.getmtime(meta)
  again = recipe_router.train_router(wd, sampled_sequences=4, **kw)
  assert again["validation"] == val
  assert (os.path.getmtime(os.path.join(wd, recipe_router.ROUTER_FILE)), os.path.getmtime(meta)) == mtime
  on_greedy = recipe_router.train_router(wd, sampled_sequences=4, greedy_head="greedy", **kw)  # retrained
  mtime2 = os.path.getmtime(os.path.join(wd, recipe_router.ROUTER_FILE))
  assert mtime2 > mtime[0] and on_greedy["validation"]["greedy_pred"] != val["greedy_pred"]
  assert on_greedy["validation"]["greedy_label"] == val["greedy_label"]  # each validated on the same held-out rows
  old = recipe_router.train_router(wd, sampled_sequences=0, **kw)  # both heads on the greedy data: retrained
  assert os.path.getmtime(os.path.join(wd, recipe_router.ROUTER_FILE)) >= mtime2
  assert old["validation"]["sampled_label"] != val["sampled_label"]
  with pytest.raises(ValueError, match="sampled_sequences"):
    recipe_router.train_router(wd, sampled_sequences=1, **kw)
  with pytest.raises(ValueError, match="greedy_head"):
    recipe_router.train_router(wd, greedy_head="sampld", **kw)


def test_router_labels_read_the_primary_top1():
  """The greedy label is 1[argmax q != the first cached top-k id] (-1 off the draft vocabulary: never matched); the
  sampled label is TV over the cached top-k (0 where q equals p on it and p's mass is all there)."""
  from tandem_jax import recipe_router
  q = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]]))
  top_idx = jnp.array([[[0, 1], [1, 2], [-1, 0]]])
  top_logp = jnp.log(jnp.array([[[0.7, 0.3], [0.5, 0.5], [0.6, 0.4]]]))
  y = np.asarray(recipe_router.router_labels(q, top_idx, top_logp))
  np.testing.assert_array_equal(y[0, :, 1], [0.0, 1.0, 1.0])
  assert y[0, 0, 0] == pytest.approx(0.1, abs=1e-5)  # p = (0.7, 0.3, 0), q = (0.7, 0.2, 0.1)
