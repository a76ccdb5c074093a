"""Pretrained model families: Llama 3.x RoPE scaling, Qwen3, Gemma 2, Gemma 3; real Gemma-3-270M and Qwen2.5-Coder-0.5B.

Each family is a set of TransformerConfig switches. Checked here, per family with its features switched on (RoPE
scaling, soft-capping, sliding windows shorter than the test sequence, q/k norms, Gemma's norms):
- fast: the cached step and ragged block extends equal the full forward, a rollback past the window is exact,
  Tandem's parallel forward equals its step-by-step decoding, a tandem trains a few steps and decodes losslessly;
- ``interop``: tiny random models built by transformers from the family's config class, saved, imported, logits
  equal to transformers' (1e-4, float32), greedy generation equal, exported back and reloaded by transformers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jitted, tiny_config
from tandem_jax import convert
from tandem_jax.interop import hf_format
from tandem_jax.models import TandemConfig, TandemLM
from tandem_jax.models.transformer import Transformer

# -- the families as Hugging Face configs (tiny, every feature on) -----------------------------------------------

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)

HF_FAMILIES = {
    "llama3": ("LlamaForCausalLM", dict(rope_theta=5000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear": ("LlamaForCausalLM", dict(rope_theta=5000.0, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_yarn": ("LlamaForCausalLM", dict(rope_theta=5000.0, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "qwen3": ("Qwen3ForCausalLM", dict(rope_theta=5000.0, tie_word_embeddings=True)),
    "gemma2": ("Gemma2ForCausalLM", dict(
        rope_theta=5000.0, sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3ForCausalLM", dict(
        rope_theta=5000.0, rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=2.0),
        sliding_window=4, query_pre_attn_scalar=12, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        hidden_activation="gelu_pytorch_tanh")),
}


def hf_family_config(name):
  arch, kw = HF_FAMILIES[name]
  return dict(_BASE, architectures=[arch], **kw)


def family_config(name, **overrides) -> "TransformerConfig":  # noqa: F821
  """Our config of a family (as imported), at the tiny test size of conftest (vocab 64, max_seq_len 128)."""
  cfg = hf_format.config_from_hf(hf_family_config(name))
  return dataclasses.replace(cfg, **dict(dict(vocab_size=64, max_seq_len=128), **overrides))


def test_family_configs_set_the_switches():
  c = family_config("llama3")
  assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len) == ("llama3", 8.0, 16)
  c = family_config("llama_yarn")
  assert c.rope_scaling == "yarn" and c.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
  c = family_config("qwen3")
  assert c.qk_norm and not c.qkv_bias and not c.post_norms
  c = family_config("gemma2")
  assert (c.layer_types, c.sliding_window, c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar) == (
      ("sliding", "full"), 4, 2.0, 3.0, 12.0)
  assert c.norm_plus_one and c.post_norms and c.scale_embeddings and c.mlp_activation == "gelu_tanh"
  assert not c.qk_norm
  c = family_config("gemma3")
  assert (c.layer_types, c.rope_local_theta, c.rope_scaling, c.qk_norm, c.attn_softcap) == (
      ("sliding", "sliding", "full"), 100.0, "linear", True, 0.0)
  # A Gemma 3 file without layer_types: every sliding_window_pattern-th layer is global.
  old = {k: v for k, v in hf_family_config("gemma3").items() if k != "layer_types"}
  assert hf_format.config_from_hf(dict(old, num_hidden_layers=8)).layer_types == ("sliding",) * 5 + ("full",)
  # Gemma reads hidden_activation; older files also carry an unused hidden_act="gelu".
  assert hf_format.config_from_hf(dict(hf_family_config("gemma2"), hidden_act="gelu")).mlp_activation == "gelu_tanh"
  # The pattern repeats: a 1-layer drafter of a Gemma 2 primary keeps the primary's first layer type.
  assert dataclasses.replace(family_config("gemma2"), num_layers=1).layer_type(0) == "sliding"


@pytest.mark.parametrize("name", sorted(HF_FAMILIES))
def test_config_json_round_trip(name):
  cfg = family_config(name)
  back = hf_format.config_from_hf(hf_format.config_to_hf(cfg), max_seq_len=cfg.max_seq_len)
  assert back == cfg


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", dict(rope_type="dynamic", factor=2.0), "dynamic"),
    ("rope_scaling", dict(rope_type="longrope", factor=2.0), "longrope"),
    ("rope_scaling", dict(rope_type="llama3", factor=8.0), "low_freq_factor"),
    ("rope_scaling", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, truncate=False),
     "truncate"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
])
def test_unsupported_rope_variants_are_named(field, value, match):
  c = hf_family_config("llama3")
  c.pop("rope_scaling")
  if field == "partial_rotary_factor":
    c["rope_parameters"] = dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=value)
  else:
    c[field] = value
  with pytest.raises(ValueError, match=match):
    hf_format.config_from_hf(c)


@pytest.mark.parametrize("name, overrides, match", [
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("gemma3", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "chunked_attention"),
    ("qwen3", dict(attention_bias=True), "attention_bias"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
])
def test_unsupported_family_variants_are_named(name, overrides, match):
  with pytest.raises(ValueError, match=match):
    hf_format.config_from_hf(dict(hf_family_config(name), **overrides))


def test_configs_no_class_computes_refuse_export():
  with pytest.raises(ValueError, match="layer_types"):
    hf_format.config_to_hf(tiny_config(layer_types=("sliding", "full"), sliding_window=4))
  with pytest.raises(ValueError, match="rope_freq_factors"):
    hf_format.config_to_hf(tiny_config(rope_freq_factors=(1.0, 2.0, 4.0, 8.0)))


def test_switch_errors_name_the_field():
  for kw, match in [(dict(rope_scaling="dynamic"), "rope_scaling"),
                    (dict(rope_scaling="llama3", rope_factor=8.0), "rope_original_max_len"),
                    (dict(layer_types=("local",)), "layer_types"),
                    (dict(layer_types=("sliding", "full")), "sliding_window"),
                    (dict(sliding_window=4), "sliding_window"),
                    (dict(rope_local_theta=100.0), "rope_local_theta"),
                    (dict(mlp_activation="relu"), "mlp_activation"),
                    (dict(rope_freq_factors=(1.0,)), "rope_freq_factors")]:
    with pytest.raises(ValueError, match=match):
      tiny_config(**kw)


# -- the three forward paths agree on every family's switches -----------------------------------------------------

ATOL = 3e-5
PARITY_FAMILIES = ["llama3", "llama_yarn", "qwen3", "gemma2", "gemma3"]


def _model(cfg, seed=0):
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, nnx.Rngs(seed))


def _randomise_norms(model, seed=0):
  """Norm scales away from their init (Gemma's start at 0), so a norm applied wrongly shows."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      var[...] = var[...] + 0.3 * rng.standard_normal(var[...].shape).astype(np.float32)


@pytest.mark.parametrize("name", PARITY_FAMILIES)
def test_cached_blocks_and_rollback_match_full_forward(name):
  """Ragged prefill, random block extends and a rollback (rejected drafts) equal the full forward, over sequences
  longer than the sliding window."""
  rng = np.random.default_rng(1)
  model = _model(family_config(name))
  _randomise_norms(model)
  forward, extend = jitted(model, "forward", return_hidden=True), jitted(model, "extend", return_hidden=True)
  b, t = 3, 24
  seqs = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
  full, hidden_full = forward(seqs, return_hidden=True)
  cache = model.init_cache(b, 32)
  pieces, hiddens, lo = [], [], 0
  while lo < t:
    k = min(int(rng.choice([1, 2, 3, 5, 8])), t - lo)
    logits, hidden, cache = extend(seqs[:, lo:lo + k], cache, return_hidden=True)
    pieces.append(logits)
    hiddens.append(hidden)
    lo += k
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=ATOL)
  np.testing.assert_allclose(jnp.concatenate(hiddens, 2), hidden_full, atol=ATOL)
  # Rejected drafts written past each row's kept length, rolled back, then a block continuing from there.
  cache = model.init_cache(b, 32)
  _, _, cache = extend(seqs[:, :10], cache, return_hidden=True)
  _, _, cache = extend(jnp.asarray(rng.integers(0, 64, (b, 6)), jnp.int32), cache, return_hidden=True)
  keep = jnp.asarray([3, 7, 10], jnp.int32)
  cache = cache.rollback(keep)
  cont = jnp.take_along_axis(seqs, keep[:, None] + jnp.arange(12)[None], axis=1)
  logits, _, _ = extend(cont, cache, return_hidden=True)
  want = jnp.take_along_axis(full, (keep[:, None] + jnp.arange(12)[None])[..., None], axis=1)
  np.testing.assert_allclose(logits, want, atol=ATOL)


