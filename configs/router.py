"""Stage `router`: Adaptive block-length router: labels TV(q, p) from a trained tandem (init.tandem_workdir), soft BCE.

  python -m tandem_jax.train --config=configs/router.py:tiny --workdir=/tmp/router
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("router", arg)
