"""Deviceless TPU compile (libtpu; skipped without it) and the estimates' arithmetic (always)."""

import json
import os
import subprocess
import sys

import pytest

from tandem_jax import tpu_estimates as tp
from tandem_jax.decoding.costs import expected_block_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- pure arithmetic ---------------------------------------------------------------------------------------------------
def test_projection_uses_compiled_costs():
  rows = tp.project_speedup(0.8, [1, 4], primary_step_s=1.0, primary_block_s=1.0, max_block_len=4,
                            secondary_step_s=0.0, commit_s=0.0)
  # Free drafts and a flat block call: the projection equals Leviathan's bound.
  assert [r["projected_speedup"] for r in rows] == pytest.approx([r["leviathan_speedup"] for r in rows])
  rows = tp.project_speedup(0.8, [2], primary_step_s=1.0, primary_block_s=3.0, max_block_len=4,
                            secondary_step_s=0.1, commit_s=0.05)
  block = 1.0 + 0.5 * 2.0  # interpolated (γ+1 = 3 tokens between the 1- and 5-token calls)
  assert rows[0]["block_call_ms"] == pytest.approx(block * 1e3)
  assert rows[0]["projected_speedup"] == pytest.approx(expected_block_tokens(0.8, 2) / (2 * 0.1 + block + 0.05))


def test_acceptance_from_number_or_results_json(tmp_path):
  assert tp.load_acceptance("0.75") == (0.75, "--acceptance")
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"runs": [{"method": "speed", "acceptance_rate": 0.5},
                                       {"method": "tandem_speed", "acceptance_rate": 0.7},
                                       {"method": "tandem_speed", "acceptance_rate": 0.8}]}))
  alpha, where = tp.load_acceptance(str(path))
  assert alpha == pytest.approx(0.75) and "2 acceptance_rate" in where
  with pytest.raises(ValueError, match="neither"):
    tp.load_acceptance(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    tp.load_acceptance("1.5")


def test_chips_and_fit_message():
  assert tp.chip_of("v5e:4x4").hbm_bytes == 16 * tp.GIB
  assert tp.chip_of("v5p:2x2x1").hbm_bytes == 95 * tp.GIB and tp.chip_of("v6e:2x2").hbm_bytes == 32 * tp.GIB
  assert tp.chip_of("v5e:2x2", hbm_gib=1.0).hbm_bytes == tp.GIB
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    tp.chip_of("v9:2x2")
  assert tp.fit_message("x", tp.GIB, tp.CHIPS["v5e"]) is None
  msg = tp.fit_message("train_step", 20 * tp.GIB, tp.CHIPS["v5e"])
  assert "20.00 GiB" in msg and "16.00 GiB" in msg and "short by 4.00 GiB" in msg


# -- deviceless compile ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_report():
  pytest.importorskip("libtpu")
  from configs import base
  from tandem_jax import aot
  return aot.run(base.get_config("tandem", "tiny"), "v5e:2x2", prompt_len=8, max_new_tokens=16, block_len=4,
                 groups=("train", "decode", "calls"), acceptance="0.75", decode_programs=("decode_tandem_speed",),
                 log=lambda *a: None)


def test_tiny_compiles_on_v5e_2x2_train_and_tandem_speed(tiny_report):
  r = tiny_report
  assert r["chips"] == 4 and r["mesh"] == {"data": 4, "model": 1} and not r["failures"]
  assert r["label"] == tp.LABEL
  train = r["programs"]["train_step"]
  assert train["fits"] and train["flops"] > 0 and 0 < train["mfu"] < 1 and train["memory"]["total"] > 0
  for name in ("decode_tandem_speed",):
    assert r["programs"][name]["fits"] and r["programs"][name]["memory"]["total"] > 0
  for name in ("primary_step", "primary_block", "secondary_step", "tandem_commit"):
    assert r["programs"][name]["seconds"] > 0
  proj = r["projection"]
  assert [row["gamma"] for row in proj["rows"]] == [1, 2, 3, 4] and "projection" in proj["label"]


def test_scanned_layers_compile_and_cost_like_unrolled(tiny_report):
  """The TPU presets scan their layers: the tiny tandem with scan_layers (+ remat) compiles for training and
  decoding, and its depth-extrapolated costs (XLA counts a scan body once) match the unrolled programs' own."""
  from configs import base
  from tandem_jax import aot
  config = base.get_config("tandem", "tiny")
  for model in (config.primary, config.secondary):
    model.scan_layers = True
  r = aot.run(config, "v5e:2x2", prompt_len=8, max_new_tokens=16, block_len=4, groups=("decode", "calls"),
              decode_programs=("decode_tandem_speed",), log=lambda *a: None)
  assert not r["failures"] and r["programs"]["decode_tandem_speed"]["fits"]
  for name in ("primary_step", "primary_block", "secondary_step", "tandem_commit"):
    got, want = r["programs"][name], tiny_report["programs"][name]
    assert got["cost_source"].startswith("depth-extrapolated") and want["cost_source"] == "this program"
    assert got["flops"] == pytest.approx(want["flops"], rel=0.05), name
  config.primary.remat = config.secondary.remat = True
  r = aot.run(config, "v5e:2x2", prompt_len=8, max_new_tokens=16, block_len=4, groups=("train",),
              log=lambda *a: None)
  train, unrolled = r["programs"]["train_step"], tiny_report["programs"]["train_step"]
  assert train["fits"] and not r["failures"]
  assert unrolled["flops"] < train["flops"] < 1.6 * unrolled["flops"]  # remat recomputes the forward once


def test_presets_summary_table(tiny_report):
  from launch import compile_presets
  table = compile_presets.summary_table({("tiny", "tandem"): dict(tiny_report, wall_seconds=12.0)})
  row = [line for line in table.splitlines() if line.startswith("| tiny |")][0]
  assert "| v5e:2x2 | tandem |" in row and "| yes |" in row and "x (γ=" in row and row.endswith("| 12 |")
  assert tp.LABEL in table


def test_report_formats_with_labels(tiny_report):
  from tandem_jax import aot
  text = aot.format_report(tiny_report)
  assert tp.LABEL in text and "| train_step |" in text and "est. MFU" in text and "| γ |" in text


@pytest.mark.slow
def test_cli_fails_with_the_hbm_shortfall():
  pytest.importorskip("libtpu")
  out = subprocess.run([sys.executable, "-m", "tandem_jax.aot", "--config=configs/primary.py:tiny",
                        "--topology=v5e:2x2", "--programs=calls", "--prompt_len=8", "--max_new_tokens=8",
                        "--block_len=2", "--hbm_gib=0.0001", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "primary_step needs" in out.stderr and "GiB of HBM per device but a v5e chip has 0.00 GiB: short by" \
      in out.stderr
  report = json.loads(out.stdout)
  assert report["failures"] and not report["programs"]["primary_step"]["fits"]


def test_bad_topology_and_args_fail_before_compiling():
  pytest.importorskip("libtpu")
  from configs import base
  from tandem_jax import aot
  with pytest.raises(RuntimeError, match="cannot build TPU topology 'v5e:3x3'"):
    aot.run(base.get_config("primary", "tiny"), "v5e:3x3", groups=("calls",))
  with pytest.raises(ValueError, match="max_seq_len"):
    aot.run(base.get_config("primary", "tiny"), "v5e:2x2", prompt_len=60, max_new_tokens=16, groups=("calls",))
