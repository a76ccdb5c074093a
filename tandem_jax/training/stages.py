"""What each training stage trains, freezes, initialises from and minimises (PAPER_NOTES §1.3-1.4, §1.7, §3).

Every stage trains one NNX module, its *bundle*; its frozen part is selected by the bundle's top-level attribute
names and gets neither gradients nor optimizer state:

  stage             bundle                       frozen      initialised from (config.init.*)
  primary           Transformer(primary)         -           -
  secondary         Transformer(secondary)       -           optional: everything <- secondary_workdir (continue a
                                                                       run; primary_workdir only for agreement/TV)
  secondary_distil  Distillation(student,teacher) teacher    teacher <- primary_workdir, student <- secondary_workdir
  tandem            TandemLM                     primary     primary <- primary_workdir, secondary <- secondary_workdir
  tandem_distil     TandemLM                     primary     everything <- tandem_workdir (a Tandem-CE run)
  llm_to_slm        LLMToSLM                     primary     primary <- primary_workdir, secondary <- secondary_workdir
  router            RouterBundle(tandem,router)  tandem      tandem <- tandem_workdir

A batch is ``{"inputs", "targets", "mask"}`` ([B, T] each, T = seq_len - 1): ``targets`` are ``inputs`` shifted by
one and ``mask`` is 1 where a target counts (never a pad id).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tandem_jax.models import router as router_lib
from tandem_jax.models.config import TandemConfig, TransformerConfig
from tandem_jax.models.llm_to_slm import LLMToSLM
from tandem_jax.models.tandem import TandemLM
from tandem_jax.models.transformer import Transformer
from tandem_jax.training import losses

STAGES = ("primary", "secondary", "secondary_distil", "tandem", "tandem_distil", "llm_to_slm", "router")
TANDEM_STAGES = ("tandem", "tandem_distil")


class Distillation(nnx.Module):
  """A student secondary and the frozen primary that teaches it (the Gecko-Distil baseline)."""

  def __init__(self, student_cfg: TransformerConfig, teacher_cfg: TransformerConfig, rngs: nnx.Rngs):
    self.student = Transformer(student_cfg, rngs)
    self.teacher = Transformer(teacher_cfg, rngs)


class RouterBundle(nnx.Module):
  """A frozen Tandem model and the adaptive block-length router trained on its TV distances."""

  def __init__(self, tandem: TandemLM, router: router_lib.Router):
    self.tandem = tandem
    self.router = router


@dataclasses.dataclass(frozen=True)
class StageSpec:
  frozen: tuple[str, ...]  # top-level bundle attributes that are frozen
  # (bundle attribute or "" for the whole bundle, config.init field, required?)
  sources: tuple[tuple[str, str, bool], ...]
  uses_primary: bool = True
  uses_secondary: bool = True


SPECS = {
    "primary": StageSpec((), (), uses_secondary=False),
    "secondary": StageSpec((), (("", "secondary_workdir", False),), uses_primary=False),  # optional: continue one
    "secondary_distil": StageSpec(("teacher",), (("teacher", "primary_workdir", True),
                                                 ("student", "secondary_workdir", False))),
    "tandem": StageSpec(("primary",), (("primary", "primary_workdir", True), ("secondary", "secondary_workdir", False))),
    "tandem_distil": StageSpec(("primary",), (("", "tandem_workdir", True),)),
    "llm_to_slm": StageSpec(("primary",), (("primary", "primary_workdir", True),
                                           ("secondary", "secondary_workdir", False))),
    "router": StageSpec(("tandem",), (("tandem", "tandem_workdir", True),)),
}


def spec(stage: str) -> StageSpec:
  if stage not in SPECS:
    raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
  return SPECS[stage]


# -- models ------------------------------------------------------------------------------------------------------
def parse_layer_map(value):
  """ "proportional" | "last" | "0,2,3" (comma-separated primary hidden-state indices) -> TandemConfig.layer_map."""
  value = str(value).strip()
  if value in ("proportional", "last"):
    return value
  try:
    return tuple(int(x) for x in value.strip("()[] ").split(",") if x.strip())
  except ValueError:
    raise ValueError(f"config.tandem.layer_map must be 'proportional', 'last' or comma-separated ints like "
                     f"'0,2', got {value!r}") from None


def model_configs(config: ml_collections.ConfigDict):
  """(primary TransformerConfig, secondary TransformerConfig, TandemConfig) of a config."""
  primary = TransformerConfig.from_dict(config.primary.to_dict())
  secondary = TransformerConfig.from_dict(config.secondary.to_dict())
  tandem = TandemConfig(layer_map=parse_layer_map(config.tandem.layer_map), boundary=config.tandem.boundary,
                        projection_bias=bool(config.tandem.projection_bias))
  return primary, secondary, tandem


def build_bundle(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The module a stage trains (see the table above); parameters are randomly initialised."""
  p, s, t = model_configs(config)
  stage = config.stage
  if stage == "primary":
    return Transformer(p, rngs)
  if stage == "secondary":
    return Transformer(s, rngs)
  if stage == "secondary_distil":
    return Distillation(s, p, rngs)
  if stage in TANDEM_STAGES:
    return TandemLM(p, s, t, rngs)
  if stage == "llm_to_slm":
    return LLMToSLM(p, s, rngs, projector_hidden=config.llm_to_slm.projector_hidden)
  if stage == "router":
    return RouterBundle(TandemLM(p, s, t, rngs),
                        router_lib.Router(s.d_model, config.router.top_k, config.router.hidden, rngs=rngs))
  raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")


