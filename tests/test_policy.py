"""Block-length policy (tandem_jax.decoding.costs, speculative.decode_speculative(policy="auto")): the cost model,
γ = 0 switched on and off inside one sequence without losing a token, finished rows that stop drafting. The per-call
choice between the speculative and the plain program is tests/test_host_switch.py."""

import gc
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

from tandem_jax.decoding import api, costs, generate
from test_decoding import _build, _prompts


@pytest.fixture(scope="module")
def models():
  return _build()


def test_leviathan_formula_matches_paper_table1():
  # Leviathan et al. Table 1 (c = 0): α=0.8, γ=5 -> 3.69x; α=0.6, γ=2 -> 1.96x; α=0.9, γ=10 -> 6.86x.
  assert costs.leviathan_speedup(0.8, 5, 0.0) == pytest.approx(3.69, abs=0.01)
  assert costs.leviathan_speedup(0.6, 2, 0.0) == pytest.approx(1.96, abs=0.01)
  assert costs.leviathan_speedup(0.9, 10, 0.0) == pytest.approx(6.86, abs=0.01)
  assert costs.leviathan_speedup(0.0, 3, 0.0) == pytest.approx(1.0)
  assert costs.leviathan_speedup(0.75, 3, 0.1) == pytest.approx((1 - 0.75 ** 4) / 0.25 / 1.3)
  assert costs.leviathan_speedup(1.0, 4, 0.05) == pytest.approx(5 / 1.2)
  assert costs.leviathan_speedup(0.8, 2, 0.1, verify=2.0) == pytest.approx((1 - 0.8 ** 3) / 0.2 / 2.2)
  assert costs.expected_block_tokens(1.0, 4) == 5.0 and np.isnan(costs.leviathan_speedup(float("nan"), 2, 0.1))
  # the traced per-row table agrees with the scalar formula
  np.testing.assert_allclose(np.asarray(costs.expected_tokens(jnp.asarray([0.7]), 4))[0],
                             [costs.expected_block_tokens(0.7, g) for g in range(5)], rtol=1e-6)


def test_expected_tokens_and_choice_follow_leviathan():
  alpha = jnp.asarray([0.0, 0.5, 0.9], jnp.float32)
  e = np.asarray(costs.expected_tokens(alpha, 3))
  want = np.asarray([[(1 - a ** (g + 1)) / (1 - a) for g in range(4)] for a in (0.0, 0.5, 0.9)])
  np.testing.assert_allclose(e, want, rtol=1e-6)
  table = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0)  # verify sizes 1..4, K = 3
  on = jnp.ones((1,), bool)
  pick = lambda a, cap=None: int(costs.choose_gamma(jnp.asarray([a], jnp.float32), on, table, 3, cap))  # noqa
  assert pick(0.0) == 0 and pick(0.95) == 3 and pick(0.95, cap=2) == 2
  # γ = 1 beats γ = 0 exactly above the break-even acceptance (c + v2) / (c + v1) - 1 = 12 / 11 - 1
  be = table.break_even_alpha()
  assert be == pytest.approx(1 / 11, rel=1e-6)
  assert pick(be - 0.02) == 0 and pick(be + 0.02) >= 1
  # rows that finished do not count: one active row with α = 0 decides for the batch
  both = jnp.asarray([0.0, 0.95], jnp.float32)
  assert int(costs.choose_gamma(both, jnp.asarray([True, False]), table, 3)) == 0
  assert int(costs.choose_gamma(both, jnp.asarray([True, True]), table, 3)) >= 1
  # with the rows' remaining budgets, the row that would finish last decides: a slow-accepting row with most of its
  # budget left switches speculation off although the batch's summed rate favours drafting
  rem = lambda *r: jnp.asarray(r, jnp.int32)  # noqa: E731
  mixed = jnp.asarray([0.0, 0.95], jnp.float32)
  assert int(costs.choose_gamma(mixed, jnp.asarray([True, True]), table, 3)) >= 1  # summed rate
  assert int(costs.choose_gamma(mixed, jnp.asarray([True, True]), table, 3, remaining_b=rem(40, 40))) == 0
  assert int(costs.choose_gamma(mixed, jnp.asarray([True, True]), table, 3, remaining_b=rem(1, 40))) == 3
  for a in (0.0, be - 0.02, be + 0.02, 0.5, 0.95):  # batch 1: the same choice either way
    x = jnp.asarray([a], jnp.float32)
    assert int(costs.choose_gamma(x, on, table, 3, remaining_b=rem(17))) == pick(a)
  with pytest.raises(ValueError, match="positive verify costs"):
    costs.cost_table([10.0], 1.0)


