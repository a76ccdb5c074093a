"""`ar` (the primary alone, one token per call) and `llm_to_slm` (prompt fused once, then the secondary alone).

Both are a prefill followed by one ``lax.while_loop`` of single-token steps; rows that finished keep their cache
lengths frozen and stop counting toward the statistics.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tandem_jax import cache as kvcache
from tandem_jax.decoding import output, sampling


def last_logits(logits_btv: jax.Array, lengths_b: jax.Array) -> jax.Array:
  """Logits at each row's last real prompt position: [B, V]."""
  return jnp.take_along_axis(logits_btv, (lengths_b - 1)[:, None, None], axis=1)[:, 0]


def ar_loop(step: Callable, cache: kvcache.KVCache, first_logits_bv, max_new_b, key, *, params: sampling.SamplingParams,
            eos_id, max_new: int, stream: bool = False):
  """Samples the first token from ``first_logits`` then steps ``step(tokens_b1, cache) -> (logits_bv, cache)``.

  With ``stream`` the emitted buffer is published to the host after every append (:func:`output.publish`)."""
  b = first_logits_bv.shape[0]
  key, sub = sampling.split(key, params)
  first, _ = sampling.sample_logits(sub, first_logits_bv, params)
  em = output.append(output.init(b, max_new + 1, max_new_b), first[:, None], jnp.ones((b,), jnp.int32), max_new_b,
                     eos_id)
  if stream:
    output.publish(em)
  calls = jnp.ones((b,), jnp.int32)  # the prefill produced the first token

  def cond(carry):
    em, *_ , it = carry
    return jnp.any(~em.done) & (it < max_new)

  def body(carry):
    em, cache, pending, key, calls, it = carry
    active = ~em.done
    with jax.named_scope("step"):
      logits, new_cache = step(pending[:, None], cache)
    new_cache = new_cache.with_lengths(jnp.where(active, new_cache.lengths, cache.lengths))
    with jax.named_scope("sample"):
      key, sub = sampling.split(key, params)
      nxt, _ = sampling.sample_logits(sub, logits, params)
    with jax.named_scope("append"):
      em = output.append(em, nxt[:, None], jnp.ones((b,), jnp.int32), max_new_b, eos_id)
    if stream:
      output.publish(em)
    return em, new_cache, nxt, key, calls + active.astype(jnp.int32), it + 1

  em, cache, _, _, calls, _ = jax.lax.while_loop(cond, body, (em, cache, first, key, calls, jnp.int32(0)))
  stats = dict(primary_calls=calls, secondary_calls=jnp.zeros_like(calls), drafted=jnp.zeros_like(calls),
               accepted=jnp.zeros_like(calls))
  return em, stats


def decode_ar(model, prompt_bt, prompt_len_b, max_new_b, key, *, params, eos_id, max_new: int, capacity: int,
              stream: bool = False):
  """The primary alone. ``model`` is a :class:`~tandem_jax.models.Transformer`."""
  cache = model.init_cache(prompt_bt.shape[0], capacity)
  logits, _, cache = model.prefill(prompt_bt, prompt_len_b, cache)

  def step(tokens, cache):
    logits, _, cache = model.extend(tokens, cache)
    return logits[:, 0], cache

  return ar_loop(step, cache, last_logits(logits, prompt_len_b), max_new_b, key, params=params, eos_id=eos_id,
                 max_new=max_new, stream=stream)


def decode_llm_to_slm(model, prompt_bt, prompt_len_b, max_new_b, key, *, params, eos_id, max_new: int,
                      capacity: int, stream: bool = False):
  """The primary encodes the prompt once; the secondary then decodes alone (:class:`~tandem_jax.models.LLMToSLM`)."""
  cache = model.secondary.init_cache(prompt_bt.shape[0], capacity)
  logits, cache = model.prefill(prompt_bt, prompt_len_b, cache)

  def step(tokens, cache):
    logits, _, cache = model.secondary.extend(tokens, cache)
    return logits[:, 0], cache

  em, stats = ar_loop(step, cache, last_logits(logits, prompt_len_b), max_new_b, key, params=params, eos_id=eos_id,
                      max_new=max_new, stream=stream)
  # The primary ran once (the prompt encoding); every token came from the secondary.
  stats = dict(stats, secondary_calls=stats["primary_calls"], primary_calls=jnp.ones_like(stats["primary_calls"]))
  return em, stats
