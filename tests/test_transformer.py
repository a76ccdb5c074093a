"""Cached decoding (prefill, steps, block extends, ragged rows, rollback) equals the full causal forward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jitted, tiny_config
from tandem_jax.models.config import TransformerConfig
from tandem_jax.models.transformer import Transformer

ATOL = 2e-5

VARIANTS = [
    dict(),
    dict(num_kv_heads=4),                                  # plain multi-head
    dict(num_kv_heads=1, qkv_bias=True),                   # multi-query with bias (Qwen2-like)
    dict(tie_embeddings=False, rope_theta=500_000.0, num_layers=3),
    dict(num_layers=3, scan_layers=True),                  # layers run by lax.scan over stacked parameters
]


def _model(seed=0, **kw):
  with nnx.use_eager_sharding(False):
    return Transformer(tiny_config(**kw), nnx.Rngs(seed))


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_block_extends_match_full_forward(variant):
  rng = np.random.default_rng(variant)
  model = _model(seed=variant, **VARIANTS[variant])
  forward = jitted(model, "forward", return_hidden=True)
  extend = jitted(model, "extend", return_hidden=True)
  b, t = 3, 24
  for case in range(5):
    tokens = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
    full, hidden_full = forward(tokens, return_hidden=True)
    cache = model.init_cache(b, 32)
    pieces, hidden_pieces, lo = [], [], 0
    while lo < t:  # random block sizes, as the primary sees in block mode
      k = min(int(rng.choice([1, 2, 3, 5, 8])), t - lo)
      logits, hidden, cache = extend(tokens[:, lo:lo + k], cache, return_hidden=True)
      pieces.append(logits)
      hidden_pieces.append(hidden)
      lo += k
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=ATOL, err_msg=f"case {case}")
    np.testing.assert_allclose(jnp.concatenate(hidden_pieces, 2), hidden_full, atol=ATOL)
    assert np.all(np.asarray(cache.lengths) == t)


@pytest.mark.parametrize("variant", range(len(VARIANTS) + 1))
def test_deferred_write_extend_equals_the_writing_extend(variant):
  """``write="defer"`` (the speculative loop's verify inside a lax.switch): the cache is only read, the block
  attends to its row's valid prefix and to its own keys, and the keys/values it returns, written at the rows'
  starts, give the cache the writing extend leaves; logits and hidden states equal. Ragged rows, stale slots past
  each row's length (a rolled-back block), random block sizes; the last variant has sliding layers, soft-capping
  and a query scalar (Gemma)."""
  from tandem_jax import cache as kvcache
  kw = VARIANTS[variant] if variant < len(VARIANTS) else dict(
      num_layers=2, layer_types=("sliding", "full"), sliding_window=5, attn_softcap=20.0, query_pre_attn_scalar=12.0)
  rng = np.random.default_rng(100 + variant)
  model = _model(seed=variant, **kw)
  extend = jitted(model, "extend", return_hidden=True, write=True)
  defer = jitted(model, "extend", return_hidden=True, write="defer")
  b, cap = 3, 40
  for case in range(6):
    cache = model.init_cache(b, cap)
    prompt = jnp.asarray(rng.integers(0, 64, (b, 16)), jnp.int32)
    _, _, cache = extend(prompt, cache, return_hidden=True, write=True)
    # ragged lengths with stale slots after them (as after rejected drafts)
    cache = cache.with_lengths(jnp.asarray(rng.integers(4, 17, (b,)), jnp.int32))
    t = int(rng.choice([1, 2, 3, 5, 8]))
    block = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
    logits_w, hidden_w, cache_w = extend(block, cache, return_hidden=True, write=True)
    logits_d, hidden_d, (new_k, new_v) = defer(block, cache, return_hidden=True, write="defer")
    np.testing.assert_allclose(logits_d, logits_w, atol=ATOL, err_msg=f"case {case}")
    np.testing.assert_allclose(hidden_d, hidden_w, atol=ATOL, err_msg=f"case {case}")
    written_k = kvcache.write_layers(cache.k, new_k, cache.lengths)
    written_v = kvcache.write_layers(cache.v, new_v, cache.lengths)
    for got, want in zip(jax.tree.leaves((written_k, written_v)), jax.tree.leaves((cache_w.k, cache_w.v))):
      np.testing.assert_allclose(got, want, atol=ATOL)


def test_last_logits_is_the_last_position_of_the_block():
  model = _model(seed=3)
  extend = jitted(model, "extend", last_logits=True)
  full_extend = jitted(model, "extend")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 5)), jnp.int32)
  cache = model.init_cache(2, 16)
  last, _, c1 = extend(tokens, cache, last_logits=True)
  full, _, c2 = full_extend(tokens, cache)
  assert last.shape == (2, 1, full.shape[-1])
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=ATOL)
  np.testing.assert_allclose(c1.k[0] if isinstance(c1.k, tuple) else c1.k, c2.k[0] if isinstance(c2.k, tuple) else c2.k)


def test_ragged_prefill_then_single_steps():
  rng = np.random.default_rng(7)
  model = _model(seed=3)
  forward, extend, prefill = jitted(model, "forward"), jitted(model, "extend"), jitted(model, "prefill")
  b, p_max, steps = 5, 12, 6
  for case in range(6):
    prompt_lens = rng.integers(1, p_max + 1, b)
    seqs = rng.integers(0, 64, (b, p_max + steps)).astype(np.int32)
    padded = np.where(np.arange(p_max)[None] < prompt_lens[:, None], seqs[:, :p_max], 0)  # right-padded prompts
    cache = model.init_cache(b, 32)
    logits, _, cache = prefill(jnp.asarray(padded), jnp.asarray(prompt_lens, jnp.int32), cache)
    np.testing.assert_array_equal(cache.lengths, prompt_lens)
    got = [[logits[i, :prompt_lens[i]]] for i in range(b)]
    for _ in range(steps):  # each row continues from its own length
      pos = np.asarray(cache.lengths)
      logits, _, cache = extend(jnp.asarray(seqs[np.arange(b), pos][:, None]), cache)
      for i in range(b):
        got[i].append(logits[i])
    full, _ = forward(jnp.asarray(seqs))  # causal: position p depends on tokens <= p only
    for i in range(b):
      n = prompt_lens[i] + steps
      np.testing.assert_allclose(jnp.concatenate(got[i], 0), full[i, :n], atol=ATOL, err_msg=f"case {case} row {i}")


def test_rollback_then_reextend_equals_never_rolled_back():
  """Ragged prefill, rejected drafts, ragged rollback, then a block reaching past every slot written so far.

  The cache starts poisoned (every slot 1e3): the mask "slot <= query position" is right only because every slot
  a query can see was written first, and reading any unwritten (poisoned) slot would wreck the logits."""
  rng = np.random.default_rng(11)
  model = _model(seed=5, num_kv_heads=1)
  forward, extend = jitted(model, "forward"), jitted(model, "extend")
  b, filled, k, cont_len = 4, 10, 6, 16
  poison = lambda c: c.replace(k=jax.tree.map(lambda x: jnp.full_like(x, 1e3), c.k),  # noqa: E731
                               v=jax.tree.map(lambda x: jnp.full_like(x, 1e3), c.v))
  for case in range(6):
    seqs = jnp.asarray(rng.integers(0, 64, (b, 28)), jnp.int32)
    prompt_lens = jnp.asarray(rng.integers(1, filled + 1, b), jnp.int32)
    _, _, cache = extend(seqs[:, :filled], poison(model.init_cache(b, 32)))
    cache = cache.with_lengths(prompt_lens)  # a ragged prefill (what Transformer.prefill does)
    junk = jnp.asarray(rng.integers(0, 64, (b, k)), jnp.int32)  # rejected drafts
    _, _, cache = extend(junk, cache)
    keep = jnp.asarray(rng.integers(1, np.asarray(prompt_lens) + 1), jnp.int32)
    cache = cache.rollback(keep)
    np.testing.assert_array_equal(cache.lengths, keep)
    written = np.maximum(filled, np.asarray(prompt_lens) + k)
    assert np.all(np.asarray(keep) + cont_len > written)  # every row's block reaches slots never written
    cont = jnp.take_along_axis(seqs, keep[:, None] + jnp.arange(cont_len)[None], axis=1)
    logits, _, cache = extend(cont, cache)
    full, _ = forward(seqs)
    want = jnp.take_along_axis(full, (keep[:, None] + jnp.arange(cont_len)[None])[..., None], axis=1)
    np.testing.assert_allclose(logits, want, atol=ATOL, err_msg=f"case {case}")


def test_writing_past_the_capacity_raises():
  with nnx.use_eager_sharding(False):  # abstract: the check runs before any weight is read
    model = nnx.eval_shape(lambda: Transformer(tiny_config(), nnx.Rngs(0)))
  cache = model.init_cache(1, 16).with_lengths(jnp.array([12]))  # as after extending 12 tokens
  with pytest.raises(ValueError, match="needs 20 slots but the KV cache holds 16"):
    model.extend(jnp.zeros((1, 8), jnp.int32), cache)  # eager: the lengths are known
  with pytest.raises(ValueError, match="cannot write 20 positions into a KV cache of capacity 16"):
    jax.jit(lambda t, c: model.extend(t, c))(jnp.zeros((1, 20), jnp.int32), cache)  # traced: the shapes decide


def test_read_only_extend_leaves_cache_untouched():
  model = _model()
  tokens = jnp.arange(10, dtype=jnp.int32)[None] % 64
  cache = model.init_cache(1, 16)
  _, _, cache = model.extend(tokens[:, :6], cache)
  logits_ro, _, same = model.extend(tokens[:, 5:6], cache, write=False, start_b=jnp.array([5]))
  assert same is cache
  full, _ = model.forward(tokens[:, :6])
  # a read-only query at position 5 sees slots 0..5, i.e. the stored token 5 itself
  np.testing.assert_allclose(logits_ro[0, 0], full[0, 5], atol=ATOL)


def test_bf16_compute_runs_close_to_fp32():
  cfg = dict(dtype="bfloat16")
  m16, m32 = _model(seed=1, **cfg), _model(seed=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
  a, _ = m16.forward(tokens)
  b, _ = m32.forward(tokens)
  assert a.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a - b))) < 0.1


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny_config(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="head_dim"):
    tiny_config(head_dim=7)
  with pytest.raises(ValueError, match="dtype"):
    tiny_config(dtype="fp8")
  with pytest.raises(ValueError, match="unknown TransformerConfig fields"):
    TransformerConfig.from_dict(dict(tiny_config().to_dict(), n_layers=3))
  with pytest.raises(ValueError, match="max_seq_len"):
    _model().init_cache(1, 1000)


def test_scanned_layers_compute_the_unrolled_function():
  """Same weights stacked: forward, hidden states, ragged prefill and block extends agree with the unrolled model."""
  from tandem_jax.models.transformer import stack_layer_state
  rng = np.random.default_rng(11)
  kw = dict(num_layers=3, num_kv_heads=1, qkv_bias=True)
  loop, scan = _model(seed=1, **kw), _model(seed=2, scan_layers=True, **kw)
  nnx.update(scan.layers, stack_layer_state([nnx.state(layer) for layer in loop.layers]))
  nnx.update(scan.embed, nnx.state(loop.embed))
  nnx.update(scan.final_norm, nnx.state(loop.final_norm))
  assert jax.tree.leaves(nnx.state(scan.layers))[0].shape[0] == 3
  tokens = jnp.asarray(rng.integers(0, 64, (3, 20)), jnp.int32)
  (a, ha), (b, hb) = loop.forward(tokens, return_hidden=True), scan.forward(tokens, return_hidden=True)
  np.testing.assert_allclose(a, b, atol=ATOL)
  np.testing.assert_allclose(ha, hb, atol=ATOL)
  lens = jnp.asarray([4, 9, 1], jnp.int32)
  outs = []
  for m in (loop, scan):
    cache = m.init_cache(3, 32)
    logits0, _, cache = jitted(m, "prefill")(tokens[:, :9], lens, cache)
    logits1, hidden1, cache = jitted(m, "extend", return_hidden=True)(tokens[:, 9:14], cache, return_hidden=True)
    outs.append((logits0, logits1, hidden1, cache.lengths, cache.k[2], cache.v[1]))
  assert scan.init_cache(3, 32).k.shape == (3, 3, 32, 1, 8)  # one [L, B, S, K, H] buffer
  for x, y in zip(*outs):
    np.testing.assert_allclose(x, y, atol=ATOL)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_recomputes_without_changing_gradients(scan):
  rng = np.random.default_rng(5)
  plain, remat = _model(seed=4, num_layers=3, scan_layers=scan), _model(seed=4, num_layers=3, scan_layers=scan,
                                                                         remat=True)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)

  def grads(model):
    def loss(m):
      logits, _ = m.forward(tokens)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
    return nnx.grad(loss)(model)

  # remat keeps a layer's inputs only and recomputes the rest in the backward pass: a checkpoint in the program
  checkpointed = lambda m: re.search(r"\b(remat\w*|checkpoint)\[", str(jax.make_jaxpr(grads)(m))) is not None  # noqa
  assert checkpointed(remat) and not checkpointed(plain)
  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, atol=1e-6)
