"""A drafter for a pretrained primary within a CPU budget: the Tandem secondary (or a standalone drafter) trained on
the primary's own continuations, with what the field learned after the paper (../shared/DRAFTERS.md).

  python -m tandem_jax.recipe --primary=~/tandem_runs/smollm2 --workdir=~/tandem_runs/smollm2_drafter

The recipe, each part a field of :class:`RecipeConfig`:
- **width and embeddings of the primary** (EAGLE): the drafter has the primary's d_model, head layout and MLP width;
  its token embedding is a frozen copy of the primary's and its output layer the primary's (tied) output rows,
  frozen, so only its own layers, final norm and (Tandem) the FF_Tandem projections learn. Projections start as the
  identity (d_L = d_S) and the layers as copies of the primary's first layers (``init_layers="first"``: they already
  read embeddings), or randomly.
- **a draft vocabulary** (EAGLE-3, FR-Spec): the drafter's logits cover the ``draft_vocab_size`` most frequent tokens
  of its training data; a draft index maps back to its token id (``Transformer.draft_ids``). Verification is the
  primary's, unchanged: greedy output is identical and sampling stays exact (q is 0 off the draft vocabulary).
- **self-distillation data** (Medusa, EAGLE): prompts from the corpus and topic prompts, continued greedily by the
  primary; the same compiled pass (a teacher-forced prefill of the prompt, then cached greedy steps) keeps what
  training needs at every position: the primary's argmax (the label: what greedy verification accepts), its top-k
  log-probabilities (Tandem-Distil's soft target) and, for Tandem, the hidden states the secondary's layers read.
  Training never runs the primary again.
- **loss**: λ · CE(primary argmax) + (1 - λ) · CE(primary distribution renormalised over the draft vocabulary),
  at block length γ with a random block phase per row (every within-block offset is trained).

The result is an ordinary workdir (stage ``tandem``: a ``TandemLM`` with the frozen primary inside; stage
``secondary``: the standalone drafter), which ``load_workdir``, ``generate`` and the benchmark read. Training
checkpoints params and optimizer state every ``checkpoint_every`` steps; rerunning resumes (the cached data are
reused when their settings match).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from tandem_jax.models.config import TandemConfig, TransformerConfig
from tandem_jax.models.tandem import TandemLM
from tandem_jax.models.transformer import Transformer
from tandem_jax.progress import Progress
from tandem_jax.recipe_data import (choose_draft_vocab, corpus_features, corpus_prompts, self_distill,
                                    target_index, topic_prompts)

KINDS = ("tandem", "standalone")
DATA_DIR = "recipe_data"
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "recipe_summary.json"


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  kind: str = "tandem"               # "tandem" (tandem_speed's secondary) or "standalone" (speed's drafter)
  num_layers: int = 1                # drafter layers, each of the primary's width
  layer_map: Any = "last"            # Tandem: which primary hidden state each layer reads (TandemConfig.layer_map)
  init_layers: str = "first"         # "first": copies of the primary's first layers; "random"
  draft_vocab_size: int = 4096       # 0: the full vocabulary
  block_len: int = 4                 # γ of the training mask (Tandem)
  # self-distillation data
  num_sequences: int = 1920          # prompts continued by the primary (a tenth held out for validation)
  topic_fraction: float = 0.5        # share of topic prompts (topic_prompts); the rest are corpus windows
  num_corpus_sequences: int = 0      # + corpus windows of prompt_len + gen_len tokens, read teacher-forced
  teacher_top_k: int = 32            # the primary's distribution is kept as its top-k log-probabilities
  prompt_len: int = 32
  gen_len: int = 96                  # greedy continuation per prompt
  gen_batch: int = 64
  val_fraction: float = 0.1
  # training
  steps: int = 1600
  batch_size: int = 8
  lr: float = 1e-3
  warmup_steps: int = 50
  distil_lambda: float = 0.5         # weight of the argmax CE; 1 - λ on the primary's soft distribution
  checkpoint_every: int = 100
  log_every: int = 50
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"RecipeConfig.kind must be one of {KINDS}, got {self.kind!r}")
    if self.init_layers not in ("first", "random"):
      raise ValueError(f"RecipeConfig.init_layers must be 'first' or 'random', got {self.init_layers!r}")
    for name in ("num_layers", "block_len", "num_sequences", "prompt_len", "gen_len", "gen_batch", "teacher_top_k",
                 "steps",
                 "batch_size", "checkpoint_every", "log_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"RecipeConfig.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.draft_vocab_size < 0:
      raise ValueError(f"RecipeConfig.draft_vocab_size must be >= 0 (0: full vocabulary), got "
                       f"{self.draft_vocab_size}")
    if not 0.0 <= self.distil_lambda <= 1.0:
      raise ValueError(f"RecipeConfig.distil_lambda must be in [0, 1], got {self.distil_lambda}")
    if not 0.0 <= self.topic_fraction <= 1.0:
      raise ValueError(f"RecipeConfig.topic_fraction must be in [0, 1], got {self.topic_fraction}")
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"RecipeConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
    if isinstance(self.layer_map, list):
      object.__setattr__(self, "layer_map", tuple(self.layer_map))

  def data_key(self) -> dict:
    """The fields the cached data depend on."""
    return {k: getattr(self, k) for k in ("num_sequences", "topic_fraction", "num_corpus_sequences", "prompt_len",
                                          "gen_len",
                                          "draft_vocab_size", "teacher_top_k", "seed")}


PRESETS = {
    # seconds, on a tiny primary (tests)
    "tiny": RecipeConfig(num_sequences=16, prompt_len=8, gen_len=8, gen_batch=8, steps=4, batch_size=4,
                         warmup_steps=1, checkpoint_every=2, log_every=2, draft_vocab_size=64, val_fraction=0.25),
    # SmolLM2-135M on 2 CPU cores: ~14 minutes (data ~7: 217k tokens in one pass per batch; training ~6)
    "cpu": RecipeConfig(),
    # the same + 3,000 corpus windows of 128 tokens the primary reads teacher-forced (384k tokens, ~2x the rate of
    # generation) and twice the steps: ~40 minutes; the drafter overfits 217k tokens (training batches reach
    # 0.45-0.7 agreement with the primary, held-out rows 0.44), and these 601k tokens lift held-out agreement
    # (docs/pretrained.md)
    "cpu_long": RecipeConfig(num_corpus_sequences=3000, steps=3200),
}


# -- a tiny primary (tests, quickstart --preset=tiny) -------------------------------------------------------------
def tiny_primary(path: str) -> tuple[str, list[str]]:
  """A tiny random primary (configs/base.py ``tiny``, with the tiny preset's SentencePiece tokenizer, cached in
  ``<path>_tokenizer``) written as an imported-model workdir at ``path`` (once). Returns (path, training documents)."""
  from configs import base
  from tandem_jax.training import inputs as data_mod
  from tandem_jax.training.chain import finished_step
  from tandem_jax.workdir import write_workdir

  path = os.path.abspath(os.path.expanduser(path))
  config = base.get_config("primary", "tiny")
  config.data.tokenizer_cache = path + "_tokenizer"
  train_docs, _ = data_mod.documents(config)
  if finished_step(path) is None:
    tok = data_mod.tokenizer_for(config, train_docs)
    with nnx.use_eager_sharding(False):
      model = Transformer(TransformerConfig.from_dict(config.primary.to_dict()), nnx.Rngs(0))
    model.embed.embedding[...] *= 20.0  # peaky: the primary's argmax depends on the context
    write_workdir(path, config, model, tok)
  return path, train_docs


# -- models ------------------------------------------------------------------------------------------------------
def drafter_config(primary: TransformerConfig, rc: RecipeConfig) -> TransformerConfig:
  """The drafter's TransformerConfig: the primary's width, heads and MLP, ``rc.num_layers`` layers, its frozen
  embeddings and (optionally) a draft vocabulary."""
  return dataclasses.replace(primary, num_layers=rc.num_layers, tie_embeddings=False, scan_layers=False,
                             remat=False, draft_vocab_size=min(rc.draft_vocab_size, primary.vocab_size),
                             freeze_embeddings=True)


def build_drafter(primary: Transformer, rc: RecipeConfig, draft_ids: np.ndarray, seed: int = 0):
  """A ``TandemLM`` around ``primary`` (kind tandem) or a ``Transformer`` (standalone), initialised from it."""
  cfg = drafter_config(primary.cfg, rc)
  with nnx.use_eager_sharding(False):
    if rc.kind == "tandem":
      model = TandemLM(primary.cfg, cfg, TandemConfig(layer_map=rc.layer_map), nnx.Rngs(seed))
      nnx.update(model.primary, nnx.state(primary))
      draft = model.secondary
      for proj in model.projections:
        proj.kernel[...] = jnp.eye(primary.cfg.d_model, cfg.d_model, dtype=proj.kernel[...].dtype)
    else:
      model = draft = Transformer(cfg, nnx.Rngs(seed))
  copy_embeddings(draft, primary, draft_ids)
  if rc.init_layers == "first":
    if primary.cfg.scan_layers:
      raise ValueError("init_layers='first' needs a primary with unrolled layers (scan_layers=False)")
    for j in range(min(rc.num_layers, primary.cfg.num_layers)):
      # copies: the trained layers' buffers are donated to each step, the primary's must survive
      nnx.update(draft.layers[j], jax.tree.map(jnp.array, nnx.state(primary.layers[j])))
  return model


def copy_embeddings(draft: Transformer, primary: Transformer, draft_ids: np.ndarray) -> None:
  """The primary's token embedding, its output rows of the draft vocabulary and its final norm into ``draft``."""
  table = primary.embed.embedding[...]
  head = table.T if primary.cfg.tie_embeddings else primary.lm_head.kernel[...]
  ids = jnp.asarray(draft_ids, jnp.int32)
  draft.embed.embedding[...] = table
  draft.lm_head.kernel[...] = head[:, ids] if draft.cfg.draft_vocab_size else head
  if draft.cfg.draft_vocab_size:
    draft.draft_ids[...] = ids
  draft.final_norm.scale[...] = primary.final_norm.scale[...]


