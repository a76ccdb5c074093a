"""Where decode time goes: per model call standalone against in-loop, and each loop iteration by part.

  python -m tandem_jax.bench.profile --workdir=/work/bench_run/cpu [--gamma=5 --batch=1 --temperature=0]

Reuses the benchmark's checkpoints. Three measurements, compilation always excluded:
1. standalone: ms per cached ``extend`` call of each model in a compiled loop of nothing else
   (:func:`tandem_jax.bench.timing.call_ms`, the benchmark's cost table);
2. in-loop: ms per iteration of each decode method's ``lax.while_loop`` (wall / iterations), methods interleaved,
   medians over repeats;
3. breakdown: one traced run per method (``jax.profiler``), the CPU runtime's per-op ("thunk") self times summed by
   the ``jax.named_scope`` the decoding loops put around their parts (draft, verify, accept, commit, append, ...);
   what no op accounts for is the runtime's own per-op dispatch ("gaps").
It also counts the copies of KV-cache-sized buffers in each compiled program (XLA copies that updates in place
would avoid).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile

import jax
from absl import flags

from tandem_jax.bench import quality, timing
from tandem_jax.decoding import SamplingParams, api, generate

_F: dict = {}


def define_flags():
  """The CLI's flags, defined only when run as a script: importing this module (tests, other CLIs in one process)
  must not add or override global absl flags such as --json or --repeats."""
  _F.update(
      workdir=flags.DEFINE_string("workdir", None, "benchmark workdir with trained checkpoints"),
      gamma=flags.DEFINE_integer("gamma", 5, "block length γ of speed / tandem_speed"),
      max_block_len=flags.DEFINE_integer("max_block_len", 0, "K the programs are compiled for (0 = γ); with K > γ "
                                         "one program serves every γ <= K (a switch over verify sizes), as in the "
                                         "benchmark's γ sweep"),
      batch=flags.DEFINE_integer("batch", 1, "rows decoded together"),
      temperature=flags.DEFINE_float("temperature", 0.0, "sampling temperature (0 = greedy)"),
      max_new_tokens=flags.DEFINE_integer("max_new_tokens", 64, "tokens per prompt"),
      prompt_len=flags.DEFINE_integer("prompt_len", 32, "prompt tokens"),
      repeats=flags.DEFINE_integer("repeats", 7, "timed rounds (interleaved)"),
      json=flags.DEFINE_string("json", "", "also write the results here"))
  flags.mark_flag_as_required("workdir")


# Scopes put by tandem_jax.decoding around the parts of a loop iteration, innermost first.
SCOPES = ("draft_sample", "draft", "verify", "accept", "commit", "append", "step", "sample")
_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r"metadata=\{op_name=\"([^\"]*)\"")


def scope_of(op_name: str) -> str:
  parts = op_name.split("/")
  for s in SCOPES:
    if s in parts:
      return s
  return "loop_other" if "while" in parts else "outside_loop"


def op_scopes(hlo_text: str) -> dict[str, str]:
  """Scope per HLO instruction of the compiled program's text.

  A fusion holding a matrix multiply takes the multiply's scope (XLA fuses e.g. the verify call's output layer
  with the acceptance's softmax, and labels the fusion by its root). Instructions without metadata (XLA drops it
  from some) take the scope of the closest instruction before them in the same scheduled computation.
  """
  dot_scope, comp = {}, None
  for line in hlo_text.splitlines():
    if line.endswith("{") and " = " not in line:
      comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else None
    elif comp and comp not in dot_scope and re.search(r" (?:dot|convolution)\(", line):
      op = _OP_NAME.search(line)
      if op:
        dot_scope[comp] = scope_of(op.group(1))
  out, last = {}, "unattributed"
  for line in hlo_text.splitlines():
    if line.endswith("{") and " = " not in line:  # a computation's header: reset
      last = "unattributed"
      continue
    m = _NAME.match(line)
    if not m:
      continue
    op = _OP_NAME.search(line)
    if op:
      last = scope_of(op.group(1))
    called = _CALLS.search(line)
    out[m.group(1)] = dot_scope.get(called.group(1), last) if called else last
  return out


def cache_copies(hlo_text: str, cache_shapes: set[str]) -> int:
  """Copies (``copy`` / ``copy-start``) whose shape is a KV-cache buffer's, in any layout or transposition."""
  n = 0
  for line in hlo_text.splitlines():
    m = re.search(r"= (\w+)\[([\d,]+)\]\{[\d,]*\} (?:copy|copy-start)\(", line)
    if m and tuple(sorted(int(x) for x in m.group(2).split(","))) in cache_shapes:
      n += 1
  return n


