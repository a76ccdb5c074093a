"""`speed`, `tandem` and `tandem_speed`: one ``lax.while_loop`` skeleton with the drafter as a plug.

Per iteration (PAPER_NOTES §1.6 and §2.1), for every row of the batch at its own position n (tokens the primary
has processed; the pending token t at position n was sampled from the primary but not yet processed by it):
1. the drafter turns t into up to K drafts d_0.. (a fixed block length γ <= K, or until the router says verify);
2. the primary processes [t, d_0, .., d_{K-1}] in one block call: K+1 distributions and, for Tandem, hidden states
   (when drafts per block vary, with the router or a γ below the compiled K, the call is the smallest of the
   compiled sizes (:func:`verify_sizes`) that holds every active row's drafts + 1: a lax.switch, so an early stop
   or a short γ also saves verify work; its branches only read the cache and return the block's keys/values, which
   the loop body writes in place: a branch writing the cache made XLA copy every layer's buffer twice an iteration);
3. Algorithm 1 accepts n_acc drafts and yields the next pending token (replacement or bonus); ``tandem``
   (standalone Tandem, §1.5) instead accepts every draft and takes the primary's free token;
4. the primary's cache is rolled back to n + 1 + n_acc; the drafter is told (Tandem commits the primary's hidden
   states of the accepted positions into the secondary's projected slot).
Rows that finished stop advancing and drafting; the loop ends when every row is done.

Block length policy: ``fixed`` drafts γ = ``block_len`` every iteration (the router may stop earlier); ``auto``
chooses γ in 0..block_len each iteration from running per-row acceptance estimates and a cost table
(:mod:`tandem_jax.decoding.costs`), γ = 0 being a plain primary step (a standalone drafter still reads the pending
token, so its state stays in sync; the Tandem secondary is not called, since its commit writes the primary's states
over that position anyway). The loop runs ``auto`` in segments: its body runs one inner ``lax.while_loop`` per γ
in turn, each iterating while the policy chooses its γ, with the verify call of that one size (γ + 1 positions,
written in place as in a fixed-γ program). An iteration then costs what the fixed-γ program's does, and no
conditional holds the cache. (Choosing the verify size per iteration inside one loop body, a switch over sizes
whose branches only read the cache, cost SmolLM2-135M on the 2-core CPU about 1 ms more per iteration than the
fixed-γ program at batch 1: the block's keys/values padded, returned and written afterwards, and its attention over
two parts; a ``lax.switch`` over segment loops made XLA copy the whole cache into and out of every segment.)
``auto`` with a router: every block runs up to ``block_len`` drafts, ended by the router (its per-draft predictions
know more about this block than the running average does), and ``auto`` chooses per call between this loop and the
plain program (:func:`tandem_jax.decoding.api.generate`). Two earlier rules lost
to the router alone in the real-model benchmark: blocks capped at the γ the average favours (236faf5: 0.99 of the
fixed γ, the router alone 1.02), and the table choosing between γ = 0 and a router's block (1153f7d: γ = 0 on 232 of
343 iterations, 0.91x of ``ar`` against the router alone's 1.02x).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from tandem_jax import cache as kvcache
from tandem_jax.decoding import costs as costs_lib
from tandem_jax.decoding import output, sampling
from tandem_jax.decoding.autoregressive import last_logits


class Drafter(NamedTuple):
  """Pure functions over the drafter's state (a KV cache)."""
  init: Callable   # (prompt_bt, prompt_len_b, primary_hidden) -> state
  begin: Callable  # (state, prev_b, pending_b, n_b) -> (logits_bv, state): first draft of a block
  step: Callable   # (state, token_b) -> (logits_bv, state)
  end: Callable    # (state, block_hidden, n_b, accepted_b) -> state: after the primary's block call
  needs_hidden: bool
  embed: Any       # [N, D] embedding rows of the drafter's logit indices (what the router reads)
  ids: Any = None  # [N] token id of each logit index (a draft vocabulary), None: logits cover the vocabulary
  idle_free: bool = False  # a block of no drafts needs no drafter call: end() overwrites what begin() would write


