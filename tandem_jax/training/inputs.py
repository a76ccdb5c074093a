"""A training run's inputs: from ``config.data`` to its documents, its tokenizer and packed train/validation rows
(the text-to-rows machinery itself is the :mod:`tandem_jax.data` package)."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from tandem_jax import data as data_lib
from tandem_jax.interop.hf_tokenizer import load_tokenizer


@dataclasses.dataclass
class Data:
  tokenizer: data_lib.Tokenizer
  train_rows: np.ndarray  # int32[N, seq_len]
  val_rows: np.ndarray


def documents(config) -> tuple[list[str], list[str]]:
  """(train_docs, val_docs) for ``config.data``, capped by ``max_documents`` (0 = all)."""
  d = config.data
  train, val = data_lib.load_documents(
      d.source, d.path or None, val_fraction=d.val_fraction, seed=d.seed, jsonl_field=d.jsonl_field,
      text_field=d.text_field or None, train_split=d.train_split, val_split=d.val_split or None,
      data_dir=d.data_dir or None, seqio_module=d.seqio_module or None, max_documents=d.max_documents or None)
  if d.max_documents:
    train = train[: d.max_documents]
    val = val[: max(1, int(round(d.max_documents * d.val_fraction)))]
  if not val:
    raise ValueError(f"config.data: the validation split is empty ({len(train)} training documents, val_fraction "
                     f"{d.val_fraction}); use more documents or a larger val_fraction")
  return train, val


def corpus_id(config, train_docs) -> str:
  d = config.data
  if d.source == "default" and not d.max_documents:
    return data_lib.default_corpus_id()
  return f"{d.source}-{data_lib.document_fingerprint(train_docs)}"


def tokenizer_for(config, train_docs, existing: str | None = None) -> data_lib.Tokenizer:
  """The tokenizer at ``existing`` (a workdir's copy) if given, else the cached one trained on ``train_docs``."""
  d = config.data
  if existing:
    tok = load_tokenizer(existing)
  else:
    tok = data_lib.load_or_train_tokenizer(os.path.expanduser(d.tokenizer_cache), lambda: train_docs, d.vocab_size,
                                           corpus_id=corpus_id(config, train_docs), seed=d.seed)
  if tok.vocab_size != d.vocab_size:
    raise ValueError(f"config.data.vocab_size is {d.vocab_size} but the tokenizer has {tok.vocab_size} ids "
                     f"({existing or 'cache'})")
  return tok


def load(config, tokenizer_path: str | None = None) -> Data:
  train_docs, val_docs = documents(config)
  tok = tokenizer_for(config, train_docs, tokenizer_path)
  seq = config.data.seq_len
  train_rows = data_lib.tokenize_and_pack(train_docs, tok, seq)
  val_rows = data_lib.tokenize_and_pack(val_docs, tok, seq)
  logging.info("data: %d train rows, %d validation rows of %d tokens", len(train_rows), len(val_rows), seq)
  return Data(tok, train_rows, val_rows)


def local_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous slice of a global batch (the layout make_array_from_process_local_data expects)."""
  n = rows.shape[0] // process_count
  return rows[process_index * n:(process_index + 1) * n]