def test_sliding_window_and_softcaps_change_the_function():
  """The switches are live: turning one off changes the logits (so the parity tests above test them)."""
  cfg = family_config("gemma2")
  model = _model(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 24)), jnp.int32)
  base, _ = model.forward(tokens)
  for off in (dict(layer_types=(), sliding_window=0), dict(attn_softcap=0.0), dict(final_softcap=0.0),
              dict(query_pre_attn_scalar=0.0)):
    other = _model(dataclasses.replace(cfg, **off))
    nnx.update(other, nnx.state(model))
    logits, _ = other.forward(tokens)
    assert float(jnp.max(jnp.abs(logits - base))) > 1e-4, off
  # Within the window a sliding layer is a full one: the first sliding_window positions agree.
  no_window = _model(dataclasses.replace(cfg, layer_types=(), sliding_window=0))
  nnx.update(no_window, nnx.state(model))
  w = cfg.sliding_window
  np.testing.assert_allclose(no_window.forward(tokens)[0][:, :w], base[:, :w], atol=ATOL)


def test_scanned_layers_compute_the_unrolled_function_with_sliding_layers():
  """Under lax.scan the per-layer window and RoPE base are traced flags; same function as unrolled layers."""
  from tandem_jax.models.transformer import stack_layer_state

  cfg = family_config("gemma3")
  loop, scan = _model(cfg, 1), _model(dataclasses.replace(cfg, scan_layers=True), 2)
  _randomise_norms(loop)
  nnx.update(scan.layers, stack_layer_state([nnx.state(layer) for layer in loop.layers]))
  nnx.update(scan.embed, nnx.state(loop.embed))
  nnx.update(scan.final_norm, nnx.state(loop.final_norm))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 20)), jnp.int32)
  np.testing.assert_allclose(loop.forward(tokens)[0], scan.forward(tokens)[0], atol=ATOL)
  outs = []
  for m in (loop, scan):
    cache = m.init_cache(2, 32)
    _, _, cache = jitted(m, "extend")(tokens[:, :9], cache)
    outs.append(jitted(m, "extend")(tokens[:, 9:], cache)[0])
  np.testing.assert_allclose(outs[0], outs[1], atol=ATOL)


