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


def test_tpu_flags_added_once_and_the_users_win():
  from tandem_jax import sharding
  env = {}
  args = sharding.set_tpu_flags(env)
  assert args.split() == [f"--{k}={v}" for k, v in sharding.TPU_XLA_FLAGS.items()]
  assert sharding.set_tpu_flags(env) == args  # idempotent
  env = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_windowed_einsum_for_all_gather=true --xla_foo=1"}
  args = sharding.set_tpu_flags(env).split()
  assert args[:2] == ["--xla_tpu_enable_windowed_einsum_for_all_gather=true", "--xla_foo=1"]
  assert args[2:] == ["--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"] and len(args) == 3


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


def aot_report(r):
  from tandem_jax import aot
  return aot.format_report(r)


def test_tiny_compiles_on_v5e_2x2_train_and_tandem_speed(tiny_report):
  r = tiny_report
  assert r["chips"] == 4 and r["mesh"] == {"data": 4, "model": 1} and not r["failures"]
  assert r["label"] == tp.LABEL
  train = r["programs"]["train_step"]
  assert train["fits"] and train["flops"] > 0 and 0 < train["mfu"] < 1 and train["memory"]["total"] > 0
  assert train["hbm_bytes"] > 0 and 0 < train["mfu_useful_hbm"] <= 1
  assert train["hbm_seconds"] >= train["useful_flops"] / (tp.CHIPS["v5e"].peak_bf16_flops)
  assert "By HBM traffic" in aot_report(r)
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
  rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
  train, parts, calls = rows[0], rows[1], rows[2:]
  assert "| v5e:2x2 | tandem |" in train and "| yes |" in train and train.endswith("| 12 |")
  gb = [float(x) for x in parts.strip("| ").split(" | ")[2:]]  # GB per model part: they sum to the step's traffic
  assert sum(gb) == pytest.approx(tiny_report["programs"]["train_step"]["hbm_bytes"] / 1e9, abs=0.1 + 0.01 * len(gb))
  assert [c.split(" | ")[2] for c in calls] == ["primary_step", "primary_block", "secondary_step"]
  assert all("x (γ=" in c for c in calls) and "; -" in calls[0]  # no unrolled compile in this report
  assert tp.LABEL in table


def test_report_formats_with_labels(tiny_report):
  from tandem_jax import aot
  text = aot.format_report(tiny_report)
  assert tp.LABEL in text and "| train_step |" in text and "est. MFU" in text and "| γ |" in text


