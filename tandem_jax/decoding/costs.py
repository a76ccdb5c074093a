"""What a decode step costs, and the block length that pays: the cost table the ``auto`` policy reads.

:func:`call_ms` times a model's cached ``extend`` call of k tokens per row (a compiled loop of calls at a fixed cache
fill; the benchmark's per-call table uses it). The decode loop's own table is measured on the loop itself
(:func:`tandem_jax.decoding.api.calibrate_loop`: every γ's iteration, once per process for the live models and
shapes, kept by :func:`cached`): a :class:`CostTable`.

:func:`choose_gamma` is what the decode loop does with it each iteration (traced, inside ``lax.while_loop``): with
per-row acceptance estimates α_r, a block of γ drafts yields Σ_r (1 - α_r^{γ+1}) / (1 - α_r) tokens for the active
rows (Leviathan et al., Thm 3.8, per row) and costs max(γ, 1) drafter steps + one verify call of γ + 1 tokens (a
standalone drafter always reads the pending token, so γ = 0, a plain primary step, keeps its state in sync; the
Tandem secondary is not called at γ = 0, and the table built from measured iterations, :func:`loop_table`, holds that
iteration's cost whatever it runs); the γ with the most tokens per millisecond wins.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Running acceptance estimate per row: α = (A + w α0) / (A + R + w), where A and R count accepted drafts and rejection
# events (a block that stopped short of its drafts), both decayed by DECAY each iteration, and α0 with weight w is
# the prior: PRIOR_ALPHA with weight 2 before any call of this key's family has speculated, then the acceptance its
# earlier calls met, or before its first its family's (:class:`Outcome`, pooled) with weight RECORDED_WEIGHT. Without
# drafts the estimate drifts back to the prior, so a row whose speculation was switched off is probed again after a
# few iterations. A measured prior matters where α is far from 0.5 (the real-model benchmark's tandem drafter: about
# 0.35): the first iterations of every call drafted too long. A measured prior is floored at the table's break-even
# acceptance + PROBE_MARGIN: at a prior below it the loop never drafts, so a call (a probe of the host switch, below)
# measures only γ = 0 iterations and its key's acceptance is never measured again (the real-model benchmark's T = 1
# batch 1: one call met 12 of 44, below break-even 0.285, and the next eleven calls drafted nothing). At the floor the
# loop drafts until rejections pull the estimate below break-even and again when it has drifted back.
# The memory (DECAY 0.95: about 20 iterations) and the recorded prior's weight (20 drafts) are long because the
# real-model drafter's outcomes are close to independent from draft to draft (lag-1 autocorrelation 0.04,
# benchmarks/router_gate.py): a short memory mostly follows noise. At decay 0.8 and weight 6 the greedy batch-1 run of
# session 25 spent 23% of its iterations at γ = 0 although its acceptance (0.33) stayed above break-even (0.27);
# benchmarks/estimator_sim.py replays such processes on a benchmark cost table (BENCHMARKS.md session 26): at an
# independent α of 0.33 the longer memory gains about 0.7% of the best fixed γ, and it is about equal where acceptance
# switches between stretches of text or sits below break-even.
DECAY, PRIOR_ALPHA, FIRST_WEIGHT, RECORDED_WEIGHT, PROBE_MARGIN = 0.95, 0.5, 2.0, 20.0, 0.02


class CostTable(NamedTuple):
  verify_ms: jax.Array  # [K+2] float32: ms of one primary call of s tokens per row at index s (index 0 unused)
  draft_ms: jax.Array   # [] float32: ms of one drafter step
  plain_ms: jax.Array = np.float32(np.inf)  # [] ms per token of the plain ``ar`` program (inf: not an option)
  prefill_ms: jax.Array = np.float32(0.0)    # [] ms of that program's prefill
  prior_alpha: jax.Array = np.float32(PRIOR_ALPHA)   # [] the acceptance the loop's estimates start from ...
  prior_weight: jax.Array = np.float32(FIRST_WEIGHT)  # [] ... worth this many drafts (see :func:`estimate`)

  @property
  def max_block_len(self) -> int:
    return int(np.shape(self.verify_ms)[0]) - 2

  def break_even_alpha(self) -> float:
    """The acceptance at which the loop starts drafting: the lowest α at which some block of γ >= 1 drafts yields
    as many expected tokens per ms as a γ = 0 iteration (a plain primary step inside the loop). For γ = 1 it is
    (c + v2) / (c + v1) - 1; a longer block can pay from a lower α where the verify cost grows slowly with its size
    (the γ = 1 value, possibly above 1, where no block pays)."""
    v = np.asarray(self.verify_ms, np.float64)
    c = float(self.draft_ms)
    c0 = c + v[1]
    best = (c + v[2]) / c0 - 1.0
    for g in range(2, self.max_block_len + 1):
      need = (g * c + v[g + 1]) / c0  # expected tokens the block must yield, 1 + α + ... + α^g
      if need > g + 1:
        continue
      lo, hi = 0.0, 1.0
      for _ in range(60):  # expected_block_tokens increases with α: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_block_tokens(mid, g) < need else (lo, mid)
      best = min(best, hi)
    return float(max(best, 0.0))

  @property
  def has_plain(self) -> bool:
    """Whether the plain ``ar`` program is an alternative :func:`generate` may switch to (its cost is known)."""
    return bool(np.isfinite(float(self.plain_ms)))

  def as_dict(self) -> dict:
    return dict(verify_ms=[float(x) for x in np.asarray(self.verify_ms)[1:]], draft_ms=float(self.draft_ms),
                plain_ms=float(self.plain_ms), prefill_ms=float(self.prefill_ms), prior_alpha=float(self.prior_alpha),
                prior_weight=float(self.prior_weight))


def cost_table(verify_ms, draft_ms: float, plain_ms: float | None = None, prefill_ms: float = 0.0) -> CostTable:
  """A table from plain numbers: ``verify_ms`` [K+1] (sizes 1..K+1) or {size: ms}; ``draft_ms`` one drafter step;
  ``plain_ms`` one token of the plain ``ar`` program and ``prefill_ms`` its prefill (None: the host-level switch to
  that program is off, the loop's own γ = 0 being the only way not to draft)."""
  if isinstance(verify_ms, dict):
    verify_ms = [float(verify_ms[s]) for s in sorted(verify_ms)]
  v = np.asarray([0.0] + [float(x) for x in verify_ms], np.float32)
  if len(v) < 3 or np.any(v[1:] <= 0) or draft_ms < 0:
    raise ValueError(f"a cost table needs positive verify costs for sizes 1..K+1 (K >= 1) and a drafter cost >= 0, "
                     f"got verify_ms={list(verify_ms)}, draft_ms={draft_ms}")
  if (plain_ms is not None and not plain_ms > 0) or prefill_ms < 0:
    raise ValueError(f"plain_ms must be > 0 (or None) and prefill_ms >= 0, got {plain_ms}, {prefill_ms}")
  return CostTable(jnp.asarray(v), jnp.float32(draft_ms), jnp.float32(np.inf if plain_ms is None else plain_ms),
                   jnp.float32(prefill_ms))


@functools.partial(jax.jit, static_argnames=("graphdef", "n"))
def _extend_loop(graphdef, state, cache, tokens_bk, n: int):
  """``n`` cached calls on k tokens per row at a fixed cache fill; each call's output feeds the next (no DCE).

  Every position's logits feed the next tokens, as a verify call needs them all: reading only the last position
  let XLA slice the output layer down to one row and under-count a k-token call.
  A max over the vocabulary is the cheapest full read (an argmax costs more than a small drafter's step on CPU).
  """
  model = nnx.merge(graphdef, state)
  fill = cache.lengths

  def body(_, carry):
    cache, tok = carry
    logits, _, cache = model.extend(tok, cache)
    nxt = (jnp.max(logits, -1) > 0).astype(jnp.int32)  # [B, k]
    return cache.with_lengths(fill), nxt

  _, tok = jax.lax.fori_loop(0, n, body, (cache, tokens_bk))
  return tok


def spread(xs) -> dict:
  return dict(min=float(min(xs)), median=float(statistics.median(xs)), max=float(max(xs)))


def call_ms(model, batch: int, k: int, *, capacity: int, fill: int, calls: int, repeats: int) -> dict:
  """Milliseconds per cached ``extend`` call of k tokens per row (median, min, max over repeats)."""
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, capacity)
  cache = cache.with_lengths(jnp.full((batch,), fill, jnp.int32))
  tokens = jnp.ones((batch, k), jnp.int32)
  jax.block_until_ready(_extend_loop(graphdef, state, cache, tokens, calls))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(_extend_loop(graphdef, state, cache, tokens, calls))
    times.append((time.perf_counter() - t0) / calls * 1e3)
  return spread(times)


