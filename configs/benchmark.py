"""The benchmark: which models to train, for how long, and how to time their decoding.

  python -m tandem_jax.benchmark --workdir=/tmp/bench --config=configs/benchmark.py:cpu
  python -m tandem_jax.benchmark --workdir=/tmp/bench_smoke --config=configs/benchmark.py:smoke

``cpu`` (default): the ``cpu`` training preset's primary (4 layers, d 256, ~5M params) and secondary (2 layers, d
128, ~1.4M), plus a mid-size primary-stage model (3 layers, d 192; the paper's Otter role) and the equal-steps
secondary control; 37 minutes of training on 2 cores without AVX-512 (52 minutes in all from scratch), the decode
part (quality, per-call costs, decoding) 12.5 minutes (750 s) when it compiles everything and 8 minutes (482 s) on a
rerun whose programs are in the workdir's compilation cache (BENCHMARKS.md).
``smoke``: the ``tiny`` preset's models and a handful of steps; the whole pipeline in about 3 minutes (CI).
"""

try:
  from configs import base
except ImportError:  # loaded by path (config_flags) from outside the repository root
  import os, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import base

import ml_collections

BENCH_PRESETS = ("cpu", "smoke", "smollm2", "smollm2_smoke")
REAL_PRESETS = ("smollm2", "smollm2_smoke")  # tandem_jax.bench.real: a pretrained primary and the drafter recipe
# Stages in training order; "mid" is a second primary-stage run at the mid size; "secondary_long" continues the
# trained secondary alone for as many steps as Tandem-CE continues it (both start from `secondary`): the
# equal-training control for Table 1.
STAGES = ("primary", "mid", "secondary", "secondary_long", "secondary_distil", "tandem", "tandem_distil", "router")
BASE_STAGE = {"mid": "primary", "secondary_long": "secondary"}


