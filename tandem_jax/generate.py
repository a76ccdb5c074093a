"""Text in, text out: ``python -m tandem_jax.generate --workdir=DIR --method=tandem_speed --prompt="..."``.

The workdir decides what is available: a tandem (or tandem_distil) workdir gives ``ar``, ``tandem``,
``tandem_speed`` and, with a drafter (``--drafter_workdir``, default the secondary the tandem was initialised from),
``speed``; a router workdir adds ``--adaptive``; an llm_to_slm workdir gives ``llm_to_slm``; a primary workdir
gives ``ar`` (and ``speed`` with ``--drafter_workdir``). The models are loaded for decoding as the workdir's
``config.serving`` says: weights cast once to its dtype and placed on its decode mesh (the TPU presets: bf16,
model-parallel inside a host); unset (the CPU presets), they decode as trained, on one device.

``--compare_ar`` also runs ``ar`` on the same prompts and prints the wall-clock speedup (compiled programs, medians
of interleaved repeats). ``--show_drafts`` prints the stream with accepted drafts (green), rejected drafts (red,
struck through) and the primary's own tokens (bold yellow on a rejection, blue as a bonus).

``--stream`` prints the tokens while the compiled loop runs, as each block is accepted (a host callback per loop
iteration; accepted drafts green, the primary's token blue on a terminal). ``--interactive`` reads prompts from stdin,
one per line until EOF, with the models loaded once and each program compiled once per padded prompt length (16-token
buckets); a tokenizer with a chat template (SmolLM2-Instruct) wraps each line as a user message
(``--nochat_template`` to turn it off). Flags that do not apply to the chosen method are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
from typing import Any

import numpy as np

from absl import flags

from tandem_jax import cli
from tandem_jax.decoding import METHODS, SamplingParams, generate

_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir (tandem, router, llm_to_slm or primary)", allow_override=True)
_METHOD = flags.DEFINE_enum("method", "tandem_speed", METHODS, "decoding method", allow_override=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for a batch)", allow_override=True)
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "a file with one prompt per line", allow_override=True)
_DRAFTER = flags.DEFINE_string("drafter_workdir", None, "workdir of the standalone drafter for --method=speed", allow_override=True)
_ROUTER = flags.DEFINE_string("router_workdir", None, "router workdir for --adaptive (default: --workdir if it is "
                              "one)", allow_override=True)
_BLOCK = flags.DEFINE_integer("block_len", 4, "γ: drafts per block (the cap γ_max with --adaptive)", allow_override=True)
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy", allow_override=True)
_TOPK = flags.DEFINE_integer("top_k", 0, "0 = off", allow_override=True)
_TOPP = flags.DEFINE_float("top_p", 1.0, "1 = off", allow_override=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt", allow_override=True)
_ADAPTIVE = flags.DEFINE_bool("adaptive", False, "end blocks early with the trained router", allow_override=True)
_THRESHOLD = flags.DEFINE_string("threshold", None, "the router's stop: τ in [0, 1], or 'cost': end a block where one "
                                 "more draft no longer pays at the decode program's calibrated costs, or 'gate': send "
                                 "each draft only where it pays at its own predicted acceptance (an unsent first "
                                 "draft: a plain step). Default: 'gate' with --policy=auto, the router config's τ "
                                 "with --policy=fixed", allow_override=True)
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed", allow_override=True)
_JSON = flags.DEFINE_bool("json", False, "print one JSON document", allow_override=True)
_SHOW = flags.DEFINE_bool("show_drafts", False, "print the draft stream (speculative methods)", allow_override=True)
_COMPARE = flags.DEFINE_bool("compare_ar", False, "also time `ar` and print the speedup", allow_override=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats per method with --compare_ar (median reported)", allow_override=True)
_POLICY = flags.DEFINE_enum("policy", "auto", ["auto", "fixed"], "block length of speed / tandem_speed: auto "
                            "chooses γ in 0..--block_len every iteration from the measured per-call costs and the "
                            "running acceptance (γ = 0: a plain primary step); fixed drafts --block_len",
                            allow_override=True)
_STREAM = flags.DEFINE_bool("stream", False, "print tokens as each block is accepted", allow_override=True)
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "read prompts from stdin (one per line, until EOF) with the "
                                 "models loaded and compiled once", allow_override=True)
_CHAT = flags.DEFINE_bool("chat_template", True, "--interactive: wrap each line in the tokenizer's chat template "
                          "(when it has one)", allow_override=True)

SPECULATIVE = ("speed", "tandem", "tandem_speed")
# flag -> the methods it applies to (a flag given for another method is refused)
APPLIES = {
    "block_len": lambda m: m in SPECULATIVE,
    "drafter_workdir": lambda m: m == "speed",
    "router_workdir": lambda m: m in ("speed", "tandem_speed"),
    "adaptive": lambda m: m in ("speed", "tandem_speed"),
    "threshold": lambda m: m in ("speed", "tandem_speed"),
    "show_drafts": lambda m: m in SPECULATIVE,
    "compare_ar": lambda m: m != "ar",
    "policy": lambda m: m in ("speed", "tandem_speed"),
}


@dataclasses.dataclass
class Generator:
  """Models and tokenizer loaded from workdirs, ready for :func:`tandem_jax.decoding.generate`."""
  models: dict[str, Any]
  tokenizer: Any
  threshold: float = 0.8
  gamma_max: int | None = None
  mesh: Any = None   # the decode mesh the models were placed on (config.serving.mesh_shape); None: one device
  rules: Any = None  # its logical axis rules

  def encode(self, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt`` after BOS; with ``chat`` (and a tokenizer that has a chat template) the prompt is
    one user message under that template (which brings its own start token)."""
    tok = self.tokenizer
    if chat and getattr(tok, "chat_template", None):
      text = tok.apply_chat_template([{"role": "user", "content": prompt}])
      ids = tok.encode(text)
      return ids if ids[:1] == [tok.bos_id] else [tok.bos_id] + ids
    return tok.encode(prompt, add_bos=True)

  def __call__(self, method: str, prompts: list[str], *, adaptive: bool = False, chat: bool = False, **kw):
    ids = [self.encode(p, chat) for p in prompts]
    models = self.models_for(method, adaptive)
    if adaptive:  # auto: the router's cost-aware gate (benchmarks/router_blocks.py); fixed: the router's τ
      kw.setdefault("threshold", "gate" if kw.get("policy") == "auto" else self.threshold)
    if self.mesh is not None:
      kw.update(mesh=self.mesh, rules=self.rules)
    return generate(method, ids, eos_id=self.tokenizer.eos_id, **models, **kw)

  def models_for(self, method: str, adaptive: bool = False) -> dict[str, Any]:
    m = self.models
    if method == "ar":
      out = dict(primary=m.get("primary"))
    elif method == "speed":
      out = dict(primary=m.get("primary"), drafter=m.get("drafter"))
    elif method in ("tandem", "tandem_speed"):
      out = dict(tandem=m.get("tandem"))
    else:
      out = dict(llm_to_slm=m.get("llm_to_slm"))
    missing = [k for k, v in out.items() if v is None]
    if missing:
      hint = " (pass --drafter_workdir)" if "drafter" in missing else ""
      raise ValueError(f"--method={method} needs {missing}, which the given workdirs do not provide{hint}; "
                       f"available: {sorted(m)}")
    if adaptive:
      if "router" not in m:
        raise ValueError("--adaptive needs a trained router: pass --router_workdir (a `router` stage workdir)")
      if method not in ("speed", "tandem_speed"):
        raise ValueError(f"--adaptive applies to speed and tandem_speed, not {method}")
      out["router"] = m["router"]
    return out