def standalone_drafter(drafter, capacity: int) -> Drafter:
  """A separate small LM (plain speculative decoding). It re-reads the last verified token with the pending one:
  when every draft was accepted it never processed the last draft, and re-writing an already cached position is
  harmless."""

  def init(prompt, plen, _):
    _, _, cache = drafter.prefill(prompt, plen, drafter.init_cache(prompt.shape[0], capacity))
    return cache

  def begin(cache, prev, pending, n):
    logits, _, cache = drafter.extend(jnp.stack([prev, pending], 1), cache, start_b=n - 1, last_logits=True)
    return logits[:, 0], cache

  def step(cache, token):
    logits, _, cache = drafter.extend(token[:, None], cache)
    return logits[:, 0], cache

  return Drafter(init, begin, step, lambda cache, *_: cache, False, drafter.output_embedding(), drafter.output_ids())


def tandem_drafter(tandem, capacity: int) -> Drafter:
  """The Tandem secondary: projected primary states for verified positions, its own for the current block.

  Its own span starts at the pending token, the first position the primary has not processed, under either
  ``TandemConfig.boundary``: the boundary only decides how decoding blocks align with training blocks
  (``models.tandem.decode_block_offset``; eq2's block starts one earlier, at the last verified token)."""

  def init(prompt, plen, primary_hidden):
    cache = tandem.init_secondary_cache(prompt.shape[0], capacity)
    return tandem.commit(cache, primary_hidden, jnp.zeros_like(plen), plen)

  def begin(cache, prev, pending, n):
    del prev  # the primary's own representation of it is already in the projected slot
    logits, _, cache = tandem.secondary_step(pending[:, None], cache, start_b=n)
    return logits[:, 0], cache

  def step(cache, token):
    logits, _, cache = tandem.secondary_step(token[:, None], cache)
    return logits[:, 0], cache

  def end(cache, hidden, n, accepted):
    return tandem.commit(cache, hidden, n, accepted + 1)

  # idle_free: begin() writes the secondary's own keys of the pending token at n, and end() writes the primary's
  # projected ones over position n (and the verified ones after it) whatever begin wrote: in a block of no drafts
  # (the auto policy's γ = 0) the secondary's call changes nothing, and the loop skips it
  return Drafter(init, begin, step, end, True, tandem.secondary.output_embedding(), tandem.secondary.output_ids(),
                 idle_free=True)


class Stats(NamedTuple):
  primary_calls: jax.Array    # [B] block calls while the row was active (+1 for the prefill)
  secondary_calls: jax.Array  # [B] drafter forward calls while active
  drafted: jax.Array          # [B] drafts proposed
  accepted: jax.Array         # [B] drafts accepted
  block_hist: jax.Array       # [B, K+2] count of iterations that emitted j tokens (j = accepted + 1)
  gamma_hist: jax.Array       # [B, K+1] count of iterations whose block length (drafts allowed) was γ
  drafter_steps: jax.Array    # [B] drafter calls the batch ran while the row was active (wasted ones included)
  rejections: jax.Array       # [B] blocks that ended at a rejected draft (accepted < drafted)


class DraftLoop(NamedTuple):
  """The carry of one block's drafting loop (a drafter step per iteration)."""
  g: jax.Array         # [] int32: drafts made so far in this block (the next one's index)
  token: jax.Array     # [B] the last draft
  dstate: Any          # the drafter's state
  key: jax.Array
  keep: jax.Array      # [B] bool: the row drafts again
  n_draft: jax.Array   # [B] drafts per row
  drafts: jax.Array    # [B, K]
  q: Any               # [B, K, V] the drafter's distributions (None for greedy acceptance)
  calls: jax.Array     # [B] drafter calls while the row was drafting
  reach: Any           # [B] float32: the router's predicted probability that every draft so far is accepted
  expect: Any          # [B] float32: the drafts of this block expected to be accepted (sum of ``reach`` so far);
                       # both None unless the router stops by cost or gates


