"""`generate`: one entry point for every method, with input checks before compilation and per-row statistics.

Each call compiles (once per method, shapes and static settings) a single jitted function: prefill, then one
``lax.while_loop``. Models enter as (graphdef, state) so weights are arguments, never baked-in constants.
Streaming (``on_tokens``) is a static flag of that program: its loop sends the emitted buffer to the host after
every iteration (an ordered ``jax.debug.callback``, see ``output.publish``); without it the program has no callback.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem_jax import sharding as shd
from tandem_jax.decoding import autoregressive, output, speculative
from tandem_jax.decoding import costs as costs_lib
from tandem_jax.decoding.sampling import SamplingParams

METHODS = ("ar", "speed", "tandem", "tandem_speed", "llm_to_slm")


@dataclasses.dataclass
class DecodeResult:
  tokens: list[list[int]]          # per row, generated tokens only (EOS included when emitted)
  stats: dict[str, np.ndarray]     # per-row counters (see Stats in speculative.py)
  wall_time: float                 # seconds for the compiled call (compilation excluded)
  compile_time: float              # seconds spent compiling in this call (0 when cached)
  costs: costs_lib.CostTable | None = None  # the cost table the "auto" policy read
  policy_note: str = ""            # "auto": why this call ran the plain program (or probed), else empty
  ran_plain: bool = False          # "auto": this call ran the plain ``ar`` program instead of speculating
  first_run: bool = False          # this call built its program: wall_time includes the first run's one-time costs

  @property
  def summary(self) -> dict[str, float]:
    s = self.stats
    tokens = int(sum(len(t) for t in self.tokens))
    primary = int(s["primary_calls"].sum())
    drafted = int(s["drafted"].sum())
    return dict(tokens=tokens, primary_calls=primary, secondary_calls=int(s["secondary_calls"].sum()),
                tokens_per_primary_call=tokens / max(primary, 1),
                acceptance_rate=(int(s["accepted"].sum()) / drafted) if drafted else float("nan"),
                wall_time=self.wall_time, tokens_per_second=tokens / max(self.wall_time, 1e-9))


def bucket(n: int, quantum: int = 16) -> int:
  """``n`` rounded up to a multiple of ``quantum``: the padded sizes decode programs are compiled for."""
  return -(-n // quantum) * quantum


def buffer_sizes(prompt_len: int, max_new_tokens: int, max_block_len: int) -> tuple[int, int, int]:
  """(padded prompt length, output buffer length, KV-cache capacity) of a decode program.

  Prompt and budget are padded to 16-token buckets (fewer programs to compile); the cache also holds a block of
  K drafts + 1 past the budget and the slot of the pending token."""
  p_pad, max_new = bucket(prompt_len), bucket(max_new_tokens)
  return p_pad, max_new, bucket(p_pad + max_new + max_block_len + 2)


def max_prompt_len(max_seq_len: int, max_new_tokens: int, max_block_len: int) -> int:
  """The longest prompt whose :func:`buffer_sizes` capacity fits a model of ``max_seq_len`` positions."""
  return (max_seq_len - bucket(max_new_tokens) - max_block_len - 2) // 16 * 16


def batch_sharding(mesh, rules) -> jax.NamedSharding:
  """Where a decode's per-row inputs live on ``mesh``: their batch axis split by the 'batch' rule."""
  return shd.logical_to_mesh(jax.P("batch"), rules, mesh)


