"""results.json, the Markdown report and the PNG plots of a benchmark run."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from tandem_jax.bench import timing

RESULTS_FILE, REPORT_FILE = "results.json", "report.md"
PLOT_SPEEDUP, PLOT_HIST = "speedup_vs_gamma.png", "accepted_lengths.png"


def jsonable(x):
  """Plain JSON types: str keys, floats (NaN -> None), lists."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  return x


def param_count(model) -> int:
  from flax import nnx
  return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _f(x, fmt="{:.3f}"):
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _spread(s, scale=1.0, fmt="{:.1f}"):
  return f"{fmt.format(s['min'] * scale)} / {fmt.format(s['median'] * scale)} / {fmt.format(s['max'] * scale)}"


def markdown(r: dict, plots: list[str]) -> str:
  m = r["machine"]["before_decode"]
  L = [f"# Tandem Transformers benchmark (preset `{r['preset']}`)", ""]
  if r.get("command"):
    L += ["Command:", "", "```", r["command"], "```", ""]
  L += [f"Machine: {m['cpu_count']} CPU cores, jax {m.get('jax', '?')}, {m.get('devices', ['?'])[0]}. Load average "
        f"before decoding {m['loadavg']}, after {r['machine']['after_decode']['loadavg']}; busiest other processes "
        f"before decoding: {', '.join(m.get('busiest_other_processes', [])) or 'none seen'}.", "",
        "Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["phases_seconds"].items()) +
        "; training per stage (s): " + ", ".join(
            f"{s} {'reused' if t['reused'] else format(t['seconds'], '.0f')}" for s, t in r["training"].items()),
        "", "Parameters: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in r["params"].items()) +
        " (tandem = frozen primary + secondary + projections).", "",
        f"Prompts: {r['prompts']['count']} windows of {r['prompts']['tokens']} tokens from the validation split, "
        f"{r['prompts']['max_new_tokens']} new tokens each, no EOS stop (every method emits the same number of "
        f"tokens). Timing: compiled programs only (compilation and one warm-up run excluded), every cell of a table "
        f"interleaved round-robin (order rotated each round), {r['config']['decode']['repeats']} rounds; speedup = "
        f"median(ar) / median(method), spread = min / median / max. Every fixed γ < K = {r['config']['gamma_max']} "
        f"runs the method's one program compiled for K (a switch over verify sizes: a block verifies its γ + 1 "
        f"tokens), γ = K its own program.", ""]

  L += ["## Headline (greedy, batch 1, best γ)", "", "| quantity | value | target | met |", "|---|---|---|---|"]
  for k, t in r["targets"].items():
    L.append(f"| {t['what'].split(' >=')[0]} (`{k}`) | {_f(t['value'])} | >= {t['target']} | "
             f"{'yes' if t['met'] else '**no**'} |")
  L += ["", f"Best γ: speed {r['best_gamma']['speed']}, tandem_speed {r['best_gamma']['tandem_speed']}; "
        f"cost ratio c (drafter step / primary step, batch 1) = {_f(r['cost_ratio_c'])}.", ""]

  L += ["## Table 1: validation quality of the secondaries", "",
        f"{r['eval_tokens']} validation tokens; tandem models at their training block length "
        f"{r['train_block_len']}. Agreement = argmax agreement with the primary; TV = mean total variation "
        f"to the primary.", "", "| model | accuracy % | CE | agreement % | TV |", "|---|---|---|---|---|"]
  for n, v in r["table1"].items():
    L.append(f"| {n} | {_f(100 * v['accuracy'], '{:.2f}')} | {_f(v['ce'])} | "
             f"{_f(100 * v['agreement'], '{:.2f}') if 'agreement' in v else '-'} | {_f(v.get('tv'))} |")
  if "accuracy_gain_points_equal_steps" in r:
    steps = r["config"]["steps"]
    L += ["", f"`secondary_long` is `secondary` trained alone for {steps.get('secondary_long')} more steps, as "
          f"Tandem-CE continues it for {steps.get('tandem')}: tandem minus it = "
          f"{_f(r['accuracy_gain_points_equal_steps'], '{:.2f}')} points (`accuracy_gain_points_equal_steps`), the "
          f"gain at equal training; the headline gain is against `secondary`, as the issue defines it."]

  L += ["", "## Table 2: speculative decoding, speedup over `ar`", ""]
  for name, row in r["table2"].items():
    ar = row["ar"]
    L += [f"### {name} ({row['prompts']} prompts, batch {row['batch']}, temperature {row['temperature']:g})", "",
          f"ar: {ar['tokens_per_second']:.1f} tokens/s; seconds min/median/max {_spread(ar['seconds'], 1, '{:.3f}')}. "
          f"Best γ: speed {row['best_gamma']['speed']}, tandem_speed {row['best_gamma']['tandem_speed']}.", "",
          "| γ | speed: speedup (min/med/max per round) | tok/primary call | α | tandem_speed: speedup (min/med/max) "
          "| tok/primary call | α |", "|---|---|---|---|---|---|---|"]
    for g in row["speed"]:
      s, t = row["speed"][g], row["tandem_speed"][g]
      L.append(f"| {g} | {s['speedup']:.3f} ({_spread(s['speedup_per_round'], 1, '{:.2f}')}) | "
               f"{s['tokens_per_primary_call']:.2f} | {_f(s['alpha'])} | {t['speedup']:.3f} "
               f"({_spread(t['speedup_per_round'], 1, '{:.2f}')}) | {t['tokens_per_primary_call']:.2f} | "
               f"{_f(t['alpha'])} |")
    if "auto" in row:
      a = row["auto"]
      hist = ", ".join(f"{g}: {n}" for g, n in enumerate(a["gamma_hist"]) if n)
      L += [f"| auto (≤ {a['gamma_max']}) | | | | {a['speedup']:.3f} ({_spread(a['speedup_per_round'], 1, '{:.2f}')}) "
            f"| {a['tokens_per_primary_call']:.2f} | {_f(a.get('alpha'))} |", "",
            f"auto: tandem_speed with γ chosen per iteration from its decode loop's calibration, the plain ar program "
            f"where earlier calls measured speculation below 1x ({a.get('plain_calls', 0)} of {a.get('calls', '?')} "
            f"timed calls; γ per iteration: {hist}); "
            f"{a['vs_best_fixed']:.2f}x the best fixed γ; timed calls that probed (speculated on a record below 1x, "
            f"all rounds): {a.get('probes', 'n/a')}."]
      if a.get("table"):
        L += [f"auto's loop table: {timing.table_line(a['table'])}."]
    if "ar_again" in row:
      again = row["ar_again"]
      L += ["", f"ar timed again as a second cell (its very program: the spread between two cells that cannot differ, "
            f"this run): {again['speedup']:.3f} ({_spread(again['speedup_per_round'], 1, '{:.2f}')})."]
    L.append("")

  L += ["## Table 3: standalone Tandem against the mid-size model", "",
        f"Quality on the validation split; the tandems at the inference block length {r['inference_block_len']} "
        f"(trained at {r['train_block_len']}); the mid-size model's agreement/TV are to the primary.", "",
        "| model | accuracy % | CE | agreement % | TV |", "|---|---|---|---|---|"]
  for n, v in r["table3_quality"].items():
    L.append(f"| {n} | {_f(100 * v['accuracy'], '{:.2f}')} | {_f(v['ce'])} | "
             f"{_f(100 * v['agreement'], '{:.2f}') if 'agreement' in v else '-'} | {_f(v.get('tv'))} |")
  L += ["", "Speed (greedy, batch 1; standalone `tandem` = tandem_distil emitting its drafts plus the primary's free "
        "token):", "", "| decoder | tokens/s | speedup over the primary | seconds min/median/max |", "|---|---|---|---|"]
  for n, v in r["table3_speed"].items():
    L.append(f"| {n} | {v['tokens_per_second']:.1f} | {_f(v.get('speedup'))} | {_spread(v['seconds'], 1, '{:.3f}')} |")
  mid, tan = r["table3_speed"].get("mid"), [v for n, v in r["table3_speed"].items() if n.startswith("tandem@")]
  if mid and tan:
    L += ["", f"Standalone tandem vs mid-size `ar`: {tan[0]['tokens_per_second'] / mid['tokens_per_second']:.3f}x "
          f"tokens/s."]

  L += ["", "## Table 4: adaptive γ (router) against the best fixed γ (tandem_speed, batch 1)", ""]
  tuning = [t["tuning"] for t in r["table4"].values() if t.get("tuning")]
  if tuning:
    L += [f"τ: the fastest of {', '.join(f'{float(x):g}' for x in tuning[0]['seconds'])} on "
          f"{tuning[0]['prompts']} held-out validation prompts (other rows than the timed prompts; median of "
          f"{r['config']['decode']['repeats']} interleaved rounds), then timed on the benchmark's prompts with the "
          f"paper's τ = {r['config']['threshold']:g} beside it.", ""]
  L += ["| setting | fixed γ | τ | speedup fixed | speedup adaptive | adaptive/fixed | adaptive/fixed at the paper's τ "
        "| adaptive/fixed, cost-aware stop | primary calls fixed -> adaptive | secondary calls fixed -> adaptive |",
        "|---|---|---|---|---|---|---|---|---|---|"]
  for name, t in r["table4"].items():
    L.append(f"| {name} | {t['fixed_gamma']} | {_f(t.get('threshold'), '{:g}')} | {t['fixed']['speedup']:.3f} | "
             f"{t['adaptive']['speedup']:.3f} | {t['speedup_adaptive_vs_fixed']:.3f} | "
             f"{_f(t.get('speedup_adaptive_paper_tau_vs_fixed'))} | "
             f"{_f(t.get('speedup_adaptive_cost_vs_fixed'))} | {t['fixed']['primary_calls']} -> "
             f"{t['adaptive']['primary_calls']} | {t['fixed']['secondary_calls']} -> "
             f"{t['adaptive']['secondary_calls']} |")
  for name, t in r["table4"].items():
    if t.get("tuning"):
      L.append(f"\nτ search ({name}, seconds on the held-out prompts): " + ", ".join(
          f"{float(x):g}: {v:.3f}" for x, v in t["tuning"]["seconds"].items()) + ".")

  L += ["", "## Leviathan's ideal and where the time goes (best γ per method)", "",
        "Ideal = (1 - α^(γ+1)) / ((1 - α)(γc + 1)) with α the per-draft acceptance estimated from the blocks "
        "(accepted / (accepted + rejections)) and c from the per-call microbenchmark below. The ideal assumes a "
        "(γ+1)-token verify costs one primary step; `verify/step` is what it costs here. `cost model` = tokens per "
        "block x primary step / (verify + drafter calls), i.e. the speedup the measured call costs allow without "
        "loop overhead.", "",
        "| setting | method | γ | α | c | ideal | realized | realized/ideal | verify/step | cost model | ms per block: "
        "verify + drafts = model / measured (per loop iteration over the batch) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, per in r["leviathan"].items():
    for meth, v in per.items():
      p = v["profile_ms"]
      L.append(f"| {name} | {meth} | {v['gamma']} | {_f(v['alpha'])} | {_f(v['c'])} | {_f(v['ideal'])} | "
               f"{_f(v['realized'])} | {_f(v['realized_over_ideal'])} | {_f(v['verify_cost_ratio'])} | "
               f"{_f(v['cost_model_speedup'])} | {p['verify_call']:.2f} + {p['drafter_per_block']:.2f} = "
               f"{p['model_per_block']:.2f} / {p['measured_per_block']:.2f} |")
  L += ["", "Per-call cost (ms, median of repeats; one cached call on k tokens per row at cache fill "
        "prompt + max_new/2):", "", "| batch | model | k | ms (min / median / max) |", "|---|---|---|---|"]
  for b, per in r["costs"].items():
    for model, ks in per.items():
      for k, s in ks.items():
        L.append(f"| {b} | {model} | {k} | {_spread(s, 1, '{:.3f}')} |")

  L += ["", "## Targets", ""]
  for k, t in r["targets"].items():
    L.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['what']} — measured {_f(t['value'])}.")
  L += [""]
  if plots:
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  else:
    L += ["Plots skipped: matplotlib is not installed (`pip install matplotlib`, the `plots` extra).", ""]
  return "\n".join(L)


