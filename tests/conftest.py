"""Fakes 8 CPU devices (before jax is imported) so every sharding path runs on CPU."""

import os

# The suite's cost is XLA compiling, not running: its models are tiny (a speculative decode program of
# test_decoding: ~8 s to compile, ~0.01 s to run on a 2-core machine). XLA:CPU's older loop emitters, instead of its
# MLIR fusion emitters, with LLVM at -O0 compile such programs in 40% of the time (8.5 -> 3.3 s; either flag alone:
# 7.1 or 6.2 s), and the whole suite in 15 minutes instead of 28. Neither changes float semantics (no fast-math
# either way); unoptimised elementwise code runs several times slower, which these models do not feel (the
# 20,000-row sampling test ran faster too). Subprocesses that tests start get the flags as well (COMPILE_FLAGS).
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), COMPILE_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from tandem_jax.models.config import TransformerConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  Each compiled CPU program maps its code into the process (test_streaming alone leaves ~9,000 memory maps); the
  whole suite in one process passed the kernel's limit (vm.max_map_count, 65,530 here) and XLA's compiler then died
  with a segmentation fault in a later compile. Clearing JAX's caches and the decoder's own unmaps them."""
  yield
  import gc

  from tandem_jax.decoding import api
  api._compiled.clear()
  jax.clear_caches()
  gc.collect()


def tiny_config(**overrides) -> TransformerConfig:
  base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
              max_seq_len=128)
  base.update(overrides)
  return TransformerConfig(**base)


@pytest.fixture
def tiny_cfg():
  return tiny_config()


def jitted(model, method: str, **static):
  """jit of ``model.<method>`` as a pure function of its arguments (the model is closed over as split state)."""
  import functools
  from flax import nnx

  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=tuple(static))
  def call(state, *args, **kw):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kw)

  return lambda *args, **kw: call(state, *args, **kw)


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
  """Every stage trained for 2 steps on :tiny by the package's one chain (training/chain.py).

  {stage: train result + "workdir"}."""
  from configs import base
  from tandem_jax.training import chain

  tok = str(tmp_path_factory.mktemp("tok"))
  configs = {}
  for stage in ("primary", "secondary", "secondary_distil", "tandem", "tandem_distil", "llm_to_slm", "router"):
    c = configs[stage] = base.get_config(stage, "tiny")
    c.data.tokenizer_cache = tok
    c.train.steps, c.train.log_every, c.train.eval_batches = 2, 1, 1
  return chain.train_chain(configs, str(tmp_path_factory.mktemp("chain")))
