"""Decoding: speculative methods are lossless against `ar`, batched with ragged rows, sharded, and checked inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from tandem_jax import sharding
from tandem_jax.decoding import SamplingParams, api, costs, generate, speculative
from tandem_jax.models import LLMToSLM, TandemConfig, TandemLM, Transformer
from tandem_jax.models.router import Router
from tandem_jax.models.tandem import decode_block_offset

P_CFG = dict(d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, d_ff=96)
S_CFG = dict(d_model=32, num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8, d_ff=64)


def _build(seed=0, vocab=64):
  with nnx.use_eager_sharding(False):
    tandem = TandemLM(tiny_config(vocab_size=vocab, **P_CFG), tiny_config(vocab_size=vocab, **S_CFG),
                      TandemConfig(), nnx.Rngs(seed))
    # A drafter that mostly agrees with the primary: the primary's weights plus noise, so drafts are accepted
    # often but not always and both the acceptance and the rejection paths run.
    drafter = Transformer(tiny_config(vocab_size=vocab, **P_CFG), nnx.Rngs(seed + 1))
    router = Router(S_CFG["d_model"], top_k=4, hidden=16, rngs=nnx.Rngs(seed + 2))
  noise = jax.random.key(seed)
  state = nnx.state(tandem.primary, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(noise, len(leaves))
  nnx.update(drafter, jax.tree.unflatten(treedef, [x + 0.3 * jnp.std(x) * jax.random.normal(k, x.shape)
                                                  for x, k in zip(leaves, keys)]))
  return tandem, drafter, router


@pytest.fixture(scope="module")
def models():
  return _build()


# K = 8; verify costs that grow with the block, cheap drafts: the cost-aware stop ends blocks at varying lengths
COST_STOP = costs.cost_table([1.0, 1.1, 1.25, 1.4, 1.55, 1.7, 1.85, 2.0, 2.15], 0.02)
# K = 8; a dear first draft: the gate (threshold="gate") sends it where the predicted acceptance is above about 0.4
GATE = costs.cost_table([1.0, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1], 0.0)


class SpreadRouter(Router):
  """A router whose predictions spread over [0, 1] from draft to draft (a random one's barely move): a fixed
  function of the drafter's logits, as a trained router's are, so the gate's choices cannot bias acceptance."""

  def accept_prob(self, logits_bv, embed_vd, greedy=False):
    return jnp.abs(jnp.sin(100.0 * logits_bv[:, 0].astype(jnp.float32)))


def spread_router(d_embed: int = S_CFG["d_model"], **kw) -> SpreadRouter:
  with nnx.use_eager_sharding(False):
    return SpreadRouter(d_embed, top_k=4, hidden=8, rngs=nnx.Rngs(0), **kw)


def _prompts(rng, b, vocab=64):
  return [rng.integers(0, vocab, int(rng.integers(1, 14))).tolist() for _ in range(b)]


@pytest.mark.parametrize("b", [1, 4])
def test_greedy_speculative_equals_ar_for_every_row(models, b):
  tandem, drafter, router = models
  rng = np.random.default_rng(b)
  accepted_any = rejected_any = 0
  for case in range(4):
    prompts = _prompts(rng, b)
    # Per-row budgets, all in one 16-token buffer bucket: the four cases share each method's compiled program.
    max_new = rng.integers(1, 17, b).tolist()
    eos = int(rng.integers(0, 64)) if case % 2 else None
    want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=max_new, eos_id=eos).tokens
    for gamma in range(1, 9):  # one compiled program per method (K = 9 > γ: a switch over verify sizes) serves all
      kw = dict(max_new_tokens=max_new, eos_id=eos, block_len=gamma, max_block_len=9)
      sp = generate("speed", prompts, primary=tandem.primary, drafter=drafter, **kw)
      ts = generate("tandem_speed", prompts, tandem=tandem, **kw)
      assert sp.tokens == want, (case, gamma, "speed")
      assert ts.tokens == want, (case, gamma, "tandem_speed")
      accepted_any += int(sp.stats["accepted"].sum())
      rejected_any += int((sp.stats["drafted"] - sp.stats["accepted"]).sum())
    ad = generate("tandem_speed", prompts, tandem=tandem, router=router, max_new_tokens=max_new, eos_id=eos,
                  block_len=8, threshold=0.5)
    assert ad.tokens == want, (case, "adaptive")
    # the router's cost-aware stop (fixed policy): blocks end where one more draft no longer pays by the table
    ac = generate("tandem_speed", prompts, tandem=tandem, router=router, max_new_tokens=max_new, eos_id=eos,
                  block_len=8, threshold="cost", costs=COST_STOP)
    assert ac.tokens == want, (case, "adaptive, cost-aware stop")
    # the router's gate: a draft sent only where it pays at its own prediction; an unsent first one, a plain step
    ag = generate("tandem_speed", prompts, tandem=tandem, router=spread_router(), max_new_tokens=max_new,
                  eos_id=eos, block_len=8, threshold="gate", costs=GATE)
    assert ag.tokens == want, (case, "adaptive, gate")
  for r, m in zip(want, max_new):
    assert len(r) <= m
  assert accepted_any > 0 and rejected_any > 0  # both paths of Algorithm 1 ran


