"""Streaming (`generate(on_tokens=...)`): the host receives each row's new tokens from inside the compiled loop."""

import jax
import pytest
from flax import nnx

from conftest import tiny_config
from tandem_jax import sharding
from tandem_jax.decoding import SamplingParams, api, generate
from tandem_jax.models import LLMToSLM, TandemConfig, TandemLM
from test_decoding import P_CFG, S_CFG, _build

PROMPTS = [[5, 9, 2], list(range(10, 19)), [(7 * i) % 64 for i in range(14)]]  # ragged: 3, 9 and 14 tokens
MAX_NEW = [12, 5, 16]  # per row, all in one 16-token buffer bucket
CASES = {"ar": dict(), "speed": dict(block_len=3), "tandem": dict(block_len=3), "tandem_speed": dict(block_len=3),
         "adaptive": dict(block_len=4, threshold=0.5), "llm_to_slm": dict()}


@pytest.fixture(scope="module")
def models():
  tandem, drafter, router = _build()
  with nnx.use_eager_sharding(False):
    l2s = LLMToSLM(tiny_config(**P_CFG), tiny_config(**S_CFG), nnx.Rngs(0))
  l2s.proj_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(0), l2s.proj_out.kernel.shape)
  return dict(primary=tandem.primary, drafter=drafter, tandem=tandem, router=router, llm_to_slm=l2s)


def _kwargs(case, models):
  kw = dict(CASES[case])
  method = "tandem_speed" if case == "adaptive" else case
  need = {"ar": ("primary",), "speed": ("primary", "drafter"), "tandem": ("tandem",), "tandem_speed": ("tandem",),
          "adaptive": ("tandem", "router"), "llm_to_slm": ("llm_to_slm",)}[case]
  kw.update({n: models[n] for n in need})
  return method, kw


class Collector:
  """An on_tokens that keeps every call and the per-row concatenation."""

  def __init__(self, b):
    self.calls, self.rows = [], [[] for _ in range(b)]

  def __call__(self, new):
    assert len(new) == len(self.rows) and all(isinstance(t, int) for r in new for t in r)
    self.calls.append(new)
    for row, toks in zip(self.rows, new):
      row.extend(toks)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_tokens_are_the_result(models, case, temperature):
  method, kw = _kwargs(case, models)
  params = SamplingParams(temperature=temperature)
  free = Collector(3)
  ref = generate(method, PROMPTS, max_new_tokens=MAX_NEW, sampling=params, seed=1, on_tokens=free, **kw)
  assert free.rows == ref.tokens and len(free.calls) > 1
  eos = ref.tokens[0][2]  # row 0 emits it by its third token; the same seed replays the same tokens up to it
  got, size = Collector(3), len(api._compiled)
  out = generate(method, PROMPTS, max_new_tokens=MAX_NEW, sampling=params, seed=1, eos_id=eos, on_tokens=got, **kw)
  assert len(api._compiled) == size  # eos_id is traced: the same streaming program
  assert got.rows == out.tokens and len(got.calls) > 1
  assert out.tokens[0][-1] == eos and len(out.tokens[0]) <= 3
  for row, m in enumerate(MAX_NEW):
    assert out.tokens[row] == ref.tokens[row][:len(out.tokens[row])] and len(out.tokens[row]) <= m


def test_streaming_reuses_one_program_and_does_not_change_the_tokens(models):
  method, kw = _kwargs("tandem_speed", models)
  first = Collector(3)
  a = generate(method, PROMPTS, max_new_tokens=MAX_NEW, on_tokens=first, **kw)
  size = len(api._compiled)
  second = []
  b = generate(method, PROMPTS, max_new_tokens=MAX_NEW, on_tokens=second.append, **kw)
  assert len(api._compiled) == size  # another on_tokens, the same compiled program
  assert [[t for c in second for t in c[i]] for i in range(3)] == b.tokens == a.tokens == first.rows
  plain = generate(method, PROMPTS, max_new_tokens=MAX_NEW, **kw)  # its own program, without the callback
  assert plain.tokens == a.tokens
  # (stream flag, callback in the program) of every program of the method: only the streaming ones call back
  assert {(key[-3], "callback" in c.as_text()) for key, c in api._compiled.items() if key[0] == method} == {
      (True, True), (False, False)}


def test_an_exception_in_on_tokens_is_raised_after_the_run(models):
  method, kw = _kwargs("ar", models)

  def fail(new):
    raise KeyError("stop")

  with pytest.raises(KeyError, match="stop"):
    generate(method, PROMPTS, max_new_tokens=MAX_NEW, on_tokens=fail, **kw)
  ok = Collector(3)
  out = generate(method, PROMPTS, max_new_tokens=MAX_NEW, on_tokens=ok, **kw)  # the sink is free again
  assert ok.rows == out.tokens


def test_streaming_under_a_mesh():
  ctor = lambda r: TandemLM(tiny_config(**dict(P_CFG, num_heads=8, num_kv_heads=4)),  # noqa: E731
                            tiny_config(**S_CFG), TandemConfig(), r)
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  tandem = sharding.create_sharded(ctor, mesh, seed=4)
  prompts = [list(range(1, 2 + i)) for i in range(4)]
  got = Collector(4)
  out = generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=[10, 4, 10, 7], block_len=3, mesh=mesh,
                 on_tokens=got)
  assert got.rows == out.tokens and len(got.calls) > 1
  with pytest.raises(ValueError, match="needs their mesh"):  # models on 8 devices, no mesh: refused before compiling
    generate("tandem_speed", prompts, tandem=tandem, max_new_tokens=4, on_tokens=got)
