"""Tandem (Eq. 2): the parallel training forward equals the step-by-step inference path over the two-slot cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jitted, tiny_config
from tandem_jax.models import TandemConfig, TandemLM, block_mask

ATOL = 3e-5


def _tandem(seed=0, scan_layers=False, **tandem_kw):
  primary = tiny_config(d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, d_ff=96,
                        scan_layers=scan_layers)
  secondary = tiny_config(d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, d_ff=64,
                          scan_layers=scan_layers)
  with nnx.use_eager_sharding(False):
    return TandemLM(primary, secondary, TandemConfig(**tandem_kw), nnx.Rngs(seed))


def inference_fns(tandem):
  """The jitted calls of the inference path, built once per model (each build compiles anew)."""
  return dict(prefill=jitted(tandem.primary, "prefill", return_hidden=True),
              extend=jitted(tandem.primary, "extend", return_hidden=True),
              step=jitted(tandem, "secondary_step", write=False), commit=jitted(tandem, "commit"))


def step_by_step(tandem, seqs, prompt_lens, gamma, n_blocks, boundary, fns=None):
  """Inference path: primary prefill + blocks, secondary steps, commits. Returns per-row logits of the blocks."""
  b = seqs.shape[0]
  ahead = 1 if boundary == "eq2" else 0  # eq2: the primary has already processed each block's first token
  fns = fns or inference_fns(tandem)
  prefill, extend, step, commit = fns["prefill"], fns["extend"], fns["step"], fns["commit"]
  rows = jnp.arange(b)
  cache_l, cache_s = tandem.primary.init_cache(b, 64), tandem.init_secondary_cache(b, 64)
  p = jnp.asarray(prompt_lens, jnp.int32)
  p_max = int(p.max()) + ahead
  padded = jnp.where(jnp.arange(p_max)[None] < (p + ahead)[:, None], seqs[:, :p_max], 0)
  _, hidden, cache_l = prefill(padded, p + ahead, cache_l, return_hidden=True)
  cache_s = commit(cache_s, hidden, jnp.zeros_like(p), p + ahead)
  out = []
  for n in range(n_blocks):
    s = p + n * gamma
    for g in range(gamma):
      tok = seqs[rows, s + g][:, None]
      if ahead and g == 0:
        logits, _, _ = step(tok, cache_s, write=False, start_b=s)
      else:
        np.testing.assert_array_equal(cache_s.lengths, s + g)
        logits, _, cache_s = step(tok, cache_s)
      out.append(logits[:, 0])
    start = cache_l.lengths
    block = jnp.take_along_axis(seqs, start[:, None] + jnp.arange(gamma)[None], axis=1)
    _, hidden, cache_l = extend(block, cache_l, return_hidden=True)
    cache_s = commit(cache_s, hidden, start, jnp.full((b,), gamma, jnp.int32))
  return jnp.stack(out, 1)  # [B, n_blocks * gamma, V]


@pytest.mark.parametrize("boundary,gamma,scan", [("fig1", 1, False), ("fig1", 2, False), ("fig1", 5, False),
                                                  ("fig1", 3, True), ("eq2", 1, False), ("eq2", 3, False),
                                                  ("eq2", 2, True)])
def test_parallel_forward_equals_step_by_step(gamma, scan, boundary):
  rng = np.random.default_rng(gamma * 10 + (boundary == "eq2"))
  tandem = _tandem(seed=gamma, scan_layers=scan, boundary=boundary)
  forward = jitted(tandem, "forward", block_len=gamma)
  fns = inference_fns(tandem)  # the cases share the compiled programs
  b, t, n_blocks = 4, 48, 3
  for case in range(3):
    seqs = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
    prompt_lens = rng.integers(1, 12, b)  # ragged: each row's blocks start after its own prompt
    got = step_by_step(tandem, seqs, prompt_lens, gamma, n_blocks, boundary, fns)
    want, _ = forward(seqs, block_len=gamma, block_offset_b=jnp.asarray(prompt_lens, jnp.int32))
    idx = jnp.asarray(prompt_lens)[:, None] + jnp.arange(n_blocks * gamma)[None]
    want = jnp.take_along_axis(want, idx[..., None], axis=1)
    np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"gamma={gamma} {boundary} case {case}")


@pytest.mark.parametrize("layer_map,scan", [("last", False), ((0, 3), False), ((3, 1), True)])
def test_layer_maps_step_by_step(layer_map, scan):
  rng = np.random.default_rng(3)
  tandem = _tandem(seed=9, scan_layers=scan, layer_map=layer_map)
  assert tandem.layer_map == ((3, 3) if layer_map == "last" else layer_map)
  if scan:
    assert jax.tree.leaves(nnx.state(tandem.projections))[0].shape[0] == 2  # stacked like the secondary layers
  seqs = jnp.asarray(rng.integers(0, 64, (3, 32)), jnp.int32)
  prompt_lens = np.array([2, 5, 9])
  got = step_by_step(tandem, seqs, prompt_lens, 2, 3, "fig1")
  want, _ = jitted(tandem, "forward", block_len=2)(seqs, block_len=2, block_offset_b=jnp.asarray(prompt_lens))
  idx = jnp.asarray(prompt_lens)[:, None] + jnp.arange(6)[None]
  np.testing.assert_allclose(got, jnp.take_along_axis(want, idx[..., None], axis=1), atol=ATOL)


def test_default_layer_map_is_depth_proportional():
  assert _tandem().layer_map == (0, 2)  # round(j * 3 / 2) for j = 0, 1


def test_one_block_covering_everything_is_the_plain_secondary():
  """γ >= T: no earlier block, so the secondary never sees the primary (the paper's γ→∞ limit)."""
  tandem = _tandem(seed=4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 20)), jnp.int32)
  logits, _ = tandem.forward(tokens, 20)
  plain, _ = tandem.secondary.forward(tokens)
  np.testing.assert_allclose(logits, plain, atol=ATOL)
  # ... and with γ = 1 the primary does change the secondary's predictions
  assert float(jnp.max(jnp.abs(tandem.forward(tokens, 1)[0] - plain))) > 1e-3


