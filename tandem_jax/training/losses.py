"""Token-level losses and metrics: CE on ground truth, logit distillation, accuracy, agreement, TV.

Every function takes fp32 logits [B, T, V], targets [B, T] and a float mask [B, T] (1 = a real target). Metrics are
returned as *sums* with the token count, so they can be added over batches and hosts before dividing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem_jax.models.layers import scoped
from tandem_jax.models.router import tv_distance  # [B, T, V] x2 -> [B, T]


def nll(logits_btv, targets_bt):
  """[B, T] negative log-likelihood of the targets."""
  logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]


def soft_cross_entropy(student_btv, teacher_btv, temperature: float = 1.0):
  """[B, T] CE(softmax(teacher / T), log_softmax(student / T)); the teacher gets no gradient."""
  t = jax.nn.softmax(jax.lax.stop_gradient(teacher_btv).astype(jnp.float32) / temperature, axis=-1)
  logq = jax.nn.log_softmax(student_btv.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(t * logq, axis=-1)


def masked_mean(x_bt, mask_bt):
  return jnp.sum(x_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


@scoped("loss")
def training_loss(logits_btv, targets_bt, mask_bt, teacher_btv=None, distil_lambda: float = 1.0,
                  temperature: float = 1.0):
  """(scalar loss, metrics): CE on ground truth, or λ·CE(GT) + (1-λ)·T²·CE_T(teacher, student) with a teacher.

  CE_T compares the two distributions at temperature T; the T² factor (Hinton et al., 2015) keeps its gradients
  on the scale of the CE term's whatever T (they shrink as 1/T² otherwise). ``metrics["distil_ce"]`` is CE_T.
  Positions where ``mask`` is 0 (pads) count in neither term.
  """
  ce = masked_mean(nll(logits_btv, targets_bt), mask_bt)
  metrics = {"ce": ce, "accuracy": masked_mean(accuracy(logits_btv, targets_bt), mask_bt)}
  if teacher_btv is None or distil_lambda == 1.0:
    return ce, metrics
  kd = masked_mean(soft_cross_entropy(logits_btv, teacher_btv, temperature), mask_bt)
  metrics["distil_ce"] = kd
  return distil_lambda * ce + (1.0 - distil_lambda) * temperature ** 2 * kd, metrics


def accuracy(logits_btv, targets_bt):
  return (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)


def token_sums(logits_btv, targets_bt, mask_bt, reference_btv=None) -> dict:
  """Sums over tokens: nll, correct, count and, against a reference model (the primary), agree and tv."""
  out = {"nll": jnp.sum(nll(logits_btv, targets_bt) * mask_bt),
         "correct": jnp.sum(accuracy(logits_btv, targets_bt) * mask_bt),
         "count": jnp.sum(mask_bt)}
  if reference_btv is not None:
    same = (jnp.argmax(logits_btv, -1) == jnp.argmax(reference_btv, -1)).astype(jnp.float32)
    out["agree"] = jnp.sum(same * mask_bt)
    out["tv"] = jnp.sum(tv_distance(reference_btv, logits_btv) * mask_bt)
    out["reference_nll"] = jnp.sum(nll(reference_btv, targets_bt) * mask_bt)
  return out


def finalize(sums: dict) -> dict:
  """Means from summed metrics: loss, accuracy and, where present, agreement, tv, reference_loss."""
  n = max(float(sums["count"]), 1.0)
  out = {"loss": float(sums["nll"]) / n, "accuracy": float(sums["correct"]) / n, "tokens": int(sums["count"])}
  if "agree" in sums:
    out.update(agreement=float(sums["agree"]) / n, tv=float(sums["tv"]) / n,
               reference_loss=float(sums["reference_nll"]) / n)
  for k in sums:
    if k.startswith("router_"):
      out[k] = float(sums[k]) / n
  return out
