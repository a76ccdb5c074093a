"""The ``auto`` block-length policy (cost table measured on the decode loop) against ``ar`` and fixed γ, on the
real-model benchmark's trained models: greedy (or the temperatures given), batch 1 (6 held-out prompts) and batch 8
(24), 64 new tokens, interleaved repeats (tandem_jax.bench.timing), ratios of median wall times.

  python benchmarks/auto_policy.py WORKDIR [TEMPERATURE ...]

WORKDIR: the workdir of `python -m tandem_jax.benchmark --config=configs/benchmark.py:smollm2` (its ``tandem``).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tandem_jax.bench import timing  # noqa: E402
from tandem_jax.data.heldout import PROMPTS  # noqa: E402
from tandem_jax.decoding import SamplingParams, costs  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402


def main(workdir: str, temperatures):
  run = load_workdir(os.path.join(workdir, "tandem"))
  tandem, primary, tok = run.model, run.model.primary, run.tokenizer
  prompts = [tok.encode(p, add_bos=True) for p in PROMPTS[:24]]
  for temp in temperatures:
    common = dict(sampling=SamplingParams(temperature=temp), max_new=64, k=4, seed=0)
    for b in (1, 8):
      ps = prompts[:6] if b == 1 else prompts
      t0 = time.perf_counter()
      cells = {"ar": timing.decode_cell("ar", ps, b, None, models=dict(primary=primary), **common)}
      for g in (1, 2):
        cells[f"fixed γ={g}"] = timing.decode_cell("tandem_speed", ps, b, g, models=dict(tandem=tandem), **common)
      cells["auto (≤ 4)"] = timing.decode_cell("tandem_speed", ps, b, 4, models=dict(tandem=tandem),
                                               policy="auto", costs=None, **common)
      res = timing.interleaved(cells, 2)
      ar = np.median(res["ar"]["times"])
      line = ", ".join(f"{n} {ar / np.median(r['times']):.3f}x" for n, r in res.items())
      hist = np.asarray(res["auto (≤ 4)"]["run"]["gamma_hist"]).tolist()
      print(f"T={temp:g} batch {b}: {line}; auto's γ per iteration {hist} ({time.perf_counter() - t0:.0f} s)",
            flush=True)
  for key, (_, table) in costs._calibrated.items():
    if key[0] == "loop":
      t = table.as_dict()
      print(f"loop calibration, batch {key[3]}: iteration ms for γ = 0.. "
            f"{[round(v + max(g, 1) * t['draft_ms'], 2) for g, v in enumerate(t['verify_ms'])]}")


if __name__ == "__main__":
  main(sys.argv[1], [float(t) for t in sys.argv[2:]] or [0.0])