# key -> (weak references to the models the entry was measured on, table). The weak references make an entry die
# with its models: an id alone can be reused by a later, different model, which would then read a table measured on
# another one.
_calibrated: dict = {}


def cached(models, key, make):
  """``make()``'s result for ``key``, measured once per process while ``models`` (the objects it was measured on,
  part of ``key`` by id) are alive."""
  for k in [k for k, (refs, _) in _calibrated.items() if any(r() is None for r in refs)]:
    del _calibrated[k]  # models that are gone
  entry = _calibrated.get(key)
  if entry is None or any(r() is not m for r, m in zip(entry[0], models)):
    entry = _calibrated[key] = (tuple(weakref.ref(m) for m in models), make())
  return entry[1]


def loop_table(iteration_ms, draft_ms: float, plain_ms: float | None = None, prefill_ms: float = 0.0) -> CostTable:
  """A table from measured decode-loop iterations: ``iteration_ms[g]`` (g = 0..K) is one iteration that drafts g
  tokens, with its drafter steps, verify call and the loop's own work. Stored as verify_ms[g + 1] =
  iteration_ms[g] - max(g, 1) * draft_ms, so that :func:`choose_gamma`'s cost of γ = g is the measured iteration.
  ``plain_ms``, ``prefill_ms``: the plain ``ar`` program's step and prefill (see :func:`cost_table`)."""
  it = [float(x) for x in iteration_ms]
  return cost_table([max(t - max(g, 1) * draft_ms, 1e-3) for g, t in enumerate(it)], draft_ms, plain_ms, prefill_ms)


