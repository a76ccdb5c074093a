"""Block-length policy (tandem_jax.decoding.costs, speculative.decode_speculative(policy="auto")): the cost model,
γ = 0 switched on and off inside one sequence without losing a token, finished rows that stop drafting."""

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


def test_auto_runs_the_plain_program_where_speculation_cannot_pay(models, monkeypatch):
  """With a plain step cheaper than any block even at the prior acceptance, every row of a ragged batch (budgets,
  EOS) decodes with the plain ``ar`` program: ar's tokens, no drafter call, every iteration counted as γ = 0, and the
  reason in the result."""
  tandem, drafter, _ = models
  monkeypatch.setattr(costs, "_outcomes", {})
  cheap_plain = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=2.0, prefill_ms=5.0)  # K = 3
  rng = np.random.default_rng(3)
  for case in range(3):
    prompts = _prompts(rng, 3)
    max_new = rng.integers(4, 20, 3).tolist()
    eos = int(rng.integers(0, 64)) if case == 2 else None
    want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=max_new, eos_id=eos)
    programs = len(api._compiled)
    for method, kw in (("tandem_speed", dict(tandem=tandem)), ("speed", dict(primary=tandem.primary,
                                                                            drafter=drafter))):
      out = generate(method, prompts, **kw, max_new_tokens=max_new, eos_id=eos, block_len=3, policy="auto",
                     costs=cheap_plain)
      assert out.tokens == want.tokens, (case, method)
      s = out.stats
      assert s["drafter_steps"].sum() == 0 and s["secondary_calls"].sum() == 0 and s["drafted"].sum() == 0
      assert (s["gamma_hist"][:, 0] == want.stats["primary_calls"] - 1).all() and s["gamma_hist"][:, 1:].sum() == 0
      assert "speculation off" in out.policy_note and "γ = 1" in out.policy_note
    # the fallback ran the program ar's call compiled (block_len 3 and 4 give one capacity here): the same executable
    assert len(api._compiled) == programs
  # a table without the plain program's cost never switches (the loop's own γ = 0 is the only way not to draft)
  out = generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=8, block_len=3, policy="auto",
                 costs=costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0))
  assert out.policy_note == "" and out.stats["gamma_hist"].shape == (3, 4)


def _with_ratios(table, ratios, calls):
  """An Outcome whose speculative calls ran at ``ratios`` x the table's plain program (10 plain steps each)."""
  rec = costs.Outcome()
  for r in ratios:
    rec.record(table, [11], (float(table.prefill_ms) + 10 * float(table.plain_ms)) / r)
  rec.calls = calls
  return rec