def load(workdir: str, drafter_workdir: str | None = None, router_workdir: str | None = None) -> Generator:
  """Loads the models for decoding: on the main workdir's decode mesh (``config.serving.mesh_shape``; one device
  when empty), each workdir's weights cast once to its ``config.serving.dtype`` (when set) as they are placed."""
  from tandem_jax import sharding
  from tandem_jax.workdir import decode_mesh, load_config, load_workdir
  config = load_config(workdir)
  mesh = decode_mesh(config)
  spread = mesh.devices.size > 1
  load_one = functools.partial(load_workdir, mesh=mesh, serving=True)
  main = load_one(workdir)
  models, threshold, gamma_max = {}, 0.8, None
  if main.stage in ("tandem", "tandem_distil"):
    models.update(tandem=main.model, primary=main.model.primary)
  elif main.stage == "router":
    models.update(tandem=main.model.tandem, primary=main.model.tandem.primary, router=main.model.router)
    threshold, gamma_max = main.config.router.threshold, main.config.router.gamma_max
  elif main.stage == "llm_to_slm":
    models.update(llm_to_slm=main.model, primary=main.model.primary)
  elif main.stage == "primary":
    models.update(primary=main.model)
  else:
    raise ValueError(f"workdir {workdir!r} holds a {main.stage!r} model; generate from a primary, tandem, "
                     f"tandem_distil, router or llm_to_slm workdir (use it as --drafter_workdir for speed)")
  drafter_workdir = drafter_workdir or (main.config.init.secondary_workdir if main.stage != "primary" else None)
  if drafter_workdir and os.path.isdir(os.path.expanduser(drafter_workdir)):
    d = load_one(drafter_workdir)
    if d.stage not in ("secondary", "secondary_distil", "primary"):
      raise ValueError(f"--drafter_workdir {drafter_workdir!r} holds a {d.stage!r} model, not a standalone LM")
    models["drafter"] = d.model
  if router_workdir:
    r = load_one(router_workdir)
    if r.stage != "router":
      raise ValueError(f"--router_workdir {router_workdir!r} holds a {r.stage!r} model, not a router")
    models["router"] = r.model.router
    threshold, gamma_max = r.config.router.threshold, r.config.router.gamma_max
  return Generator(models, main.tokenizer, threshold, gamma_max, mesh=mesh if spread else None,
                   rules=sharding.rules_of(config) if spread else None)