def settle_iterations(iteration_ms, plain_ms: float | None = None) -> list[float]:
  """Measured loop iterations (g = 0..K drafts) made consistent with what an iteration does: a γ = 0 iteration is a
  plain primary step plus the loop's own work, so it costs at least ``plain_ms`` (the plain program's step), and one
  more draft never costs less (a drafter step more, a verify call one token longer). Timing noise on a busy machine
  breaks both (BENCHMARKS.md session 26: γ = 0 read 24.39 ms against a plain step of 26.3 ms, and at T = 1 γ = 1
  40.25 ms against γ = 2's 37.24 ms), and the loop then picks γ by noise. Returns the non-decreasing sequence closest
  in least squares to the measured times among those that hold both (pool adjacent violators, a violating run
  becoming its mean, then the floor: the exact projection, as every entry is at least γ = 0's)."""
  xs = [float(x) for x in iteration_ms]
  pools: list[list[float]] = []  # [sum, count] per pooled run
  for x in xs:
    pools.append([x, 1.0])
    while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
      total, n = pools.pop()
      pools[-1][0] += total
      pools[-1][1] += n
  floor = -math.inf if plain_ms is None else float(plain_ms)
  return [max(total / n, floor) for total, n in pools for _ in range(int(n))]


def forcing_table(gamma: int, max_block_len: int) -> CostTable:
  """A table under which :func:`choose_gamma` picks ``gamma`` every iteration (for timing the loop at one γ)."""
  v = [1e9] * (max_block_len + 1)
  v[gamma] = 1.0
  return cost_table(v, 0.0)  # no plain_ms: the host-level switch never replaces the timed program


def expected_block_tokens(alpha: float, gamma: int) -> float:
  """Expected tokens of one block of γ drafts at acceptance α: (1 - α^{γ+1}) / (1 - α), γ + 1 at α = 1 (NaN for a
  non-finite α)."""
  if not math.isfinite(alpha):
    return float("nan")
  if alpha >= 1.0:
    return gamma + 1.0
  return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def leviathan_speedup(alpha: float, gamma: int, c: float, verify: float = 1.0) -> float:
  """Leviathan et al. (arXiv 2211.17192) Thm 3.8: walltime improvement (1 - α^{γ+1}) / ((1 - α)(γc + 1)), with c a
  drafter step and ``verify`` the block call in units of one primary step (Thm 3.8 assumes ``verify`` = 1)."""
  return float(expected_block_tokens(alpha, gamma) / (gamma * c + verify))


def expected_tokens(alpha_b: jax.Array, max_block_len: int) -> jax.Array:
  """[B, K+1]: expected tokens of a block of γ = 0..K drafts per row, Σ_{i<=γ} α^i."""
  powers = alpha_b[:, None] ** jnp.arange(max_block_len + 1, dtype=jnp.float32)[None]
  return jnp.cumsum(powers, axis=-1)


