"""The Hugging Face checkpoint layout: ``config.json`` <-> TransformerConfig, tensor names, safetensors files.

Every importer (safetensors directory, GGUF file) first produces a *HF state*: a dict from Hugging Face
Llama/Qwen2/Qwen3/Gemma 2/Gemma 3 tensor names (``model.layers.3.self_attn.q_proj.weight``) to numpy arrays in Hugging Face layout (linear weights
``[out, in]``, q/k rows in the "rotate half" RoPE order). This module maps that state onto our parameter names and
back, so each format needs only one translation.

Safetensors files are read here without torch or the ``safetensors`` package (the format is an 8-byte header length,
a JSON header and raw little-endian bytes), which also covers bfloat16, a dtype numpy lacks; files we write are
checked against the ``safetensors`` package in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from tandem_jax.models.config import TransformerConfig

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM")
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

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
_QK_NORM_PARAMS = {
    "attn.q_norm.scale": ("self_attn.q_norm.weight", False),
    "attn.k_norm.scale": ("self_attn.k_norm.weight", False),
}
# Gemma's four norms per layer: its post_attention_layernorm norms the attention output (ours: attn_post_norm);
# pre_feedforward_layernorm is the MLP's input norm (Llama calls that one post_attention_layernorm).
_POST_NORM_PARAMS = {
    "mlp_norm.scale": ("pre_feedforward_layernorm.weight", False),
    "attn_post_norm.scale": ("post_attention_layernorm.weight", False),
    "mlp_post_norm.scale": ("post_feedforward_layernorm.weight", False),
}
# HF tensors that carry no weights (buffers some old checkpoints saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LazyState(Mapping):
  """A HF state whose tensors are read on access (one at a time): name -> a function returning the array.

  What an importer returns with ``lazy=True``, so a checkpoint larger than host memory in float32 can be converted
  tensor by tensor (:func:`tandem_jax.convert.model_from_hf`)."""

  def __init__(self, loaders: Mapping[str, Any]):
    self._loaders = dict(loaders)

  def __getitem__(self, name: str) -> np.ndarray:
    return self._loaders[name]()

  def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's default would)
    return name in self._loaders

  def __iter__(self):
    return iter(self._loaders)

  def __len__(self) -> int:
    return len(self._loaders)


def param_name_map(cfg: TransformerConfig) -> dict[str, tuple[str, bool]]:
  """Our dotted parameter path -> (HF tensor name, transposed) for every parameter of a model with ``cfg``."""
  out = {"embed.embedding": ("model.embed_tokens.weight", False), "final_norm.scale": ("model.norm.weight", False)}
  per_layer = dict(_LAYER_PARAMS, **(_BIAS_PARAMS if cfg.qkv_bias else {}), **(_QK_NORM_PARAMS if cfg.qk_norm else {}),
                   **(_POST_NORM_PARAMS if cfg.post_norms else {}))
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
  if isinstance(hf, LazyState):  # stays lazy: each tensor is read when assigned
    return LazyState({ours: (lambda theirs=theirs, tr=transposed: hf[theirs].T if tr else hf[theirs])
                      for ours, (theirs, transposed) in names.items()})
  return {ours: (hf[theirs].T if transposed else hf[theirs]) for ours, (theirs, transposed) in names.items()}


def params_to_hf(params: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """Inverse of :func:`params_from_hf`: a HF state (contiguous arrays) from our flat params."""
  return {theirs: np.ascontiguousarray(params[ours].T if transposed else params[ours])
          for ours, (theirs, transposed) in param_name_map(cfg).items()}


# -- config.json -------------------------------------------------------------------------------------------------


_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
              "mscale_all_dim", "truncate", "partial_rotary_factor"}


def _rope_parameters(hf_cfg: Mapping[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
  """The RoPE parameters of one layer type, from either layout: transformers >= 5 writes ``rope_parameters`` (per
  layer type for Gemma 3), older files ``rope_theta`` + ``rope_scaling`` (+ Gemma 3's ``rope_local_base_freq``)."""
  params = dict(hf_cfg.get("rope_parameters") or {})
  if layer_type in params or "full_attention" in params:
    params = dict(params.get(layer_type) or {})
  if not params:
    params = dict(hf_cfg.get("rope_scaling") or {}) if layer_type == "full_attention" else {}
    theta = hf_cfg.get("rope_local_base_freq") if layer_type == "sliding_attention" else None
    params.setdefault("rope_theta", theta or hf_cfg.get("rope_theta", 10_000.0))
  return params


def _rope_fields(params: Mapping[str, Any], max_pos: int, where: str) -> dict[str, Any]:
  """TransformerConfig RoPE fields of one ``rope_parameters`` dict; unsupported variants raise naming the field."""
  kind = params.get("rope_type", params.get("type")) or "default"
  out: dict[str, Any] = dict(rope_theta=float(params.get("rope_theta", 10_000.0)))
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{where} sets partial_rotary_factor={params['partial_rotary_factor']}; only full rotary "
                     "embeddings are supported")
  if kind == "default":
    return out
  if kind not in ("linear", "llama3", "yarn"):
    raise ValueError(f"{where} asks for RoPE scaling rope_type={kind!r}; supported: 'default', 'linear', "
                     "'llama3', 'yarn'")
  unknown = sorted(set(params) - _ROPE_KEYS)
  if unknown:
    raise ValueError(f"{where} has RoPE parameters {unknown} we do not implement")
  required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
              "yarn": ("original_max_position_embeddings",)}[kind]
  missing = [k for k in required if params.get(k) is None]
  if missing:
    raise ValueError(f"{where}: RoPE scaling {kind!r} needs {missing} in its rope parameters")
  factor = params.get("factor")
  orig = params.get("original_max_position_embeddings")
  if kind == "yarn" and factor is None:
    factor = max_pos / orig
  out.update(rope_scaling=kind, rope_factor=float(factor))
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]), rope_original_max_len=int(orig or max_pos))
  elif kind == "yarn":
    if params.get("truncate", True) is False:
      raise ValueError(f"{where} sets truncate=false for YaRN; only the truncated correction range is supported")

    def mscale(scale, m=1.0):  # transformers' get_mscale
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
      m, m_all = params.get("mscale"), params.get("mscale_all_dim")
      attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    out.update(rope_original_max_len=int(orig), rope_beta_fast=float(params.get("beta_fast") or 32),
               rope_beta_slow=float(params.get("beta_slow") or 1), rope_attention_factor=float(attention))
  return out