# -- presentation ------------------------------------------------------------------------------------------------
_GREEN, _RED, _YELLOW, _BLUE, _RESET = "\033[32m", "\033[31;9m", "\033[1;33m", "\033[34m", "\033[0m"


def draft_stream(trace_row, tokenizer, token_ids: list[int], colour: bool = True) -> tuple[str, list[dict]]:
  """Renders one row's trace ([iterations, K+3]: drafts, drafted, accepted, primary token).

  The first token comes from the primary's prefill; every later block shows its accepted drafts, its rejected
  drafts and the primary's token (a correction after a rejection, else the bonus)."""
  k = trace_row.shape[1] - 3
  max_tokens = len(token_ids)
  paint = (lambda c, s: f"{c}{s}{_RESET}") if colour else (lambda c, s: s)
  parts, events, emitted = [paint(_BLUE, tokenizer.decode(token_ids[:1]))], [], 1
  for it in trace_row:
    if it[k] < 0 or emitted >= max_tokens:
      break
    drafts, n_draft, n_acc, tok = it[:k].tolist(), int(it[k]), int(it[k + 1]), int(it[k + 2])
    accepted, rejected = drafts[:n_acc], drafts[n_acc:n_draft]
    events.append(dict(accepted=accepted, rejected=rejected, primary_token=tok,
                       primary_kind="bonus" if not rejected else "correction"))
    parts += [paint(_GREEN, tokenizer.decode([t])) for t in accepted]
    if not colour and rejected:
      parts.append("[-" + tokenizer.decode(rejected) + "-]")
    else:
      parts += [paint(_RED, tokenizer.decode([t])) for t in rejected]
    parts.append(paint(_BLUE if not rejected else _YELLOW, tokenizer.decode([tok])))
    emitted += n_acc + 1
  return "".join(parts), events


class StreamPrinter:
  """``on_tokens`` for :func:`generate`: prints each row's new text as blocks are accepted.

  One row: the text continues on one line (on a terminal, accepted drafts green and the primary's token blue).
  Several rows: a line ``[i] +text`` per row that advanced."""

  def __init__(self, tokenizer, num_rows: int, speculative: bool, colour: bool, write=None):
    self.tok, self.speculative, self.colour = tokenizer, speculative, colour
    self.tokens: list[list[int]] = [[] for _ in range(num_rows)]
    self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))

  def _delta(self, row: int, new: list[int]) -> tuple[str, str]:
    """(text of the accepted drafts, text of the primary's token) added by ``new``."""
    old = self.tok.decode(self.tokens[row])
    split = len(new) - 1  # the last token of a block is the primary's (also the prefill's single token)
    mid = self.tok.decode(self.tokens[row] + new[:split])
    self.tokens[row] += new
    return mid[len(old):], self.tok.decode(self.tokens[row])[len(mid):]

  def __call__(self, new_per_row: list[list[int]]) -> None:
    for row, new in enumerate(new_per_row):
      if not new:
        continue
      drafts, own = self._delta(row, list(new))
      if self.colour and self.speculative:
        text = (f"{_GREEN}{drafts}{_RESET}" if drafts else "") + (f"{_BLUE}{own}{_RESET}" if own else "")
      else:
        text = drafts + own
      self.write(text if len(self.tokens) == 1 else f"[{row}] +{text!r}\n")


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value) as fh:
      prompts += [line.rstrip("\n") for line in fh if line.strip()]
  if not prompts:
    raise cli.UserError("give at least one --prompt or a --prompts_file (or --interactive)")
  for i, p in enumerate(prompts):
    if not p.strip():
      print(f"note: prompt {i} is empty: generating from BOS alone", file=sys.stderr)
  return prompts


