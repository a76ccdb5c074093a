"""The Hugging Face checkpoint layout: ``config.json`` <-> TransformerConfig, tensor names, safetensors files.

Every importer (safetensors directory, GGUF file) first produces a *HF state*: a dict from Hugging Face Llama/Qwen2
tensor names (``model.layers.3.self_attn.q_proj.weight``) to numpy arrays in Hugging Face layout (linear weights
``[out, in]``, q/k rows in the "rotate half" RoPE order). This module maps that state onto our parameter names and
back, so each format needs only one translation.

Safetensors files are read here without torch or the ``safetensors`` package (the format is an 8-byte header length,
a JSON header and raw little-endian bytes), which also covers bfloat16, a dtype numpy lacks; files we write are
checked against the ``safetensors`` package in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import numpy as np

from tandem_jax.models.config import TransformerConfig

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")

# Our parameter path (dotted, "{i}" for the layer) -> (HF name, is a linear kernel stored transposed).
_LAYER_PARAMS = {
    "attn_norm.scale": ("input_layernorm.weight", False),
    "attn.q_proj.kernel": ("self_attn.q_proj.weight", True),
    "attn.k_proj.kernel": ("self_attn.k_proj.weight", True),
    "attn.v_proj.kernel": ("self_attn.v_proj.weight", True),
    "attn.o_proj.kernel": ("self_attn.o_proj.weight", True),
    "mlp_norm.scale": ("post_attention_layernorm.weight", False),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", True),
    "mlp.up_proj.kernel": ("mlp.up_proj.weight", True),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", True),
}
_BIAS_PARAMS = {
    "attn.q_proj.bias": ("self_attn.q_proj.bias", False),
    "attn.k_proj.bias": ("self_attn.k_proj.bias", False),
    "attn.v_proj.bias": ("self_attn.v_proj.bias", False),
}
# HF tensors that carry no weights (buffers some old checkpoints saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def param_name_map(cfg: TransformerConfig) -> dict[str, tuple[str, bool]]:
  """Our dotted parameter path -> (HF tensor name, transposed) for every parameter of a model with ``cfg``."""
  out = {"embed.embedding": ("model.embed_tokens.weight", False), "final_norm.scale": ("model.norm.weight", False)}
  per_layer = dict(_LAYER_PARAMS, **(_BIAS_PARAMS if cfg.qkv_bias else {}))
  for i in range(cfg.num_layers):
    for ours, (theirs, transposed) in per_layer.items():
      out[f"layers.{i}.{ours}"] = (f"model.layers.{i}.{theirs}", transposed)
  if not cfg.tie_embeddings:
    out["lm_head.kernel"] = ("lm_head.weight", True)
  return out


def params_from_hf(hf: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """Our flat params (dotted path -> array in our layout) from a HF state; every tensor must be used."""
  names = param_name_map(cfg)
  missing = sorted(theirs for theirs, _ in names.values() if theirs not in hf)
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:5]}")
  used = {theirs for theirs, _ in names.values()}
  if cfg.tie_embeddings:
    used.add("lm_head.weight")  # Some tied checkpoints store the shared matrix twice; the copy is ignored.
  unused = sorted(k for k in hf if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f"checkpoint has {len(unused)} tensors our model has no place for, e.g. {unused[:5]} "
                     "(biases on o_proj or the MLP, or a layer type we do not implement)")
  return {ours: (hf[theirs].T if transposed else hf[theirs]) for ours, (theirs, transposed) in names.items()}


def params_to_hf(params: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """Inverse of :func:`params_from_hf`: a HF state (contiguous arrays) from our flat params."""
  return {theirs: np.ascontiguousarray(params[ours].T if transposed else params[ours])
          for ours, (theirs, transposed) in param_name_map(cfg).items()}


# -- config.json -------------------------------------------------------------------------------------------------


def _rope_theta(hf_cfg: Mapping[str, Any]) -> float:
  """RoPE base, refusing any scaled variant (Llama 3.1 "llama3", YaRN, ...) that our rope() does not compute."""
  params = hf_cfg.get("rope_parameters") or {}  # transformers >= 5 folds theta and scaling into one dict.
  scaling = hf_cfg.get("rope_scaling") or params
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if kind not in ("default", None):
    raise ValueError(f"config.json asks for RoPE scaling {kind!r}; only unscaled RoPE is supported")
  return float(params.get("rope_theta", hf_cfg.get("rope_theta", 10_000.0)))


def config_from_hf(hf_cfg: Mapping[str, Any], *, max_seq_len: int | None = None, param_dtype: str = "float32",
                   dtype: str | None = None) -> TransformerConfig:
  """TransformerConfig of a Hugging Face ``config.json`` (LlamaForCausalLM or Qwen2ForCausalLM)."""
  archs = list(hf_cfg.get("architectures") or [])
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"config.json architectures is {archs}; supported: one of {list(ARCHITECTURES)}")
  arch = archs[0]
  act = hf_cfg.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json hidden_act is {act!r}; our MLP is SwiGLU, which needs 'silu'")
  if hf_cfg.get("mlp_bias"):
    raise ValueError("config.json sets mlp_bias=true; our MLP has no biases")
  if arch == "LlamaForCausalLM":
    # HF Llama's attention_bias puts a bias on q, k, v *and* o_proj; ours has none on o_proj.
    if hf_cfg.get("attention_bias"):
      raise ValueError("config.json sets attention_bias=true for Llama (biases on q/k/v and o_proj); our attention "
                       "supports q/k/v biases only (Qwen2-style)")
    qkv_bias = False
  else:
    qkv_bias = True
    if hf_cfg.get("use_sliding_window"):
      raise ValueError("config.json sets use_sliding_window=true; only full attention is supported")
  d, heads = int(hf_cfg["hidden_size"]), int(hf_cfg["num_attention_heads"])
  return TransformerConfig(
      vocab_size=int(hf_cfg["vocab_size"]), d_model=d, num_layers=int(hf_cfg["num_hidden_layers"]),
      num_heads=heads, num_kv_heads=int(hf_cfg.get("num_key_value_heads") or heads),
      head_dim=int(hf_cfg.get("head_dim") or d // heads), d_ff=int(hf_cfg["intermediate_size"]),
      max_seq_len=int(max_seq_len or hf_cfg.get("max_position_embeddings", 2048)), rope_theta=_rope_theta(hf_cfg),
      norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)), qkv_bias=qkv_bias,
      tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)), param_dtype=param_dtype,
      dtype=dtype or param_dtype)


def config_to_hf(cfg: TransformerConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
  """A ``config.json`` transformers loads as the same model: Qwen2 when q/k/v carry biases, else Llama."""
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, rope_scaling=None, tie_word_embeddings=cfg.tie_embeddings,
      torch_dtype="float32", bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True)
  if cfg.qkv_bias:
    return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                sliding_window=None, max_window_layers=cfg.num_layers)
  return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False)


# -- safetensors -------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays; floating types (bfloat16 included) become float32."""
  with open(path, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
    base = 8 + n
  raw = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    buf = raw[base + start: base + end]
    kind = info["dtype"]
    if kind == "BF16":
      arr = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif kind in _ST_DTYPES:
      arr = buf.view(np.dtype(_ST_DTYPES[kind]).newbyteorder("<"))
      if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    else:
      raise ValueError(f"{os.fspath(path)}: tensor {name!r} has dtype {kind}, which we cannot read; "
                       f"supported: BF16, {', '.join(_ST_DTYPES)}")
    out[name] = np.array(arr.reshape(info["shape"]))  # a copy, so the memmap can close
  return out


def read_hf_dir(hf_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json as a dict, HF state) of a Hugging Face model directory, sharded or not."""
  hf_dir = os.fspath(hf_dir)
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in {hf_dir!r}: pass a Hugging Face model directory")
  with open(cfg_path) as fh:
    hf_cfg = json.load(fh)
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as fh:
      files = sorted(set(json.load(fh)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {hf_dir!r} (PyTorch .bin checkpoints are not supported; "
                            "convert them with transformers' save_pretrained(safe_serialization=True))")
  state: dict[str, np.ndarray] = {}
  for f in files:
    state.update(read_safetensors(os.path.join(hf_dir, f)))
  return hf_cfg, state


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  """One ``.safetensors`` file of numpy arrays (float32/float16/int), readable by the ``safetensors`` package."""
  names = {v: k for k, v in _ST_DTYPES.items()}
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  arrays, offset = [], 0
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype.type not in names:
      raise ValueError(f"tensor {name!r}: cannot write dtype {arr.dtype} to safetensors")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": names[arr.dtype.type], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    arrays.append(arr)
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
  with open(path, "wb") as fh:
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for arr in arrays:
      fh.write(arr.tobytes())
