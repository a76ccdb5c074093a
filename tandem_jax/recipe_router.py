"""The adaptive block-length router of a recipe Tandem (:mod:`tandem_jax.recipe`), trained on the recipe's cached
data: no primary forward, labels from the secondary's teacher-forced drafts against the cached primary outputs.

The data are the primary's own greedy continuations, the contexts a router decides in under greedy decoding: a block
stops at its first rejected draft, so every draft whose stop decision matters follows drafts equal to the primary's
greedy tokens. The sampled head's label is TV of the raw softmaxes (temperature 1, the router's default
``sampling``): the cache holds the primary's top-k log-probabilities, not the logits another temperature would
need, so a router for another sampling setting is trained by the ``router`` stage (``config.router.sampling``)."""

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
from tandem_jax.recipe_data import target_index

ROUTER_FILE = "router.npz"


def router_labels(q_btn, target_bt, top_idx_btk, top_logp_btk):
  """[B, T, 2] rejection labels (router.HEADS): TV(p, q) over the whole vocabulary (q is 0 off the draft
  vocabulary; p from the cached top-k log-probabilities, :func:`recipe.teacher_terms`) and 1[argmax q != the
  primary's argmax]."""
  _, tv = teacher_terms(jax.nn.log_softmax(q_btn.astype(jnp.float32), -1), top_idx_btk, top_logp_btk)
  mismatch = (jnp.argmax(q_btn, -1) != target_bt).astype(jnp.float32)
  return jnp.stack([tv, mismatch], -1)


def train_router(tandem_dir: str, *, steps: int = 300, gamma_max: int = 8, top_k: int = 4, hidden: int = 64,
                 lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict:
  """Trains the adaptive block-length router of a recipe Tandem on its cached data and saves it to
  ``<tandem_dir>/router.npz`` (reused when present). Labels come from the secondary's teacher-forced drafts at
  block length γ_max with random block phases (every within-block offset); features are the secondary's draft
  distribution and the embeddings of its top-k tokens (:mod:`tandem_jax.models.router`).
  Returns {"router": Router, "validation": {...}}."""
  from tandem_jax.models import router as router_lib
  from tandem_jax.workdir import load_workdir

  tandem_dir = os.path.abspath(os.path.expanduser(tandem_dir))
  tandem = load_workdir(tandem_dir).model
  with open(os.path.join(tandem_dir, RECIPE_FILE)) as fh:
    rc = RecipeConfig(**json.load(fh))
  data_dir = os.path.join(tandem_dir, DATA_DIR)
  data = {k[:-4]: np.load(os.path.join(data_dir, k)) for k in os.listdir(data_dir) if k.endswith(".npy")}
  target = target_index(data["labels"], data["draft_ids"], tandem.primary.cfg.vocab_size)
  train_rows, val_rows = split_rows(len(data["tokens"]), rc.val_fraction)
  with nnx.use_eager_sharding(False):
    router = router_lib.Router(tandem.secondary.cfg.d_model, top_k, hidden, rngs=nnx.Rngs(seed))
  path = os.path.join(tandem_dir, ROUTER_FILE)
  r_def, r_state = nnx.split(router)
  t_def, t_state = nnx.split(tandem)

  def terms(r_params, t_state, batch):
    tandem_ = nnx.merge(t_def, t_state)
    q = jax.lax.stop_gradient(tandem_.secondary_forward(batch["tokens"], gamma_max, batch["hidden"],
                                                        block_offset_b=batch["offset"]))
    y = router_labels(q, batch["target"], batch["top_idx"], batch["top_logp"])
    v = q.shape[-1]
    r_logits = nnx.merge(r_def, r_params)(q.reshape(-1, v), tandem_.secondary.output_embedding())
    w = batch["mask"].reshape(-1)
    return router_lib.router_loss(r_logits, y.reshape(-1, 2), w), (r_logits, y.reshape(-1, 2), w)

  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps), max(steps, 21), lr * 0.1))

  @jax.jit
  def step(r_params, opt_state, t_state, batch):
    (loss, _), grads = jax.value_and_grad(terms, has_aux=True)(r_params, t_state, batch)
    updates, opt_state = tx.update(grads, opt_state, r_params)
    return optax.apply_updates(r_params, updates), opt_state, loss

  @jax.jit
  def evaluate_(r_params, t_state, batch):
    loss, (r_logits, y, w) = terms(r_params, t_state, batch)
    r = jax.nn.sigmoid(r_logits)
    out = {"router_loss": loss}
    for i, head in enumerate(router_lib.HEADS):
      out[f"{head}_label"] = jnp.sum(y[:, i] * w) / jnp.sum(w)
      out[f"{head}_pred"] = jnp.sum(r[:, i] * w) / jnp.sum(w)
      out[f"{head}_decision_acc"] = jnp.sum(((r[:, i] >= 0.2) == (y[:, i] >= 0.2)) * w) / jnp.sum(w)
    return out

  if os.path.isfile(path):
    with np.load(path) as z:
      r_params = traverse_util.unflatten_dict({k: jnp.asarray(z[k]) for k in z.files}, sep="/")
  else:
    r_params = r_state.to_pure_dict()
    opt_state = tx.init(r_params)
    bar = Progress(steps, "train router", out=progress)
    for i in range(steps):
      rng = np.random.default_rng([seed, 7, i])
      rows = rng.choice(train_rows, batch_size, replace=len(train_rows) < batch_size)
      b = batch_at(data, rows, target, "tandem", gamma_max, rng)
      r_params, opt_state, loss = step(r_params, opt_state, t_state, b)
      if (i + 1) % 100 == 0 or i + 1 == steps:
        bar.update(i + 1, loss=round(float(loss), 3))
    np.savez(path + ".tmp.npz", **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(r_params, sep="/").items()})
    os.replace(path + ".tmp.npz", path)
  nnx.replace_by_pure_dict(r_state, r_params)
  nnx.update(router, r_state)
  sums, n = {}, 0
  eb = min(batch_size, len(val_rows))
  for i in range(0, len(val_rows) - eb + 1, eb):
    rng = np.random.default_rng([seed, 8, i])
    b = batch_at(data, val_rows[i:i + eb], target, "tandem", gamma_max, rng)
    for k, v in jax.device_get(evaluate_(r_params, t_state, b)).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
  return {"router": router, "validation": {k: v / max(n, 1) for k, v in sums.items()}}
