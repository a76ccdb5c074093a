"""One decoder-only transformer for both the primary (block mode) and the secondary (autoregressive).

Three ways to run it, all over the same layers:
- :meth:`Transformer.forward`: full causal pass; logits and, on request, every hidden state x^(0..L)
  (x^(0) = embeddings, x^(j) = output of layer j), which Tandem's projections read.
- :meth:`Transformer.extend`: k new tokens per row at each row's own position (``cache.lengths``), writing their
  keys/values into the explicit :class:`~tandem_jax.cache.KVCache`. Prefill of a ragged batch, a single decoding
  step and the primary's block-mode verification call are all this method.
- rollback is :meth:`KVCache.rollback`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax import cache as kvcache
from tandem_jax.models.config import TransformerConfig, dtype_of
from tandem_jax.models.layers import Block, RMSNorm, attend
from tandem_jax.sharding import constrain


def causal_mask(t: int) -> jax.Array:
  return jnp.tril(jnp.ones((t, t), bool))[None]


class Transformer(nnx.Module):
  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = dtype_of(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype_of(cfg.dtype), param_dtype=pd,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
                           rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype_of(cfg.dtype),
                                param_dtype=pd, rngs=rngs,
                                kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", "vocab")))

  # -- pieces shared with Tandem and LLM-to-SLM --------------------------------------------------------------------
  def embed_tokens(self, tokens_bt, extra_embed_btd=None):
    x = self.embed(tokens_bt)
    if extra_embed_btd is not None:
      x = x + extra_embed_btd.astype(x.dtype)
    return constrain(x, ("batch", "length", "act_embed"))

  def normed(self, x_btd):
    return self.final_norm(x_btd)

  def logits(self, x_btd):
    """fp32 logits of final hidden states (final norm applied here)."""
    h = self.final_norm(x_btd)
    if self.cfg.tie_embeddings:
      out = jnp.einsum("btd,vd->btv", h, self.embed.embedding[...].astype(h.dtype),
                       preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(h).astype(jnp.float32)
    return constrain(out, ("batch", "length", "act_vocab"))

  # -- full forward ------------------------------------------------------------------------------------------------
  def forward(self, tokens_bt, *, extra_embed_btd=None, return_hidden: bool = False):
    """Causal pass over [B, T] tokens. Returns logits [B, T, V] (fp32) and hidden [L+1, B, T, D] or None."""
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = causal_mask(t)
    x = self.embed_tokens(tokens_bt, extra_embed_btd)
    hidden = [x]
    for layer in self.layers:
      q, k, v = layer.qkv(x, positions)
      x = layer.finish(x, attend(q, k, v, mask))
      hidden.append(x)
    return self.logits(x), (jnp.stack(hidden) if return_hidden else None)

  # -- cached ------------------------------------------------------------------------------------------------------
  def init_cache(self, batch_size: int, capacity: int, dtype=None) -> kvcache.KVCache:
    c = self.cfg
    if capacity > c.max_seq_len:
      raise ValueError(f"cache capacity {capacity} exceeds the model's max_seq_len {c.max_seq_len}")
    return kvcache.init_cache(c.num_layers, batch_size, capacity, c.num_kv_heads, c.head_dim,
                              dtype or dtype_of(c.dtype))

  def extend(self, tokens_bt, cache: kvcache.KVCache, *, extra_embed_btd=None, return_hidden: bool = False,
             write: bool = True, start_b=None):
    """Runs k = T new tokens per row at positions ``start[b] + 0..k-1`` (default start: ``cache.lengths``).

    With ``write`` (the default) their keys/values are stored and each row's length becomes start + k (shrink rows
    that had fewer real tokens with :meth:`KVCache.rollback`/``with_lengths``). With ``write=False`` the cache is
    only read: a query at position p attends to the slots 0..p already in it (Tandem's "eq2" boundary uses this).
    Returns (logits [B, T, V], hidden [L+1, B, T, D] or None, new cache).
    """
    b, t = tokens_bt.shape
    start = cache.lengths if start_b is None else start_b.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    mask = kvcache.attention_mask(positions, cache.capacity)
    x = self.embed_tokens(tokens_bt, extra_embed_btd)
    hidden, new_k, new_v = [x], [], []
    for i, layer in enumerate(self.layers):
      q, k, v = layer.qkv(x, positions)
      ck, cv = cache.k[i], cache.v[i]
      if write:
        ck, cv = kvcache.write(ck, k, start), kvcache.write(cv, v, start)
        new_k.append(ck)
        new_v.append(cv)
      x = layer.finish(x, attend(q, ck, cv, mask))
      hidden.append(x)
    if write:
      cache = cache.replace(k=tuple(new_k), v=tuple(new_v), lengths=start + t)
    return self.logits(x), (jnp.stack(hidden) if return_hidden else None), cache

  def prefill(self, tokens_bt, lengths_b, cache: kvcache.KVCache, **kw):
    """Ragged prefill of right-padded prompts from each row's current length; rows end at length + lengths_b."""
    start = cache.lengths
    logits, hidden, cache = self.extend(tokens_bt, cache, **kw)
    return logits, hidden, cache.with_lengths(start + lengths_b)
