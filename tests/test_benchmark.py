"""The benchmark end to end on its smoke preset (tiny models, a few steps): results.json's keys, the report's
tables, reuse of finished stages; and the small pure helpers (α from blocks, prompts)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import benchmark as bench_cfg
from conftest import COMPILE_FLAGS
from tandem_jax.bench import chain, timing
from tandem_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = ("accuracy_gain_points", "speedup_tandem_speed_vs_ar", "speedup_tandem_speed_vs_speed",
            "speedup_adaptive_vs_fixed", "realized_over_ideal")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bench"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = COMPILE_FLAGS  # one CPU device, as a user runs it (compiled faster, see conftest)
  proc = subprocess.run([sys.executable, "-m", "tandem_jax.benchmark", f"--workdir={workdir}",
                         "--config=configs/benchmark.py:smoke", "--json"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
def test_smoke_results_and_report(smoke):
  workdir, printed = smoke
  with open(os.path.join(workdir, "results.json")) as fh:
    r = json.load(fh)
  for k in HEADLINE + ("table1", "table2", "table3_quality", "table3_speed", "table4", "leviathan", "costs",
                       "targets", "machine", "phases_seconds", "cost_ratio_c", "best_gamma"):
    assert k in r, k
  for k in HEADLINE:  # what --json prints is results.json's, and each target is judged on its own value
    assert printed[k] == pytest.approx(r[k], nan_ok=True), k
    target = r["targets"][k]
    assert target["value"] == pytest.approx(r[k], nan_ok=True) and target["met"] == (r[k] >= target["target"]), k
  assert set(r["table1"]) >= {"secondary", "secondary_long", "secondary_distil", "tandem", "tandem_distil"}
  assert "accuracy_gain_points_equal_steps" in r
  row = r["table2"]["greedy_b1"]
  assert set(row["speed"]) == set(row["tandem_speed"]) == {"1", "2"}
  cell = row["tandem_speed"]["2"]
  assert cell["tokens"] == row["ar"]["tokens"] > 0  # no EOS stop: every method emits the same tokens
  assert row["auto"]["tokens"] == row["ar_again"]["tokens"] == row["ar"]["tokens"]  # auto and the A/A cell
  # the speedup is the ratio of the median wall times, and the headline reads the best γ's cell
  assert cell["speedup"] == pytest.approx(row["ar"]["seconds"]["median"] / cell["seconds"]["median"])
  best = row["tandem_speed"][str(r["best_gamma"]["tandem_speed"])]
  assert r["speedup_tandem_speed_vs_ar"] == pytest.approx(best["speedup"])
  assert 0.0 <= cell["acceptance_rate"] <= 1.0 and cell["accepted"] <= cell["drafted"]
  t4 = r["table4"]["greedy_b1"]
  assert {"fixed", "adaptive", "adaptive_cost", "ar", "speedup_adaptive_vs_fixed",
          "speedup_adaptive_paper_tau_vs_fixed", "speedup_adaptive_cost_vs_fixed"} <= set(t4)
  # τ chosen on held-out prompts: the fastest of the searched values, and those prompts are not the timed ones.
  assert t4["tuning"]["prompts"] == r["prompts"]["threshold_tuning"] == 1
  assert {float(x) for x in t4["tuning"]["seconds"]} == {0.5, 0.8}
  best = min(t4["tuning"]["seconds"], key=t4["tuning"]["seconds"].get)
  assert float(best) == t4["threshold"]
  assert ("adaptive_paper_tau" in t4) == (t4["threshold"] != 0.8)
  assert {"mid", "primary", "secondary"} <= set(r["table3_speed"])
  assert r["machine"]["before_decode"]["cpu_count"] == os.cpu_count()
  with open(os.path.join(workdir, "report.md")) as fh:
    md = fh.read()
  for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Leviathan", "Targets", "CPU cores", "ar timed again"):
    assert title in md, title
  if r["plots"]:
    assert all(os.path.isfile(os.path.join(workdir, p)) for p in r["plots"])
  else:
    assert "Plots skipped" in md


@pytest.mark.slow
def test_rerun_reuses_every_stage(smoke):
  workdir, _ = smoke
  bench = bench_cfg.get_config("smoke")
  report = chain.train_all(bench, workdir)
  assert set(report) == set(bench_cfg.STAGES)
  assert all(r["reused"] for r in report.values())


def test_alpha_from_blocks():
  # γ = 2: blocks accepted 2, 0, 1, 2 drafts -> 5 accepted, 2 rejections -> α = 5/7 (a full block is censored).
  assert timing.alpha_mle(dict(drafted=8, accepted=5, rejections=2)) == pytest.approx(5 / 7)
  assert np.isnan(timing.alpha_mle(dict(drafted=0, accepted=0, rejections=0)))  # nothing drafted: undefined


def test_prompts_from_rows():
  rows = np.arange(3 * 20).reshape(3, 20)
  p = timing.draw_prompts(rows, 5, 8)
  assert [x[0] for x in p] == [0, 20, 40, 8, 28] and all(len(x) == 8 for x in p)
  with pytest.raises(ValueError, match="num_prompts"):
    timing.draw_prompts(rows, 7, 8)


def test_configs_and_stage_wiring(tmp_path):
  for preset in set(bench_cfg.BENCH_PRESETS) - set(bench_cfg.REAL_PRESETS):  # the real ones: test_bench_real
    bench = bench_cfg.get_config(preset)
    cfgs = chain.stage_configs(bench, str(tmp_path))
    assert list(cfgs) == list(bench_cfg.STAGES)
    assert cfgs["mid"].stage == "primary" and cfgs["mid"].primary.num_layers != cfgs["primary"].primary.num_layers
    long_ = cfgs["secondary_long"]
    assert long_.stage == "secondary" and long_.secondary.to_dict() == cfgs["secondary"].secondary.to_dict()
    assert long_.train.steps == cfgs["tandem"].train.steps
    assert long_.init.secondary_workdir == cfgs["tandem"].init.secondary_workdir
    assert cfgs["router"].init.tandem_workdir.endswith("tandem_distil")
    assert cfgs["router"].router.gamma_max == bench.gamma_max
    assert max(bench.decode.gammas) <= bench.gamma_max
  with pytest.raises(ValueError, match="preset"):
    bench_cfg.get_config("huge")


def test_interrupted_stage_stops_the_chain(tmp_path, monkeypatch):
  """A stage stopped by SIGTERM (saved, not finished) ends the benchmark: later stages would build on it."""
  calls = []

  def fake_train(config, workdir):
    calls.append(os.path.basename(workdir))
    return dict(step=1, eval={}, stopped_early=len(calls) == 2)

  monkeypatch.setattr(loop, "train", fake_train)
  with pytest.raises(SystemExit, match="mid stopped early at step 1"):
    chain.train_all(bench_cfg.get_config("smoke"), str(tmp_path))
  assert calls == ["primary", "mid"]