# -- self-distillation data --------------------------------------------------------------------------------------
def build_data(primary: Transformer, tokenizer, documents: Sequence[str], rc: RecipeConfig, layer_map,
               data_dir: str, progress: Callable[[str], None] | None = None) -> dict:
  """The cached training data (computed once into ``data_dir`` and reused while ``rc.data_key()`` matches)."""
  meta_path = os.path.join(data_dir, "meta.json")
  key = dict(rc.data_key(), layer_map=None if layer_map is None else list(layer_map))
  if os.path.isfile(meta_path):
    with open(meta_path) as fh:
      meta = json.load(fh)
    # data with hidden states also serve a drafter that reads none (the standalone one: same sequences, labels)
    if meta == key or (layer_map is None and dict(meta, layer_map=None) == key):
      return {k[:-4]: np.load(os.path.join(data_dir, k)) for k in os.listdir(data_dir) if k.endswith(".npy")}
    logging.info("cached recipe data in %s were made with %s, not %s: rebuilding", data_dir, meta, key)
  n_topic = int(round(rc.num_sequences * rc.topic_fraction))
  prompts = np.concatenate([corpus_prompts(tokenizer, documents, rc.num_sequences - n_topic, rc.prompt_len, rc.seed),
                            topic_prompts(tokenizer, n_topic, rc.prompt_len, rc.seed)])
  prompts = prompts[np.random.default_rng([rc.seed, 2]).permutation(len(prompts))]  # both kinds in both splits
  data = self_distill(primary, prompts, rc.gen_len, rc.gen_batch, tokenizer.eos_id, layer_map, rc.teacher_top_k,
                      progress)
  if rc.num_corpus_sequences:  # corpus windows the primary reads teacher-forced: labels and states, no generation
    windows = corpus_prompts(tokenizer, documents, rc.num_corpus_sequences, data["tokens"].shape[1], rc.seed + 1)
    extra = dict(tokens=windows, valid=np.ones(windows.shape, bool),
                 **corpus_features(primary, windows, layer_map, rc.teacher_top_k, progress=progress))
    order = np.random.default_rng([rc.seed, 3]).permutation(len(data["tokens"]) + len(windows))
    data = {k: (np.concatenate([v, extra[k]], 1)[:, order] if k == "hidden" else np.concatenate([v, extra[k]])[order])
            for k, v in data.items()}
  vocab = primary.cfg.vocab_size
  draft_ids = (choose_draft_vocab(data["tokens"], data["valid"], rc.draft_vocab_size, vocab) if rc.draft_vocab_size
               else np.arange(vocab, dtype=np.int32))
  data["draft_ids"] = draft_ids
  data["top_ids"] = target_index(data.pop("top_ids"), draft_ids, vocab)  # draft-vocabulary index, -1 off it
  os.makedirs(data_dir, exist_ok=True)
  for k, v in data.items():
    np.save(os.path.join(data_dir, k + ".npy"), v)
  with open(meta_path + ".tmp", "w") as fh:
    json.dump(key, fh)
  os.replace(meta_path + ".tmp", meta_path)
  return data


