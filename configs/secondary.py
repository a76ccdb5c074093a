"""Stage `secondary`: The standalone secondary M_S (the paper's Gecko baseline); set init.primary_workdir to also report agreement/TV with M_L.

  python -m tandem_jax.train --config=configs/secondary.py:tiny --workdir=/tmp/secondary
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("secondary", arg)