def test_estimate_decays_to_the_prior_without_drafts():
  a, r = jnp.zeros(2), jnp.zeros(2)
  for _ in range(5):  # row 0: every draft rejected at once; row 1: 3 of 3 accepted
    a, r = costs.update_counts(jnp.asarray([0, 3]), jnp.asarray([True, False]), jnp.asarray([3, 3]),
                               jnp.asarray([True, True]), a, r)
  table = costs.cost_table([10.0, 11.0], 1.0)
  est = np.asarray(costs.estimate(a, r, table))
  assert est[0] < 0.25 and est[1] > 0.85
  for _ in range(150):  # speculation off (no drafts): both drift back to the prior 0.5
    a, r = costs.update_counts(jnp.zeros(2, jnp.int32), jnp.zeros(2, bool), jnp.zeros(2, jnp.int32),
                               jnp.asarray([True, True]), a, r)
  np.testing.assert_allclose(np.asarray(costs.estimate(a, r, table)), 0.5, atol=0.01)
  primed = table._replace(prior_alpha=np.float32(0.3), prior_weight=np.float32(6.0))  # a recorded prior
  np.testing.assert_allclose(np.asarray(costs.estimate(a, r, primed)), 0.3, atol=0.01)


# A table where a plain primary step is cheap next to any block: drafting pays only at a high acceptance estimate,
# so the loop switches speculation off after rejections and back on when the estimate returns to its prior.
SWITCHING = costs.cost_table([1.0] + [1.5] * 8, 0.01)  # verify sizes 1..9 (K = 8)


@pytest.mark.parametrize("b", [1, 4])
def test_auto_policy_is_lossless_and_switches_within_a_sequence(models, b):
  tandem, drafter, router = models
  rng = np.random.default_rng(10 + b)
  switched = False
  for case in range(3):
    prompts = _prompts(rng, b)
    max_new = rng.integers(8, 33, b).tolist()
    eos = int(rng.integers(0, 64)) if case == 2 else None
    want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=max_new, eos_id=eos).tokens
    kw = dict(max_new_tokens=max_new, eos_id=eos, block_len=8, policy="auto", costs=SWITCHING)
    for method, models_kw in (("tandem_speed", dict(tandem=tandem)),
                              ("speed", dict(primary=tandem.primary, drafter=drafter)),
                              ("tandem_speed", dict(tandem=tandem, router=router, threshold=0.5))):
      out = generate(method, prompts, **models_kw, **kw)
      assert out.tokens == want, (case, method)
      hist = out.stats["gamma_hist"]
      assert hist.shape == (b, 9) and (hist.sum(1) == out.stats["primary_calls"] - 1).all()
      switched |= bool(((hist[:, 0] > 0) & (hist[:, 1:].sum(1) > 0)).any())
      if b == 1 and "router" not in models_kw:  # a drafter call per draft, + one per γ = 0 step for the standalone
        plain_steps = 0 if method == "tandem_speed" else int(hist[0, 0])  # Tandem's commit covers that position
        assert int(out.stats["drafter_steps"][0]) == int(out.stats["drafted"][0]) + plain_steps, (case, method)
        assert int(out.stats["secondary_calls"][0]) == int(out.stats["drafter_steps"][0])
  assert switched  # some row had plain primary steps and speculative blocks in one sequence


def _drafts_by_start(out, k):
  """A traced greedy run's blocks: ({(row, position): drafts} of every block that drafted, keyed by the index in the
  row's new tokens of the token its first draft proposes; the set of those keys whose previous iteration was a plain
  step)."""
  tr = out.stats["trace"]  # [B, iterations, K+3]: drafts, n_draft, accepted, token; -1 where inactive
  blocks, after_plain = {}, set()
  for r in range(tr.shape[0]):
    pos, last = 1, None  # the prefill emitted new token 0; a block's pending token is the last one emitted
    for row in tr[r]:
      n_draft, accepted = int(row[k]), int(row[k + 1])
      if n_draft < 0:
        break
      if n_draft:
        blocks[r, pos] = row[:n_draft].tolist()
        if last == 0:
          after_plain.add((r, pos))
      last = n_draft
      pos += accepted + 1
  return blocks, after_plain