def split_rows(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  n_val = max(1, int(round(n * val_fraction)))
  return np.arange(n_val, n), np.arange(n_val)


def validation_prompts(run_dir: str, n: int, length: int = 24) -> list[list[int]]:
  """The first ``length`` tokens of ``n`` validation rows of a finished recipe run's cached data (the primary's own
  continuations of topic prompts, rows the drafter was not trained on): prompts for batches larger than a held-out
  prompt set."""
  with open(os.path.join(run_dir, RECIPE_FILE)) as fh:
    rc = RecipeConfig(**json.load(fh))
  tokens = np.load(os.path.join(run_dir, DATA_DIR, "tokens.npy"))
  _, val_rows = split_rows(len(tokens), rc.val_fraction)
  if len(val_rows) < n:
    raise ValueError(f"the recipe data in {run_dir} has {len(val_rows)} validation rows, fewer than the {n} asked for")
  return [[int(t) for t in tokens[r, :length]] for r in val_rows[:n]]


# -- training ----------------------------------------------------------------------------------------------------


def teacher_terms(logq_btn, top_idx_btk, top_logp_btk):
  """Soft cross-entropy and TV distance against the primary's sparse distribution (its top-k log-probabilities
  ``top_logp`` at draft-vocabulary indices ``top_idx``, -1 where a top-k token is off the draft vocabulary).

  Returns (soft_ce [B, T]: CE against p renormalised over its top-k tokens in the draft vocabulary,
  tv [B, T]: TV(p, q) over the whole vocabulary, q being 0 off the draft vocabulary; p's mass outside its top-k
  counts as disagreement, so the figure is an upper bound when the tail is not negligible)."""
  p = jnp.exp(top_logp_btk.astype(jnp.float32)) * (top_idx_btk >= 0)
  q_at = jnp.exp(jnp.take_along_axis(logq_btn, jnp.maximum(top_idx_btk, 0), -1))
  soft = -jnp.sum(p * jnp.take_along_axis(logq_btn, jnp.maximum(top_idx_btk, 0), -1), -1) / jnp.maximum(
      jnp.sum(p, -1), 1e-9)
  q_in = jnp.sum(q_at * (top_idx_btk >= 0), -1)
  tv = 0.5 * (jnp.sum(jnp.abs(p - q_at * (top_idx_btk >= 0)), -1) + (1.0 - q_in) + (1.0 - jnp.sum(p, -1)))
  return soft, tv


def recipe_loss(logits_btn, target_bt, top_idx_btk, top_logp_btk, mask_bt, distil_lambda: float):
  """(loss, metrics): λ · CE of the primary's argmax (masked where it is outside the draft vocabulary) + (1 - λ) ·
  CE against the primary's distribution (its top-k, renormalised over the draft vocabulary); means over ``mask``."""
  logq = jax.nn.log_softmax(logits_btn.astype(jnp.float32), -1)
  in_vocab = (target_bt >= 0).astype(jnp.float32) * mask_bt
  ce = -jnp.take_along_axis(logq, jnp.maximum(target_bt, 0)[..., None], -1)[..., 0]
  soft, tv = teacher_terms(logq, top_idx_btk, top_logp_btk)
  denom = jnp.maximum(jnp.sum(mask_bt), 1.0)
  ce_mean = jnp.sum(ce * in_vocab) / jnp.maximum(jnp.sum(in_vocab), 1.0)
  soft_mean = jnp.sum(soft * mask_bt) / denom
  agree = jnp.sum((jnp.argmax(logq, -1) == target_bt) * mask_bt) / denom
  loss = distil_lambda * ce_mean + (1.0 - distil_lambda) * soft_mean
  return loss, {"loss": loss, "ce": ce_mean, "soft_ce": soft_mean, "agreement": agree,
                "tv": jnp.sum(tv * mask_bt) / denom}


def _logits(model, kind: str, batch: dict, block_len: int):
  if kind == "tandem":
    return model.secondary_forward(batch["tokens"], block_len, batch["hidden"], block_offset_b=batch["offset"])
  return model.forward(batch["tokens"])[0]


def trainable_filter(kind: str):
  """What the recipe trains: every nnx.Param except the frozen primary inside a TandemLM."""
  if kind == "tandem":
    return nnx.All(nnx.Param, nnx.Not(lambda path, _: bool(path) and path[0] == "primary"))
  return nnx.Param


def make_optimizer(rc: RecipeConfig) -> optax.GradientTransformation:
  warmup = min(rc.warmup_steps, max(rc.steps - 1, 0))
  lr = optax.warmup_cosine_decay_schedule(0.0, rc.lr, warmup, max(rc.steps, warmup + 1), rc.lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.0))