def choose_gamma(alpha_b: jax.Array, active_b: jax.Array, table: CostTable, max_block_len: int,
                 cap=None, remaining_b: jax.Array | None = None, allowed=None) -> jax.Array:
  """The γ in 0..min(K, cap) (and among ``allowed``, a sequence of γ, when given) that finishes the batch soonest
  (int32 scalar).

  Without ``remaining_b``: the most expected tokens per ms summed over the active rows. With ``remaining_b`` (each
  row's tokens still to emit): the least predicted time until the last active row is done, max_r remaining_r /
  E_r(γ) x cost(γ). A batch runs until its slowest row finishes, so a block length that pays on average but slows
  the rows with the lowest acceptance loses wall time; at batch 1 the two rules agree."""
  k = max_block_len
  g = jnp.arange(k + 1, dtype=jnp.int32)
  cost = iteration_costs(table, k)
  expected = expected_tokens(alpha_b, k)  # [B, K+1]
  if remaining_b is None:
    rate = jnp.sum(jnp.where(active_b[:, None], expected, 0.0), axis=0) / cost
  else:
    rows = jnp.where(active_b[:, None], remaining_b.astype(jnp.float32)[:, None] / expected, 0.0)
    rate = -jnp.max(rows, axis=0) * cost
  if cap is not None:
    rate = jnp.where(g <= cap, rate, -jnp.inf)
  if allowed is not None:
    rate = jnp.where(jnp.isin(g, jnp.asarray(allowed, jnp.int32)), rate, -jnp.inf)
  return jnp.argmax(rate).astype(jnp.int32)


def iteration_costs(table: CostTable, max_block_len: int) -> jax.Array:
  """[K+1]: the table's cost of one loop iteration that drafts g = 0..K tokens (what :func:`choose_gamma` weighs)."""
  g = jnp.arange(max_block_len + 1, dtype=jnp.int32)
  return jnp.maximum(g, 1).astype(jnp.float32) * table.draft_ms + table.verify_ms[1:max_block_len + 2]


def keeps_drafting(reach_b, expect_b, alpha_b, n, table: CostTable, max_block_len: int) -> jax.Array:
  """[B] bool: whether a (n+1)-th draft raises a block's expected tokens per ms, after n drafts whose predicted
  acceptances give ``reach_b`` (all n accepted) and ``expect_b`` (expected accepted drafts), the next one's
  acceptance taken as ``alpha_b``: (1 + E + R α) / C(n + 1) > (1 + E) / C(n). False at n = K."""
  cost = iteration_costs(table, max_block_len)
  n = jnp.asarray(n, jnp.int32)
  now, more = cost[jnp.minimum(n, max_block_len)], cost[jnp.minimum(n + 1, max_block_len)]
  return ((1.0 + expect_b + reach_b * alpha_b) * now > (1.0 + expect_b) * more) & (n < max_block_len)


def update_counts(accepted_b, rejected_b, n_draft_b, active_b, accept_count_b, reject_count_b):
  """Decayed counts after one iteration: accepted drafts and rejection events of the rows that drafted."""
  drafted = active_b & (n_draft_b > 0)
  a = DECAY * accept_count_b + jnp.where(drafted, accepted_b, 0).astype(jnp.float32)
  r = DECAY * reject_count_b + jnp.where(drafted & rejected_b, 1.0, 0.0)
  return a, r


def estimate(accept_count_b, reject_count_b, table: CostTable) -> jax.Array:
  """[B] running acceptance estimates α from the decayed counts and the table's prior."""
  w = table.prior_weight
  return (accept_count_b + w * table.prior_alpha) / (accept_count_b + reject_count_b + w)


