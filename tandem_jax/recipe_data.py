"""The recipe's data from a pretrained primary (:mod:`tandem_jax.recipe`): prompts (corpus windows and topic
prompts), the primary's greedy (or sampled) continuations with its labels, top-k teacher and hidden states kept in
the same pass, teacher-forced corpus features, and the draft vocabulary."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem_jax.models.transformer import Transformer
from tandem_jax.progress import Progress


def corpus_prompts(tokenizer, documents: Sequence[str], n: int, length: int, seed: int) -> np.ndarray:
  """[n, length] token windows from ``documents`` (BOS first), spread over the documents, in a seeded order."""
  rng = np.random.default_rng(seed)
  windows = []
  for ids in tokenizer.encode_batch(list(documents)):
    for start in range(0, max(len(ids) - length, 0), max(length * 4, 1)):
      windows.append(ids[start:start + length - 1])
  if len(windows) < n:
    raise ValueError(f"the corpus yields {len(windows)} prompt windows of {length} tokens; {n} are needed")
  pick = rng.choice(len(windows), n, replace=False)
  bos = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else windows[0][0]
  return np.asarray([[bos] + windows[i] for i in pick], np.int32)


TOPIC_TEMPLATES = ("{W} is", "The {w}", "A short history of {w}:", "{W} are", "How does {w} work? ",
                   "Facts about {w}:", "In this article, we explain {w}.", "Why {w} matters:")


def topic_prompts(tokenizer, n: int, length: int, seed: int) -> np.ndarray:
  """[n, <= length] prompts on varied subjects, for the primary to continue: a template around a word drawn from
  the tokenizer's own vocabulary (whole lowercase words of 5+ letters). The corpus alone (one genre, one subject)
  made drafters that failed on other text; these let the primary's continuations cover its own range."""
  rng = np.random.default_rng([seed, 1])
  words = []
  for i in range(tokenizer.vocab_size):
    w = tokenizer.decode([i]).strip()
    if len(w) >= 5 and w.isascii() and w.isalpha() and w.islower():
      words.append(w)
  if not words:
    raise ValueError("the tokenizer has no whole-word tokens to build topic prompts from")
  bos = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else None
  out = np.zeros((n, length), np.int32)
  for r in range(n):
    w = words[rng.integers(len(words))]
    text = TOPIC_TEMPLATES[rng.integers(len(TOPIC_TEMPLATES))].format(w=w, W=w.capitalize())
    ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
    out[r, :min(len(ids), length)] = ids[:length]
    out[r, len(ids):] = -1
  return out


