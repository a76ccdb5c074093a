"""Two CPU processes on localhost train the tiny primary together (jax.distributed, per-host batches)."""

import os
import subprocess
import sys

import portpicker
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_a_few_steps(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  wd = tmp_path / "wd"
  cmd = [sys.executable, "-m", "tandem_jax.train", f"--config={ROOT}/configs/primary.py:tiny", f"--workdir={wd}",
         f"--config.data.tokenizer_cache={tmp_path / 'tok'}", "--config.train.steps=2",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert '"step": 2' in outputs[0]
  assert (wd / "checkpoints" / "2").is_dir() and (wd / "metrics.jsonl").is_file()
