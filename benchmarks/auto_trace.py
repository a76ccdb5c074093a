"""What the ``auto`` policy's host switch decides, call by call, on the real-model benchmark's trained models: each
call's wall time, whether it ran the plain ``ar`` program, the key's record after it (the speculative calls' ratios,
the plain calls' measured steps, the upper bound) and the reason it printed. The preset's budget (64 new tokens per
row), γ and router settings come from configs/benchmark.py:smollm2.

  python benchmarks/auto_trace.py WORKDIR [--temperature=1] [--batch=8] [--calls=10] [--plain_ms=MS]
                                          [--router --tau=0.7 --max_block_len=K]

WORKDIR: the workdir of `python -m tandem_jax.benchmark --config=configs/benchmark.py:smollm2` (its ``tandem``).
Prompts: the 24 held-out prompts (tandem_jax.data.heldout) in batches, cycled. The cost table is calibrated on the
decode program as ``generate`` does (printed); ``--plain_ms`` replaces its plain step (e.g. above the calibrated one
to make the first call speculate: the first call follows the table at the prior acceptance, later ones the record).
``--router``: the benchmark's router (WORKDIR/tandem/router.npz, trained by the benchmark with its settings) stops
the blocks at ``--tau`` inside the auto policy, blocks of up to ``--max_block_len`` drafts (Table 4's router-in-auto
cell at batch 1; K defaults to the preset's: its router cap, else its largest γ).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import benchmark as bench_cfg  # noqa: E402

from tandem_jax.data.heldout import PROMPTS  # noqa: E402
from tandem_jax.decoding import SamplingParams, api, costs, generate  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir")
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--plain_ms", type=float, default=None)
  ap.add_argument("--router", action="store_true")
  ap.add_argument("--tau", type=float, default=0.7)
  ap.add_argument("--max_block_len", type=int, default=None)
  args = ap.parse_args(argv)
  run = load_workdir(os.path.join(args.workdir, "tandem"))
  tandem, tok = run.model, run.tokenizer
  held = [tok.encode(p, add_bos=True) for p in PROMPTS[:24]]
  batches = [held[i:i + args.batch] for i in range(0, len(held) - args.batch + 1, args.batch)]
  sampling = SamplingParams(temperature=args.temperature)
  bench = bench_cfg.get_config("smollm2")
  new = int(bench.decode.max_new_tokens)
  k = args.max_block_len or (int(bench.gamma_max) if args.router else max(int(g) for g in bench.decode.gammas))
  extra = {}
  if args.router:  # the benchmark's router, with its settings: reused from WORKDIR, not retrained
    from tandem_jax import recipe_router
    r = bench.router
    extra = dict(router=recipe_router.train_router(os.path.join(args.workdir, "tandem"), steps=int(r.steps),
                                                   gamma_max=int(bench.gamma_max), top_k=int(r.top_k),
                                                   hidden=int(r.hidden),
                                                   sampled_sequences=int(r.sampled_sequences))["router"],
                 threshold=args.tau, max_block_len=k)
  table = api.calibrate_loop("tandem_speed", dict(tandem=tandem), batch_size=args.batch,
                             prompt_len=max(len(p) for p in held), max_new_tokens=new, max_block_len=k,
                             sampling=sampling)
  if args.plain_ms is not None:
    table = table._replace(plain_ms=np.float32(args.plain_ms))
  t = table.as_dict()
  print(f"cost table: verify ms (1..{k + 1} tokens) {[round(v, 2) for v in t['verify_ms']]}, drafter step "
        f"{t['draft_ms']:.2f} ms, plain step {t['plain_ms']:.2f} ms, prefill {t['prefill_ms']:.1f} ms; break-even "
        f"acceptance (drafting starts) {table.break_even_alpha():.3f}", flush=True)
  kw = dict(tandem=tandem, max_new_tokens=new, sampling=sampling, seed=0, block_len=k, policy="auto", costs=table,
            **extra)
  t0 = time.perf_counter()
  for i in range(args.calls):
    r = generate("tandem_speed", batches[i % len(batches)], **kw)
    (_, rec), = costs._outcomes.values()  # the held-out prompts pad to one length (32): one key
    hist = r.stats["gamma_hist"].sum(0).tolist()
    acc, rej = int(r.stats["accepted"].sum()), int(r.stats["rejections"].sum())
    spec = f"speculated (γ histogram {hist}, accepted {acc}, rejections {rej})"
    print(f"call {i}: {r.wall_time:.3f} s{' (built its program: not recorded)' if r.first_run else ''}, "
          f"{'plain' if r.ran_plain else spec}; "
          f"record: ratios "
          f"{np.round(rec.ratios, 3).tolist()}, plain steps (ms) {np.round(rec.plain, 2).tolist()}, bound "
          f"{rec.bound():.3f}; {r.policy_note or 'speculating'}", flush=True)
  print(f"{args.calls} calls in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