def exact_top_k(x, k: int, chunk: int = 32):
  """``jax.lax.top_k`` over the last axis, exact, in two stages: the k chunks of ``chunk`` entries with the largest
  maxima hold the k largest entries, so a top-k over chunk maxima, then over those chunks' entries. Inside a
  compiled loop on CPU, lax.top_k over a 49,152-entry vocabulary cost ~210 ms per step for 16 rows; this ~2.4 ms."""
  v = x.shape[-1]
  if v <= k * chunk:
    return jax.lax.top_k(x, k)
  pad = (-v) % chunk
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
  c = xp.reshape(x.shape[:-1] + (-1, chunk))
  _, top_c = jax.lax.top_k(jnp.max(c, -1), k)                   # [..., k] chunk indices
  cand = jnp.take_along_axis(c, top_c[..., None], -2)            # [..., k, chunk]
  vals, pos = jax.lax.top_k(cand.reshape(x.shape[:-1] + (-1,)), k)
  return vals, jnp.take_along_axis(top_c, pos // chunk, -1) * chunk + pos % chunk


def primary_outputs(logits, hidden, layers: tuple, k: int) -> dict:
  """What training keeps of the primary at each position: its argmax (the label), its top-k log-probabilities and
  token ids (the soft target) and, for the layers in ``layers``, its hidden states (float16)."""
  vals, ids = exact_top_k(jax.nn.log_softmax(logits.astype(jnp.float32), -1), k)
  out = {"labels": ids[..., 0].astype(jnp.int32), "top_logp": vals.astype(jnp.float16),
         "top_ids": ids.astype(jnp.int32)}
  if layers:
    out["hidden"] = jnp.stack([hidden[m] for m in layers]).astype(jnp.float16)
  return out


def self_distill(primary: Transformer, prompts: np.ndarray, gen_len: int, batch: int, eos_id, layer_map,
                 top_k: int, progress: Callable[[str], None] | None = None, temperature: float = 0.0,
                 seed: int = 0) -> dict:
  """The primary's greedy continuations and everything training needs from it, in one pass per batch.

  ``temperature`` > 0: the continuations are sampled from the primary's softmax(logits / temperature) instead (key
  from ``seed`` and the batch), the contexts speculative sampling at that temperature decodes in; the labels stay
  the primary's argmax and the teacher its raw top-k log-probabilities.

  ``prompts`` [n, P] (-1 pads ragged prompts). Each batch runs one compiled program: a teacher-forced pass over
  the prompts, then ``gen_len`` cached greedy steps; every position (prompt and continuation) yields the primary's
  argmax (the label), its ``top_k`` log-probabilities and token ids (the soft target) and, with a ``layer_map``,
  the hidden states the secondary reads (float16). No second forward over the finished sequences.
  Returns tokens/valid [n, P + gen_len] (valid: through the first EOS), labels, top_logp, top_ids [n, T, k] and
  hidden [L_S, n, T, D]."""
  n, p = prompts.shape
  t = p + gen_len
  layers = tuple(layer_map) if layer_map is not None else ()
  graphdef, state = nnx.split(primary)
  k = min(top_k, primary.cfg.vocab_size)

  def features(logits, hidden):
    return primary_outputs(logits, hidden, layers, k)

  def next_token(logits_bv, labels_b, key):
    if temperature <= 0:
      return labels_b
    return jax.random.categorical(key, logits_bv.astype(jnp.float32) / temperature, -1).astype(jnp.int32)

  @jax.jit
  def run(state, prompt_bt, plen_b, key):
    model = nnx.merge(graphdef, state)
    b = prompt_bt.shape[0]
    cache = model.init_cache(b, t)
    logits, hidden, cache = model.prefill(prompt_bt, plen_b, cache, return_hidden=bool(layers))
    first = features(logits, hidden)
    last = (plen_b - 1)[:, None]
    tok0 = next_token(jnp.take_along_axis(logits, last[..., None], 1)[:, 0],
                      jnp.take_along_axis(first["labels"], last, 1)[:, 0], jax.random.fold_in(key, gen_len))

    def body(carry, i):
      cache, tok = carry
      logits, hidden, cache = model.extend(tok[:, None], cache, return_hidden=bool(layers), last_logits=True)
      f = features(logits, hidden)
      return (cache, next_token(logits[:, 0], f["labels"][:, 0], jax.random.fold_in(key, i))), (tok, f)

    _, (toks, gen) = jax.lax.scan(body, (cache, tok0), jnp.arange(gen_len))
    return first, toks, gen

  out = {"tokens": np.zeros((n, t), np.int32), "valid": np.zeros((n, t), bool),
         "labels": np.zeros((n, t), np.int32), "top_logp": np.zeros((n, t, k), np.float16),
         "top_ids": np.zeros((n, t, k), np.int32)}
  if layers:
    out["hidden"] = np.zeros((len(layers), n, t, primary.cfg.d_model), np.float16)
  bar = Progress(n, "self-distillation data", unit="sequences", out=progress)
  for i in range(0, n, batch):
    rows = prompts[i:i + batch]
    m = len(rows)
    if m < batch:  # keep one compiled shape
      rows = np.concatenate([rows, np.repeat(rows[-1:], batch - m, 0)])
    plen = (rows >= 0).sum(1).astype(np.int32)
    first, toks, gen = jax.device_get(run(state, jnp.asarray(np.maximum(rows, 0)), jnp.asarray(plen),
                                          jax.random.key(np.random.default_rng([seed, i]).integers(2 ** 31))))
    for j in range(m):
      r, q = i + j, int(plen[j])
      seq = np.concatenate([rows[j, :q], toks[:, j]])
      stop = np.flatnonzero(seq[q:] == eos_id) if eos_id is not None else []
      end = q + (int(stop[0]) + 1 if len(stop) else gen_len)
      out["tokens"][r, :q + gen_len] = seq
      out["valid"][r, :end] = True
      for name in ("labels", "top_logp", "top_ids"):
        out[name][r, :q] = first[name][j, :q]
        out[name][r, q:q + gen_len] = gen[name][:, j, 0]
      if layers:
        out["hidden"][:, r, :q] = first["hidden"][:, j, :q]
        out["hidden"][:, r, q:q + gen_len] = gen["hidden"][:, :, j, 0].transpose(1, 0, 2)
    bar.update(min(i + batch, n))
  return out


def choose_draft_vocab(tokens: np.ndarray, valid: np.ndarray, size: int, vocab: int) -> np.ndarray:
  """The ``size`` most frequent token ids of the data (ties by id), sorted by id."""
  counts = np.bincount(tokens[valid], minlength=vocab)
  order = np.lexsort((np.arange(vocab), -counts))
  return np.sort(order[:size]).astype(np.int32)


def corpus_features(primary: Transformer, tokens: np.ndarray, layer_map, top_k: int, batch: int = 8,
                    progress: Callable[[str], None] | None = None) -> dict:
  """Teacher-forced primary outputs over token windows (no generation): labels, top_logp, top_ids, hidden."""
  layers = tuple(layer_map) if layer_map is not None else ()
  graphdef, state = nnx.split(primary)
  k = min(top_k, primary.cfg.vocab_size)

  @jax.jit
  def fn(state, tok):
    logits, hidden = nnx.merge(graphdef, state).forward(tok, return_hidden=bool(layers))
    return primary_outputs(logits, hidden, layers, k)

  n = tokens.shape[0]
  parts = []
  bar = Progress(n, "corpus features", unit="sequences", out=progress)
  for i in range(0, n, batch):
    rows = tokens[i:i + batch]
    pad = batch - len(rows)
    if pad:
      rows = np.concatenate([rows, np.repeat(rows[-1:], pad, 0)])
    out = jax.device_get(fn(state, jnp.asarray(rows)))
    parts.append({k_: (v[:, :batch - pad] if k_ == "hidden" else v[:batch - pad]) for k_, v in out.items()})
    bar.update(min(i + batch, n))
  return {k_: np.concatenate([p[k_] for p in parts], axis=1 if k_ == "hidden" else 0) for k_ in parts[0]}


def target_index(labels: np.ndarray, draft_ids: np.ndarray, vocab: int) -> np.ndarray:
  """Draft-vocabulary index of each label, -1 where the label is not in the draft vocabulary."""
  inv = np.full(vocab, -1, np.int32)
  inv[draft_ids] = np.arange(len(draft_ids), dtype=np.int32)
  return inv[labels]
