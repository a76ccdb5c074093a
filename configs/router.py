"""Stage `router`: adaptive block-length router: soft BCE on TV(q, p) (sampled head) and on argmax mismatch (greedy
head), labels from a trained tandem (init.tandem_workdir).

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