# -- the host-level switch: the plain ``ar`` program where speculation does not pay -----------------------------------
# A γ = 0 iteration of the speculative loop still runs the loop's bookkeeping (and a standalone drafter's catch-up
# step), so at a batch where drafting never pays the loop is slower than the primary alone. ``generate(policy="auto")``
# therefore chooses, per call, between its speculative program and the plain ``ar`` one, from what earlier calls with
# the same models and shapes measured: each speculative call records its wall time and the plain steps its tokens would
# take (its longest row's, one step each after the prefill), and its speedup is the plain program's time for those steps
# (prefill + steps x plain step) over that wall time, what the benchmark's ratio to ``ar`` is. The plain step is the
# median of the plain calls this key ran nearest to that call (wall less prefill, per step; NEAREST, below), the
# calibrated one before any: both arms are measured on the calls themselves. (The first rule predicted the speculative
# time from the block lengths the loop chose at the calibrated iteration costs: free of wall-clock noise, but where a
# loop step is a fraction of a millisecond the calibration is off by more than the margin; on the toy models' T = 1
# batch 8 the table said one draft pays and every call ran at 0.75x of ar.)
#
# The choice is a two-armed bandit decided by upper confidence bounds (UCB1), on the scale of the plain program's
# median step (1x): a call speculates while mean + sd · sqrt(2 ln t / n) >= 1 + sd_p · sqrt(2 ln t / n_p), the plain
# program's own bound, with n and n_p the speculative and plain calls recorded (the last WINDOW of each), t this key's
# calls so far (both programs), sd_p the plain steps' relative spread (SD_FLOOR for one call) and sd the speculative
# ratios' spread. (With the plain arm taken as exactly 1x, the real-model benchmark's greedy batch 1 at 295c2a8 took
# its ratios against one plain call's step (31.14 ms): calls that ran at 0.96x of `ar` in the same rounds read 0.99x
# and every call speculated, 0.957 of the best fixed γ.) The speculative spread is FIRST_SPREAD /
# sqrt(B) for a batch of B rows while one call cannot show it (rows' acceptances vary independently), then the
# measured one, at least SD_FLOOR and, from three calls on, at most ROBUST_CAP times the robust one (from the median
# absolute deviation: the real-model benchmark's T = 1 batch 1 at a7a8458 read spread 0.25 around 0.86x after six
# calls and probed eleven calls at 0.87x before its bound fell below 1x; a call or two far off the rest, a stall of
# the machine, should not keep a loss measured). A clear loss switches off after one call; a loss that calls agree on
# (a batch whose loop runs mostly γ = 0 iterations, a little dearer than plain steps: 0.9x every call) after two, and
# is then re-measured ever more rarely (the bound grows with ln t); a ratio near 1 with a wide spread (single prompts at
# batch 1, whose acceptance varies from prompt to prompt) keeps speculating until enough calls say it loses. A fixed
# count (this module's first rule: off after 3 calls whose decayed mean was below 1x) switched the real-model
# benchmark's batch 1 off after its first three calls although fixed γ gained there. A key without a speculative
# record follows the table: it speculates when a block pays at the acceptance its family met (the calls of every key
# with the same primary, drafter and sampling, whatever their shapes: acceptance is the models' and the sampling's,
# not the batch's), at PRIOR_ALPHA before any. (With PRIOR_ALPHA alone the real-model benchmark's T = 1 batch 8, whose
# break-even acceptance 0.30 sits below 0.5 but above the 0.24 its batch-1 calls had met, speculated on its first call
# at 0.82x and, its ratios disagreeing, probed again in later rounds: 0.89x.) A key whose loop has a router
# speculates on its first call instead: the table prices fixed blocks, and where none pays at the family's acceptance
# the router's loop was never measured (benchmarks/auto_policy.py --router: every call of the router inside ``auto``
# ran the plain program, the router alone 1.02x).
#
# Both arms are measured: while a key has no plain call of its own and its speculative calls read within
# CALIBRATION_ERROR of 1x against the calibrated plain step, a call it would speculate runs the plain program once
# instead, to measure the step the ratios are taken against; from then on the plain arm's bound says when it is
# measured again. The calibration's step is one process's minimum of two
# short runs: on the real-model benchmark's T = 1 batch 1 it was 16.12 ms against the 14.8 ms of `ar`'s calls in the
# same rounds, so calls at about 0.91x were recorded near 1.00x and the key speculated on every call (0.90x).
#
# The machine's speed drifts (the real-model benchmark's `ar` calls: 10.71 s in a first round, 9.60-10.23 s later), so
# a ratio is only as good as the plain step it is taken against: each speculative call's ratio uses the median of the
# NEAREST plain calls closest to it in this key's call order (kept while the call is in the record, after they leave
# the window of plain calls, so a ratio stays the one measured beside it), and while the speculative calls read within
# REFRESH_MARGIN of 1x (either side), a key that would speculate and whose newest plain call is REFRESH_EVERY calls
# old runs the plain program once again.
# (Without it, the real-model benchmark's greedy batch 8 at ba61a61 took its ratios against 3 plain calls made in the
# first, slow calls: its speculative calls read 1.04x while they ran at 0.967x of `ar` in the same rounds, and the
# plain arm, its UCB bound below the speculative mean, was never measured again.) The refresh costs at most
# 1 / (REFRESH_EVERY + 1) of the margin where speculation wins by less than REFRESH_MARGIN (0.4% of a 1.03x).
FIRST_SPREAD, SD_FLOOR, WINDOW, CALIBRATION_ERROR, ROBUST_CAP = 0.1, 0.03, 32, 0.15, 2.0
NEAREST, REFRESH_EVERY, REFRESH_MARGIN = 3, 8, 0.10


