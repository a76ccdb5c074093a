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
  _check_head_to_head(bench, r, tmp_path)
  assert r["training"]["standalone"]["data_seconds"] < 5  # the standalone drafter reused the tandem's data
  with open(os.path.join(tmp_path, real.RESULTS_FILE)) as fh:
    assert json.load(fh)["phases_seconds"]["total"] > 0
  report = open(os.path.join(tmp_path, real.REPORT_FILE)).read()
  for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Targets", "ar timed again"):
    assert title in report
  _check_gpu_bundle(tmp_path)


def _check_head_to_head(bench, r, workdir):
  """The head-to-head phase times the targets' cells of every setting (batch 1 against Table 2's best fixed γ, batch
  > 1 against ar), judges them, and --targets_only times it again from the workdir's run, keeping the rest."""
  h = r["head_to_head"]
  assert set(h) == set(r["table2"]) | set(r["table2_auto"])
  for name, row in h.items():
    want = {"fixed", "auto", "fixed_again", "router_auto"} if row["batch"] == 1 else {"ar", "auto", "ar_again"}
    assert set(row["seconds"]) == set(row["times"]) == want and row["rounds"] == bench.decode.h2h_rounds
    assert all(len(t) == row["rounds"] for t in row["times"].values())
    if row["batch"] == 1:
      assert row["fixed_gamma"] == r["table2"][name]["best_gamma"]["tandem_speed"]
      assert row["router_stop"] == "gate"  # the router's cost-aware gate, no τ tuned on prompts
    for n, p in row["vs_base"].items():  # one ratio a round, the median of them the value
      assert p["rounds"] == row["rounds"] and p["per_round"]["min"] <= p["ratio"] <= p["per_round"]["max"]
    assert row["auto"]["calls"] == -(-row["prompts"] // row["batch"])  # the last round's calls, merged
  assert [(t["setting"], t["target"]) for t in r["h2h_targets"]] == [
      ("greedy_b1", 1.0), ("greedy_b1", 1.04), ("greedy_b2", 1.0), ("greedy_b3", 1.0), ("T1_b1", 1.0),
      ("T1_b1", 1.04), ("T1_b2", 1.0), ("T1_b3", 1.0)]
  assert "## The auto policy's targets, head to head" in r["report"]
  again = real.targets_only(bench, str(workdir), command="again")
  assert again["table2"] == json.loads(json.dumps(r["table2"]))  # kept as the run measured it
  assert set(again["head_to_head"]) == set(h) | {"_command", "_table2_from"} and "`again`" in again["report"]
  other = bench_cfg.get_config("smollm2_smoke")
  with other.unlocked():
    other.decode.max_new_tokens = 9
  with pytest.raises(ValueError, match="max_new_tokens"):
    real.targets_only(other, str(workdir))


def test_interleaved_calls_rotate_the_cells_at_every_call():
  """Each round passes over every cell's calls, call i of every cell before call i + 1, the first cell rotated at
  every call; a round's time is the sum of its calls' and its counters are merged; cells making other calls are
  refused."""
  from tandem_jax.bench import timing
  log = []

  def cell_for(name, wall):
    def cell(warmup=False, part=None):
      log.append((name, "warm" if warmup else part))
      return dict(wall=wall + (part or 0), host=0.5, calls=1, plain_calls=int(part == 1), tokens=5,
                  call_walls=[(wall, False)], call_notes=[""])
    cell.parts = 3
    return cell

  res = timing.interleaved_calls({"a": cell_for("a", 1.0), "b": cell_for("b", 2.0), "c": cell_for("c", 4.0)}, 2)
  assert log[:3] == [("a", "warm"), ("b", "warm"), ("c", "warm")]
  timed = log[3:]
  assert len(timed) == 2 * 3 * 3
  assert [n for n, _ in timed[:9]] == list("abc" + "bca" + "cab") and [n for n, _ in timed[9:12]] == list("abc")
  assert [p for _, p in timed[:9]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert res["a"]["times"] == [6.0, 6.0] and res["c"]["times"] == [15.0, 15.0]
  assert res["b"]["run"]["calls"] == 3 and len(res["b"]["run"]["call_walls"]) == 3 and res["b"]["run"]["tokens"] == 15
  assert res["b"]["host"] == [1.5, 1.5]  # per round, summed over its calls
  assert (res["b"]["timed_calls"], res["b"]["timed_plain_calls"]) == (6, 2)  # over both rounds
  short = cell_for("d", 1.0)
  short.parts = 2
  with pytest.raises(ValueError, match="same calls"):
    timing.interleaved_calls({"a": cell_for("a", 1.0), "d": short}, 1)


def test_paired_is_the_median_of_per_round_ratios():
  from tandem_jax.bench import timing
  p = timing.paired([2.0, 2.0, 2.0, 10.0], [1.0, 2.0, 4.0, 10.0])  # base / cell: 2, 1, 0.5, 1
  assert p["ratio"] == pytest.approx(1.0) and p["per_round"] == dict(min=0.5, median=1.0, max=2.0)
  assert p["pooled"] == pytest.approx(16.0 / 17.0) and p["rounds"] == 4


def test_h2h_targets_are_judged_against_the_comparator_timed_again():
  from tandem_jax.bench import timing

  def pr(*ratios):
    return timing.paired([1.0] * len(ratios), [1.0 / x for x in ratios])

  h = dict(greedy_b1=dict(batch=1, fixed_gamma=2, router_stop="gate", vs_base=dict(auto=pr(0.9, 0.96, 0.97, 0.98, 0.99, 1.0, 1.01, 1.1),
                                                              fixed_again=pr(1.04), router_auto=pr(1.05))),
           greedy_b8=dict(batch=8, vs_base=dict(auto=pr(0.9, 0.95, 0.96, 0.97, 0.975, 0.98, 0.99, 1.1),
                                                ar_again=pr(0.99)),
                          auto=dict(timed_calls=24, timed_plain_calls=23)),  # one call speculated
           greedy_b40=dict(batch=40, vs_base=dict(auto=pr(0.9, 0.95, 0.96, 0.97, 0.975, 0.98, 0.99, 1.1),
                                                  ar_again=pr(0.99)),
                           auto=dict(timed_calls=8, timed_plain_calls=8)),  # ar's program on every call
           _command="x")
  got = [(t["setting"], t["what"], t["met"]) for t in real.h2h_targets(h)]
  # greedy_b1: median 0.985, its interval x(2)..x(7) = 0.96..1.01 reaches 1; greedy_b8: 0.9725, interval to 0.99;
  # greedy_b40 the same ratios, but auto was ar: met as equality
  assert got == [("greedy_b1", "auto vs the best fixed γ (γ = 2)", "within noise"),
                 ("greedy_b1", "router (gate) inside auto vs fixed γ = 2", "yes"), ("greedy_b8", "auto vs ar", "no"),
                 ("greedy_b40", "auto vs ar", "yes (= ar: its program on every call)")], got
  assert real.h2h_targets(h)[0]["interval"]["coverage"] == pytest.approx(1 - 2 * 9 / 256)


def test_median_interval_covers_the_median_as_often_as_it_says():
  """Over many random samples the interval holds the distribution's median at least at its stated coverage."""
  import numpy as np
  from tandem_jax.bench import timing
  rng = np.random.default_rng(0)
  for n in (5, 8, 12):
    hits = [(lambda ci: ci["lo"] <= 0.0 <= ci["hi"])(timing.median_interval(rng.standard_normal(n)))
            for _ in range(2000)]
    cov = timing.median_interval(range(n))["coverage"]
    assert cov >= 0.9 and np.mean(hits) >= cov - 0.02, (n, np.mean(hits), cov)


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