def plot(r: dict, outdir: str) -> list[str]:
  """speedup vs γ per method and setting; histogram of accepted lengths per block at γ = decode.hist_gamma."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  names = list(r["table2"])
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names):
    row = r["table2"][name]
    for m in ("speed", "tandem_speed"):
      gs = [int(g) for g in row[m]]
      ax.errorbar(gs, [row[m][str(g)]["speedup"] for g in gs], marker="o", label=m,
                  yerr=np.array([[row[m][str(g)]["speedup"] - row[m][str(g)]["speedup_per_round"]["min"] for g in gs],
                                 [row[m][str(g)]["speedup_per_round"]["max"] - row[m][str(g)]["speedup"] for g in gs]]))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(title=name, xlabel="γ", ylabel="speedup over ar")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, PLOT_SPEEDUP), dpi=110)
  plt.close(fig)

  g = str(r["config"]["decode"]["hist_gamma"])
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names):
    row = r["table2"][name]
    if g not in row["speed"]:
      continue
    for i, m in enumerate(("speed", "tandem_speed")):
      h = np.asarray(row[m][g]["accepted_hist"][1:int(g) + 2], float)  # index j = accepted + 1
      ax.bar(np.arange(len(h)) + (i - 0.5) * 0.4, h / max(h.sum(), 1), width=0.4,
             label=f"{m} (mean {row[m][g]['mean_accepted_per_block']:.2f})")
    ax.set(title=f"{name}, γ={g}", xlabel="drafts accepted per block", ylabel="fraction of blocks")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, PLOT_HIST), dpi=110)
  plt.close(fig)
  return [PLOT_SPEEDUP, PLOT_HIST]


def write_all(r: dict, outdir: str, plots: bool = True) -> dict:
  made = plot(r, outdir) if plots else []
  r["plots"] = made
  with open(os.path.join(outdir, RESULTS_FILE), "w") as fh:
    json.dump(jsonable(r), fh, indent=1, sort_keys=False)
  with open(os.path.join(outdir, REPORT_FILE), "w") as fh:
    fh.write(markdown(r, made))
  return r


def publish(workdir: str, repo_root: str) -> str:
  """Copies a finished run into the repository: ``BENCHMARKS.md`` (its report) and ``benchmarks/`` (results.json,
  report.md, plots). Returns the BENCHMARKS.md path."""
  import shutil
  with open(os.path.join(workdir, RESULTS_FILE)) as fh:
    r = json.load(fh)
  out = os.path.join(repo_root, "benchmarks")
  os.makedirs(out, exist_ok=True)
  for name in [RESULTS_FILE, REPORT_FILE] + list(r.get("plots") or []):
    shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
  intro = ("The latest full run of `python -m tandem_jax.benchmark`. Its `results.json` is "
           "[benchmarks/results.json](benchmarks/results.json); regenerate this file from a run's workdir with "
           "`python -c \"from tandem_jax.bench import report; report.publish('DIR', '.')\"`.\n\n")
  path = os.path.join(repo_root, "BENCHMARKS.md")
  with open(path, "w") as fh:
    fh.write(intro + markdown(r, [f"benchmarks/{p}" for p in r.get("plots") or []]))
  return path
