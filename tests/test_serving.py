"""Serving weights and the decode layout: decode programs take weights cast once (config.serving.dtype) and
neither convert nor all-gather a weight per call or per loop iteration (read from the compiled HLO, on CPU with 8
fake devices and on a deviceless v5e compile); workdirs load for decoding in that dtype and on the decode mesh."""

import jax
import jax.numpy as jnp
import pytest

from configs import base
from tandem_jax import aot, sharding
from tandem_jax.decoding import api
from tandem_jax.models import bundle as bundle_lib
from tandem_jax.models.tandem import TandemLM
from tandem_jax.topology import abstract_module

MIN_ELEMENTS = aot.MIN_WEIGHT_ELEMENTS


def _config(serving_dtype="bfloat16"):
  c = base.get_config("tandem", "tiny")
  with c.unlocked():
    c.serving.dtype = serving_dtype
    c.primary.dtype = c.secondary.dtype = "bfloat16"  # compute dtype of the TPU presets
  return c


def _weight_ops(config, mesh, *, result_dtypes=None, decode=True, batch=2):
  """{program: weight-sized converts / all-gathers} of the four per-call programs (anywhere in them) and of the
  whole tandem_speed program (inside its loop bodies)."""
  rules = sharding.rules_of(config)
  p, s, t = bundle_lib.model_configs(bundle_lib.serving_config(config))
  tandem = abstract_module(lambda r: TandemLM(p, s, t, r), mesh, rules)
  sizes = aot.weight_elements(tandem, min_elements=MIN_ELEMENTS)
  found = {}
  for name, lowered in aot.lower_calls(tandem, batch=batch, capacity=48, max_block_len=4, mesh=mesh,
                                       rules=rules).items():
    found[name] = aot.loop_weight_ops(lowered.compile().as_text(), sizes, whole_program=True,
                                      result_dtypes=result_dtypes)
  if decode:
    lowered = api.lower("tandem_speed", {"tandem": tandem}, batch_size=batch, prompt_len=8, max_new_tokens=16,
                        max_block_len=4, mesh=mesh, rules=rules)
    found["decode_tandem_speed"] = aot.loop_weight_ops(lowered.compile().as_text(), sizes,
                                                       result_dtypes=result_dtypes)
  return found


# -- the config ----------------------------------------------------------------------------------------------------
def test_serving_config_casts_only_when_asked():
  c = base.get_config("tandem", "tiny")
  assert c.serving.dtype == "" and bundle_lib.serving_config(c) is c  # CPU presets decode as they train
  assert bundle_lib.decode_mesh_config(c) is c.mesh
  s = bundle_lib.serving_config(_config())
  assert (s.primary.param_dtype, s.primary.dtype, s.secondary.param_dtype) == ("bfloat16",) * 3
  assert c.primary.param_dtype == "float32"  # training's master weights untouched
  with pytest.raises(ValueError, match="config.serving.dtype"):
    bundle_lib.serving_config(_config("int3"))
  for preset, mesh in (("v5e16", (4, 1, 4)), ("v5e256", (64, 1, 4))):
    p = base.get_config("tandem", preset)
    assert p.serving.dtype == "bfloat16" and tuple(p.serving.mesh_shape) == mesh
    assert bundle_lib.decode_mesh_config(p).axes == ("data", "fsdp", "model")


# -- the compiled programs ---------------------------------------------------------------------------------------
def test_no_weight_sized_converts_or_gathers_per_call_on_cpu():
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  # CPU upcasts bf16 dot operands to f32 itself (no such lowering on TPU): count what casts *to* bf16.
  found = _weight_ops(_config(), mesh, result_dtypes={"bf16"})
  gathers = _weight_ops(_config(), mesh, decode=False)
  assert not any(found.values()), found
  assert not any(op["opcode"] == "all-gather" for ops in gathers.values() for op in ops), gathers
  # The check bites: float32 master weights are converted to bf16 on every call.
  master = _weight_ops(_config(""), mesh, result_dtypes={"bf16"}, decode=False)
  assert master["primary_step"] and {op["opcode"] for op in master["primary_step"]} == {"convert"}


def _v5e_config(mesh_shape):
  """The tiny config decoding on ``mesh_shape``, for a deviceless v5e compile (skipped, saying why, without libtpu)."""
  pytest.importorskip("libtpu", reason="libtpu is not installed: the deviceless v5e compile needs the tpu extra "
                                       "(pip install -e '.[tpu]')")
  c = _config()
  with c.unlocked():
    c.serving.mesh_shape = mesh_shape
  return c


