"""Blockwise attention (models/attention.py) computes plain ``attend``'s function: values and gradients, on the masks
the models build (causal, sliding, Tandem's block mask, ragged padding), and end to end in the two models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from tandem_jax.models import TandemConfig, TandemLM, Transformer, block_mask
from tandem_jax.models.attention import attend, blockwise_attend
from tandem_jax.models.layers import sliding_mask
from tandem_jax.models.transformer import causal_mask

RTOL, ATOL = 1e-5, 1e-5


def _qkv(key, b, t, s, n, kh, h):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, t, n, h)) * 2, jax.random.normal(kk, (b, s, kh, h)) * 2,
          jax.random.normal(kv, (b, s, kh, h)))


def _ragged(mask_bts, lengths_b):
  """``mask`` limited to keys and queries before each row's length (right padding): padded queries see nothing."""
  t, s = mask_bts.shape[1:]
  lengths = jnp.asarray(lengths_b)[:, None, None]
  return mask_bts & (jnp.arange(s)[None, None] < lengths) & (jnp.arange(t)[None, :, None] < lengths)


def _masks(kind, b, t, key):
  """(mask [B or 1, T, S], S) for a named mask kind at query length ``t``."""
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  if kind == "causal":
    return causal_mask(t), t
  if kind == "sliding":
    return sliding_mask(jnp.broadcast_to(causal_mask(t), (b, t, t)), pos, pos, 3), t
  if kind == "ragged":  # row 0 full length, the others padded; one row of length 0 (every query fully masked)
    return _ragged(jnp.broadcast_to(causal_mask(t), (b, t, t)), [t, t - 3, 0][:b]), t
  if kind == "tandem":
    offsets = jax.random.randint(key, (b,), 0, 4)
    return block_mask(t, 3, offsets), 2 * t
  if kind == "tandem_eq2":
    return block_mask(t, 4, jnp.zeros((b,), jnp.int32), "eq2"), 2 * t
  if kind == "random":  # arbitrary holes, some rows entirely False
    return jax.random.bernoulli(key, 0.3, (b, t, t)), t
  raise ValueError(kind)


# kind, B, T, heads, kv heads, head size, block, scale, cap
CASES = [
    ("causal", 2, 13, 4, 2, 8, 4, None, 0.0),    # 13 = 3 blocks of 4 + 1; grouped heads
    ("causal", 1, 9, 4, 1, 4, 16, 0.3, 0.0),     # one shorter block only (S < block); multi-query
    ("sliding", 2, 11, 4, 4, 8, 3, None, 0.0),   # whole key blocks invisible to late queries; no grouping
    ("ragged", 3, 10, 4, 2, 8, 4, None, 5.0),    # padded rows (one entirely), fully-masked queries, soft-capping
    ("tandem", 2, 12, 4, 2, 8, 5, None, 0.0),    # keys [projected ; own]: S = 2T
    ("tandem_eq2", 2, 10, 4, 1, 8, 6, 0.25, 2.0),
    ("random", 2, 9, 4, 2, 8, 1, 0.5, 4.0),     # arbitrary holes, rows without keys; blocks of one key
]


@pytest.mark.parametrize("kind,b,t,n,kh,h,block,scale,cap", CASES)
def test_blockwise_matches_plain_values_and_gradients(kind, b, t, n, kh, h, block, scale, cap):
  key = jax.random.PRNGKey(1000 * len(kind) + 10 * t + block)
  mask, s = _masks(kind, b, t, key)
  q, k, v = _qkv(jax.random.fold_in(key, 1), b, t, s, n, kh, h)
  cot = jax.random.normal(jax.random.fold_in(key, 2), q.shape)  # a random cotangent: every output entry counts

  def value_and_grads(fn):
    loss = lambda *qkv: (jnp.sum(fn(*qkv, mask, scale=scale, cap=cap) * cot), fn(*qkv, mask, scale=scale, cap=cap))
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  # One program for both: one compile per case.
  (want, want_grads), (got, got_grads) = jax.jit(lambda: (
      value_and_grads(attend), value_and_grads(lambda *a, **kw: blockwise_attend(*a, **kw, block=block))))()
  assert not np.isnan(np.asarray(got)).any()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"d{name}")


