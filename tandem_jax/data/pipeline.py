"""Packing documents into fixed-length rows, and the Grain pipeline that batches, shuffles and shards them.

Rows are ``seq_len`` tokens of the concatenated stream ``bos doc0 eos bos doc1 eos ...``; documents run across row
boundaries and no padding is ever needed. The model predicts ``row[t + 1]`` from ``row[: t + 1]``: the training
step does the shift, so a row of ``seq_len`` tokens gives ``seq_len - 1`` targets.

The training pipeline (Grain's ``MapDataset`` API, all index arithmetic, no state but a counter)::

  rows --shuffle(seed, epoch)--> [: whole global batches] --batch(local_batch)--> [shard_index::shard_count]
       --repeat(num_epochs)--> {"tokens": int32[local_batch, seq_len]}

Global batch ``g`` is the ``global_batch_size`` consecutive rows ``[g * G, (g + 1) * G)`` of the epoch's shuffled
order; process ``i`` of ``n`` gets its contiguous slice ``[i * G / n, (i + 1) * G / n)``. So the processes' batches
are disjoint, and stacked in process order they are exactly the unsharded batch, which is what
``jax.make_array_from_process_local_data`` assembles along a batch axis sharded over processes. Each epoch is a new
permutation (Grain folds the epoch into the shuffle seed); the rows left over after the last whole global batch are
dropped from that epoch only (a different random remainder each epoch), so no row repeats within an epoch.

Checkpointing: the returned iterator's state is a small JSON-able dict (``{"next_index": k}`` after ``k`` batches)::

  state = it.get_state()                          # save it anywhere, e.g. json.dumps(state)
  it = make_train_loader(...same args...); it.set_state(state)

With orbax, put it in the same checkpoint as the model (one file per process,
``process_{i}-of-{n}.json``, named by ``jax.process_index()``)::

  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                             data=grain.checkpoint.CheckpointRestore(it)))
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from tandem_jax.data.tokenizer import TokenizerProtocol

Batch = dict[str, np.ndarray]


def tokenize_and_pack(docs: Sequence[str], tokenizer: TokenizerProtocol, seq_len: int) -> np.ndarray:
  """Encodes each document as ``bos doc eos``, concatenates them in order and cuts rows of ``seq_len`` tokens.

  Args:
    docs: documents, in the order their tokens should appear.
    tokenizer: any ``TokenizerProtocol``.
    seq_len: tokens per row.

  Returns:
    ``int32[N, seq_len]`` with ``N = total_tokens // seq_len``; the incomplete last row is dropped (so ``N`` may be 0
    for a tiny corpus: ``make_train_loader`` then says how many rows it needs).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (one input and one target), got {seq_len}.")
  encoded = tokenizer.encode_batch(list(docs), add_bos=True, add_eos=True)
  total = sum(len(ids) for ids in encoded)
  stream = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32, count=total)
  n_rows = total // seq_len
  return stream[: n_rows * seq_len].reshape(n_rows, seq_len)


def _as_batch(tokens: np.ndarray) -> Batch:
  return {"tokens": tokens}  # A module-level function, not a lambda: worker processes must pickle the pipeline.


def _check_packed(packed: np.ndarray, batch_size: int, what: str) -> None:
  if packed.ndim != 2:
    raise ValueError(f"packed must be int[rows, seq_len], got shape {packed.shape}.")
  if batch_size <= 0:
    raise ValueError(f"{what} must be positive, got {batch_size}.")
  if packed.shape[0] < batch_size:
    raise ValueError(f"Only {packed.shape[0]} packed rows of {packed.shape[1]} tokens, fewer than one batch of "
                     f"{what}={batch_size}: use more text, a smaller batch, or a shorter seq_len.")


def make_train_loader(packed: np.ndarray, global_batch_size: int, seed: int, shard_index: int = 0,
                      shard_count: int = 1, num_epochs: int | None = None,
                      worker_count: int = 0) -> grain.DatasetIterator:
  """A deterministic, shuffled, sharded, checkpointable iterator of training batches.

  Args:
    packed: ``int[N, seq_len]`` rows from ``tokenize_and_pack``; every process must pass the same array.
    global_batch_size: rows per step summed over all processes; divisible by ``shard_count``.
    seed: shuffle seed in [0, 2**32); the order depends on nothing else (not on ``worker_count``).
    shard_index, shard_count: this process's index and the number of processes (``jax.process_index()``,
      ``jax.process_count()`` in multi-host training).
    num_epochs: ``None`` repeats forever; otherwise the iterator stops after that many epochs.
    worker_count: Grain worker processes (0 = read in this process, right for in-memory rows). With workers, call
      ``it.close()`` when done; absl flags must be parsed before the first batch (``absl.app.run`` does it).

  Returns:
    A ``grain.DatasetIterator`` yielding ``{"tokens": int32[global_batch_size // shard_count, seq_len]}``, with
    ``get_state()`` / ``set_state()`` (see the module docstring for orbax).
  """
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                     f"shard_count={shard_count}.")
  if global_batch_size % shard_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by shard_count={shard_count} "
                     f"(the number of data-loading processes).")
  _check_packed(packed, global_batch_size, "global_batch_size")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}.")
  local_batch = global_batch_size // shard_count
  rows_per_epoch = packed.shape[0] // global_batch_size * global_batch_size
  ds = (
      grain.MapDataset.source(np.asarray(packed, dtype=np.int32))
      .shuffle(seed=seed)  # A new permutation per epoch: Grain seeds each epoch with seed + epoch.
      [:rows_per_epoch]  # Slicing after shuffle drops a different remainder each epoch.
      .batch(local_batch, drop_remainder=True)
      [shard_index::shard_count]  # Process i takes local batch i of every global batch: a contiguous slice.
      .repeat(num_epochs)
      .map(_as_batch)
  )
  # Rows are already in memory: reader threads would only contend for the GIL (Grain's own advice).
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)


def make_eval_batches(packed: np.ndarray, batch_size: int, max_batches: int | None = None) -> list[Batch]:
  """Consecutive, unshuffled batches for evaluation: the same list on every call.

  Args:
    packed: ``int[N, seq_len]`` rows (usually the validation split's).
    batch_size: rows per batch.
    max_batches: keep at most this many batches (the first ones).

  Returns:
    ``[{"tokens": int32[batch_size, seq_len]}, ...]``, ``N // batch_size`` batches (capped by ``max_batches``). The
    last ``N % batch_size`` rows are dropped rather than padded, so every batch has the one compiled shape and no
    metric needs masking.
  """
  _check_packed(packed, batch_size, "batch_size")
  n = packed.shape[0] // batch_size
  if max_batches is not None:
    n = min(n, max_batches)
  packed = np.asarray(packed, dtype=np.int32)
  return [{"tokens": packed[i * batch_size:(i + 1) * batch_size]} for i in range(n)]

