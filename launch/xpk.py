"""Train on a GKE TPU cluster through xpk (https://github.com/AI-Hypercomputer/xpk), one or several slices.

  python -m launch.xpk --cluster=tpu-v5e --zone=us-west4-a --project=P --config=configs/tandem.py:v5e256 \
      --workdir=/tmp/runs/tandem --num_slices=2 --dry_run

Steps (``--steps``): ``cluster`` (``xpk cluster create``), ``workload`` (``xpk workload create``: xpk builds an
image from ``--base_docker_image`` plus this directory, then every host of every slice runs the same command,
which pip-installs the project with the ``tpu`` extra and trains), ``delete`` (the workload). With
``--num_slices`` > 1 xpk sets the Megascale (DCN) environment; see docs/tpu.md for the mesh that goes with it.
"""

from __future__ import annotations

import shlex

from absl import app, flags

import launch


STEPS = ("cluster", "workload", "delete")


def commands(*, cluster, zone, config, workdir, workload="tandem-train", project="", tpu_type="", num_slices=1,
             base_docker_image="python:3.11-slim", overrides=(), steps=("workload",)) -> list[list[str]]:
  bad = [s for s in steps if s not in STEPS]
  if bad:
    raise ValueError(f"--steps: unknown step(s) {bad}; choose from {STEPS}")
  if num_slices < 1:
    raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
  tpu = launch.accelerator_for(config, tpu_type)
  where = [f"--cluster={cluster}", f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  out = []
  for step in steps:
    if step == "cluster":
      out.append(["xpk", "cluster", "create", *where, f"--tpu-type={tpu}", f"--num-slices={num_slices}"])
    elif step == "workload":
      train = shlex.join(launch.train_command(config, workdir, overrides))
      out.append(["xpk", "workload", "create", *where, f"--workload={workload}", f"--tpu-type={tpu}",
                  f"--num-slices={num_slices}", f"--base-docker-image={base_docker_image}", "--script-dir=.",
                  f'--command=python3 -m pip install -q -e ".[tpu]" && {train}'])
    elif step == "delete":
      out.append(["xpk", "workload", "delete", *where, f"--workload={workload}"])
  return out


def define_flags():
  """Defines this launcher's flags (called by ``__main__`` only, so the module imports cleanly)."""
  flags.DEFINE_string("cluster", None, "GKE cluster name")
  flags.DEFINE_string("workload", "tandem-train", "workload name")
  flags.DEFINE_string("zone", None, "zone of the cluster")
  flags.DEFINE_string("project", "", "Google Cloud project (default: gcloud's)")
  flags.DEFINE_string("config", None, "configs/<stage>.py:<preset>")
  flags.DEFINE_string("workdir", None, "run directory inside the workload")
  flags.DEFINE_string("tpu_type", "", "e.g. v5litepod-16 (default: from the config preset)")
  flags.DEFINE_integer("num_slices", 1, "slices (multi-slice training over DCN when > 1)")
  flags.DEFINE_string("base_docker_image", "python:3.11-slim", "base image xpk adds this directory to")
  flags.DEFINE_multi_string("override", [], "config override key=value, passed as --config.key=value")
  flags.DEFINE_list("steps", ["workload"], "from cluster, workload, delete")
  flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
  flags.mark_flags_as_required(["cluster", "zone", "config", "workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  launch.run_all(commands(cluster=f.cluster, zone=f.zone, config=f.config, workdir=f.workdir,
                          workload=f.workload, project=f.project, tpu_type=f.tpu_type,
                          num_slices=f.num_slices, base_docker_image=f.base_docker_image,
                          overrides=f.override, steps=f.steps), f.dry_run)


if __name__ == "__main__":
  define_flags()
  app.run(main)