def test_auto_switch_follows_the_measured_speedup_and_probes(models, monkeypatch):
  """After speculative calls, the decision follows their measured wall times against the plain program's time for
  the same tokens, by an upper confidence bound: a clear loss switches off after one call and is re-measured ever
  more rarely; a small loss with a wide spread keeps measuring; a loss the calls agree on switches off."""
  tandem, _, _ = models
  monkeypatch.setattr(costs, "_outcomes", {})
  # iterations: γ = 0 11 ms, 1 12 ms, 2 14 ms, 3 16 ms; a plain step 30 ms: pays at the prior
  table = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0, prefill_ms=0.0)

  def call(rec, emitted, wall_ms):
    """What generate does: decide, count the call, record it (a plain call: at the table's plain step)."""
    on, why = costs.speculate(table, rec)
    rec.calls += 1
    if on:
      rec.record(table, emitted, wall_ms)
    else:
      rec.record_plain(table, emitted, float(table.prefill_ms) + (max(emitted) - 1) * float(table.plain_ms))
    return on, why

  rec = costs.Outcome()
  assert costs.speculate(table, rec) == (True, "") and rec.bound() == float("inf")
  # rows of 5 and 9 tokens: the plain program takes 8 steps = 240 ms (its longest row's); the call took 480 ms
  assert call(rec, [5, 9], 480.0)[0]
  assert rec.speedup == pytest.approx(0.5) and rec.ratios == [pytest.approx(0.5)]
  on, why = costs.speculate(table, rec)
  assert not on and why.startswith("speculation off") and "0.50x" in why  # a clear loss: off after one call
  assert "calibrated" in why
  for _ in range(200):  # a 0.5x loss is not re-measured within hundreds of calls
    assert not call(rec, [9], 480.0)[0]
  # a bound that reached the plain program's (here: a key with many calls and one record) probes, and a fast call
  # turns it on
  rec.calls = 10 ** 7
  on, why = costs.speculate(table, rec)
  assert on and why.startswith("probing") and rec.bound() >= rec.plain_bound() > 1.0
  call(rec, [33], 160.0)  # 960 ms plain against 160 ms: 6x
  assert rec.speedup == pytest.approx(3.25) and costs.speculate(table, rec) == (True, "")

  # single prompts: ratios 0.84, 1.15, 0.95, ... (mean below 1 after the first, spread wide): before the key has
  # run the plain program, a ratio this close to 1x (within the calibration's error) measures the plain program once;
  # with its step measured (here as calibrated), speculation stays on
  noisy = _with_ratios(table, [0.84, 1.15, 0.95, 0.90, 1.10], 5)
  on, why = costs.speculate(table, noisy)
  assert not on and why.startswith("speculation off for one call, measuring the plain program") and "0.99x" in why
  noisy.record_plain(table, [11], 300.0)
  assert noisy.speedup == pytest.approx(0.988) and costs.speculate(table, noisy)[0]
  # one call far off the rest (a stall: 0.30x among calls at 0.91-0.93x) does not hold the bound above 1x: from three
  # calls on the spread is capped at twice the robust one (median absolute deviation), and the key is off
  stalled = _with_ratios(table, [0.92, 0.93, 0.91, 0.30, 0.92, 0.93], 6)
  stalled.record_plain(table, [11], 300.0)
  assert float(np.std(stalled.ratios, ddof=1)) > 0.25 and stalled.spread == pytest.approx(costs.SD_FLOOR)
  on, why = costs.speculate(table, stalled)
  assert not on and why.startswith("speculation off") and stalled.bound() < 0.9
  # a spread the calls share keeps its standard deviation: the wide single-prompt ratios above
  assert noisy.spread == pytest.approx(float(np.std(noisy.ratios, ddof=1)))
  # a calibrated plain step 9% high (the real-model benchmark's T = 1 batch 1): speculative calls at 0.92x of the true
  # plain time read 1.00x until the key measures the plain program, then speculation is off
  biased = _with_ratios(table, [1.0, 1.0], 2)  # 300 ms for 10 steps of the calibrated 30 ms
  on, why = costs.speculate(table, biased)
  assert not on and "measuring the plain program" in why and "calibrated" in why
  biased.record_plain(table, [11], 275.0)  # the plain program's true step: 27.5 ms
  assert biased.speedup == pytest.approx(275 / 300)
  on, why = costs.speculate(table, biased)
  assert not on and why.startswith("speculation off: the last 2") and "median of the 1 newest of 1 plain calls" in why
  # the plain arm has its own bound: one plain call 3% slow (the real-model benchmark's greedy batch 1 at 295c2a8:
  # ratios against one plain call's 31.14 ms step read 0.99x for calls at 0.96x of ar in the same rounds) reads calls
  # at 0.97x of the true plain time near 1.00x, inside the spec arm's bound; the plain program is measured again until
  # its steps say the calls lose
  rng = np.random.default_rng(0)
  true_ratios = list(0.97 + 0.05 * rng.standard_normal(6))
  one_slow = _with_ratios(table, true_ratios, 7)
  one_slow.record_plain(table, [11], 10 * 30.0 * 1.03)
  assert one_slow.speedup > 0.99 and one_slow.bound() > 1.0  # the one-armed rule (bound >= 1x) would speculate
  on, why = costs.speculate(table, one_slow)
  assert not on and why.startswith("speculation off for one call, measuring the plain program again"), why
  for _ in range(20):
    on, _ = costs.speculate(table, one_slow)
    one_slow.calls += 1
    if on:
      one_slow.record(table, [11], 10 * 30.0 / (0.97 + 0.05 * rng.standard_normal()))
    else:
      one_slow.record_plain(table, [11], 10 * 30.0 * (1 + 0.005 * rng.standard_normal()))
  assert len(one_slow.plain) >= 5 and one_slow.plain_step_ms() == pytest.approx(30.0, rel=0.02)
  assert one_slow.speedup < 0.99 and not costs.speculate(table, one_slow)[0]
  # a loss every call agrees on: 240 ms plain against 252 ms, 0.95x: the second call measures the plain program,
  # the third probes, then off, re-measured rarely, and ever more rarely
  mild = costs.Outcome()
  ons = [call(mild, [9], 252.0)[0] for _ in range(200)]
  assert ons[:4] == [True, False, True, False] and mild.speedup == pytest.approx(240 / 252)
  probes = [i for i, on in enumerate(ons) if on]
  assert 2 < len(probes) < 10, probes
  assert np.all(np.diff(np.diff(probes[1:])) >= 0), probes  # the gaps between probes grow
  # a batch of 8 rows: one call's ratio is less noisy (FIRST_SPREAD / sqrt(8)), the same loss is off after one call
  batch8 = costs.Outcome(rows=8)
  ons = [call(batch8, [9] * 8, 252.0)[0] for _ in range(50)]
  assert ons[:2] == [True, False] and sum(ons) <= 5, ons
  # the plain arm is measured too: plain calls slower than the calibration (40 ms a step) lift the same speculative
  # calls to 1.27x, and speculation is back on; the prefill counts in both arms' times
  slow_plain = _with_ratios(table, [0.95, 0.95], 2)
  assert not costs.speculate(table, slow_plain)[0]
  slow_plain.record_plain(table, [11], 400.0)
  slow_plain.record_plain(table, [1], 400.0)  # no step: nothing to learn
  assert slow_plain.plain == [40.0] and slow_plain.plain_step_ms() == 40.0
  assert slow_plain.speedup == pytest.approx(0.95 * 40 / 30) and costs.speculate(table, slow_plain) == (True, "")
  with_prefill = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0, prefill_ms=60.0)
  rec = costs.Outcome()
  rec.record(with_prefill, [9], 300.0)  # ar: 60 + 8 x 30 = 300 ms
  rec.record_plain(with_prefill, [5], 180.0)  # (180 - 60) / 4 = 30 ms a step
  assert rec.ratios == [pytest.approx(1.0)] and rec.plain == [pytest.approx(30.0)]

  # through generate: the first call speculates and records; a record clearly below 1x sends the next call to ar
  prompts = [[1, 2, 3], [4, 5]]
  want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=10).tokens
  kw = dict(tandem=tandem, max_new_tokens=10, block_len=3, policy="auto", costs=table)
  generate("tandem_speed", prompts, **kw)  # builds (or finds) the program: a call that built it is not recorded
  costs._outcomes.clear()
  first = generate("tandem_speed", prompts, **kw)
  assert not first.first_run
  assert first.tokens == want and first.policy_note == "" and not first.ran_plain
  assert first.stats["drafted"].sum() > 0
  (_, live), = costs._outcomes.values()
  assert live.calls == 1 and live.ratios == [pytest.approx(9 * 30.0 / (first.wall_time * 1e3))]  # its wall time
  live.spec = [(9, 270.0 / 0.95, 1)] * 3
  second = generate("tandem_speed", prompts, **kw)
  assert second.tokens == want and second.stats["drafted"].sum() == 0 and "0.95x" in second.policy_note
  assert second.ran_plain and live.calls == 2 and len(live.ratios) == 3
  assert live.plain == [pytest.approx(second.wall_time * 1e3 / 9)]  # the plain call's step, measured


