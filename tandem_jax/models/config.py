"""Model hyper-parameters: one frozen dataclass for the decoder, one for the Tandem coupling.

Both validate themselves on construction so that a bad configuration fails with a message naming the field,
before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full", "sliding")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ATTENTION_IMPLS = ("plain", "blockwise")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A decoder-only transformer: RMSNorm, RoPE, a gated MLP, grouped-query attention.

  The defaults are a Llama/Qwen2-style decoder. The pretrained families differ from it by the switches below
  (``tandem_jax.interop.hf_format.config_from_hf`` sets them); every switch is read by the layers themselves, so
  the full forward, the cached step and Tandem's mixed key set all see it, and a switch left off adds no op.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  max_seq_len: int = 2048
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Layers as one stacked module run by lax.scan: one layer body in the compiled program instead of num_layers
  # (compile time independent of depth; what the TPU presets use). Parameters and cache buffers get a leading
  # "layers" axis. Same function as the unrolled layers (tested); checkpoints of the two layouts differ.
  scan_layers: bool = False
  # Recompute each layer in the backward pass instead of storing its activations (jax.checkpoint of the layer;
  # only layer inputs are kept). Changes training memory and FLOPs, not numerics.
  remat: bool = False
  # A drafter's reduced output vocabulary (EAGLE-3, FR-Spec): > 0 makes the output layer an untied [d_model, N]
  # matrix over N token ids (``Transformer.draft_ids`` maps output index -> token id); inputs still take every id
  # of ``vocab_size``. 0: the output layer covers the whole vocabulary.
  draft_vocab_size: int = 0
  # The token embedding and output layer are constants (``Frozen`` variables: no gradient and no optimizer state
  # in any stage): a drafter reusing its primary's (EAGLE), copied in by ``tandem_jax.recipe``.
  freeze_embeddings: bool = False
  # How attention is computed (same function, tested): "plain" materialises [B, heads, T, S] fp32 scores;
  # "blockwise" (tandem_jax.models.attention) visits attention_block keys at a time with an online softmax and a
  # flash-attention backward, so no [T, S] scores exist, for calls whose queries and keys both exceed
  # attention_block (training, prefill, the secondary's mixed key set; cached decode steps stay plain).
  attention_impl: str = "plain"
  attention_block: int = 512
  # -- RoPE frequency scaling of the full-attention layers (Hugging Face ``rope_parameters``). "default": none;
  # "linear": frequencies / rope_factor; "llama3" (Llama 3.1+): low frequencies / rope_factor, high ones kept,
  # smoothed between (rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len); "yarn": NTK-by-parts
  # (rope_factor, rope_original_max_len, rope_beta_fast, rope_beta_slow) with cos/sin scaled by
  # rope_attention_factor. ``rope_freq_factors`` (GGUF ``rope_freqs``): explicit per-frequency divisors, applied
  # on top (head_dim / 2 of them; empty: none).
  rope_scaling: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_attention_factor: float = 1.0
  rope_freq_factors: tuple = ()
  # -- attention. Per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3).
  qk_norm: bool = False
  # Scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma); 0: head_dim ** -0.5.
  query_pre_attn_scalar: float = 0.0
  # Scores soft-capped as cap * tanh(s / cap) before the mask (Gemma 2); 0: off.
  attn_softcap: float = 0.0
  # Layer j is ``layer_types[j % len(layer_types)]``: "full" (causal) or "sliding" (a query at position p sees
  # positions p - sliding_window + 1 .. p). A pattern shorter than the model repeats (Gemma 2: ("sliding", "full"),
  # Gemma 3: five "sliding" then one "full"), so a drafter with fewer layers keeps its primary's pattern.
  # Empty: every layer full.
  layer_types: tuple = ()
  sliding_window: int = 0
  # RoPE base of the sliding layers (Gemma 3's local base; unscaled); 0: the full layers' RoPE.
  rope_local_theta: float = 0.0
  # -- the rest of the layer. MLP gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
  mlp_activation: str = "silu"
  # RMSNorms scale by (1 + scale), with scale initialised to 0 (Gemma's convention; bf16 keeps small offsets).
  norm_plus_one: bool = False
  # Extra RMSNorms on the attention and MLP outputs before each residual add (Gemma 2/3's sandwich norms).
  post_norms: bool = False
  # Token embeddings multiplied by sqrt(d_model) (Gemma).
  scale_embeddings: bool = False
  # Final logits soft-capped as cap * tanh(logits / cap) (Gemma 2); 0: off.
  final_softcap: float = 0.0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                 "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"TransformerConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"TransformerConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_theta <= 0 or self.norm_eps <= 0:
      raise ValueError("TransformerConfig.rope_theta and norm_eps must be positive")
    dtype_of(self.param_dtype)
    dtype_of(self.dtype)
    if not isinstance(self.draft_vocab_size, int) or not 0 <= self.draft_vocab_size <= self.vocab_size:
      raise ValueError(f"TransformerConfig.draft_vocab_size must be an integer in [0, vocab_size={self.vocab_size}] "
                       f"(0: the full vocabulary), got {self.draft_vocab_size!r}")
    if self.draft_vocab_size and self.tie_embeddings:
      raise ValueError("TransformerConfig.draft_vocab_size > 0 needs tie_embeddings=False (the draft vocabulary's "
                       "output layer is its own [d_model, draft_vocab_size] matrix)")
    self._check_switches()

  def _check_switches(self):
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"TransformerConfig.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
    if self.rope_scaling != "default" and not self.rope_factor >= 1.0:
      raise ValueError(f"TransformerConfig.rope_factor must be >= 1 for rope_scaling={self.rope_scaling!r}, got "
                       f"{self.rope_factor!r}")
    if self.rope_scaling in ("llama3", "yarn") and self.rope_original_max_len < 1:
      raise ValueError(f"TransformerConfig.rope_original_max_len must be a positive integer for rope_scaling="
                       f"{self.rope_scaling!r}, got {self.rope_original_max_len!r}")
    if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError("TransformerConfig.rope_high_freq_factor must exceed rope_low_freq_factor for llama3 RoPE")
    # Lists (from JSON or a ConfigDict) become tuples: the config is hashed as a static part of the model.
    object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
    if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
      raise ValueError(f"TransformerConfig.rope_freq_factors has {len(self.rope_freq_factors)} entries; RoPE has "
                       f"head_dim / 2 = {self.head_dim // 2} frequencies")
    object.__setattr__(self, "layer_types", tuple(str(t) for t in self.layer_types))
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if bad:
      raise ValueError(f"TransformerConfig.layer_types entries must be in {LAYER_TYPES}, got {bad}")
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      raise ValueError(f"TransformerConfig.sliding_window must be an integer >= 0, got {self.sliding_window!r}")
    if ("sliding" in self.layer_types) != (self.sliding_window > 0):
      raise ValueError(f"TransformerConfig.sliding_window ({self.sliding_window}) must be > 0 exactly when "
                       f"layer_types has 'sliding' layers (layer_types={self.layer_types})")
    if self.rope_local_theta < 0 or self.query_pre_attn_scalar < 0 or self.attn_softcap < 0 or self.final_softcap < 0:
      raise ValueError("TransformerConfig.rope_local_theta, query_pre_attn_scalar, attn_softcap and final_softcap "
                       "must be >= 0 (0: off)")
    if self.rope_local_theta and "sliding" not in self.layer_types:
      raise ValueError("TransformerConfig.rope_local_theta is the sliding layers' RoPE base, but layer_types has no "
                       "'sliding' layer")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"TransformerConfig.attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")
    if not isinstance(self.attention_block, int) or self.attention_block < 1:
      raise ValueError(f"TransformerConfig.attention_block must be a positive integer, got {self.attention_block!r}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"TransformerConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, got "
                       f"{self.mlp_activation!r}")

  def layer_type(self, j: int) -> str:
    """"full" or "sliding": layer j's attention (:attr:`layer_types` repeats)."""
    return self.layer_types[j % len(self.layer_types)] if self.layer_types else "full"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TransformerConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown TransformerConfig fields {unknown}; allowed: {sorted(names)}")
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @property
  def output_size(self) -> int:
    """Size of the logits' last axis: the draft vocabulary if there is one, else the vocabulary."""
    return self.draft_vocab_size or self.vocab_size

  @property
  def num_params(self) -> int:
    d, h = self.d_model, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    norms = 2 * d + (2 * d if self.post_norms else 0) + (2 * h if self.qk_norm else 0)
    per_layer = attn + 3 * d * self.d_ff + norms
    embed = self.vocab_size * d + (0 if self.tie_embeddings else (self.draft_vocab_size or self.vocab_size) * d)
    return self.num_layers * per_layer + embed + d