def get_config(arg=None):
  preset = (arg or "cpu").strip()
  if preset not in BENCH_PRESETS:
    raise ValueError(f"unknown benchmark preset {preset!r}; choose one of {BENCH_PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  if preset in REAL_PRESETS:
    return _real(c, preset)
  if preset == "cpu":
    c.train_preset = "cpu"  # configs/base.py preset the stage configs start from
    # Overrides of the preset's model dicts ({} = keep the preset's).
    c.models = dict(primary={}, secondary={},
                    mid=dict(num_layers=3, d_model=192, num_heads=3, num_kv_heads=1, head_dim=64, d_ff=576))
    c.steps = dict(primary=600, mid=300, secondary=300, secondary_long=150, secondary_distil=150, tandem=150,
                   tandem_distil=150, router=60)
    c.gamma_max = 8  # K: the adaptive router's cap (fixed-γ cells are compiled for their own γ)
    c.eval_batches = 16  # validation batches (x train batch size 16 rows of 128 targets) for Tables 1 and 3
    c.decode = dict(num_prompts=16, prompt_len=32, max_new_tokens=64, batch_sizes=(1, 8), temperatures=(0.0, 1.0),
                    gammas=(1, 2, 3, 4, 5, 6, 7, 8), repeats=5, batch1_prompts=6, standalone_block_len=3,
                    hist_gamma=5, seed=0, tune_prompts=6, thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    c.cost = dict(calls=64, repeats=3)  # per-call microbenchmark (c, verify cost vs block length)
  else:
    c.train_preset = "tiny"
    c.models = dict(primary={}, secondary={}, mid=dict(num_layers=1))
    c.steps = dict(primary=2, mid=2, secondary=2, secondary_long=1, secondary_distil=1, tandem=1, tandem_distil=1,
                   router=1)
    c.gamma_max = 2
    c.eval_batches = 1
    c.decode = dict(num_prompts=2, prompt_len=8, max_new_tokens=8, batch_sizes=(1,), temperatures=(0.0,),
                    gammas=(1, 2), repeats=1, batch1_prompts=1, standalone_block_len=2, hist_gamma=2, seed=0,
                    tune_prompts=1, thresholds=(0.5, 0.8))
    c.cost = dict(calls=2, repeats=1)
  # Router τ: keep drafting while the predicted acceptance is >= τ. 0.8 is the paper's; Table 4 also times the τ
  # of decode.thresholds that was fastest on decode.tune_prompts held-out validation prompts (() = only 0.8).
  c.threshold = 0.8
  c.tokenizer_cache = ""  # "" = <workdir>/tokenizer_cache (self-contained); or a shared cache directory
  c.plots = True  # PNG plots when matplotlib is installed (the optional extra `plots`)
  c.lock()
  return c


def _real(c, preset):
  """``smollm2``: Tandem + SPEED over pretrained SmolLM2-135M with the drafter recipe (tandem_jax/recipe.py ``cpu``
  preset, the quickstart's: running the quickstart first in the same workdir makes the tandem stage a reuse);
  ``smollm2_smoke``: the same pipeline on a tiny random primary in seconds (CI)."""
  tiny = preset == "smollm2_smoke"
  c.tiny = tiny
  c.recipe_preset = "tiny" if tiny else "cpu"
  c.recipe = {}  # RecipeConfig overrides of the preset ({} = the quickstart's recipe)
  c.gguf_dir = "~/.cache/tandem_jax/smollm2"
  c.gamma_max = 3 if tiny else 6  # K of the adaptive router
  # the router's sampled head learns on sampled_sequences of the primary's temperature-1 continuations
  # (recipe_router); its greedy head on the recipe's greedy data
  c.router = dict(steps=4 if tiny else 300, top_k=4, hidden=64, sampled_sequences=4 if tiny else 256)
  if tiny:
    c.decode = dict(num_prompts=2, max_new_tokens=8, batch_sizes=(1, 2), temperatures=(0.0, 1.0), gammas=(2, 3),
                    repeats=1, batch1_prompts=1, seed=0, tune_prompts=1, thresholds=(0.5,), prompt_tokens=16,
                    auto_batches=(3,), auto_repeats=1, h2h_rounds=1)
    c.cost = dict(calls=2, repeats=1)
  else:
    c.decode = dict(num_prompts=24, max_new_tokens=64, batch_sizes=(1, 8), temperatures=(0.0, 1.0),
                    gammas=(1, 2, 3, 4), repeats=2, batch1_prompts=6, seed=0, tune_prompts=3,
                    thresholds=(0.5, 0.7, 0.8), prompt_tokens=0,  # 0: whole prompts
                    # auto vs ar (and ar again) only, on 24-token prompts of the recipe's validation rows; one
                    # call a round there, so more rounds than the other settings (2 rounds: up to 9% apart)
                    auto_batches=(40,), auto_repeats=5,
                    # the head-to-head phase (bench.real.head_to_head): the auto targets' cells alone, call by
                    # call, this many rounds (0: no such phase)
                    h2h_rounds=8)
    c.cost = dict(calls=16, repeats=3)
  c.lock()
  return c


def stage_config(bench: ml_collections.ConfigDict, stage: str, tokenizer_cache: str) -> ml_collections.ConfigDict:
  """The training config of one benchmark stage (``mid`` = stage ``primary`` at the mid size)."""
  c = base.get_config(BASE_STAGE.get(stage, stage), bench.train_preset)
  c.primary.update(dict(bench.models.primary))
  c.secondary.update(dict(bench.models.secondary))
  if stage == "mid":
    c.primary.update(dict(bench.models.mid))
  c.train.steps = int(bench.steps[stage])
  c.train.eval_every = 0
  c.train.eval_batches = 0  # no evaluation in training: the benchmark's quality phase evaluates every model
  c.train.checkpoint_every = max(1, int(bench.steps[stage]))
  c.router.gamma_max = int(bench.gamma_max)
  c.router.threshold = float(bench.threshold)
  c.data.tokenizer_cache = tokenizer_cache
  return c