def layer_pattern(types) -> tuple[str, ...]:
  """HF ``layer_types`` as our repeating pattern: the shortest prefix that, repeated, gives every layer."""
  ours = []
  for t in types:
    if t not in ("full_attention", "sliding_attention"):
      raise ValueError(f"config.json layer_types has {t!r}; supported: 'full_attention', 'sliding_attention'")
    ours.append("sliding" if t == "sliding_attention" else "full")
  if "sliding" not in ours:
    return ()
  period = next(p for p in range(1, len(ours) + 1) if all(ours[i] == ours[i % p] for i in range(len(ours))))
  return tuple(ours[:period])


def config_from_hf(hf_cfg: Mapping[str, Any], *, max_seq_len: int | None = None, param_dtype: str = "float32",
                   dtype: str | None = None) -> TransformerConfig:
  """TransformerConfig of a Hugging Face ``config.json``: one of :data:`ARCHITECTURES`."""
  archs = list(hf_cfg.get("architectures") or [])
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"config.json architectures is {archs}; supported: one of {list(ARCHITECTURES)}")
  arch = archs[0]
  gemma = arch in _GEMMA
  # transformers' Gemma reads hidden_activation only (old files also carry an unused hidden_act="gelu").
  act = (hf_cfg.get("hidden_activation") or "gelu_pytorch_tanh") if gemma else hf_cfg.get("hidden_act", "silu")
  want_act = ("gelu_pytorch_tanh", "gelu_tanh") if gemma else ("silu",)
  if act not in want_act:
    field = "hidden_activation" if gemma else "hidden_act"
    raise ValueError(f"config.json {field} is {act!r}; {arch}'s gated MLP here needs {' or '.join(map(repr, want_act))}")
  if hf_cfg.get("mlp_bias"):
    raise ValueError("config.json sets mlp_bias=true; our MLP has no biases")
  if arch == "Qwen2ForCausalLM":
    qkv_bias = True
  else:
    # HF Llama/Qwen3/Gemma's attention_bias puts a bias on q, k, v *and* o_proj; ours has none on o_proj.
    if hf_cfg.get("attention_bias"):
      raise ValueError(f"config.json sets attention_bias=true for {arch} (biases on q/k/v and o_proj); our "
                       "attention supports q/k/v biases only (Qwen2-style)")
    qkv_bias = False
  if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf_cfg.get("use_sliding_window"):
    raise ValueError("config.json sets use_sliding_window=true; only Gemma's sliding-window layers are supported")
  d, heads = int(hf_cfg["hidden_size"]), int(hf_cfg["num_attention_heads"])
  layers = int(hf_cfg["num_hidden_layers"])
  max_pos = int(hf_cfg.get("max_position_embeddings", 2048))
  kw: dict[str, Any] = _rope_fields(_rope_parameters(hf_cfg), max_pos, "config.json")
  if arch == "Qwen3ForCausalLM":
    kw.update(qk_norm=True)
  if gemma:
    if hf_cfg.get("use_bidirectional_attention"):
      raise ValueError("config.json sets use_bidirectional_attention=true (an encoder); only causal decoders import")
    types = hf_cfg.get("layer_types")
    if types is None:  # older files: a period (Gemma 2: 2; Gemma 3: sliding_window_pattern, default 6)
      period = 2 if arch == "Gemma2ForCausalLM" else int(hf_cfg.get("sliding_window_pattern") or 6)
      types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    if len(types) != layers:
      raise ValueError(f"config.json layer_types has {len(types)} entries for {layers} layers")
    pattern = layer_pattern(types)
    kw.update(mlp_activation="gelu_tanh", norm_plus_one=True, post_norms=True, scale_embeddings=True,
              query_pre_attn_scalar=float(hf_cfg.get("query_pre_attn_scalar") or 0.0),
              final_softcap=float(hf_cfg.get("final_logit_softcapping") or 0.0),
              layer_types=pattern, sliding_window=int(hf_cfg.get("sliding_window") or 0) if pattern else 0)
    if arch == "Gemma2ForCausalLM":
      kw.update(attn_softcap=float(hf_cfg.get("attn_logit_softcapping") or 0.0))
    else:
      if hf_cfg.get("attn_logit_softcapping"):  # transformers' Gemma 3 ignores it; refuse rather than guess
        raise ValueError("config.json sets attn_logit_softcapping for Gemma3ForCausalLM, which does not cap "
                         "attention logits")
      local = _rope_fields(_rope_parameters(hf_cfg, "sliding_attention"), max_pos, "config.json (sliding layers)")
      if set(local) != {"rope_theta"}:
        raise ValueError(f"config.json scales the sliding layers' RoPE ({local}); only their base is supported")
      # A local base equal to an unscaled global one is the same function: stored as 0 ("the full layers' RoPE").
      same = local["rope_theta"] == kw["rope_theta"] and "rope_scaling" not in kw
      kw.update(qk_norm=True, rope_local_theta=local["rope_theta"] if pattern and not same else 0.0)
    if kw["query_pre_attn_scalar"] == int(hf_cfg.get("head_dim") or d // heads):
      kw["query_pre_attn_scalar"] = 0.0  # the default scale
  return TransformerConfig(
      vocab_size=int(hf_cfg["vocab_size"]), d_model=d, num_layers=layers,
      num_heads=heads, num_kv_heads=int(hf_cfg.get("num_key_value_heads") or heads),
      head_dim=int(hf_cfg.get("head_dim") or d // heads), d_ff=int(hf_cfg["intermediate_size"]),
      max_seq_len=int(max_seq_len or max_pos), norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)), qkv_bias=qkv_bias,
      tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", gemma)), param_dtype=param_dtype,
      dtype=dtype or param_dtype, **kw)