# The size of a decoder, as opposed to its family: a drafter sets these itself and takes the rest of
# ARCHITECTURE_FIELDS from its primary (:func:`drafter_fields`).
SIZE_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff")
# What a drafter built for a primary shares with it: the vocabulary, positions and the family's switches, so that
# both read the same tokens the same way and a Tandem's states line up layer type by layer type.
ARCHITECTURE_FIELDS = ("vocab_size", "max_seq_len", "rope_theta", "norm_eps", "qkv_bias", "rope_scaling",
                       "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
                       "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_freq_factors", "qk_norm",
                       "query_pre_attn_scalar", "attn_softcap", "layer_types", "sliding_window", "rope_local_theta",
                       "mlp_activation", "norm_plus_one", "post_norms", "scale_embeddings", "final_softcap")


def drafter_fields(primary: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
  """The :data:`ARCHITECTURE_FIELDS` of a primary's config dict for a drafter with ``head_dim``. Explicit RoPE
  frequency divisors (GGUF ``rope_freqs``) are per frequency of the primary's head size: a drafter of another head
  size keeps the named scaling (``rope_scaling`` and its parameters) without them."""
  out = {k: primary[k] for k in ARCHITECTURE_FIELDS if k in primary}
  if out.get("rope_freq_factors") and head_dim != primary["head_dim"]:
    out["rope_freq_factors"] = ()
  return out


LAYER_MAPS = ("proportional", "last")
BOUNDARIES = ("fig1", "eq2")


@dataclasses.dataclass(frozen=True)
class TandemConfig:
  """How the secondary reads the primary (PAPER_NOTES §1.2).

  layer_map: "proportional" (secondary layer j reads the primary's hidden state x^(round(j*L_L/L_S)), the input of
    the proportionally deep primary layer), "last" (every secondary layer reads the primary's last hidden state), or
    an explicit tuple of primary hidden-state indices in [0, L_L], one per secondary layer.
  boundary: which tokens of a block the secondary represents itself (models/tandem.py ``own_start``). "fig1"
    (default; the paper's Fig. 1): a query in block [s, s+γ) sees projected primary states for positions < s and
    its own for s..i. "eq2" (literal Eq. 2): the block start s is also taken from the primary (own span s+1..i).
    One drafter decodes both; they differ in how decoding blocks align with training blocks
    (``decode_block_offset``): decoding with γ drafts runs own spans 1..γ, which eq2 training meets with γ + 1.
  """

  layer_map: Any = "proportional"
  boundary: str = "fig1"
  projection_bias: bool = False

  def __post_init__(self):
    if isinstance(self.layer_map, str):
      if self.layer_map not in LAYER_MAPS:
        raise ValueError(f"TandemConfig.layer_map must be one of {LAYER_MAPS} or a tuple of ints, "
                         f"got {self.layer_map!r}")
    else:
      object.__setattr__(self, "layer_map", tuple(int(i) for i in self.layer_map))
    if self.boundary not in BOUNDARIES:
      raise ValueError(f"TandemConfig.boundary must be one of {BOUNDARIES}, got {self.boundary!r}")

  def resolve_layer_map(self, primary_layers: int, secondary_layers: int) -> tuple[int, ...]:
    """Index into the primary's hidden states x^(0..L_L) for each secondary layer."""
    if self.layer_map == "proportional":
      return tuple(round(j * primary_layers / secondary_layers) for j in range(secondary_layers))
    if self.layer_map == "last":
      return (primary_layers,) * secondary_layers
    lm = self.layer_map
    if len(lm) != secondary_layers:
      raise ValueError(f"TandemConfig.layer_map has {len(lm)} entries but the secondary has {secondary_layers} "
                       "layers")
    bad = [i for i in lm if not 0 <= i <= primary_layers]
    if bad:
      raise ValueError(f"TandemConfig.layer_map entries {bad} are outside [0, {primary_layers}] (the primary has "
                       f"{primary_layers} layers, so hidden states 0..{primary_layers})")
    return lm
