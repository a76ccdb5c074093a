"""A SentencePiece BPE tokenizer trained locally in about a second, and the interface the rest of the code relies on.

Ids are fixed so configs and models can rely on them: ``pad=0, bos=1, eos=2, unk=3``, then the newline piece, then
the 256 byte pieces ``<0x00>..<0xFF>``, then the learned merges. With ``byte_fallback`` any character the merges do
not cover is spelled as its UTF-8 bytes, so every string encodes and ``<unk>`` is never produced. Normalization is
the identity and whitespace is kept as is, so ``decode(encode(s)) == s`` for any text: what the model sees is exactly
what the corpus holds, newlines included (a newline is one piece, not a byte). No space is prepended to a text,
so decoding is concatenative: decoding a stream of ids piece by piece and joining the strings gives the same text
(except where byte fallback splits one character over several ids).

Training is deterministic: the same texts, vocabulary size and seed give a byte-identical ``.model`` file on every
machine (the thread count is fixed because SentencePiece records it in the file). ``load_or_train_tokenizer`` caches
that file under a name built from (corpus id, vocabulary size, seed), so the primary and the secondary model train
against one tokenizer that is trained once.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# The tokenizer file a workdir (or model directory) holds: ours, or a Hugging Face one (tandem_jax.interop).
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"


def tokenizer_path(directory: str | os.PathLike) -> str | None:
  """The tokenizer file of a workdir or model directory: ``tokenizer.model`` (ours), ``tokenizer.json``, or None."""
  directory = os.path.expanduser(os.fspath(directory))
  for name in (SENTENCEPIECE_FILE, TOKENIZER_JSON):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


_NUM_RESERVED = 4 + 1 + 256  # specials, the newline piece, byte fallback pieces.
MIN_VOCAB_SIZE = _NUM_RESERVED + 1

# Bump when a training option below changes: it is part of the cache key, so stale cached models are not reused.
TRAINER_VERSION = 1
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
    user_defined_symbols=["\n"],
    normalization_rule_name="identity",  # NFKC would rewrite e.g. "ﬁ" -> "fi" and break exact round trips.
    remove_extra_whitespaces=False,
    # No implicit leading space: a word after a newline is tokenized like one at the start of a text, and decoding
    # is concatenative (decode(a + b) == decode(a) + decode(b) at piece boundaries), which streaming output needs.
    add_dummy_prefix=False,
    split_digits=True,  # Numbers as digit sequences, as in Llama/Gemma: no arbitrary multi-digit merges.
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,  # Rare characters fall back to bytes instead of taking vocabulary slots.
    input_sentence_size=0,  # We sample the input ourselves, with our seed (SentencePiece's sampler has none).
    max_sentence_length=1 << 16,  # Some paragraphs exceed the default 4192 bytes and would be silently dropped.
    num_threads=2,  # Fixed: recorded in the .model file, so a machine-dependent value would change its bytes.
    minloglevel=2,
)


@runtime_checkable
class TokenizerProtocol(Protocol):
  """What the data pipeline, training and decoding need from a tokenizer (a Hugging Face or GGUF one can adapt)."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class Tokenizer:
  """A SentencePiece model held in memory (its serialized proto), satisfying ``TokenizerProtocol``."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Reads a ``.model`` file written by ``save`` or by SentencePiece itself."""
    if not os.path.exists(path):
      raise FileNotFoundError(f"No tokenizer model at {os.fspath(path)!r}.")
    with open(path, "rb") as fh:
      return cls(fh.read())

  def save(self, path: str | os.PathLike) -> None:
    """Writes the ``.model`` file atomically (a concurrent reader sees the old file or the whole new one)."""
    _atomic_write(os.fspath(path), self._proto)

  @property
  def serialized_model(self) -> bytes:
    return self._proto

  @property
  def fingerprint(self) -> str:
    """sha256 prefix of the model file: store it with checkpoints to detect a tokenizer mismatch."""
    return hashlib.sha256(self._proto).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Returns the ids of ``text``, optionally framed by ``bos_id`` / ``eos_id``."""
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    """Encodes many texts in one call (SentencePiece spreads them over its C++ threads)."""
    return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of ``ids``; pad ids are skipped, bos/eos decode to nothing, nothing stops early."""
    if hasattr(ids, "__array__"):  # numpy or jax arrays, of any rank.
      ids = np.asarray(ids).reshape(-1).tolist()
    return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as fh:
      fh.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _training_lines(texts: Iterable[str], max_bytes: int, seed: int) -> list[str]:
  """Non-empty lines of ``texts``; if they exceed ``max_bytes``, a seeded random subset kept in corpus order."""
  lines = [line for text in texts for line in text.split("\n") if line.strip()]
  sizes = np.fromiter((len(line.encode("utf-8")) for line in lines), dtype=np.int64, count=len(lines))
  if sizes.sum() <= max_bytes:
    return lines
  order = np.random.default_rng(seed).permutation(len(lines))
  keep = order[np.cumsum(sizes[order]) <= max_bytes]
  return [lines[i] for i in np.sort(keep)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str | os.PathLike | None = None,
                    seed: int = 0, max_training_bytes: int = 16 << 20) -> Tokenizer:
  """Trains a byte-fallback BPE tokenizer on ``texts`` (pass the training split only).

  Args:
    texts: documents; each is cut into lines, the unit SentencePiece learns merges within.
    vocab_size: total number of ids, including the 261 reserved ones (specials, newline, bytes).
    model_path: if given, where the ``.model`` file is written.
    seed: picks the sampled lines when the input exceeds ``max_training_bytes``.
    max_training_bytes: bound on the training input, so training takes seconds on any corpus (BPE 8k on 12 MB of
      prose takes about 1 s here).

  Returns:
    The trained ``Tokenizer``.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (4 special ids, the newline piece and 256 byte "
                     f"pieces are reserved), got {vocab_size}.")
  lines = _training_lines(texts, max_training_bytes, seed)
  if not lines:
    raise ValueError("Cannot train a tokenizer on no text: every document is empty.")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   **_TRAINER_OPTIONS)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece could not train a {vocab_size}-piece BPE model on {len(lines)} lines "
                     f"({sum(len(x) for x in lines)} characters): vocab_size must hold the reserved ids plus the "
                     f"corpus's common characters, and a small corpus cannot fill a large vocabulary with merges. "
                     f"SentencePiece said: {e}") from e
  tokenizer = Tokenizer(buf.getvalue())
  if model_path is not None:
    tokenizer.save(model_path)
  return tokenizer


def tokenizer_cache_path(cache_dir: str | os.PathLike, corpus_id: str, vocab_size: int, seed: int = 0) -> str:
  """Where ``load_or_train_tokenizer`` keeps the model for (corpus id, vocabulary size, seed)."""
  safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus_id)
  return os.path.join(os.fspath(cache_dir), f"{safe_id}.bpe{vocab_size}.seed{seed}.v{TRAINER_VERSION}.model")


def load_or_train_tokenizer(cache_dir: str | os.PathLike, texts_fn: Callable[[], Iterable[str]], vocab_size: int, *,
                            corpus_id: str, seed: int = 0, max_training_bytes: int = 16 << 20) -> Tokenizer:
  """Loads the cached tokenizer for (corpus_id, vocab_size, seed), training and caching it first if absent.

  Args:
    cache_dir: directory of cached ``.model`` files (created if needed).
    texts_fn: returns the training texts; called only when the model must be trained.
    vocab_size: total number of ids.
    corpus_id: names the training texts, e.g. ``default_corpus_id()`` or ``document_fingerprint(train_docs)``; two
      different corpora must not share an id.
    seed, max_training_bytes: as in ``train_tokenizer``.

  Concurrent callers (several hosts or stages) may both train, but training is deterministic and the file is
  replaced atomically, so every reader gets the same complete model.
  """
  path = tokenizer_cache_path(cache_dir, corpus_id, vocab_size, seed)
  if os.path.exists(path):
    return Tokenizer.load(path)
  return train_tokenizer(texts_fn(), vocab_size, model_path=path, seed=seed, max_training_bytes=max_training_bytes)
