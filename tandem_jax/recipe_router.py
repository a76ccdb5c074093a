"""The adaptive block-length router of a recipe Tandem (:mod:`tandem_jax.recipe`), trained on the recipe's cached
data: no primary forward, labels from the secondary's teacher-forced drafts against the cached primary outputs.

Both heads learn on text the secondary never trained on: the primary's continuations sampled at temperature 1
(``sampled_sequences`` of them, from the prompts of the recipe data, made once and cached in
``<tandem_dir>/router_data``). Under speculative sampling the accepted tokens are draws from the primary, so those
are the sampled head's decision contexts. Its label is TV of the raw softmaxes (temperature 1, the router's default
``sampling``): the data hold the primary's top-k log-probabilities, not the logits another temperature would need, so
a router for another sampling setting is trained by the ``router`` stage (``config.router.sampling``). The greedy
head's label is whether the secondary's argmax misses the primary's argmax at the same position (the first of the
cached top-k).

CHOICE (``greedy_head``): "sampled" (default) trains the greedy head on those continuations too. "greedy" trains it on
the recipe's greedy data, the primary's own greedy continuations (the contexts of greedy decisions); but the
secondary was trained on exactly those sequences, so there its drafts agree more often than on new text and the head
over-predicts acceptance on new text: on the real-model preset's held-out greedy rows (the benchmark report's router
validation) it predicted a mean rejection of 0.449 for a measured 0.569, the head trained on the sampled
continuations 0.572.
``sampled_sequences=0``: both heads learn on the greedy data (routers saved before the sampled data existed)."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from tandem_jax.progress import Progress
from tandem_jax.recipe import DATA_DIR, RECIPE_FILE, RecipeConfig, batch_at, split_rows, teacher_terms
from tandem_jax.recipe_data import self_distill, target_index

ROUTER_FILE = "router.npz"
ROUTER_META = "router.json"
SAMPLED_DIR = "router_data"
SAMPLED_TEMPERATURE = 1.0  # the sampled head's setting (router.RAW)


def sampled_data(tandem, tokenizer, data: dict, rc: RecipeConfig, rows: np.ndarray, data_dir: str,
                 progress: Callable[[str], None] | None = None) -> dict:
  """The primary's continuations sampled at temperature 1 from the prompts of the greedy data's ``rows`` (their
  first ``rc.prompt_len`` tokens), in the layout of the recipe data (``top_ids`` as draft-vocabulary indices).
  Cached in ``data_dir`` while the rows and settings match."""
  meta = dict(rows=[int(r) for r in rows], temperature=SAMPLED_TEMPERATURE, prompt_len=rc.prompt_len,
              gen_len=rc.gen_len, seed=rc.seed, top_k=rc.teacher_top_k)
  meta_path = os.path.join(data_dir, "meta.json")
  if os.path.isfile(meta_path):
    with open(meta_path) as fh:
      if json.load(fh) == meta:
        return {k[:-4]: np.load(os.path.join(data_dir, k)) for k in os.listdir(data_dir) if k.endswith(".npy")}
  primary = tandem.primary
  out = self_distill(primary, data["tokens"][rows, :rc.prompt_len], rc.gen_len, min(rc.gen_batch, len(rows)),
                     tokenizer.eos_id, tandem.layer_map, rc.teacher_top_k, progress=progress,
                     temperature=SAMPLED_TEMPERATURE, seed=rc.seed)
  out["top_ids"] = target_index(out.pop("top_ids"), data["draft_ids"], primary.cfg.vocab_size)
  os.makedirs(data_dir, exist_ok=True)
  for k, v in out.items():
    np.save(os.path.join(data_dir, k + ".npy"), v)
  with open(meta_path + ".tmp", "w") as fh:
    json.dump(meta, fh)
  os.replace(meta_path + ".tmp", meta_path)
  return out


def _joined(a: dict, b: dict) -> dict:
  return {k: np.concatenate([a[k], b[k]], axis=1 if k == "hidden" else 0) for k in a}


def router_labels(q_btn, top_idx_btk, top_logp_btk):
  """[B, T, 2] rejection labels (router.HEADS): TV(p, q) over the whole vocabulary (q is 0 off the draft
  vocabulary; p from the cached top-k log-probabilities, :func:`recipe.teacher_terms`) and 1[argmax q != the
  primary's argmax] (the first of the top-k, sorted by probability; -1 off the draft vocabulary: never matched)."""
  _, tv = teacher_terms(jax.nn.log_softmax(q_btn.astype(jnp.float32), -1), top_idx_btk, top_logp_btk)
  mismatch = (jnp.argmax(q_btn, -1) != top_idx_btk[..., 0]).astype(jnp.float32)
  return jnp.stack([tv, mismatch], -1)


def read_params(path: str) -> dict:
  """A saved router's parameters (``router.npz``) as the pure dict of its nnx state."""
  with np.load(path) as z:
    return traverse_util.unflatten_dict({k: jnp.asarray(z[k]) for k in z.files}, sep="/")


def train_router(tandem_dir: str, *, steps: int = 300, gamma_max: int = 8, top_k: int = 4, hidden: int = 64,
                 lr: float = 1e-3, batch_size: int = 8, seed: int = 0, sampled_sequences: int = 256,
                 greedy_head: str = "sampled", progress: Callable[[str], None] | None = None) -> dict:
  """Trains the adaptive block-length router of a recipe Tandem on its cached data and saves it to
  ``<tandem_dir>/router.npz`` (reused while ``router.json`` holds the same settings). Labels come from the
  secondary's teacher-forced drafts at block length γ_max with random block phases (every within-block offset):
  the sampled head's on ``sampled_sequences`` sampled continuations, the greedy head's on those too (every batch
  all sampled rows) or (``greedy_head="greedy"``) on the greedy data (half of every batch; see the module docstring);
  features are the secondary's draft distribution and the embeddings of its top-k tokens
  (:mod:`tandem_jax.models.router`).
  Returns {"router": Router, "validation": {...}} (each head measured on its own held-out rows)."""
  from tandem_jax.models import router as router_lib
  from tandem_jax.workdir import load_workdir

  if sampled_sequences < 0 or (sampled_sequences and sampled_sequences < 2):
    raise ValueError(f"sampled_sequences must be 0 or >= 2 (one held out), got {sampled_sequences}")
  if greedy_head not in ("sampled", "greedy"):
    raise ValueError(f"greedy_head must be 'sampled' or 'greedy', got {greedy_head!r}")
  on_sampled = bool(sampled_sequences) and greedy_head == "sampled"  # both heads on the sampled continuations
  tandem_dir = os.path.abspath(os.path.expanduser(tandem_dir))
  loaded = load_workdir(tandem_dir)
  tandem = loaded.model
  with open(os.path.join(tandem_dir, RECIPE_FILE)) as fh:
    rc = RecipeConfig(**json.load(fh))
  data_dir = os.path.join(tandem_dir, DATA_DIR)
  data = {k[:-4]: np.load(os.path.join(data_dir, k)) for k in os.listdir(data_dir) if k.endswith(".npy")}
  vocab = tandem.primary.cfg.vocab_size
  target = target_index(data["labels"], data["draft_ids"], vocab)
  train_rows, val_rows = split_rows(len(data["tokens"]), rc.val_fraction)
  greedy_heads = np.array([0.0, 1.0] if sampled_sequences else [1.0, 1.0], np.float32)  # router.HEADS order
  if sampled_sequences:
    n_val = max(1, int(round(sampled_sequences * rc.val_fraction)))
    n_val = min(n_val, len(val_rows))
    rows = np.concatenate([val_rows[:n_val], train_rows[:sampled_sequences - n_val]])
    sdata = sampled_data(tandem, loaded.tokenizer, data, rc, rows, os.path.join(tandem_dir, SAMPLED_DIR),
                         progress)
    starget = target_index(sdata["labels"], data["draft_ids"], vocab)
    s_train, s_val = np.arange(n_val, len(rows)), np.arange(n_val)
  with nnx.use_eager_sharding(False):
    router = router_lib.Router(tandem.secondary.cfg.d_model, top_k, hidden, rngs=nnx.Rngs(seed))
  path = os.path.join(tandem_dir, ROUTER_FILE)
  settings = dict(steps=steps, gamma_max=gamma_max, top_k=top_k, hidden=hidden, lr=lr, batch_size=batch_size,
                  seed=seed, sampled_sequences=sampled_sequences)
  if on_sampled:  # settings of routers saved before the option existed (greedy head on the greedy data) unchanged
    settings["greedy_head"] = greedy_head
  r_def, r_state = nnx.split(router)
  t_def, t_state = nnx.split(tandem)

  def make_batch(greedy_rows, sampled_rows, rng, train=True):
    """Validation (``train`` False) judges each head on its own held-out text: greedy on the greedy data."""
    b = batch_at(data, greedy_rows, target, "tandem", gamma_max, rng)
    b["heads"] = np.tile(greedy_heads, (len(greedy_rows), 1))
    if len(sampled_rows):
      bs = batch_at(sdata, sampled_rows, starget, "tandem", gamma_max, rng)
      bs["heads"] = np.tile(np.array([1.0, 1.0 if on_sampled and train else 0.0], np.float32), (len(sampled_rows), 1))
      b = _joined(b, bs)
    return b

  def terms(r_params, t_state, batch):
    tandem_ = nnx.merge(t_def, t_state)
    q = jax.lax.stop_gradient(tandem_.secondary_forward(batch["tokens"], gamma_max, batch["hidden"],
                                                        block_offset_b=batch["offset"]))
    y = router_labels(q, batch["top_idx"], batch["top_logp"])
    v = q.shape[-1]
    r_logits = nnx.merge(r_def, r_params)(q.reshape(-1, v), tandem_.secondary.output_embedding())
    w = (batch["mask"][..., None] * batch["heads"][:, None, :]).reshape(-1, 2)  # per head: its own rows
    return router_lib.router_loss(r_logits, y.reshape(-1, 2), w), (r_logits, y.reshape(-1, 2), w)

  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps), max(steps, 21), lr * 0.1))

  @jax.jit
  def step(r_params, opt_state, t_state, batch):
    (loss, _), grads = jax.value_and_grad(terms, has_aux=True)(r_params, t_state, batch)
    updates, opt_state = tx.update(grads, opt_state, r_params)
    return optax.apply_updates(r_params, updates), opt_state, loss

  @jax.jit
  def evaluate_(r_params, t_state, batch):
    """Sums over the batch's positions, per head: weight, label, prediction, decisions agreeing, BCE."""
    _, (r_logits, y, w) = terms(r_params, t_state, batch)
    r = jax.nn.sigmoid(r_logits)
    bce = optax.sigmoid_binary_cross_entropy(r_logits, y)
    return {"w": jnp.sum(w, 0), "label": jnp.sum(y * w, 0), "pred": jnp.sum(r * w, 0),
            "decision_acc": jnp.sum(((r >= 0.2) == (y >= 0.2)) * w, 0), "bce": jnp.sum(bce * w, 0)}

  meta_path = os.path.join(tandem_dir, ROUTER_META)
  saved = None
  if os.path.isfile(path) and os.path.isfile(meta_path):
    with open(meta_path) as fh:
      saved = json.load(fh)
  if saved == settings:
    r_params = read_params(path)
  else:
    r_params = r_state.to_pure_dict()
    opt_state = tx.init(r_params)
    bar = Progress(steps, "train router", out=progress)
    n_s = batch_size if on_sampled else batch_size // 2 if sampled_sequences else 0
    for i in range(steps):
      rng = np.random.default_rng([seed, 7, i])
      rows = rng.choice(train_rows, batch_size - n_s, replace=len(train_rows) < batch_size - n_s)
      srows = rng.choice(s_train, n_s, replace=len(s_train) < n_s) if n_s else rows[:0]
      r_params, opt_state, loss = step(r_params, opt_state, t_state, make_batch(rows, srows, rng))
      if (i + 1) % 100 == 0 or i + 1 == steps:
        bar.update(i + 1, loss=round(float(loss), 3))
    np.savez(path + ".tmp.npz", **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(r_params, sep="/").items()})
    os.replace(path + ".tmp.npz", path)
    with open(meta_path + ".tmp", "w") as fh:
      json.dump(settings, fh)
    os.replace(meta_path + ".tmp", meta_path)
  nnx.replace_by_pure_dict(r_state, r_params)
  nnx.update(router, r_state)
  sums = {}
  eb = min(batch_size, len(val_rows))
  evals = [(val_rows[i:i + eb], val_rows[:0]) for i in range(0, len(val_rows) - eb + 1, eb)]
  if sampled_sequences:
    evals += [(val_rows[:0], s_val[i:i + eb]) for i in range(0, len(s_val), eb)]
  for i, (g_rows, s_rows) in enumerate(evals):
    b = make_batch(g_rows, s_rows, np.random.default_rng([seed, 8, i]), train=False)
    for k, v in jax.device_get(evaluate_(r_params, t_state, b)).items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
  w = np.maximum(sums["w"], 1e-9)
  validation = {"router_loss": float(np.sum(sums["bce"] / w))}
  for i, head in enumerate(router_lib.HEADS):
    for k in ("label", "pred", "decision_acc"):
      validation[f"{head}_{k}"] = float(sums[k][i] / w[i])
  return {"router": router, "validation": validation}