def _drifting_key(monkeypatch, true_ratio, calls=40, slow_start=True, refresh=True):
  """A key of 8 rows whose first 4 calls (one speculative, three plain) ran in a slow stretch of the machine (7%),
  then ``calls`` calls decided by :func:`costs.speculate` at a speculative speed of ``true_ratio`` x the plain
  program's in the same stretch; ``refresh=False``: the rule before the refresh (all plain calls pooled, none forced).
  Returns the calls' choices (True: speculative) and the record."""
  if not refresh:
    monkeypatch.setattr(costs, "REFRESH_EVERY", 10 ** 9)
    monkeypatch.setattr(costs, "NEAREST", 10 ** 9)
  table = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0, prefill_ms=0.0)
  rng = np.random.default_rng(0)
  rec = costs.Outcome(rows=8)
  slow = 1.07 if slow_start else 1.0
  for i in range(4):
    rec.calls += 1
    if i == 0:
      rec.record(table, [11] * 8, 10 * 30.0 * slow / true_ratio)
    else:
      rec.record_plain(table, [11] * 8, 10 * 30.0 * slow)
  ons = []
  for _ in range(calls):
    on, why = costs.speculate(table, rec)
    rec.calls += 1
    plain_ms = 10 * 30.0 * (1 + 0.005 * rng.standard_normal())
    if on:
      rec.record(table, [11] * 8, plain_ms / true_ratio)
    else:
      rec.record_plain(table, [11] * 8, plain_ms)
    ons.append(on)
  return ons, rec