class Outcome:
  """What the calls of one (models, shapes, sampling) key measured, and how many calls the key made."""

  def __init__(self, rows: int = 1, family=None):
    self.rows = rows               # the batch of this key's calls
    self.family = family           # keys of one family pool their acceptance (:meth:`family_alpha`); None: alone
    self.calls = 0                 # calls decided for this key (both programs)
    self.spec: list[tuple[int, float, int]] = []  # the last WINDOW speculative calls: (plain steps, ms, call number)
    self.plain: list[float] = []               # the last WINDOW plain calls: measured ms per step
    # (call number, ms per step) of the plain calls a ratio may pair with, the newest last (``calls`` when recorded)
    self.pairing: list[tuple[int, float]] = []
    self.calibrated: tuple[float, float] | None = None  # the table's (plain step, prefill) ms
    self.trials: list[tuple[int, int]] = []  # the speculative calls' (accepted drafts, rejection events), all rows

  def plain_step_ms(self, at: int | None = None) -> float:
    """The plain program's ms per step: the median of this key's NEAREST plain calls closest to call number ``at``
    (the newest ones for None; of two as close, the newer), the calibrated step before any plain call."""
    if not self.pairing:
      return self.calibrated[0]
    return float(np.median([ms for _, ms in self._nearest(self.calls if at is None else at)]))

  def _nearest(self, at: int) -> list[tuple[int, float]]:
    return sorted(self.pairing, key=lambda e: (abs(e[0] - at), -e[0]))[:NEAREST]

  def _prune_pairing(self) -> None:
    """Keeps the plain calls some recorded speculative call pairs with, and the newest (a later call's): an old
    speculative call keeps its neighbours after they leave the window of WINDOW plain calls, so its ratio stays
    the one measured beside it; a plain call no record pairs with never will (later calls are closer to newer ones)."""
    keep = {e for at in [self.calls] + [at for _, _, at in self.spec] for e in self._nearest(at)}
    self.pairing = [e for e in self.pairing if e in keep]

  def plain_age(self) -> int | None:
    """Calls decided since this key's newest plain call (None before any)."""
    return self.calls - self.pairing[-1][0] if self.pairing else None

  @property
  def ratios(self) -> list[float]:
    """Each recorded speculative call's speedup: (prefill + steps x plain step) / its measured ms, the plain step
    taken from the plain calls nearest to it (:meth:`plain_step_ms`)."""
    if not self.spec:
      return []
    prefill = self.calibrated[1]
    return [(prefill + n * self.plain_step_ms(at)) / ms for n, ms, at in self.spec]

  @property
  def speedup(self) -> float | None:
    """Mean ratio of the recorded speculative calls (None before the first)."""
    r = self.ratios
    return float(np.mean(r)) if r else None

  @property
  def spread(self) -> float:
    """The ratios' standard deviation, at least SD_FLOOR; FIRST_SPREAD / sqrt(rows) while one call cannot show it.
    From three calls on it is at most ROBUST_CAP times the robust one (1.4826 x the median absolute deviation from
    the median), so that one call far off the rest (a stall of the machine) does not hold the bound above 1x for
    many calls; a spread the calls share (prompts whose acceptances differ) moves the median deviation as much."""
    r = self.ratios
    if len(r) < 2:
      return FIRST_SPREAD / math.sqrt(self.rows)
    return _robust_sd(r)

  def bound(self) -> float:
    """UCB1's index of the speculative program for the next call (+inf before the first record)."""
    if not self.spec:
      return math.inf
    t = self.calls + 1
    return self.speedup + self.spread * math.sqrt(2.0 * math.log(t) / len(self.spec))

  @property
  def plain_spread(self) -> float:
    """The spread of the plain calls' steps relative to their median (:func:`_robust_sd`; SD_FLOOR for one call:
    a plain step's time does not depend on the text, only the machine's noise moves it)."""
    if len(self.plain) < 2:
      return SD_FLOOR
    return _robust_sd(np.asarray(self.plain) / np.median(self.plain))

  def plain_bound(self) -> float:
    """UCB1's index of the plain program, on the scale of :attr:`ratios` (its median step is 1x): 1 + its relative
    spread x sqrt(2 ln t / plain calls); 1 before any plain call (the calibrated step, which the rule for a key
    without plain calls handles)."""
    if not self.plain:
      return 1.0
    return 1.0 + self.plain_spread * math.sqrt(2.0 * math.log(self.calls + 1) / len(self.plain))

  @property
  def alpha(self) -> float | None:
    """The acceptance the recorded calls met: accepted / (accepted + rejections), pooled (None without drafts)."""
    return _pooled_alpha(self.trials)

  def family_alpha(self) -> tuple[float, int] | None:
    """(acceptance, calls with drafts) pooled over the recorded calls of every live key of this key's family (this
    one included); None without drafts or without a family."""
    if self.family is None:
      return None
    trials = [t for _, rec in _outcomes.values() if rec.family == self.family for t in rec.trials if sum(t)]
    a = _pooled_alpha(trials)
    return None if a is None else (a, len(trials))

  def prior(self, table: CostTable) -> CostTable:
    """``table`` with the loop's acceptance prior set from the recorded calls, this key's or else its family's, at
    least the table's break-even acceptance + PROBE_MARGIN (unchanged before any)."""
    a = self.alpha
    if a is None:
      fam = self.family_alpha()
      a = None if fam is None else fam[0]
    if a is None:
      return table
    a = max(a, min(table.break_even_alpha() + PROBE_MARGIN, PRIOR_ALPHA))
    return table._replace(prior_alpha=np.float32(a), prior_weight=np.float32(RECORDED_WEIGHT))

  def _calibrate(self, table: CostTable) -> None:
    if self.calibrated is None:
      self.calibrated = (float(table.plain_ms), float(table.prefill_ms))

  def record(self, table: CostTable, emitted_per_row, wall_ms: float, accepted: int = 0, rejections: int = 0) -> None:
    """Adds one speculative call: ``emitted_per_row`` tokens per row (the plain program needs one step per token
    after the first, until its longest row is done), its measured ``wall_ms`` (prefill and loop), and its accepted
    drafts and rejection events (all rows)."""
    self._calibrate(table)
    if not wall_ms > 0:
      return
    self.spec = (self.spec + [(max(max(emitted_per_row) - 1, 0), float(wall_ms), self.calls)])[-WINDOW:]
    self.trials = (self.trials + [(int(accepted), int(rejections))])[-WINDOW:]
    self._prune_pairing()

  def record_plain(self, table: CostTable, emitted_per_row, wall_ms: float) -> None:
    """Adds one plain call: its ms per step, (``wall_ms`` - the calibrated prefill) / steps (none without steps)."""
    self._calibrate(table)
    steps = max(max(emitted_per_row) - 1, 0)
    if steps:
      self.plain = (self.plain + [max(wall_ms - self.calibrated[1], 1e-3) / steps])[-WINDOW:]
      self.pairing.append((self.calls, self.plain[-1]))
      self._prune_pairing()