@pytest.mark.parametrize("method", ["tandem_speed", "speed"])
def test_drafts_after_plain_steps_are_those_of_a_drafter_that_never_paused(models, method):
  """The drafter's state stays in sync through γ = 0 iterations: a block that starts at a position after plain
  primary steps drafts exactly what a fixed-γ run drafts from that position (greedy, the same tokens before it),
  draft for draft, so the auto policy's plain steps cost no acceptance. (Losslessness alone would not show this: a
  drafter out of sync only drafts worse.)"""
  tandem, drafter, _ = models
  models_kw = dict(tandem=tandem) if method == "tandem_speed" else dict(primary=tandem.primary, drafter=drafter)
  rng = np.random.default_rng(21)
  compared = after_plain = 0
  for case in range(8):
    prompts = _prompts(rng, 3)
    ref = generate(method, prompts, **models_kw, max_new_tokens=32, block_len=3, max_block_len=8, trace=True)
    auto = generate(method, prompts, **models_kw, max_new_tokens=32, block_len=8, policy="auto", costs=SWITCHING,
                    trace=True)
    assert auto.tokens == ref.tokens
    (want, _), (got, plain_before) = _drafts_by_start(ref, 8), _drafts_by_start(auto, 8)
    for start, drafts in got.items():
      if start in want:
        n = min(len(drafts), len(want[start]))
        assert drafts[:n] == want[start][:n], (case, start, drafts, want[start])
        compared += 1
        after_plain += start in plain_before
  assert compared > 40 and after_plain >= 8, (compared, after_plain)


def test_auto_policy_calibrates_when_no_table_is_given(models):
  tandem, _, _ = models
  prompts = [[1, 2, 3], [4, 5]]
  want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=12).tokens
  out = generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=12, block_len=3, policy="auto")
  assert out.tokens == want
  table = out.costs  # measured on the decode loop (calibrate_loop): once per process for these models and shapes
  assert table.max_block_len == 3 and float(table.draft_ms) > 0 and (np.asarray(table.verify_ms)[1:] > 0).all()
  again = generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=12, block_len=3, policy="auto")
  # the measured costs are reused (the acceptance prior may come from the first call's record)
  assert again.costs.verify_ms is table.verify_ms and again.costs.plain_ms is table.plain_ms
  assert again.tokens == want
  with pytest.raises(ValueError, match="covers blocks up to 8"):
    generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=4, block_len=3, policy="auto", costs=SWITCHING)
  with pytest.raises(ValueError, match="policy 'auto' applies"):
    generate("ar", prompts, primary=tandem.primary, policy="auto")


def test_calibration_is_not_reused_for_a_new_model_at_a_reused_id(models, monkeypatch):
  """A table belongs to the live models it was measured on: an entry whose models are gone is dropped, and one whose
  id now names another object is measured again (ids are reused after garbage collection)."""
  tandem, drafter, _ = models
  measured = []
  monkeypatch.setattr(costs, "_calibrated", {})
  pair = (tandem.primary, drafter)
  key = ("calls", id(tandem.primary), id(drafter), 1, 2, 16)

  def make():
    measured.append(1)
    return costs.cost_table([1.0 + len(measured), 2.0, 3.0], 1.0)

  t1 = costs.cached(pair, key, make)
  assert costs.cached(pair, key, make) is t1 and len(measured) == 1  # cached

  class Gone:
    pass

  gone = Gone()
  costs._calibrated[key] = ((weakref.ref(gone), weakref.ref(drafter)), t1)  # as if the id now named another model
  t2 = costs.cached(pair, key, make)
  assert t2 is not t1 and len(measured) == 2  # measured again for the model that holds the id now
  del gone
  gc.collect()
  other = Gone()
  costs._calibrated[("x",)] = ((weakref.ref(other), weakref.ref(drafter)), t1)
  del other
  gc.collect()
  costs.cached(pair, key, make)
  assert ("x",) not in costs._calibrated  # the dead pair's entry is pruned