def threshold_value() -> float | str:
  """--threshold as generate takes it: a τ in [0, 1], "cost" or "gate"."""
  v = _THRESHOLD.value.strip()
  if v in ("cost", "gate"):
    return v
  try:
    tau = float(v)
  except ValueError:
    tau = -1.0
  if not 0.0 <= tau <= 1.0:
    raise cli.UserError(f"--threshold must be a number in [0, 1], 'cost' or 'gate', got {_THRESHOLD.value!r}")
  return tau


def check_flags(method: str) -> None:
  """Refuses flag combinations that would be silently ignored (before any model is loaded)."""
  cli.refuse_unused(method, APPLIES)
  f = flags.FLAGS
  if f["threshold"].present and not _ADAPTIVE.value:
    raise cli.UserError("--threshold applies only with --adaptive")
  if _THRESHOLD.value is not None:
    threshold_value()
  if f["repeats"].present and not _COMPARE.value:
    raise cli.UserError("--repeats applies only with --compare_ar")
  if _TEMP.value == 0 and (f["top_k"].present or f["top_p"].present):
    raise cli.UserError("--top_k/--top_p apply only when sampling (--temperature > 0)")
  if _STREAM.value and _JSON.value:
    raise cli.UserError("--stream and --json exclude each other (--json prints one document at the end)")
  if f["chat_template"].present and not _INTERACTIVE.value:
    raise cli.UserError("--chat_template applies only with --interactive")
  if _INTERACTIVE.value and (_PROMPT.value or _PROMPTS_FILE.value or _JSON.value):
    raise cli.UserError("--interactive reads the prompts from stdin: drop --prompt/--prompts_file/--json")


def _stats_line(method: str, adaptive: bool, s: dict) -> str:
  line = f"[{method}{' +adaptive' if adaptive else ''}] {s['tokens']} tokens, {s['tokens_per_second']:.1f} tokens/s"
  if method in SPECULATIVE:
    line += (f", {s['primary_calls']} primary calls ({s['tokens_per_primary_call']:.2f} tokens/call), acceptance "
             f"{s['acceptance_rate']:.3f}")
  return line


def policy_lines(result) -> list[str]:
  """The block lengths chosen per iteration (a histogram) and, where speculation was switched off, why."""
  if "gamma_hist" not in result.stats:
    return []
  hist = result.stats["gamma_hist"].sum(0)
  lines = ["block length γ per iteration: " + ", ".join(f"{g}: {int(n)}" for g, n in enumerate(hist) if n)]
  if result.policy_note:  # the whole call ran the plain program (or probed speculation)
    lines.append(result.policy_note)
  elif hist[0] and result.costs is not None:
    t = result.costs
    v = np.asarray(t.verify_ms)
    lines.append(f"speculation off (γ = 0) in {int(hist[0])} of {int(hist.sum())} iterations: the running acceptance "
                 f"estimate was below what a block needs to beat a plain primary step at the measured costs (primary "
                 f"call {v[1]:.2f} ms for 1 token, {v[2]:.2f} ms for 2; drafter step {float(t.draft_ms):.2f} ms: "
                 f"drafting pays from α {t.break_even_alpha():.2f})")
  return lines


def interactive(gen: Generator, method: str, kw: dict, lines=None) -> int:
  """Reads prompts (one per line) until EOF; prints each reply (streamed with --stream) and its stats.

  With --compare_ar each reply is also decoded by ``ar`` (timed the same way) and the speedup printed. Returns the
  number of replies."""
  lines = sys.stdin if lines is None else lines
  chat = _CHAT.value and bool(getattr(gen.tokenizer, "chat_template", None))
  spec = method in SPECULATIVE
  colour = sys.stdout.isatty()
  print(f"{method}: one prompt per line, EOF (Ctrl-D) ends{'; chat template on' if chat else ''}", flush=True)
  n = 0
  for line in lines:
    prompt = line.rstrip("\n")
    if not prompt.strip():
      continue
    extra = {}
    if _STREAM.value:
      extra["on_tokens"] = StreamPrinter(gen.tokenizer, 1, spec, colour)
    result = gen(method, [prompt], adaptive=_ADAPTIVE.value, chat=chat, **kw, **extra)
    print(("" if _STREAM.value else gen.tokenizer.decode(result.tokens[0])), flush=True)
    stats = _stats_line(method, _ADAPTIVE.value, result.summary)
    if _COMPARE.value:
      ar_kw = {k: v for k, v in kw.items() if k not in ("block_len", "threshold", "policy")}
      ar = gen("ar", [prompt], chat=chat, **ar_kw)
      stats += (f"; ar {ar.summary['tokens_per_second']:.1f} tokens/s, speedup {ar.wall_time / result.wall_time:.2f}x"
                f"{'' if ar.tokens == result.tokens or _TEMP.value > 0 else ' (OUTPUTS DIFFER)'}")
    print(stats, flush=True)
    n += 1
  return n


