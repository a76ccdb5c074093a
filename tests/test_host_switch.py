"""The host-level switch of ``generate(policy="auto")`` (tandem_jax.decoding.costs.Outcome / speculate): per call,
the speculative program or the plain ``ar`` one, from what earlier calls of the same models and shapes measured
(both arms, by upper confidence bounds; the plain arm measured again as the machine drifts; a key without a record
at its family's acceptance). The in-loop block length (γ per iteration) is tests/test_policy.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from tandem_jax.decoding import api, costs, generate
from test_decoding import _build, _prompts


@pytest.fixture(scope="module")
def models():
  return _build()


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
  for call, step in [(1, None), (2, 32.1), (3, 32.1), (4, 32.4), (7, None), (12, None), (20, 30.0), (21, 30.3),
                     (30, 29.7)]:  # None: a speculative call (300 ms for 10 plain steps)
    steps.calls = call
    if step is None:
      steps.record(table, [11], 300.0)
    else:
      steps.record_plain(table, [11], 10 * step)
  assert steps.plain_step_ms(at=1) == pytest.approx(32.1) and steps.plain_step_ms() == pytest.approx(30.0)
  assert steps.plain_step_ms(at=7) == pytest.approx(32.1)  # calls 4, 3, 2
  assert steps.plain_step_ms(at=12) == pytest.approx(30.3)  # calls 20 and 4 (8 away), then 21 before 3 (the newer)
  assert steps.plain_age() == 0 and costs.Outcome().plain_age() is None
  # the plain calls beside an old speculative call stay its pair after they leave the window of WINDOW plain calls:
  # its ratio is the one measured beside it, however long the key then runs the plain program (at another speed)
  before = steps.ratios
  for call in range(31, 31 + 3 * costs.WINDOW):
    steps.calls = call
    steps.record_plain(table, [11], 10 * 36.0)
  assert steps.ratios == before and len(steps.plain) == costs.WINDOW
  assert steps.plain_step_ms() == pytest.approx(36.0)  # a new call pairs with the newest
  assert len(steps.pairing) <= costs.NEAREST * (len(steps.spec) + 1)  # only what some ratio pairs with is kept
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
  # a router's calls are a family of their own: the drafts its gate lets through are not a fixed block's
  for _ in range(2):
    generate("tandem_speed", prompts[:1], **kw, router=models[2], threshold="gate",
             costs=table._replace(plain_ms=np.float32(1e3)))
  assert first.family_alpha() == (alpha, n)
  routed = [rec for _, rec in costs._outcomes.values()
            if rec.family and len(rec.family) == 4 and "router" in dict(rec.family[2])]
  assert len(routed) == 1 and routed[0].family_alpha()[1] == 1  # its second call recorded (the first built)

  # a call that builds its program is counted but not recorded (its first run's one-time costs are not the policy's)
  monkeypatch.setattr(api, "_compiled", api._Programs(maxsize=64))
  costs._outcomes.clear()
  built = generate("tandem_speed", prompts, **kw, costs=between, sampling=api.SamplingParams(temperature=1.0))
  (_, rec), = costs._outcomes.values()
  assert built.first_run and not built.ran_plain and rec.calls == 1 and rec.spec == [] and rec.trials == []
  again = generate("tandem_speed", prompts, **kw, costs=between, sampling=api.SamplingParams(temperature=1.0))
  assert not again.first_run and rec.calls == 2 and len(rec.spec) == 1 and len(rec.trials) == 1