def batch_at(data: dict, rows: np.ndarray, target: np.ndarray, kind: str, block_len: int,
             rng: np.random.Generator | None) -> dict:
  """Inputs are tokens[:, :-1]; position t predicts the primary's argmax after tokens[: t + 1]."""
  tok = data["tokens"][rows]
  t = tok.shape[1] - 1
  mask = (data["valid"][rows][:, 1:] & data["valid"][rows][:, :-1]).astype(np.float32)
  out = {"tokens": tok[:, :t], "target": target[rows][:, :t], "top_idx": data["top_ids"][rows][:, :t],
         "top_logp": data["top_logp"][rows][:, :t], "mask": mask}
  if kind == "tandem":
    out["hidden"] = data["hidden"][:, rows, :t].astype(np.float32)
    phase = rng.integers(0, block_len, len(rows)) if rng is not None else np.zeros(len(rows))
    out["offset"] = phase.astype(np.int32)
  return out


class _Trainer:
  def __init__(self, model, rc: RecipeConfig):
    self.rc = rc
    self.graphdef, self.params, self.rest = nnx.split(model, trainable_filter(rc.kind), ...)
    self.tx = make_optimizer(rc)
    kind, block_len, lam = rc.kind, rc.block_len, rc.distil_lambda

    def loss_of(params, rest, batch):
      model = nnx.merge(self.graphdef, params, rest)
      return recipe_loss(_logits(model, kind, batch, block_len), batch["target"], batch["top_idx"],
                         batch["top_logp"], batch["mask"], lam)

    def step(params, opt_state, rest, batch):
      (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params, rest, batch)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, metrics

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.eval = jax.jit(lambda params, rest, batch: loss_of(params, rest, batch)[1])

  def model(self, params=None):
    return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def evaluate(trainer: _Trainer, params, data: dict, rows: np.ndarray, target: np.ndarray) -> dict:
  """Validation metrics (mean over batches of ``batch_size`` rows; block phase 0)."""
  rc = trainer.rc
  sums, n = {}, 0
  eb = min(rc.batch_size, len(rows))
  for i in range(0, len(rows) - eb + 1, eb):
    b = batch_at(data, rows[i:i + eb], target, rc.kind, rc.block_len, None)
    m = jax.device_get(trainer.eval(params, trainer.rest, b))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
  return {k: v / n for k, v in sums.items()}


