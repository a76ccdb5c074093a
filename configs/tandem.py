"""Stage `tandem`: Tandem-CE: M_L frozen from init.primary_workdir, M_S from init.secondary_workdir, projections random; CE at every position of the block-masked forward.

  python -m tandem_jax.train --config=configs/tandem.py:tiny --workdir=/tmp/tandem
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("tandem", arg)


def get_sweep(arg=None):
  """``python -m launch.sweep --config=configs/tandem.py:<preset>``: training γ x where the secondary reads M_L."""
  del arg
  return [{"tandem.block_len": g, "tandem.layer_map": m} for g in (2, 4) for m in ("proportional", "last")]
