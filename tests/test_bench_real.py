"""The real-model benchmark's pipeline (configs/benchmark.py:smollm2) on a tiny random primary: every phase runs,
the outputs of speed and tandem_speed equal ar's, and the report holds every table and target."""

import json
import os

import pytest

from configs import benchmark as bench_cfg
from tandem_jax.bench import real


@pytest.mark.slow
def test_smollm2_benchmark_smoke(tmp_path):
  bench = bench_cfg.get_config("smollm2_smoke")
  r = real.run(bench, str(tmp_path), command="test")
  assert r["greedy_outputs_identical"] is True
  assert set(r["table2"]) == {"greedy_b1", "greedy_b2", "T1_b1", "T1_b2"}
  for row in r["table2"].values():
    for m in ("speed", "tandem_speed"):
      assert set(row[m]) == {str(g) for g in bench.decode.gammas}
      assert all(cell["speedup"] > 0 and cell["tokens"] > 0 for cell in row[m].values())
  assert set(r["table4"]) == {"greedy_b1", "T1_b1"} and r["table4"]["greedy_b1"]["adaptive"]["tokens"] > 0
  assert all(t4["adaptive_cost"]["tokens"] > 0 for t4 in r["table4"].values())  # the router's cost-aware stop
  assert all(t4["adaptive_gate"]["tokens"] > 0 for t4 in r["table4"].values())  # the router's gate
  assert "router's gate" in r["report"]
  for t4 in r["table4"].values():  # the router inside auto: what its calls did, as Table 2's auto cells
    a = t4["adaptive_auto"]
    assert len(a["call_walls"]) == len(a["call_notes"]) == a["calls"] and 0 <= a["plain_calls"] <= a["calls"]
    assert f"{a['plain_calls']} of {a['calls']} calls of the last round on the plain program" in r["report"]
  assert all(len(row["auto"]["call_walls"]) == row["auto"]["calls"] for row in r["table2"].values())
  assert all(row["ar_again"]["tokens"] == row["ar"]["tokens"] for row in r["table2"].values())  # the A/A cell
  for row in r["table2"].values():  # every timed auto call's policy note is kept, and the probes counted from them
    a = row["auto"]
    assert len(a["call_notes"]) == a["calls"] and 0 <= a["probes"] <= a["calls"] * int(bench.decode.repeats)
    assert all(n.startswith("speculation off") for n, (_, plain) in zip(a["call_notes"], a["call_walls"]) if plain)
    # the cost table its γ choices followed, kept and reported (break-even from the loop's own iteration costs)
    t = a["table"]
    assert len(t["verify_ms"]) == len(t["iteration_ms"]) == a["gamma_max"] + 1 and 0 < t["prior_alpha"] <= 1
    assert f"break-even acceptance {t['break_even_alpha']:.3f}" in r["report"]
  assert {"tandem", "standalone"} == set(r["table1"]) and 0 <= r["table1"]["tandem"]["tv"] <= 1
  assert set(r["targets"]) == {k for k, _, _ in real.TARGETS}
  # decode.auto_batches: ar, auto and ar again on prompts of the recipe's validation rows (batch 40 in the preset)
  assert set(r["table2_auto"]) == {"greedy_b3", "T1_b3"}
  for row in r["table2_auto"].values():
    assert row["prompts"] == 3 and row["auto"]["tokens"] > 0 and row["ar_again"]["tokens"] == row["ar"]["tokens"]
    assert "speed" not in row and "vs_best_fixed" not in row["auto"]
  assert "### greedy_b3 (3 recipe validation-row prompts" in r["report"]
  assert [t["setting"] for t in r["auto_targets"]] == ["greedy_b1", "greedy_b2", "T1_b1", "T1_b2", "greedy_b3",
                                                        "T1_b3", "greedy_b1", "T1_b1"]
  assert "The auto policy's targets (issue 16)" in r["report"]
  assert real.rerender(str(tmp_path))["report"] == r["report"]  # --report_only: the same report from the JSON
  assert r["training"]["standalone"]["data_seconds"] < 5  # the standalone drafter reused the tandem's data
  with open(os.path.join(tmp_path, real.RESULTS_FILE)) as fh:
    assert json.load(fh)["phases_seconds"]["total"] > 0
  report = open(os.path.join(tmp_path, real.REPORT_FILE)).read()
  for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Targets", "ar timed again"):
    assert title in report
  _check_gpu_bundle(tmp_path)


