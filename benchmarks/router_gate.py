"""What a per-token gate between γ = 0 and γ = 1 can gain with a recipe Tandem's router, free of timing noise.

  python benchmarks/router_gate.py TANDEM_DIR [--plain_ms=27.74 --c0_ms=28.54 --c1_ms=36.09]

Where one draft barely pays (acceptance α near the break-even of a 2-token verify), the router's gain over a fixed
γ = 1 comes from drafting only where the draft is likely accepted. This script measures how well the router's
greedy head tells those positions apart, on the recipe's held-out rows (text neither the drafter nor the router
trained on): every position is a block's first draft (the secondary reads the primary's states of every earlier
position), the label is whether the secondary's argmax matches the primary's. It prints the head's AUC and
calibration, then the speed over the plain program of each policy from those outcomes and the iteration costs
given (the decode loop's calibration: ``tandem_jax.decoding.api.calibrate_loop``, printed by
``benchmarks/loop_calibration.py``): a plain step ``plain_ms``, an iteration without a draft ``c0_ms``, with one
``c1_ms`` (defaults: a greedy batch-1 calibration of SmolLM2-135M with the ``cpu_long`` drafter on the 2-core CPU of
BENCHMARKS.md session 24). Policies: fixed γ = 1; the gate at each threshold θ (draft where the predicted
acceptance >= θ); the threshold a cost model picks, α_pred (C1 / C0 - 1) break-even; an oracle that drafts exactly
where the draft is accepted (the bound of any router on this drafter). Last, each row walked in order: the
``auto`` loop's running acceptance estimate choosing γ = 0 or 1 against fixed γ = 1 and a per-row oracle, with the
outcomes' lag-1 autocorrelation (whether a stretch of rejections predicts the next draft's).
"""
import argparse
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tandem_jax import recipe_router  # noqa: E402
from tandem_jax.decoding import costs  # noqa: E402
from tandem_jax.recipe import DATA_DIR, RECIPE_FILE, RecipeConfig, batch_at, split_rows  # noqa: E402
from tandem_jax.recipe_data import target_index  # noqa: E402
from tandem_jax.recipe_router import router_labels  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402