def test_saved_report_reprints_without_compiling(tiny_report, tmp_path):
  from tandem_jax import aot
  path = tmp_path / "report.json"
  path.write_text(json.dumps(tiny_report, default=float))  # as --json and launch.compile_presets write it
  out = subprocess.run([sys.executable, "-m", "tandem_jax.aot", f"--report={path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == aot.format_report(json.loads(path.read_text())).strip()
  out = subprocess.run([sys.executable, "-m", "tandem_jax.aot"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "--config and --topology are required" in out.stderr


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


# -- HBM traffic read from a compiled program's memory spaces (aot.hbm_traffic) -------------------------------------
# A TPU-style program: the weight is prefetched into on-chip memory (S(1)) and a fusion reads it there; a KV cache is
# updated in place by a dynamic-update-slice fusion; an embedding row is gathered by a dynamic-slice fusion; a loop
# of 3 known iterations reads a [64] f32 operand from HBM each time.
_TPU_STYLE_HLO = """HloModule m, entry_computation_layout={}

%fused_take (p0: bf16[1000,64], p1: s32[]) -> bf16[1,64] {
  %p0 = bf16[1000,64]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[]{:T(128)} parameter(1)
  %c = s32[]{:T(128)} constant(0)
  ROOT %ds = bf16[1,64]{1,0:T(2,128)(2,1)S(1)} dynamic-slice(%p0, %p1, %c), dynamic_slice_sizes={1,64}
}

%fused_matvec (q0: bf16[1,64], q1: bf16[64,256]) -> bf16[1,256] {
  %q0 = bf16[1,64]{1,0:T(2,128)(2,1)S(1)} parameter(0)
  %q1 = bf16[64,256]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %dot = bf16[1,256]{1,0:T(2,128)(2,1)} dot(%q0, %q1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (r0: bf16[32,256], r1: bf16[1,256], r2: s32[]) -> bf16[32,256] {
  %r0 = bf16[32,256]{1,0:T(8,128)(2,1)} parameter(0)
  %r1 = bf16[1,256]{1,0:T(2,128)(2,1)} parameter(1)
  %r2 = s32[]{:T(128)} parameter(2)
  %z = s32[]{:T(128)} constant(0)
  ROOT %dus = bf16[32,256]{1,0:T(8,128)(2,1)} dynamic-update-slice(%r0, %r1, %r2, %z)
}

%body (b: (s32[], f32[64])) -> (s32[], f32[64]) {
  %b = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%b), index=0
  %v = f32[64]{0} get-tuple-element(%b), index=1
  %neg = f32[64]{0} negate(%v)
  ROOT %t = (s32[], f32[64]{0}) tuple(%i, %neg)
}

%cond (c: (s32[], f32[64])) -> pred[] {
  %c = (s32[], f32[64]{0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

ENTRY %main (emb: bf16[1000,64], w: bf16[64,256], cache: bf16[32,256], pos: s32[], v: f32[64]) -> bf16[32,256] {
  %emb = bf16[1000,64]{1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[64,256]{1,0:T(8,128)(2,1)} parameter(1)
  %cache = bf16[32,256]{1,0:T(8,128)(2,1)} parameter(2)
  %pos = s32[]{:T(128)} parameter(3)
  %v = f32[64]{0} parameter(4)
  %copy-start = (bf16[64,256]{1,0:T(8,128)(2,1)S(1)}, bf16[64,256]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w)
  %copy-done = bf16[64,256]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %row = bf16[1,64]{1,0:T(2,128)(2,1)S(1)} fusion(%emb, %pos), kind=kLoop, calls=%fused_take
  %h = bf16[1,256]{1,0:T(2,128)(2,1)} fusion(%row, %copy-done), kind=kOutput, calls=%fused_matvec
  %init = (s32[], f32[64]{0}) tuple(%pos, %v)
  %loop = (s32[], f32[64]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %new = bf16[32,256]{1,0:T(8,128)(2,1)} fusion(%cache, %h, %pos), kind=kLoop, calls=%fused_update
}
"""


def test_hbm_traffic_counts_hbm_arrays_once():
  from tandem_jax import aot
  r = aot.hbm_traffic(_TPU_STYLE_HLO)
  weight, row, h = 64 * 256 * 2, 64 * 2, 256 * 2
  want = {"copy-start": weight,            # the prefetch reads the weight from HBM once; the fusion reads S(1)
          "fusion": row + h + h + h + 2 * 4,  # the gathered row (not the table), the matvec's HBM result, the
                                              # cache update: the new row read and written in place (not the whole
                                              # cache), and the position scalar read by two fusions
          "negate": 3 * 2 * 64 * 4}        # the loop body, 3 known iterations
  assert r["by_opcode"] == want and r["bytes"] == sum(want.values()) and r["unknown_trip_counts"] == 0
  # XLA-style accounting (every operand and result of every op) would count the table and the cache whole
  assert r["bytes"] < 1000 * 64 * 2 + 32 * 256 * 2


def test_hbm_traffic_of_cpu_programs():
  """On CPU (no memory spaces) the count is the top-level ops' operands and results, with a gathered row and an
  in-place update counted at their own size."""
  import jax
  import jax.numpy as jnp

  from tandem_jax import aot
  w = jnp.zeros((512, 256), jnp.float32)
  x = jnp.zeros((1, 512), jnp.float32)
  matvec = jax.jit(lambda w, x: x @ w).lower(w, x).compile()
  r = aot.hbm_traffic(matvec.as_text())["bytes"]
  assert w.nbytes <= r <= 1.1 * (w.nbytes + x.nbytes + 1024)
  table = jnp.zeros((4096, 256), jnp.float32)
  take = jax.jit(lambda t, i: jax.lax.dynamic_slice_in_dim(t, i, 1) * 2).lower(table, jnp.int32(3)).compile()
  assert aot.hbm_traffic(take.as_text())["bytes"] < table.nbytes / 100
  update = jax.jit(lambda c, r, i: jax.lax.dynamic_update_slice_in_dim(c, r, i, 0),
                   donate_argnums=0).lower(table, jnp.ones((1, 256)), jnp.int32(3)).compile()
  assert aot.hbm_traffic(update.as_text())["bytes"] < table.nbytes / 100


def test_hbm_traffic_by_model_part(tiny_report):
  """Each op's bytes go to the outermost of the model's named scopes in its op_name (the projection's keys to
  "projection", a backward matmul to its forward's part), else "other"; the parts add up to the total."""
  from tandem_jax.hlo_reading import scope_of
  assert scope_of("transpose(jvp(mlp))/dot_general") == "mlp"
  assert scope_of("jvp(projection)/attn_proj/dot_general") == "projection"
  assert scope_of("checkpoint/rematted_computation/attn_core/exp") == "attn_core"
  assert scope_of("mlp_norm/mul") == scope_of("add") == scope_of("copy-start") == "other"
  train = tiny_report["programs"]["train_step"]
  assert sum(train["hbm_by_scope"].values()) == pytest.approx(train["hbm_bytes"])
  assert set(train["hbm_by_scope"]) <= {"projection", "attn_proj", "attn_core", "mlp", "logits", "loss", "optimizer",
                                        "other"}
