"""Sampling: warped distributions, and speculative sampling reproducing the primary's distribution exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.special import gammaincc

from conftest import tiny_config
from tandem_jax.decoding import SamplingParams, costs, generate
from tandem_jax.decoding.sampling import probs, speculative_accept
from tandem_jax import recipe
from tandem_jax.models.router import Router
from tandem_jax.models import TandemConfig, TandemLM, Transformer
from test_decoding import spread_router


def chi2_pvalue(counts, expected_probs, min_expected=5.0):
  """Pearson chi-square goodness of fit; cells with small expectations are pooled."""
  counts = np.asarray(counts, np.float64).ravel()
  exp = np.asarray(expected_probs, np.float64).ravel() * counts.sum()
  small = exp < min_expected
  if small.any():
    counts = np.append(counts[~small], counts[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
  stat = float(np.sum((counts - exp) ** 2 / np.maximum(exp, 1e-12)))
  dof = len(counts) - 1
  return float(gammaincc(dof / 2, stat / 2))


def test_warping():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  np.testing.assert_array_equal(probs(logits, SamplingParams()), [[1, 0, 0, 0, 0]])
  np.testing.assert_allclose(probs(logits, SamplingParams(temperature=1.0)), jnp.exp(logits), atol=1e-6)
  np.testing.assert_allclose(probs(logits, SamplingParams(temperature=1.0, top_k=2)), [[5 / 7, 2 / 7, 0, 0, 0]],
                             atol=1e-6)
  # top_p = 0.8: the smallest prefix reaching 0.8 is {0.5, 0.2, 0.15}
  np.testing.assert_allclose(probs(logits, SamplingParams(temperature=1.0, top_p=0.8)),
                             [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]], atol=1e-6)
  t = probs(logits, SamplingParams(temperature=0.5))
  np.testing.assert_allclose(t, jax.nn.softmax(logits / 0.5), atol=1e-6)


def test_algorithm1_reproduces_p_and_the_test_has_power():
  rng = np.random.default_rng(0)
  v, k, n = 6, 3, 200_000
  p = jnp.asarray(rng.dirichlet(np.ones(v), k + 1), jnp.float32)
  q = jnp.asarray(rng.dirichlet(np.ones(v), k), jnp.float32)
  key_d, key_a = jax.random.split(jax.random.key(1))
  drafts = jax.random.categorical(key_d, jnp.log(q), shape=(n, k)).astype(jnp.int32)
  pb, qb = jnp.broadcast_to(p, (n, k + 1, v)), jnp.broadcast_to(q, (n, k, v))
  for num in (k, 1):  # every row drafting K tokens, and rows that drafted only one (adaptive stop)
    acc, nxt = speculative_accept(key_a, pb, qb, drafts, jnp.full((n,), num, jnp.int32))
    acc, nxt, d = np.asarray(acc), np.asarray(nxt), np.asarray(drafts)
    first = np.where(acc > 0, d[:, 0], nxt)
    assert chi2_pvalue(np.bincount(first, minlength=v), p[0]) > 1e-3
    assert chi2_pvalue(np.bincount(d[:, 0], minlength=v), p[0]) < 1e-9  # drafts alone are q, and we can tell
    if num > 1:
      second = np.where(acc > 1, d[:, 1], nxt)[acc >= 1]
      assert chi2_pvalue(np.bincount(second, minlength=v), p[1]) > 1e-3
    bonus = nxt[acc == num]
    assert chi2_pvalue(np.bincount(bonus, minlength=v), p[num]) > 1e-3
    # acceptance of the first draft happens with probability sum(min(p, q))
    beta = float(jnp.sum(jnp.minimum(p[0], q[0])))
    assert abs(np.mean(acc >= 1) - beta) < 4 * np.sqrt(beta * (1 - beta) / n)


def _models(vocab=16):
  pc = dict(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64)
  sc = dict(vocab_size=vocab, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32)
  with nnx.use_eager_sharding(False):
    tandem = TandemLM(tiny_config(**pc), tiny_config(**sc), TandemConfig(), nnx.Rngs(0))
    drafter = Transformer(tiny_config(**pc), nnx.Rngs(1))
  # Peaky, non-uniform distributions so that p and q differ visibly.
  tandem.primary.embed.embedding[...] *= 6.0
  tandem.secondary.embed.embedding[...] *= 6.0
  drafter.embed.embedding[...] = tandem.primary.embed.embedding[...] + 0.1 * jax.random.normal(
      jax.random.key(3), drafter.embed.embedding.shape)
  return tandem, drafter


def _exact_joint_t2_t3(primary, prompt, params, vocab):
  """P(t2, t3) of the primary's own sampling, by enumerating t1 and t2."""
  fwd = jax.jit(lambda t: primary.forward(t)[0])
  base = jnp.asarray(prompt, jnp.int32)
  p1 = probs(fwd(base[None])[0, -1], params)                                             # [V]
  seq2 = jnp.concatenate([jnp.broadcast_to(base, (vocab, len(prompt))), jnp.arange(vocab)[:, None]], 1)
  p2 = probs(fwd(seq2)[:, -1], params)                                                   # [V(t1), V(t2)]
  t1, t2 = jnp.meshgrid(jnp.arange(vocab), jnp.arange(vocab), indexing="ij")
  seq3 = jnp.concatenate([jnp.broadcast_to(base, (vocab * vocab, len(prompt))), t1.reshape(-1, 1),
                          t2.reshape(-1, 1)], 1)
  p3 = probs(fwd(seq3)[:, -1], params).reshape(vocab, vocab, vocab)                     # [t1, t2, t3]
  joint = p1[:, None, None] * p2[:, :, None] * p3
  return np.asarray(joint.sum(0))                                                        # [t2, t3]


