"""Launchers: Cloud TPU VMs (``launch.tpu_vm``), GKE through xpk (``launch.xpk``) and config sweeps (``launch.sweep``).

Every launcher builds its commands as argument lists first, so ``--dry_run`` prints exactly what would run.
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Sequence

Command = Sequence[str]

# Accelerator names of a config preset (configs/base.py) on Cloud TPU, and the TPU VM runtime of each generation.
PRESET_ACCELERATORS = {"v5e16": "v5litepod-16", "v5e256": "v5litepod-256"}
RUNTIMES = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
            "v4": "tpu-ubuntu2204-base"}


def preset_of(config: str) -> str:
  """``configs/tandem.py:v5e16`` -> ``v5e16`` (``tiny`` when no preset is given)."""
  return config.split(":", 1)[1].split(",")[0] if ":" in config else "tiny"


def accelerator_for(config: str, accelerator_type: str = "") -> str:
  if accelerator_type:
    return accelerator_type
  preset = preset_of(config)
  if preset not in PRESET_ACCELERATORS:
    raise ValueError(f"no default accelerator for preset {preset!r}; pass --accelerator_type (e.g. v5litepod-16) "
                     f"or use one of {sorted(PRESET_ACCELERATORS)}")
  return PRESET_ACCELERATORS[preset]


def runtime_for(accelerator_type: str, version: str = "") -> str:
  if version:
    return version
  family = accelerator_type.rsplit("-", 1)[0]
  if family not in RUNTIMES:
    raise ValueError(f"no default TPU runtime for accelerator {accelerator_type!r}; pass --version")
  return RUNTIMES[family]


def train_command(config: str, workdir: str, overrides: Sequence[str] = (), python: str = "python3") -> list[str]:
  """``python -m tandem_jax.train`` with ``--config.<key>=<value>`` for each ``key=value`` override."""
  cmd = [python, "-m", "tandem_jax.train", f"--config={config}", f"--workdir={workdir}"]
  for o in overrides:
    if "=" not in o:
      raise ValueError(f"override {o!r} must look like key=value (e.g. train.steps=100)")
    cmd.append(f"--config.{o}")
  return cmd


def run_all(commands: Sequence[Command], dry_run: bool, echo=print) -> None:
  """Prints each command (shell-quoted); unless ``dry_run`` runs it, stopping at the first failure."""
  for cmd in commands:
    echo(shlex.join(cmd))
    if not dry_run:
      subprocess.run(list(cmd), check=True)