def _decode(method, graphdefs, states, prompt, plen, max_new_b, key, block_len, threshold, eos_id, cost_table=None, *,
            k, params, max_new, capacity, trace=False, variable_block=False, stream=False, policy="fixed",
            router_stop="threshold"):
  models = {name: nnx.merge(g, s) for (name, g), s in zip(graphdefs, states)}
  common = dict(params=params, eos_id=eos_id, max_new=max_new, capacity=capacity, stream=stream)
  if method == "ar":
    return autoregressive.decode_ar(models["primary"], prompt, plen, max_new_b, key, **common)
  if method == "llm_to_slm":
    return autoregressive.decode_llm_to_slm(models["llm_to_slm"], prompt, plen, max_new_b, key, **common)
  if method == "speed":
    primary, drafter = models["primary"], speculative.standalone_drafter(models["drafter"], capacity)
  else:
    tandem = models["tandem"]
    primary, drafter = tandem.primary, speculative.tandem_drafter(tandem, capacity)
  return speculative.decode_speculative(primary, drafter, prompt, plen, max_new_b, key, block_len,
                                        max_block_len=k, accept_all=(method == "tandem"),
                                        router=models.get("router"), threshold=threshold, trace=trace,
                                        variable_block=variable_block, policy=policy, cost_table=cost_table,
                                        router_stop=router_stop, **common)


_decode_jit = jax.jit(_decode, static_argnames=("method", "graphdefs", "k", "params", "max_new", "capacity",
                                                "trace", "variable_block", "stream", "policy",
                                                "router_stop"))


class _Programs(collections.OrderedDict):
  """Compiled decode programs by their static settings, the least recently used dropped past ``maxsize``.

  ``generate`` compiles ahead of the call (``lower().compile()``) to report compilation apart from the run, so it
  keeps the programs itself; every compiled program holds its code mapped in the process, hence the bound."""

  def __init__(self, maxsize: int):
    super().__init__()
    self.maxsize = maxsize

  def get_or_compile(self, key, compile_fn: Callable[[], Any]):
    if key in self:
      self.move_to_end(key)
      return self[key]
    self[key] = program = compile_fn()
    while len(self) > self.maxsize:
      self.popitem(last=False)
    return program


_compiled = _Programs(maxsize=64)


def mesh_key(mesh):
  """A mesh by value (axis names and sizes, device ids, axis types): equal meshes share compiled programs."""
  if mesh is None:
    return None
  return (tuple(mesh.axis_names), tuple(mesh.devices.shape), tuple(int(d.id) for d in mesh.devices.flat),
          tuple(str(t) for t in getattr(mesh, "axis_types", ()) or ()))


def _rules_key(rules):
  return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in rules)


def _models_for(method, primary, drafter, tandem, llm_to_slm, router):
  need = {"ar": ("primary",), "speed": ("primary", "drafter"), "tandem": ("tandem",),
          "tandem_speed": ("tandem",), "llm_to_slm": ("llm_to_slm",)}[method]
  given = dict(primary=primary, drafter=drafter, tandem=tandem, llm_to_slm=llm_to_slm)
  missing = [n for n in need if given[n] is None]
  if missing:
    raise ValueError(f"method {method!r} needs the model(s) {missing}")
  models = {n: given[n] for n in need}
  if router is not None:
    if method not in ("speed", "tandem_speed"):
      raise ValueError(f"the adaptive router applies to 'speed' and 'tandem_speed', not {method!r}")
    models["router"] = router
  return models


def lower(method: str, models: dict, *, batch_size: int, prompt_len: int, max_new_tokens: int, max_block_len: int,
          sampling: SamplingParams = SamplingParams(), mesh=None, rules=shd.DEFAULT_RULES):
  """Lowers the decode program of ``method`` for abstract inputs (no data, no devices needed).

  ``models`` maps role -> module, as :func:`generate` takes them ("primary", "drafter", "tandem", "llm_to_slm",
  "router"); modules may be abstract (``nnx.eval_shape``) with shardings on their ShapeDtypeStructs. Used by
  ``tandem_jax.aot`` to compile for a TPU topology from this CPU machine. Returns a ``jax.stages.Lowered``.
  """
  names = tuple(sorted(models))
  graphdefs, states = zip(*(nnx.split(models[n]) for n in names))
  p_pad, max_new, capacity = buffer_sizes(prompt_len, max_new_tokens, max_block_len)
  batch = None if mesh is None else batch_sharding(mesh, rules)
  i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch if shape else None)  # noqa: E731
  args = (tuple(states), i32((batch_size, p_pad)), i32((batch_size,)), i32((batch_size,)),
          jax.eval_shape(lambda: jax.random.key(0)), i32(()), jax.ShapeDtypeStruct((), jnp.float32), i32(()))
  fn = lambda: _decode_jit.lower(method, tuple(zip(names, graphdefs)), *args, k=max_block_len,  # noqa: E731
                                 params=sampling, max_new=max_new, capacity=capacity)
  if mesh is None:
    return fn()
  with jax.set_mesh(mesh), shd.use_rules(rules):
    return fn()


