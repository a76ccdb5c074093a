"""The emitted-token buffer shared by every decoding loop: per-row append, EOS and max_new_tokens handling, and
streaming (``publish`` inside the loop, a host-side ``Stream`` forwarding each row's new tokens)."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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


# Streaming. A streaming program calls `publish` after every append; its callback is the module-level `_sink`, which
# forwards to the `Stream` of the current call, so every on_tokens function shares one compiled program.


class Stream:
  """Host side of one streaming call: forwards each row's tokens past what it already sent to ``fn``."""

  def __init__(self, fn: Callable[[list[list[int]]], None], batch_size: int):
    self.fn = fn
    self.sent = np.zeros(batch_size, np.int64)  # tokens forwarded so far, per row
    self.error: Exception | None = None          # the first exception fn raised (the caller re-raises it)
    self.lock = threading.Lock()

  def __call__(self, tokens, count) -> None:
    """Sends tokens[b, sent[b]:count[b]] per row; a call with nothing new (stale or repeated counts) sends nothing."""
    with self.lock:
      if self.error is not None:
        return
      tokens, count = np.asarray(tokens), np.asarray(count)
      new = [tokens[i, s:c].tolist() if c > s else [] for i, (s, c) in enumerate(zip(self.sent, count))]
      if not any(new):
        return
      self.sent = np.maximum(self.sent, count)
      try:
        self.fn(new)
      except Exception as e:  # noqa: BLE001 - the compiled loop cannot be stopped; the caller raises it afterwards
        self.error = e


_active: Stream | None = None
_lock = threading.Lock()  # the sink has one slot: streaming calls run one at a time


def _sink(tokens, count) -> None:
  stream = _active
  if stream is not None:
    stream(tokens, count)


@contextlib.contextmanager
def streaming(fn: Callable[[list[list[int]]], None], batch_size: int) -> Iterator[Stream]:
  """Routes the sink to ``fn`` for the duration of one call (waits for another thread's streaming call to end)."""
  global _active
  with _lock:
    _active = Stream(fn, batch_size)
    try:
      yield _active
    finally:
      _active = None


def publish(em: Emitted) -> None:
  """Sends the buffer and the counts to the host sink (traced; streaming programs only).

  Ordered on one device. Under a mesh of several devices, where JAX has no ordered callbacks, unordered: every call
  carries the whole buffer and the host ignores stale counts, so the rows still stream in order."""
  ordered = jax.sharding.get_abstract_mesh().size <= 1
  jax.debug.callback(_sink, em.tokens, em.count, ordered=ordered)
