"""The module each stage trains, its *bundle*, built from a config: what is trained, what is frozen, where each part
is initialised from (PAPER_NOTES §1.3-1.4, §1.7, §3). Training and decoding both build models through here.

Every stage trains one NNX module; its frozen part is selected by the bundle's top-level attribute names and gets
neither gradients nor optimizer state (a checkpoint stores the two parts apart: ``params`` and ``frozen``):

  stage             bundle                       frozen      initialised from (config.init.*)
  primary           Transformer(primary)         -           -
  secondary         Transformer(secondary)       -           optional: everything <- secondary_workdir (continue a
                                                                       run; primary_workdir only for agreement/TV)
  secondary_distil  Distillation(student,teacher) teacher    teacher <- primary_workdir, student <- secondary_workdir
  tandem            TandemLM                     primary     primary <- primary_workdir, secondary <- secondary_workdir
  tandem_distil     TandemLM                     primary     everything <- tandem_workdir (a Tandem-CE run)
  llm_to_slm        LLMToSLM                     primary     primary <- primary_workdir, secondary <- secondary_workdir
  router            RouterBundle(tandem,router)  tandem      tandem <- tandem_workdir
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable

import jax
import ml_collections
from flax import nnx

from tandem_jax.models import router as router_lib
from tandem_jax.models.config import TandemConfig, TransformerConfig, dtype_of
from tandem_jax.models.llm_to_slm import LLMToSLM
from tandem_jax.models.tandem import TandemLM
from tandem_jax.models.transformer import Transformer

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


# -- building ------------------------------------------------------------------------------------------------------
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


def tandem_config(tandem) -> TandemConfig:
  """``config.tandem`` (a ConfigDict, or the dict of a workdir's config.json) -> TandemConfig."""
  return TandemConfig(layer_map=parse_layer_map(tandem["layer_map"]), boundary=tandem["boundary"],
                      projection_bias=bool(tandem["projection_bias"]))


def model_configs(config: ml_collections.ConfigDict):
  """(primary TransformerConfig, secondary TransformerConfig, TandemConfig) of a config."""
  primary = TransformerConfig.from_dict(config.primary.to_dict())
  secondary = TransformerConfig.from_dict(config.secondary.to_dict())
  return primary, secondary, tandem_config(config.tandem)


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
                        router_lib.Router(s.d_model, config.router.top_k, config.router.hidden, rngs=rngs,
                                          sampling=router_lib.sampling_of(config.router)))
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


def abstract_bundle(config):
  """(graphdef, abstract params, abstract frozen) as nnx States with logical-axis metadata; allocates nothing."""
  with nnx.use_eager_sharding(False):
    bundle = nnx.eval_shape(lambda: build_bundle(config, nnx.Rngs(0)))
  graphdef, trainable, frozen = nnx.split(bundle, trainable_filter(config.stage), ...)
  return graphdef, trainable, frozen


# -- serving: the decode programs' weights and layout ----------------------------------------------------------------
def _serving(config) -> dict:
  """``config.serving`` as a dict; empty for a config without one (a workdir written before the field existed)."""
  serving = config.get("serving") if hasattr(config, "get") else None
  return dict(serving) if serving else {}


def serving_dtype(config) -> str:
  """``config.serving.dtype``: the dtype decode programs hold weights (and compute, and keep KV caches) in;
  "" keeps the models' training dtypes. Raises ValueError naming the field for an unknown dtype."""
  name = str(_serving(config).get("dtype") or "")
  if name:
    try:
      dtype_of(name)
    except ValueError as e:
      raise ValueError(f"config.serving.dtype: {e} (or '' for the training dtypes)") from None
  return name


def serving_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with both models' parameter and compute dtypes set to ``config.serving.dtype`` (``config`` itself
  when that is empty).

  Training keeps float32 master weights (``param_dtype``); a decode program reading them would convert every
  weight on every call, so decoding builds its modules from this config and casts the weights once at load
  (:func:`to_serving`). The compute dtype follows so that no layer converts a weight back; the KV cache takes the
  compute dtype (``Transformer.init_cache``)."""
  dtype = serving_dtype(config)
  if not dtype:
    return config
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for model in (c.primary, c.secondary):
      model.param_dtype = model.dtype = dtype
  return c


def decode_mesh_config(config):
  """The mesh (shape, axes) decode programs run on: ``config.serving.mesh_shape`` over ``config.mesh.axes`` (a -1
  filled with the device count), or the training mesh ``config.mesh`` when that is empty."""
  shape = tuple(int(s) for s in (_serving(config).get("mesh_shape") or ()))
  if not shape:
    return config.mesh
  axes = tuple(config.mesh.axes)
  if len(shape) != len(axes):
    raise ValueError(f"config.serving.mesh_shape {shape} must give one size per config.mesh.axes {axes}")
  return types.SimpleNamespace(shape=shape, axes=axes)


def to_serving(config: ml_collections.ConfigDict, graphdef, params: dict, frozen: dict, shardings: dict):
  """(serving graphdef, params, frozen): the bundle's weights cast to :func:`serving_config`'s dtypes and placed
  on ``shardings`` ({"params": ..., "frozen": ...} of the serving layout) in one jitted call, so the decode
  programs take them as they are (no per-call convert or reshard). Unchanged without ``config.serving.dtype``."""
  if not serving_dtype(config):
    return graphdef, params, frozen
  s_graphdef, s_trainable, s_frozen = abstract_bundle(serving_config(config))
  want = {"params": s_trainable.to_pure_dict(), "frozen": s_frozen.to_pure_dict()}
  cast = jax.jit(lambda tree: jax.tree.map(lambda x, a: x.astype(a.dtype), tree, want), out_shardings=shardings,
                 donate_argnums=0)
  out = cast({"params": params, "frozen": frozen})
  return s_graphdef, out["params"], out["frozen"]
