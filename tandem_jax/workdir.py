"""A training run's directory, and loading a trained model from it.

  workdir/config.json       the full resolved config (+ "sources": where frozen/initial models came from)
  workdir/checkpoints/<n>/  orbax: params (trainable), frozen, opt_state, data (Grain iterator state)
  workdir/tokenizer.model   the SentencePiece model the run used
  workdir/metrics.jsonl     one JSON object per logged step / evaluation
  workdir/tb/               TensorBoard event files

``load_workdir`` gives any later command (evaluate, generate, benchmark) everything from the workdir alone: the
frozen primary of a tandem run is inside its checkpoint, so the primary's own workdir is no longer needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
from flax import nnx

from tandem_jax import checkpoint, sharding
from tandem_jax.data import Tokenizer
from tandem_jax.data.tokenizer import tokenizer_path
from tandem_jax.interop.hf_tokenizer import load_tokenizer, save_tokenizer
from tandem_jax.models import bundle as bundle_lib

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
METRICS_FILE = "metrics.jsonl"


# -- config.json -------------------------------------------------------------------------------------------------
def config_dict(config: ml_collections.ConfigDict, sources: dict | None = None) -> dict:
  d = json.loads(config.to_json())
  if sources:
    d["sources"] = sources
  return d


def save_config(workdir: str, config: ml_collections.ConfigDict, sources: dict | None = None) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as fh:
    json.dump(config_dict(config, sources), fh, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def _tuples(x):
  return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A locked ConfigDict from config.json's content (lists back to tuples; "sources" dropped)."""
  d = {k: v for k, v in d.items() if k != "sources"}
  d["mesh"] = {k: _tuples(v) for k, v in d["mesh"].items()}
  c = ml_collections.ConfigDict(d)
  c.lock()
  return c


def read_json(workdir: str) -> dict:
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  if not os.path.isdir(os.path.expanduser(workdir)):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"workdir {workdir!r} has no {CONFIG_FILE}: not a training workdir, or its run has not "
                            f"started")
  with open(path) as fh:
    return json.load(fh)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  return config_from_dict(read_json(workdir))


# -- loading -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
  """A trained model and what belongs with it.

  model: ``Transformer`` (primary, secondary, secondary_distil: the student), ``TandemLM`` (tandem, tandem_distil;
    ``.primary`` is the frozen primary it was trained with), ``LLMToSLM``, or for router a ``RouterBundle`` with
    ``.router`` and ``.tandem``.
  """

  config: ml_collections.ConfigDict
  stage: str
  model: Any
  tokenizer: Tokenizer
  step: int
  workdir: str


def default_mesh(config) -> jax.sharding.Mesh:
  """One local device: enough for evaluation and decoding of the models trained here."""
  axes = tuple(config.mesh.axes)
  return sharding.make_mesh((1,) * len(axes), axes, devices=jax.local_devices()[:1])