def test_eos_and_budgets_end_rows_independently(models):
  tandem, drafter, _ = models
  prompts = _prompts(np.random.default_rng(5), 4)
  free = generate("ar", prompts, primary=tandem.primary, max_new_tokens=20).tokens
  eos = free[0][3]  # a token row 0 emits at step 3
  out = generate("speed", prompts, primary=tandem.primary, drafter=drafter, max_new_tokens=[20, 20, 2, 20],
                 eos_id=eos, block_len=4)
  for row, (got, ref) in enumerate(zip(out.tokens, free)):
    cut = ref.index(eos) + 1 if eos in ref else len(ref)
    cut = min(cut, 2) if row == 2 else cut
    assert got == ref[:cut], row
  assert out.tokens[0][-1] == eos and len(out.tokens[0]) <= 4


def test_identical_drafter_accepts_every_draft(models):
  tandem, _, _ = models
  prompts = _prompts(np.random.default_rng(2), 3)
  for gamma in (1, 4, 7):
    out = generate("speed", prompts, primary=tandem.primary, drafter=tandem.primary, max_new_tokens=30,
                   block_len=gamma, max_block_len=8)
    s = out.stats
    np.testing.assert_array_equal(s["accepted"], s["drafted"])
    full_blocks = s["block_hist"][:, gamma + 1]
    assert np.all(full_blocks == s["primary_calls"] - 1)  # every block call emitted γ + 1 tokens


def test_standalone_tandem_matches_reference_loop(models):
  """`tandem` (§1.5): secondary drafts γ tokens, the primary's block call supplies the free token.

  Each cycle covers γ + 1 positions (free token + γ drafts), so the reference is the parallel forward with blocks
  of γ + 1 aligned by ``decode_block_offset``: starting at the first generated token (fig1) or at the prompt's
  last token (eq2). The drafter never reads the boundary (it only aligns blocks; tests/test_tandem.py drives the
  eq2 drafter itself), so the same weights coupled by eq2 must explain the same tokens."""
  tandem, _, _ = models
  with nnx.use_eager_sharding(False):
    eq2 = TandemLM(tandem.primary.cfg, tandem.secondary.cfg, TandemConfig(boundary="eq2"), nnx.Rngs(0))
  nnx.update(eq2, nnx.state(tandem))
  rng = np.random.default_rng(9)
  fwd = nnx.jit(lambda m, t, off, g: m.forward(t, g, block_offset_b=off), static_argnums=3)
  for gamma in (1, 2, 3):
    prompts = _prompts(rng, 2)
    out = generate("tandem", prompts, tandem=tandem, max_new_tokens=12, block_len=gamma)
    for row, prompt in enumerate(prompts):
      seq, p = list(prompt), len(prompt)
      buf = np.zeros((1, 64), np.int32)

      def logits_at(seq):
        buf[0, :len(seq)] = seq
        s_logits, l_logits = fwd(tandem, jnp.asarray(buf), decode_block_offset(jnp.array([p]), "fig1"), gamma + 1)
        return s_logits[0, len(seq) - 1], l_logits[0, len(seq) - 1]

      seq.append(int(jnp.argmax(logits_at(seq)[1])))  # first token: the primary's prefill
      while len(seq) - p < 12:
        for _ in range(gamma):
          seq.append(int(jnp.argmax(logits_at(seq)[0])))
        seq.append(int(jnp.argmax(logits_at(seq)[1])))  # the free token
      assert out.tokens[row] == seq[p:p + 12], (gamma, row)
      if gamma == 2:  # eq2: one teacher-forced pass over the generated sequence (causal, so the same logits)
        buf[0, :p + 12] = seq[:p + 12]
        s_logits, l_logits = fwd(eq2, jnp.asarray(buf), decode_block_offset(jnp.array([p]), "eq2"), gamma + 1)
        free = (np.arange(12) % (gamma + 1)) == 0
        pred = np.where(free, np.argmax(l_logits[0], -1)[p - 1:p + 11], np.argmax(s_logits[0], -1)[p - 1:p + 11])
        assert pred.tolist() == out.tokens[row], ("eq2", row)