def test_block_mask_matches_definition():
  t, gamma = 9, 3
  m = np.asarray(block_mask(t, gamma, jnp.array([0, 2]), "fig1"))
  for row, off in enumerate([0, 2]):
    for i in range(t):
      start = off + ((i - off) // gamma) * gamma
      for s in range(t):
        assert m[row, i, s] == (s < start), (row, i, s)
        assert m[row, i, t + s] == (start <= s <= i), (row, i, s)
  e = np.asarray(block_mask(t, gamma, jnp.array([0]), "eq2"))
  assert e[0, 3, 3] and not e[0, 3, t + 3] and e[0, 4, t + 4] and not e[0, 4, t + 3]


def test_primary_is_frozen_in_the_training_forward():
  tandem = _tandem(seed=2)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)), jnp.int32)
  graphdef, params = nnx.split(tandem, nnx.Param)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params).forward(tokens, 2)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  grads = jax.grad(loss)(params)
  primary_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["primary"]))
  proj_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["projections"]))
  assert primary_norm == 0.0
  assert proj_norm > 0.0


def test_errors():
  with pytest.raises(ValueError, match="share a vocabulary"):
    TandemLM(tiny_config(), tiny_config(vocab_size=80), TandemConfig(), nnx.Rngs(0))
  with pytest.raises(ValueError, match="layer_map"):
    _tandem(layer_map=(0, 1, 2))
  with pytest.raises(ValueError, match="outside"):
    _tandem(layer_map=(0, 7))
  with pytest.raises(ValueError, match="boundary"):
    TandemConfig(boundary="middle")
  with pytest.raises(ValueError, match="block_len"):
    _tandem().forward(jnp.zeros((1, 4), jnp.int32), 0)