def test_the_plain_arm_is_measured_again_while_the_margin_is_within_the_machines_drift(monkeypatch):
  """The real-model benchmark's greedy batch 8 at ba61a61: three plain calls made in a slow stretch read speculative
  calls at 0.967x of `ar` as 1.04x, and the plain program was never run again. Ratios now take the plain calls nearest
  in time, and a margin within REFRESH_MARGIN of 1x measures the plain program every REFRESH_EVERY + 1 calls."""
  old, old_rec = _drifting_key(monkeypatch, 0.967, refresh=False)
  assert all(old[1:]) and old_rec.speedup > 1.02  # the stale arm: speculates on every call, at a 0.967x
  monkeypatch.undo()
  ons, rec = _drifting_key(monkeypatch, 0.967)
  first_plain = ons.index(False, 1)
  assert first_plain <= costs.REFRESH_EVERY + 1 and all(ons[1:first_plain])  # refreshed after REFRESH_EVERY calls
  assert sum(ons[first_plain:]) <= 3, ons  # then off, probed rarely
  assert rec.ratios[-1] == pytest.approx(0.967, abs=0.02)  # the newest call's ratio against the newest plain calls
  # a speculative call takes the NEAREST plain calls closest to it: the slow stretch's for an early one, the newest
  table = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0, prefill_ms=0.0)
  steps = costs.Outcome()
  for call, step in [(2, 32.1), (3, 32.1), (4, 32.4), (20, 30.0), (21, 30.3), (30, 29.7)]:
    steps.calls = call
    steps.record_plain(table, [11], 10 * step)
  assert steps.plain_step_ms(at=1) == pytest.approx(32.1) and steps.plain_step_ms() == pytest.approx(30.0)
  assert steps.plain_step_ms(at=7) == pytest.approx(32.1)  # calls 4, 3, 2
  assert steps.plain_step_ms(at=12) == pytest.approx(30.3)  # calls 20 and 4 (8 away), then 21 before 3 (the newer)
  assert steps.plain_age() == 0 and costs.Outcome().plain_age() is None
  # where speculation wins by less than the drift, the refresh costs one call in REFRESH_EVERY + 1 ...
  monkeypatch.undo()
  ons, rec = _drifting_key(monkeypatch, 1.04, calls=45, slow_start=False)
  assert 45 - sum(ons) <= 45 // (costs.REFRESH_EVERY + 1) + 1 and rec.speedup == pytest.approx(1.04, abs=0.01)
  # ... and nothing where it wins clearly
  ons, _ = _drifting_key(monkeypatch, 1.3, calls=45, slow_start=False)
  assert all(ons), ons
  on, why = costs.speculate(costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0), rec)
  assert on and why == ""
  rec.calls += costs.REFRESH_EVERY
  on, why = costs.speculate(costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=30.0), rec)
  assert not on and "measuring the plain program again" in why and "calls old" in why, why


