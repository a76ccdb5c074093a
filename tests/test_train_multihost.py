"""Two CPU processes on localhost train the tiny primary together (jax.distributed, per-host batches), and a
SIGTERM to one of them stops both at the same step with one checkpoint (preemption on several hosts)."""

import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from conftest import COMPILE_FLAGS

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_and_stop_together_on_one_sigterm(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=COMPILE_FLAGS + " --xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  wd = tmp_path / "wd"
  cmd = [sys.executable, "-m", "tandem_jax.train", f"--config={ROOT}/configs/primary.py:tiny", f"--workdir={wd}",
         f"--config.data.tokenizer_cache={tmp_path / 'tok'}", "--config.train.steps=100000",
         "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=0",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  logs = [open(tmp_path / f"log{i}", "w+") for i in range(2)]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=logs[i],
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  metrics = wd / "metrics.jsonl"
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
      assert all(p.poll() is None for p in procs), (tmp_path / "log0").read_text()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # one host only: both must agree on the stop step
    for p in procs:
      p.wait(timeout=120)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  summary = json.loads(outputs[0].strip().splitlines()[-1])
  assert summary["stopped_early"] and summary["step"] >= 2
  assert max(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) == summary["step"]
