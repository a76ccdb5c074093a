"""One place that checks a config before anything is built or compiled; every error names the field."""

from __future__ import annotations

import json
import os

import ml_collections

from tandem_jax import sharding
from tandem_jax.data import SOURCES
from tandem_jax.models import bundle as bundle_lib
from tandem_jax.models.config import TransformerConfig


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field (``config.a.b``)."""


def _check(cond: bool, field: str, message: str):
  if not cond:
    raise ConfigError(f"config.{field}: {message}")


def resolved_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """:func:`tandem_jax.sharding.resolve_mesh_shape`, its errors as ConfigError."""
  try:
    return sharding.resolve_mesh_shape(mesh_cfg, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def batch_shards(config, num_devices: int) -> int:
  """How many ways the global batch is split: the product of the mesh axes the 'batch' rule maps to."""
  shape = dict(zip(tuple(config.mesh.axes), resolved_mesh_shape(config.mesh, num_devices)))
  return sharding.batch_shards(sharding.rules_of(config), shape)


def _model_cfg(config, name: str) -> TransformerConfig:
  try:
    return TransformerConfig.from_dict(config[name].to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{name}: {e}") from None


def _workdir_config(path: str) -> dict | None:
  f = os.path.join(os.path.expanduser(path), "config.json")
  if not os.path.isfile(f):
    return None
  with open(f) as fh:
    return json.load(fh)


def _coupling(tandem: dict, primary_layers: int, secondary_layers: int) -> dict:
  """The settings that make a tandem's function besides its weights, with the layer map resolved to indices."""
  t = bundle_lib.tandem_config(tandem)
  return dict(layer_map=t.resolve_layer_map(primary_layers, secondary_layers), boundary=t.boundary,
              projection_bias=t.projection_bias)