def test_fully_masked_rows_average_every_value_like_plain():
  """A query that sees no key (padding) gets the uniform average of all values, as the plain softmax gives it."""
  q, k, v = _qkv(jax.random.PRNGKey(0), 1, 6, 10, 2, 1, 4)
  mask = jnp.zeros((1, 6, 10), bool)
  got = blockwise_attend(q, k, v, mask, block=3)
  np.testing.assert_allclose(got, jnp.broadcast_to(v.mean(1, keepdims=True), got.shape), rtol=1e-6, atol=1e-6)


def test_bf16_inputs_stay_close_and_keep_dtypes():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(jax.random.PRNGKey(1), 1, 12, 12, 2, 1, 8))
  mask = causal_mask(12)

  @jax.jit
  def run(q, k, v):
    loss = lambda *a: blockwise_attend(*a, mask, block=5).astype(jnp.float32).sum()
    return blockwise_attend(q, k, v, mask, block=5), attend(q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  got, want, grads = run(q, k, v)
  assert got.dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 3
  np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=3e-2)


def test_config_validates_the_attention_fields():
  with pytest.raises(ValueError, match="attention_impl"):
    tiny_config(attention_impl="flash")
  with pytest.raises(ValueError, match="attention_block"):
    tiny_config(attention_impl="blockwise", attention_block=0)


def _param_grads_and_logits(model, loss_fn):
  """((loss, logits), d loss / d params) of ``loss_fn(model) -> (loss, logits)``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(params, rest):
    return loss_fn(nnx.merge(graphdef, params, rest))

  return jax.jit(jax.value_and_grad(f, has_aux=True))(params, rest)


def _assert_same(plain, blockwise):
  (_, want), want_g = plain
  (_, got), got_g = blockwise
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  paths = jax.tree_util.tree_leaves_with_path(want_g)
  for (path, w), g in zip(paths, jax.tree_util.tree_leaves(got_g)):
    # Relative to the parameter's largest gradient: single entries near 0 differ by rounding only.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()), err_msg=jax.tree_util.keystr(path))


def test_transformer_forward_blockwise_equals_plain():
  """Same logits and parameter gradients; sliding and full layers under lax.scan, soft-capping (T = 13 > block 4)."""
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 13), 0, 64)
  weights = jax.random.normal(jax.random.PRNGKey(4), (2, 13, 64))
  base = {"layer_types": ("sliding", "full"), "sliding_window": 5, "attn_softcap": 20.0, "scan_layers": True}

  def run(**attn):
    with nnx.use_eager_sharding(False):
      model = Transformer(tiny_config(**base, **attn), nnx.Rngs(0))

    def loss(m):
      logits, _ = m.forward(tokens)
      return jnp.sum(logits * weights), logits
    return _param_grads_and_logits(model, loss)

  _assert_same(run(), run(attention_impl="blockwise", attention_block=4))


def test_tandem_forward_blockwise_equals_plain():
  """The secondary's mixed key set [projected ; own] (S = 2T) and the primary's causal forward, both blockwise."""
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 14), 0, 64)
  weights = jax.random.normal(jax.random.PRNGKey(6), (2, 14, 64))
  offsets = jnp.asarray([0, 2], jnp.int32)

  def run(**attn):
    primary = tiny_config(num_layers=2, **attn)
    secondary = tiny_config(d_model=16, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=4, d_ff=32, **attn)
    with nnx.use_eager_sharding(False):
      model = TandemLM(primary, secondary, TandemConfig(), nnx.Rngs(0))

    def loss(m):
      logits, _ = m.forward(tokens, block_len=4, block_offset_b=offsets)
      return jnp.sum(logits * weights), logits
    return _param_grads_and_logits(model, loss)

  _assert_same(run(), run(attention_impl="blockwise", attention_block=5))


def test_cached_decode_steps_stay_plain():
  """Short query calls (T <= attention_block) take the plain path: no key scan in their program."""
  cfg = tiny_config(attention_impl="blockwise", attention_block=4)
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, nnx.Rngs(0))
  cache = model.init_cache(1, 32)
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda st, x, c: nnx.merge(graphdef, st).extend(x, c))
  assert "while" not in step.lower(state, jnp.zeros((1, 3), jnp.int32), cache).as_text()
  forward = jax.jit(lambda st, x: nnx.merge(graphdef, st).forward(x))
  assert "while" in forward.lower(state, jnp.zeros((1, 9), jnp.int32)).as_text()
