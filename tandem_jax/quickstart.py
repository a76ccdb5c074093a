"""The main job in one command: train a small tandem on the embedded corpus, then decode with Tandem + SPEED.

  python -m tandem_jax.quickstart --workdir=/tmp/tandem_quickstart

Trains (or resumes, stage by stage) a primary, a standalone secondary and a Tandem-CE secondary initialised from it,
then generates continuations of validation-split prompts with ``ar`` and ``tandem_speed`` (greedy, batch 1), checks
that the outputs are identical, and prints the measured wall-clock speedup (medians of interleaved repeats; compile
time excluded). Every stage is an ordinary ``python -m tandem_jax.train`` workdir under --workdir.
"""

from __future__ import annotations

import json
import os
import statistics

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/tandem_quickstart", "root directory for the three runs", allow_override=True)
_PRESET = flags.DEFINE_string("preset", "cpu", "model/training preset of configs/base.py (tiny for a smoke run)", allow_override=True)
_STEPS = flags.DEFINE_integer("steps", None, "training steps per stage (default: the preset's)", allow_override=True)
_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "validation prompts to decode (one at a time)", allow_override=True)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "prompt length in tokens", allow_override=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per prompt", allow_override=True)
_BLOCK = flags.DEFINE_integer("block_len", 4, "γ for Tandem + SPEED", allow_override=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "interleaved timing repeats", allow_override=True)
_JSON = flags.DEFINE_bool("json", False, "print the summary as JSON", allow_override=True)


def train_stages(root: str, preset: str, steps: int | None) -> dict[str, str]:
  from configs import base
  from tandem_jax.training import loop
  dirs = {s: os.path.join(root, s) for s in ("primary", "secondary", "tandem")}
  init = {"primary": {}, "secondary": {"primary_workdir": dirs["primary"]},
          "tandem": {"primary_workdir": dirs["primary"], "secondary_workdir": dirs["secondary"]}}
  for stage, path in dirs.items():
    config = base.get_config(stage, preset)
    if steps:
      config.train.steps = steps
    for field, value in init[stage].items():
      config.init[field] = value
    logging.info("stage %s -> %s", stage, path)
    result = loop.train(config, path)
    print(f"[{stage}] step {result['step']}: validation {json.dumps(result.get('eval') or {})}", flush=True)
  return dirs


def validation_prompts(loaded, n: int, length: int) -> list[list[int]]:
  from tandem_jax.training import data as data_mod
  _, val_docs = data_mod.documents(loaded.config)
  tok = loaded.tokenizer
  prompts = []
  for doc in val_docs:
    ids = tok.encode(doc, add_bos=True)
    for start in range(0, len(ids) - length, max(len(ids) // 4, length)):
      prompts.append(ids[start:start + length])
      if len(prompts) == n:
        return prompts
  if not prompts:
    raise ValueError("the validation split has no document long enough for a prompt")
  return prompts


def measure(tandem, prompts, max_new: int, block_len: int, repeats: int) -> dict:
  """ar vs tandem_speed, batch 1, greedy: identical outputs, interleaved wall-clock medians."""
  from tandem_jax.decoding import generate
  runs = {"ar": lambda p: generate("ar", [p], primary=tandem.primary, max_new_tokens=max_new),
          "tandem_speed": lambda p: generate("tandem_speed", [p], tandem=tandem, max_new_tokens=max_new,
                                             block_len=block_len)}
  for fn in runs.values():  # compile once (prompts share one padded shape)
    fn(prompts[0])
  times = {m: [] for m in runs}
  tokens = {m: 0 for m in runs}
  calls = {m: 0 for m in runs}
  for _ in range(repeats):
    for p in prompts:
      outs = {}
      for m, fn in runs.items():
        r = fn(p)
        outs[m] = r.tokens
        times[m].append(r.wall_time)
        tokens[m] += len(r.tokens[0])
        calls[m] += int(r.stats["primary_calls"].sum())
      if outs["ar"] != outs["tandem_speed"]:
        raise AssertionError(f"tandem_speed differs from ar on prompt {p[:8]}...: speculative decoding must be "
                             "lossless")
  total = {m: sum(t) / repeats for m, t in times.items()}
  per_prompt = {m: statistics.median(t) for m, t in times.items()}
  return dict(seconds_per_prompt_median=per_prompt, seconds_total=total,
              speedup=per_prompt["ar"] / per_prompt["tandem_speed"],
              tokens_per_primary_call=tokens["tandem_speed"] / calls["tandem_speed"],
              identical_outputs=True, prompts=len(prompts), max_new_tokens=max_new, block_len=block_len,
              cpu_cores=os.cpu_count())


def main(argv):
  del argv
  from tandem_jax.workdir import load_workdir
  root = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  dirs = train_stages(root, _PRESET.value, _STEPS.value)
  loaded = load_workdir(dirs["tandem"])
  prompts = validation_prompts(loaded, _PROMPTS.value, _PROMPT_LEN.value)
  res = measure(loaded.model, prompts, _MAX_NEW.value, _BLOCK.value, _REPEATS.value)
  from tandem_jax.decoding import generate
  sample = generate("tandem_speed", [prompts[0]], tandem=loaded.model, max_new_tokens=_MAX_NEW.value,
                    block_len=_BLOCK.value).tokens[0]
  res["sample"] = {"prompt": loaded.tokenizer.decode(prompts[0]), "continuation": loaded.tokenizer.decode(sample)}
  with open(os.path.join(root, "quickstart.json"), "w") as fh:
    json.dump(res, fh, indent=2)
  if _JSON.value:
    print(json.dumps(res, indent=2))
    return
  print(f"\nprompt: {res['sample']['prompt']!r}\ntandem_speed: {res['sample']['continuation']!r}\n")
  print(f"Tandem + SPEED (γ={res['block_len']}) vs ar, greedy, batch 1, {res['prompts']} prompts x "
        f"{res['max_new_tokens']} tokens on {res['cpu_cores']} CPU cores: outputs identical; "
        f"{res['tokens_per_primary_call']:.2f} tokens per primary call; "
        f"speedup {res['speedup']:.2f}x (median seconds per prompt: ar {res['seconds_per_prompt_median']['ar']:.3f}, "
        f"tandem_speed {res['seconds_per_prompt_median']['tandem_speed']:.3f})")


if __name__ == "__main__":
  app.run(main)
