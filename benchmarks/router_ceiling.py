"""How well can anything the decode loop knows predict a draft's acceptance, and how well would it have to?

  python benchmarks/router_ceiling.py TANDEM_DIR [--plain_ms=27.74 --c0_ms=28.54 --c1_ms=36.09 --target=1.04]

Where a verify call costs about the same for 2 to 5 tokens (the 2-core CPU of BENCHMARKS.md), a router gains over
a fixed block length only by not drafting where the first draft would be rejected (``benchmarks/router_gate.py``);
how much it gains is set by how well its score ranks accepted above rejected drafts (AUC). This script answers two
questions on the recipe's held-out rows (every position a block's first draft, the greedy label: does the
secondary's argmax match the primary's; :func:`router_gate.positions`):

1. **What ranking is available.** Linear probes (logistic regression) fit on half of the rows and scored on the
   other half, on growing sets of what the loop could read when it decides: the secondary's confidence (entropy,
   its 8 largest probabilities and their logs), its last layer's output, the primary's 8 largest log-probabilities
   at the previous position (the verify call that produced the draft's input token) and the primary's last hidden
   state there; each probe with the best of a few L2 penalties on the scored half (chosen in hindsight, so its AUC
   is if anything overstated: a ceiling for a linear read of these signals). Beside them: the router (an MLP on
   the secondary's distribution and top-k embeddings, trained on other text) and the secondary's top-1
   probability alone.
2. **What ranking the target needs.** The router's logit sharpened toward the label, ``logit(a) + λ (2y - 1)``
   for growing λ: the AUC of each and the speed of the best gate with it (drafting where the score clears a
   threshold chosen in hindsight), over fixed γ = 1, at the iteration costs given (router_gate's defaults); the
   first AUC at which the gate reaches ``--target`` of fixed γ = 1. Loop overhead is not counted, so the true need
   is higher.
3. **Sampling (T = 1).** A draft is accepted with probability β = 1 - TV(p, q), and a gate that decides before
   drafting can know at most β: the gate that knows each position's β exactly (on the primary's sampled
   continuations, the router's training text) bounds any router there; beside it the router's sampled head on its
   held-out rows. Speeds are expected ones (β tokens per draft), at the same iteration costs.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from router_gate import auc, gate_speed, parser, positions  # noqa: E402


def feature_sets(p: dict) -> dict:
  """Name -> [N, F] features, each set adding to the one before."""
  conf = np.concatenate([p["entropy"][:, None], p["top_p"], np.log(p["top_p"] + 1e-9)], 1)
  drafter = np.concatenate([conf, p["hidden"]], 1)
  primary_conf = np.concatenate([p["prev_logp"], np.exp(p["prev_logp"])], 1)
  return {"secondary's confidence (17)": conf,
          "+ primary's confidence at t - 1 (33)": np.concatenate([conf, primary_conf], 1),
          f"+ secondary's last layer ({17 + p['hidden'].shape[1]})": drafter,
          f"+ both, + primary's hidden at t - 1 ({33 + p['hidden'].shape[1] + p['prev_hidden'].shape[1]})":
              np.concatenate([drafter, primary_conf, p["prev_hidden"]], 1)}


PENALTIES = (1e-2, 3e-2, 1e-1, 3e-1)


def linear_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, penalty: float, steps: int = 1500) -> np.ndarray:
  """Logistic regression on the ``train`` positions (standardised features, full-batch Adam, an L2 ``penalty`` on the
  weights); returns the scores of every position."""
  mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
  xs = jnp.asarray((x - mu) / sd, jnp.float32)
  xt, yt = xs[train], jnp.asarray(y[train], jnp.float32)
  params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
  tx = optax.adam(3e-3)

  def loss(p):
    return optax.sigmoid_binary_cross_entropy(xt @ p["w"] + p["b"], yt).mean() + penalty * jnp.sum(p["w"] ** 2)

  @jax.jit
  def step(p, opt):
    updates, opt = tx.update(jax.grad(loss)(p), opt, p)
    return optax.apply_updates(p, updates), opt

  opt = tx.init(params)
  for _ in range(steps):
    params, opt = step(params, opt)
  return np.asarray(xs @ params["w"] + params["b"])


def gate_over_fixed(score, y, plain, c0, c1) -> float:
  """The best gate's speed over fixed γ = 1 (thresholds at the score's percentiles, chosen in hindsight)."""
  thresholds = np.quantile(score, np.linspace(0.01, 0.99, 99))
  best = max(gate_speed((score >= t).astype(float), y, plain, c0, c1) for t in thresholds)
  return best / gate_speed(np.ones_like(y), y, plain, c0, c1)


def main(argv=None):
  ap = parser(__doc__)
  ap.add_argument("--target", type=float, default=1.04)
  args = ap.parse_args(argv)
  p = positions(args.tandem_dir, features=True)
  y = p["accepted"]
  rows = np.unique(p["row"])
  train_rows = np.random.default_rng(0).choice(rows, len(rows) // 2, replace=False)
  train = np.isin(p["row"], train_rows)
  test = ~train
  print(f"{len(y)} held-out positions of {len(rows)} rows (a row's first left out); acceptance {y.mean():.3f}; "
        f"probes fit on {train.sum()} positions ({len(train_rows)} rows), scored on the other {test.sum()}")
  print("\n| score | AUC on the scored half | best gate / fixed γ = 1 |\n|---|---|---|")
  plain, c0, c1 = args.plain_ms, args.c0_ms, args.c1_ms
  for name, s in [("the router (its greedy head)", p["router"]), ("secondary's top-1 probability", p["top_p"][:, 0])]:
    print(f"| {name} | {auc(s[test], y[test]):.3f} | {gate_over_fixed(s[test], y[test], plain, c0, c1):.3f} |")
  for name, x in feature_sets(p).items():
    scores = [linear_probe(x, y, train, c)[test] for c in PENALTIES]
    areas = [auc(s, y[test]) for s in scores]
    i = int(np.argmax(areas))
    print(f"| linear probe: {name}, L2 {PENALTIES[i]:g} | {areas[i]:.3f} | "
          f"{gate_over_fixed(scores[i], y[test], plain, c0, c1):.3f} |")

  a = np.clip(p["router"], 1e-6, 1 - 1e-6)
  logit = np.log(a / (1 - a))
  print(f"\nThe router's logit sharpened toward the label (all positions; costs plain {plain}, C0 {c0}, C1 {c1} ms):")
  print("\n| λ | AUC | best gate / fixed γ = 1 |\n|---|---|---|")
  needed = None
  for lam in np.round(np.arange(0.0, 1.01, 0.05), 2):
    s = logit + lam * (2 * y - 1)
    area, gain = auc(s, y), gate_over_fixed(s, y, plain, c0, c1)
    if lam in (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0):
      print(f"| {lam:.2f} | {area:.3f} | {gain:.3f} |")
    if needed is None and gain >= args.target:
      needed = (area, gain, lam)
  if needed:
    print(f"\nThe gate first reaches {args.target} of fixed γ = 1 at AUC {needed[0]:.3f} ({needed[1]:.3f}, λ = "
          f"{needed[2]:.2f}), before any loop overhead.")
  else:
    print(f"\nNo sharpening up to λ = 1 reaches {args.target} of fixed γ = 1 at these costs.")
  sampled_bound(args.tandem_dir, plain, c0, c1)


def sampled_bound(tandem_dir: str, plain: float, c0: float, c1: float) -> None:
  """Speculative sampling at temperature 1, on the primary's sampled continuations: a draft at a position is accepted
  with probability β = 1 - TV(p, q), and a gate deciding before it drafts can know at most β (the draft and the
  uniform draw come after). The gate that knows β exactly bounds every router there."""
  p = positions(tandem_dir, sampled=True)
  beta, held = p["beta"], p["held_out"]
  print(f"\nT = 1: {len(beta)} positions of the primary's sampled continuations ({len(np.unique(p['row']))} rows, "
        f"{held.sum()} positions on the router's {len(np.unique(p['row'][held]))} held-out rows); mean β "
        f"{beta.mean():.3f}\n\n| gate | rows | expected speed / fixed γ = 1 |\n|---|---|---|")
  for name, m in [("all", np.ones_like(held)), ("the router's held-out", held)]:
    print(f"| knows β exactly (best threshold) | {name} | {gate_over_fixed(beta[m], beta[m], plain, c0, c1):.3f} |")
  print(f"| the router's sampled head (best threshold) | the router's held-out | "
        f"{gate_over_fixed(p['router_sampled'][held], beta[held], plain, c0, c1):.3f} |")


if __name__ == "__main__":
  main()
