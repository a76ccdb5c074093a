"""Text in, batches out: the embedded corpus, the SentencePiece tokenizer, packing and the Grain pipeline.

Typical use (the train entry point does this)::

  train_docs, val_docs = load_documents("default")
  tok = load_or_train_tokenizer(workdir_cache, lambda: train_docs, 8192, corpus_id=default_corpus_id())
  train_rows = tokenize_and_pack(train_docs, tok, seq_len)           # int32[N, seq_len]
  it = make_train_loader(train_rows, global_batch_size, seed,
                         shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)                                                   # {"tokens": int32[local_batch, seq_len]}
  eval_batches = make_eval_batches(tokenize_and_pack(val_docs, tok, seq_len), eval_batch_size)
"""

from tandem_jax.data.corpus import (
    default_corpus_id,
    document_fingerprint,
    load_default_documents,
    load_text_files,
    split_documents,
)
from tandem_jax.data.pipeline import make_eval_batches, make_train_loader, tokenize_and_pack
from tandem_jax.data.sources import SOURCES, load_documents
from tandem_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    TokenizerProtocol,
    load_or_train_tokenizer,
    tokenizer_cache_path,
    train_tokenizer,
)

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "SOURCES", "Tokenizer", "TokenizerProtocol", "default_corpus_id",
    "document_fingerprint", "load_default_documents", "load_documents", "load_or_train_tokenizer", "load_text_files",
    "make_eval_batches", "make_train_loader", "split_documents", "tokenize_and_pack", "tokenizer_cache_path",
    "train_tokenizer",
]