def decode_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh decoding runs on: ``config.serving.mesh_shape`` over all devices where the config names one (the TPU
  presets: model-parallel inside a host, data across hosts), else one local device (:func:`default_mesh`)."""
  mesh_cfg = bundle_lib.decode_mesh_config(config)
  if mesh_cfg is config.mesh:
    return default_mesh(config)
  devices = list(jax.devices()) if devices is None else list(devices)
  try:
    return sharding.mesh_from_config(mesh_cfg, devices)
  except ValueError as e:
    raise ValueError(f"config.serving.mesh_shape: {str(e).split(': ', 1)[-1]} (set --config.serving.mesh_shape "
                     f"to fit, or () for one device)") from None


def load_workdir(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
                 serving: bool = False) -> Loaded:
  """Loads the model of a training workdir at ``step`` (default: the latest checkpoint).

  Args:
    workdir: a directory written by ``python -m tandem_jax.train`` or :func:`write_workdir`.
    step: a checkpointed step; None for the latest.
    mesh: where to place the parameters (sharded by the workdir's logical rules); default one local device.
    serving: for decoding: the weights are cast once to ``config.serving.dtype`` (when set; see
      :func:`tandem_jax.models.bundle.serving_config`) as they are placed on ``mesh``.

  Raises:
    FileNotFoundError: the workdir, its config.json, its tokenizer or its checkpoints are missing (names the path).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = load_config(workdir)
  if tokenizer_path(workdir) is None:
    raise FileNotFoundError(f"workdir {workdir!r} has no {TOKENIZER_FILE} or tokenizer.json")
  mngr = checkpoint.manager(workdir, async_save=False)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"workdir {workdir!r} has no checkpoints in {checkpoint.CHECKPOINT_DIR}/ (the run saved "
                            f"none yet)")
  step = max(steps) if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint at step {step}; it has {sorted(steps)}")
  mesh = mesh or default_mesh(config)
  rules = sharding.rules_of(config)
  graphdef, trainable, frozen = bundle_lib.abstract_bundle(config)
  abstract = {
      "params": sharding.sharded_abstract(trainable, rules, mesh),
      "frozen": sharding.sharded_abstract(frozen, rules, mesh),
  }
  restored = checkpoint.restore(mngr, step, abstract, with_optimizer=False)
  mngr.close()
  params, frozen = restored["params"], restored["frozen"]
  if serving:
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    graphdef, params, frozen = bundle_lib.to_serving(config, graphdef, params, frozen, shardings)
  bundle = bundle_lib.merge_bundle(graphdef, params, frozen)
  return Loaded(config=config, stage=config.stage, model=bundle_lib.public_model(config.stage, bundle),
                tokenizer=load_tokenizer(workdir), step=step, workdir=workdir)


# -- writing (imported weights) ----------------------------------------------------------------------------------
def write_workdir(workdir: str, config: ml_collections.ConfigDict, model: nnx.Module, tokenizer) -> str:
  """Writes a workdir holding ``model`` as the step-0 checkpoint, loadable by :func:`load_workdir`.

  For ``tandem_jax.convert`` (imported weights). ``model`` must be the stage's bundle for ``config.stage`` with the
  shapes ``config`` describes: a ``Transformer`` built from ``config.primary`` for stage "primary" (or
  ``config.secondary`` for "secondary"), a ``TandemLM`` for "tandem", an ``LLMToSLM`` for "llm_to_slm".
  ``tokenizer`` is a ``Tokenizer`` or the path of a SentencePiece ``.model`` file; its vocabulary must equal
  ``config.data.vocab_size``. No optimizer state is written: training this workdir further starts a fresh optimizer.
  Returns the absolute workdir path.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  stage = config.stage
  bundle_lib.spec(stage)
  if stage == "secondary_distil":
    raise ValueError("write_workdir: use stage 'secondary' for an imported secondary (secondary_distil needs a "
                     "teacher inside its checkpoint)")
  _, want_tr, want_fr = bundle_lib.abstract_bundle(config)
  graphdef, params, frozen = bundle_lib.split_bundle(stage, model)
  for name, want, have in (("trainable", want_tr.to_pure_dict(), params), ("frozen", want_fr.to_pure_dict(), frozen)):
    w = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), want)
    h = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), have)
    if w != h:
      raise ValueError(f"write_workdir: the model's {name} parameters do not match config.stage={stage!r} and its "
                       f"model configs (expected {w}, got {h})")
  tok = Tokenizer.load(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
  if tok.vocab_size != config.data.vocab_size:
    raise ValueError(f"write_workdir: tokenizer has {tok.vocab_size} ids, config.data.vocab_size is "
                     f"{config.data.vocab_size}")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    save_config(workdir, config, {"imported": True})
    if isinstance(tokenizer, (str, os.PathLike)):
      shutil.copyfile(tokenizer, os.path.join(workdir, TOKENIZER_FILE))
    else:
      save_tokenizer(tok, workdir)
  mngr = checkpoint.manager(workdir, keep=1, async_save=False)
  checkpoint.save(mngr, 0, {"params": params, "frozen": frozen}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return workdir
