"""README command 1's path (`python -m tandem_jax.quickstart`) at --preset=tiny: a tiny random primary, the drafter
recipe, held-out prompts decoded by ar and tandem_speed with identical outputs; rerunning resumes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_tiny_runs_and_resumes(tmp_path):
  cmd = [sys.executable, "-m", "tandem_jax.quickstart", "--preset=tiny", f"--workdir={tmp_path}", "--num_prompts=2",
         "--max_new_tokens=8", "--block_len=2", "--repeats=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  for line in ("outputs identical to ar:   yes", "speedup:", "acceptance rate α:", "tokens per primary call:"):
    assert line in out.stdout, out.stdout
  res = json.load(open(os.path.join(tmp_path, "quickstart.json")))
  assert res["identical_outputs"] is True and res["prompts"] == 2 and res["speedup"] > 0
  assert "INFO" not in out.stdout and out.stdout.count("\n") < 40  # the user's lines, not library logs
  again = subprocess.run(cmd + ["--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed" not in again.stdout and "self-distillation data" not in again.stdout  # finished run reused
  assert json.loads(again.stdout[again.stdout.index("{"):])["identical_outputs"] is True