# -- the workdir -------------------------------------------------------------------------------------------------
def stage_config(primary_config: TransformerConfig, rc: RecipeConfig, vocab_size: int):
  """The workdir's config.json content: an ordinary stage config (``tandem`` or ``secondary``)."""
  from configs import base
  stage = "tandem" if rc.kind == "tandem" else "secondary"
  c = base.get_config(stage, "cpu")
  with c.unlocked():
    c.primary = primary_config.to_dict()
    c.secondary = drafter_config(primary_config, rc).to_dict()
    c.data.vocab_size = vocab_size
    c.tandem.block_len = rc.block_len
    if rc.kind == "tandem":
      lm = rc.layer_map
      c.tandem.layer_map = lm if isinstance(lm, str) else ",".join(str(i) for i in lm)
    c.train.steps = rc.steps
    c.train.batch_size = rc.batch_size
    c.recipe = dataclasses.asdict(rc)
  c.lock()
  return c


def train(primary_workdir: str, workdir: str, rc: RecipeConfig, *, documents: Sequence[str] | None = None,
          data_dir: str | None = None, progress: Callable[[str], None] | None = None) -> dict:
  """Builds (or reuses) the data and trains (or resumes) the drafter into ``workdir``. Returns a summary dict.

  ``data_dir`` (default ``<workdir>/recipe_data``): where the self-distillation data are cached; a standalone
  drafter given a Tandem run's data dir trains on the same sequences (equal training data)."""
  from tandem_jax.interop.hf_tokenizer import save_tokenizer
  from tandem_jax import checkpoint
  from tandem_jax.workdir import load_workdir, save_config

  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  rc_path = os.path.join(workdir, RECIPE_FILE)
  if os.path.isfile(rc_path):
    with open(rc_path) as fh:
      prev = json.load(fh)
    if prev != json.loads(json.dumps(dataclasses.asdict(rc))):
      diff = sorted(k for k in prev if prev.get(k) != json.loads(json.dumps(dataclasses.asdict(rc))).get(k))
      raise ValueError(f"workdir {workdir!r} holds a recipe run with other settings ({', '.join(diff)} differ): "
                       "use a new workdir or the same settings")
  with open(rc_path + ".tmp", "w") as fh:
    json.dump(dataclasses.asdict(rc), fh, indent=2)
  os.replace(rc_path + ".tmp", rc_path)

  say = progress or print
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  if os.path.isfile(summary_path):  # written after the last step: the run is finished
    with open(summary_path) as fh:
      summary = json.load(fh)
    say(f"  finished run reused ({workdir})")
    return dict(summary, reused=True)
  loaded = load_workdir(primary_workdir)
  if loaded.stage != "primary":
    raise ValueError(f"--primary must be a primary workdir (an imported or trained primary), got stage "
                     f"{loaded.stage!r} at {primary_workdir!r}")
  primary, tok = loaded.model, loaded.tokenizer
  if rc.kind == "tandem":
    layer_map = TandemConfig(layer_map=rc.layer_map).resolve_layer_map(primary.cfg.num_layers, rc.num_layers)
  else:
    layer_map = None
  if documents is None:
    from tandem_jax.data.corpus import load_default_documents, split_documents
    documents = split_documents(load_default_documents())[0]
  t0 = time.time()
  data = build_data(primary, tok, documents, rc, layer_map, data_dir or os.path.join(workdir, DATA_DIR), progress)
  data_seconds = time.time() - t0
  draft_ids = data["draft_ids"]
  target = target_index(data["labels"], draft_ids, primary.cfg.vocab_size)
  train_rows, val_rows = split_rows(len(data["tokens"]), rc.val_fraction)

  model = build_drafter(primary, rc, draft_ids, rc.seed)
  trainer = _Trainer(model, rc)
  config = stage_config(primary.cfg, rc, primary.cfg.vocab_size)
  save_config(workdir, config, {"recipe": True, "primary_workdir": os.path.abspath(primary_workdir)})
  save_tokenizer(tok, workdir)

  params, rest = trainer.params.to_pure_dict(), trainer.rest.to_pure_dict()
  opt_state = trainer.tx.init(params)
  mngr = checkpoint.manager(workdir, keep=2, async_save=False)
  start = 0
  if mngr.latest_step() is not None:
    start = int(mngr.latest_step())
    restored = checkpoint.restore(mngr, start, {"params": params, "frozen": rest, "opt_state": opt_state})
    params, opt_state = restored["params"], restored["opt_state"]
    say(f"  resumed at step {start}/{rc.steps}")
  t1 = time.time()
  bar = Progress(rc.steps, f"train {rc.kind}", start=start, out=progress)
  metrics: dict = {}
  for step in range(start, rc.steps):
    rng = np.random.default_rng([rc.seed, step])  # per step: a resumed run draws the batches of an unbroken one
    rows = rng.choice(train_rows, rc.batch_size, replace=len(train_rows) < rc.batch_size)
    batch = batch_at(data, rows, target, rc.kind, rc.block_len, rng)
    params, opt_state, metrics = trainer.step(params, opt_state, trainer.rest, batch)
    done = step + 1
    if done % rc.log_every == 0 or done == rc.steps:
      m = jax.device_get(metrics)
      bar.update(done, loss=round(float(m["loss"]), 3), agreement=round(float(m["agreement"]), 3))
    else:
      bar.update(done)
    if done % rc.checkpoint_every == 0 or done == rc.steps:
      checkpoint.save(mngr, done, {"params": params, "frozen": rest, "opt_state": opt_state}, force=True)
      mngr.wait_until_finished()  # the next step donates these buffers
  mngr.wait_until_finished()
  mngr.close()
  val = evaluate(trainer, params, data, val_rows, target)
  covered = float(np.mean(np.isin(data["labels"][val_rows][data["valid"][val_rows]], draft_ids)))
  summary = dict(kind=rc.kind, steps=rc.steps, data_seconds=data_seconds, train_seconds=time.time() - t1,
                 validation=val, draft_vocab_coverage=covered, tokens=int(data["valid"].sum()))
  with open(summary_path + ".tmp", "w") as fh:
    json.dump(summary, fh, indent=2)
  os.replace(summary_path + ".tmp", summary_path)
  return summary


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  rc = dataclasses.replace(PRESETS[f.preset], kind=f.kind,
                           **({"steps": f.steps} if f.steps else {}))
  summary = train(f.primary, f.workdir, rc)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_string("primary", "~/tandem_runs/smollm2", "primary workdir (python -m tandem_jax.convert)")
  flags.DEFINE_string("workdir", None, "the drafter's workdir", required=True)
  flags.DEFINE_string("preset", "cpu", f"one of {sorted(PRESETS)}")
  flags.DEFINE_enum("kind", "tandem", list(KINDS), "tandem secondary or standalone drafter")
  flags.DEFINE_integer("steps", None, "training steps (default: the preset's)")
  from tandem_jax import cli
  cli.run(main, "recipe")

