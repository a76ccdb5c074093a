"""One decoder-only transformer for both the primary (block mode) and the secondary (autoregressive).

Three ways to run it, all over the same layers:
- :meth:`Transformer.forward`: full causal pass; logits and, on request, every hidden state x^(0..L)
  (x^(0) = embeddings, x^(j) = output of layer j), which Tandem's projections read.
- :meth:`Transformer.extend`: k new tokens per row at each row's own position (``cache.lengths``), writing their
  keys/values into the explicit :class:`~tandem_jax.cache.KVCache` (or, with ``write="defer"``, returning them for
  the caller to write). Prefill of a ragged batch, a single decoding step and the primary's block-mode verification
  call are all this method.
- rollback is :meth:`KVCache.rollback`.

Layers are either a Python list (unrolled in the compiled program) or, with ``cfg.scan_layers``, one stacked module
(every parameter has a leading "layers" axis) run by ``lax.scan`` so the program holds one layer body whatever the
depth. :meth:`Transformer.run_layers` hides the difference: callers write one per-layer function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax import cache as kvcache
from tandem_jax.models.config import TransformerConfig, dtype_of
from tandem_jax.models.layers import Block, RMSNorm, scoped, sliding_mask, softcap
from tandem_jax.sharding import constrain


class Frozen(nnx.Variable):
  """A constant weight: not an ``nnx.Param``, so no stage differentiates it or gives it optimizer state."""


class DraftVocab(nnx.Variable):
  """Token ids of a reduced output vocabulary: output index i is token ``draft_ids[i]``."""


def causal_mask(t: int) -> jax.Array:
  return jnp.tril(jnp.ones((t, t), bool))[None]


def stacked(make_one, n: int, rngs: nnx.Rngs):
  """``n`` modules ``make_one(rngs)`` as one module whose variables have a leading axis of size n named "layers"."""
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return make_one(r)
  return make(rngs)


def run_stacked(modules, fn, carry, xs, scan: bool, remat: bool = False):
  """Threads ``carry`` through ``modules`` in order: ``carry, y_j = fn(module_j, carry, xs_j)``.

  ``scan``: ``modules`` is one stacked module (:func:`stacked`), ``xs`` a pytree of arrays with a leading axis over
  modules, and the ys come back stacked the same way (``lax.scan``). Otherwise ``modules`` is a sequence, ``xs`` a
  sequence of per-module pytrees (``None``: no per-module inputs), and the ys come back as one pytree whose leaves
  are tuples over modules. ``remat``: each module's computation is recomputed in the backward pass (``jax.checkpoint``).
  """
  if scan:
    graphdef, state = nnx.split(modules)

    def body(c, inputs):
      module_state, x = inputs
      return fn(nnx.merge(graphdef, module_state), c, x)

    if remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, carry, (state, xs))
  ys = []
  for module, x in zip(modules, [None] * len(modules) if xs is None else xs):
    if remat:
      graphdef, state = nnx.split(module)
      carry, y = jax.checkpoint(lambda st, c, x_, g=graphdef: fn(nnx.merge(g, st), c, x_),
                                policy=jax.checkpoint_policies.nothing_saveable)(state, carry, x)
    else:
      carry, y = fn(module, carry, x)
    ys.append(y)
  return carry, jax.tree.map(lambda *per_module: tuple(per_module), *ys)


def stack_layer_state(per_layer_states):
  """The state of a stacked (scanned) module from the states of its n unstacked copies, in order."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer_states)


