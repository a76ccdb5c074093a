"""Decode-time acceptance of Tandem drafters on the held-out prompts: what a drafter change buys, free of the timing
noise of this machine (a 2-core CPU's speedups move by a few percent between runs of one program; acceptance
counts do not move at all under greedy decoding).

  python benchmarks/acceptance.py TANDEM_DIR [TANDEM_DIR ...] [--gamma=1] [--temperature=0] [--max_new=64]

Each TANDEM_DIR is a recipe run's workdir (``python -m tandem_jax.recipe``, the quickstart's or the benchmark's
``tandem``). All 24 held-out prompts (tandem_jax.data.heldout, text no drafter trained on) decode in one batch with
``tandem_speed`` at a fixed γ; per drafter it prints α (accepted drafts / drafts, all rows), tokens per primary call,
the spread of α over the prompts and α on the first 6 (the benchmark's batch-1 prompts).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tandem_jax.data.heldout import PROMPTS  # noqa: E402
from tandem_jax.decoding import SamplingParams, generate  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402


def acceptance(tandem_dir: str, gamma: int, temperature: float, max_new: int) -> dict:
  run = load_workdir(tandem_dir)
  prompts = [run.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
  r = generate("tandem_speed", prompts, tandem=run.model, max_new_tokens=max_new, block_len=gamma,
               sampling=SamplingParams(temperature=temperature), eos_id=run.tokenizer.eos_id)
  acc, drafted = r.stats["accepted"].astype(float), r.stats["drafted"].astype(float)
  per_row = acc / np.maximum(drafted, 1)
  m = r.summary  # acceptance_rate and tokens_per_primary_call as generate and the quickstart report them
  return dict(alpha=m["acceptance_rate"], drafts=int(drafted.sum()), tokens_per_call=m["tokens_per_primary_call"],
              row_sd=float(per_row.std()), alpha_first6=acc[:6].sum() / drafted[:6].sum())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("tandem_dirs", nargs="+")
  ap.add_argument("--gamma", type=int, default=1)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--max_new", type=int, default=64)
  args = ap.parse_args(argv)
  print(f"| drafter | recipe steps / tokens | validation agreement | α (γ = {args.gamma}, T = {args.temperature:g}, "
        f"24 prompts) | drafts | tokens per primary call | SD of α over prompts | α, first 6 prompts |")
  print("|---|---|---|---|---|---|---|---|")
  for d in args.tandem_dirs:
    m = acceptance(d, args.gamma, args.temperature, args.max_new)
    s = {}
    summary = os.path.join(d, "recipe_summary.json")
    if os.path.isfile(summary):
      with open(summary) as fh:
        s = json.load(fh)
    agree = s.get("validation", {}).get("agreement", float("nan"))
    print(f"| {d} | {s.get('steps', '?')} / {s.get('tokens', '?')} | {agree:.3f} | {m['alpha']:.3f} | {m['drafts']} "
          f"| {m['tokens_per_call']:.3f} | {m['row_sd']:.3f} | {m['alpha_first6']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
