"""Stage `llm_to_slm`: LLM-to-SLM: frozen M_L encodes the first prompt_len tokens, a trained projector adds them to M_S's prompt embeddings; loss on the rest.

  python -m tandem_jax.train --config=configs/llm_to_slm.py:tiny --workdir=/tmp/llm_to_slm
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base


def get_config(arg=None):
  return base.get_config("llm_to_slm", arg)
