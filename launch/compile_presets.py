"""Compile every stage of the TPU presets for their topologies (deviceless) and tabulate fit and estimates.

  python -m launch.compile_presets --out_dir=/tmp/aot_presets [--presets=v5e16,v5e256] [--stages=...]

Runs ``tandem_jax.aot`` for each (preset, stage): the ``tandem`` stage compiles its train step, the whole decode
programs and the per-call programs (projection at ``--acceptance``; with ``--check_depth``, the default, each
per-call program is also compiled unrolled at full depth to check the depth extrapolation); the other stages their
train step. Each report is written to ``<out_dir>/<stage>_<preset>.json`` (the same JSON as ``python -m
tandem_jax.aot --json``); runs whose JSON already exists are reused, so an interrupted sweep continues. Prints three
markdown tables (train steps, their HBM traffic by model part, decode calls; docs/tpu.md §3). Needs the
``tpu`` extra (libtpu). Every number is an XLA cost-model estimate from a deviceless compile, not a TPU
measurement. Exit code 2 if any program does not fit its chip.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

TOPOLOGY = {"v5e16": "v5e:4x4", "v5e256": "v5e:16x16"}
STAGES = ("tandem", "primary", "secondary", "secondary_distil", "tandem_distil", "llm_to_slm", "router")

flags.DEFINE_string("out_dir", None, "directory for the per-run JSON reports (reused when present)")
flags.DEFINE_list("presets", list(TOPOLOGY), f"TPU presets, from {list(TOPOLOGY)}")
flags.DEFINE_list("stages", list(STAGES), f"stages, from {list(STAGES)}")
flags.DEFINE_string("acceptance", "0.75", "α for the tandem stage's projected speedup (number or results.json)")
flags.DEFINE_bool("check_depth", True, "tandem stage: also compile each per-call program unrolled at full depth")


def compile_one(stage: str, preset: str, acceptance: str, check_depth: bool = True) -> dict:
  from configs import base
  from tandem_jax import aot
  groups = ("train", "decode", "calls") if stage == "tandem" else ("train",)
  t0 = time.perf_counter()
  report = aot.run(base.get_config(stage, preset), TOPOLOGY[preset], groups=groups,
                   acceptance=acceptance if stage == "tandem" else None,
                   check_depth=check_depth and stage == "tandem")
  report["wall_seconds"] = time.perf_counter() - t0
  return report


def summary_table(reports: dict) -> str:
  """Three markdown tables: one row per (preset, stage) for the train step (HBM, fit, XLA's estimates, MFU by HBM
  traffic); the train step's HBM traffic by model part; one row per decode call of each preset's tandem stage (how
  far from the roofline, the depth extrapolation against the unrolled compile, the projected speedup)."""
  from tandem_jax import tpu_estimates as tp
  gib = lambda b: f"{b / tp.GIB:.2f}"  # noqa: E731
  pct = lambda r, k: f"{100 * r[k]:.1f}%" if k in r else "-"  # noqa: E731
  lines = [f"_{tp.LABEL}_", "",
           "| preset | topology | stage | train HBM GiB/chip | fits | est. ms/step (XLA) | MFU: XLA FLOPs / useful "
           "FLOPs (XLA time) | HBM traffic GB/chip/step | ms/step by HBM traffic | MFU useful (HBM time) | "
           "tokens/s (XLA est.) | compile wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (preset, stage), r in reports.items():
    train = r["programs"].get("train_step", {})
    mem = gib(train["memory"]["total"]) if "memory" in train else "-"
    fits = "yes" if train.get("fits") else "**NO**"
    est = f"{train['step_ms']:.0f}" if "step_ms" in train else "-"
    mfu = f"{pct(train, 'mfu')} / {pct(train, 'mfu_useful')}"
    hbm = f"{train['hbm_bytes'] / 1e9:,.0f}" if "hbm_bytes" in train else "-"
    hbm_ms = f"{train['hbm_seconds'] * 1e3:.0f}" if "hbm_seconds" in train else "-"
    tps = f"{train['tokens_per_second']:,.0f}" if "tokens_per_second" in train else "-"
    wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-"
    lines.append(f"| {preset} | {r['topology']} | {stage} | {mem} | {fits} | {est} | {mfu} | {hbm} | {hbm_ms} | "
                 f"{pct(train, 'mfu_useful_hbm')} | {tps} | {wall} |")
  from tandem_jax.models.layers import SCOPES
  parts = SCOPES + ("other",)
  lines += ["", "Train step HBM traffic by model part (GB/chip/step; forward, backward and remat recompute together):",
            "", "| preset | stage | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
  for (preset, stage), r in reports.items():
    by = r["programs"].get("train_step", {}).get("hbm_by_scope")
    if by:
      gb = [round(by.get(p, 0.0) / 1e9, 1) + 0.0 for p in parts]  # + 0.0: no "-0.0"
      lines.append(f"| {preset} | {stage} | " + " | ".join(f"{x:,.1f}" for x in gb) + " |")
  lines += ["", "| preset | decode mesh, batch | program | bytes accessed / minimum (XLA) | HBM traffic / minimum "
            "(extrapolated; unrolled) | est. ms / roofline ms (XLA) | decode HBM GiB/chip (ar / tandem_speed / "
            "adaptive) | projected best speedup |",
            "|---|---|---|---|---|---|---|---|"]
  for (preset, stage), r in reports.items():
    progs = r["programs"]
    if "primary_step" not in progs:
      continue
    dec = [progs.get(n) for n in ("decode_ar", "decode_tandem_speed", "decode_tandem_speed_adaptive")]
    dec = " / ".join(gib(d["memory"]["total"]) for d in dec if d and "memory" in d) or "-"
    proj = r.get("projection")
    best = "-"
    if proj:
      row = max(proj["rows"], key=lambda x: x["projected_speedup"])
      best = f"{row['projected_speedup']:.2f}x (γ={row['gamma']}, α={proj['acceptance']:.2f})"
    mesh = "x".join(str(v) for v in r.get("decode_mesh", {}).values())
    for name in ("primary_step", "primary_block", "secondary_step"):
      rf = progs.get(name, {}).get("roofline")
      if not rf:
        continue
      unrolled = progs[name].get("unrolled", {})
      unr = f"{unrolled['hbm_over_min']:.2f}x" if "hbm_over_min" in unrolled else "-"
      lines.append(f"| {preset} | {mesh}, {r['decode']['batch']} | {name} | {rf['bytes_over_min']:.2f}x | "
                   f"{rf.get('hbm_over_min', float('nan')):.2f}x; {unr} | {rf['ms_over_roofline']:.2f}x | {dec} | "
                   f"{best} |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.out_dir:
    raise app.UsageError("--out_dir is required")
  bad = [p for p in f.presets if p not in TOPOLOGY] + [s for s in f.stages if s not in STAGES]
  if bad:
    raise app.UsageError(f"unknown preset(s)/stage(s) {bad}; presets {list(TOPOLOGY)}, stages {list(STAGES)}")
  os.makedirs(f.out_dir, exist_ok=True)
  reports = {}
  for preset in f.presets:
    for stage in f.stages:
      path = os.path.join(f.out_dir, f"{stage}_{preset}.json")
      if os.path.exists(path) and os.path.getsize(path):
        with open(path) as fh:
          reports[(preset, stage)] = json.load(fh)
        continue
      print(f"compiling {stage}:{preset} for {TOPOLOGY[preset]} ...", file=sys.stderr, flush=True)
      reports[(preset, stage)] = report = compile_one(stage, preset, f.acceptance, f.check_depth)
      with open(path, "w") as fh:
        json.dump(report, fh, indent=1, default=float)
  print(summary_table(reports))
  failures = [e for r in reports.values() for e in r["failures"]]
  if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
