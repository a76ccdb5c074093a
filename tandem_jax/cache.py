"""The key/value cache: an explicit pytree with one (k, v) buffer per layer and a length per row.

Slot ``s`` of a row holds the key/value of absolute position ``s``. A row's ``length`` is how many positions are valid;
slots at or beyond it may hold stale values from rejected drafts, which is harmless because a query at position ``p``
only attends to slots ``<= p`` and every slot is written before any query past it runs. Rolling back is therefore
only a change of ``lengths``: no buffer is copied.

The Tandem secondary uses the same structure as its "two-slot" cache (PAPER_NOTES §1.2): slots below the boundary
hold keys/values computed from projected primary states, slots from the boundary on hold the secondary's own. Since
both are indexed by absolute position and never needed at once, one buffer per layer serves both slots; committing
a verified block overwrites its own entries with projected ones (:func:`write`).

The buffers' axes have logical names (:data:`BUFFER_AXES`); :func:`init_cache` constrains a new cache to their mesh
sharding through the active rules (``config.mesh.rules``), so every decoder's cache is laid out by the one table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tandem_jax.sharding import constrain

# Logical axis names: a layer's buffer [B, S, K, H], the stacked buffer [L, B, S, K, H] of scan_layers, lengths [B].
BUFFER_AXES = ("cache_batch", "cache_sequence", "cache_heads", "cache_kv")
STACKED_AXES = ("layers",) + BUFFER_AXES
LENGTHS_AXES = ("cache_batch",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  # Per layer [B, S, K, H]: a tuple of L buffers, or one [L, B, S, K, H] array for a model with scan_layers
  # (``k[i]`` is layer i's buffer either way).
  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  lengths: jax.Array        # [B] int32: valid positions per row

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def capacity(self) -> int:
    return self.k[0].shape[1]

  @property
  def num_layers(self) -> int:
    return len(self.k)

  def replace(self, **kw) -> "KVCache":
    return dataclasses.replace(self, **kw)

  def rollback(self, lengths: jax.Array) -> "KVCache":
    """Shortens rows to ``lengths`` ([B]); later writes overwrite the dropped slots."""
    return self.replace(lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))

  def with_lengths(self, lengths: jax.Array) -> "KVCache":
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))


def init_cache(num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32, stacked: bool = False) -> KVCache:
  """An empty cache, sharded by the active logical rules (a no-op without a mesh and rules)."""
  shape = (batch_size, capacity, num_kv_heads, head_dim)
  if stacked:
    k, v = (constrain(jnp.zeros((num_layers, *shape), dtype), STACKED_AXES) for _ in range(2))
  else:
    k, v = (tuple(constrain(jnp.zeros(shape, dtype), BUFFER_AXES) for _ in range(num_layers)) for _ in range(2))
  return KVCache(k=k, v=v, lengths=constrain(jnp.zeros((batch_size,), jnp.int32), LENGTHS_AXES))


def check_fits(start_b, num: int, capacity: int) -> None:
  """Raises ValueError if writing ``num`` positions from ``start_b`` [B] would pass the cache's ``capacity``.

  Checked always where shapes decide it (num > capacity) and for concrete starts (eager calls); inside jit the
  starts are traced and the caller guarantees it (``generate`` sizes every cache for its prompts and budgets).
  Past the end, ``dynamic_update_slice`` would clamp the start and silently overwrite valid slots.
  """
  if num > capacity:
    raise ValueError(f"cannot write {num} positions into a KV cache of capacity {capacity}")
  if isinstance(start_b, jax.core.Tracer) or not getattr(start_b, "is_fully_addressable", True):
    return
  end = int(np.max(np.asarray(start_b))) + num
  if end > capacity:
    raise ValueError(f"writing {num} positions from a row at length {end - num} needs {end} slots but the KV cache "
                     f"holds {capacity}: init the cache with capacity >= {end}")


def write(buf_bskh: jax.Array, new_btkh: jax.Array, start_b: jax.Array) -> jax.Array:
  """Writes ``new[b]`` into ``buf[b, start[b]:start[b]+T]`` for every row.

  The caller guarantees ``start[b] + T <= S`` (:func:`check_fits`; decoders size their caches for that); past the
  end ``dynamic_update_slice`` would clamp the start and overwrite valid slots.
  """
  new_btkh = new_btkh.astype(buf_bskh.dtype)
  zero = jnp.zeros((), jnp.int32)
  return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(b, n, (s, zero, zero)))(
      buf_bskh, new_btkh, start_b.astype(jnp.int32))


def write_layers(bufs, new, start_b: jax.Array):
  """:func:`write` for every layer: ``bufs``/``new`` are tuples over layers or arrays with a leading layer axis."""
  if isinstance(bufs, (tuple, list)):
    return tuple(write(b, n, start_b) for b, n in zip(bufs, new))
  return jax.vmap(write, in_axes=(0, 0, None))(bufs, new, start_b)


def attention_mask(q_positions_bt: jax.Array, capacity: int) -> jax.Array:
  """[B, T, S] bool: a query at position p sees cache slots 0..p."""
  slots = jnp.arange(capacity, dtype=jnp.int32)
  return slots[None, None, :] <= q_positions_bt[:, :, None]
