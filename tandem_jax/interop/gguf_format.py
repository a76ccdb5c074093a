"""GGUF files (llama.cpp) of the ``llama``, ``qwen2``, ``qwen3``, ``gemma2`` and ``gemma3`` architectures, read with
the pure-numpy ``gguf`` package.

A GGUF file is translated into the Hugging Face layout of :mod:`tandem_jax.interop.hf_format` (names, ``[out, in]``
weights, "rotate half" q/k rows): quantized tensors are dequantized to float32, and the llama architecture's q/k
rows, which llama.cpp's converter permutes for interleaved RoPE, are permuted back. The other architectures keep
HF's order (llama.cpp runs them with NEOX-style RoPE). llama.cpp stores Gemma's norm weights with the 1 added
(w + 1), which is taken off again. Llama 3.1's scaled RoPE arrives as the ``rope_freqs`` tensor (one divisor per
frequency), which becomes ``TransformerConfig.rope_freq_factors``. What llama.cpp hard-codes rather than stores
(Gemma's sliding-layer pattern and Gemma 3's local RoPE base, the query scale of the 27B models) is set as
llama.cpp sets it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from tandem_jax.interop import hf_format
from tandem_jax.models.config import TransformerConfig

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_GEMMA = ("gemma2", "gemma3")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Gemma's sandwich norms: llama.cpp's ffn_norm is the MLP's input norm (HF pre_feedforward_layernorm there).
_GEMMA_LAYER_NAMES = dict(_LAYER_NAMES, **{
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
})
# llama.cpp's Gemma layers of the 27B models scale queries by (d_model / heads) ** -0.5, told apart by depth.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _gguf():
  try:
    import gguf  # the interop extra
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install 'tandem_jax[interop]' "
                      "(or pip install gguf==0.19.0)") from e
  return gguf


# -- the q/k permutation -----------------------------------------------------------------------------------------


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF "rotate half" rows -> llama.cpp's interleaved order (what llama.cpp's converter does to q/k of llama).

  ``w`` is ``[n_heads * head_dim, ...]`` (a weight ``[out, in]`` or a bias ``[out]``); within each head, row pairs
  (j, j + head_dim/2) become adjacent rows (2j, 2j+1).
  """
  h = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, h // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of :func:`permute_for_gguf`."""
  h = w.shape[0] // n_heads
  return w.reshape(n_heads, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- reading -----------------------------------------------------------------------------------------------------


class GGUFFile:
  """Metadata and tensors of one GGUF file (memory-mapped; tensors are dequantized on request)."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no GGUF file at {path!r}")
    self.path = path
    self.reader = _gguf().GGUFReader(path)
    self.arch = self.get("general.architecture")
    if self.arch not in ARCHITECTURES:
      raise ValueError(f"{path}: general.architecture is {self.arch!r}; supported: {list(ARCHITECTURES)}")

  def get(self, key: str, default: Any = None) -> Any:
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  def arch_get(self, key: str, default: Any = None) -> Any:
    return self.get(f"{self.arch}.{key}", default)

  def check_quantization(self) -> None:
    """Raises naming every tensor type this ``gguf`` release cannot dequantize, before any work is done."""
    gguf = _gguf()
    supported = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
    bad = sorted({t.tensor_type.name for t in self.reader.tensors if t.tensor_type not in supported})
    if bad:
      names = [t.name for t in self.reader.tensors if t.tensor_type.name in bad][:3]
      raise ValueError(f"{self.path}: tensors of quantization type(s) {bad} (e.g. {names}) cannot be dequantized "
                       f"by this gguf package; supported: {sorted(t.name for t in supported)}")

  def config(self, *, max_seq_len: int | None = None, param_dtype: str = "float32",
             dtype: str | None = None) -> TransformerConfig:
    names = {t.name for t in self.reader.tensors}
    d, heads = int(self.arch_get("embedding_length")), int(self.arch_get("attention.head_count"))
    layers = int(self.arch_get("block_count"))
    head_dim = int(self.arch_get("attention.key_length", d // heads))
    rope_dims = int(self.arch_get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
      raise ValueError(f"{self.path}: RoPE rotates {rope_dims} of {head_dim} head dimensions; only full rotary "
                       "embeddings are supported")
    kw: dict[str, Any] = {}
    scaling = self.arch_get("rope.scaling.type")
    if scaling == "linear":
      kw.update(rope_scaling="linear", rope_factor=float(self.arch_get("rope.scaling.factor")))
    elif scaling not in (None, "none"):
      raise ValueError(f"{self.path}: {self.arch}.rope.scaling.type is {scaling!r}; supported: none, linear "
                       "(and Llama 3.1's rope_freqs tensor)")
    if "rope_freqs.weight" in names:
      t = next(t for t in self.reader.tensors if t.name == "rope_freqs.weight")
      kw.update(rope_freq_factors=tuple(float(f) for f in np.asarray(t.data, np.float32).reshape(-1)))
    embed = next(t for t in self.reader.tensors if t.name == "token_embd.weight")
    vocab = int(self.arch_get("vocab_size", 0) or embed.shape[-1])
    has_bias = "blk.0.attn_q.bias" in names
    if self.arch != "qwen2" and has_bias:
      raise ValueError(f"{self.path}: a {self.arch}-architecture file with attention biases is not supported")
    if self.arch in ("qwen3", "gemma3"):
      kw.update(qk_norm=True)
    if self.arch in _GEMMA:
      pattern = self.arch_get("attention.sliding_window_pattern")
      if pattern is None:  # llama.cpp's default: every 2nd (gemma2) / 6th (gemma3) layer is global
        period = 2 if self.arch == "gemma2" else 6
        pattern = [(i + 1) % period != 0 for i in range(layers)]
      elif isinstance(pattern, (int, np.integer)):
        pattern = [(i + 1) % int(pattern) != 0 for i in range(layers)]
      types = hf_format.layer_pattern(["sliding_attention" if p else "full_attention" for p in pattern])
      qpas = d // heads if layers == _GEMMA_27B_LAYERS[self.arch] else head_dim
      kw.update(mlp_activation="gelu_tanh", norm_plus_one=True, post_norms=True, scale_embeddings=True,
                layer_types=types, sliding_window=int(self.arch_get("attention.sliding_window", 0)) if types else 0,
                query_pre_attn_scalar=float(qpas) if qpas != head_dim else 0.0,
                final_softcap=float(self.arch_get("final_logit_softcapping", 0.0) or 0.0))
      if self.arch == "gemma2":
        kw.update(attn_softcap=float(self.arch_get("attn_logit_softcapping", 0.0) or 0.0))
      elif types:
        kw.update(rope_local_theta=float(self.arch_get("rope.freq_base_swa", 10_000.0)))
    return TransformerConfig(
        vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
        num_kv_heads=int(self.arch_get("attention.head_count_kv", heads)), head_dim=head_dim,
        d_ff=int(self.arch_get("feed_forward_length")),
        max_seq_len=int(max_seq_len or self.arch_get("context_length", 2048)),
        rope_theta=float(self.arch_get("rope.freq_base", 1_000_000.0 if self.arch == "gemma3" else 10_000.0)),
        norm_eps=float(self.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        qkv_bias=has_bias, tie_embeddings="output.weight" not in names, param_dtype=param_dtype,
        dtype=dtype or param_dtype, **kw)

  def hf_state(self, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32, under its HF name and in HF layout."""
    return {name: self.hf_tensor(t, cfg) for name, t in self.hf_tensors().items()}

  def hf_tensors(self) -> dict[str, Any]:
    """HF name -> the file's tensor (not yet read) for every weight; ``rope_freqs`` is config, not a weight."""
    out = {}
    for t in self.reader.tensors:
      if t.name == "rope_freqs.weight":
        continue
      name = _hf_name(t.name, self.arch)
      if name is None:
        raise ValueError(f"{self.path}: tensor {t.name!r} has no counterpart in a {self.arch} decoder")
      out[name] = t
    return out

  def hf_tensor(self, t, cfg: TransformerConfig) -> np.ndarray:
    """One tensor dequantized to float32, in HF layout."""
    gguf = _gguf()
    name = _hf_name(t.name, self.arch)
    # GGUF lists dims fastest-first; the reader's numpy view is already [out, in] (HF order).
    arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    arr = arr.reshape([int(n) for n in reversed(t.shape)])
    if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      arr = unpermute_from_gguf(arr, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
    if self.arch in _GEMMA and t.name.endswith("norm.weight"):
      arr = arr - 1.0  # llama.cpp stores Gemma's (1 + w)
    return arr

  def tokenizer_fields(self) -> dict[str, Any]:
    """The embedded tokenizer: model type, pre-tokenizer, tokens, token types, merges, special ids."""
    get = self.get
    return dict(model=get("tokenizer.ggml.model"), pre=get("tokenizer.ggml.pre"),
                tokens=get("tokenizer.ggml.tokens"), token_type=get("tokenizer.ggml.token_type"),
                merges=get("tokenizer.ggml.merges"), bos_id=get("tokenizer.ggml.bos_token_id"),
                eos_id=get("tokenizer.ggml.eos_token_id"), pad_id=get("tokenizer.ggml.padding_token_id"),
                unk_id=get("tokenizer.ggml.unknown_token_id"), chat_template=get("tokenizer.chat_template"))


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  layer_names = _GEMMA_LAYER_NAMES if arch in _GEMMA else _LAYER_NAMES
  m = _LAYER_RE.match(gguf_name)
  if m and m.group(2) in layer_names:
    return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
  return None


def read_gguf(path: str | os.PathLike, lazy: bool = False,
              **config_kw) -> tuple[TransformerConfig, dict[str, np.ndarray], GGUFFile]:
  """(config, HF state, the open file for its tokenizer) of a GGUF file of one of :data:`ARCHITECTURES`.

  ``lazy``: the state is a :class:`~tandem_jax.interop.hf_format.LazyState` dequantizing each tensor on access."""
  f = GGUFFile(path)
  f.check_quantization()  # before the config, so the error names the real problem
  cfg = f.config(**config_kw)
  if lazy:
    return cfg, hf_format.LazyState({name: (lambda t=t: f.hf_tensor(t, cfg)) for name, t in f.hf_tensors().items()}), f
  return cfg, f.hf_state(cfg), f