def _check_router(router, drafter, sampling: SamplingParams) -> None:
  """A router reads the drafter's top-k output embeddings: refuse one trained for another drafter's width; and its
  sampled head predicts rejections of one sampling setting's warped distributions: refuse it for another."""
  width, size = drafter.cfg.d_model, drafter.cfg.output_size
  want = 1 + router.top_k + router.top_k * width
  if router.hidden.in_features != want:
    have = (router.hidden.in_features - 1 - router.top_k) // router.top_k
    raise ValueError(f"the router reads drafter embeddings of width {have}, this drafter's are {width}: a router "
                     "works with the drafter it was trained on (its tandem's secondary)")
  if router.top_k > size:
    raise ValueError(f"the router reads the top {router.top_k} drafts but the drafter has {size} outputs")
  trained = getattr(router, "sampling", None)
  trained = None if trained is None else SamplingParams(*trained)
  if not sampling.greedy and trained is not None and trained != sampling:
    raise ValueError(f"the router's sampled head was trained on distributions warped by {trained}, this call "
                     f"samples with {sampling}: acceptance would differ from what it predicts. Train a router for "
                     f"this setting (config.router.sampling), or decode without the router")


def _main_and_drafter(models):
  """(primary, drafter or secondary or None): the two transformers a method runs."""
  for composite in ("tandem", "llm_to_slm"):
    if composite in models:
      return models[composite].primary, models[composite].secondary
  return models["primary"], models.get("drafter")


CALIBRATION_TOKENS = 64  # new tokens per row of each timed calibration run


