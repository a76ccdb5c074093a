"""LLM-to-SLM: prompt fused once, secondary decodes alone; cached path equals the teacher-forced forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import jitted, tiny_config
from tandem_jax.models import LLMToSLM


def _model(seed=0):
  with nnx.use_eager_sharding(False):
    m = LLMToSLM(tiny_config(d_model=48, num_heads=6, num_kv_heads=2), tiny_config(num_layers=1), nnx.Rngs(seed))
  # make the projector non-trivial (its output layer starts at zero)
  m.proj_out.kernel[...] = 0.05 * jnp.asarray(np.random.default_rng(seed).standard_normal(m.proj_out.kernel.shape))
  return m


def test_prefill_and_steps_equal_forward_with_ragged_prompts():
  rng = np.random.default_rng(0)
  m = _model()
  forward, prefill = jitted(m, "forward"), jitted(m, "prefill")
  step = jitted(m.secondary, "extend")
  b, p_max, steps = 4, 10, 5
  for case in range(4):
    seqs = jnp.asarray(rng.integers(0, 64, (b, p_max + steps)), jnp.int32)
    plen = jnp.asarray(rng.integers(1, p_max + 1, b), jnp.int32)
    padded = jnp.where(jnp.arange(p_max)[None] < plen[:, None], seqs[:, :p_max], 0)
    logits, cache = prefill(padded, plen, m.secondary.init_cache(b, 32))
    got = [logits[jnp.arange(b), plen - 1]]
    for _ in range(steps):
      tok = seqs[jnp.arange(b), cache.lengths][:, None]
      logits, _, cache = step(tok, cache)
      got.append(logits[:, 0])
    want = forward(seqs, plen)
    idx = (plen - 1)[:, None] + jnp.arange(steps + 1)[None]
    np.testing.assert_allclose(jnp.stack(got, 1), jnp.take_along_axis(want, idx[..., None], 1), atol=3e-5,
                               err_msg=f"case {case}")


def test_fusion_changes_prompt_positions_only_through_the_projector():
  m = _model(seed=1)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
  plen = jnp.array([4, 7])
  z = m.prompt_embeddings(tokens, plen)
  assert float(jnp.abs(z[0, 4:]).max()) == 0.0 and float(jnp.abs(z[1, 7:]).max()) == 0.0
  assert float(jnp.abs(z[0, :4]).max()) > 0.0
  m.proj_out.kernel[...] = jnp.zeros_like(m.proj_out.kernel[...])
  np.testing.assert_allclose(m.forward(tokens, plen), m.secondary.forward(tokens)[0], atol=1e-6)
