"""Model hyper-parameters: one frozen dataclass for the decoder, one for the Tandem coupling.

Both validate themselves on construction so that a bad configuration fails with a message naming the field,
before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A Llama/Qwen2-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

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

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TransformerConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown TransformerConfig fields {unknown}; allowed: {sorted(names)}")
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

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
    per_layer = attn + 3 * d * self.d_ff + 2 * d
    embed = self.vocab_size * d + (0 if self.tie_embeddings else (self.draft_vocab_size or self.vocab_size) * d)
    return self.num_layers * per_layer + embed + d


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
