"""Defaults shared by every stage, and the model presets (``tiny``, ``cpu``, ``v5e16``, ``v5e256``).

A stage file (``configs/<stage>.py``) calls :func:`get_config` with its stage name and the ``:arg`` preset::

  python -m tandem_jax.train --config=configs/tandem.py:cpu --workdir=/tmp/tandem \
      --config.init.primary_workdir=/tmp/primary --config.train.steps=500

The returned ConfigDict is locked: an unknown key in an override is an error naming it. Values are checked by
``tandem_jax.training.validate.validate`` before anything is compiled.
"""

from __future__ import annotations

import ml_collections

from tandem_jax.sharding import DEFAULT_RULES

STAGES = ("primary", "secondary", "secondary_distil", "tandem", "tandem_distil", "llm_to_slm", "router")
PRESETS = ("tiny", "cpu", "v5e16", "v5e256")


def _model(vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, max_seq_len, dtype="float32", scan=False):
  return dict(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
              head_dim=head_dim, d_ff=d_ff, max_seq_len=max_seq_len, rope_theta=10_000.0, norm_eps=1e-6,
              qkv_bias=False, tie_embeddings=True, param_dtype="float32", dtype=dtype, scan_layers=scan,
              remat=scan, attention_impl="plain", attention_block=512)  # --config.primary.attention_impl=blockwise


# Per preset: vocabulary, sequence length, models, batch, steps per stage, mesh.
# tiny: runs in seconds (tests). cpu: a 4-layer d256 primary (~6M params) and a 2-layer d128 secondary (~10x
# cheaper per decoded token, ENVIRONMENT.md), trained in minutes on 2 cores. v5e16 / v5e256: PaLM2-like ratios
# (the secondary ~1/10-1/20 of the primary's parameters), layers scanned (one layer body per program: compiles in
# minutes instead of tens of minutes) and rematerialised in training; `python -m tandem_jax.aot` compiles them;
# they decode with bf16 weights on a (data, fsdp, model) = (hosts, 1, 4) mesh (config.serving).
_PRESETS = {
    "tiny": dict(
        vocab=384, seq_len=33, max_documents=6,
        primary=lambda v: _model(v, 32, 2, 4, 2, 8, 64, 64),
        secondary=lambda v: _model(v, 16, 2, 2, 1, 8, 32, 64),
        batch_size=8, steps=3, warmup=1, lr=3e-3, eval_every=0, eval_batches=2, checkpoint_every=2, log_every=1,
        mesh_shape=(-1, 1), mesh_axes=("data", "model"), projector_hidden=32, prompt_len=8, gamma_max=4),
    "cpu": dict(
        vocab=8192, seq_len=129, max_documents=0,
        primary=lambda v: _model(v, 256, 4, 4, 2, 64, 768, 512),
        secondary=lambda v: _model(v, 128, 2, 2, 1, 64, 384, 512),
        batch_size=16, steps=400, warmup=40, lr=2e-3, eval_every=200, eval_batches=8, checkpoint_every=200,
        log_every=25, mesh_shape=(-1, 1), mesh_axes=("data", "model"), projector_hidden=256, prompt_len=32,
        gamma_max=8),
    "v5e16": dict(
        vocab=32768, seq_len=2049, max_documents=0,
        primary=lambda v: _model(v, 2048, 24, 16, 8, 128, 8192, 2048, "bfloat16", scan=True),
        secondary=lambda v: _model(v, 768, 8, 6, 2, 128, 3072, 2048, "bfloat16", scan=True),
        batch_size=64, steps=20_000, warmup=1000, lr=3e-4, eval_every=1000, eval_batches=16,
        checkpoint_every=1000, log_every=50, mesh_shape=(1, -1, 1), mesh_axes=("data", "fsdp", "model"),
        serving_dtype="bfloat16", decode_mesh=(4, 1, 4),
        projector_hidden=1536, prompt_len=512, gamma_max=17),
    "v5e256": dict(
        vocab=32768, seq_len=2049, max_documents=0,
        primary=lambda v: _model(v, 4096, 32, 32, 8, 128, 14336, 2048, "bfloat16", scan=True),
        secondary=lambda v: _model(v, 1536, 12, 12, 4, 128, 6144, 2048, "bfloat16", scan=True),
        batch_size=256, steps=50_000, warmup=2000, lr=2e-4, eval_every=2000, eval_batches=16,
        checkpoint_every=1000, log_every=50, mesh_shape=(1, -1, 4), mesh_axes=("data", "fsdp", "model"),
        serving_dtype="bfloat16", decode_mesh=(64, 1, 4),
        projector_hidden=3072, prompt_len=512, gamma_max=27),
}

