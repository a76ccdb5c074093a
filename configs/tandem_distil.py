"""Stage `tandem_distil`: Tandem-Distil (stage 2): continues a Tandem-CE workdir (init.tandem_workdir) with λ·CE(GT) + (1-λ)·CE(M_L, M_S).

  python -m tandem_jax.train --config=configs/tandem_distil.py:tiny --workdir=/tmp/tandem_distil
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("tandem_distil", arg)
