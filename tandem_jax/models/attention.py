"""Blockwise ("flash") attention in plain JAX: the same function as :func:`~tandem_jax.models.layers.attend`
without a [T, S] score tensor for the whole sequence.

The keys are visited ``block`` at a time with an online softmax (running max, running sum and output accumulator
in fp32), so the forward holds one [B, heads, T, block] score block at a time. A ``jax.custom_vjp`` gives the
backward of flash attention: only the output and the per-row softmax statistics (max and sum) are saved, and each key block's scores
are recomputed from q and k (dq accumulated over blocks, dk and dv produced per block). Autodiff through the key
scan would instead store the running accumulator of every block step.

Same numerics as :func:`attend` up to fp32 rounding, including its corner cases: masked scores are ``_NEG_INF``,
not -inf, so a query row whose mask is entirely False averages every value uniformly exactly as the plain softmax
does (never NaN); a key block with no visible key for a row contributes nothing once any visible key was seen.
The boolean mask is sliced per block (a [B, T, S] bool is small next to fp32 scores for every head). Queries are
not blocked: the score block is [T, block] per head. A sequence whose length is not a multiple of ``block`` ends
in one shorter block, so nothing is padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def softcap(x: jax.Array, cap: float) -> jax.Array:
  return cap * jnp.tanh(x / cap) if cap else x


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array, *,
           scale: float | None = None, cap: float = 0.0) -> jax.Array:
  """Softmax attention with grouped query heads. Scores and softmax in fp32. Returns [B, T, N, H].

  ``scale``: the scores' factor (default head_dim ** -0.5); ``cap``: soft-capping of the scores (0: off)."""
  return attend_parts(q_btnh, [(k_bskh, v_bskh, mask_bts)], scale=scale, cap=cap)


def attend_parts(q_btnh: jax.Array, parts, *, scale: float | None = None, cap: float = 0.0) -> jax.Array:
  """:func:`attend` over the concatenation of key/value parts without concatenating them: ``parts`` is a sequence of
  (k [B, S_i, K, H], v [B, S_i, K, H], mask [B, T, S_i]). Scores are concatenated (small), one softmax over all
  of them, and the output is the sum of each part's probabilities times its values.

  A block verified against a cache it does not write (:meth:`~tandem_jax.models.transformer.Transformer.extend`
  with ``write="defer"``) attends to the cache's valid prefix and to its own keys this way: writing them into the
  cache first would copy the whole cache where the call sits in a ``lax.switch`` branch (a branch may not update its
  operand in place)."""
  b, t, n, h = q_btnh.shape
  kh = parts[0][0].shape[2]
  q = q_btnh.reshape(b, t, kh, n // kh, h)
  scale = h ** -0.5 if scale is None else scale
  scores = [jnp.where(m[:, None, None, :, :],
                      softcap(jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale, cap),
                      _NEG_INF) for k, _, m in parts]
  probs = jax.nn.softmax(jnp.concatenate(scores, -1), axis=-1)
  out, start = None, 0
  for k, v, _ in parts:
    o = jnp.einsum("bkgts,bskh->btkgh", probs[..., start:start + k.shape[1]].astype(v.dtype), v)
    out, start = (o if out is None else out + o), start + k.shape[1]
  return out.reshape(b, t, n, h)


def _key_blocks(s: int, block: int):
  """(number of full blocks, size of the shorter last block or 0) covering ``s`` keys."""
  return s // block, s % block


def _scores(q_btkgh, k_bskh, mask_bts, scale, cap):
  """(raw scaled scores, soft-capped and masked scores), both [B, K, G, T, S'] fp32, for one key block."""
  raw = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32) * scale
  return raw, jnp.where(mask_bts[:, None, None, :, :], softcap(raw, cap), _NEG_INF)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _forward(q_btkgh, k_bskh, v_bskh, mask_bts, scale, cap, block):
  """Online softmax over key blocks: (output [B, K, G, T, H] fp32, (row max, row sum) [B, K, G, T] fp32)."""
  b, t, kh, g, h = q_btkgh.shape
  m = jnp.full((b, kh, g, t), _NEG_INF, jnp.float32)
  carry = (m, jnp.zeros_like(m), jnp.zeros((b, kh, g, t, h), jnp.float32))

  def step(carry, start, size):
    m, l, acc = carry
    _, s = _scores(q_btkgh, _slice(k_bskh, start, size, 1), _slice(mask_bts, start, size, 2), scale, cap)
    m_new = jnp.maximum(m, s.max(-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v_bskh.dtype), _slice(v_bskh, start, size, 1),
                    preferred_element_type=jnp.float32)
    return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv

  full, rest = _key_blocks(k_bskh.shape[1], block)
  if full:
    carry, _ = jax.lax.scan(lambda c, i: (step(c, i * block, block), None), carry, jnp.arange(full))
  if rest:
    carry = step(carry, full * block, rest)
  m, l, acc = carry
  # l >= 1: the row's maximum contributes exp(0), also when every key of the row is masked. m and l are kept
  # apart: in a fully-masked row m = -1e30 would absorb log(l) in fp32.
  return acc / l[..., None], (m, l)


