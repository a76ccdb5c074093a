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


def test_roofline_and_useful_flops_arithmetic():
  """The floors, by hand, for the tiny tandem (tie_embeddings, bf16 serving, one device)."""
  import jax
  from configs import base
  from tandem_jax import aot, sharding
  from tandem_jax.models import bundle as bundle_lib
  from tandem_jax.models.tandem import TandemLM
  from tandem_jax.topology import abstract_cache, abstract_module
  c = base.get_config("tandem", "tiny")
  with c.unlocked():
    c.serving.dtype = "bfloat16"
  p, s, t = bundle_lib.model_configs(bundle_lib.serving_config(c))
  mesh = sharding.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
  rules = sharding.rules_of(c)
  tandem = abstract_module(lambda r: TandemLM(p, s, t, r), mesh, rules)
  # primary: embed 384x32 + 2 layers x (q 32x32, k,v 32x16, o 32x32, MLP 3 x 32x64, 2 norms of 32) + final norm
  primary = 384 * 32 + 2 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 64) + 32
  assert primary == 30880 and tp.bytes_per_device(jax.tree.leaves(tandem.primary)) == 2 * primary
  # KV cache: k and v, 2 layers x [batch 2, 48 slots, 2 kv heads, 8] in bf16, + 2 int32 lengths
  cache = tp.bytes_per_device(abstract_cache(p, 2, 48, mesh, rules))
  assert cache == 2 * 2 * (2 * 48 * 2 * 8) * 2 + 2 * 4
  rf = tp.decode_roofline(3 * (2 * primary + cache), 1e-3, 2 * primary, cache, tp.CHIPS["v5e"])
  assert rf["min_bytes"] == 2 * primary + cache and rf["bytes_over_min"] == pytest.approx(3.0)
  assert rf["roofline_ms"] == pytest.approx((2 * primary + cache) / 819e9 * 1e3)
  assert rf["ms_over_roofline"] == pytest.approx(1e-3 / ((2 * primary + cache) / 819e9))
  # useful FLOPs: tokens (6 N_trained + 2 N_frozen + 12 L H Q T (trained) + 4 L H Q T (frozen))
  assert tp.useful_train_flops(10, 100, 1000, [(2, 4, 8, 32, True), (3, 2, 8, 32, False)]) == \
      10 * (600 + 2000 + 12 * 2 * 4 * 8 * 32 + 4 * 3 * 2 * 8 * 32)
  # the tandem stage: the secondary (+ projection) trained, the primary frozen, 8 rows x 32 tokens
  _, trainable, frozen = bundle_lib.abstract_bundle(c)
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  assert sum(x.size for x in jax.tree.leaves(frozen)) == primary
  want = 8 * 32 * (6 * n_train + 2 * primary + 12 * 2 * 2 * 8 * 32 + 4 * 2 * 4 * 8 * 32)
  assert aot.useful_train_flops(c) == want