def _family_tandem(name, seed=0, scan=False, **tandem_kw):
  primary = family_config(name, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, d_ff=96,
                          scan_layers=scan)
  secondary = dataclasses.replace(primary, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, d_ff=64)
  if name == "gemma3":
    secondary = dataclasses.replace(secondary, layer_types=("sliding", "full"))
  with nnx.use_eager_sharding(False):
    tandem = TandemLM(primary, secondary, TandemConfig(**tandem_kw), nnx.Rngs(seed))
  _randomise_norms(tandem, seed)
  return tandem


@pytest.mark.parametrize("name, gamma, scan, boundary", [
    ("llama3", 2, False, "fig1"), ("qwen3", 3, False, "eq2"), ("gemma2", 2, False, "fig1"),
    ("gemma3", 3, False, "fig1"), ("gemma3", 2, True, "eq2")])
def test_tandem_parallel_forward_equals_step_by_step(name, gamma, scan, boundary):
  """Tandem's mixed key set (projected primary keys + own keys) under the family's switches: the training forward
  equals decoding's drafter, with blocks reaching past the sliding window."""
  from test_tandem import forward_at_drafts, step_by_step
  from tandem_jax.models.tandem import decode_block_offset

  rng = np.random.default_rng(gamma)
  tandem = _family_tandem(name, seed=gamma, scan=scan, boundary=boundary)
  b, t, n_blocks = 3, 48, 3
  seqs = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
  prompt_lens = rng.integers(1, 12, b)
  got = step_by_step(tandem, seqs, prompt_lens, gamma, n_blocks)
  forward = jitted(tandem, "forward", block_len=gamma + 1)
  want = forward_at_drafts(forward, seqs, prompt_lens, gamma, n_blocks,
                           decode_block_offset(jnp.asarray(prompt_lens), boundary))
  np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma2", "gemma3"])
