"""Tandem Transformers, Eq. 2 of arXiv 2402.08644 (PAPER_NOTES §1.2).

The secondary M_S runs autoregressively; in every layer j it attends over one mixed key/value set: for tokens of
earlier blocks, keys/values that *its own* layer-(j+1) attention computes from projected primary states
ŷ^(j) = FF_Tandem^(j)(x^(ℓ(j))); for tokens of the current block, its own states y^(j). The primary M_L is an
ordinary causal decoder run in block mode and is never changed by Tandem.

Two paths compute the same function and are tested against each other:
- :meth:`TandemLM.forward`, the parallel training forward for a block length γ: one causal primary pass under
  stop_gradient, then one secondary pass whose layers attend over [projected keys (T) ; own keys (T)] with the
  block mask of :func:`block_mask`.
- The step-by-step inference path over the secondary's cache (:mod:`tandem_jax.cache`): slots below a row's
  boundary hold projected keys/values written by :meth:`TandemLM.commit` after each primary block call, slots from
  the boundary on hold the secondary's own, written by ordinary :meth:`Transformer.extend` steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax import cache as kvcache
from tandem_jax.models.config import TandemConfig, TransformerConfig, dtype_of
from tandem_jax.models.layers import scoped
from tandem_jax.models.transformer import Transformer, run_stacked, stacked


def own_start(block_start, boundary: str):
  """The block boundary (Eq. 2 vs Fig. 1, PAPER_NOTES §1.2), decided here and nowhere else.

  In a block starting at position s the secondary represents positions own_start(s).. itself and reads earlier ones
  as projected primary states: own_start = s ("fig1") or s + 1 ("eq2": the block's first token is read from the
  primary too). :func:`block_mask` (training) and :func:`decode_block_offset` (decoding) are both this rule.
  """
  return block_start + (1 if boundary == "eq2" else 0)


def decode_block_offset(first_own_b, boundary: str):
  """Where the training forward's blocks start for it to compute what decoding computes from ``first_own_b``.

  Decoding (``speculative.tandem_drafter``) represents exactly the positions the primary has not processed yet: a
  block's first own position is the pending token n, whatever the boundary. With γ drafts a decoding block covers
  γ + 1 positions, and the one query the drafter does not run is the one whose next token the primary supplies:
  under "fig1" the block is [n, n+γ+1) and that query is its last; under "eq2" the block is [n-1, n+γ), starting at
  the last token the primary processed, and that query is its first (it would predict the pending token). So one
  drafter decodes both boundaries, and the forward with ``block_len`` γ + 1 and ``block_offset_b`` =
  decode_block_offset(prompt lengths) gives its logits. With the same γ, "eq2" decoding thus uses own spans of
  1..γ tokens where "eq2" training with block length γ used 0..γ-1: train eq2 with γ + 1 to decode with γ drafts.
  """
  return first_own_b - own_start(0, boundary)


def block_mask(t: int, block_len: int, offset_b: jax.Array, boundary: str = "fig1") -> jax.Array:
  """[B, T, 2T] bool mask over [projected slots ; own slots] for queries 0..T-1.

  Blocks of block_len tile every row, aligned so that one starts at offset_b[b] (positions before it are split into
  blocks too, counting back from the offset). A query i in the block starting at s sees projected primary states of
  positions < own_start(s) and its own states of positions own_start(s)..i (:func:`own_start`).
  """
  i = jnp.arange(t, dtype=jnp.int32)[None, :, None]
  s = jnp.arange(t, dtype=jnp.int32)[None, None, :]
  off = offset_b.astype(jnp.int32)[:, None, None]
  start = off + jnp.floor_divide(i - off, block_len) * block_len
  n_proj = jnp.minimum(own_start(start, boundary), i + 1)
  proj = s < n_proj
  own = (s >= n_proj) & (s <= i)
  return jnp.concatenate([proj, own], axis=-1)


class TandemLM(nnx.Module):
  """Primary + secondary + one projection d_L -> d_S per secondary layer."""

  def __init__(self, primary_cfg: TransformerConfig, secondary_cfg: TransformerConfig, tandem_cfg: TandemConfig,
               rngs: nnx.Rngs):
    if primary_cfg.vocab_size != secondary_cfg.vocab_size:
      raise ValueError(f"primary and secondary must share a vocabulary: primary vocab_size "
                       f"{primary_cfg.vocab_size} != secondary vocab_size {secondary_cfg.vocab_size}")
    self.tandem_cfg = tandem_cfg
    self.layer_map = tandem_cfg.resolve_layer_map(primary_cfg.num_layers, secondary_cfg.num_layers)
    self.primary = Transformer(primary_cfg, rngs)
    self.secondary = Transformer(secondary_cfg, rngs)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("primary_embed", "embed"))

    def projection(r):
      return nnx.Linear(primary_cfg.d_model, secondary_cfg.d_model, use_bias=tandem_cfg.projection_bias,
                        dtype=dtype_of(secondary_cfg.dtype), param_dtype=dtype_of(secondary_cfg.param_dtype),
                        kernel_init=init,
                        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=r)

    # Stacked like the secondary's layers when those are scanned.
    if secondary_cfg.scan_layers:
      self.projections = stacked(projection, secondary_cfg.num_layers, rngs)
    else:
      self.projections = nnx.List([projection(rngs) for _ in range(secondary_cfg.num_layers)])

  def select_hidden(self, primary_hidden_lbtd):
    """[L_S, B, T, D_L]: the primary hidden state x^(ℓ(j)) each secondary layer j reads (of all L_L + 1)."""
    return jnp.stack([primary_hidden_lbtd[m] for m in self.layer_map])

  @scoped("projection")
  def project_kv(self, primary_hidden_lbtd, positions_bt, *, selected: bool = False):
    """Per secondary layer j: keys/values of ŷ^(j) = FF^(j)(x^(ℓ(j))) under layer j's own norm and W_K, W_V.

    ``primary_hidden_lbtd``: all L_L + 1 hidden states, or with ``selected`` only the L_S that the layer map reads
    (:meth:`select_hidden`; what a cache of primary features keeps).
    Returns (keys, values) in the secondary cache's layout: [L_S, B, T, K, H] arrays (scan_layers) or tuples.
    """
    def layer_fn(pair, carry, h_local):
      (proj, layer), (h, local) = pair, h_local
      return carry, layer.kv(proj(h), positions_bt, local)

    hs = primary_hidden_lbtd if selected else self.select_hidden(primary_hidden_lbtd)
    flags = self.secondary.local_flags()
    if self.secondary.cfg.scan_layers:
      modules, xs = (self.projections, self.secondary.layers), (hs, flags)
    else:
      modules = list(zip(self.projections, self.secondary.layers))
      xs = [(hs[j], flags[j]) for j in range(len(self.layer_map))]
    _, (keys, values) = run_stacked(modules, layer_fn, None, xs, self.secondary.cfg.scan_layers)
    return keys, values

  # -- parallel training forward -----------------------------------------------------------------------------------
  def forward(self, tokens_bt, block_len: int, *, block_offset_b=None, primary_out=None):
    """Teacher-forced pass. Returns (secondary logits [B, T, N], primary logits [B, T, V]); both fp32 (N = V
    unless the secondary has a draft vocabulary).

    The primary runs under stop_gradient (frozen). ``primary_out`` = (logits, hidden) skips recomputing it.
    """
    if block_len < 1:
      raise ValueError(f"block_len (γ) must be >= 1, got {block_len}")
    b, t = tokens_bt.shape
    if primary_out is None:
      primary_out = self.primary.forward(tokens_bt, return_hidden=True)
    logits_l, hidden_l = jax.lax.stop_gradient(primary_out)
    return self.secondary_forward(tokens_bt, block_len, self.select_hidden(hidden_l),
                                  block_offset_b=block_offset_b), logits_l

  def secondary_forward(self, tokens_bt, block_len: int, selected_hidden_lbtd, *, block_offset_b=None,
                        return_hidden: bool = False):
    """The secondary's teacher-forced logits [B, T, N] from the primary states its layers read
    (``selected_hidden_lbtd`` [L_S, B, T, D_L], :meth:`select_hidden`): :meth:`forward` without the primary.
    With ``return_hidden``: (logits, the last layer's output [B, T, D_S] before the final norm)."""
    b, t = tokens_bt.shape
    offset = jnp.zeros((b,), jnp.int32) if block_offset_b is None else block_offset_b
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # Both halves of the key set [projected ; own] hold positions 0..T-1 (what a sliding layer's window reads).
    masks = self.secondary.masks(block_mask(t, block_len, offset, self.tandem_cfg.boundary), positions[:1],
                                 jnp.tile(positions[:1], (1, 2)))
    keys, values = self.project_kv(jax.lax.stop_gradient(selected_hidden_lbtd), positions, selected=True)

    def layer_fn(layer, x, kv):
      kp, vp, local = kv
      q, k, v = layer.qkv(x, positions, local)
      o = layer.attend(q, jnp.concatenate([kp, k.astype(kp.dtype)], 1),
                       jnp.concatenate([vp, v.astype(vp.dtype)], 1), masks, local)
      return layer.finish(x, o), None

    x, _ = self.secondary.run_layers(layer_fn, self.secondary.embed_tokens(tokens_bt),
                                     self.secondary.per_layer(keys, values, self.secondary.local_flags()))
    return (self.secondary.logits(x), x) if return_hidden else self.secondary.logits(x)

  # -- step-by-step inference --------------------------------------------------------------------------------------
  def init_secondary_cache(self, batch_size: int, capacity: int) -> kvcache.KVCache:
    return self.secondary.init_cache(batch_size, capacity)

  def commit(self, secondary_cache: kvcache.KVCache, primary_hidden_lbtd, start_b, num_b) -> kvcache.KVCache:
    """Moves positions start..start+k-1 of each row into the projected slot.

    ``primary_hidden`` [L_L+1, B, k, D_L] are the primary's hidden states of those positions (from a prefill or a
    block call). All k are written; each row's boundary and length becomes start + num (num <= k; positions past it
    were rejected and will be overwritten).
    """
    k = primary_hidden_lbtd.shape[2]
    start = start_b.astype(jnp.int32)
    kvcache.check_fits(start, k, secondary_cache.capacity)
    positions = start[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    keys, values = self.project_kv(primary_hidden_lbtd, positions)
    return secondary_cache.replace(k=kvcache.write_layers(secondary_cache.k, keys, start),
                                   v=kvcache.write_layers(secondary_cache.v, values, start),
                                   lengths=start + num_b.astype(jnp.int32))

  def secondary_step(self, tokens_bt, secondary_cache: kvcache.KVCache, **kw):
    """The secondary's own step(s): an ordinary cached extend (its keys go to the own slot)."""
    return self.secondary.extend(tokens_bt, secondary_cache, **kw)
