"""Building blocks: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Attention is split into its projections (:meth:`Attention.qkv`, :meth:`Attention.kv`) and one masked softmax
(:func:`attend`), so the plain transformer, the KV-cached step and Tandem's mixed key/value set are three
compositions of the same pieces rather than three attention implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax.models.config import TransformerConfig, dtype_of
from tandem_jax.sharding import constrain

_NEG_INF = -1e30


def _linear(cfg: TransformerConfig, d_in: int, d_out: int, axes, rngs: nnx.Rngs, bias: bool = False,
            std: float | None = None) -> nnx.Linear:
  init = nnx.initializers.normal(std) if std is not None else nnx.initializers.lecun_normal()
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                    kernel_init=nnx.with_partitioning(init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, "rotate half" layout (Hugging Face Llama/Qwen2), at absolute positions."""
  h = x_btnh.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions_bt.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array) -> jax.Array:
  """Softmax attention with grouped query heads. Scores and softmax in fp32. Returns [B, T, N, H]."""
  b, t, n, h = q_btnh.shape
  kh = k_bskh.shape[2]
  q = q_btnh.reshape(b, t, kh, n // kh, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) * (h ** -0.5)
  scores = jnp.where(mask_bts[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
  return out.reshape(b, t, n, h)


class Attention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.d_model, cfg.head_dim
    self.q_proj = _linear(cfg, d, cfg.num_heads * h, ("embed", "heads"), rngs, bias=cfg.qkv_bias)
    self.k_proj = _linear(cfg, d, cfg.num_kv_heads * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.v_proj = _linear(cfg, d, cfg.num_kv_heads * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.o_proj = _linear(cfg, cfg.num_heads * h, d, ("heads", "embed"), rngs,
                          std=0.02 / (2 * cfg.num_layers) ** 0.5)

  def kv(self, x_btd, positions_bt):
    """Keys (rotated) and values of normed inputs: [B, T, K, H] each."""
    b, t, _ = x_btd.shape
    c = self.cfg
    k = self.k_proj(x_btd).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x_btd).reshape(b, t, c.num_kv_heads, c.head_dim)
    return rope(k, positions_bt, c.rope_theta), v

  def qkv(self, x_btd, positions_bt):
    b, t, _ = x_btd.shape
    c = self.cfg
    q = self.q_proj(x_btd).reshape(b, t, c.num_heads, c.head_dim)
    q = constrain(rope(q, positions_bt, c.rope_theta), ("batch", "length", "act_heads", None))
    k, v = self.kv(x_btd, positions_bt)
    return q, k, v

  def out(self, o_btnh):
    b, t, n, h = o_btnh.shape
    return self.o_proj(o_btnh.reshape(b, t, n * h))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.up_proj = _linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.down_proj = _linear(cfg, cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs,
                             std=0.02 / (2 * cfg.num_layers) ** 0.5)

  def __call__(self, x_btd):
    hidden = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
    return self.down_proj(constrain(hidden, ("batch", "length", "act_mlp")))


class Block(nnx.Module):
  """Pre-norm decoder layer. Callers supply the key/value set; see :mod:`tandem_jax.models.transformer`."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.mlp = MLP(cfg, rngs)

  def qkv(self, x_btd, positions_bt):
    return self.attn.qkv(self.attn_norm(x_btd), positions_bt)

  def kv(self, x_btd, positions_bt):
    """Keys/values this layer computes for hidden states ``x`` (used for Tandem's projected primary states)."""
    return self.attn.kv(self.attn_norm(x_btd), positions_bt)

  def finish(self, x_btd, o_btnh):
    """Residual after attention output ``o``, then the MLP residual."""
    x = x_btd + self.attn.out(o_btnh)
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("batch", "length", "act_embed"))
