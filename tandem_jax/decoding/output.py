"""The emitted-token buffer shared by every decoding loop: per-row append, EOS and max_new_tokens handling."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Emitted(NamedTuple):
  tokens: jax.Array  # [B, N] int32; slots >= count are unspecified
  count: jax.Array   # [B] int32 tokens emitted so far
  done: jax.Array    # [B] bool: EOS emitted or max_new_tokens reached


def init(batch_size: int, capacity: int, max_new_b: jax.Array) -> Emitted:
  return Emitted(jnp.zeros((batch_size, capacity), jnp.int32), jnp.zeros((batch_size,), jnp.int32),
                 max_new_b <= 0)


def append(em: Emitted, new_bk: jax.Array, num_b: jax.Array, max_new_b: jax.Array, eos_id) -> Emitted:
  """Appends the first num_b[b] of new_bk[b] to active rows, stopping each row at its EOS and its max_new_tokens.

  ``eos_id`` may be traced; a negative value means no EOS.
  The buffer must have room for count + K slots (callers size it as max_new + K).
  """
  k = new_bk.shape[1]
  active = ~em.done
  idx = jnp.arange(k, dtype=jnp.int32)[None]
  valid = idx < num_b[:, None]
  num = num_b
  is_eos = valid & (new_bk == eos_id) & (eos_id >= 0)
  hit_eos = jnp.any(is_eos, -1)
  num = jnp.where(hit_eos, jnp.argmax(is_eos, -1) + 1, num)  # keep the EOS itself, drop what follows
  num = jnp.minimum(num, max_new_b - em.count)
  num = jnp.where(active, num, 0).astype(jnp.int32)
  tokens = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at,)))(
      em.tokens, new_bk.astype(jnp.int32), em.count)
  tokens = jnp.where(active[:, None], tokens, em.tokens)
  count = em.count + num
  done = em.done | (active & (hit_eos | (count >= max_new_b)))
  return Emitted(tokens, count, done)
