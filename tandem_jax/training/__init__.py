"""Training: stages (what is trained/frozen, losses), the compiled program, checkpoints, data, the loop.

  build_train_program(config, mesh) -> TrainProgram     jitted step + abstract state (AOT-compilable, see program.py)
  train(config, workdir)                                 the loop behind `python -m tandem_jax.train`
  validate(config)                                       config errors, before anything is built
"""

from tandem_jax.training.program import TrainProgram, build_train_program
from tandem_jax.training.validate import ConfigError, validate


def train(config, workdir, **kw):
  from tandem_jax.training.loop import train as _train  # imports workdir.py, which imports this package
  return _train(config, workdir, **kw)


__all__ = ["ConfigError", "TrainProgram", "build_train_program", "train", "validate"]