def _robust_sd(values) -> float:
  """Standard deviation, at least SD_FLOOR; from three values on at most ROBUST_CAP x 1.4826 x the median absolute
  deviation (one value far off the rest, a stall of the machine, does not widen the bound for many calls)."""
  v = np.asarray(values, np.float64)
  sd = float(np.std(v, ddof=1))
  if len(v) >= 3:
    sd = min(sd, ROBUST_CAP * 1.4826 * float(np.median(np.abs(v - np.median(v)))))
  return max(sd, SD_FLOOR)


_outcomes: dict = {}


def _pooled_alpha(trials) -> float | None:
  acc, rej = (sum(x) for x in zip(*trials)) if trials else (0, 0)
  return acc / (acc + rej) if acc + rej else None


def outcome(models, key, rows: int = 1, family=None) -> Outcome:
  """The :class:`Outcome` record of ``key`` (calls of ``rows`` rows) while ``models`` (part of ``key`` by id) are
  alive; ``family`` (hashable, ids of the same live models) names the keys whose acceptance it pools."""
  for k in [k for k, (refs, _) in _outcomes.items() if any(r() is None for r in refs)]:
    del _outcomes[k]
  entry = _outcomes.get(key)
  if entry is None or any(r() is not m for r, m in zip(entry[0], models)):
    entry = _outcomes[key] = (tuple(weakref.ref(m) for m in models), Outcome(rows, family))
  return entry[1]


