"""What each training stage minimises and measures: the loss of one batch and the summed evaluation metrics.

The modules themselves (what each stage trains and freezes) are built by :mod:`tandem_jax.models.bundle`. A batch is
``{"inputs", "targets", "mask"}`` ([B, T] each, T = seq_len - 1): ``targets`` are ``inputs`` shifted by one and
``mask`` is 1 where a target counts (never a pad id).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax.decoding import sampling as sampling_lib
from tandem_jax.models import router as router_lib
from tandem_jax.models.bundle import STAGES, TANDEM_STAGES, RouterBundle
from tandem_jax.models.transformer import Transformer
from tandem_jax.training import losses


# -- losses ------------------------------------------------------------------------------------------------------
def response_mask(config, mask_bt):
  """LLM-to-SLM: targets at token index >= prompt_len (input position >= prompt_len - 1) form the response."""
  t = mask_bt.shape[1]
  return mask_bt * (jnp.arange(t)[None, :] + 1 >= config.llm_to_slm.prompt_len).astype(mask_bt.dtype)


def prompt_lens(config, batch_size: int):
  return jnp.full((batch_size,), config.llm_to_slm.prompt_len, jnp.int32)


def router_terms(bundle: RouterBundle, config, inputs_bt):
  """(router logits [B*T, 2], labels [B*T, 2]: TV of the distributions warped by the router's sampling setting and
  argmax mismatch, router_lib.HEADS) from the frozen tandem's parallel forward at block length γ_max.

  γ_max puts every within-block draft offset 1..γ_max in the data, as the router sees them while drafting.
  """
  q, p = bundle.tandem.forward(inputs_bt, config.router.gamma_max)
  q, p = jax.lax.stop_gradient(q), jax.lax.stop_gradient(p)
  v = q.shape[-1]
  q2, p2 = q.reshape(-1, v), p.reshape(-1, v)
  embed = jax.lax.stop_gradient(bundle.tandem.secondary.embed.embedding[...])
  setting = bundle.router.sampling
  warp = None if setting == router_lib.RAW else functools.partial(sampling_lib.probs,
                                                                   params=sampling_lib.SamplingParams(*setting))
  return bundle.router(q2, embed), router_lib.labels(p2, q2, warp)


def loss_fn(config, bundle: nnx.Module, batch: dict):
  """(scalar loss, metrics) of one batch for ``config.stage``."""
  stage, tr = config.stage, config.train
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
  if stage in ("primary", "secondary"):
    return losses.training_loss(bundle.forward(inputs)[0], targets, mask)
  if stage == "secondary_distil":
    teacher = jax.lax.stop_gradient(bundle.teacher.forward(inputs)[0])
    return losses.training_loss(bundle.student.forward(inputs)[0], targets, mask, teacher, tr.distil_lambda,
                                tr.distil_temperature)
  if stage in TANDEM_STAGES:
    q, p = bundle.forward(inputs, config.tandem.block_len)
    if stage == "tandem":
      return losses.training_loss(q, targets, mask)
    return losses.training_loss(q, targets, mask, p, tr.distil_lambda, tr.distil_temperature)
  if stage == "llm_to_slm":
    logits = bundle.forward(inputs, prompt_lens(config, inputs.shape[0]))
    return losses.training_loss(logits, targets, response_mask(config, mask))
  if stage == "router":
    r_logits, y = router_terms(bundle, config, inputs)
    w = mask.reshape(-1)
    bce = router_lib.router_loss(r_logits, y, w)
    return bce, {"router_loss": bce, "tv": jnp.sum(y[:, 0] * w) / jnp.maximum(jnp.sum(w), 1.0)}
  raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")


# -- evaluation --------------------------------------------------------------------------------------------------
def eval_parts(stage: str, bundle: nnx.Module, reference: Transformer | None = None):
  """(model evaluated, reference primary or None) for the metrics: the student and its teacher for distillation."""
  if stage == "secondary_distil":
    return bundle.student, bundle.teacher
  return bundle, reference


def eval_sums(config, model: nnx.Module, reference: Transformer | None, batch: dict, primary_out=None) -> dict:
  """Summed metrics of one batch (see losses.token_sums): vs ground truth and, where a primary exists, vs it.

  ``model`` is what ``bundle.public_model`` returns (a RouterBundle for the router stage); ``reference`` is the
  primary for the secondary stages (the tandem stages and LLM-to-SLM carry their own). ``primary_out``, the primary's
  ``forward(inputs, return_hidden=True)`` (logits, hidden) of this batch computed once by the caller, stands in for
  the primary's forward in the primary, secondary and tandem stages (the caller's primary must be the model's own).
  """
  stage = config.stage
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
  if stage == "primary":
    logits = model.forward(inputs)[0] if primary_out is None else primary_out[0]
    return losses.token_sums(logits, targets, mask)
  if stage in ("secondary", "secondary_distil"):
    if primary_out is not None:
      ref = primary_out[0]
    else:
      ref = None if reference is None else reference.forward(inputs)[0]
    return losses.token_sums(model.forward(inputs)[0], targets, mask, ref)
  if stage in TANDEM_STAGES:
    q, p = model.forward(inputs, config.tandem.block_len, primary_out=primary_out)
    return losses.token_sums(q, targets, mask, p)
  if stage == "llm_to_slm":
    m = response_mask(config, mask)
    logits = model.forward(inputs, prompt_lens(config, inputs.shape[0]))
    return losses.token_sums(logits, targets, m, model.primary.forward(inputs)[0])
  if stage == "router":
    r_logits, y = router_terms(model, config, inputs)
    w = mask.reshape(-1)
    r = jax.nn.sigmoid(r_logits)
    tau = config.router.threshold
    sums = losses.token_sums(*model.tandem.forward(inputs, config.tandem.block_len)[:1], targets, mask)
    sums["router_loss"] = router_lib.router_loss(r_logits, y, w) * jnp.sum(w)
    for i, head in enumerate(router_lib.HEADS):  # router_{pred,label,decision_acc} (sampled), router_greedy_*
      name = "router" if head == "sampled" else f"router_{head}"
      decision_ok = ((1.0 - r[:, i] >= tau) == (1.0 - y[:, i] >= tau)).astype(jnp.float32)
      sums.update({f"{name}_pred": jnp.sum(r[:, i] * w), f"{name}_label": jnp.sum(y[:, i] * w),
                   f"{name}_decision_acc": jnp.sum(decision_ok * w)})
    return sums
  raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
