"""Tiny checkpoints and reference checks shared by the interop tests (test_convert.py, test_families.py): random
Hugging Face checkpoints in numpy with a numpy reference forward, tiny GGUF files from the pure-numpy ``gguf``
writer, and the comparisons against transformers (logits, export round trip, greedy generation)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem_jax import convert
from tandem_jax.interop import gguf_format, hf_format


def tiny_hf_config(arch="LlamaForCausalLM", **overrides):
  c = dict(architectures=[arch], vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu", max_position_embeddings=64,
           rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=arch == "Qwen2ForCausalLM", bos_token_id=1,
           eos_token_id=2)
  c.update(overrides)
  return c


def random_hf_state(hf_cfg, seed=0):
  """A HF state for ``hf_cfg`` with random weights (norm scales away from 1 so a mixed-up norm shows)."""
  rng = np.random.default_rng(seed)
  cfg = hf_format.config_from_hf(hf_cfg)
  out = {}
  for ours, (theirs, transposed) in hf_format.param_name_map(cfg).items():
    shape = {"embed.embedding": (cfg.vocab_size, cfg.d_model), "final_norm.scale": (cfg.d_model,),
             "lm_head.kernel": (cfg.d_model, cfg.vocab_size)}.get(ours)
    if shape is None:
      d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
      q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
      kind = ours.split(".", 2)[2]
      shape = {"attn_norm.scale": (d,), "mlp_norm.scale": (d,), "attn.q_proj.kernel": (d, q),
               "attn.k_proj.kernel": (d, kv), "attn.v_proj.kernel": (d, kv), "attn.o_proj.kernel": (q, d),
               "mlp.gate_proj.kernel": (d, f), "mlp.up_proj.kernel": (d, f), "mlp.down_proj.kernel": (f, d),
               "attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,)}[kind]
    if transposed:
      shape = shape[::-1]
    scale = 1.0 if ours.endswith("scale") else 0.2
    base = 1.0 if ours.endswith("scale") else 0.0
    out[theirs] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
  return out


def write_hf_dir(path, hf_cfg, state):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(hf_cfg, fh)
  hf_format.write_safetensors(os.path.join(path, "model.safetensors"), state)
  return str(path)


def reference_logits(hf_cfg, state, tokens):
  """A plain numpy Llama/Qwen2 forward in HF layout: an implementation independent of ours."""
  c = hf_format.config_from_hf(hf_cfg)
  t = len(tokens)
  x = state["model.embed_tokens.weight"][tokens].astype(np.float64)

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * w

  def lin(x, name):
    y = x @ state[name + ".weight"].T
    return y + state[name + ".bias"] if name + ".bias" in state else y

  inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]

  def rot(v):  # [T, N, H]
    h = v.shape[-1] // 2
    return v * cos + np.concatenate([-v[..., h:], v[..., :h]], -1) * sin

  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    hdn = norm(x, state[p + "input_layernorm.weight"])
    q = rot(lin(hdn, p + "self_attn.q_proj").reshape(t, c.num_heads, c.head_dim))
    k = rot(lin(hdn, p + "self_attn.k_proj").reshape(t, c.num_kv_heads, c.head_dim))
    v = lin(hdn, p + "self_attn.v_proj").reshape(t, c.num_kv_heads, c.head_dim)
    rep = c.num_heads // c.num_kv_heads
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(c.head_dim) + np.triu(np.full((t, t), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + lin(np.einsum("nts,snh->tnh", a, v).reshape(t, -1), p + "self_attn.o_proj")
    hdn = norm(x, state[p + "post_attention_layernorm.weight"])
    g = lin(hdn, p + "mlp.gate_proj")
    x = x + lin(g / (1 + np.exp(-g)) * lin(hdn, p + "mlp.up_proj"), p + "mlp.down_proj")
  head = state["model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"]
  return norm(x, state["model.norm.weight"]) @ head.T


_GGUF_NAMES = {v: k for k, v in gguf_format._GLOBAL_NAMES.items()}


_GGUF_LAYER = {v: k for k, v in gguf_format._LAYER_NAMES.items()}


def add_gguf_hparams(w, cfg, head_lengths=False):
  """The model hyper-parameters llama.cpp writes (``head_lengths``: the explicit key/value head sizes)."""
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  if head_lengths:
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)


def write_tiny_gguf(path, arch, hf_cfg, state, quant=None, vocab=None):
  """A GGUF file as llama.cpp's converter writes it (llama: q/k rows permuted), some tensors quantized.
  ``vocab(writer, vocab_size)`` writes the tokenizer (default: :func:`add_tiny_gpt2_vocab`)."""
  gguf = pytest.importorskip("gguf")
  cfg = hf_format.config_from_hf(hf_cfg)
  w = gguf.GGUFWriter(str(path), arch)
  add_gguf_hparams(w, cfg)
  (vocab or add_tiny_gpt2_vocab)(w, cfg.vocab_size)
  for name, arr in state.items():
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      gname = f"blk.{i}.{_GGUF_LAYER[rest]}"
    else:
      gname = _GGUF_NAMES[name]
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      arr = gguf_format.permute_for_gguf(arr, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
    qtype = quant if arr.ndim == 2 else None
    if qtype is None:
      w.add_tensor(gname, arr)
    else:
      w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def add_tiny_gpt2_vocab(w, vocab_size):
  """A byte-level BPE vocabulary: 3 control tokens, the space and 92 more byte-level symbols, no merges."""
  from tandem_jax.interop.hf_tokenizer import _tokenizers

  alphabet = ["\u0120"] + sorted(set(_tokenizers().pre_tokenizers.ByteLevel.alphabet()) - {"\u0120"})  # space
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet[:vocab_size - 3]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
  w.add_token_merges([])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)


def add_tiny_sentencepiece_vocab(w, vocab_size):
  """A SentencePiece vocabulary as llama.cpp writes one ('llama'): <unk>, <s>, </s>, the 256 byte-fallback tokens,
  then word pieces scored best-first; no merges (they are recovered from the scores)."""
  pieces = ["\u2581the", "\u2581", "e", "t", "h", "o", "a", "n", "s", "\u2581a", "he", "th"]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
  tokens += [f"\u2581w{i}" for i in range(vocab_size - len(tokens))]
  w.add_tokenizer_model("llama")
  w.add_token_list(tokens)
  w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
  w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
  w.add_unk_token_id(0)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)


def _greedy(model, prompt, max_new):
  """Our greedy `ar` decoding: the decoding API when present, else prefill + a jitted extend loop."""
  try:
    from tandem_jax.decoding.api import generate
  except ImportError:
    generate = None
  if generate is not None:
    return list(generate("ar", [prompt], primary=model, max_new_tokens=max_new, eos_id=None).tokens[0])
  from flax import nnx

  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, cache):
    logits, _, cache = nnx.merge(graphdef, state).extend(tokens, cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  cache = model.init_cache(1, len(prompt) + max_new)
  nxt, cache = step(state, jnp.asarray([prompt], jnp.int32), cache)
  out = [int(nxt[0])]
  for _ in range(max_new - 1):
    nxt, cache = step(state, nxt[:, None], cache)
    out.append(int(nxt[0]))
  return out


def assert_export_and_greedy(model, ref, tokens, want, tmp_path, max_new, **load_kw):
  """Our imported ``model`` exported to a Hugging Face directory loads back into transformers (``load_kw``) as the
  class of ``ref`` with ``ref``'s logits ``want`` on ``tokens``, and our greedy decoding equals ``ref.generate``'s."""
  import torch
  import transformers

  out = convert.export_safetensors(model, tmp_path / "export")
  back = transformers.AutoModelForCausalLM.from_pretrained(out, **load_kw).eval()
  assert type(back).__name__ == type(ref).__name__
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.tensor(tokens)).logits.numpy(), want, atol=1e-5, rtol=1e-5)
    hf_greedy = ref.generate(torch.tensor(tokens), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(tokens[0]):].tolist()
  assert _greedy(model, tokens[0], max_new) == hf_greedy


def assert_logits_match(model, ref, sequences, name, atol=2e-3):
  """Our model's logits against a transformers model's (float32, highest matmul precision) on token-id sequences:
  max |difference| below ``atol`` and the argmax equal at every position."""
  import torch

  worst, agree, total = 0.0, 0, 0
  for ids in sequences:
    with torch.no_grad():
      want = ref(torch.tensor([ids])).logits[0].numpy()
    with jax.default_matmul_precision("highest"):
      got = np.asarray(model.forward(jnp.asarray([ids]))[0][0])
    worst = max(worst, float(np.abs(got - want).max()))
    agree += int((got.argmax(-1) == want.argmax(-1)).sum())
    total += len(ids)
  print(f"{name} logits: max |diff| {worst:.2e}, argmax agreement {agree}/{total}")
  assert worst < atol and agree == total