def test_acceptance_over_a_verify_calls_own_positions_equals_the_full_blocks():
  """The decode loop accepts inside each verify size's call, on its s positions (s - 1 drafts): for every row whose
  drafts fit, the result equals acceptance over the whole K + 1 block (same key: ``uniform_width`` draws the full
  block's uniforms), greedy and sampled, s = 1 (no drafts: a plain step) included."""
  from tandem_jax.decoding.sampling import greedy_accept
  b, k, v = 64, 4, 6
  for seed in range(5):
    ks = jax.random.split(jax.random.key(seed), 4)
    p = jax.nn.softmax(2 * jax.random.normal(ks[0], (b, k + 1, v)), -1)
    q = jax.nn.softmax(2 * jax.random.normal(ks[1], (b, k, v)), -1)
    drafts = jax.random.randint(ks[2], (b, k), 0, v)
    drafts = drafts.at[: b // 2].set(jnp.argmax(p[: b // 2, :k], -1))  # half the rows: the greedy target
    for s in range(1, k + 2):
      n = jax.random.randint(jax.random.fold_in(ks[3], s), (b,), 0, s)
      full = speculative_accept(ks[3], p, q, drafts, n)
      part = speculative_accept(ks[3], p[:, :s], q[:, :s - 1], drafts[:, :s - 1], n, uniform_width=k)
      np.testing.assert_array_equal(np.asarray(full[0]), np.asarray(part[0]))
      np.testing.assert_array_equal(np.asarray(full[1]), np.asarray(part[1]))
      logits = jnp.log(p)
      for x, y in zip(greedy_accept(logits, drafts, n), greedy_accept(logits[:, :s], drafts[:, :s - 1], n)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(jnp.sum(greedy_accept(jnp.log(p), drafts, jnp.full((b,), k))[0])) > 0  # some drafts accepted


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=2.0, top_k=8, top_p=0.95)])
def test_speculative_sampling_matches_primary_distribution(params):
  vocab, n = 16, 20_000
  tandem, drafter = _models(vocab)
  prompt = [3, 1, 4, 1, 5]
  want = _exact_joint_t2_t3(tandem.primary, prompt, params, vocab)
  prompts = [prompt] * n

  def joint(result):
    toks = np.asarray([r[:3] for r in result.tokens])
    return np.bincount(toks[:, 1] * vocab + toks[:, 2], minlength=vocab * vocab)

  with nnx.use_eager_sharding(False):
    router = Router(16, top_k=4, hidden=8, rngs=nnx.Rngs(5))  # random: stops blocks at varying lengths
  cases = [("speed", dict(primary=tandem.primary, drafter=drafter)), ("tandem_speed", dict(tandem=tandem))]
  if not params.top_k:  # the decoding variants, once (the acceptance step is the same code for every params)
    cases += [("tandem_speed", dict(tandem=tandem, router=router, threshold=0.5, max_block_len=3)),
              # the router's cost-aware stop (a table for K = 3)
              ("tandem_speed", dict(tandem=tandem, router=router, threshold="cost", max_block_len=3,
                                    costs=costs.cost_table([1.0, 1.2, 1.4, 1.6], 0.05))),
              # the router's gate: blocks of 0 (a plain step) to K = 3 drafts
              ("tandem_speed", dict(tandem=tandem, router=spread_router(16), threshold="gate", max_block_len=3,
                                    costs=costs.cost_table([1.0, 1.4, 1.5, 1.6], 0.0))),
              ("speed", dict(primary=tandem.primary, drafter=drafter, max_block_len=4)),  # γ < K: switch
              # the auto policy with a table under which the first blocks' rejections switch speculation off
              ("tandem_speed", dict(tandem=tandem, policy="auto", costs=costs.cost_table([1.0, 1.6, 1.6], 0.01)))]
  if not params.top_k:  # drafters with a draft vocabulary (tandem_jax.recipe): q is 0 off 10 of the 16 tokens
    ids = np.arange(0, vocab, 1)[[0, 1, 2, 4, 5, 7, 9, 11, 12, 14]]
    for kind in ("tandem", "standalone"):
      rc = recipe.RecipeConfig(kind=kind, init_layers="random", draft_vocab_size=len(ids))
      model = recipe.build_drafter(tandem.primary, rc, ids, seed=7)
      kw = dict(tandem=model) if kind == "tandem" else dict(primary=tandem.primary, drafter=model)
      cases.append(("tandem_speed" if kind == "tandem" else "speed", kw))
  for method, kw in cases:
    out = generate(method, prompts, max_new_tokens=3, block_len=2, sampling=params, seed=11, **kw)
    assert 0 < out.stats["accepted"].sum() < out.stats["drafted"].sum()
    assert chi2_pvalue(joint(out), want) > 1e-3, method
    if kw.get("threshold") == "gate":  # both plain primary steps and drafted blocks ran
      assert out.stats["drafted"].min() == 0 and out.stats["drafted"].max() > 1
    if kw.get("policy") == "auto":  # both plain primary steps and drafted blocks ran
      assert out.stats["gamma_hist"][:, 0].sum() > 0 and out.stats["gamma_hist"][:, 1:].sum() > 0
    drafter = kw.get("drafter", kw.get("tandem").secondary if "tandem" in kw else None)
    if drafter is not None and drafter.cfg.draft_vocab_size:  # the tokens q cannot draft still come out, from p
      off = np.setdiff1d(np.arange(vocab), np.asarray(drafter.draft_ids[...]))
      assert np.isin(np.asarray([r[:3] for r in out.tokens]), off).mean() > 0.05
  # Power: the drafter's own samples are told apart from the primary's.
  own = generate("ar", prompts, primary=drafter, max_new_tokens=3, sampling=params, seed=12)
  assert chi2_pvalue(joint(own), want) < 1e-6