def test_tandem_trains_and_decodes_losslessly(name):
  """A few Adam steps on the tandem (the primary frozen by the forward), then tandem_speed = ar, greedy."""
  import optax
  from tandem_jax.decoding.api import generate

  tandem = _family_tandem(name, seed=3)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (4, 32)), jnp.int32)
  opt = nnx.Optimizer(tandem, optax.adam(1e-2), wrt=nnx.Param)
  primary_before = jax.tree.map(np.asarray, nnx.state(tandem.primary, nnx.Param))

  @nnx.jit
  def train_step(tandem, opt, tokens):
    def loss_fn(m):
      logits, primary_logits = m.forward(tokens, block_len=3)
      target = jnp.argmax(primary_logits, -1)  # Tandem-CE on the primary's greedy tokens
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1))
    loss, grads = nnx.value_and_grad(loss_fn)(tandem)
    opt.update(tandem, grads)
    return loss

  losses = [float(train_step(tandem, opt, tokens)) for _ in range(8)]
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(primary_before), jax.tree.leaves(nnx.state(tandem.primary, nnx.Param))):
    np.testing.assert_array_equal(a, np.asarray(b))
  prompts = [list(rng.integers(0, 64, n)) for n in (3, 9)]
  ar = generate("ar", prompts, primary=tandem.primary, max_new_tokens=20)
  ts = generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=20, block_len=3)
  assert ts.tokens == ar.tokens


# -- GGUF files of each family, written here as llama.cpp's converter writes them --------------------------------

_GGUF_ARCH = {"llama3": "llama", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}


def _random_family_state(cfg, seed=0):
  """A HF state of ``cfg`` with random weights (norm scales away from their init)."""
  model = _model(cfg, seed)
  _randomise_norms(model, seed)
  return hf_format.params_to_hf(convert.get_params(model), cfg)


def write_family_gguf(path, name, cfg, state):
  gguf = pytest.importorskip("gguf")
  from interop_helpers import add_gguf_hparams, add_tiny_gpt2_vocab
  from tandem_jax.interop import gguf_format
  from tandem_jax.models.layers import rope_inv_freq

  arch = _GGUF_ARCH[name]
  layer_names = gguf_format._GEMMA_LAYER_NAMES if arch in gguf_format._GEMMA else gguf_format._LAYER_NAMES
  to_gguf = {v: k for k, v in layer_names.items()}
  w = gguf.GGUFWriter(str(path), arch)
  add_gguf_hparams(w, cfg, head_lengths=True)
  add_tiny_gpt2_vocab(w, cfg.vocab_size)
  if cfg.rope_scaling == "llama3":  # llama.cpp: one divisor per frequency, as a tensor
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling="default"))
    w.add_tensor("rope_freqs.weight", np.asarray(plain / rope_inv_freq(cfg), np.float32))
  elif cfg.rope_scaling == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_factor)
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":  # gemma2 files carry no pattern (llama.cpp's default: every 2nd layer global)
      w.add_sliding_window_pattern([cfg.layer_type(j) == "sliding" for j in range(cfg.num_layers)])
  if cfg.attn_softcap:
    w.add_attn_logit_softcapping(cfg.attn_softcap)
  if cfg.final_softcap:
    w.add_final_logit_softcapping(cfg.final_softcap)
  if cfg.rope_local_theta:
    w.add_float32(f"{arch}.rope.freq_base_swa", cfg.rope_local_theta)
  for hf_name, arr in state.items():
    if hf_name.startswith("model.layers."):
      i, rest = hf_name[len("model.layers."):].split(".", 1)
      gname = f"blk.{i}.{to_gguf[rest]}"
    else:
      gname = {v: k for k, v in gguf_format._GLOBAL_NAMES.items()}[hf_name]
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      arr = gguf_format.permute_for_gguf(arr, cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads)
    if arch in gguf_format._GEMMA and gname.endswith("norm.weight"):
      arr = arr + 1.0  # llama.cpp's Gemma converter stores 1 + w
    w.add_tensor(gname, np.ascontiguousarray(arr, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("name", sorted(_GGUF_ARCH))
def test_family_gguf_imports_the_same_model(name, tmp_path):
  """A GGUF file of the family imports to the same weights and function as its Hugging Face twin (llama3: the
  rope_freqs divisors give the llama3 frequencies; Gemma: the stored 1 + w norms come back as w)."""
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  # GGUF has no query_pre_attn_scalar (llama.cpp: head_dim below 27B).
  cfg = family_config(name, vocab_size=96, max_seq_len=64, query_pre_attn_scalar=0.0)
  state = _random_family_state(cfg)
  got_cfg, hf, _ = convert.load_gguf(write_family_gguf(tmp_path / "m.gguf", name, cfg, state))
  want_cfg = cfg
  if name == "llama3":
    assert got_cfg.rope_scaling == "default" and len(got_cfg.rope_freq_factors) == cfg.head_dim // 2
    want_cfg = dataclasses.replace(cfg, rope_scaling="default", rope_factor=1.0, rope_low_freq_factor=1.0,
                                   rope_high_freq_factor=4.0, rope_original_max_len=0,
                                   rope_freq_factors=got_cfg.rope_freq_factors)
  assert got_cfg == dataclasses.replace(want_cfg, norm_eps=got_cfg.norm_eps)
  assert sorted(hf) == sorted(state)
  for k in state:
    np.testing.assert_allclose(hf[k], state[k], atol=1e-6, err_msg=k)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 20)), jnp.int32)
  want, _ = convert.model_from_hf(cfg, state).forward(tokens)
  got, _ = convert.model_from_hf(got_cfg, hf).forward(tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)