def auc(score, label) -> float:
  """Probability that a random positive scores above a random negative (ties count half)."""
  order = np.argsort(score, kind="stable")
  ranks = np.empty(len(score))
  s = score[order]
  i = 0
  while i < len(s):  # average ranks over ties
    j = i
    while j + 1 < len(s) and s[j + 1] == s[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  pos = label.astype(bool)
  n_pos, n_neg = pos.sum(), (~pos).sum()
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def outcomes(tandem_dir: str, batch: int = 16):
  """(predicted acceptance, accepted, row) per valid held-out position in order, block phase 0."""
  p = positions(tandem_dir, batch)
  return p["router"], p["accepted"], p["row"]


def load_run(tandem_dir: str, sampled: bool = False) -> types.SimpleNamespace:
  """``router`` (the benchmark's, with its settings: reused from the workdir, not retrained, as
  benchmarks/auto_policy.py), ``tandem``, ``data`` (the recipe's cached data, or with ``sampled`` the router's
  sampled continuations), ``rows`` (the rows to score: the recipe's held-out rows, or every sampled row),
  ``target`` (draft-vocabulary targets) and ``router_held_out`` (how many sampled rows the router did not train
  on: the first ones)."""
  from configs import benchmark as bench_cfg

  bench = bench_cfg.get_config("smollm2")
  r = bench.router
  router = recipe_router.train_router(tandem_dir, steps=int(r.steps), gamma_max=int(bench.gamma_max),
                                      top_k=int(r.top_k), hidden=int(r.hidden),
                                      sampled_sequences=int(r.sampled_sequences))["router"]
  tandem = load_workdir(tandem_dir).model
  with open(os.path.join(tandem_dir, RECIPE_FILE)) as fh:
    rc = RecipeConfig(**json.load(fh))

  def load(name):
    d = os.path.join(tandem_dir, name)
    return {k[:-4]: np.load(os.path.join(d, k), mmap_mode="r") for k in os.listdir(d) if k.endswith(".npy")}

  data = load(DATA_DIR)
  draft_ids = np.asarray(data["draft_ids"])
  if sampled:
    data = load(recipe_router.SAMPLED_DIR)
    val_rows = np.arange(len(data["tokens"]))
  else:
    _, val_rows = split_rows(len(data["tokens"]), rc.val_fraction)
  target = target_index(np.asarray(data["labels"]), draft_ids, tandem.primary.cfg.vocab_size)
  return types.SimpleNamespace(router=router, tandem=tandem, data=data, rows=val_rows, target=target,
                               router_held_out=max(1, int(round(int(r.sampled_sequences) * rc.val_fraction))))


def positions(tandem_dir: str, batch: int = 16, features: bool = False, sampled: bool = False) -> dict:
  """Per valid held-out position in order, each a block's first draft (block phase 0): ``router`` (the router's
  predicted acceptance, greedy head), ``accepted`` (the secondary's argmax is the primary's), ``row``, ``pos``;
  ``beta`` (1 - TV(p, q): the probability that speculative sampling at temperature 1 accepts a draft there, p from
  the cached top-k) and ``router_sampled`` (the sampled head's prediction of it). With ``features``, also what the
  decode loop could know when it decides whether to draft there: the secondary's ``entropy``, ``top_p`` (its 8
  largest probabilities) and ``hidden`` (its last layer's output); the primary's ``prev_logp`` (its 8 largest
  log-probabilities at the previous position, the verify call that produced this position's input token) and
  ``prev_hidden`` (its last hidden state there); a row's first position is left out. ``sampled``: every row of the
  primary's sampled continuations (``router_data``, the router's training text; ``row`` < the router's held-out
  count, ``held_out``, marks the rows it did not train on) instead of the recipe's held-out greedy rows."""
  run = load_run(tandem_dir, sampled)
  router, tandem, data, val_rows, target = run.router, run.tandem, run.data, run.rows, run.target
  t_def, t_state = nnx.split(tandem)
  r_def, r_state = nnx.split(router)

  @jax.jit
  def predict(t_state, r_state, tokens, hidden, offset, top_idx, top_logp):
    tandem_, router_ = nnx.merge(t_def, t_state), nnx.merge(r_def, r_state)
    # block length 1: all first drafts
    q, x = tandem_.secondary_forward(tokens, 1, hidden, block_offset_b=offset, return_hidden=True)
    tv, y = jnp.moveaxis(router_labels(q, top_idx, top_logp), -1, 0)  # y 1: the argmaxes differ (greedy rejection)
    flat, emb = q.reshape(-1, q.shape[-1]), tandem_.secondary.output_embedding()
    out = dict(router=router_.accept_prob(flat, emb, greedy=True).reshape(y.shape), accepted=1.0 - y, beta=1.0 - tv,
               router_sampled=router_.accept_prob(flat, emb).reshape(y.shape))
    if features:
      logp = jax.nn.log_softmax(q.astype(jnp.float32), -1)
      out.update(entropy=-jnp.sum(jnp.exp(logp) * logp, -1), top_p=jax.lax.top_k(jnp.exp(logp), 8)[0],
                 hidden=x.astype(jnp.float32))
    return out

  def shifted(a):  # position t - 1's values at t
    return np.concatenate([np.zeros_like(a[:, :1]), a[:, :-1]], 1)

  cols = {}
  for i in range(0, len(val_rows), batch):
    rows = val_rows[i:i + batch]
    b = batch_at(data, rows, target, "tandem", 1, None)
    out = jax.device_get(predict(t_state, r_state, b["tokens"], b["hidden"], b["offset"], b["top_idx"],
                                 b["top_logp"]))
    m = b["mask"] > 0
    out["row"] = np.broadcast_to(np.asarray(rows)[:, None], m.shape)
    out["pos"] = np.broadcast_to(np.arange(m.shape[1])[None], m.shape)
    if features:
      m[:, 0] = False
      out.update(prev_logp=shifted(b["top_logp"][..., :8]), prev_hidden=shifted(b["hidden"][-1]))
    for k, v in out.items():
      cols.setdefault(k, []).append(np.asarray(v)[m])
  out = {k: np.concatenate(v) for k, v in cols.items()}
  if sampled:
    out["held_out"] = out["row"] < run.router_held_out
  return out


def parser(doc: str) -> argparse.ArgumentParser:
  """The arguments of this script and of router_ceiling.py: the Tandem's directory and the iteration costs."""
  ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("tandem_dir")
  ap.add_argument("--plain_ms", type=float, default=27.74)
  ap.add_argument("--c0_ms", type=float, default=28.54)
  ap.add_argument("--c1_ms", type=float, default=36.09)
  return ap


def gate_speed(draft, y, plain, c0, c1) -> float:
  """Speed over the plain program of drafting one token at the positions ``draft`` marks (outcomes ``y``): one
  iteration per position visited, C1 with a draft, C0 without."""
  return plain * (1 + draft * y).sum() / np.where(draft, c1, c0).sum()


def main(argv=None):
  args = parser(__doc__).parse_args(argv)
  a, y, rows = outcomes(args.tandem_dir)
  plain, c0, c1 = args.plain_ms, args.c0_ms, args.c1_ms
  print(f"{len(a)} held-out positions; acceptance {y.mean():.3f}; router predicts {a.mean():.3f} on average; "
        f"AUC {auc(a, y):.3f}")
  for lo, hi in zip(np.linspace(0, 1, 6)[:-1], np.linspace(0, 1, 6)[1:]):
    m = (a >= lo) & (a < hi + (hi == 1))
    if m.any():
      print(f"  predicted [{lo:.1f}, {hi:.1f}): {m.mean():.3f} of positions, acceptance {y[m].mean():.3f}")

  def speed(draft):
    return gate_speed(draft, y, plain, c0, c1)

  table = [("plain program", 1.0), ("γ = 0 every iteration", plain / c0), ("fixed γ = 1", speed(np.ones_like(y)))]
  thetas = np.round(np.arange(0.05, 1.0, 0.05), 2)
  gate = {t: speed((a >= t).astype(float)) for t in thetas}
  best = max(gate, key=gate.get)
  be = c1 / c0 - 1
  table += [(f"gate, best θ = {best:.2f} (in hindsight)", gate[best]),
           (f"gate, θ = break-even {be:.2f} (C1 / C0 - 1)", speed((a >= be).astype(float))),
           ("oracle (drafts exactly the accepted)", speed(y))]
  fixed = table[2][1]
  print("\n| policy | speed over the plain program | over fixed γ = 1 |\n|---|---|---|")
  for name, v in table:
    print(f"| {name} | {v:.3f} | {v / fixed:.3f} |")
  print("\nθ: " + ", ".join(f"{t:.2f} {v:.3f}" for t, v in gate.items()))
  sequential(y, rows, plain, c0, c1)


def sequential(y, rows, plain, c0, c1):
  """The auto policy's running estimate against fixed γ = 1, walking each held-out row in order (an accepted draft
  skips a position), with the loop's own estimator (costs.update_counts / estimate: DECAY, a prior at the rows'
  mean acceptance with RECORDED_WEIGHT) choosing between γ = 0 and 1 at the break-even C1 / C0 - 1; and a per-row
  oracle (γ = 1 on a row exactly when its own acceptance is above break-even). Adapting pays only where acceptance
  varies between stretches of text more than its sampling noise: the lag-1 autocorrelation says how much."""
  seqs = [y[rows == r] for r in np.unique(rows)]
  be, prior = c1 / c0 - 1, float(y.mean())
  lag1 = np.nanmean([np.corrcoef(s[:-1], s[1:])[0, 1] for s in seqs if len(s) > 2 and 0 < s.mean() < 1])
  row_alpha = np.array([s.mean() for s in seqs])
  print(f"\n{len(seqs)} rows in order: acceptance per row 10/50/90% {np.quantile(row_alpha, [0.1, 0.5, 0.9]).round(3)},"
        f" lag-1 autocorrelation of outcomes {lag1:.3f}")

  def walk(policy):  # policy(row, state) -> draft?; returns speed over the plain program
    tokens = ms = 0.0
    for s in seqs:
      state = dict(a=0.0, r=0.0)
      t = 0
      while t < len(s):
        if policy(s, state):
          acc = float(s[t])
          tokens, ms, t = tokens + 1 + acc, ms + c1, t + 1 + int(acc)
          state["a"], state["r"] = costs.DECAY * state["a"] + acc, costs.DECAY * state["r"] + 1 - acc
        else:
          tokens, ms, t = tokens + 1, ms + c0, t + 1
          state["a"], state["r"] = costs.DECAY * state["a"], costs.DECAY * state["r"]
    return plain * tokens / ms

  w = costs.RECORDED_WEIGHT
  fixed = walk(lambda s, st: True)
  auto = walk(lambda s, st: (st["a"] + w * prior) / (st["a"] + st["r"] + w) > be)
  oracle = walk(lambda s, st: s.mean() > be)
  print(f"fixed γ = 1 {fixed:.3f}; the auto estimator (decay {costs.DECAY}, prior {prior:.3f} x {w:g}) {auto:.3f} "
        f"({auto / fixed:.3f} of fixed); per-row oracle {oracle:.3f} ({oracle / fixed:.3f} of fixed)")


if __name__ == "__main__":
  main()
