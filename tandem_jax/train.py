"""Train any stage: ``python -m tandem_jax.train --config=configs/<stage>.py:<preset> --workdir=DIR [--config.x=y]``.

Resumes from the workdir's latest checkpoint; SIGTERM saves and exits. For several hosts pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every host.
"""

from __future__ import annotations

import json
import logging

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<preset>", lock_config=True,
                                          allow_override=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, config.json)", allow_override=True)
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-process: coordinator host:port", allow_override=True)
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes", allow_override=True)
_PID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index", allow_override=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  if _COORD.value:
    jax.distributed.initialize(_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  from tandem_jax.training import loop
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    summary = {k: result[k] for k in ("step", "train", "eval", "stopped_early", "seconds")}
    print(json.dumps(summary))


if __name__ == "__main__":
  from tandem_jax import cli
  cli.run(main, "train")