def calibrate_loop(method: str, models: dict, *, batch_size: int, prompt_len: int, max_new_tokens: int,
                   max_block_len: int, sampling: SamplingParams = SamplingParams(), mesh=None,
                   rules=shd.DEFAULT_RULES, repeats: int = 3, settle: bool = True) -> costs_lib.CostTable:
  """The ``auto`` policy's cost table measured on the decode program itself: the program :func:`generate` runs for
  these shapes is timed with γ forced to each of 0..K on a synthetic prompt batch (the prefill, timed apart, taken
  off), so every iteration's cost includes the loop's own work, which isolated calls (:func:`costs.call_ms`) miss
  and which grows with the batch; the plain ``ar`` program of the same shapes (what ``generate`` switches to where
  speculation does not pay) is timed too, its step and prefill. Measured once per process per live models, method,
  shapes, sampling and mesh: ``repeats`` interleaved rounds (each times the prefill, the plain program and every γ
  once, so a slow stretch of the machine hits every entry alike; the fastest round per entry is kept) of
  CALIBRATION_TOKENS new tokens (per-row budgets are traced, so they run the very program sized for the real
  budget); runs that built their program are not timed. ``settle``: the iterations are made consistent with what
  they do (:func:`costs.settle_iterations`: γ = 0 at least a plain step, non-decreasing in γ); False keeps the raw
  times. ``models``: role -> module, as :func:`generate` takes them."""
  main_model, draft_model = _main_and_drafter(models)
  p_pad, m_pad, capacity = buffer_sizes(prompt_len, max_new_tokens, max_block_len)
  key = ("loop", method, tuple((n, id(m)) for n, m in sorted(models.items())), batch_size, p_pad, m_pad,
         max_block_len, sampling, mesh_key(mesh), _rules_key(rules) if mesh is not None else None, repeats, settle)

  def make():
    vocab = main_model.cfg.vocab_size
    prompts = [[(7919 * i) % (vocab - 1) + 1 for i in range(p_pad)]] * batch_size  # p_pad tokens: the same program
    budget = min(m_pad, CALIBRATION_TOKENS)  # per-row budgets are traced: a short run of the same program
    kw = dict(sampling=sampling, mesh=mesh, rules=rules, buffer_new_tokens=m_pad)
    plain_kw = dict(kw, block_len=max_block_len)  # the plain program generate switches to: same capacity

    def timed(**run_kw):
      r = generate(**run_kw)
      return generate(**run_kw) if r.first_run else r  # a call that built the program: its time holds the build

    runs = {"prefill": [], "plain": [], **{g: [] for g in range(max_block_len + 1)}}
    for _ in range(max(repeats, 1)):
      runs["prefill"].append(timed(method="ar", prompts=prompts, primary=main_model, max_new_tokens=1,
                                   **plain_kw).wall_time)
      runs["plain"].append(timed(method="ar", prompts=prompts, primary=main_model, max_new_tokens=budget,
                                 **plain_kw).wall_time)
      for g in range(max_block_len + 1):
        r = timed(method=method, prompts=prompts, **models, max_new_tokens=budget, block_len=max_block_len,
                  policy="auto", costs=costs_lib.forcing_table(g, max_block_len), **kw)
        runs[g].append((r.wall_time, int(r.stats["gamma_hist"].sum(1).max())))
    prefill = min(runs["prefill"])
    plain_ms = max(min(w - prefill for w in runs["plain"]) / max(budget - 1, 1) * 1e3, 1e-3)
    iteration_ms = [min((w - prefill) / max(n, 1) * 1e3 for w, n in runs[g]) for g in range(max_block_len + 1)]
    if settle:
      iteration_ms = costs_lib.settle_iterations(iteration_ms, plain_ms)
    draft_ms = costs_lib.call_ms(draft_model, batch_size, 1, capacity=capacity, fill=capacity // 2, calls=8,
                                 repeats=repeats)["median"]
    return costs_lib.loop_table(iteration_ms, draft_ms, plain_ms, prefill * 1e3)

  return costs_lib.cached(tuple(models.values()), key, make)