def test_loop_calibration_times_each_gamma_on_the_decode_program(models):
  """calibrate_loop forces γ = 0..K through the auto program (a forcing table), and the table it returns reproduces
  each measured iteration as choose_gamma's cost: max(γ, 1) drafter steps + the verify entry."""

  tandem, _, _ = models
  forced = costs.forcing_table(2, 3)
  out = generate("tandem_speed", [[1, 2, 3]] * 2, tandem=tandem, max_new_tokens=10, block_len=3, policy="auto",
                 costs=forced)
  hist = out.stats["gamma_hist"]
  assert hist[:, 2].sum() > 0 and hist[:, [0, 1, 3]].sum() == 0  # γ = 2 in every iteration
  table = api.calibrate_loop("tandem_speed", dict(tandem=tandem), batch_size=2, prompt_len=3, max_new_tokens=10,
                             max_block_len=3)
  assert table.max_block_len == 3
  assert api.calibrate_loop("tandem_speed", dict(tandem=tandem), batch_size=2, prompt_len=5, max_new_tokens=12,
                            max_block_len=3) is table  # same buckets: the same program, measured once
  t = costs.loop_table([2.0, 3.0, 3.5, 4.5], 0.25)
  g = np.arange(4)
  np.testing.assert_allclose(np.maximum(g, 1) * float(t.draft_ms) + np.asarray(t.verify_ms)[1:], [2.0, 3.0, 3.5, 4.5])
  # the measured table is settled: a γ = 0 iteration costs at least the plain step, and more drafts never cost less
  it = np.asarray(costs.iteration_costs(table, 3))
  assert it[0] >= float(table.plain_ms) * (1 - 1e-6) and np.all(np.diff(it) >= -1e-4 * it[1:])


def test_settle_iterations_is_the_closest_consistent_table():
  """settle_iterations floors γ = 0 at the plain step and returns the least-squares closest non-decreasing sequence
  (pool adjacent violators), checked against random monotone sequences on many random inputs."""

  assert costs.settle_iterations([24.39, 36.96, 37.22, 40.33], 26.3) == [26.3, 36.96, 37.22, 40.33]
  np.testing.assert_allclose(costs.settle_iterations([31.4, 40.25, 37.24, 43.99, 40.0], 27.0),
                             [31.4, 38.745, 38.745, 41.995, 41.995])
  assert costs.settle_iterations([5.0, 4.0, 3.0]) == [4.0, 4.0, 4.0]
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(2, 8))
    x = np.sort(rng.uniform(10, 40, n)) + rng.normal(0, 4, n)
    plain = float(rng.uniform(5, 30))
    y = np.asarray(costs.settle_iterations(x, plain))
    assert np.all(np.diff(y) >= -1e-9) and y[0] >= plain - 1e-9
    if np.all(np.diff(x) >= 0) and x[0] >= plain:
      np.testing.assert_allclose(y, x)  # a consistent table is left alone
    free = np.asarray(costs.settle_iterations(x))
    assert free.sum() == pytest.approx(x.sum())  # without a floor, pooled runs keep their means
    err = np.sum((y - x) ** 2)
    for _ in range(20):  # no other non-decreasing sequence at or above the floor is closer
      z = np.maximum(np.sort(y + rng.normal(0, 1.0, n)), plain)
      assert np.sum((z - x) ** 2) >= err - 1e-9


def test_break_even_is_where_the_loop_starts_drafting():
  """Where the verify cost grows slowly with the block, a longer block pays from a lower acceptance than one draft:
  break_even_alpha is the lowest such α, and choose_gamma drafts just above it and not just below, on many tables."""

  on = jnp.ones((1,), bool)
  rng = np.random.default_rng(3)
  lower = 0
  for _ in range(40):
    k = int(rng.integers(1, 6))
    # verify sizes 1..K+1: the first step up the largest, as measured on CPU (a 2-token call costs ~1.4x a 1-token one)
    verify = np.cumsum(np.concatenate([[rng.uniform(10, 30)], rng.uniform(0.0, 12.0, 1), rng.uniform(0.0, 3.0, k - 1)]))
    table = costs.cost_table(list(verify), float(rng.uniform(0, 2)))
    be = table.break_even_alpha()
    one = (float(table.draft_ms) + verify[1]) / (float(table.draft_ms) + verify[0]) - 1
    assert be <= one + 1e-5  # the table holds float32
    lower += be < one - 0.01
    if 0.02 < be < 0.98:
      pick = lambda a: int(costs.choose_gamma(jnp.asarray([a], jnp.float32), on, table, k))  # noqa: E731
      assert pick(be - 0.01) == 0 and pick(be + 0.01) >= 1
  assert lower >= 5  # the longer blocks decided in some tables


