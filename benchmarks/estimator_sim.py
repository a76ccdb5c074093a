"""The ``auto`` loop's acceptance estimator on synthetic draft outcomes, free of timing noise: how much its γ
choices lose or gain against every fixed γ, per estimator memory (decay) and prior weight.

  python benchmarks/estimator_sim.py [--results=benchmarks/results_smollm2.json --setting=greedy_b1] [--calls=300]

Batch 1, each call ``--tokens`` new tokens from a fresh estimate (the prior α0 with its weight w, as
``generate(policy="auto")`` starts each call); every iteration the estimator's γ maximises expected tokens per ms
over the cost table (``costs.choose_gamma`` at batch 1, mirrored in numpy), the block's drafts are accepted one by
one with the process's acceptance, and the counts decay as ``costs.update_counts`` does. The cost table is the
``auto`` cell's last one in the benchmark results (its iteration ms per γ). Processes: independent outcomes at a
fixed acceptance (what ``benchmarks/router_gate.py`` measured for the real-model drafter: lag-1 autocorrelation
0.04), a per-call acceptance, and acceptance that switches between stretches. Prints speed relative to the best
fixed γ of each process (1.000 = the best fixed γ) and the share of iterations at γ = 0.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tandem_jax.decoding import costs  # noqa: E402


def run(cost, alpha_fn, prior, decay, weight, calls, tokens, seed, fixed=None):
  """(ms per token, share of γ = 0 iterations) over ``calls`` calls; ``fixed``: that γ every iteration."""
  k = len(cost) - 1
  rng = np.random.default_rng(seed)
  ms = emitted = zero = iterations = 0
  for call in range(calls):
    a = r = 0.0
    t = 0
    while t < tokens:
      if fixed is None:
        est = (a + weight * prior) / (a + r + weight)
        g = int(np.argmax(np.cumsum(est ** np.arange(k + 1)) / cost))
      else:
        g = fixed
      alpha = alpha_fn(t, call)
      acc = 0
      while acc < g and rng.random() < alpha:
        acc += 1
      a = decay * a + acc
      r = decay * r + float(0 < g and acc < g)
      t += acc + 1
      ms += cost[g]
      emitted += acc + 1
      iterations += 1
      zero += g == 0
  return ms / emitted, zero / iterations


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results_smollm2.json"))
  p.add_argument("--setting", default="greedy_b1", help="the Table 2 setting whose auto cost table is used")
  p.add_argument("--calls", type=int, default=300)
  p.add_argument("--tokens", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  table = json.load(open(args.results))["table2"][args.setting]["auto"]["table"]
  cost = np.asarray(table["iteration_ms"], np.float64)
  be = table["break_even_alpha"]
  per_call = np.random.default_rng(args.seed + 1).beta(13, 27, size=args.calls)  # mean 0.325, sd 0.073
  processes = {  # name: (acceptance at (new-token index, call), the prior the call starts from)
      f"independent, α 0.33 (prior {table['prior_alpha']:.3f})": (lambda t, c: 0.33, table["prior_alpha"]),
      "independent, α 0.36, prior 0.32": (lambda t, c: 0.36, 0.32),
      f"independent, α 0.30, prior at break-even + {costs.PROBE_MARGIN}": (lambda t, c: 0.30, be + costs.PROBE_MARGIN),
      f"independent, α 0.20, prior at break-even + {costs.PROBE_MARGIN}": (lambda t, c: 0.20, be + costs.PROBE_MARGIN),
      "independent, α 0.10, prior 0.35": (lambda t, c: 0.10, 0.35),
      "per call α ~ Beta(13, 27), prior 0.32": (lambda t, c: per_call[c], 0.32),
      "α 0.1 / 0.6 every 16 tokens, prior 0.35": (lambda t, c: 0.1 if t // 16 % 2 == 0 else 0.6, 0.35),
      "α 0.2 / 0.5 every 32 tokens, prior 0.35": (lambda t, c: 0.2 if t // 32 % 2 == 0 else 0.5, 0.35),
      "independent, α 0.6, prior 0.45": (lambda t, c: 0.6, 0.45),
  }
  estimators = [(0.8, 6.0), (0.9, 10.0), (0.95, 15.0), (0.95, 20.0)]
  if (costs.DECAY, costs.RECORDED_WEIGHT) not in estimators:
    estimators.insert(0, (costs.DECAY, costs.RECORDED_WEIGHT))
  print(f"cost table ({args.setting}): iteration ms for γ = 0..{len(cost) - 1} " + " / ".join(f"{x:.2f}" for x in cost)
        + f", break-even {be:.3f}; {args.calls} calls of {args.tokens} tokens each; speed relative to the best fixed γ"
        f" (share of γ = 0 iterations); the loop's setting: decay {costs.DECAY}, weight {costs.RECORDED_WEIGHT:g}\n")
  print("| process | fixed γ = 0..K | " + " | ".join(f"decay {d}, weight {w:g}" for d, w in estimators) + " |")
  print("|---|---|" + "---|" * len(estimators))
  for name, (fn, prior) in processes.items():
    fixed = [run(cost, fn, prior, 0.0, 1.0, args.calls, args.tokens, args.seed, fixed=g)[0] for g in range(len(cost))]
    best = min(fixed)
    cells = []
    for d, w in estimators:
      ms, zero = run(cost, fn, prior, d, w, args.calls, args.tokens, args.seed)
      cells.append(f"{best / ms:.3f} ({zero:.2f})")
    print(f"| {name} | " + " / ".join(f"{best / x:.3f}" for x in fixed) + " | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