def _check_gpu_bundle(workdir):
  """launch.gpu_decode: the decode part from a packed bundle (what the GPU run does) rebuilds models whose outputs
  equal the workdir's own, and writes its report."""
  from launch import gpu_decode
  from tandem_jax import recipe_router
  from tandem_jax.decoding import SamplingParams, generate
  from tandem_jax.workdir import load_workdir
  bundle, out = os.path.join(workdir, "bundle"), os.path.join(workdir, "gpu_out")
  gpu_decode.pack(str(workdir), "", bundle, part_mb=60)
  assert not os.path.exists(os.path.join(bundle, "manifest.json"))  # a tiny primary travels as parameters
  rebuilt = gpu_decode.load_models(bundle)
  tandem = load_workdir(os.path.join(workdir, "tandem")).model
  standalone = load_workdir(os.path.join(workdir, "standalone")).model
  prompts = [[1, 5, 9, 2], [1, 7, 3]]
  for method, kw, kw_rebuilt in (
      ("ar", dict(primary=tandem.primary), dict(primary=rebuilt["primary"])),
      ("tandem_speed", dict(tandem=tandem), dict(tandem=rebuilt["tandem"])),
      ("speed", dict(primary=tandem.primary, drafter=standalone),
       dict(primary=rebuilt["primary"], drafter=rebuilt["standalone"]))):
    for temp in (0.0, 1.0):
      common = dict(max_new_tokens=6, sampling=SamplingParams(temperature=temp), seed=3)
      if method != "ar":
        common["block_len"] = 2
      want = generate(method, prompts, **kw, **common).tokens
      assert generate(method, prompts, **kw_rebuilt, **common).tokens == want, (method, temp)
  b = bench_cfg.get_config("smollm2_smoke")
  router = recipe_router.train_router(os.path.join(workdir, "tandem"), steps=int(b.router.steps),
                                      gamma_max=int(b.gamma_max), top_k=int(b.router.top_k),
                                      hidden=int(b.router.hidden),
                                      sampled_sequences=int(b.router.sampled_sequences))["router"]  # the saved one
  adaptive = dict(max_new_tokens=6, block_len=3, threshold=0.5)
  assert (generate("tandem_speed", prompts, tandem=rebuilt["tandem"], router=rebuilt["router"], **adaptive).tokens ==
          generate("tandem_speed", prompts, tandem=tandem, router=router, **adaptive).tokens)
  r = gpu_decode.run(bundle, out, "", [], 0, ["greedy_b1"])
  assert r["greedy_outputs_identical"] is True and set(r["table2"]) == {"greedy_b1"}
  assert os.path.isfile(os.path.join(out, "gpu_report.md"))


def test_auto_targets_are_judged_against_the_aa_cell():
  """A value at its target is met; one short by no more than the A/A cell's distance from 1x is "within A/A"; one
  short by more is not met. Batch 1 is judged against the best fixed γ, batch > 1 against ar, the router inside
  auto (Table 4) against its fixed γ at 1.04."""
  def row(batch, auto, vs_best, aa):
    return dict(batch=batch, auto=dict(speedup=auto, vs_best_fixed=vs_best), ar_again=dict(speedup=aa))
  r = dict(table2=dict(greedy_b1=row(1, 0.9, 0.98, 1.03), greedy_b8=row(8, 0.97, 1.2, 0.98),
                       T1_b8=row(8, 1.01, 1.3, 0.9), T1_b1=row(1, 1.0, 1.0, 1.0)),
           table4=dict(greedy_b1=dict(fixed_gamma=2, fixed=dict(speedup=1.0), adaptive_auto=dict(speedup=1.02)),
                       T1_b1=dict(fixed_gamma=1, fixed=dict(speedup=0.9), adaptive_auto=dict(speedup=0.95))))
  got = [(t["setting"], t["met"]) for t in real.auto_targets(r)]
  assert got == [("greedy_b1", "within A/A"), ("greedy_b8", "no"), ("T1_b8", "yes"), ("T1_b1", "yes"),
                 ("greedy_b1", "within A/A"), ("T1_b1", "yes")], got
  assert real.auto_targets(r)[0]["what"] == "auto vs the best fixed γ"
  assert real.auto_targets(r)[4]["value"] == pytest.approx(1.02) and real.auto_targets(r)[4]["target"] == 1.04