def test_no_weight_sized_converts_or_gathers_on_v5e():
  from tandem_jax.topology import topology_mesh
  c = _v5e_config((1, 4))
  mesh = topology_mesh("v5e:2x2", bundle_lib.decode_mesh_config(c))
  found = _weight_ops(c, mesh, batch=1)  # every dtype
  assert not any(found.values()), found
  with c.unlocked():
    c.serving.dtype = ""  # float32 master weights: the embedding table is converted to bf16 on every call
  master = _weight_ops(c, mesh, decode=False, batch=1)
  assert [op["shape"] for op in master["primary_step"]] == ["bf16[96,32]"], master


def test_aot_decodes_the_presets_on_their_serving_layout():
  # model 2: the tiny models' 2 kv heads split over it (over 4 the scanned KV cache is replicated and gathered)
  c = _v5e_config((2, 2))
  with c.unlocked():
    c.primary.scan_layers = c.secondary.scan_layers = True  # as the presets: costs extrapolated in depth
  r = aot.run(c, "v5e:2x2", prompt_len=8, max_new_tokens=16, block_len=4, groups=("calls",), check_depth=True,
              log=lambda *a: None)
  assert r["decode_mesh"] == {"data": 2, "model": 2} and r["serving_dtype"] == "bfloat16" and not r["failures"]
  step = r["programs"]["primary_step"]
  assert step["weight_ops_per_call"] == 0 and step["roofline"]["bytes_over_min"] > 1
  assert step["unrolled"]["bytes_accessed"] > 0 and "unrolled / minimum" in aot.format_report(r)
  # HBM traffic by memory spaces: the weights are read from HBM about once; XLA's bytes accessed also counts the
  # copies into on-chip memory and the fusions' reads there
  for name in ("primary_step", "primary_block"):
    rf, un = r["programs"][name]["roofline"], r["programs"][name]["unrolled"]
    # (the tiny models' weights are 62 KB: a 5-token block's activations and logits add 60% to them)
    assert 0.9 < un["hbm_over_min"] < 2.0 and un["hbm_over_min"] < un["bytes_over_min"] / 5, (name, rf, un)
    assert rf["hbm_over_min"] < rf["bytes_over_min"] / 5, (name, rf)


# -- loading a workdir for decoding ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_tandem(tmp_path_factory):
  """A tiny primary, secondary and tandem trained 1 step each; the tandem's config serves bf16 on a (2, 4) mesh."""
  from tandem_jax.training import chain
  configs = {}
  for stage in ("primary", "secondary", "tandem"):
    c = configs[stage] = base.get_config(stage, "tiny")
    c.data.tokenizer_cache = str(tmp_path_factory.mktemp("tok"))
    c.train.steps, c.train.log_every, c.train.eval_batches = 1, 1, 1
  configs["tandem"].serving.dtype = "bfloat16"
  configs["tandem"].serving.mesh_shape = (2, 4)
  return chain.train_chain(configs, str(tmp_path_factory.mktemp("chain")))["tandem"]["workdir"]


def test_workdir_loads_bf16_on_the_decode_mesh_and_decodes_losslessly(bf16_tandem):
  from tandem_jax import generate as gen_cli
  from tandem_jax import workdir as workdir_lib
  trained = workdir_lib.load_workdir(bf16_tandem)
  assert {x.dtype for x in jax.tree.leaves(trained.model.primary)} == {jnp.dtype(jnp.float32)}  # as trained
  gen = gen_cli.load(bf16_tandem)
  tandem = gen.models["tandem"]
  assert {x.dtype for x in jax.tree.leaves(tandem.primary)} == {jnp.dtype(jnp.bfloat16)}
  assert tandem.primary.cfg.dtype == "bfloat16" and dict(gen.mesh.shape) == {"data": 2, "model": 4}
  kernel = tandem.primary.embed.embedding[...]
  assert kernel.sharding.mesh.shape == gen.mesh.shape  # placed on the decode mesh once, at load
  prompts = ["hello world", "a b c"]
  ar = gen("ar", prompts, max_new_tokens=8)
  spec = gen("tandem_speed", prompts, max_new_tokens=8, block_len=3, policy="fixed")
  assert spec.tokens == ar.tokens  # lossless in the serving dtype