def test_a_key_without_a_record_decides_at_its_familys_acceptance(models, monkeypatch):
  """A key with no speculative call yet decides on the table at the acceptance its family's calls met (the same
  primary, drafter and sampling at other shapes), PRIOR_ALPHA before any, and its loop starts from that acceptance;
  another sampling setting (another family) does not pool; once the key has its own record, the record decides."""
  tandem, drafter, _ = models
  monkeypatch.setattr(costs, "_outcomes", {})
  # the best block costs 8 ms per token at α = 0.5 (γ = 1 and 2), 10 ms at α = 0.2: a 9 ms plain step lies between
  table = costs.cost_table([10.0, 11.0, 12.0, 13.0], 1.0, plain_ms=9.0)
  pair, fam = (tandem.primary, drafter), ("family", "greedy")
  b1 = costs.outcome(pair, ("key", 1), rows=1, family=fam)
  b8 = costs.outcome(pair, ("key", 8), rows=8, family=fam)
  t1 = costs.outcome(pair, ("key", 8, "T1"), rows=8, family=("family", "T1"))
  assert b8.family_alpha() is None and costs.speculate(table, b8) == (True, "")  # at PRIOR_ALPHA: a block pays
  b1.record(table, [9], 100.0, accepted=2, rejections=6)
  b1.record(table, [9], 100.0, accepted=0, rejections=2)
  assert b8.family_alpha() == (pytest.approx(0.2), 2) and t1.family_alpha() is None
  on, why = costs.speculate(table, b8)
  assert not on and "at the acceptance 0.20 that the drafts of 2 calls of these models and sampling met" in why
  assert "(γ = 1) would cost 10.00 ms per token against 9.00 ms" in why
  assert costs.speculate(table, t1) == (True, "")  # another sampling: still at the prior
  on, why = costs.speculate(table, b8, probe_first=True)  # a router's key: its loop measured once, whatever the table
  assert on and why.startswith("probing: the first speculative call")
  lost = costs.outcome(pair, ("key", 2), rows=1, family=fam)
  lost.record(table, [9], 400.0)  # 8 plain steps, 72 ms, against 400 ms: from its first record the record decides
  assert not costs.speculate(table, lost, probe_first=True)[0]
  assert float(b8.prior(table).prior_alpha) == pytest.approx(0.2) and t1.prior(table) is table
  assert costs.Outcome().family_alpha() is None  # no family: alone
  b8.record(table, [9], 60.0, accepted=0, rejections=9)  # its own call: 8 x 9 ms plain against 60 ms, 1.2x
  assert costs.speculate(table, b8) == (True, "")
  # its acceptance, 0, is below the table's break-even (1 / 11): the loop's prior is floored just above it, so a
  # call the switch lets speculate still drafts (at 0 the loop's first choice would be γ = 0, and with no drafts the
  # key's acceptance would never be measured again)
  floor = table.break_even_alpha() + costs.PROBE_MARGIN
  assert float(b8.prior(table).prior_alpha) == pytest.approx(floor) and floor > b8.alpha
  on1 = jnp.asarray([True])
  start = lambda t: int(costs.choose_gamma(costs.estimate(jnp.zeros(1), jnp.zeros(1), t), on1, t, 3))  # noqa: E731
  assert start(b8.prior(table)) >= 1 and start(table._replace(prior_alpha=np.float32(0.0), prior_weight=6.0)) == 0
  b8.record(table, [9], 60.0, accepted=0, rejections=0)  # a call that drafted nothing: not a call with drafts
  assert b8.family_alpha()[1] == 3

  # through generate: the first key's calls set the family's acceptance; a new batch size of the same models and
  # sampling decides on it, as does the streamed call (another key: its own program)
  prompts = _prompts(np.random.default_rng(12), 3)
  kw = dict(tandem=tandem, max_new_tokens=16, block_len=3, policy="auto")
  runs = [generate("tandem_speed", prompts[:2], **kw, costs=table._replace(plain_ms=np.float32(1e3)))
          for _ in range(3)]
  (_, first), = [e for e in costs._outcomes.values() if e[1].family and e[1].family[1] == "tandem_speed"]
  alpha, n = first.family_alpha()
  assert n == 3 - runs[0].first_run and not any(r.first_run for r in runs[1:])  # a first run is not recorded
  assert alpha < 0.45, alpha  # random models accept few drafts
  _, at_alpha = costs.best_block_ms_per_token(table, alpha)
  _, at_prior = costs.best_block_ms_per_token(table, costs.PRIOR_ALPHA)
  between = table._replace(plain_ms=np.float32((at_alpha + at_prior) / 2))  # pays at the prior, not at alpha
  want = generate("ar", prompts, primary=tandem.primary, max_new_tokens=16).tokens
  out = generate("tandem_speed", prompts, **kw, costs=between)
  assert out.ran_plain and out.tokens == want and f"at the acceptance {alpha:.2f} that the drafts of {n} calls" in \
      out.policy_note
  hot = generate("tandem_speed", prompts, **kw, costs=between, sampling=api.SamplingParams(temperature=1.0))
  assert not hot.ran_plain and hot.policy_note == ""  # another family: at the prior, a block pays

  # a call that builds its program is counted but not recorded (its first run's one-time costs are not the policy's)
  monkeypatch.setattr(api, "_compiled", api._Programs(maxsize=64))
  costs._outcomes.clear()
  built = generate("tandem_speed", prompts, **kw, costs=between, sampling=api.SamplingParams(temperature=1.0))
  (_, rec), = costs._outcomes.values()
  assert built.first_run and not built.ran_plain and rec.calls == 1 and rec.spec == [] and rec.trials == []
  again = generate("tandem_speed", prompts, **kw, costs=between, sampling=api.SamplingParams(temperature=1.0))
  assert not again.first_run and rec.calls == 2 and len(rec.spec) == 1 and len(rec.trials) == 1
