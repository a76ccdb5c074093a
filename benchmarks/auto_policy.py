"""The ``auto`` block-length policy (γ per iteration from the decode loop's own calibration, the plain ``ar`` program
for calls where earlier calls measured speculation below 1x) against ``ar`` and fixed γ, on the real-model
benchmark's trained models. Ratios of median wall times over interleaved repeats (tandem_jax.bench.timing), 64 new
tokens per row.

  python benchmarks/auto_policy.py WORKDIR [--temperatures=0,1] [--batches=1,8,40] [--repeats=2] [--router --tau=0.7]

WORKDIR: the workdir of `python -m tandem_jax.benchmark --config=configs/benchmark.py:smollm2` (its ``tandem``).
Prompts: batch 1 the first 6 held-out prompts (tandem_jax.data.heldout), batch 8 all 24; batch 40 the first 24 tokens
of 40 validation rows of the recipe's cached data (the primary's own continuations of topic prompts, rows the
drafter was not trained on): another corpus, and more rows than the held-out set has.
``--router``: two more cells, Table 4's: the benchmark's router (WORKDIR/tandem/router.npz, trained by the benchmark
with the preset's settings, reused) stopping fixed blocks of up to K drafts at ``--tau``, and the same router inside
the auto policy (K = the preset's router cap, configs/benchmark.py:smollm2); and the router's gate
(``threshold="gate"``: a draft sent only where it pays at its own predicted acceptance), alone and inside auto.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tandem_jax.bench import timing  # noqa: E402
from tandem_jax.data.heldout import PROMPTS  # noqa: E402
from tandem_jax.decoding import SamplingParams, costs  # noqa: E402
from tandem_jax.recipe import validation_prompts  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir")
  ap.add_argument("--temperatures", default="0")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--router", action="store_true")
  ap.add_argument("--tau", type=float, default=0.7)
  args = ap.parse_args(argv)
  tandem_dir = os.path.join(args.workdir, "tandem")
  run = load_workdir(tandem_dir)
  tandem, primary, tok = run.model, run.model.primary, run.tokenizer
  held = [tok.encode(p, add_bos=True) for p in PROMPTS[:24]]
  router = None
  if args.router:  # the benchmark's router, with its settings: reused from WORKDIR, not retrained
    from configs import benchmark as bench_cfg
    from tandem_jax import recipe_router
    bench = bench_cfg.get_config("smollm2")
    r, kmax = bench.router, int(bench.gamma_max)
    router = recipe_router.train_router(tandem_dir, steps=int(r.steps), gamma_max=kmax, top_k=int(r.top_k),
                                        hidden=int(r.hidden), sampled_sequences=int(r.sampled_sequences))["router"]
  rows = []
  for temp in [float(t) for t in args.temperatures.split(",")]:
    common = dict(sampling=SamplingParams(temperature=temp), max_new=64, k=4, seed=0)
    for b in [int(x) for x in args.batches.split(",")]:
      ps = held[:6] if b == 1 else held if b <= 24 else validation_prompts(tandem_dir, b)
      t0 = time.perf_counter()
      cells = {"ar": timing.decode_cell("ar", ps, b, None, models=dict(primary=primary), **common)}
      for g in (1, 2, 3):
        cells[f"fixed γ={g}"] = timing.decode_cell("tandem_speed", ps, b, g, models=dict(tandem=tandem), **common)
      cells["auto (≤ 4)"] = timing.decode_cell("tandem_speed", ps, b, 4, models=dict(tandem=tandem),
                                               policy="auto", costs=None, **common)
      if router is not None:  # Table 4's router cells: τ-stopped blocks of up to K, and inside auto
        rk = dict(common, k=kmax)
        cells["router"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=tandem), router=router,
                                             threshold=args.tau, **rk)
        cells["router in auto"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=tandem),
                                                     router=router, threshold=args.tau, policy="auto", costs=None,
                                                     **rk)
        # the router's gate: a draft sent only where it pays at its own prediction (0 sent: a plain step)
        cells["router gate"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=tandem),
                                                  router=router, threshold="gate", **rk)
        cells["gate in auto"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=tandem),
                                                   router=router, threshold="gate", policy="auto", costs=None, **rk)
      # ar's program again: the spread two cells that cannot differ show in this run
      cells["ar again"] = timing.decode_cell("ar", ps, b, None, models=dict(primary=primary), **common)
      res = timing.interleaved(cells, args.repeats)
      ar = np.median(res["ar"]["times"])
      ratio = {n: float(ar / np.median(r["times"])) for n, r in res.items()}
      auto_run = res["auto (≤ 4)"]["run"]
      best = max((n for n in ratio if n.startswith("fixed")), key=ratio.get)
      rows.append((temp, b, len(ps), ratio, best, auto_run, time.perf_counter() - t0))
      hist = np.asarray(auto_run["gamma_hist"]).tolist()
      if router is not None:
        ra = res["router in auto"]["run"]
        print(f"  router in auto: plain program in {ra['plain_calls']} of {ra['calls']} calls, block caps per "
              f"iteration {np.asarray(ra['gamma_hist']).tolist()}, drafts {int(ra.get('drafted', 0))} (router "
              f"alone {int(res['router']['run'].get('drafted', 0))})", flush=True)
        ga, gg = res["gate in auto"]["run"], res["router gate"]["run"]
        print(f"  router gate: drafts {int(gg.get('drafted', 0))}, primary calls {int(gg.get('primary_calls', 0))}; "
              f"gate in auto: plain program in {ga['plain_calls']} of {ga['calls']} calls, drafts "
              f"{int(ga.get('drafted', 0))}", flush=True)
      print(f"T={temp:g} batch {b} ({len(ps)} prompts): "
            + ", ".join(f"{n} {v:.3f}x" for n, v in ratio.items())
            + f"; auto / best fixed ({best}) {ratio['auto (≤ 4)'] / ratio[best]:.3f}; auto ran the plain program in "
            f"{auto_run['plain_calls']} of {auto_run['calls']} calls, γ per iteration {hist} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  print("\n| T | batch | prompts | ar | ar again | fixed γ=1 | fixed γ=2 | fixed γ=3 | auto | auto / best fixed | "
        "auto calls on ar |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for temp, b, n, ratio, best, auto_run, _ in rows:
    print(f"| {temp:g} | {b} | {n} | 1.000 | {ratio['ar again']:.3f} | {ratio['fixed γ=1']:.3f} | "
          f"{ratio['fixed γ=2']:.3f} | {ratio['fixed γ=3']:.3f} | **{ratio['auto (≤ 4)']:.3f}** | "
          f"{ratio['auto (≤ 4)'] / ratio[best]:.3f} | {auto_run['plain_calls']} / {auto_run['calls']} |")
  if router is not None:
    print(f"\n| T | batch | router τ = {args.tau:g} (K = {kmax}) | router in auto | router gate | gate in auto | "
          "router / best fixed | router in auto / best fixed | gate / best fixed | gate in auto / best fixed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for temp, b, n, ratio, best, _, _ in rows:
      print(f"| {temp:g} | {b} | {ratio['router']:.3f} | {ratio['router in auto']:.3f} | {ratio['router gate']:.3f} | "
            f"**{ratio['gate in auto']:.3f}** | {ratio['router'] / ratio[best]:.3f} | "
            f"{ratio['router in auto'] / ratio[best]:.3f} | {ratio['router gate'] / ratio[best]:.3f} | "
            f"{ratio['gate in auto'] / ratio[best]:.3f} |")
  for key, (_, table) in costs._calibrated.items():
    if key[0] == "loop":
      t = table.as_dict()
      print(f"loop calibration, batch {key[3]}, {key[-3]}: iteration ms for γ = 0.. "
            f"{[round(v + max(g, 1) * t['draft_ms'], 2) for g, v in enumerate(t['verify_ms'])]}; plain ar step "
            f"{t['plain_ms']:.2f} ms, prefill {t['prefill_ms']:.1f} ms")


if __name__ == "__main__":
  main()
