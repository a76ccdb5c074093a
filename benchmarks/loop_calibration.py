"""The ``auto`` policy's loop calibration, three times per sampling setting: what one iteration of the speculative
decode loop costs when it drafts γ = 0..K tokens, against a step of the plain ``ar`` program (batch 1, K = 4, 64
new tokens; ``api.calibrate_loop``, the table ``generate(policy="auto")`` measures on its first call).

  python benchmarks/loop_calibration.py WORKDIR

WORKDIR: the workdir of `python -m tandem_jax.benchmark --config=configs/benchmark.py:smollm2` (its ``tandem``).
The γ = 0 column less the plain step is what a plain step costs inside the speculative loop: the loop's own work
(the Tandem secondary is not called at γ = 0: its commit writes the primary's states over the pending position).
The settled iterations are what the loop reads (``costs.settle_iterations``: γ = 0 at least the plain step,
non-decreasing in γ); the break-even acceptance (the table's ``break_even_alpha``) is where the loop starts drafting.
Beside it, one iteration of the fixed γ = 1 program (K = 1: the program `generate(block_len=1)` compiles, timed the
same way), what the auto loop's γ = 1 iteration should cost: its segments verify at one size, as that program does.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tandem_jax.decoding import SamplingParams, api, costs  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402



def fixed_iteration_ms(tandem, sampling, repeats=2) -> float:
  """One iteration of the fixed γ = 1 program on calibrate_loop's synthetic prompt, budget and capacity (its
  prefill, an ``ar`` call of one token, taken off; the minimum of ``repeats`` runs)."""
  vocab = tandem.primary.cfg.vocab_size
  prompts = [[(7919 * i) % (vocab - 1) + 1 for i in range(16)]]
  kw = dict(sampling=sampling, buffer_new_tokens=64)
  api.generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=64, block_len=1, **kw)  # compile
  prefill = min(api.generate("ar", prompts, primary=tandem.primary, max_new_tokens=1, block_len=4, **kw).wall_time
                for _ in range(repeats))
  per = []
  for _ in range(repeats):
    r = api.generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=64, block_len=1, **kw)
    per.append((r.wall_time - prefill) / max(int(r.stats["primary_calls"].max()) - 1, 1) * 1e3)
  return min(per)


run = load_workdir(os.path.join(sys.argv[1], "tandem"))
for temp in (0.0, 1.0):
  for _ in range(3):
    costs._calibrated.clear()
    raw = api.calibrate_loop("tandem_speed", dict(tandem=run.model), batch_size=1, prompt_len=16, max_new_tokens=64,
                             max_block_len=4, sampling=SamplingParams(temperature=temp), settle=False)
    t = raw.as_dict()
    it = [round(v + max(g, 1) * t["draft_ms"], 2) for g, v in enumerate(t["verify_ms"])]
    settled = costs.settle_iterations(it, t["plain_ms"])
    be = costs.loop_table(settled, t["draft_ms"], t["plain_ms"]).break_even_alpha()
    fixed = fixed_iteration_ms(run.model, SamplingParams(temperature=temp))
    print(f"T={temp:g}: iteration ms for γ = 0..4 {it} (settled: {[round(v, 2) for v in settled]}); plain ar step "
          f"{t['plain_ms']:.2f} ms; γ = 0 over the plain step {it[0] - t['plain_ms']:.2f} ms; break-even acceptance "
          f"(settled) {be:.3f}; the fixed γ = 1 program's iteration {fixed:.2f} ms", flush=True)
