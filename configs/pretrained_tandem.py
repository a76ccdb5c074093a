"""Tandem-CE on an imported pretrained primary (docs/pretrained.md): M_L frozen from a `tandem_jax.convert` workdir,
a small secondary M_S with the same tokenizer trained on the embedded corpus.

  python -m tandem_jax.convert fetch-smollm2 --dir=~/.cache/tandem_jax/smollm2
  python -m tandem_jax.convert --gguf=~/.cache/tandem_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --max_seq_len=512 --workdir=~/tandem_runs/smollm2
  python -m tandem_jax.train --config=configs/pretrained_tandem.py:cpu --workdir=~/tandem_runs/smollm2_tandem

``arg`` is ``preset[,primary=DIR]``: the preset (``tiny``: seconds, for tests; ``cpu``: minutes on 2 cores) and the
imported workdir (default ``~/tandem_runs/smollm2``). The primary's model config and vocabulary are read from that
workdir's config.json, so they always match the weights; the secondary is sized from the primary's vocabulary.
"""

import json
import os

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base
from tandem_jax.models.config import drafter_fields

DEFAULT_PRIMARY_WORKDIR = "~/tandem_runs/smollm2"

# Secondary sizes: SmolLM2-135M costs ~27 ms per decoded token here; a 2-layer d 128 secondary is ~10x cheaper
# despite its 49k-row embedding (which dominates its 6M+ parameters).
_PRESETS = {
    "tiny": dict(secondary=dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=64),
                 seq_len=17, batch_size=2, steps=2, warmup=1, max_documents=4, eval_batches=1, log_every=1,
                 checkpoint_every=2, eval_every=0),
    "cpu": dict(secondary=dict(d_model=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, d_ff=384),
                seq_len=65, batch_size=8, steps=300, warmup=30, max_documents=0, eval_batches=4, log_every=25,
                checkpoint_every=100, eval_every=100),
}


def parse(arg):
  preset, primary = "cpu", DEFAULT_PRIMARY_WORKDIR
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if part.startswith("primary="):
      primary = part[len("primary="):]
    elif part in _PRESETS:
      preset = part
    else:
      raise ValueError(f"configs/pretrained_tandem.py: unknown argument {part!r}; use one of {sorted(_PRESETS)} "
                       "and optionally primary=DIR (an imported workdir), e.g. ':cpu,primary=/tmp/smollm2'")
  return preset, primary


def primary_model(workdir):
  """The ``primary`` model config of an imported workdir (written by ``python -m tandem_jax.convert``)."""
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: import a model first with `python -m tandem_jax.convert "
                            f"--gguf=FILE --workdir={workdir}` (see docs/pretrained.md)")
  with open(path) as fh:
    return json.load(fh)["primary"]


def get_config(arg=None):
  preset, primary_workdir = parse(arg)
  p = _PRESETS[preset]
  c = base.get_config("tandem", "tiny" if preset == "tiny" else "cpu")
  primary = primary_model(primary_workdir)
  vocab = primary["vocab_size"]
  # The secondary's own sizes; the vocabulary, positions and family switches (Gemma's norms and soft-caps, Qwen3's
  # q/k norms, Llama 3's RoPE scaling, sliding-window layers) are the primary's.
  secondary = dict(c.secondary.to_dict(), **p["secondary"])
  secondary.update(drafter_fields(primary, secondary["head_dim"]))
  with c.unlocked():
    c.primary = primary
    c.secondary = secondary
    c.data.vocab_size = vocab
    c.data.seq_len = p["seq_len"]
    c.data.max_documents = p["max_documents"]
    c.init.primary_workdir = primary_workdir
    for key in ("batch_size", "steps", "eval_batches", "log_every", "checkpoint_every", "eval_every"):
      c.train[key] = p[key]
    c.train.warmup_steps = p["warmup"]
  c.lock()
  return c