def main(argv):
  del argv
  method = _METHOD.value
  check_flags(method)
  gen = load(_WORKDIR.value, _DRAFTER.value, _ROUTER.value)
  sampling = SamplingParams(temperature=_TEMP.value, top_k=_TOPK.value, top_p=_TOPP.value)
  kw = dict(max_new_tokens=_MAX_NEW.value, block_len=_BLOCK.value, sampling=sampling, seed=_SEED.value)
  if _THRESHOLD.value is not None:
    kw["threshold"] = threshold_value()
  spec = method in SPECULATIVE
  if not spec:
    kw.pop("block_len")
  if method in ("speed", "tandem_speed"):
    kw["policy"] = _POLICY.value
  if _ADAPTIVE.value and not flags.FLAGS["block_len"].present and gen.gamma_max:
    kw["block_len"] = int(gen.gamma_max)  # the router's γ_max, unless --block_len says otherwise
  if _INTERACTIVE.value:
    interactive(gen, method, kw)
    return
  prompts = _prompts()
  extra = {}
  if _STREAM.value:
    colour = sys.stdout.isatty()
    extra["on_tokens"] = StreamPrinter(gen.tokenizer, len(prompts), spec, colour)
    if len(prompts) == 1:
      print(f"> {prompts[0]}", flush=True)
  result = gen(method, prompts, adaptive=_ADAPTIVE.value, trace=_SHOW.value and spec, **kw, **extra)
  if _STREAM.value:
    print("\n" if len(prompts) == 1 else "", flush=True)
  report: dict[str, Any] = dict(method=method, adaptive=_ADAPTIVE.value, summary=result.summary,
                                compile_seconds=result.compile_time)
  if _COMPARE.value and method != "ar":
    from tandem_jax.bench.timing import interleaved
    ar_kw = {k: v for k, v in kw.items() if k not in ("block_len", "threshold", "policy")}
    cells = {"ar": lambda warmup=False: {"wall": gen("ar", prompts, **ar_kw).wall_time},
             method: lambda warmup=False: {"wall": gen(method, prompts, adaptive=_ADAPTIVE.value, **kw).wall_time}}
    times = {m: c["times"] for m, c in interleaved(cells, max(_REPEATS.value, 1)).items()}
    med = {m: statistics.median(t) for m, t in times.items()}
    report["timing"] = dict(median_seconds=med, speedup_vs_ar=med["ar"] / med[method], repeats=len(times["ar"]),
                            min_seconds={m: min(t) for m, t in times.items()},
                            max_seconds={m: max(t) for m, t in times.items()})
  rows = []
  for i, (prompt, toks) in enumerate(zip(prompts, result.tokens)):
    row = dict(prompt=prompt, token_ids=toks, text=gen.tokenizer.decode(toks),
               stats={k: v[i].tolist() for k, v in result.stats.items() if k != "trace"})
    if "trace" in result.stats:
      stream, events = draft_stream(result.stats["trace"][i], gen.tokenizer, toks,
                                    colour=sys.stdout.isatty() and not _JSON.value)
      row.update(draft_stream=stream, blocks=events)
    rows.append(row)
  report["outputs"] = rows
  if _JSON.value:
    print(json.dumps(report, indent=2))
    return
  for row in rows:
    if _STREAM.value and "draft_stream" not in row:
      continue  # already printed
    print(f"> {row['prompt']}")
    print(row.get("draft_stream") or row["text"])
    print()
  print(_stats_line(method, _ADAPTIVE.value, result.summary))
  for line in policy_lines(result):
    print(line)
  if "timing" in report:
    t = report["timing"]
    print(f"speedup over ar: {t['speedup_vs_ar']:.2f}x (median of {t['repeats']} interleaved runs on "
          f"{os.cpu_count()} CPU cores; ar {t['median_seconds']['ar'] * 1e3:.1f} ms, {method} "
          f"{t['median_seconds'][method] * 1e3:.1f} ms)")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  cli.run(main, "generate", reads_workdir=True)