def generate(method: str, prompts: Sequence[Sequence[int]], *, primary=None, drafter=None, tandem=None,
             llm_to_slm=None, router=None, max_new_tokens: int | Sequence[int] = 32, block_len: int = 4,
             max_block_len: int | None = None, sampling: SamplingParams = SamplingParams(),
             eos_id: int | None = None, seed: int = 0, threshold: float | str = 0.8, mesh=None,
             rules=shd.DEFAULT_RULES, trace: bool = False,
             on_tokens: Callable[[list[list[int]]], None] | None = None, policy: str = "fixed",
             costs: costs_lib.CostTable | None = None, buffer_new_tokens: int = 0) -> DecodeResult:
  """Generates continuations of token-id prompts with one of METHODS.

  ``block_len`` (γ) is traced. With ``max_block_len`` K > γ (or a router) the program is compiled for every
  verify size up to K + 1 and any γ <= K reuses it, each block verifying only its drafts + 1; with K = γ (the
  default) the program has one verify size, K + 1. With ``router`` (K = its cap) the block ends early when the
  predicted acceptance falls below ``threshold`` (τ); ``threshold="cost"``: where one more draft no longer raises
  the block's expected tokens per ms (router predictions, calibrated costs); ``threshold="gate"``: each draft is
  sent only where it pays at its own predicted acceptance (:func:`speculative.decode_speculative`).
  ``trace`` (speculative methods) adds ``stats["trace"]``: per block the drafts, accepted count and primary token.
  ``policy`` (``speed``, ``tandem_speed``): "fixed" drafts ``block_len`` per block; "auto" chooses γ in
  0..block_len every iteration from running acceptance estimates and ``costs`` (a
  :class:`~tandem_jax.decoding.costs.CostTable` for K = max_block_len; when not given, measured on this decode
  program once per process by :func:`calibrate_loop`); ``stats["gamma_hist"]`` counts the choices.
  ``buffer_new_tokens``: size the program for this many new tokens per row (at least the largest budget; 0: that
  budget), so that calls with different budgets share one compiled program.
  ``on_tokens`` streams: it is called on the host during the run, after the prefill and after loop iterations, with
  each row's newly emitted tokens (a list per row, possibly empty; calls with nothing new are skipped); per row the
  concatenation of what it received is ``result.tokens[row]``. Every on_tokens shares one compiled streaming program;
  streaming calls run one at a time in a process, and an exception raised by on_tokens is re-raised after the run.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  models = _models_for(method, primary, drafter, tandem, llm_to_slm, router)
  main_model, draft_model = _main_and_drafter(models)
  main_cfg, draft_cfg = main_model.cfg, (draft_model.cfg if draft_model is not None else None)
  if draft_cfg is not None and draft_cfg.vocab_size != main_cfg.vocab_size:
    raise ValueError(f"primary vocab_size {main_cfg.vocab_size} != drafter/secondary vocab_size "
                     f"{draft_cfg.vocab_size}: speculative decoding needs one vocabulary")
  if not isinstance(block_len, (int, np.integer)) or block_len < 1:
    raise ValueError(f"block_len (γ) must be an integer >= 1, got {block_len!r}")
  k = int(max_block_len or block_len)
  if block_len > k:
    raise ValueError(f"block_len {block_len} exceeds max_block_len {k}")
  router_stop = threshold if isinstance(threshold, str) and threshold in ("cost", "gate") else "threshold"
  if router_stop != "threshold":
    if router is None:
      what = "cost-aware stop" if router_stop == "cost" else "cost-aware gate"
      raise ValueError(f"threshold={router_stop!r} is the router's {what}: it needs a router")
    threshold = 0.0
  elif isinstance(threshold, str) or not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], 'cost' or 'gate', got {threshold!r}")
  if policy not in ("fixed", "auto"):
    raise ValueError(f"policy must be 'fixed' or 'auto', got {policy!r}")
  if policy == "auto" and method not in ("speed", "tandem_speed"):
    raise ValueError(f"policy 'auto' applies to 'speed' and 'tandem_speed', not {method!r}")
  if router is not None:
    _check_router(router, draft_model, sampling)
  if not prompts:
    raise ValueError("no prompts given")
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise ValueError(f"prompt {lens.index(0)} is empty: every prompt needs at least one token (e.g. BOS)")
  flat = np.concatenate([np.asarray(p, np.int64) for p in prompts])
  if flat.min() < 0 or flat.max() >= main_cfg.vocab_size:
    raise ValueError(f"token ids must be in [0, {main_cfg.vocab_size}), got min {flat.min()} max {flat.max()}")
  b = len(prompts)
  max_new_list = [int(max_new_tokens)] * b if np.isscalar(max_new_tokens) else [int(m) for m in max_new_tokens]
  if len(max_new_list) != b or min(max_new_list) < 1:
    raise ValueError(f"max_new_tokens must be >= 1 (one value, or one per prompt), got {max_new_tokens!r}")
  if buffer_new_tokens and buffer_new_tokens < max(max_new_list):
    raise ValueError(f"buffer_new_tokens {buffer_new_tokens} is below the largest budget {max(max_new_list)}")
  # the per-row budgets are traced: the program is sized for the buffer
  p_pad, max_new, capacity = buffer_sizes(max(lens), max(max(max_new_list), buffer_new_tokens), k)
  limits = [main_cfg.max_seq_len] + ([draft_cfg.max_seq_len] if draft_cfg is not None else [])
  if capacity > min(limits):
    raise ValueError(f"prompt length {max(lens)} + max_new_tokens {max(max_new_list)} (+ block slack {k + 2}, "
                     f"padded to "
                     f"{capacity}) exceeds the models' max_seq_len {min(limits)}")

  prompt = np.zeros((b, p_pad), np.int32)
  for i, p in enumerate(prompts):
    prompt[i, :len(p)] = p
  if policy == "auto" or router_stop != "threshold":
    if costs is None:
      costs = calibrate_loop(method, {n: m for n, m in models.items() if n != "router"}, batch_size=b,
                             prompt_len=max(lens), max_new_tokens=max(max(max_new_list), buffer_new_tokens),
                             max_block_len=k, sampling=sampling, mesh=mesh, rules=rules)
    if costs.max_block_len != k:
      raise ValueError(f"the cost table covers blocks up to {costs.max_block_len} drafts, the program {k}: "
                       "calibrate it for this max_block_len")
  else:
    costs = None
  outcome = None
  if policy == "auto" and costs.has_plain and not trace:
    key = ("outcome", method, tuple((n, id(m)) for n, m in sorted(models.items())), b, p_pad, max_new, k, sampling,
           mesh_key(mesh), _rules_key(rules) if mesh is not None else None)
    # the family: every key of these models and this sampling, whatever the shapes; a key with no speculative call
    # yet decides at the acceptance its family met. A router is one of the models: the drafts it lets through are
    # accepted more often than a fixed block's (its gate sends none where it expects a rejection), so its keys pool
    # only among themselves (pooled with the router's batch-1 calls, the real-model benchmark's batch 8 read the
    # gate's acceptance, speculated and lost: 6 probes, 0.956x of ar)
    family = ("family", method, tuple((n, id(m)) for n, m in sorted(models.items())), sampling)
    outcome = costs_lib.outcome(tuple(models.values()), key, rows=b, family=family)
    on, note = costs_lib.speculate(costs, outcome, probe_first="router" in models)
    outcome.calls += 1
    costs = outcome.prior(costs)
    if not on:  # the plain program of calibrate_loop's shapes: the one whose step the table holds
      plain = generate("ar", prompts, primary=main_model, max_new_tokens=max_new_list, block_len=k,
                       sampling=sampling, eos_id=eos_id, seed=seed, mesh=mesh, rules=rules, on_tokens=on_tokens,
                       buffer_new_tokens=max_new)
      if not plain.first_run:
        outcome.record_plain(costs, [len(t) for t in plain.tokens], plain.wall_time * 1e3)
      return _plain_as_speculative(plain, k, costs, note)
  names = tuple(sorted(models))
  graphdefs, states = zip(*(nnx.split(models[n]) for n in names))
  if on_tokens is not None and mesh is None:
    devices = {d for x in jax.tree.leaves(states) if hasattr(x, "sharding") for d in x.sharding.device_set}
    if len(devices) > 1:
      raise ValueError(f"on_tokens with models on {len(devices)} devices needs their mesh (mesh=...): without one "
                       f"the streaming callbacks are ordered, which JAX supports on one device only")
  args = (tuple(states), jnp.asarray(prompt), jnp.asarray(lens, jnp.int32), jnp.asarray(max_new_list, jnp.int32),
          jax.random.key(seed), jnp.int32(block_len), jnp.float32(threshold),
          jnp.int32(-1 if eos_id is None else eos_id), costs)
  speculative_method = method in ("speed", "tandem", "tandem_speed")
  # k shapes only the buffers (capacity, above) of the autoregressive programs: one program whatever block_len, so
  # auto's plain fallback runs the very executable a plain ``ar`` call of the same capacity does
  statics = dict(method=method, graphdefs=tuple(zip(names, graphdefs)), k=k if speculative_method else 0,
                 params=sampling, max_new=max_new, capacity=capacity, trace=bool(trace) and speculative_method,
                 # auto varies the verify size anyway: one program (and key) whatever block_len is
                 variable_block=(k > block_len or policy == "auto") and speculative_method,
                 stream=on_tokens is not None, policy=policy, router_stop=router_stop)
  if mesh is not None:
    batch = batch_sharding(mesh, rules)
    args = args[:1] + tuple(jax.device_put(a, batch) for a in args[1:4]) + args[4:]

  def run():
    key = (statics["method"], statics["graphdefs"], statics["k"], sampling, max_new, capacity, statics["trace"],
           statics["variable_block"], b, p_pad, mesh_key(mesh), _rules_key(rules) if mesh is not None else None,
           statics["stream"], policy, router_stop)  # tests read [-3]: stream
    fresh = key not in _compiled
    t0 = time.perf_counter()
    program = _compiled.get_or_compile(key, lambda: _decode_jit.lower(
        statics["method"], statics["graphdefs"], *args,
        **{n: statics[n] for n in ("k", "params", "max_new", "capacity", "trace", "variable_block", "stream",
                                   "policy", "router_stop")}).compile())
    compile_time = time.perf_counter() - t0
    if on_tokens is None:
      t1 = time.perf_counter()
      em, stats = jax.block_until_ready(program(*args))
      return em, stats, time.perf_counter() - t1, compile_time, fresh
    with output.streaming(on_tokens, b) as stream:
      t1 = time.perf_counter()
      em, stats = jax.block_until_ready(program(*args))
      jax.effects_barrier()  # every callback of the run has reached the host
      wall = time.perf_counter() - t1
      stream(em.tokens, em.count)  # whatever the callbacks did not deliver (nothing, normally)
    if stream.error is not None:
      raise stream.error
    return em, stats, wall, compile_time, fresh

  if mesh is not None:
    with jax.set_mesh(mesh), shd.use_rules(rules):
      em, stats, wall, compile_time, fresh = run()
  else:
    em, stats, wall, compile_time, fresh = run()
  tokens_np, count = np.asarray(em.tokens), np.asarray(em.count)
  result = DecodeResult(tokens=[tokens_np[i, :count[i]].tolist() for i in range(b)],
                        stats={n: np.asarray(v) for n, v in stats.items()}, wall_time=wall,
                        compile_time=compile_time, costs=costs, policy_note=note if outcome is not None else "",
                        first_run=fresh)
  # a program's first run carries one-time costs (the real-model benchmark's router inside auto at batch 1, on CPU:
  # 1.61 s, the next five calls 0.83-1.19 s; benchmarks/auto_trace.py --router): a call that built its program is
  # not recorded, or one slow first run switches speculation off for good (that program is built by its first call,
  # not by the calibration, which runs without the router)
  if outcome is not None and not fresh:
    outcome.record(costs, [len(t) for t in result.tokens], wall * 1e3, int(result.stats["accepted"].sum()),
                   int(result.stats["rejections"].sum()))
  return result


def _plain_as_speculative(plain: DecodeResult, k: int, costs, note: str) -> DecodeResult:
  """An ``ar`` result in a speculative call's terms: every iteration a γ = 0 block emitting one token."""
  s = plain.stats
  steps = s["primary_calls"] - 1  # the prefill made the first token
  zeros = np.zeros_like(steps)
  block_hist = np.zeros((len(steps), k + 2), steps.dtype)
  block_hist[:, 1] = steps
  gamma_hist = np.zeros((len(steps), k + 1), steps.dtype)
  gamma_hist[:, 0] = steps
  stats = dict(primary_calls=s["primary_calls"], secondary_calls=zeros, drafted=zeros, accepted=zeros,
               block_hist=block_hist, gamma_hist=gamma_hist, drafter_steps=zeros, rejections=zeros)
  return dataclasses.replace(plain, stats=stats, costs=costs, policy_note=note, ran_plain=True)
