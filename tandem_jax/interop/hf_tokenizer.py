"""Pretrained tokenizers (a ``tokenizer.json`` or a GGUF file's embedded BPE) behind our ``TokenizerProtocol``.

:class:`HFTokenizer` wraps the Rust ``tokenizers`` library. On disk it is the Hugging Face pair ``tokenizer.json``
(pieces, merges, pre-tokenizer, decoder) and ``tokenizer_config.json`` (which pieces are bos/eos/pad), so a
directory we write is also one transformers loads. :func:`check_same_tokenizer` is the guard a Tandem pair needs: the
secondary reads the primary's hidden states position by position, so both must cut text into the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tandem_jax.data.tokenizer import SENTENCEPIECE_FILE, TOKENIZER_JSON, tokenizer_path  # noqa: F401

TOKENIZER_CONFIG_JSON = "tokenizer_config.json"

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the splits its byte-level BPE merges were learned on.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {  # each: a list of regexes applied in turn (llama.cpp's regex_exprs)
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # SmolLM's tokenizer.json: single digits, then GPT-2's split
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _tokenizers():
  try:
    import tokenizers  # the interop extra (a dependency of transformers)
  except ImportError as e:
    raise ImportError("pretrained tokenizers need the `tokenizers` package: pip install 'tandem_jax[interop]'") from e
  return tokenizers


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` plus its special ids, satisfying ``TokenizerProtocol``."""

  def __init__(self, tokenizer, *, bos_id: int | None, eos_id: int, pad_id: int | None = None,
               chat_template: str | None = None):
    self._tok = tokenizer
    self._bos_id, self._eos_id = bos_id, eos_id
    self._pad_id = eos_id if pad_id is None else pad_id
    self.chat_template = chat_template

  # -- construction --------------------------------------------------------------------------------------------
  @classmethod
  def load(cls, path: str | os.PathLike) -> "HFTokenizer":
    """From a directory holding ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``config.json``) or the file."""
    path = os.fspath(path)
    directory, file = (path, os.path.join(path, TOKENIZER_JSON)) if os.path.isdir(path) else (
        os.path.dirname(path), path)
    if not os.path.exists(file):
      raise FileNotFoundError(f"no {TOKENIZER_JSON} at {file!r}")
    tok = _tokenizers().Tokenizer.from_file(file)
    tcfg = _read_json(os.path.join(directory, TOKENIZER_CONFIG_JSON))
    mcfg = _read_json(os.path.join(directory, "config.json"))

    def special(name: str) -> int | None:
      piece = tcfg.get(f"{name}_token")
      if isinstance(piece, Mapping):
        piece = piece.get("content")
      if piece is not None:
        token_id = tok.token_to_id(piece)
        if token_id is None:
          raise ValueError(f"{TOKENIZER_CONFIG_JSON} names {name}_token {piece!r}, which is not in {file}")
        return token_id
      value = mcfg.get(f"{name}_token_id")
      return value[0] if isinstance(value, list) else value

    eos = special("eos")
    if eos is None:
      raise ValueError(f"cannot tell the eos token of {file}: set eos_token in {TOKENIZER_CONFIG_JSON} or "
                       "eos_token_id in config.json")
    return cls(tok, bos_id=special("bos"), eos_id=eos, pad_id=special("pad"),
               chat_template=tcfg.get("chat_template"))

  @classmethod
  def from_gguf_sentencepiece(cls, path: str | os.PathLike, fields: Mapping[str, Any]) -> "HFTokenizer":
    """A GGUF file's SentencePiece tokenizer (``tokenizer.ggml.model == "llama"``: Gemma, Llama 2, ...), rebuilt by
    transformers' GGUF tokenizer converter (the ``interop`` extra, pinned), which knows each family's quirks (Gemma
    stores multi-space tokens as spaces and no merges). ``fields``: :meth:`GGUFFile.tokenizer_fields`."""
    try:
      from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    except ImportError as e:
      raise ValueError(f"GGUF tokenizer model 'llama' (SentencePiece) is rebuilt with transformers' GGUF converter, "
                       f"which is not importable here ({e}): pip install -e '.[interop]', or import the model "
                       "from a Hugging Face directory with its tokenizer.json") from None
    architecture, tokenizer_dict, _ = mapping.get_gguf_tokenizer(os.fspath(path))
    tok, _ = mapping.convert_gguf_tokenizer(architecture, tokenizer_dict)
    if tok.get_vocab_size() != len(fields["tokens"]):
      raise ValueError(f"GGUF tokenizer rebuilt with {tok.get_vocab_size()} ids but the file lists "
                       f"{len(fields['tokens'])}")
    return cls(tok, bos_id=fields.get("bos_id"), eos_id=fields["eos_id"], pad_id=fields.get("pad_id"),
               chat_template=fields.get("chat_template"))

  @classmethod
  def from_gguf_fields(cls, fields: Mapping[str, Any]) -> "HFTokenizer":
    """From :meth:`GGUFFile.tokenizer_fields` (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``)."""
    tk = _tokenizers()
    if fields["model"] != "gpt2":
      raise ValueError(f"GGUF tokenizer model {fields['model']!r} is not supported (byte-level BPE 'gpt2' here; "
                       "SentencePiece 'llama' through from_gguf_sentencepiece); import the model from a Hugging "
                       "Face directory with its tokenizer.json instead")
    pre = fields.get("pre") or "default"
    if pre not in _PRE_SPLITS:
      raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRE_SPLITS)}")
    tokens = list(fields["tokens"])
    types = list(fields.get("token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("merges") or []]
    model = tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False)
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
        + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    # Control tokens (<|im_end|>, ...) and user-defined ones are matched whole in text, as llama.cpp does.
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    if tok.get_vocab_size() != len(tokens):
      raise ValueError(f"GGUF tokenizer rebuilt with {tok.get_vocab_size()} ids but the file lists {len(tokens)}")
    return cls(tok, bos_id=fields.get("bos_id"), eos_id=fields["eos_id"], pad_id=fields.get("pad_id"),
               chat_template=fields.get("chat_template"))

  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, TOKENIZER_JSON))
    piece = lambda i: None if i is None else self._tok.id_to_token(i)  # noqa: E731
    tcfg = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=piece(self._bos_id),
                eos_token=piece(self._eos_id), pad_token=piece(self._pad_id), add_bos_token=False,
                add_eos_token=False, clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    if self.chat_template:
      tcfg["chat_template"] = self.chat_template
    with open(os.path.join(directory, TOKENIZER_CONFIG_JSON), "w") as fh:
      json.dump(tcfg, fh, indent=1)

  # -- TokenizerProtocol ---------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._eos_id if self._bos_id is None else self._bos_id  # GPT-style vocabularies frame with eos

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of ``text`` (no special tokens are added unless asked), optionally framed by bos/eos."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    head, tail = [self.bos_id] if add_bos else [], [self.eos_id] if add_eos else []
    return [head + e.ids + tail for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``; special tokens (bos, eos, pad, chat markers) decode to nothing, as in ``Tokenizer``."""
    if hasattr(ids, "__array__"):
      ids = np.asarray(ids).reshape(-1).tolist()
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` ([{"role": ..., "content": ...}]) under the tokenizer's chat template
    (rendered with jinja2 in a sandbox, as Hugging Face does). Raises ValueError when there is no template."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    piece = lambda i: None if i is None else self._tok.id_to_token(int(i))  # noqa: E731
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=piece(self._bos_id) or "",
        eos_token=piece(self._eos_id) or "")

  @property
  def fingerprint(self) -> str:
    """sha256 prefix of the pieces in id order (what :func:`check_same_tokenizer` compares)."""
    return hashlib.sha256("\x00".join(pieces(self)).encode("utf-8")).hexdigest()[:16]

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as fh:
    return json.load(fh)


def pieces(tokenizer) -> list[str]:
  """The token strings of any tokenizer with ``id_to_piece`` (ours and :class:`HFTokenizer`), in id order."""
  if not hasattr(tokenizer, "id_to_piece"):
    raise TypeError(f"{type(tokenizer).__name__} has no id_to_piece(), so its pieces cannot be compared")
  return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def check_same_tokenizer(primary, secondary, *, names: tuple[str, str] = ("primary", "secondary")) -> None:
  """Raises ``ValueError`` unless both tokenizers have the same size, pieces and bos/eos ids.

  A Tandem secondary (or a speculative drafter) proposes ids the primary verifies, so an id must mean the same
  piece to both; a mismatch would silently produce garbage rather than fail.
  """
  a, b = names
  if primary.vocab_size != secondary.vocab_size:
    raise ValueError(f"tokenizer mismatch: the {a} has {primary.vocab_size} ids, the {b} {secondary.vocab_size}; "
                     f"train the {b} with the {a}'s tokenizer")
  pa, pb = pieces(primary), pieces(secondary)
  diff = [i for i, (x, y) in enumerate(zip(pa, pb)) if x != y]
  if diff:
    i = diff[0]
    raise ValueError(f"tokenizer mismatch: {len(diff)} of {len(pa)} ids differ, first id {i}: {a} {pa[i]!r} vs "
                     f"{b} {pb[i]!r}; train the {b} with the {a}'s tokenizer")
  for attr in ("bos_id", "eos_id"):
    if getattr(primary, attr) != getattr(secondary, attr):
      raise ValueError(f"tokenizer mismatch: {a} {attr}={getattr(primary, attr)}, {b} "
                       f"{attr}={getattr(secondary, attr)}")


def load_tokenizer(path: str | os.PathLike):
  """Our ``Tokenizer`` or an :class:`HFTokenizer`, from a directory holding either file, or from the file itself."""
  path = os.path.expanduser(os.fspath(path))
  file = tokenizer_path(path) if os.path.isdir(path) else path
  if file is None or not os.path.isfile(file):
    raise FileNotFoundError(f"no {SENTENCEPIECE_FILE} or {TOKENIZER_JSON} at {path!r}")
  if file.endswith(".json"):
    return HFTokenizer.load(file)
  from tandem_jax.data.tokenizer import Tokenizer

  return Tokenizer.load(file)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> str:
  """Writes ``tokenizer`` into ``directory`` under its own file name(s); returns the file :func:`load_tokenizer` reads."""
  directory = os.path.expanduser(os.fspath(directory))
  if isinstance(tokenizer, HFTokenizer):
    tokenizer.save(directory)
    return os.path.join(directory, TOKENIZER_JSON)
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, SENTENCEPIECE_FILE))
  return os.path.join(directory, SENTENCEPIECE_FILE)