def hf_architecture(cfg: TransformerConfig) -> str:
  """The Hugging Face class that computes ``cfg``'s function (checked by :func:`config_to_hf`)."""
  if cfg.post_norms:
    return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
  if cfg.qk_norm:
    return "Qwen3ForCausalLM"
  return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


# Fields with no counterpart in config.json: how the model is run or trained, not what it computes.
_RUNTIME_FIELDS = ("max_seq_len", "param_dtype", "dtype", "scan_layers", "remat", "freeze_embeddings")


def _int_if_whole(x: float):
  return int(x) if float(x).is_integer() else x  # transformers' Gemma configs type this field int


def config_to_hf(cfg: TransformerConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
  """A ``config.json`` transformers loads as the same model (:func:`hf_architecture` picks the class). Raises naming
  the fields when no Hugging Face class computes this config (e.g. a Llama with sliding windows)."""
  arch = hf_architecture(cfg)
  rope: dict[str, Any] = dict(rope_type=cfg.rope_scaling, rope_theta=cfg.rope_theta)
  if cfg.rope_scaling != "default":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  elif cfg.rope_scaling == "yarn":
    rope.update(original_max_position_embeddings=cfg.rope_original_max_len, beta_fast=cfg.rope_beta_fast,
                beta_slow=cfg.rope_beta_slow, attention_factor=cfg.rope_attention_factor)
  common = dict(
      architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32",
      bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True, attention_bias=False)
  if arch == "LlamaForCausalLM":
    out = dict(common, model_type="llama", hidden_act="silu", mlp_bias=False)
  elif arch == "Qwen2ForCausalLM":
    out = dict(common, model_type="qwen2", hidden_act="silu", use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
    del out["attention_bias"]
  elif arch == "Qwen3ForCausalLM":
    out = dict(common, model_type="qwen3", hidden_act="silu", use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
  else:
    types = ["sliding_attention" if cfg.layer_type(j) == "sliding" else "full_attention"
             for j in range(cfg.num_layers)]
    out = dict(common, hidden_activation="gelu_pytorch_tanh", layer_types=types,
               sliding_window=cfg.sliding_window or None, final_logit_softcapping=cfg.final_softcap or None,
               query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim))
    if arch == "Gemma2ForCausalLM":
      out.update(model_type="gemma2", attn_logit_softcapping=cfg.attn_softcap or None)
    else:
      local = dict(rope_type="default", rope_theta=cfg.rope_local_theta or cfg.rope_theta)
      out.update(model_type="gemma3_text", attn_logit_softcapping=None,
                 rope_parameters=dict(full_attention=rope, sliding_attention=local))
  back = config_from_hf(out, max_seq_len=cfg.max_seq_len, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
  plain = dataclasses.replace(cfg, **{f: getattr(back, f) for f in _RUNTIME_FIELDS})
  diff = sorted(f.name for f in dataclasses.fields(cfg) if getattr(plain, f.name) != getattr(back, f.name))
  if diff:
    raise ValueError(f"no Hugging Face class computes this model: as {arch} its fields {diff} would read back as "
                     f"{[getattr(back, f) for f in diff]} instead of {[getattr(cfg, f) for f in diff]}")
  return out


# -- safetensors -------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike, lazy: bool = False) -> dict[str, np.ndarray] | LazyState:
  """All tensors of one ``.safetensors`` file as numpy arrays; floating types (bfloat16 included) become float32.

  With ``lazy`` a :class:`LazyState` instead: each tensor is read from the memory-mapped file when accessed, in its
  stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), so a bfloat16 checkpoint never exists in float32."""
  with open(path, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
    base = 8 + n
  raw = np.memmap(path, dtype=np.uint8, mode="r")

  def load(name, info):
    start, end = info["data_offsets"]
    arr = raw[base + start: base + end].view(np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
    return np.array(arr.reshape(info["shape"]))  # a copy, so the memmap can close

  loaders = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{os.fspath(path)}: tensor {name!r} has dtype {info['dtype']}, which we cannot read; "
                       f"supported: {', '.join(_ST_DTYPES)}")
    loaders[name] = lambda name=name, info=info: load(name, info)
  if lazy:
    return LazyState(loaders)
  out = {}
  for name, loader in loaders.items():
    arr = loader()
    out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" or arr.dtype == ml_dtypes.bfloat16 else arr
  return out


def read_hf_dir(hf_dir: str | os.PathLike, lazy: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json as a dict, HF state) of a Hugging Face model directory, sharded or not (``lazy``: a
  :class:`LazyState` reading each tensor on access, see :func:`read_safetensors`)."""
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
  state: dict[str, Any] = {}
  for f in files:
    part = read_safetensors(os.path.join(hf_dir, f), lazy=lazy)
    state.update(part._loaders if lazy else part)
  return hf_cfg, (LazyState(state) if lazy else state)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  """One ``.safetensors`` file of numpy arrays (float32/float16/bfloat16/int), readable by ``safetensors``."""
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
