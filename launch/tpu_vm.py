"""Create a Cloud TPU VM or pod slice, install this project on every worker and train on all of them.

  python -m launch.tpu_vm --name=tandem-v5e16 --zone=us-west4-a --config=configs/tandem.py:v5e16 \
      --workdir=/home/$USER/runs/tandem --override=init.primary_workdir=... --dry_run

Steps (``--steps``, in order): ``create`` the TPU VM (accelerator from the preset: v5e16 -> v5litepod-16,
v5e256 -> v5litepod-256), ``install`` (ships ``git archive HEAD`` to every worker and pip-installs it with the
``tpu`` extra), ``train`` (the same ``python3 -m tandem_jax.train`` on every worker: JAX runs one process per
host), ``delete``. ``--dry_run`` prints the exact commands and runs nothing.
"""

from __future__ import annotations

import shlex

from absl import app, flags

import launch


STEPS = ("create", "install", "train", "delete")


def commands(*, name, zone, config, workdir, project="", accelerator_type="", version="", spot=False,
             overrides=(), steps=("create", "install", "train"), archive="/tmp/tandem_jax.tar.gz") -> list[list[str]]:
  """The gcloud (and git) commands of ``steps``, as argument lists."""
  bad = [s for s in steps if s not in STEPS]
  if bad:
    raise ValueError(f"--steps: unknown step(s) {bad}; choose from {STEPS}")
  accel = launch.accelerator_for(config, accelerator_type)
  where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]

  def on_all_workers(command: str) -> list[str]:
    return tpu + ["ssh", name, *where, "--worker=all", f"--command={command}"]

  out = []
  for step in steps:
    if step == "create":
      out.append(tpu + ["create", name, *where, f"--accelerator-type={accel}",
                        f"--version={launch.runtime_for(accel, version)}"] + (["--spot"] if spot else []))
    elif step == "install":
      out.append(["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
      out.append(tpu + ["scp", archive, f"{name}:tandem_jax.tar.gz", *where, "--worker=all"])
      out.append(on_all_workers("mkdir -p ~/tandem_jax && tar -xzf ~/tandem_jax.tar.gz -C ~/tandem_jax && "
                                'cd ~/tandem_jax && python3 -m pip install -q -e ".[tpu]"'))
    elif step == "train":
      train = shlex.join(launch.train_command(config, workdir, overrides))
      out.append(on_all_workers(f"cd ~/tandem_jax && {train}"))
    elif step == "delete":
      out.append(tpu + ["delete", name, *where, "--quiet"])
  return out


def define_flags():
  """Defines this launcher's flags (called by ``__main__`` only, so the module imports cleanly)."""
  flags.DEFINE_string("name", None, "TPU VM name")
  flags.DEFINE_string("zone", None, "zone, e.g. us-west4-a (v5e) or us-east5-a (v5p)")
  flags.DEFINE_string("project", "", "Google Cloud project (default: gcloud's)")
  flags.DEFINE_string("config", None, "configs/<stage>.py:<preset>")
  flags.DEFINE_string("workdir", None, "run directory on the workers")
  flags.DEFINE_string("accelerator_type", "", "e.g. v5litepod-16 (default: from the config preset)")
  flags.DEFINE_string("version", "", "TPU VM runtime (default: by generation, e.g. v2-alpha-tpuv5-lite)")
  flags.DEFINE_bool("spot", False, "create a Spot TPU VM (preemptible; training resumes from checkpoints)")
  flags.DEFINE_multi_string("override", [], "config override key=value, passed as --config.key=value")
  flags.DEFINE_list("steps", ["create", "install", "train"], "from create, install, train, delete")
  flags.DEFINE_string("archive", "/tmp/tandem_jax.tar.gz", "local path of the shipped source archive")
  flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
  flags.mark_flags_as_required(["name", "zone", "config", "workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  launch.run_all(commands(name=f.name, zone=f.zone, config=f.config, workdir=f.workdir,
                          project=f.project, accelerator_type=f.accelerator_type, version=f.version,
                          spot=f.spot, overrides=f.override, steps=f.steps,
                          archive=f.archive), f.dry_run)


if __name__ == "__main__":
  define_flags()
  app.run(main)