def thunk_self_times(trace_dir: str) -> tuple[dict[str, float], int, float]:
  """Self time (µs) per op name over one traced run, the number of op executions and the executor's span."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  by_tid = collections.defaultdict(list)
  span = 0.0
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith("$"):
      continue
    if e["name"].startswith("ThunkExecutor::Execute (wait"):
      span += e.get("dur", 0)
    by_tid[e["tid"]].append(e)
  self_us, count = collections.Counter(), 0
  for evs in by_tid.values():
    evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack = []  # (end, name)
    for e in evs:
      while stack and stack[-1][0] <= e["ts"]:
        stack.pop()
      dur = e.get("dur", 0)
      if stack:
        self_us[stack[-1][1]] -= dur
      self_us[e["name"]] += dur
      stack.append((e["ts"] + dur, e["name"]))
      if not e["name"].startswith(("ThunkExecutor", "CommonPjRt", "PjitFunction")):
        count += 1
  return dict(self_us), count, span


def main(argv):
  del argv
  f = {name: holder.value for name, holder in _F.items()}
  gamma, batch, temperature = f["gamma"], f["batch"], f["temperature"]
  k = f["max_block_len"] or gamma
  loaded = quality.load_models(f["workdir"])
  primary, drafter = loaded["primary"].model, loaded["secondary_distil"].model
  tandem = loaded["tandem_distil"].model
  prompts = timing.draw_prompts(quality.validation_rows(loaded), batch, f["prompt_len"])
  sampling = SamplingParams(temperature=temperature)
  kw = dict(max_new_tokens=f["max_new_tokens"], sampling=sampling, eos_id=None)
  methods = {"ar": dict(primary=primary),
             f"speed@{gamma}": dict(primary=primary, drafter=drafter, block_len=gamma, max_block_len=k),
             f"tandem_speed@{gamma}": dict(tandem=tandem, block_len=gamma, max_block_len=k)}

  def run(name):
    return generate(name.split("@")[0], prompts, **methods[name], **kw)

  # 1. standalone per-call costs at the decode's mean cache fill.
  capacity = api.buffer_sizes(f["prompt_len"], f["max_new_tokens"], k)[2]
  fill = f["prompt_len"] + f["max_new_tokens"] // 2
  cost = lambda m, k: timing.call_ms(m, batch, k, capacity=capacity, fill=fill, calls=64,  # noqa: E731
                                     repeats=5)["median"]
  standalone = {"primary k=1": cost(primary, 1), f"primary k={k + 1} (verify)": cost(primary, k + 1),
                "drafter k=1": cost(drafter, 1), "drafter k=2": cost(drafter, 2),
                "tandem secondary k=1": cost(tandem.secondary, 1)}

  # 2. in-loop ms per iteration, interleaved.
  def cell(name):
    def timed(warmup: bool = False):
      r = run(name)
      return {"wall": r.wall_time, "result": r}
    return timed

  res = timing.interleaved({n: cell(n) for n in methods}, f["repeats"])
  times = {n: c["times"] for n, c in res.items()}
  iters = {n: int(c["run"]["result"].stats["primary_calls"].max()) - 1 for n, c in res.items()}
  per_iter = {n: statistics.median(t) * 1e3 / iters[n] for n, t in times.items()}
  tokens = sum(len(t) for t in res["ar"]["run"]["result"].tokens)

  # 3. per-scope breakdown of one traced run each; cache copies in the compiled programs.
  breakdown, copies, gaps = {}, {}, {}
  cache_shapes = set()
  for m in (primary, drafter, tandem.secondary):
    c = m.cfg
    cache_shapes.add(tuple(sorted((batch, capacity, c.num_kv_heads, c.head_dim))))
  for n in methods:
    compiled = [v for k, v in api._compiled.items() if k[0] == n.split("@")[0]][-1]
    text = compiled.as_text()
    scopes = op_scopes(text)
    copies[n] = cache_copies(text, cache_shapes)
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d, create_perfetto_trace=True)
      wall = run(n).wall_time
      jax.profiler.stop_trace()
      self_us, count, _ = thunk_self_times(d)
    parts = collections.Counter()
    for name, us in self_us.items():
      if name.startswith(("ThunkExecutor", "CommonPjRt", "PjitFunction")):
        continue
      parts[scopes.get(name, "unattributed")] += us
    total_ops = sum(parts.values())
    parts["gaps (dispatch)"] = wall * 1e6 - total_ops
    breakdown[n] = {k: v / 1e3 / iters[n] for k, v in parts.items()}
    gaps[n] = dict(ops_per_iter=count / iters[n], traced_wall_ms=wall * 1e3)

  print(f"\nload {os.getloadavg()}; batch {batch}, γ {gamma}, K {k}, T {temperature}, {tokens} tokens per run")
  print("\n| model call (standalone, ms) | ms |\n|---|---|")
  for name, ms in standalone.items():
    print(f"| {name} | {ms:.3f} |")
  print("\n| method | iterations | ms/iter in loop | tokens/iter | ms/token | KV-cache copies in program |"
        "\n|---|---|---|---|---|---|")
  for n in methods:
    print(f"| {n} | {iters[n]} | {per_iter[n]:.3f} | {tokens / (iters[n] + 1) / batch:.2f} | "
          f"{statistics.median(times[n]) * 1e3 / tokens * batch:.3f} | {copies[n]} |")
  cols = [c for c in SCOPES + ("loop_other", "outside_loop", "unattributed", "gaps (dispatch)")
          if any(c in b for b in breakdown.values())]
  print("\nper iteration, ms (traced run; self time of the CPU runtime's ops by scope)\n")
  print("| method | " + " | ".join(cols) + " | ops/iter |\n|---" * 1 + "|---" * (len(cols) + 1) + "|")
  for n, b in breakdown.items():
    print(f"| {n} | " + " | ".join(f"{b.get(c, 0.0):.3f}" for c in cols) + f" | {gaps[n]['ops_per_iter']:.0f} |")
  out = dict(standalone=standalone, per_iter_ms=per_iter, iterations=iters, times=dict(times), copies=copies,
             breakdown_ms=breakdown, ops=gaps, load=os.getloadavg(), batch=batch, gamma=gamma, max_block_len=k)
  if f["json"]:
    with open(f["json"], "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  from tandem_jax import cli
  define_flags()
  cli.run(main, "profile", reads_workdir=True)
