"""Stage `primary`: Pretrain the primary M_L (standard next-token CE).

  python -m tandem_jax.train --config=configs/primary.py:tiny --workdir=/tmp/primary
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("primary", arg)
