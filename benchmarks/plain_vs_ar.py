"""Is `auto`'s plain fallback slower than `ar`'s own call of the same prompt? The two alternate call by call at
batch 1 (held-out prompts, 64 new tokens, greedy and T = 1), `auto` held on the plain program by a table under which
no block pays; the wall times of the decode programs (DecodeResult.wall_time) are summed.

  python benchmarks/plain_vs_ar.py WORKDIR

WORKDIR: the workdir of `python -m tandem_jax.benchmark --config=configs/benchmark.py:smollm2` (its ``tandem``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tandem_jax.data.heldout import PROMPTS  # noqa: E402
from tandem_jax.decoding import SamplingParams, costs, generate  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402

run = load_workdir(os.path.join(sys.argv[1], "tandem"))
tandem, tok = run.model, run.tokenizer
ps = [tok.encode(p, add_bos=True) for p in PROMPTS[:6]]
never = costs.cost_table([1.0] + [100.0] * 4, 0.01, plain_ms=1.0, prefill_ms=1.0)
for temp in (0.0, 1.0):
  sp = SamplingParams(temperature=temp)
  common = dict(max_new_tokens=64, sampling=sp, seed=0)
  for p in ps:  # warm both
    generate("ar", [p], primary=tandem.primary, **common)
    generate("tandem_speed", [p], tandem=tandem, policy="auto", costs=never, **common)
  a, b = [], []
  for _ in range(4):
    for p in ps:
      ra = generate("ar", [p], primary=tandem.primary, **common)
      rb = generate("tandem_speed", [p], tandem=tandem, policy="auto", costs=never, **common)
      assert rb.ran_plain and rb.tokens == ra.tokens
      a.append(ra.wall_time); b.append(rb.wall_time)
  a, b = np.array(a), np.array(b)
  print(f"T={temp}: ar {a.sum():.2f} s, auto-plain {b.sum():.2f} s, ratio ar/auto {a.sum() / b.sum():.3f}, "
        f"per-call ratio median {np.median(a / b):.3f}", flush=True)