class Transformer(nnx.Module):
  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = dtype_of(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype_of(cfg.dtype), param_dtype=pd,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
                           rngs=rngs)
    if cfg.scan_layers:
      self.layers = stacked(lambda r: Block(cfg, r), cfg.num_layers, rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, cfg.norm_plus_one)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.d_model, cfg.output_size, use_bias=False, dtype=dtype_of(cfg.dtype),
                                param_dtype=pd, rngs=rngs,
                                kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", "vocab")))
    if cfg.draft_vocab_size:
      self.draft_ids = DraftVocab(jnp.arange(cfg.draft_vocab_size, dtype=jnp.int32), out_sharding=(None,))
    if cfg.freeze_embeddings:
      for holder, name in ((self.embed, "embedding"), (getattr(self, "lm_head", None), "kernel")):
        if holder is not None:
          v = getattr(holder, name)
          setattr(holder, name, Frozen(v[...], **v.get_metadata()))

  # -- pieces shared with Tandem and LLM-to-SLM --------------------------------------------------------------------
  def embed_tokens(self, tokens_bt, extra_embed_btd=None):
    x = self.embed(tokens_bt)
    if self.cfg.scale_embeddings:  # Gemma: sqrt(d_model), rounded to the compute dtype as Hugging Face does
      x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
    if extra_embed_btd is not None:
      x = x + extra_embed_btd.astype(x.dtype)
    return constrain(x, ("batch", "length", "act_embed"))

  def normed(self, x_btd):
    return self.final_norm(x_btd)

  def output_ids(self):
    """[N] token id of each logit index (the draft vocabulary), or None when the logits cover the vocabulary."""
    return self.draft_ids[...] if self.cfg.draft_vocab_size else None

  def output_embedding(self):
    """[N, D] embedding rows of the logits' tokens (what the router reads for its top-k features)."""
    table = self.embed.embedding[...]
    return table if not self.cfg.draft_vocab_size else jnp.take(table, self.draft_ids[...], axis=0)

  @scoped("logits")
  def logits(self, x_btd):
    """fp32 logits of final hidden states (final norm applied here); over the draft vocabulary if there is one."""
    h = self.final_norm(x_btd)
    if self.cfg.tie_embeddings:
      out = jnp.einsum("btd,vd->btv", h, self.embed.embedding[...].astype(h.dtype),
                       preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(h).astype(jnp.float32)
    return constrain(softcap(out, self.cfg.final_softcap), ("batch", "length", "act_vocab"))

  def run_layers(self, fn, x, xs):
    """``x, y_j = fn(layer_j, x, xs_j)`` over the layers; see :func:`run_stacked` for the layouts of xs and ys."""
    return run_stacked(self.layers, fn, x, xs, self.cfg.scan_layers, self.cfg.remat)

  def _hidden(self, x0, ys):
    """[L+1, B, T, D]: the embeddings followed by every layer's output."""
    return jnp.concatenate([x0[None], ys]) if self.cfg.scan_layers else jnp.stack([x0, *ys])

  def per_layer(self, *stacks):
    """xs for :meth:`run_layers` from per-layer collections (stacked arrays or tuples) zipped layer by layer."""
    return stacks if self.cfg.scan_layers else list(zip(*stacks))

  def local_flags(self):
    """Per layer: is it a sliding layer (``cfg.layer_types``)? A tuple of bools for unrolled layers; for scanned
    layers a [L] bool array, or None when no layer slides (so a model without windows adds no op)."""
    c = self.cfg
    flags = tuple(c.layer_type(j) == "sliding" for j in range(c.num_layers))
    if not c.scan_layers:
      return flags
    return jnp.asarray(flags) if any(flags) else None

  def masks(self, mask_bts, q_positions_bt, k_positions_bs):
    """(full, sliding) attention masks for :meth:`Block.attend`: the sliding one is None without sliding layers."""
    if not self.cfg.sliding_window:
      return mask_bts, None
    return mask_bts, sliding_mask(mask_bts, q_positions_bt, k_positions_bs, self.cfg.sliding_window)

  # -- full forward ------------------------------------------------------------------------------------------------
  def forward(self, tokens_bt, *, extra_embed_btd=None, return_hidden: bool = False):
    """Causal pass over [B, T] tokens. Returns logits [B, T, V] (fp32) and hidden [L+1, B, T, D] or None."""
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    masks = self.masks(causal_mask(t), positions[:1], positions[:1])
    x0 = self.embed_tokens(tokens_bt, extra_embed_btd)

    def layer_fn(layer, x, local):
      q, k, v = layer.qkv(x, positions, local)
      x = layer.finish(x, layer.attend(q, k, v, masks, local))
      return x, (x if return_hidden else None)

    x, ys = self.run_layers(layer_fn, x0, self.local_flags())
    return self.logits(x), (self._hidden(x0, ys) if return_hidden else None)

  # -- cached ------------------------------------------------------------------------------------------------------
  def init_cache(self, batch_size: int, capacity: int, dtype=None) -> kvcache.KVCache:
    c = self.cfg
    if capacity > c.max_seq_len:
      raise ValueError(f"cache capacity {capacity} exceeds the model's max_seq_len {c.max_seq_len}")
    return kvcache.init_cache(c.num_layers, batch_size, capacity, c.num_kv_heads, c.head_dim,
                              dtype or dtype_of(c.dtype), stacked=c.scan_layers)

  def extend(self, tokens_bt, cache: kvcache.KVCache, *, extra_embed_btd=None, return_hidden: bool = False,
             write: bool | str = True, start_b=None, last_logits: bool = False):
    """Runs k = T new tokens per row at positions ``start[b] + 0..k-1`` (default start: ``cache.lengths``).

    With ``write`` (the default) their keys/values are stored and each row's length becomes start + k (shrink rows
    that had fewer real tokens with :meth:`KVCache.rollback`/``with_lengths``). With ``write=False`` the cache is
    only read: a query at position p attends to the slots 0..p already in it. With ``write="defer"`` the cache is
    only read as well, but the tokens attend to the slots before their row's start and to their own keys/values
    (causally), and the third value returned is those keys/values, ``(k, v)`` per layer [B, T, K, H] (a tuple over
    layers, or [L, B, T, K, H] with ``scan_layers``), for the caller to write (:func:`~tandem_jax.cache.write_layers`)
    where an in-place write is possible: the speculative loop's verify calls sit in a ``lax.switch``, whose branches
    would copy the whole cache to write into it.
    Writing past the cache's capacity raises ValueError where it can be known (:func:`~tandem_jax.cache.check_fits`).
    Returns (logits [B, T, V], hidden [L+1, B, T, D] or None, new cache or the deferred keys/values); with
    ``last_logits`` the logits are only the last position's, [B, 1, V] (the output layer is the largest matmul of a
    small model's step).
    """
    if write not in (True, False, "defer"):
      raise ValueError(f"write must be True, False or 'defer', got {write!r}")
    b, t = tokens_bt.shape
    start = cache.lengths if start_b is None else start_b.astype(jnp.int32)
    if write:
      kvcache.check_fits(start, t, cache.capacity)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    slots = jnp.arange(cache.capacity, dtype=jnp.int32)[None]
    if write == "defer":  # the cache's valid prefix (slots before the row's start), then the block's own keys
      prefix = jnp.broadcast_to((slots < start[:, None])[:, None, :], (b, t, cache.capacity))
      masks = (self.masks(prefix, positions, slots),
               self.masks(jnp.broadcast_to(causal_mask(t), (b, t, t)), positions, positions))
    else:
      masks = self.masks(kvcache.attention_mask(positions, cache.capacity), positions, slots)
    x0 = self.embed_tokens(tokens_bt, extra_embed_btd)

    def layer_fn(layer, x, kv):
      ck, cv, local = kv
      q, k, v = layer.qkv(x, positions, local)
      if write == "defer":
        x = layer.finish(x, layer.attend_parts(q, [(ck, cv, masks[0]), (k, v, masks[1])], local))
        return x, ((k, v), x if return_hidden else None)
      if write:
        ck, cv = kvcache.write(ck, k, start), kvcache.write(cv, v, start)
      x = layer.finish(x, layer.attend(q, ck, cv, masks, local))
      return x, ((ck, cv) if write else None, x if return_hidden else None)

    x, (new_kv, hs) = self.run_layers(layer_fn, x0, self.per_layer(cache.k, cache.v, self.local_flags()))
    if write == "defer":
      cache = new_kv
    elif write:
      cache = cache.replace(k=new_kv[0], v=new_kv[1], lengths=start + t)
    return self.logits(x[:, -1:] if last_logits else x), (self._hidden(x0, hs) if return_hidden else None), cache

  def prefill(self, tokens_bt, lengths_b, cache: kvcache.KVCache, **kw):
    """Ragged prefill of right-padded prompts from each row's current length; rows end at length + lengths_b."""
    start = cache.lengths
    logits, hidden, cache = self.extend(tokens_bt, cache, **kw)
    return logits, hidden, cache.with_lengths(start + lengths_b)