def test_buffer_new_tokens_shares_one_program(models):
  """A budget below the buffer runs the program compiled for the buffer (what the loop calibration times), with the
  tokens of a run sized for that budget."""

  tandem, _, _ = models
  full = generate("tandem_speed", [[1, 2, 3], [4, 5]], tandem=tandem, max_new_tokens=40, block_len=2)
  programs = len(api._compiled)
  short = generate("tandem_speed", [[1, 2, 3], [4, 5]], tandem=tandem, max_new_tokens=[5, 9], block_len=2,
                   buffer_new_tokens=40)
  assert len(api._compiled) == programs  # no new program
  assert short.tokens == [full.tokens[0][:5], full.tokens[1][:9]]
  with pytest.raises(ValueError, match="buffer_new_tokens 3 is below the largest budget 9"):
    generate("tandem_speed", [[1, 2]], tandem=tandem, max_new_tokens=9, buffer_new_tokens=3)


def test_finished_rows_spend_no_drafter_steps(models):
  """Row 0 finishes after one token; with a router that ends blocks early, the batch's drafter steps are those of
  row 1 alone (a finished row used to keep drafting to γ_max every iteration)."""
  tandem, _, router = models
  kw = dict(tandem=tandem, router=router, threshold=0.6, block_len=8)  # τ at which this random router stops some
  long_prompt = [7, 3, 9, 1]
  alone = generate("tandem_speed", [long_prompt], max_new_tokens=[24], **kw)
  both = generate("tandem_speed", [[2, 5], long_prompt], max_new_tokens=[1, 24], **kw)
  assert both.tokens[1] == alone.tokens[0]
  assert int(both.stats["drafter_steps"][1]) == int(alone.stats["drafter_steps"][0])
  assert int(both.stats["drafter_steps"][0]) == 0  # finished at the prefill: never active in the loop
  assert int(alone.stats["drafter_steps"][0]) < 8 * int(alone.stats["primary_calls"][0] - 1)  # the router stopped


def test_rejection_counter_and_the_prior_the_loop_starts_from(models):
  """stats["rejections"] counts the blocks that ended at a rejected draft (from the draft trace, per row, for fixed
  γ, auto and a router that stops blocks early); the auto loop's acceptance estimate starts from the table's prior,
  which a key's recorded calls set (pooled accepted / (accepted + rejections))."""
  tandem, drafter, router = models
  prompts = _prompts(np.random.default_rng(11), 3)
  k = 4
  runs = [generate("speed", prompts, primary=tandem.primary, drafter=drafter, max_new_tokens=20, block_len=3,
                   max_block_len=k, trace=True),
          generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=20, block_len=k, policy="auto", trace=True,
                   costs=costs.cost_table([10.0, 10.5, 11.0, 11.5, 12.0], 0.1)),
          generate("tandem_speed", prompts, tandem=tandem, router=router, threshold=0.6, max_new_tokens=20,
                   block_len=k, trace=True)]
  for out in runs:
    tr = out.stats["trace"]  # [B, iterations, K+3]: drafts, n_draft, accepted, token; -1 where inactive
    live = tr[..., k] >= 0
    want = np.sum(live & (tr[..., k + 1] < tr[..., k]), axis=1)
    np.testing.assert_array_equal(out.stats["rejections"], want)
    assert want.sum() > 0  # random models: rejections happen
  rec = costs.Outcome()
  table = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0)
  assert rec.prior(table) is table and float(table.prior_alpha) == costs.PRIOR_ALPHA
  rec.record(table, [9], 60.0, accepted=3, rejections=9)
  rec.record(table, [9], 60.0, accepted=1, rejections=3)
  primed = rec.prior(table)
  assert float(primed.prior_alpha) == pytest.approx(4 / 16) and float(primed.prior_weight) == costs.RECORDED_WEIGHT
  counts = (jnp.asarray([0.0, 2.0]), jnp.asarray([0.0, 0.0]))
  w = costs.RECORDED_WEIGHT
  np.testing.assert_allclose(costs.estimate(*counts, primed), [0.25, (2 + w * 0.25) / (2 + w)], rtol=1e-6)
  # a low prior shortens the first block the loop chooses (the prior is the only evidence before it drafts)
  flat = costs.cost_table([10.0, 10.2, 10.4, 10.6], 0.5)  # γ = 3 best at α = 0.5, γ = 1 at 0.25
  first = [int(costs.choose_gamma(costs.estimate(*counts, t)[:1], jnp.asarray([True]), t, 3))
           for t in (flat, rec.prior(flat))]
  assert first == [3, 1], first