# -- bfloat16 import, one tensor at a time -------------------------------------------------------------------------


def test_bfloat16_checkpoint_imports_one_tensor_at_a_time(tmp_path):
  """A bfloat16 safetensors checkpoint imported with --dtype=bfloat16: read lazily, each tensor cast and placed (on a
  mesh here) as it is read. The weights arrive bit-exact, and the host never holds the model in float32: numpy's
  peak allocation stays under a third of the float32 model (a float32 copy would be all of it)."""
  import tracemalloc

  import ml_dtypes
  from tandem_jax.sharding import make_mesh

  hf_cfg = dict(hf_family_config("gemma2"), vocab_size=4096, hidden_size=256, intermediate_size=1024,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
  cfg = hf_format.config_from_hf(hf_cfg)
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _random_family_state(cfg).items()}
  from interop_helpers import write_hf_dir
  src = write_hf_dir(tmp_path / "bf16", hf_cfg, state)
  f32_bytes = sum(v.size * 4 for v in state.values())
  del state
  tracemalloc.start()
  cfg16, hf, _ = convert.load_hf_dir(src, lazy=True, param_dtype="bfloat16")
  mesh = make_mesh((2, 4), ("fsdp", "model"))
  model = convert.model_from_hf(cfg16, hf, mesh=mesh)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < f32_bytes / 3, (peak, f32_bytes)
  want = hf_format.read_safetensors(f"{src}/model.safetensors", lazy=True)
  kernel = model.layers[0].mlp.gate_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16 and kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  np.testing.assert_array_equal(np.asarray(kernel), want["model.layers.0.mlp.gate_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), want["model.embed_tokens.weight"])
  # Close to the float32 import of the same (exactly representable) weights: bf16 compute, sharded over the mesh.
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (1, 12)), jnp.int32)
  cfg32, hf32, _ = convert.load_hf_dir(src)
  ref, _ = convert.model_from_hf(cfg32, hf32).forward(tokens)
  with jax.set_mesh(mesh):
    got, _ = model.forward(tokens)
  assert float(jnp.max(jnp.abs(got - ref))) < 0.1


# -- against Hugging Face transformers ---------------------------------------------------------------------------

_CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "Qwen3ForCausalLM": "Qwen3Config",
                   "Gemma2ForCausalLM": "Gemma2Config", "Gemma3ForCausalLM": "Gemma3TextConfig"}


