"""Building blocks: RMSNorm, rotary embeddings, a gated MLP, grouped-query attention.

Attention is split into its projections (:meth:`Attention.qkv`, :meth:`Attention.kv`) and one masked softmax
(:func:`~tandem_jax.models.attention.attend`, or its blockwise form for long sequences, chosen by
``TransformerConfig.attention_impl``), so the plain transformer, the KV-cached step and Tandem's mixed key/value set
are three compositions of the same pieces rather than three attention implementations.

The family switches of :class:`~tandem_jax.models.config.TransformerConfig` (RoPE scaling, q/k norms, soft-capping,
sliding windows, GeGLU, Gemma's norms) live here. Per-layer differences (a sliding layer's window and RoPE base)
reach a layer as its ``local`` flag: a Python bool for unrolled layers (so an off switch adds no op) or a traced
bool per layer under ``lax.scan`` (:func:`pick`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax.models.attention import (attend, attend_parts, blockwise_attend,  # noqa: F401 (attend: re-exported)
                                        softcap)
from tandem_jax.models.config import TransformerConfig, dtype_of
from tandem_jax.sharding import constrain


def _linear(cfg: TransformerConfig, d_in: int, d_out: int, axes, rngs: nnx.Rngs, bias: bool = False,
            std: float | None = None) -> nnx.Linear:
  init = nnx.initializers.normal(std) if std is not None else nnx.initializers.lecun_normal()
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                    kernel_init=nnx.with_partitioning(init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


# Named scopes of the model's parts, carried into the compiled program's metadata (op_name) so its HBM traffic can be
# told apart by part (tandem_jax.hlo_reading.by_scope); metadata only: numerics and programs are unchanged.
SCOPES = ("projection", "attn_proj", "attn_core", "mlp", "logits", "loss", "optimizer")


def scoped(name: str):
  """Decorator: runs the function under ``jax.named_scope(name)`` (one of SCOPES)."""
  assert name in SCOPES, name

  def deco(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      with jax.named_scope(name):
        return fn(*args, **kwargs)
    return wrapped
  return deco


def pick(local, if_local, if_full):
  """``if_local`` for a sliding layer, else ``if_full``: chosen in Python when ``local`` is a bool or None (unrolled
  layers), by ``jnp.where`` when it is a traced per-layer flag (scanned layers)."""
  if local is None or isinstance(local, bool):
    return if_local if local else if_full
  return jnp.where(local, if_local, if_full)


class RMSNorm(nnx.Module):
  """RMSNorm; with ``plus_one`` (Gemma) the weight is stored as an offset: y * (1 + scale), scale starting at 0."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32, plus_one: bool = False):
    self.eps = eps
    self.plus_one = plus_one
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def rope_inv_freq(cfg: TransformerConfig, local: bool = False) -> jax.Array:
  """[head_dim / 2] fp32 inverse frequencies of the full layers (scaled as ``cfg`` says) or, with ``local``, of the
  sliding layers when they have their own base (``rope_local_theta``). Constants: XLA folds them."""
  h = cfg.head_dim
  theta = cfg.rope_local_theta if local else cfg.rope_theta
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if local:
    return inv_freq
  kind, factor = cfg.rope_scaling, cfg.rope_factor
  if kind == "linear":
    inv_freq = inv_freq / factor
  elif kind == "llama3":  # transformers' _compute_llama3_parameters
    old_len, low, high = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  elif kind == "yarn":  # transformers' _compute_yarn_parameters (truncate=True)
    def correction_dim(rotations):
      return h * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    hi = min(math.ceil(correction_dim(cfg.rope_beta_slow)), h - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = jnp.clip((jnp.arange(h // 2, dtype=jnp.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  if cfg.rope_freq_factors:
    inv_freq = inv_freq / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
  return inv_freq


def rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq, attention_factor=1.0) -> jax.Array:
  """Rotary embedding, "rotate half" layout (Hugging Face), at absolute positions.

  ``inv_freq``: [H/2] inverse frequencies (:func:`rope_inv_freq`), or a float base theta for plain RoPE.
  ``attention_factor`` (YaRN) scales cos and sin."""
  h = x_btnh.shape[-1]
  if isinstance(inv_freq, (int, float)):
    inv_freq = 1.0 / (inv_freq ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions_bt.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if not isinstance(attention_factor, (int, float)) or attention_factor != 1.0:
    sin, cos = sin * attention_factor, cos * attention_factor
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


def sliding_mask(mask_bts: jax.Array, q_positions_bt: jax.Array, k_positions_bs: jax.Array,
                 window: int) -> jax.Array:
  """``mask`` further limited to keys less than ``window`` positions behind their query (a sliding layer's mask)."""
  return mask_bts & (q_positions_bt[:, :, None] - k_positions_bs[:, None, :] < window)


def _pick_mask(masks, local):
  """The mask of a layer from a (full, sliding) pair (sliding None without sliding layers); ``local`` picks."""
  return masks[0] if masks[1] is None else pick(local, masks[1], masks[0])


class Attention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.d_model, cfg.head_dim
    self.q_proj = _linear(cfg, d, cfg.num_heads * h, ("embed", "heads"), rngs, bias=cfg.qkv_bias)
    self.k_proj = _linear(cfg, d, cfg.num_kv_heads * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.v_proj = _linear(cfg, d, cfg.num_kv_heads * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.o_proj = _linear(cfg, cfg.num_heads * h, d, ("heads", "embed"), rngs,
                          std=0.02 / (2 * cfg.num_layers) ** 0.5)
    if cfg.qk_norm:
      pd = dtype_of(cfg.param_dtype)
      self.q_norm = RMSNorm(h, cfg.norm_eps, pd, cfg.norm_plus_one)
      self.k_norm = RMSNorm(h, cfg.norm_eps, pd, cfg.norm_plus_one)

  def _rope(self, x_btnh, positions_bt, local):
    c = self.cfg
    if c.rope_scaling == "default" and not c.rope_freq_factors and not c.rope_local_theta:
      return rope(x_btnh, positions_bt, c.rope_theta)  # the plain path, exactly as before the switches
    inv_freq, factor = rope_inv_freq(c), c.rope_attention_factor if c.rope_scaling == "yarn" else 1.0
    if c.rope_local_theta:  # sliding layers: their own base, unscaled
      inv_freq, factor = pick(local, rope_inv_freq(c, local=True), inv_freq), pick(local, 1.0, factor)
    return rope(x_btnh, positions_bt, inv_freq, factor)

  @scoped("attn_proj")
  def kv(self, x_btd, positions_bt, local=None):
    """Keys (normed with qk_norm, rotated) and values of normed inputs: [B, T, K, H] each."""
    b, t, _ = x_btd.shape
    c = self.cfg
    k = self.k_proj(x_btd).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x_btd).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      k = self.k_norm(k)
    return self._rope(k, positions_bt, local), v

  @scoped("attn_proj")
  def qkv(self, x_btd, positions_bt, local=None):
    b, t, _ = x_btd.shape
    c = self.cfg
    q = self.q_proj(x_btd).reshape(b, t, c.num_heads, c.head_dim)
    if c.qk_norm:
      q = self.q_norm(q)
    q = constrain(self._rope(q, positions_bt, local), ("batch", "length", "act_heads", None))
    k, v = self.kv(x_btd, positions_bt, local)
    return q, k, v

  @scoped("attn_proj")
  def out(self, o_btnh):
    b, t, n, h = o_btnh.shape
    return self.o_proj(o_btnh.reshape(b, t, n * h))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU (Gemma) with gelu (tanh approximation) in place of silu."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.gelu = cfg.mlp_activation == "gelu_tanh"
    self.gate_proj = _linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.up_proj = _linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.down_proj = _linear(cfg, cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs,
                             std=0.02 / (2 * cfg.num_layers) ** 0.5)

  @scoped("mlp")
  def __call__(self, x_btd):
    gate = self.gate_proj(x_btd)
    hidden = (jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)) * self.up_proj(x_btd)
    return self.down_proj(constrain(hidden, ("batch", "length", "act_mlp")))


class Block(nnx.Module):
  """Pre-norm decoder layer. Callers supply the key/value set; see :mod:`tandem_jax.models.transformer`.

  With ``post_norms`` (Gemma 2/3) the attention and MLP outputs are normed again before each residual add."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, cfg.norm_plus_one)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, cfg.norm_plus_one)
    self.mlp = MLP(cfg, rngs)
    if cfg.post_norms:
      self.attn_post_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, cfg.norm_plus_one)
      self.mlp_post_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, cfg.norm_plus_one)

  def qkv(self, x_btd, positions_bt, local=None):
    return self.attn.qkv(self.attn_norm(x_btd), positions_bt, local)

  def kv(self, x_btd, positions_bt, local=None):
    """Keys/values this layer computes for hidden states ``x`` (used for Tandem's projected primary states)."""
    return self.attn.kv(self.attn_norm(x_btd), positions_bt, local)

  @scoped("attn_core")
  def attend(self, q_btnh, k_bskh, v_bskh, masks, local=None):
    """:func:`attend` with this layer's score scale, soft-capping and mask: ``masks`` is (full, sliding) (the
    sliding one None when the model has no sliding layer); ``local`` picks. With ``attention_impl="blockwise"``,
    queries and keys both longer than ``attention_block`` go through :func:`blockwise_attend`."""
    c, mask = self.cfg, _pick_mask(masks, local)
    # Blockwise only where a [T, S] score tensor would be large: cached decode steps (T of a few tokens) stay plain.
    if c.attention_impl == "blockwise" and min(q_btnh.shape[1], k_bskh.shape[1]) > c.attention_block:
      return blockwise_attend(q_btnh, k_bskh, v_bskh, mask, cap=c.attn_softcap, scale=self._scale(),
                              block=c.attention_block)
    return attend(q_btnh, k_bskh, v_bskh, mask, cap=c.attn_softcap, scale=self._scale())

  @scoped("attn_core")
  def attend_parts(self, q_btnh, parts, local=None):
    """:func:`attend_parts` with this layer's scale and soft-capping: ``parts`` is a sequence of (k, v, masks),
    each ``masks`` a (full, sliding) pair as in :meth:`attend`."""
    parts = [(k, v, _pick_mask(m, local)) for k, v, m in parts]
    return attend_parts(q_btnh, parts, cap=self.cfg.attn_softcap, scale=self._scale())

  def _scale(self):
    """The scores' factor: query_pre_attn_scalar ** -0.5 (Gemma), else None (head_dim ** -0.5)."""
    c = self.cfg
    return c.query_pre_attn_scalar ** -0.5 if c.query_pre_attn_scalar else None

  def finish(self, x_btd, o_btnh):
    """Residual after attention output ``o``, then the MLP residual."""
    a = self.attn.out(o_btnh)
    x = x_btd + (self.attn_post_norm(a) if self.cfg.post_norms else a)
    m = self.mlp(self.mlp_norm(x))
    x = x + (self.mlp_post_norm(m) if self.cfg.post_norms else m)
    return constrain(x, ("batch", "length", "act_embed"))
