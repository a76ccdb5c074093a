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
  assert {"tandem", "standalone"} == set(r["table1"]) and 0 <= r["table1"]["tandem"]["tv"] <= 1
  assert set(r["targets"]) == {k for k, _, _ in real.TARGETS}
  assert r["training"]["standalone"]["data_seconds"] < 5  # the standalone drafter reused the tandem's data
  with open(os.path.join(tmp_path, real.RESULTS_FILE)) as fh:
    assert json.load(fh)["phases_seconds"]["total"] > 0
  report = open(os.path.join(tmp_path, real.REPORT_FILE)).read()
  for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Targets"):
    assert title in report