class DecodeLoop(NamedTuple):
  """The carry of the decode loop (one block per iteration)."""
  em: Any              # output.Emitted: the tokens emitted so far
  cache_l: Any         # the primary's KV cache
  dstate: Any          # the drafter's state
  prev: jax.Array      # [B] the last verified token
  pending: jax.Array   # [B] sampled from the primary, not yet processed by it
  stats: Stats
  counts: tuple        # ([B], [B]) decayed accepted drafts / rejection events (the auto policy)
  trace_buf: jax.Array  # [B, max_new or 0, K+3]
  key: jax.Array
  it: jax.Array        # [] int32 iterations


def verify_sizes(max_block_len: int, with_plain_step: bool = False) -> list[int]:
  """Block sizes a variable-length program compiles its verify call for: every size up to 9 (where a verify's cost
  still grows with its length on CPU), then K + 1; with ``with_plain_step`` also 1 (γ = 0: the router's gate; the
  ``auto`` policy's segments are these sizes' γ)."""
  k = int(max_block_len)
  return sorted({*range(1 if with_plain_step else 2, min(k + 1, 9) + 1), k + 1})


def decode_speculative(primary, drafter: Drafter, prompt_bt, prompt_len_b, max_new_b, key, block_len, *,
                       max_block_len: int, params: sampling.SamplingParams, eos_id, max_new: int,
                       capacity: int, accept_all: bool = False, router=None, threshold=0.8, trace: bool = False,
                       variable_block: bool = False, stream: bool = False, policy: str = "fixed",
                       cost_table: costs_lib.CostTable | None = None, router_stop: str = "threshold"):
  """See the module docstring. ``block_len`` (γ, traced, <= max_block_len = K) may change without recompiling.

  ``variable_block`` (static; implied by ``router``) compiles the verify call for every size of
  :func:`verify_sizes` and runs the smallest that holds the block, so γ < K costs a (γ+1)-token verify; without it
  the primary always verifies K + 1 positions (one verify size: the program for γ = K).

  With ``stream`` the emitted buffer is published to the host after every append (:func:`output.publish`).

  ``policy`` (static): "fixed" or "auto" (needs ``cost_table``, traced: γ chosen per iteration up to ``block_len``,
  see the module docstring: the loop runs in segments of one γ each, γ = 0 a 1-token verify).

  ``router_stop`` (static): how the router ends a block. "threshold": after a draft whose predicted acceptance is
  below ``threshold`` (the paper's τ). "cost" (needs ``cost_table``): after draft n when one more draft does not
  raise the block's expected tokens per ms, from the router's per-draft predictions a_1..a_n (reach R_n = Π a_i,
  expected accepted drafts E_n = Σ R_i) and the table's iteration costs C(n): a row drafts on while
  (1 + E_n + R_n a_n) C(n) > (1 + E_n) C(n + 1), taking the next draft's acceptance to be the last one's
  (:func:`tandem_jax.decoding.costs.keeps_drafting`). "gate" (needs ``cost_table``): the router judges each draft
  before it is sent: draft n + 1 joins the block only when it raises the block's expected tokens per ms at its own
  predicted acceptance a_{n+1} ((1 + E_n + R_n a_{n+1}) C(n) > (1 + E_n) C(n + 1)), else the block is verified
  without it; an unsent first draft makes the iteration a plain primary step (a 1-token verify, compiled in). The
  prediction reads the drafter's distribution, not the sampled draft, so the choice cannot bias acceptance.

  With ``trace`` the stats also hold ``trace`` [B, max_new, K+3]: per iteration the K drafts, the number drafted,
  the number accepted and the primary's token (replacement or bonus), for displaying the draft stream.
  """
  if policy not in ("fixed", "auto"):
    raise ValueError(f"policy must be 'fixed' or 'auto', got {policy!r}")
  if policy == "auto" and cost_table is None:
    raise ValueError("policy 'auto' needs a cost table (tandem_jax.decoding.api.calibrate_loop)")
  if router_stop not in ("threshold", "cost", "gate"):
    raise ValueError(f"router_stop must be 'threshold', 'cost' or 'gate', got {router_stop!r}")
  if router_stop in ("cost", "gate") and (router is None or cost_table is None):
    raise ValueError(f"router_stop {router_stop!r} needs a router and a cost table")
  cost_stop = router is not None and router_stop in ("cost", "gate")
  gate = router is not None and router_stop == "gate"
  auto = policy == "auto"
  b, k, vocab = prompt_bt.shape[0], max_block_len, primary.cfg.vocab_size
  cache_l = primary.init_cache(b, capacity)
  logits, hidden, cache_l = primary.prefill(prompt_bt, prompt_len_b, cache_l, return_hidden=drafter.needs_hidden)
  dstate = drafter.init(prompt_bt, prompt_len_b, hidden)
  key, sub = sampling.split(key, params)
  first, _ = sampling.sample_logits(sub, last_logits(logits, prompt_len_b), params)
  ones = jnp.ones((b,), jnp.int32)
  em = output.append(output.init(b, max_new + k + 1, max_new_b), first[:, None], ones, max_new_b, eos_id)
  if stream:
    output.publish(em)
  zeros = jnp.zeros((b,), jnp.int32)
  stats = Stats(ones, zeros, zeros, zeros, jnp.zeros((b, k + 2), jnp.int32), jnp.zeros((b, k + 1), jnp.int32), zeros,
                zeros)
  counts = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))  # decayed accepted / rejection counts
  trace_buf = jnp.full((b, max_new if trace else 0, k + 3), -1, jnp.int32)
  prev = jnp.take_along_axis(prompt_bt, (prompt_len_b - 1)[:, None], 1)[:, 0]
  block_len = jnp.clip(jnp.asarray(block_len, jnp.int32), 1, k)

  def draft(dstate, prev, pending, n, key, gamma, active):
    """Up to ``gamma`` (<= K) drafts per active row; rows stop there or when the router predicts a rejection.
    Finished rows (``active`` False) do not draft, so they never keep the drafting loop running.

    The first draft is peeled out of the loop so that every loop iteration is exactly one drafter step (no
    ``lax.cond`` around the step, which would make XLA copy the drafter's cache)."""

    def record(g, logits, key, drafting, n_draft, drafts, q, reach, expect):
      with jax.named_scope("draft_sample"):
        key, sub = sampling.split(key, params)
        d, qg = sampling.sample_logits(sub, logits, params)
        if drafter.ids is not None:  # draft vocabulary -> token ids; q is 0 off the draft vocabulary
          d = drafter.ids[d]
          if qg is not None:
            qg = jnp.zeros((b, vocab), jnp.float32).at[:, drafter.ids].set(qg)
      drafts = drafts.at[:, g].set(d)
      if q is not None:  # greedy acceptance needs only the drafts
        q = q.at[:, g].set(qg)
      if router is not None:
        a = router.accept_prob(logits, drafter.embed, params.greedy)  # reads the distribution, not the draft
      if gate:  # sent only where it pays at its own predicted acceptance; the first one unsent: a plain step
        drafting = drafting & costs_lib.keeps_drafting(reach, expect, a, g, cost_table, k)
        reach = jnp.where(drafting, reach * a, reach)
        expect = jnp.where(drafting, expect + reach, expect)
      n_draft = n_draft + drafting.astype(jnp.int32)
      keep = drafting & (g + 1 < gamma)
      if router is not None and not gate:
        if cost_stop:
          reach = reach * a
          expect = expect + reach
          keep = keep & costs_lib.keeps_drafting(reach, expect, a, g + 1, cost_table, k)
        else:
          keep = keep & (a >= threshold)
      return d, key, keep, n_draft, drafts, q, reach, expect

    begun = jnp.int32(1)  # the block's first drafter call ran
    with jax.named_scope("draft"):
      if isinstance(gamma, int) and gamma == 0 and drafter.idle_free:  # an auto segment of plain primary steps:
        # no drafter call (Drafter.idle_free); logits over the drafter's N logit indices, unused
        logits, begun = jnp.zeros((b, drafter.embed.shape[0]), jnp.float32), jnp.int32(0)
      else:
        logits, dstate = drafter.begin(dstate, prev, pending, n)
    q = None if params.greedy else jnp.zeros((b, k, vocab), jnp.float32)
    reach, expect = (jnp.ones((b,), jnp.float32), jnp.zeros((b,), jnp.float32)) if cost_stop else (None, None)
    d, key, keep, n_draft, drafts, q, reach, expect = record(0, logits, key, active & (gamma > 0), zeros,
                                                             jnp.zeros((b, k), jnp.int32), q, reach, expect)

    def cond(c: DraftLoop):
      return (c.g < k) & jnp.any(c.keep)

    def body(c: DraftLoop):
      with jax.named_scope("draft"):
        logits, dstate = drafter.step(c.dstate, c.token)
      calls = c.calls + c.keep.astype(jnp.int32)
      d, key, keep, n_draft, drafts, q, reach, expect = record(c.g, logits, c.key, c.keep, c.n_draft, c.drafts,
                                                               c.q, c.reach, c.expect)
      return DraftLoop(c.g + 1, d, dstate, key, keep, n_draft, drafts, q, calls, reach, expect)

    c = jax.lax.while_loop(cond, body, DraftLoop(jnp.int32(1), d, dstate, key, keep, n_draft, drafts, q,
                                                 ones * begun, reach, expect))
    return c.dstate, c.n_draft, c.drafts, c.q, c.calls, c.g * begun

  # Verify-call sizes of a variable-length program (a lax.switch branch each). Each branch accepts on its own
  # positions (no logits padded to K+1, nothing computed for positions it did not verify); the hidden states are
  # padded to K+1 positions for the drafter's commit, which never reads past a row's accepted ones + 1.
  # ``auto`` without a router runs segments instead (below): every segment's verify has one size, γ + 1, and the
  # policy chooses among the γ of the sizes a variable program would compile (every γ up to 8, and K): a segment
  # each
  segments = auto and router is None
  gammas = [s - 1 for s in verify_sizes(k, with_plain_step=True)]
  sizes = verify_sizes(k, with_plain_step=gate)
  variable = (router is not None or variable_block) and len(sizes) > 1 and not segments

  def verify_call(size, defer=False):
    """The primary's verify call for ``size`` positions. ``defer`` (a ``lax.switch`` branch): the cache is only read
    and the block's keys/values come back padded to K + 1 positions, written by the loop body in place (a branch
    writing into its cache operand makes XLA copy the whole cache twice per iteration: in the branch, and back into
    the loop's carry)."""
    def call(block, cache_l, drafts, n_draft, q, key):
      with jax.named_scope("verify"):
        logits, hidden, out = primary.extend(block[:, :size], cache_l, return_hidden=drafter.needs_hidden,
                                             write="defer" if defer else True)
      with jax.named_scope("accept"):
        accepted, nxt = accept(logits, drafts[:, :size - 1], n_draft, None if q is None else q[:, :size - 1], key)
      pad = k + 1 - size
      if pad and hidden is not None:
        hidden = jnp.pad(hidden, ((0, 0), (0, 0), (0, pad), (0, 0)))
      if pad and defer:  # [.., B, T, K, H] per layer (stacked: a leading layer axis): T padded to K + 1
        out = jax.tree.map(lambda x: jnp.pad(x, [(0, pad if a == x.ndim - 3 else 0) for a in range(x.ndim)]), out)
      return accepted, nxt, hidden, out
    return call

  def accept(logits, drafts, n_draft, q, key):
    """Acceptance over the verified positions [B, s, V] of a call for s - 1 drafts (every row's n_draft < s)."""
    if accept_all:
      return n_draft, sampling.sample_logits(key, logits[jnp.arange(b), n_draft], params)[0]
    if params.greedy:
      return sampling.greedy_accept(logits, drafts, n_draft)
    return sampling.speculative_accept(key, sampling.probs(logits, params), q, drafts, n_draft, uniform_width=k)

  def cond(c: DecodeLoop):
    return jnp.any(~c.em.done) & (c.it < max_new)

  def choose(c: DecodeLoop):
    """The auto policy's γ for the next iteration (:func:`costs_lib.choose_gamma`)."""
    return costs_lib.choose_gamma(costs_lib.estimate(*c.counts, cost_table), ~c.em.done, cost_table, k,
                                  cap=block_len, remaining_b=jnp.maximum(max_new_b - c.em.count, 1),
                                  allowed=gammas)

  def iteration(c: DecodeLoop, gamma, size=None):
    """One block of up to ``gamma`` drafts per active row. ``size`` (static): the verify call's positions; None:
    the program's one size K + 1, or the smallest compiled size holding the block (a variable-length program)."""
    em, cache_l, dstate, prev, pending, stats, counts, trace_buf, key, it = c
    active = ~em.done
    n = cache_l.lengths
    key, k_draft, k_accept = sampling.split(key, params, 3)
    dstate, n_draft, drafts, q, calls, steps = draft(dstate, prev, pending, n, k_draft, gamma, active)
    block = jnp.concatenate([pending[:, None], drafts], 1)
    args = (block, cache_l, drafts, n_draft, q, k_accept)
    if size is not None or not variable:
      accepted, nxt, hidden, cache_l = verify_call(k + 1 if size is None else size)(*args)
    else:  # the primary verifies the smallest size holding every active row's drafts + 1
      need = jnp.max(jnp.where(active, n_draft, 0)) + 1
      branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need).astype(jnp.int32)
      accepted, nxt, hidden, (new_k, new_v) = jax.lax.switch(branch, [verify_call(s, defer=True) for s in sizes],
                                                             *args)
      with jax.named_scope("verify"):  # the block's keys/values from n (padding past the verified ones: stale slots)
        cache_l = cache_l.replace(k=kvcache.write_layers(cache_l.k, new_k, n),
                                  v=kvcache.write_layers(cache_l.v, new_v, n))
    with jax.named_scope("accept"):
      accepted = jnp.where(active, accepted, 0)
    cache_l = cache_l.with_lengths(jnp.where(active, n + 1 + accepted, n))
    with jax.named_scope("commit"):
      dstate = drafter.end(dstate, hidden, n, accepted)
    new = jnp.where(jnp.arange(k + 1)[None] < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    with jax.named_scope("append"):
      em = output.append(em, new, accepted + 1, max_new_b, eos_id)
    if stream:
      output.publish(em)
    a = active.astype(jnp.int32)
    stats = Stats(stats.primary_calls + a, stats.secondary_calls + a * calls, stats.drafted + a * n_draft,
                  stats.accepted + a * accepted,
                  stats.block_hist + a[:, None] * jax.nn.one_hot(accepted + 1, k + 2, dtype=jnp.int32),
                  stats.gamma_hist + a[:, None] * jax.nn.one_hot(gamma, k + 1, dtype=jnp.int32),
                  stats.drafter_steps + a * steps, stats.rejections + a * (accepted < n_draft))
    if segments:  # only the table's per-iteration choice reads them
      counts = costs_lib.update_counts(accepted, accepted < n_draft, n_draft, active, *counts)
    new_prev = jnp.where(accepted > 0, jnp.take_along_axis(drafts, jnp.maximum(accepted - 1, 0)[:, None], 1)[:, 0],
                         pending)
    prev = jnp.where(active, new_prev, prev)
    pending = jnp.where(active, nxt, pending)
    if trace:
      row = jnp.concatenate([drafts, n_draft[:, None], accepted[:, None], nxt[:, None]], 1)
      trace_buf = trace_buf.at[:, it].set(jnp.where(active[:, None], row, -1))
    return DecodeLoop(em, cache_l, dstate, prev, pending, stats, counts, trace_buf, key, it + 1)

  if segments:
    def body(c: DecodeLoop):
      # one inner loop per γ, in turn, each iterating while the policy chooses its γ: the chosen one runs at least
      # once (the loops before it see the state unchanged), and no conditional holds the cache (a lax.switch over
      # segments made XLA copy the whole cache into and out of every segment)
      for g in gammas:
        c = jax.lax.while_loop(lambda c, g=g: cond(c) & (choose(c) == g),
                               lambda c, g=g: iteration(c, g, size=g + 1), c)
      return c
  else:  # fixed; or auto with a router, whose per-draft predictions end every block (auto switches whole calls)
    def body(c: DecodeLoop):
      return iteration(c, block_len)

  c = jax.lax.while_loop(cond, body, DecodeLoop(em, cache_l, dstate, prev, first, stats, counts, trace_buf, key,
                                                jnp.int32(0)))
  out = c.stats._asdict()
  if trace:
    out["trace"] = c.trace_buf
  return c.em, out