def check_coupling(config: ml_collections.ConfigDict, src: dict, where: str, field: str) -> None:
  """Raises ConfigError when ``config.tandem`` couples the models otherwise than the tandem saved in ``src`` (a
  workdir's config.json) did: continuing it would train or decode a function its weights were never trained on."""
  if "tandem" not in src:
    return
  layers = lambda c: (int(c["primary"]["num_layers"]), int(c["secondary"]["num_layers"]))  # noqa: E731
  try:
    have = _coupling(src["tandem"], *layers(src))
  except (KeyError, ValueError):
    return  # not a tandem's config: the model checks report what is wrong
  want = _coupling(config.tandem.to_dict(), *layers(config))
  for name in want:
    shown = lambda c: f" (primary hidden states {c[name]})" if name == "layer_map" else ""  # noqa: E731
    _check(want[name] == have[name], f"tandem.{name}",
           f"{config.tandem[name]!r}{shown(want)} differs from {src['tandem'][name]!r}{shown(have)} of the tandem in "
           f"{where!r} ({field}); the coupling travels with the workdir: set --config.tandem.{name}="
           f"{src['tandem'][name]}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1,
             check_workdirs: bool = True) -> None:
  """Raises ConfigError naming the field for anything that cannot train. Call before building anything.

  ``num_devices`` (default: all visible devices) resolves the mesh; ``check_workdirs`` looks for the init
  workdirs' config.json and checks that their models match this config.
  """
  stage = config.stage
  _check(stage in bundle_lib.STAGES, "stage", f"must be one of {bundle_lib.STAGES}, got {stage!r}")
  spec = bundle_lib.spec(stage)
  d, tr = config.data, config.train

  # Data.
  _check(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {d.source!r}")
  _check(d.source == "default" or bool(d.path), "data.path", f"is required for data.source={d.source!r}")
  _check(d.seq_len >= 2, "data.seq_len", f"must be >= 2 (an input and a target), got {d.seq_len}")
  _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
  _check(d.max_documents >= 0, "data.max_documents", f"must be >= 0 (0 = all), got {d.max_documents}")
  _check(d.vocab_size >= 262, "data.vocab_size", f"must be >= 262 (261 reserved ids), got {d.vocab_size}")

  # Models: the ones this stage builds.
  used = [n for n, u in (("primary", spec.uses_primary), ("secondary", spec.uses_secondary)) if u]
  for name in used:
    m = _model_cfg(config, name)
    _check(m.vocab_size == d.vocab_size, f"{name}.vocab_size",
           f"{m.vocab_size} != config.data.vocab_size {d.vocab_size} (primary and secondary share one tokenizer)")
    _check(d.seq_len - 1 <= m.max_seq_len, "data.seq_len",
           f"{d.seq_len} gives {d.seq_len - 1} positions, more than config.{name}.max_seq_len {m.max_seq_len}")
  if spec.uses_primary and spec.uses_secondary and stage != "secondary_distil":
    p, s = _model_cfg(config, "primary"), _model_cfg(config, "secondary")
    try:
      bundle_lib.tandem_config(config.tandem).resolve_layer_map(p.num_layers, s.num_layers)
    except ValueError as e:
      raise ConfigError(f"config.tandem.layer_map / boundary: {e}") from None
  _check(config.tandem.block_len >= 1, "tandem.block_len", f"must be >= 1, got {config.tandem.block_len}")
  if stage == "llm_to_slm":
    pl = config.llm_to_slm.prompt_len
    _check(1 <= pl < d.seq_len - 1, "llm_to_slm.prompt_len", f"must be in [1, seq_len - 1 = {d.seq_len - 1}), got {pl}")
    _check(config.llm_to_slm.projector_hidden >= 1, "llm_to_slm.projector_hidden", "must be >= 1")
  if stage == "router":
    r = config.router
    _check(1 <= r.top_k <= d.vocab_size, "router.top_k", f"must be in [1, vocab_size], got {r.top_k}")
    _check(r.hidden >= 1, "router.hidden", f"must be >= 1, got {r.hidden}")
    _check(0.0 < r.threshold < 1.0, "router.threshold", f"must be in (0, 1), got {r.threshold}")
    _check(r.gamma_max >= 1, "router.gamma_max", f"must be >= 1, got {r.gamma_max}")
    s = r.get("sampling", None) or {}
    _check(float(s.get("temperature", 1.0)) > 0, "router.sampling.temperature",
           f"must be > 0 (the sampled head's setting; greedy decoding reads the greedy head), got "
           f"{s.get('temperature')}")
    _check(int(s.get("top_k", 0)) >= 0, "router.sampling.top_k", f"must be >= 0, got {s.get('top_k')}")
    _check(0 < float(s.get("top_p", 1.0)) <= 1, "router.sampling.top_p", f"must be in (0, 1], got {s.get('top_p')}")

  # Training.
  for name in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _check(int(tr[name]) >= 1, f"train.{name}", f"must be >= 1, got {tr[name]}")
  _check(tr.eval_batches > 0 or not tr.eval_every, "train.eval_batches",
         f"is {tr.eval_batches} (no evaluation) while train.eval_every is {tr.eval_every}; set one of them")
  for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "eval_batches"):
    _check(tr[name] >= 0, f"train.{name}", f"must be >= 0, got {tr[name]}")
  _check(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
  _check(0.0 <= tr.distil_lambda <= 1.0, "train.distil_lambda", f"must be in [0, 1], got {tr.distil_lambda}")
  _check(tr.distil_temperature > 0, "train.distil_temperature", f"must be > 0, got {tr.distil_temperature}")

  # Mesh and batch.
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  shards = batch_shards(config, num_devices)
  _check(tr.batch_size % shards == 0, "train.batch_size",
         f"{tr.batch_size} is not divisible by the {shards} data shards of mesh {tuple(config.mesh.axes)}="
         f"{resolved_mesh_shape(config.mesh, num_devices)}")
  _check(tr.batch_size % process_count == 0, "train.batch_size",
         f"{tr.batch_size} is not divisible by the {process_count} processes")

  # Where frozen / initial models come from.
  for attr, field, required in spec.sources:
    path = config.init[field]
    if not path:
      _check(not required, f"init.{field}", f"stage {stage!r} needs a trained workdir here "
                                            f"(--config.init.{field}=DIR)")
      continue
    if not check_workdirs:
      continue
    src = _workdir_config(path)
    _check(src is not None, f"init.{field}", f"{path!r} is not a workdir (no config.json); train it first")
    _check(src["data"]["vocab_size"] == d.vocab_size, f"init.{field}",
           f"{path!r} was trained with vocab_size {src['data']['vocab_size']}, this config has {d.vocab_size}")
    names = {"primary_workdir": ("primary",), "secondary_workdir": ("secondary",),
             "tandem_workdir": ("primary", "secondary")}[field]
    for name in names:
      want = _model_cfg(config, name).to_dict()
      have = src[name]
      diff = sorted(k for k in want if k in have and k != "max_seq_len" and have[k] != want[k])
      _check(not diff, f"{name}", f"differs from the {name} of {path!r} in {diff} "
                                  f"({[(have[k], want[k]) for k in diff]}); use the same preset")
    if field == "tandem_workdir":
      check_coupling(config, src, path, f"init.{field}")
