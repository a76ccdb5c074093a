"""benchmarks/router_blocks.py replays the decode loop's router rules in numpy: it must send the drafts the loop's own
rules send (the draft loop's record step in decoding/speculative.py, with ``costs.keeps_drafting``), and account
tokens and costs as the loop does."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import router_blocks  # noqa: E402

from tandem_jax.decoding import costs  # noqa: E402


def loop_sends(rule, a, k, table, tau):
  """Drafts one row sends under the draft loop's record step (speculative.draft, γ = K), in the loop's functions."""
  reach, expect, n, drafting = 1.0, 0.0, 0, True
  for g in range(k):
    if not drafting:
      break
    if rule == "gate":
      drafting = bool(costs.keeps_drafting(np.float32(reach), np.float32(expect), np.float32(a[g]), g, table, k))
      if drafting:
        reach *= a[g]
        expect += reach
    n += int(drafting)
    keep = drafting and g + 1 < k
    if rule == "cost":
      reach *= a[g]
      expect += reach
      keep = keep and bool(costs.keeps_drafting(np.float32(reach), np.float32(expect), np.float32(a[g]), g + 1,
                                                table, k))
    elif rule == "threshold":
      keep = keep and a[g] >= tau
    drafting = keep
  return n


@pytest.mark.parametrize("rule", ["gate", "cost", "threshold"])
def test_replayed_rules_send_what_the_loop_sends(rule):
  rng = np.random.default_rng({"gate": 0, "cost": 1, "threshold": 2}[rule])
  k = 6
  hits = 0
  for case in range(300):
    plain = float(rng.uniform(10, 40))
    verify = plain * np.concatenate([[1.0], 1.0 + np.cumsum(rng.uniform(0.0, 0.3, k))])  # sizes 1..K+1
    draft = float(rng.uniform(0.01, 0.2)) * plain
    as_json = dict(verify_ms=list(verify), draft_ms=draft, plain_ms=plain)
    table = costs.CostTable(verify_ms=np.concatenate([[0.0], verify]).astype(np.float32), draft_ms=np.float32(draft))
    dec = router_blocks.loop_costs(as_json, k)
    np.testing.assert_allclose(dec, np.asarray(costs.iteration_costs(table, k)), rtol=1e-5)
    a = rng.uniform(0, 1, k) ** rng.uniform(0.2, 3)
    tau = float(rng.uniform(0.2, 0.9))
    got = router_blocks.drafts(rule, a, np.zeros(k, bool), k, dec, tau)
    want = loop_sends(rule, a, k, table, tau)
    assert got == want, (case, a, got, want)
    hits += 0 < got < k
  assert hits > 30  # the cases reach stops inside the block, not only its ends


def test_replay_accounts_tokens_and_costs_as_the_loop():
  k = 3
  cost = np.array([10.0, 14.0, 15.0, 16.0])
  y = np.zeros((7, k), bool)
  y[0] = [True, True, False]   # from position 0: 2 accepted, the next block at 3
  y[3] = [False, True, True]   # from 3: none accepted, the next at 4
  y[4] = [True, True, True]    # from 4: all 3, then 8: past the row (7 positions): capped at the end
  rows = [dict(a=np.full((7, k), 0.5), y=y)]
  r = router_blocks.replay(rows, "fixed3", k, cost, cost)
  assert (r["tokens"], r["ms"], r["iters"], r["sent"]) == (3 + 1 + 3, 3 * 16.0, 3, 9)
  o = router_blocks.replay(rows, "oracle", k, cost, cost)  # drafts exactly the accepted: 2, 0, 3
  assert (o["tokens"], o["ms"], o["sent"]) == (7, 15.0 + 10.0 + 16.0, 5)
  assert router_blocks.longest_run(np.array([1, 1, 0, 1, 1, 1, 0], bool)) == (3, 6)
