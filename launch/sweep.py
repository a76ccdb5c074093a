"""Expand a config file's ``get_sweep()`` into runs, run them (locally, one after another) and tabulate them.

  python -m launch.sweep --config=configs/tandem.py:tiny --workdir_root=/tmp/sweep \
      --override=init.primary_workdir=/tmp/primary --override=init.secondary_workdir=/tmp/secondary --local

A config file may define ``get_sweep(arg)`` (or ``get_sweep()``) returning a list of override dicts such as
``{"tandem.block_len": 4, "tandem.layer_map": "last"}``; each becomes one run in ``<workdir_root>/<run name>``.
``--override`` values apply to every run, sweep values win. Every override is checked against the config before
anything runs. Modes: ``--dry_run`` prints the commands (``--tpu_name``/``--zone`` turn them into TPU VM commands,
see launch.tpu_vm); ``--local`` runs ``python -m tandem_jax.train`` in a subprocess per run, skipping runs whose
workdir already holds final metrics; with neither, only the table of existing results is gathered. The table
holds each run's last train and eval metrics from ``<workdir>/metrics.jsonl`` (markdown, or ``--json``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

import launch
from launch import tpu_vm



def load_config_module(path: str):
  """Imports a config file by path (as ml_collections' config_flags does)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"sweep_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_overrides(items) -> dict:
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
    key, value = item.split("=", 1)
    out[key.strip()] = value
  return out


def run_name(overrides: dict) -> str:
  """``{"tandem.block_len": 4, "tandem.layer_map": "last"}`` -> ``block_len=4,layer_map=last``."""
  if not overrides:
    return "base"
  parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(parts))


def _check_keys(config, overrides: dict, source: str):
  for key in overrides:
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        raise KeyError(f"{source}: override {key!r} is not a config field (config.{key} does not exist)")
      node = node[part]


def expand(config_arg: str, workdir_root: str, common: dict | None = None) -> list[dict]:
  """Runs of ``config_arg`` (``file.py:preset``): each {"name", "overrides", "workdir", "command"}."""
  path, _, arg = config_arg.partition(":")
  module = load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(); add one returning a list of override dicts")
  get_sweep = module.get_sweep
  sweep = get_sweep(arg or None) if inspect.signature(get_sweep).parameters else get_sweep()
  if not isinstance(sweep, (list, tuple)) or not all(isinstance(s, dict) for s in sweep):
    raise TypeError(f"{path}: get_sweep() must return a list of dicts, got {type(sweep).__name__}")
  config = module.get_config(arg or None)
  common = dict(common or {})
  _check_keys(config, common, "--override")
  runs, seen = [], set()
  for i, point in enumerate(sweep):
    _check_keys(config, point, f"{path}: get_sweep()[{i}]")
    name = run_name(point)
    if name in seen:
      raise ValueError(f"{path}: get_sweep() repeats the run {name!r}")
    seen.add(name)
    merged = {**common, **point}
    workdir = os.path.join(workdir_root, name)
    args = [f"{k}={v}" for k, v in merged.items()]
    command = launch.train_command(config_arg, workdir, args, python=sys.executable)
    runs.append(dict(name=name, overrides=point, workdir=workdir, command=command, override_args=args))
  return runs


def final_metrics(workdir: str) -> dict:
  """The last train and last eval records of ``workdir/metrics.jsonl`` ({} when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          rec = json.loads(line)
          last[rec.get("split", "train")] = rec
  out = {}
  for split, rec in last.items():
    out["step" if "step" not in out else f"{split}/step"] = rec.get("step")
    out.update({f"{split}/{k}": v for k, v in rec.items() if k not in ("step", "split")})
  return out


def run_local(runs: list[dict], runner=subprocess.run, echo=print) -> list[dict]:
  """Runs each run's command in turn (a failure is recorded, the sweep goes on); returns the statuses."""
  statuses = []
  for i, r in enumerate(runs):
    if final_metrics(r["workdir"]):
      echo(f"[{i + 1}/{len(runs)}] {r['name']}: has metrics, skipped (delete {r['workdir']} to rerun)")
      statuses.append("skipped")
      continue
    echo(f"[{i + 1}/{len(runs)}] {r['name']}: {' '.join(r['command'])}")
    t0 = time.time()
    os.makedirs(r["workdir"], exist_ok=True)
    with open(os.path.join(r["workdir"], "sweep.log"), "w") as log:
      rc = runner(r["command"], stdout=log, stderr=subprocess.STDOUT).returncode
    statuses.append("ok" if rc == 0 else f"failed (exit {rc}, see {r['workdir']}/sweep.log)")
    echo(f"[{i + 1}/{len(runs)}] {r['name']}: {statuses[-1]} in {time.time() - t0:.0f}s")
  return statuses


def table(runs: list[dict], statuses=None) -> list[dict]:
  rows = []
  for i, r in enumerate(runs):
    row = {"run": r["name"], **{k: v for k, v in r["overrides"].items()}}
    if statuses is not None:
      row["status"] = statuses[i]
    row.update(final_metrics(r["workdir"]))
    rows.append(row)
  return rows


_SHOWN = ("step", "train/loss", "eval/loss", "eval/accuracy", "eval/agreement", "eval/tv")


def markdown(rows: list[dict]) -> str:
  keys = []
  for row in rows:
    for k in row:
      if k not in keys and (k in _SHOWN or not ("/" in k or k == "step")):
        keys.append(k)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
  return "\n".join(lines)


def define_flags():
  """Defines this launcher's flags (called by ``__main__`` only, so the module imports cleanly)."""
  flags.DEFINE_string("config", None, "configs/<stage>.py:<preset> whose file defines get_sweep()")
  flags.DEFINE_string("workdir_root", None, "one workdir per run is made under it")
  flags.DEFINE_multi_string("override", [], "key=value applied to every run (sweep values win)")
  flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
  flags.DEFINE_bool("local", False, "run every run here, one after another, then tabulate")
  flags.DEFINE_bool("json", False, "print the table as JSON")
  flags.DEFINE_string("tpu_name", "", "with --dry_run: print TPU VM train commands for this VM")
  flags.DEFINE_string("zone", "", "zone of --tpu_name")
  flags.mark_flags_as_required(["config", "workdir_root"])


def main(argv):
  del argv
  f = flags.FLAGS
  runs = expand(f.config, f.workdir_root, parse_overrides(f.override))
  if f.dry_run:
    for r in runs:
      if f.tpu_name:
        cmds = tpu_vm.commands(name=f.tpu_name, zone=f.zone, config=f.config, workdir=r["workdir"],
                               overrides=r["override_args"], steps=("train",))
      else:
        cmds = [r["command"]]
      launch.run_all(cmds, dry_run=True)
    return
  statuses = run_local(runs) if f.local else None
  rows = table(runs, statuses)
  print(json.dumps(rows, indent=1) if f.json else markdown(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