def best_block_ms_per_token(table: CostTable, alpha: float) -> tuple[int, float]:
  """(γ >= 1, ms per expected token) of the best block length at acceptance α for every row."""
  v, c = np.asarray(table.verify_ms, np.float64), float(table.draft_ms)
  per = {g: (g * c + v[g + 1]) / expected_block_tokens(alpha, g) for g in range(1, table.max_block_len + 1)}
  g = min(per, key=per.get)
  return g, per[g]


def speculate(table: CostTable, rec: Outcome, probe_first: bool = False) -> tuple[bool, str]:
  """Whether the next call of ``rec``'s key runs the speculative program (else the plain ``ar`` one), and why in
  words (empty when speculation is simply ahead). Pure: :func:`generate` counts the call (``rec.calls``).

  ``probe_first``: a key without a speculative record speculates instead of following the table (a router's loop,
  whose blocks end by its per-draft predictions, is not the table's fixed blocks: at the acceptance where no fixed
  block pays it may still gain, so it is measured once; the record decides from then on)."""
  plain = float(table.plain_ms)
  if not table.has_plain:
    return True, ""
  if rec.speedup is None and probe_first:
    return True, "probing: the first speculative call of this key (a router's blocks are not the table's)"
  if rec.speedup is None:
    fam = rec.family_alpha()
    alpha = PRIOR_ALPHA if fam is None else fam[0]
    g, ms = best_block_ms_per_token(table, alpha)
    if ms < plain:
      return True, ""
    at = (f"even at acceptance {PRIOR_ALPHA}" if fam is None else
          f"at the acceptance {alpha:.2f} that the drafts of {fam[1]} call{'s' if fam[1] > 1 else ''} of these models "
          f"and sampling met")
    return False, (f"speculation off: {at} the best block (γ = {g}) would cost {ms:.2f} ms per token against "
                   f"{plain:.2f} ms for a plain primary step")
  n, mean, sd, bound = len(rec.spec), rec.speedup, rec.spread, rec.bound()
  source = (f"median of the {min(len(rec.plain), NEAREST)} newest of {len(rec.plain)} plain calls" if rec.plain
            else "calibrated")
  measured = (f"the last {n} speculative call{'s' if n > 1 else ''} ran at {mean:.2f}x the plain program's speed "
              f"(spread {sd:.2f}; wall times, plain step {rec.plain_step_ms():.2f} ms, {source})")
  if (mean >= 1.0 or bound >= 1.0) and not rec.plain and mean < 1.0 + CALIBRATION_ERROR:
    return False, (f"speculation off for one call, measuring the plain program: {measured}, within the "
                   f"calibration's error ({CALIBRATION_ERROR:.0%}) of 1x, and this key has not run the plain program")
  plain_bound = rec.plain_bound()
  if bound >= plain_bound and rec.plain and abs(mean - 1.0) < REFRESH_MARGIN and rec.plain_age() >= REFRESH_EVERY:
    return False, (f"speculation off for one call, measuring the plain program again: {measured}, within "
                   f"{REFRESH_MARGIN:.0%} of 1x, and its newest plain call is {rec.plain_age()} calls old (the "
                   f"machine's speed drifts)")
  if mean >= plain_bound:
    return True, ""
  if bound >= plain_bound:
    return True, (f"probing: {measured}, not yet clearly below 1x after {rec.calls} calls (upper bound {bound:.2f}x, "
                  f"the plain program's {plain_bound:.2f}x)")
  if mean >= 1.0 or bound >= 1.0:  # the plain arm's own bound is ahead: its step is measured again
    return False, (f"speculation off for one call, measuring the plain program again: {measured}; its upper bound "
                   f"{bound:.2f}x is below the plain program's {plain_bound:.2f}x ({len(rec.plain)} plain "
                   f"call{'s' if len(rec.plain) > 1 else ''}, spread {rec.plain_spread:.2f}) after {rec.calls} calls")
  return False, (f"speculation off: {measured}, upper bound {bound:.2f}x after {rec.calls} calls, so this call ran "
                 f"the plain program (ar); speculation is re-measured when the bound, which grows with the calls, "
                 f"reaches the plain program's ({plain_bound:.2f}x)")
