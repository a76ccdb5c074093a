"""Tandem (Eq. 2): the parallel training forward equals the step-by-step inference path over the two-slot cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jitted, tiny_config
from tandem_jax.decoding import speculative
from tandem_jax.models import TandemConfig, TandemLM, block_mask
from tandem_jax.models.tandem import decode_block_offset

ATOL = 3e-5


def _tandem(seed=0, scan_layers=False, **tandem_kw):
  primary = tiny_config(d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, d_ff=96,
                        scan_layers=scan_layers)
  secondary = tiny_config(d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, d_ff=64,
                          scan_layers=scan_layers)
  with nnx.use_eager_sharding(False):
    return TandemLM(primary, secondary, TandemConfig(**tandem_kw), nnx.Rngs(seed))


def inference_fns(tandem, capacity=64):
  """Jitted decoding functions, built once per model (each build compiles anew): the primary's prefill and block
  call, and the drafter of ``speculative.tandem_drafter`` (init, begin, step, end), which decoding runs."""
  graphdef, state = nnx.split(tandem)

  def drafter_fn(name):
    call = jax.jit(lambda st, *a: getattr(speculative.tandem_drafter(nnx.merge(graphdef, st), capacity), name)(*a))
    return lambda *a: call(state, *a)

  return dict(prefill=jitted(tandem.primary, "prefill", return_hidden=True),
              extend=jitted(tandem.primary, "extend", return_hidden=True),
              **{n: drafter_fn(n) for n in ("init", "begin", "step", "end")})


def step_by_step(tandem, seqs, prompt_lens, gamma, n_blocks, fns=None):
  """Teacher-forced decoding with every draft accepted, through the decoder's own functions: per block the drafter
  runs its γ queries from the pending token n, the primary verifies [pending, γ drafts] and the drafter commits them.
  Returns the drafter's logits [B, n_blocks * γ, V]."""
  b = seqs.shape[0]
  fns = fns or inference_fns(tandem)
  rows = jnp.arange(b)
  p = jnp.asarray(prompt_lens, jnp.int32)
  padded = jnp.where(jnp.arange(int(p.max()))[None] < p[:, None], seqs[:, :int(p.max())], 0)
  _, hidden, cache_l = fns["prefill"](padded, p, tandem.primary.init_cache(b, 64), return_hidden=True)
  state = fns["init"](padded, p, hidden)
  out = []
  for _ in range(n_blocks):
    n = cache_l.lengths  # the pending token's position: the primary has processed every position before it
    logits, state = fns["begin"](state, seqs[rows, n - 1], seqs[rows, n], n)
    out.append(logits)
    for g in range(1, gamma):
      logits, state = fns["step"](state, seqs[rows, n + g])
      out.append(logits)
    block = jnp.take_along_axis(seqs, n[:, None] + jnp.arange(gamma + 1)[None], axis=1)
    _, hidden, cache_l = fns["extend"](block, cache_l, return_hidden=True)
    state = fns["end"](state, hidden, n, jnp.full((b,), gamma, jnp.int32))
  return jnp.stack(out, 1)


def forward_at_drafts(forward, seqs, prompt_lens, gamma, n_blocks, offset_b):
  """The parallel forward's secondary logits at the queries :func:`step_by_step` runs (γ per block of γ + 1, from
  each block's pending token), with the forward's blocks of γ + 1 starting at ``offset_b``."""
  p = jnp.asarray(prompt_lens, jnp.int32)
  want, _ = forward(seqs, block_len=gamma + 1, block_offset_b=jnp.asarray(offset_b, jnp.int32))
  pos = (jnp.arange(n_blocks)[:, None] * (gamma + 1) + jnp.arange(gamma)[None]).reshape(-1)
  return jnp.take_along_axis(want, (p[:, None] + pos[None])[..., None], axis=1)


@pytest.mark.parametrize("boundary,gamma,scan", [("fig1", 1, False), ("fig1", 2, False), ("fig1", 5, False),
                                                  ("fig1", 3, True), ("eq2", 1, False), ("eq2", 3, False),
                                                  ("eq2", 2, True)])
def test_parallel_forward_equals_step_by_step(gamma, scan, boundary):
  """Decoding computes the training forward of its boundary: blocks aligned by ``decode_block_offset``."""
  rng = np.random.default_rng(gamma * 10 + (boundary == "eq2"))
  tandem = _tandem(seed=gamma, scan_layers=scan, boundary=boundary)
  forward = jitted(tandem, "forward", block_len=gamma + 1)
  fns = inference_fns(tandem)  # the cases share the compiled programs
  b, t, n_blocks = 4, 48, 3
  for case in range(3):
    seqs = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
    prompt_lens = rng.integers(1, 12, b)  # ragged: each row's blocks start after its own prompt
    got = step_by_step(tandem, seqs, prompt_lens, gamma, n_blocks, fns)
    offset = decode_block_offset(jnp.asarray(prompt_lens), boundary)
    want = forward_at_drafts(forward, seqs, prompt_lens, gamma, n_blocks, offset)
    np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"gamma={gamma} {boundary} case {case}")
  if boundary == "eq2":  # the alignment matters: eq2 blocks starting at the pending token are another function
    fig1_aligned = forward_at_drafts(forward, seqs, prompt_lens, gamma, n_blocks, prompt_lens)
    assert float(jnp.max(jnp.abs(got - fig1_aligned))) > 1e-2


@pytest.mark.parametrize("layer_map,scan", [("last", False), ((0, 3), False), ((3, 1), True)])
def test_layer_maps_step_by_step(layer_map, scan):
  rng = np.random.default_rng(3)
  tandem = _tandem(seed=9, scan_layers=scan, layer_map=layer_map)
  assert tandem.layer_map == ((3, 3) if layer_map == "last" else layer_map)
  if scan:
    assert jax.tree.leaves(nnx.state(tandem.projections))[0].shape[0] == 2  # stacked like the secondary layers
  seqs = jnp.asarray(rng.integers(0, 64, (3, 32)), jnp.int32)
  prompt_lens = np.array([2, 5, 9])
  got = step_by_step(tandem, seqs, prompt_lens, 2, 3)
  forward = jitted(tandem, "forward", block_len=3)
  np.testing.assert_allclose(got, forward_at_drafts(forward, seqs, prompt_lens, 2, 3, prompt_lens), atol=ATOL)


def test_default_layer_map_is_depth_proportional():
  assert _tandem().layer_map == (0, 2)  # round(j * 3 / 2) for j = 0, 1


def test_one_block_covering_everything_is_the_plain_secondary():
  """γ >= T: no earlier block, so the secondary never sees the primary (the paper's γ→∞ limit)."""
  tandem = _tandem(seed=4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 20)), jnp.int32)
  logits, _ = tandem.forward(tokens, 20)
  plain, _ = tandem.secondary.forward(tokens)
  np.testing.assert_allclose(logits, plain, atol=ATOL)
  # the last layer's output (what benchmarks/router_ceiling.py probes) is the plain secondary's too
  _, plain_hidden = tandem.secondary.forward(tokens, return_hidden=True)
  selected = tandem.select_hidden(tandem.primary.forward(tokens, return_hidden=True)[1])
  own_logits, own_hidden = tandem.secondary_forward(tokens, 20, selected, return_hidden=True)
  np.testing.assert_allclose(own_logits, plain, atol=ATOL)
  np.testing.assert_allclose(own_hidden, plain_hidden[-1], atol=ATOL)
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