def test_adaptive_threshold_limits():
  tandem, _, router = _build(seed=3)
  prompts = _prompts(np.random.default_rng(0), 2)
  never_stop = generate("tandem_speed", prompts, tandem=tandem, router=router, threshold=0.0, block_len=6,
                        max_new_tokens=16)
  fixed = generate("tandem_speed", prompts, tandem=tandem, block_len=6, max_new_tokens=16)
  np.testing.assert_array_equal(never_stop.stats["drafted"], fixed.stats["drafted"])
  always_stop = generate("tandem_speed", prompts, tandem=tandem, router=router, threshold=1.0, block_len=6,
                         max_new_tokens=16)
  np.testing.assert_array_equal(always_stop.stats["drafted"], always_stop.stats["primary_calls"] - 1)
  assert always_stop.tokens == fixed.tokens


def test_adaptive_uses_the_head_of_the_decoding_mode():
  """Greedy decoding reads the router's greedy head, sampling its sampled (TV) head: with the sampled head saying
  "reject" and the greedy head "accept", greedy blocks run to γ and sampled blocks stop after one draft."""
  tandem, _, _ = _build(seed=4)
  with nnx.use_eager_sharding(False):
    router = Router(S_CFG["d_model"], top_k=4, hidden=16, rngs=nnx.Rngs(9))
  router.out.kernel[...] = jnp.zeros_like(router.out.kernel[...])
  router.out.bias[...] = jnp.array([30.0, -30.0])  # logit of r: sampled ~1 (reject), greedy ~0 (accept)
  prompts = _prompts(np.random.default_rng(1), 3)
  kw = dict(tandem=tandem, router=router, threshold=0.5, block_len=5, max_new_tokens=12)
  greedy = generate("tandem_speed", prompts, **kw)
  fixed = generate("tandem_speed", prompts, tandem=tandem, block_len=5, max_new_tokens=12)
  np.testing.assert_array_equal(greedy.stats["drafted"], fixed.stats["drafted"])
  sampled = generate("tandem_speed", prompts, sampling=SamplingParams(temperature=1.0), seed=0, **kw)
  np.testing.assert_array_equal(sampled.stats["drafted"], sampled.stats["primary_calls"] - 1)


