"""Training: what each stage minimises, the compiled program, the run's inputs, evaluation, the loop.

  build_train_program(config, mesh) -> TrainProgram     jitted step + abstract state (AOT-compilable, see program.py)
  train(config, workdir)                                 the loop behind `python -m tandem_jax.train`
  validate(config)                                       config errors, before anything is built
"""

from tandem_jax.training.loop import train
from tandem_jax.training.program import TrainProgram, build_train_program
from tandem_jax.training.validate import ConfigError, validate


__all__ = ["ConfigError", "TrainProgram", "build_train_program", "train", "validate"]