# Stages that continue from trained models run fewer steps than pretraining ("a small number of additional steps").
_STEP_FRACTION = {"primary": 1.0, "secondary": 1.0, "secondary_distil": 0.5, "tandem": 0.5, "tandem_distil": 0.5,
                  "llm_to_slm": 0.5, "router": 0.25}


def parse_arg(arg: str | None) -> str:
  preset = (arg or "tiny").strip()
  if preset not in _PRESETS:
    raise ValueError(f"unknown config preset {preset!r}; choose one of {PRESETS} (e.g. configs/tandem.py:cpu)")
  return preset


def get_config(stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of ``stage`` at preset ``arg`` (default ``tiny``)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
  name = parse_arg(arg)
  p = _PRESETS[name]
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.preset = name
  c.primary = p["primary"](p["vocab"])
  c.secondary = p["secondary"](p["vocab"])

  c.tandem = dict(
      layer_map="proportional",  # "proportional", "last", or comma-separated primary hidden-state indices "0,2"
      boundary="fig1",  # "fig1" (Fig. 1 reading) or "eq2" (literal Eq. 2); see models/config.py
      block_len=2,  # training γ (paper: 2)
      projection_bias=False)
  c.llm_to_slm = dict(projector_hidden=p["projector_hidden"], prompt_len=p["prompt_len"])
  # sampling: the setting whose warped distributions the sampled head's label (TV) compares, as acceptance does;
  # decoding with another sampling setting refuses the router (greedy decoding reads the greedy head)
  c.router = dict(top_k=4, hidden=64, threshold=0.8, gamma_max=p["gamma_max"],
                  sampling=dict(temperature=1.0, top_k=0, top_p=1.0))

  c.data = dict(
      source="default",  # default | text | tfds | seqio
      path="",  # glob (text), dataset name (tfds), Task/Mixture name (seqio)
      vocab_size=p["vocab"],
      seq_len=p["seq_len"],  # tokens per packed row: seq_len - 1 inputs and targets
      val_fraction=0.05,
      seed=0,
      tokenizer_cache="~/.cache/tandem_jax/tokenizers",
      max_documents=p["max_documents"],  # 0 = all
      jsonl_field="text", text_field="", train_split="train", val_split="", data_dir="", seqio_module="")

  c.train = dict(
      batch_size=p["batch_size"],  # global, over all processes
      steps=max(1, int(p["steps"] * _STEP_FRACTION[stage])),
      lr=p["lr"] * (0.5 if stage in ("tandem_distil", "router") else 1.0) * (10.0 if stage == "router" else 1.0),
      warmup_steps=p["warmup"],
      weight_decay=0.1,
      grad_clip=1.0,
      eval_every=p["eval_every"],  # 0 = only at the end
      eval_batches=p["eval_batches"],  # 0 = no evaluation (then eval_every must be 0)
      checkpoint_every=p["checkpoint_every"],
      keep_checkpoints=3,
      log_every=p["log_every"],
      seed=0,
      distil_lambda=0.5,  # λ·CE(GT) + (1-λ)·CE(teacher, student)
      distil_temperature=1.0)

  c.init = dict(primary_workdir="", secondary_workdir="", tandem_workdir="")
  c.mesh = dict(shape=tuple(p["mesh_shape"]), axes=tuple(p["mesh_axes"]), rules=tuple(DEFAULT_RULES))
  # Decoding (tandem_jax.generate, the decode programs of tandem_jax.aot): weights cast once at load to `dtype`
  # ("": the training dtypes) and laid out on a mesh of `mesh_shape` over config.mesh.axes (empty: aot decodes on
  # the training mesh, generate on one device). TPU presets: bf16 weights, model-parallel inside a 4-chip host,
  # data across hosts, so no decode call all-gathers FSDP-sharded weights.
  c.serving = dict(dtype=p.get("serving_dtype", ""), mesh_shape=tuple(p.get("decode_mesh", ())))
  c.lock()
  return c