def test_router_labels_and_loss():
  from tandem_jax.models import router as router_lib
  p = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]]))
  q = jnp.log(jnp.array([[0.6, 0.3, 0.1], [0.1, 0.4, 0.5]]))
  y = router_lib.labels(p, q)
  np.testing.assert_allclose(y[:, 0], [0.1, 0.1], atol=1e-6)  # TV
  np.testing.assert_array_equal(y[:, 1], [0.0, 1.0])  # argmax differs only in row 1
  # The loss is minimised by predicting the labels (soft BCE per head): at r = y it is below any perturbation.
  logit = jnp.log(jnp.clip(y, 1e-4, 1 - 1e-4)) - jnp.log1p(-jnp.clip(y, 1e-4, 1 - 1e-4))
  best = router_lib.router_loss(logit, y)
  assert best < router_lib.router_loss(logit + 0.5, y) and best < router_lib.router_loss(logit - 0.5, y)
  assert router_lib.router_loss(logit, y, jnp.array([1.0, 0.0])) < router_lib.router_loss(logit + 1.0, y)
  # Per-head weights: each head learns only on its own positions (a wrong prediction elsewhere costs nothing),
  # and [B] weights equal the same weights given per head.
  w1 = jnp.array([1.0, 0.0])
  both = router_lib.router_loss(logit, y, jnp.stack([w1, w1], 1))
  assert router_lib.router_loss(logit, y, w1) == pytest.approx(float(both))
  per_head = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  wrong = logit.at[1, 0].add(3.0).at[0, 1].add(3.0)  # off-head positions perturbed
  assert router_lib.router_loss(wrong, y, per_head) == pytest.approx(
      float(router_lib.router_loss(logit, y, per_head)))
  assert router_lib.router_loss(wrong, y) > router_lib.router_loss(logit, y)


