"""Stage `secondary_distil`: M_S with logit distillation from the frozen M_L (Gecko-Distil). Needs init.primary_workdir (teacher); init.secondary_workdir (optional) initialises the student.

  python -m tandem_jax.train --config=configs/secondary_distil.py:tiny --workdir=/tmp/secondary_distil
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("secondary_distil", arg)
