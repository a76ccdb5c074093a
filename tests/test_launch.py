"""Launchers print the exact commands with --dry_run; sweeps expand, run and tabulate (with a fake trainer)."""

import json
import os
import subprocess
import sys

import pytest

import launch
from launch import sweep, tpu_vm, xpk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip().splitlines()


def test_tpu_vm_dry_run_prints_create_install_train():
  lines = _cli("launch.tpu_vm", "--name=tj", "--zone=us-west4-a", "--project=p", "--config=configs/tandem.py:v5e16",
               "--workdir=/w", "--override=train.steps=10", "--spot", "--steps=create,install,train,delete",
               "--dry_run")
  assert lines[0] == ("gcloud compute tpus tpu-vm create tj --zone=us-west4-a --project=p "
                      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot")
  assert lines[1] == "git archive --format=tar.gz --output=/tmp/tandem_jax.tar.gz HEAD"
  assert lines[2].startswith("gcloud compute tpus tpu-vm scp /tmp/tandem_jax.tar.gz tj:tandem_jax.tar.gz")
  assert "--worker=all" in lines[3] and 'pip install -q -e ".[tpu]"' in lines[3]
  assert lines[4] == ("gcloud compute tpus tpu-vm ssh tj --zone=us-west4-a --project=p --worker=all "
                      "'--command=cd ~/tandem_jax && python3 -m tandem_jax.train --config=configs/tandem.py:v5e16 "
                      "--workdir=/w --config.train.steps=10'")
  assert lines[5] == "gcloud compute tpus tpu-vm delete tj --zone=us-west4-a --project=p --quiet"


def test_xpk_dry_run_multislice():
  lines = _cli("launch.xpk", "--cluster=c", "--zone=us-west4-a", "--config=configs/tandem.py:v5e256", "--workdir=/w",
               "--num_slices=2", "--steps=cluster,workload,delete", "--dry_run")
  assert lines[0] == "xpk cluster create --cluster=c --zone=us-west4-a --tpu-type=v5litepod-256 --num-slices=2"
  assert lines[1].startswith("xpk workload create --cluster=c --zone=us-west4-a --workload=tandem-train "
                             "--tpu-type=v5litepod-256 --num-slices=2")
  assert "python3 -m tandem_jax.train --config=configs/tandem.py:v5e256 --workdir=/w" in lines[1]
  assert lines[2] == "xpk workload delete --cluster=c --zone=us-west4-a --workload=tandem-train"


def test_launch_errors_name_the_problem():
  with pytest.raises(ValueError, match="no default accelerator for preset 'tiny'"):
    tpu_vm.commands(name="n", zone="z", config="configs/tandem.py:tiny", workdir="/w")
  with pytest.raises(ValueError, match="unknown step"):
    xpk.commands(cluster="c", zone="z", config="configs/tandem.py:v5e16", workdir="/w", steps=("deploy",))
  with pytest.raises(ValueError, match="key=value"):
    launch.train_command("configs/tandem.py:tiny", "/w", ["train.steps"])


def test_sweep_expands_config_get_sweep(tmp_path):
  runs = sweep.expand("configs/tandem.py:tiny", str(tmp_path), {"init.primary_workdir": "/p"})
  assert [r["name"] for r in runs] == ["block_len=2,layer_map=proportional", "block_len=2,layer_map=last",
                                       "block_len=4,layer_map=proportional", "block_len=4,layer_map=last"]
  cmd = runs[3]["command"]
  assert cmd[1:5] == ["-m", "tandem_jax.train", "--config=configs/tandem.py:tiny", f"--workdir={runs[3]['workdir']}"]
  assert cmd[5:] == ["--config.init.primary_workdir=/p", "--config.tandem.block_len=4",
                     "--config.tandem.layer_map=last"]
  with pytest.raises(KeyError, match="train.stepz"):
    sweep.expand("configs/tandem.py:tiny", str(tmp_path), {"train.stepz": "1"})


def test_sweep_bad_get_sweep_key(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\nfrom configs import base\n"
                 "def get_config(arg=None):\n  return base.get_config('primary', arg)\n"
                 "def get_sweep():\n  return [{'train.lr': 1e-3}, {'model.width': 2}]\n")
  with pytest.raises(KeyError, match=r"get_sweep\(\)\[1\]: override 'model.width'"):
    sweep.expand(f"{cfg}:tiny", str(tmp_path))


def test_sweep_runs_locally_and_gathers_final_metrics(tmp_path):
  runs = sweep.expand("configs/tandem.py:tiny", str(tmp_path))[:2]
  calls = []

  def fake_train(cmd, stdout, stderr):
    calls.append(cmd)
    workdir = next(c.split("=", 1)[1] for c in cmd if c.startswith("--workdir="))
    loss = 1.0 + len(calls)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "split": "train", "loss": 9.0}) + "\n")
      f.write(json.dumps({"step": 3, "split": "train", "loss": loss}) + "\n")
      f.write(json.dumps({"step": 3, "split": "eval", "loss": loss + 0.5, "accuracy": 0.25}) + "\n")
    return subprocess.CompletedProcess(cmd, 0 if len(calls) == 1 else 3)

  statuses = sweep.run_local(runs, runner=fake_train, echo=lambda *_: None)
  assert len(calls) == 2 and statuses[0] == "ok" and statuses[1].startswith("failed (exit 3")
  rows = sweep.table(runs, statuses)
  assert rows[0]["train/loss"] == 2.0 and rows[1]["eval/loss"] == 3.5 and rows[0]["step"] == 3
  assert rows[0]["tandem.block_len"] == 2
  md = sweep.markdown(rows)
  assert "| run | tandem.block_len | tandem.layer_map | status | step | train/loss | eval/loss | eval/accuracy |" in md
  # A rerun skips runs that already have metrics.
  assert sweep.run_local(runs, runner=fake_train, echo=lambda *_: None) == ["skipped", "skipped"]
  assert len(calls) == 2


def test_sweep_cli_dry_run_for_tpu():
  lines = _cli("launch.sweep", "--config=configs/tandem.py:v5e16", "--workdir_root=/r", "--dry_run",
               "--tpu_name=tj", "--zone=z")
  assert len(lines) == 4 and all(l.startswith("gcloud compute tpus tpu-vm ssh tj --zone=z --worker=all") for l in lines)
  assert "--config.tandem.block_len=4 --config.tandem.layer_map=last'" in lines[3]