def test_router_features_are_entropy_top_k_and_their_embeddings():
  from tandem_jax.models import router as router_lib
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
  embed = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)
  f = router_lib.features(logits, embed, 2)
  p = jnp.exp(logits)
  np.testing.assert_allclose(f[:, 0], -jnp.sum(p * logits, -1), rtol=1e-6)
  np.testing.assert_allclose(f[:, 1:3], [[0.6, 0.3], [0.5, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(f[:, 3:], [[2, 3, 4, 5], [0, 1, 4, 5]])  # the top tokens' rows, not scaled


def test_llm_to_slm_decodes_its_secondary_with_the_fused_prompt():
  with nnx.use_eager_sharding(False):
    m = LLMToSLM(tiny_config(**P_CFG), tiny_config(**S_CFG), nnx.Rngs(0))
  m.proj_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(0), m.proj_out.kernel.shape)
  prompts = _prompts(np.random.default_rng(1), 3)
  out = generate("llm_to_slm", prompts, llm_to_slm=m, max_new_tokens=6)
  fwd = nnx.jit(lambda m, t, n: m.forward(t, n))
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(6):
      buf = np.zeros((1, 32), np.int32)
      buf[0, :len(seq)] = seq
      logits = fwd(m, jnp.asarray(buf), jnp.array([len(prompt)]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert out.tokens[row] == seq[len(prompt):]
  assert np.all(out.stats["primary_calls"] == 1)


def test_sharded_decoding_equals_single_device():
  ctor = lambda r: TandemLM(tiny_config(**dict(P_CFG, num_heads=8, num_kv_heads=4)),  # noqa: E731
                            tiny_config(**S_CFG), TandemConfig(), r)
  single = sharding.create_sharded(ctor, seed=4)
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  sharded = sharding.create_sharded(ctor, mesh, seed=4)
  prompts = _prompts(np.random.default_rng(4), 8)
  for method in ("ar", "tandem_speed"):
    want = generate(method, prompts, tandem=single, primary=single.primary, max_new_tokens=10, block_len=3)
    got = generate(method, prompts, tandem=sharded, primary=sharded.primary, max_new_tokens=10, block_len=3,
                   mesh=mesh)
    assert got.tokens == want.tokens, method
  # A mesh made again over the same devices is the same mesh (programs are keyed by its value, not by the object,
  # whose id a later, different mesh may take): its call runs the program compiled above.
  size, equal = len(api._compiled), sharding.make_mesh((2, 4), ("data", "model"))
  again = generate("tandem_speed", prompts, tandem=sharded, max_new_tokens=10, block_len=3, mesh=equal)
  assert len(api._compiled) == size and again.tokens == got.tokens


def test_compiled_programs_are_bounded_and_keyed_by_mesh_value():
  programs, compiled = api._Programs(maxsize=2), []
  for key in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recently used when "c" comes
    programs.get_or_compile(key, lambda key=key: compiled.append(key) or key.upper())
  assert compiled == ["a", "b", "c"] and dict(programs) == {"a": "A", "c": "C"}
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  assert api.mesh_key(mesh) == api.mesh_key(sharding.make_mesh((2, 4), ("data", "model")))
  assert api.mesh_key(mesh) != api.mesh_key(sharding.make_mesh((4, 2), ("data", "model")))
  assert api.mesh_key(mesh) != api.mesh_key(sharding.make_mesh((2, 4), ("data", "model"),
                                                                devices=jax.devices()[::-1]))


def test_bad_inputs_fail_before_compiling(models):
  tandem, drafter, _ = models
  ok = [[1, 2, 3]]
  cases = [
      (dict(prompts=[[]]), "empty"),
      (dict(prompts=[[1, 64]]), r"token ids must be in \[0, 64\)"),
      (dict(prompts=[[-1]]), "token ids"),
      (dict(prompts=ok, block_len=0), "block_len"),
      (dict(prompts=ok, max_new_tokens=200), "max_seq_len"),
      (dict(prompts=[list(range(60)) * 3]), "max_seq_len"),
      (dict(prompts=ok, max_new_tokens=0), "max_new_tokens"),
  ]
  for kw, msg in cases:
    with pytest.raises(ValueError, match=msg):
      generate("tandem_speed", tandem=tandem, **kw)
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="method"):
    generate("beam", ok, primary=tandem.primary)
  with pytest.raises(ValueError, match="needs the model"):
    generate("speed", ok, primary=tandem.primary)
  with nnx.use_eager_sharding(False):
    other = Transformer(tiny_config(vocab_size=80), nnx.Rngs(0))
  with pytest.raises(ValueError, match="one vocabulary"):
    generate("speed", ok, primary=tandem.primary, drafter=other)


@pytest.mark.parametrize("method,policy", [("tandem_speed", "fixed"), ("tandem_speed", "auto"), ("speed", "auto")])
def test_decode_iterations_copy_no_cache_buffer(models, method, policy):
  """No decode iteration copies a KV-cache buffer. A variable-length program's verify calls sit in a ``lax.switch``;
  writing the primary's cache inside the branches made XLA copy every layer's buffer twice per iteration (into the
  branch, and back into the loop's carry; on SmolLM2-135M at batch 1 about 10 MB a step): the branches return the
  block's keys/values and the loop body writes them in place. The ``auto`` policy runs segments: its loop body
  runs an inner loop per γ, each iterating at its γ with the one verify size γ + 1 written in place (a ``lax.switch``
  over such loops copied the whole cache into and out of each); the whole decode loop holds no copy."""
  from tandem_jax.hlo_reading import loop_bodies, loop_weight_ops
  tandem, drafter, _ = models
  kw = dict(tandem=tandem) if method == "tandem_speed" else dict(primary=tandem.primary, drafter=drafter)
  if policy == "auto":  # a table under which γ = 0 and γ = 2 both win on some iterations
    kw.update(policy="auto", costs=costs.cost_table([1.0, 1.1, 1.2, 1.3, 1.4], 0.05))
  api._compiled.clear()
  r = generate(method, [[1, 2, 3, 4, 5], [6, 7]], max_new_tokens=8, block_len=2, max_block_len=4, **kw)
  assert r.stats["drafted"].sum() > 0
  (program,) = [p for key, p in api._compiled.items() if key[0] == method]
  _, _, capacity = api.buffer_sizes(5, 8, 4)
  shape = (2, capacity, P_CFG["num_kv_heads"], P_CFG["head_dim"])  # a layer's [B, S, K, H] buffer
  text = program.as_text()
  loops = loop_bodies(text)
  # the decode loop: of the loops the entry computation runs (others are small: RNG, searches), the one that runs
  # the most loops (drafting loops; auto: its segments)
  decode_loop = max(loops[next(iter(loops))], key=lambda name: len(loops[name]))
  if policy == "fixed":  # its verify calls sit in a switch over sizes
    assert " conditional(" in text
  else:  # the loops its body runs are the segments, one per γ
    assert len(loops[decode_loop]) == len(speculative.verify_sizes(4, with_plain_step=True))
  copies = loop_weight_ops(text, [np.prod(shape)], opcodes=("copy",), bodies=[decode_loop])
  # (the attention's transposed reads of the cache, [B, K, H, S] copies, are the plain step's too)
  assert [c for c in copies if c["shape"] == "f32[{}]".format(",".join(map(str, shape)))] == []
