"""What a router can gain over a fixed block length on whole blocks: exact greedy chains, free of timing noise.

  python benchmarks/router_blocks.py TANDEM_DIR [--results=benchmarks/results_smollm2.json --setting=greedy_b1]

``router_gate.py`` and ``router_ceiling.py`` judge a block's first draft only. This script replays whole blocks. On
the recipe's held-out rows that are the primary's own greedy continuation (there, teacher forcing feeds the
secondary exactly what greedy decoding feeds it while its drafts are accepted), the Tandem's secondary runs in block
mode once per block phase (K passes, K the router's γ_max): for a block starting at any position s this gives the
secondary's argmax and the router's predicted acceptance at depths 0..K-1, as the decode loop computes them (the
secondary reads the primary's states of positions < s and its own from s on). Each row's continuation is then
walked block by block under each policy:

- fixed γ = 1..K;
- the router ending a block after a draft it predicts below τ (the paper's rule, ``generate --adaptive``);
- the router's cost-aware stop and gate (``threshold="cost"`` / ``"gate"``: ``costs.keeps_drafting``, the gate
  also sending no draft at all, a γ = 0 iteration, where the first does not pay);
- an oracle that drafts exactly the drafts that will be accepted (none where the first would be rejected): the bound
  of any router on this drafter;
- the router's logit sharpened toward the outcome, ``logit(a) + λ (2 y - 1)``, under the best of those rules: how
  sharp a router would have to be.

An iteration that drafts g tokens costs the table's ``iteration_ms[g]`` (the decode loop's calibration, as recorded
by the benchmark run: ``head_to_head.<setting>.router_auto.table`` of ``--results``); the rules decide with the
loop's own ``costs.iteration_costs``. Speeds are tokens per ms over the plain program's (``plain_ms`` a token).
Last, the same replay at what-if costs (hypothetical, not measured anywhere): the drafter step at a larger share of
a plain step, and a verify call whose cost grows linearly with its length, each position past the first at a fixed
share of a plain step, instead of this CPU's step from 1 to 2 tokens and flat cost up to 5: where a router's gain
over fixed γ comes from. Greedy only (a sampled chain has no teacher-forced replay).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from router_gate import auc, load_run  # noqa: E402

from tandem_jax.decoding import costs  # noqa: E402
from tandem_jax.recipe import batch_at  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0)


def chains(tandem_dir: str, k: int, batch: int = 16) -> list[dict]:
  """Per held-out row whose continuation is the primary's greedy one: ``a`` [n, K] (the router's prediction for the
  draft at depth i of a block starting at the run's position j) and ``y`` [n, K] (that draft is the primary's
  argmax), over the row's longest stretch of greedy-continuation positions (n of them)."""
  run = load_run(tandem_dir)
  if run.tandem.tandem_cfg.boundary != "fig1":  # a block's first own position is then its start (own_start)
    raise ValueError(f"{tandem_dir}: boundary {run.tandem.tandem_cfg.boundary!r}; this replay reads 'fig1' blocks")
  data, rows = run.data, run.rows
  t_def, t_state = nnx.split(run.tandem)
  r_def, r_state = nnx.split(run.router)

  @jax.jit
  def predict(t_state, r_state, tokens, hidden, offset, target):
    tandem, router = nnx.merge(t_def, t_state), nnx.merge(r_def, r_state)
    q = tandem.secondary_forward(tokens, k, hidden, block_offset_b=offset)
    a = router.accept_prob(q.reshape(-1, q.shape[-1]), tandem.secondary.output_embedding(), greedy=True)
    return a.reshape(q.shape[:2]), jnp.argmax(q, -1) == target

  out = []
  for i in range(0, len(rows), batch):
    r = rows[i:i + batch]
    b = batch_at(data, r, run.target, "tandem", 1, None)
    n, t = b["tokens"].shape
    a_all = np.zeros((n, t, k), np.float32)  # [row, block start s, depth]
    y_all = np.zeros((n, t, k), bool)
    for phase in range(k):
      a, y = jax.device_get(predict(t_state, r_state, b["tokens"], b["hidden"], np.full((n,), phase, np.int32),
                                    b["target"]))
      p = np.arange(t)
      s = phase + np.floor_divide(p - phase, k) * k
      ok = s >= 0
      a_all[:, s[ok], (p - s)[ok]] = a[:, ok]
      y_all[:, s[ok], (p - s)[ok]] = y[:, ok]
    tokens, labels = np.asarray(data["tokens"][r]), np.asarray(data["labels"][r])
    valid = np.asarray(data["valid"][r])
    on = (tokens[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]  # position p's next token is the argmax
    for j in range(n):
      start, best = longest_run(on[j])
      if best - start >= 2 * k:
        length = best - start
        # depths past the stretch's end read text that is not the continuation: never accepted
        depth_ok = (np.arange(length)[:, None] + np.arange(k)[None, :]) < length
        out.append(dict(a=a_all[j, start:best], y=y_all[j, start:best] & depth_ok))
  return out


def longest_run(mask: np.ndarray) -> tuple[int, int]:
  """[start, end) of the longest stretch of True."""
  best, cur = (0, 0), None
  for i, m in enumerate(list(mask) + [False]):
    if m and cur is None:
      cur = i
    elif not m and cur is not None:
      if i - cur > best[1] - best[0]:
        best = (cur, i)
      cur = None
  return best


def loop_costs(table: dict, k: int) -> np.ndarray:
  """[K + 1]: the decode loop's decision costs of a results-JSON table (its ``verify_ms`` from size 1):
  ``costs.iteration_costs``, max(g, 1) drafter steps + a g+1 verify."""
  t = costs.CostTable(verify_ms=np.concatenate([[0.0], table["verify_ms"]]).astype(np.float32),
                      draft_ms=np.float32(table["draft_ms"]))
  return np.asarray(costs.iteration_costs(t, k), np.float64)


def drafts(rule: str, a: np.ndarray, y: np.ndarray, k: int, dec: np.ndarray, tau: float = 0.8) -> int:
  """How many drafts the block starting here sends to the verifier under ``rule`` (a, y: depths 0..K-1)."""
  if rule == "oracle":
    return int(np.argmin(np.append(y, False)))  # the leading accepted ones
  if rule.startswith("fixed"):
    return int(rule[5:])
  if rule == "threshold":  # the first draft always; stop after one predicted below τ
    below = np.nonzero(a[:k - 1] < tau)[0]
    return int(below[0]) + 1 if len(below) else k
  reach, expect, n = 1.0, 0.0, 0
  for g in range(k):
    if rule == "gate":  # a draft is sent only where it pays at its own prediction
      if not (1.0 + expect + reach * a[g]) * dec[g] > (1.0 + expect) * dec[g + 1]:
        return n
      n, reach = n + 1, reach * a[g]
      expect += reach
    else:  # "cost": the draft is sent; another follows while it pays at this one's prediction
      n, reach = n + 1, reach * a[g]
      expect += reach
      if n >= k or not (1.0 + expect + reach * a[g]) * dec[n] > (1.0 + expect) * dec[n + 1]:
        return n
  return n


def replay(rows: list[dict], rule: str, k: int, dec: np.ndarray, cost: np.ndarray, tau: float = 0.8,
           lam: float | None = None) -> dict:
  """Walks every row's continuation block by block; tokens, milliseconds, iterations and the drafts sent."""
  tokens = ms = iters = sent = 0.0
  for r in rows:
    a, y = r["a"], r["y"]
    if lam is not None:
      c = np.clip(a, 1e-6, 1 - 1e-6)
      a = 1.0 / (1.0 + np.exp(-(np.log(c / (1 - c)) + lam * (2.0 * y - 1.0))))
    s = 0
    while s < len(a):
      n = drafts(rule, a[s], y[s], k, dec, tau)
      m = int(np.argmin(np.append(y[s, :n], False)))  # accepted: the leading matches among those sent
      m = min(m, len(a) - 1 - s)
      tokens, ms, iters, sent = tokens + m + 1, ms + cost[n], iters + 1, sent + n
      s += m + 1
  return dict(tokens=tokens, ms=ms, iters=iters, sent=sent)


def speed(res: dict, plain_ms: float) -> float:
  return plain_ms * res["tokens"] / res["ms"]


def compare(rows, k, dec, cost, plain_ms) -> dict:
  """Speeds over the plain program of every policy; the router rules at their best τ / sharpening in hindsight."""
  out = {f"fixed γ = {g}": speed(replay(rows, f"fixed{g}", k, dec, cost), plain_ms) for g in range(1, k + 1)}
  out["router, τ = 0.8 (paper)"] = speed(replay(rows, "threshold", k, dec, cost, 0.8), plain_ms)
  taus = {t: speed(replay(rows, "threshold", k, dec, cost, t), plain_ms) for t in THRESHOLDS}
  best_tau = max(taus, key=taus.get)
  out[f"router, best τ = {best_tau} (hindsight)"] = taus[best_tau]
  out["router, cost-aware stop"] = speed(replay(rows, "cost", k, dec, cost), plain_ms)
  out["router, cost-aware gate"] = speed(replay(rows, "gate", k, dec, cost), plain_ms)
  out["oracle (drafts exactly the accepted)"] = speed(replay(rows, "oracle", k, dec, cost), plain_ms)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("tandem_dir")
  here = os.path.dirname(os.path.abspath(__file__))
  ap.add_argument("--results", default=os.path.join(here, "results_smollm2.json"))
  ap.add_argument("--setting", default="greedy_b1", help="head_to_head setting whose router_auto table to use")
  ap.add_argument("--k", type=int, default=6, help="γ_max (the benchmark's gamma_max)")
  ap.add_argument("--target", type=float, default=1.04)
  args = ap.parse_args(argv)
  with open(args.results) as fh:
    table = json.load(fh)["head_to_head"][args.setting]["router_auto"]["table"]
  k = args.k
  if len(table["verify_ms"]) < k + 1:
    raise ValueError(f"the table has verify costs for {len(table['verify_ms'])} sizes; K = {k} needs {k + 1}")
  plain = float(table["plain_ms"])
  cost = np.asarray(table["iteration_ms"][:k + 1], np.float64)
  dec = loop_costs(table, k)
  rows = chains(args.tandem_dir, k)
  a = np.concatenate([r["a"] for r in rows])
  y = np.concatenate([r["y"] for r in rows])
  reached = np.concatenate([np.cumprod(np.concatenate([np.ones((len(r["y"]), 1), bool), r["y"][:, :-1]], 1), 1)
                            for r in rows]).astype(bool)  # every earlier draft of the block accepted
  print(f"{len(rows)} held-out rows of greedy continuation, {len(a)} block starts, K = {k}; costs "
        f"({args.setting}): plain {plain:.2f} ms, iteration for γ = 0..{k} "
        f"{' / '.join(f'{c:.2f}' for c in cost)} ms")
  print("\nper depth, over blocks whose earlier drafts were all accepted: acceptance, the router's mean prediction, "
        "AUC")
  for i in range(k):
    m = reached[:, i]
    print(f"  depth {i}: {m.sum():6d} drafts, acceptance {y[m, i].mean():.3f}, predicted {a[m, i].mean():.3f}, "
          f"AUC {auc(a[m, i], y[m, i]):.3f}")

  res = compare(rows, k, dec, cost, plain)
  best_fixed = max(v for n, v in res.items() if n.startswith("fixed"))
  print("\n| policy | speed over the plain program | over the best fixed γ |\n|---|---|---|")
  for name, v in res.items():
    print(f"| {name} | {v:.3f} | {v / best_fixed:.3f} |")

  print(f"\nThe router's logit sharpened toward the outcome (the best of τ / cost / gate at each λ):")
  print("\n| λ | AUC at depth 0 | over the best fixed γ |\n|---|---|---|")
  for lam in LAMBDAS:
    c = np.clip(a[:, 0], 1e-6, 1 - 1e-6)
    s = np.log(c / (1 - c)) + lam * (2.0 * y[:, 0] - 1.0)
    best = max([speed(replay(rows, "threshold", k, dec, cost, t, lam), plain) for t in THRESHOLDS]
               + [speed(replay(rows, rule, k, dec, cost, lam=lam), plain) for rule in ("cost", "gate")])
    print(f"| {lam:g} | {auc(s, y[:, 0]):.3f} | {best / best_fixed:.3f} |")

  print("\nWhat-if costs (the same chains; the drafter step as a share of a plain step, and the verify call's "
        "growth):\n\n| drafter step / plain step | verify for n tokens | best fixed γ (over plain) | router best τ |"
        " router cost stop | router gate | oracle |\n|---|---|---|---|---|---|---|")
  overhead = cost - loop_costs(table, k)  # the loop's bookkeeping beyond drafter steps and the verify call
  shapes = {"this CPU's (measured)": np.asarray(table["verify_ms"][:k + 1], np.float64)}
  for slope in (0.05, 0.15):
    shapes[f"plain x (1 + {slope} (n - 1))"] = plain * (1.0 + slope * np.arange(k + 1))
  for share in (table["draft_ms"] / plain, 0.05, 0.1, 0.2):
    for shape, verify in shapes.items():
      t = dict(table, draft_ms=share * plain, verify_ms=list(verify))
      d = loop_costs(t, k)
      r = compare(rows, k, d, d + overhead, plain)
      bf = max(v for n, v in r.items() if n.startswith("fixed"))
      gf = max(range(1, k + 1), key=lambda g: r[f"fixed γ = {g}"])
      tau = next(v for n, v in r.items() if n.startswith("router, best τ"))
      print(f"| {share:.3f} | {shape} | {bf:.3f} (γ = {gf}) | {tau / bf:.3f} | "
            f"{r['router, cost-aware stop'] / bf:.3f} | {r['router, cost-aware gate'] / bf:.3f} | "
            f"{r['oracle (drafts exactly the accepted)'] / bf:.3f} |")


if __name__ == "__main__":
  main()