def _backward(q_btkgh, k_bskh, v_bskh, mask_bts, o_bkgth, stats, do_bkgth, scale, cap, block):
  """Flash-attention backward: (dq [B, T, K, G, H], dk, dv [B, S, K, H]) in fp32, one key block at a time.

  Matmul operands in the inputs' dtype (bf16 models: bf16 on the MXU), accumulated in fp32, as the forward."""
  m_bkgt, l_bkgt = stats
  delta = (do_bkgth * o_bkgth).sum(-1)  # [B, K, G, T]: sum_s p * dp, the softmax Jacobian's row term
  cd = v_bskh.dtype
  do = do_bkgth.astype(cd)

  def mm(spec, a, b):
    return jnp.einsum(spec, a.astype(cd), b, preferred_element_type=jnp.float32)

  def step(dq, start, size):
    k, v, mask = _slice(k_bskh, start, size, 1), _slice(v_bskh, start, size, 1), _slice(mask_bts, start, size, 2)
    raw, s = _scores(q_btkgh, k, mask, scale, cap)
    p = jnp.exp(s - m_bkgt[..., None]) / l_bkgt[..., None]
    dv = mm("bkgts,bkgth->bskh", p, do)
    dp = mm("bkgth,bskh->bkgts", do, v)
    ds = jnp.where(mask[:, None, None], p * (dp - delta[..., None]), 0.0)  # masked scores are constants
    if cap:
      ds = ds * (1.0 - jnp.square(jnp.tanh(raw / cap)))
    ds = ds * scale
    dq = dq + mm("bkgts,bskh->btkgh", ds, k)
    dk = mm("bkgts,btkgh->bskh", ds, q_btkgh)
    return dq, (dk, dv)

  b, s, kh, h = k_bskh.shape
  full, rest = _key_blocks(s, block)
  dq = jnp.zeros(q_btkgh.shape, jnp.float32)
  dk = dv = jnp.zeros((b, 0, kh, h), jnp.float32)
  if full:
    dq, (dk_nbskh, dv_nbskh) = jax.lax.scan(lambda c, i: step(c, i * block, block), dq, jnp.arange(full))
    dk = jnp.moveaxis(dk_nbskh, 0, 1).reshape(b, full * block, kh, h)
    dv = jnp.moveaxis(dv_nbskh, 0, 1).reshape(b, full * block, kh, h)
  if rest:
    dq, (dk_rest, dv_rest) = step(dq, full * block, rest)
    dk, dv = jnp.concatenate([dk, dk_rest], 1), jnp.concatenate([dv, dv_rest], 1)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q_btkgh, k_bskh, v_bskh, mask_bts, scale, cap, block):
  return _forward(q_btkgh, k_bskh, v_bskh, mask_bts, scale, cap, block)[0]


def _attend_fwd(q_btkgh, k_bskh, v_bskh, mask_bts, scale, cap, block):
  o, stats = _forward(q_btkgh, k_bskh, v_bskh, mask_bts, scale, cap, block)
  return o, (q_btkgh, k_bskh, v_bskh, mask_bts, o, stats)


def _attend_bwd(scale, cap, block, residuals, do_bkgth):
  q, k, v, mask, o, stats = residuals
  dq, dk, dv = _backward(q, k, v, mask, o, stats, do_bkgth.astype(jnp.float32), scale, cap, block)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array, *,
                     scale: float | None = None, cap: float = 0.0, block: int = 512) -> jax.Array:
  """:func:`~tandem_jax.models.layers.attend` computed ``block`` keys at a time. Returns [B, T, N, H].

  q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (grouped query heads); mask: bool [B or 1, T, S].
  ``scale``: the scores' factor (default head_dim ** -0.5); ``cap``: soft-capping of the scores (0: off)."""
  b, t, n, h = q_btnh.shape
  kh = k_bskh.shape[2]
  if block < 1:
    raise ValueError(f"blockwise_attend: block must be a positive integer, got {block!r}")
  mask_bts = jnp.broadcast_to(mask_bts, (mask_bts.shape[0], t, k_bskh.shape[1]))
  q = q_btnh.reshape(b, t, kh, n // kh, h)
  o_bkgth = _attend(q, k_bskh, v_bskh, mask_bts, float(h ** -0.5 if scale is None else scale), float(cap),
                    int(block))
  return jnp.einsum("bkgth->btkgh", o_bkgth).reshape(b, t, n, h).astype(v_bskh.dtype)