def transformers_model(name, seed=0):
  """A tiny random transformers model of the family (norm scales and biases randomised so every one matters)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  hf_cfg = hf_family_config(name)
  arch = hf_cfg["architectures"][0]
  kw = {k: v for k, v in hf_cfg.items() if k != "architectures"}
  config = getattr(transformers, _CONFIG_CLASSES[arch])(**kw)
  config._attn_implementation = "eager"
  ref = getattr(transformers, arch)(config).eval()
  with torch.no_grad():
    for pname, p in ref.named_parameters():
      if pname.endswith("bias") or "norm" in pname:
        p.add_(0.3 * torch.randn_like(p))
      elif "embed_tokens" in pname or "q_proj" in pname or "k_proj" in pname:
        p.mul_(30.0)  # larger logits and attention scores, so the soft-caps bite
  return ref


@pytest.mark.interop
@pytest.mark.parametrize("name", sorted(HF_FAMILIES))
def test_family_matches_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from interop_helpers import assert_export_and_greedy

  ref = transformers_model(name)
  ref.save_pretrained(tmp_path / "hf")
  cfg, hf, _ = convert.load_hf_dir(tmp_path / "hf")
  assert cfg == dataclasses.replace(family_config(name), vocab_size=96, max_seq_len=64)
  model = convert.model_from_hf(cfg, hf)
  tokens = [[3, 50, 7, 91, 12, 12, 64, 1, 30, 8, 77, 5, 40, 41, 9, 60, 33, 2, 17, 88]]  # 20 > window 4, > 16
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model.forward(jnp.asarray(tokens))[0])
  if cfg.final_softcap:
    assert np.abs(want).max() > 0.7 * cfg.final_softcap  # the cap is in play
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert_export_and_greedy(model, ref, tokens, want, tmp_path, 16, attn_implementation="eager")


# -- real checkpoints: Gemma-3-270M and Qwen2.5-Coder-0.5B (GGUF, fetched by `convert fetch-...`) -----------------


def _real_gguf(pinned, env):
  """(directory, path) of a fetched GGUF, or a skip naming the fetch command."""
  import os

  directory = os.path.expanduser(os.environ.get(env, pinned.default_dir))
  path = os.path.join(directory, pinned.filename)
  if not os.path.exists(path):
    command = next(name for name, p in convert.PINNED.items() if p == pinned)
    pytest.skip(f"no {path}: run `python -m tandem_jax.convert {command} --dir={directory}`")
  return directory, path


# name -> (pinned file, env var for its directory, (layers, d_model, sliding window, layer types), BOS id, id range
# of the random tokens, lengths of the two sequences)
REAL = {
    # Gemma 3: a sequence longer than its 512-token sliding window; a SentencePiece tokenizer ('llama' in GGUF).
    "gemma3_270m": (convert.GEMMA3_270M, "TANDEM_JAX_GEMMA3_DIR", (18, 640, 512, ("sliding",) * 5 + ("full",)), 2,
                    260000, (40, 600)),
    # Qwen2.5-Coder: qwen2 architecture (q/k/v biases), tied embeddings, 151,936-token vocabulary.
    "qwen25_coder_05b": (convert.QWEN25_CODER_05B, "TANDEM_JAX_QWEN25_CODER_DIR", (24, 896, 0, ()), None, 150000,
                         (40, 300)),
}


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_matches_transformers(name):
  """A real checkpoint from the same GGUF file, ours against transformers (float32): logits and greedy tokens.
  Fetch: `python -m tandem_jax.convert fetch-gemma3-270m` / `fetch-qwen2.5-coder-0.5b`."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("gguf")
  pytest.importorskip("accelerate")
  from interop_helpers import assert_logits_match
  from tandem_jax.decoding.api import generate
  from tandem_jax.interop import gguf_format

  pinned, env, shape, bos, id_range, lengths = REAL[name]
  directory, path = _real_gguf(pinned, env)
  cfg, hf, _ = gguf_format.read_gguf(path, lazy=True, max_seq_len=1024)
  assert (cfg.num_layers, cfg.d_model, cfg.sliding_window, cfg.layer_types) == shape
  model = convert.model_from_hf(cfg, hf)
  torch.set_num_threads(2)
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=pinned.filename,
                                                          dtype=torch.float32).eval()
  rng = np.random.default_rng(0)
  start = [] if bos is None else [bos]
  assert_logits_match(model, ref, [start + list(rng.integers(3, id_range, n)) for n in lengths], name)
  ids = start + list(rng.integers(3, 20000, 19))
  with torch.no_grad():
    want = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(ids):].tolist()
  with jax.default_matmul_precision("highest"):
    got = list(generate("ar", [ids], primary=model, max_new_tokens=24, eos_id=None).tokens[0])
  assert got == want
  # The tokenizer imports from the GGUF file (Qwen: byte-level BPE; Gemma: SentencePiece): transformers' ids.
  _, _, tok = convert.load_gguf(path, lazy=True)
  ref_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=pinned.filename)
  for text in ("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # héllo, 世界",
               "The  quick brown fox\n\njumps over   the lazy dog."):
    assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False), text
    assert tok.decode(tok.encode(text)) == text
  assert (tok.bos_id, tok.eos_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)