def public_model(stage: str, bundle: nnx.Module) -> nnx.Module:
  """What ``load_workdir`` hands out: the student for secondary_distil, the bundle itself otherwise."""
  return bundle.student if stage == "secondary_distil" else bundle


def frozen_filter(stage: str) -> Callable:
  names = spec(stage).frozen
  return lambda path, _: bool(path) and path[0] in names


def trainable_filter(stage: str):
  return nnx.All(nnx.Param, nnx.Not(frozen_filter(stage)))


def split_bundle(stage: str, bundle: nnx.Module):
  """(graphdef, trainable params as a pure dict, frozen rest as a pure dict)."""
  graphdef, trainable, frozen = nnx.split(bundle, trainable_filter(stage), ...)
  return graphdef, trainable.to_pure_dict(), frozen.to_pure_dict()


def merge_bundle(graphdef, params: dict, frozen: dict) -> nnx.Module:
  return nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))


# -- losses ------------------------------------------------------------------------------------------------------
def response_mask(config, mask_bt):
  """LLM-to-SLM: targets at token index >= prompt_len (input position >= prompt_len - 1) form the response."""
  t = mask_bt.shape[1]
  return mask_bt * (jnp.arange(t)[None, :] + 1 >= config.llm_to_slm.prompt_len).astype(mask_bt.dtype)


def prompt_lens(config, batch_size: int):
  return jnp.full((batch_size,), config.llm_to_slm.prompt_len, jnp.int32)


def router_terms(bundle: RouterBundle, config, inputs_bt):
  """(router logits [B*T, 2], labels [B*T, 2]: TV and argmax mismatch, router_lib.HEADS) from the frozen tandem's
  parallel forward at block length γ_max.

  γ_max puts every within-block draft offset 1..γ_max in the data, as the router sees them while drafting.
  """
  q, p = bundle.tandem.forward(inputs_bt, config.router.gamma_max)
  q, p = jax.lax.stop_gradient(q), jax.lax.stop_gradient(p)
  v = q.shape[-1]
  q2, p2 = q.reshape(-1, v), p.reshape(-1, v)
  embed = jax.lax.stop_gradient(bundle.tandem.secondary.embed.embedding[...])
  return bundle.router(q2, embed), router_lib.labels(p2, q2)


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

  ``model`` is what ``public_model`` returns (a RouterBundle for the router stage); ``reference`` is the primary for
  the secondary stages (the tandem stages and LLM-to-SLM carry their own). ``primary_out``, the primary's
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
