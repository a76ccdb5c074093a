"""Measures the data layer on a corpus: documents, tokenizer training time, tokens and packed rows.

  python -m tandem_jax.data.stats                                   # the default corpus, vocab 512 and 8192
  python -m tandem_jax.data.stats --source=text --path='~/txt/*.txt' --vocab_sizes=8192 --seq_lens=256 --json

Training times are the median of ``--repeats`` runs in this process (timings here are noisy when the machine is
shared); token counts include each document's bos and eos.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

from tandem_jax.data import pipeline, sources, tokenizer

_SOURCE = flags.DEFINE_enum("source", "default", list(sources.SOURCES), "Data source.", allow_override=True)
_PATH = flags.DEFINE_string("path", None, "Glob, dataset or Task name, as in load_documents.", allow_override=True)
_VOCAB_SIZES = flags.DEFINE_list("vocab_sizes", ["512", "8192"], "Tokenizer vocabulary sizes to measure.", allow_override=True)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "1024"], "Row lengths to count packed rows for.", allow_override=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Training runs per vocabulary size (the median is reported).", allow_override=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.", allow_override=True)


def measure(source: str, path: str | None, vocab_sizes: list[int], seq_lens: list[int], repeats: int) -> dict:
  """Returns a JSON-able summary; see the module docstring."""
  train_docs, val_docs = sources.load_documents(source, path)
  out = {
      "source": source, "path": path,
      "documents": {"train": len(train_docs), "val": len(val_docs)},
      "bytes": {"train": sum(len(d.encode("utf-8")) for d in train_docs),
                "val": sum(len(d.encode("utf-8")) for d in val_docs)},
      "tokenizers": [],
  }
  for vocab_size in vocab_sizes:
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      tok = tokenizer.train_tokenizer(train_docs, vocab_size)
      seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    tokens = {name: sum(len(ids) for ids in tok.encode_batch(docs, add_bos=True, add_eos=True))
              for name, docs in (("train", train_docs), ("val", val_docs))}
    encode_seconds = time.perf_counter() - start
    rows = {str(n): {name: tokens[name] // n for name in tokens} for n in seq_lens}
    # The packer must agree with the count above: check it on the smaller split.
    assert pipeline.tokenize_and_pack(val_docs, tok, seq_lens[0]).shape[0] == rows[str(seq_lens[0])]["val"]
    out["tokenizers"].append({
        "vocab_size": vocab_size, "train_seconds_median": round(statistics.median(seconds), 3),
        "encode_seconds_all": round(encode_seconds, 2), "tokens": tokens,
        "val_bytes_per_token": round(out["bytes"]["val"] / max(tokens["val"] - 2 * len(val_docs), 1), 3),
        "rows": rows,
    })
  return out


def main(argv):
  del argv
  result = measure(_SOURCE.value, _PATH.value, [int(v) for v in _VOCAB_SIZES.value],
                   [int(n) for n in _SEQ_LENS.value], _REPEATS.value)
  if _JSON.value:
    print(json.dumps(result))
    return
  print(f"{result['source']}: {result['documents']} documents, {result['bytes']} bytes")
  for t in result["tokenizers"]:
    print(f"  vocab {t['vocab_size']}: train {t['train_seconds_median']} s (median), tokens {t['tokens']}, "
          f"{t['val_bytes_per_token']} bytes/token on val, rows {t['rows']}, encoding all took "
          f"{t['encode_seconds_all']} s")


if __name__ == "__main__":
  from tandem_jax import cli
  cli.run(main, "data_stats", workdir_flag=None)
