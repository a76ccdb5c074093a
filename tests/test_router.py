"""The adaptive router in decoding: its label (the rejection probability of the warped distributions acceptance
uses), routers refused before tracing where they do not fit, its stops (τ, cost-aware, the gate) and its place
inside the ``auto`` policy; outputs stay the primary's."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem_jax.decoding import costs, generate
from tandem_jax.models.router import Router
from test_decoding import GATE, _build, _prompts, spread_router


@pytest.fixture(scope="module")
def models():
  return _build()


def test_router_for_another_drafter_is_refused_before_tracing(models):
  tandem, drafter, router = models  # router: trained width = the tandem secondary's (32); drafter's is 48
  with pytest.raises(ValueError, match="drafter embeddings of width 32, this drafter's are 48"):
    generate("speed", [[1, 2]], primary=tandem.primary, drafter=drafter, router=router, max_new_tokens=4)
  with nnx.use_eager_sharding(False):
    wide = Router(32, top_k=80, hidden=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="top 80 drafts but the drafter has 64 outputs"):
    generate("tandem_speed", [[1, 2]], tandem=tandem, router=wide, max_new_tokens=4)


@pytest.mark.parametrize("setting", [dict(temperature=1.0), dict(temperature=0.6),
                                     dict(temperature=1.3, top_k=5), dict(temperature=0.8, top_p=0.7),
                                     dict(temperature=1.0, top_k=7, top_p=0.9)])
def test_router_label_is_the_rejection_probability_of_the_warped_distributions(setting):
  """The sampled head's label is TV(p', q') of the distributions acceptance uses (sampling.probs): measured against
  the empirical rejection rate of speculative_accept on one draft, and against the formula."""
  import jax

  from tandem_jax.decoding.sampling import SamplingParams, probs, speculative_accept
  from tandem_jax.models import router as router_lib

  params = SamplingParams(**setting)
  rng = np.random.default_rng(int(setting["temperature"] * 10) + setting.get("top_k", 0))
  p_logits = jnp.asarray(rng.normal(0, 2, (6, 12)), jnp.float32)
  q_logits = p_logits + jnp.asarray(rng.normal(0, 1.5, (6, 12)), jnp.float32)
  y = np.asarray(router_lib.labels(p_logits, q_logits, lambda x: probs(x, params)))
  pw, qw = np.asarray(probs(p_logits, params)), np.asarray(probs(q_logits, params))
  np.testing.assert_allclose(y[:, 0], 0.5 * np.abs(pw - qw).sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[:, 1], np.argmax(p_logits, -1) != np.argmax(q_logits, -1))
  if setting != dict(temperature=1.0):  # warping changes the label: a router for raw softmaxes would mispredict
    assert np.abs(y[:, 0] - np.asarray(router_lib.tv_distance(p_logits, q_logits))).max() > 0.02
  # the label is what acceptance does: one draft from q', accepted against p', n times per row
  n = 20_000
  keys = jax.random.split(jax.random.key(0), 2)
  drafts = jax.random.categorical(keys[0], jnp.log(jnp.asarray(qw))[:, None, :].repeat(n, 1))  # [6, n]
  pb, qb = (jnp.asarray(x)[:, None, None, :].repeat(n, 1).reshape(6 * n, 1, 12) for x in (pw, qw))
  p2 = jnp.concatenate([pb, pb], 1)  # the bonus position's distribution (unused by the rate)
  accepted, _ = speculative_accept(keys[1], p2, qb, drafts.reshape(-1, 1), jnp.ones((6 * n,), jnp.int32))
  rejected = 1.0 - np.asarray(accepted).reshape(6, n).mean(1)
  np.testing.assert_allclose(rejected, y[:, 0], atol=0.015)


def test_router_for_another_sampling_setting_is_refused_before_tracing(models):
  from tandem_jax.decoding.sampling import SamplingParams

  tandem, _, router = models  # trained (config default) for the raw softmax: temperature 1
  kw = dict(tandem=tandem, router=router, max_new_tokens=4)
  with pytest.raises(ValueError, match=r"trained on distributions warped by .*temperature=1\.0.* samples with "
                                       r".*temperature=0\.7"):
    generate("tandem_speed", [[1, 2]], sampling=SamplingParams(temperature=0.7), **kw)
  generate("tandem_speed", [[1, 2]], **kw)  # greedy: the greedy head
  generate("tandem_speed", [[1, 2]], sampling=SamplingParams(temperature=1.0), **kw)
  with nnx.use_eager_sharding(False):
    warm = Router(32, top_k=4, hidden=8, rngs=nnx.Rngs(0), sampling=(0.7, 0, 1.0))
  generate("tandem_speed", [[1, 2]], tandem=tandem, router=warm, max_new_tokens=4,
           sampling=SamplingParams(temperature=0.7))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    Router(32, rngs=nnx.Rngs(0), sampling=(0.0, 0, 1.0))


def test_router_stage_trains_for_the_configured_sampling_setting():
  from configs import base
  from tandem_jax.models import bundle
  from tandem_jax.topology import with_placeholder_inits
  from tandem_jax.training.validate import ConfigError, validate

  c = base.get_config("router", "tiny")
  assert bundle.router_lib.sampling_of(c.router) == (1.0, 0, 1.0)
  c.router.sampling.temperature, c.router.sampling.top_p = 0.5, 0.9
  with nnx.use_eager_sharding(False):
    built = nnx.eval_shape(lambda: bundle.build_bundle(c, nnx.Rngs(0)))
  assert built.router.sampling == (0.5, 0, 0.9)
  c.router.sampling.temperature = 0.0
  with pytest.raises(ConfigError, match="router.sampling.temperature"):
    validate(with_placeholder_inits(c), num_devices=1, check_workdirs=False)


def test_auto_with_a_router_lets_the_router_set_the_block_length(models):
  """auto with a router: the router ends every block (up to block_len), whatever γ the table would choose per
  iteration; without the router the table caps blocks at the γ it favours, or makes them plain steps. Lossless
  either way. (trace=True keeps the speculative program on every call: no per-call switch.)"""
  tandem, _, router = models
  k = 4
  one = costs.cost_table([1.0, 1.02, 3.0, 3.0, 3.0], 0.001)  # γ = 1 best at acceptance 0.5; break-even 0.02
  never = costs.cost_table([1.0] + [100.0] * 4, 0.01)  # γ = 0 best at any acceptance
  prompts = _prompts(np.random.default_rng(13), 3)
  want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=24).tokens
  kw = dict(tandem=tandem, max_new_tokens=24, block_len=k, policy="auto", trace=True)
  for table_name, table in (("one", one), ("never", never)):
    runs = {"table": generate("tandem_speed", prompts, costs=table, **kw),  # τ = 0: the router never stops
            "router": generate("tandem_speed", prompts, router=router, threshold=0.0, costs=table, **kw)}
    for name, out in runs.items():
      assert out.tokens == want, (table_name, name)
      tr = out.stats["trace"]
      n_draft = tr[..., k][tr[..., k] >= 0]  # drafts per iteration per row
      hist = out.stats["gamma_hist"]
      if name == "router":
        assert (n_draft == k).all() and hist[:, :k].sum() == 0, table_name
      elif table_name == "one":
        assert (n_draft == 1).all() and hist[:, 2:].sum() == 0 and hist[:, 1].sum() > 0
      else:
        assert (n_draft == 0).all() and hist[:, 1:].sum() == 0


def test_cost_aware_router_stop(models):
  """threshold="cost": the router's predicted acceptances and the cost table decide when a block ends (one more
  draft while it raises the block's expected tokens per ms); outputs stay the primary's, dearer verify growth ends
  blocks sooner."""
  flat = costs.cost_table([1.0, 1.0, 1.0, 1.0], 0.1)  # K = 3; C(n) = 0.1 n + 1.0
  # after one draft predicted at a: R = E = a; one more iff (1 + a + a²) C(1) > (1 + a) C(2)
  a = jnp.asarray([0.5, 0.2])
  assert costs.keeps_drafting(a, a, a, 1, flat, 3).tolist() == [True, False]  # 1.925 > 1.8; 1.364 < 1.44
  assert not bool(costs.keeps_drafting(jnp.ones(1), 3 * jnp.ones(1), jnp.ones(1), 3, flat, 3).any())  # n = K
  tandem, _, router = models
  prompts = _prompts(np.random.default_rng(12), 3)
  want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=24).tokens
  steps = {}
  for name, verify in (("cheap", [1.0] * 9), ("steep", [1.0 + 0.5 * i for i in range(9)])):
    out = generate("tandem_speed", prompts, tandem=tandem, router=router, threshold="cost", block_len=8,
                   max_new_tokens=24, costs=costs.cost_table(verify, 0.01))
    assert out.tokens == want, name
    steps[name] = int(out.stats["drafted"].sum()) / int(out.stats["primary_calls"].sum())
  assert steps["steep"] < steps["cheap"], steps
  with pytest.raises(ValueError, match="needs a router"):
    generate("tandem_speed", prompts, tandem=tandem, threshold="cost", max_new_tokens=4)
  with pytest.raises(ValueError, match="'cost'"):
    generate("tandem_speed", prompts, tandem=tandem, router=router, threshold="never", max_new_tokens=4)


def test_router_gate_sends_a_draft_only_where_it_pays(models):
  """threshold="gate": each draft joins the block only where it raises the block's expected tokens per ms at its own
  predicted acceptance, so iterations whose first draft does not pay are plain primary steps (a 1-token verify);
  outputs stay the primary's."""
  # before any draft (n = 0, R = 1, E = 0) a first draft pays iff (1 + a) C(0) > C(1): a > 0.4 under GATE
  a = jnp.asarray([0.45, 0.35])
  one, none = jnp.ones(2), jnp.zeros(2)
  assert costs.keeps_drafting(one, none, a, 0, GATE, 8).tolist() == [True, False]
  tandem, _, _ = models
  router = spread_router()
  prompts = _prompts(np.random.default_rng(21), 4)
  want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=24).tokens
  kw = dict(tandem=tandem, router=router, block_len=8, max_new_tokens=24, trace=True)
  out = generate("tandem_speed", prompts, threshold="gate", costs=GATE, **kw)
  assert out.tokens == want
  tr = out.stats["trace"]
  n_draft = tr[..., 8][tr[..., 8] >= 0]  # drafts sent per iteration
  assert (n_draft == 0).sum() > 0 and (n_draft > 0).sum() > 0 and n_draft.max() > 1, np.bincount(n_draft)
  # a first draft never pays: every iteration is a plain step, one token per primary call (the prefill's included)
  never = generate("tandem_speed", prompts, threshold="gate", costs=costs.cost_table([1.0] + [100.0] * 8, 0.01),
                   **kw)
  assert never.tokens == want and int(never.stats["drafted"].sum()) == 0
  np.testing.assert_array_equal(never.stats["primary_calls"], [len(t) for t in want])
  # drafts are free: every draft pays (a > 0), the blocks of a router that never stops (τ = 0)
  free = generate("tandem_speed", prompts, threshold="gate", costs=costs.cost_table([1.0] * 9, 0.0), **kw)
  always = generate("tandem_speed", prompts, threshold=0.0, **kw)
  assert free.tokens == want
  np.testing.assert_array_equal(free.stats["drafted"], always.stats["drafted"])
  with pytest.raises(ValueError, match="needs a router"):
    generate("tandem_speed", prompts, tandem=tandem, threshold="gate", max_new_tokens=4)
