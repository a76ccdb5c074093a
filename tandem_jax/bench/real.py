"""The real-model benchmark: Tandem + SPEED over pretrained SmolLM2-135M (``configs/benchmark.py:smollm2``).

  python -m tandem_jax.benchmark --workdir=/tmp/tandem_quickstart --config=configs/benchmark.py:smollm2

Phases, each timed into results.json:
- train: the primary imported (``<workdir>/primary``), the recipe's Tandem secondary (``<workdir>/tandem``, the
  quickstart's; reused when the quickstart ran in the same workdir), a standalone drafter of the same size trained by
  the same recipe on the same cached data for the same steps (``<workdir>/standalone``: the equal-training
  control, the paper's Gecko-Distil role), and the adaptive router (its greedy head on the tandem's greedy data,
  its sampled head on the primary's temperature-1 continuations of the same prompts: :mod:`tandem_jax.recipe_router`);
- Table 1: both drafters' agreement with the primary, TV distance and CE on the same held-out sequences;
- Table 3: per-call costs (ms) of the primary for k = 1..K+1 tokens and of the drafters' step, batch 1 and 8;
- Table 2: speedup over ``ar`` of ``speed`` and ``tandem_speed`` at each γ, greedy and T = 1, batch 1 and 8, on
  held-out prompts (:mod:`tandem_jax.data.heldout`: text no training step saw); outputs checked equal to ``ar``
  under greedy decoding; and, at ``decode.auto_batches`` (40: more rows than the held-out set has), ``ar``, the
  ``auto`` policy and ``ar`` again on the first tokens of the recipe's validation rows (``table2_auto``);
- Table 4: the adaptive router against the best fixed γ (batch 1), and Leviathan's ideal speedup with the measured α,
  drafter cost c and verify cost, against the realized one;
- head to head (``decode.h2h_rounds`` rounds): the ``auto`` policy's targets (issue 16) timed again with only the
  cells each compares, call by call, against Table 2's best fixed γ at batch 1 and ``ar`` above, each with its
  comparator timed twice (``h2h_targets``); ``--targets_only`` runs this phase alone on a finished run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from tandem_jax.bench import timing
from tandem_jax.bench.run import decode_settings, say as _say, setting_name
from tandem_jax.decoding import SamplingParams, generate
from tandem_jax.decoding.api import buffer_sizes
from tandem_jax.decoding.costs import leviathan_speedup

REPORT_FILE = "report_smollm2.md"
RESULTS_FILE = "results_smollm2.json"




def train_all(bench, workdir: str) -> dict:
  from tandem_jax import quickstart, recipe, recipe_router
  out = {}
  t0 = time.perf_counter()
  if bench.tiny:
    primary, documents = recipe.tiny_primary(os.path.join(workdir, "primary"))
  else:
    primary, documents = quickstart.import_smollm2(workdir, bench.gguf_dir), None
  out["primary_seconds"] = time.perf_counter() - t0
  rc = dataclasses.replace(recipe.PRESETS[bench.recipe_preset], **dict(bench.recipe))
  tandem_dir = os.path.join(workdir, "tandem")
  _say(f"[train] tandem: {rc}")
  out["tandem"] = recipe.train(primary, tandem_dir, rc, documents=documents)
  _say("[train] standalone drafter: same recipe, data and steps")
  out["standalone"] = recipe.train(primary, os.path.join(workdir, "standalone"),
                                   dataclasses.replace(rc, kind="standalone"), documents=documents,
                                   data_dir=os.path.join(tandem_dir, recipe.DATA_DIR))
  t0 = time.perf_counter()
  r = bench.router
  router = recipe_router.train_router(tandem_dir, steps=int(r.steps), gamma_max=int(bench.gamma_max),
                                      top_k=int(r.top_k), hidden=int(r.hidden),
                                      sampled_sequences=int(r.get("sampled_sequences", 256)))
  out["router"] = dict(validation=router["validation"], seconds=time.perf_counter() - t0)
  out["router_model"] = router["router"]
  out["paths"] = dict(primary=primary, tandem=tandem_dir, standalone=os.path.join(workdir, "standalone"))
  return out


def decode_tables(bench, models: dict, prompts, tune_prompts, costs: dict | None = None,
                  auto_prompts: dict | None = None) -> dict:
  """Tables 2 and 4. The ``auto`` cells calibrate on their own decode program (``api.calibrate_loop``, what
  ``generate(policy="auto")`` does by default); ``costs`` (the per-call table) is reported beside them.
  ``auto_prompts`` {batch: prompts}: the ``decode.auto_batches`` settings, timed with ``ar``, ``auto`` and ``ar``
  again only (``table2_auto``), ``decode.auto_repeats`` rounds."""
  d = bench.decode
  k = max(int(g) for g in d.gammas)
  table2, table4, table2_auto = {}, {}, {}
  for name, b, ps, common in decode_settings(d, prompts, k):
    cells, row = timing.table2_setting(ps, b, d.gammas, common, int(d.repeats), primary=models["primary"],
                                       drafter=models["standalone"], tandem=models["tandem"], auto_costs=None)
    table2[name] = row
    if b == 1:
      g = int(row["best_gamma"]["tandem_speed"])
      kmax = int(bench.gamma_max)

      def adaptive(tau, prompts_, common=common, b=b):
        return timing.decode_cell("tandem_speed", prompts_, b, kmax, models=dict(tandem=models["tandem"]),
                                  router=models["router"], threshold=tau,
                                  **dict(common, k=kmax))

      tuned = timing.tune_threshold(adaptive, d.thresholds, tune_prompts, 1)
      tau = tuned["chosen"]
      cells4 = {"ar": cells["ar"], "fixed": cells[f"tandem_speed@{g}"], "adaptive": adaptive(tau, ps)}
      # the router inside the auto policy: the router's blocks, and per call the plain program where they lose
      cells4["adaptive_auto"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=models["tandem"]),
                                                   router=models["router"], threshold=tau, policy="auto",
                                                   costs=None, **dict(common, k=kmax))
      # the router's cost-aware stop (threshold="cost"): blocks end where one more draft no longer pays at the
      # costs calibrated on this decode program, instead of at a tuned τ
      cells4["adaptive_cost"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=models["tandem"]),
                                                   router=models["router"], threshold="cost",
                                                   **dict(common, k=kmax))
      # the router's gate (threshold="gate"): each draft sent only where it pays at its own predicted acceptance,
      # an iteration whose first draft does not pay a plain step
      cells4["adaptive_gate"] = timing.decode_cell("tandem_speed", ps, b, kmax, models=dict(tandem=models["tandem"]),
                                                   router=models["router"], threshold="gate",
                                                   **dict(common, k=kmax))
      res4 = timing.interleaved(cells4, int(d.repeats))
      t4 = {n: timing.summarize(res4[n], res4["ar"]["times"] if n != "ar" else None) for n in cells4}
      t4["adaptive_auto"].update(timing.auto_calls(res4["adaptive_auto"]))
      t4.update(fixed_gamma=g, gamma_max=kmax, threshold=tau,
                tuning=tuned,
                speedup_adaptive_vs_fixed=float(np.median(res4["fixed"]["times"]) /
                                                np.median(res4["adaptive"]["times"])),
                speedup_adaptive_cost_vs_fixed=float(np.median(res4["fixed"]["times"]) /
                                                     np.median(res4["adaptive_cost"]["times"])),
                speedup_adaptive_gate_vs_fixed=float(np.median(res4["fixed"]["times"]) /
                                                     np.median(res4["adaptive_gate"]["times"])))
      table4[name] = t4
  for temp in d.temperatures:  # batches past the held-out set: auto against ar and its A/A cell only
    common = dict(sampling=SamplingParams(temperature=float(temp)), max_new=int(d.max_new_tokens), k=k,
                  seed=int(d.seed))
    for b, ps in (auto_prompts or {}).items():
      name = setting_name(temp, b)
      _say(f"[benchmark] decode {name}: ar, auto and ar again on {len(ps)} validation-row prompts")
      repeats = int(d.get("auto_repeats", d.repeats))
      table2_auto[name] = dict(timing.auto_setting(ps, int(b), common, repeats, primary=models["primary"],
                                                   tandem=models["tandem"]), source="recipe validation-row")
  return dict(table2=table2, table4=table4, table2_auto=table2_auto)


ROUTER_STOP = "gate"  # how the router inside auto ends its blocks in the head-to-head phase (head_to_head)


def head_to_head(bench, models: dict, prompts, auto_prompts: dict, table2: dict, table4: dict) -> dict:
  """The ``auto`` targets timed again, head to head (issue 16): per setting only the cells a target compares, timed
  call by call over ``decode.h2h_rounds`` rounds (:func:`timing.interleaved_calls`), each judged by the median of its
  per-round ratios. Batch 1: ``auto`` and the router inside ``auto`` against the fixed γ that Table 2's sweep found
  fastest (chosen on Table 2's rounds, measured on these: the maximum over noisy cells does not pick its own
  comparator), and that fixed γ timed again (its A/A); batch > 1: ``auto`` against ``ar`` and ``ar`` again. The
  router inside ``auto`` ends its blocks with its cost-aware gate (``threshold="gate"``: each draft sent only where
  it pays at its own predicted acceptance and the decode program's calibrated costs; no τ tuned on prompts): of the
  router's rules it is the fastest in the noise-free replay of whole blocks (``benchmarks/router_blocks.py``, at
  this CPU's costs and at every what-if cost there) and in Table 4's timing. ``table2``/``table4``: a finished decode
  phase's tables (this run's or, with ``--targets_only``, the workdir's last run's)."""
  d = bench.decode
  k, kmax, rounds = max(int(g) for g in d.gammas), int(bench.gamma_max), int(d.h2h_rounds)
  tandem, primary = dict(tandem=models["tandem"]), dict(primary=models["primary"])
  settings = []
  for temp in d.temperatures:
    common = dict(sampling=SamplingParams(temperature=float(temp)), max_new=int(d.max_new_tokens), k=k,
                  seed=int(d.seed))
    for b, ps in [(int(b), prompts[:int(d.batch1_prompts)] if int(b) == 1 else prompts) for b in d.batch_sizes] + \
        [(int(b), ps) for b, ps in auto_prompts.items()]:
      settings.append((setting_name(temp, b), b, ps, common))
  out = {}
  for i, (name, b, ps, common) in enumerate(settings):
    t0 = time.perf_counter()
    auto = timing.decode_cell("tandem_speed", ps, b, k, models=tandem, policy="auto", costs=None, **common)
    if b == 1:
      g = int(table2[name]["best_gamma"]["tandem_speed"])
      fixed = lambda: timing.decode_cell("tandem_speed", ps, b, g, models=tandem, **common)  # noqa: E731
      cells = {"fixed": fixed(), "auto": auto, "fixed_again": fixed(),
               "router_auto": timing.decode_cell("tandem_speed", ps, b, kmax, models=tandem, router=models["router"],
                                                 threshold=ROUTER_STOP, policy="auto", costs=None,
                                                 **dict(common, k=kmax))}
      base, row = "fixed", dict(fixed_gamma=g, router_stop=ROUTER_STOP)
    else:
      # ar at auto's capacity (block_len k): the very executable auto's plain fallback runs, so an auto cell that ran
      # it on every call is ar itself (h2h_targets' "= ar")
      ar = lambda: timing.decode_cell("ar", ps, b, k, models=primary, **common)  # noqa: E731
      cells, base, row = {"ar": ar(), "auto": auto, "ar_again": ar()}, "ar", {}
    _say(f"[benchmark] head to head {i + 1}/{len(settings)} {name}: {', '.join(cells)} on {len(ps)} prompts, "
         f"batch {b}, {rounds} rounds call by call")
    res = timing.interleaved_calls(cells, rounds)
    row.update(batch=b, prompts=len(ps), rounds=rounds, temperature=float(common["sampling"].temperature),
               seconds={n: timing.spread(res[n]["times"]) for n in cells},
               times={n: res[n]["times"] for n in cells},  # per round, the order of every other list here
               vs_base={n: timing.paired(res[base]["times"], res[n]["times"]) for n in cells if n != base})
    # what each call spent outside its program (the timed seconds are the programs' runs): auto's decision shows here
    row["host_ms_per_call"] = {n: float(np.median(res[n]["host"]) * 1e3 * rounds / max(res[n]["timed_calls"], 1))
                               for n in cells}
    for n in cells:
      if n.endswith("auto"):  # what its calls did: γ per iteration, calls on the plain program, probes
        row[n] = timing.auto_calls(res[n])
    row["seconds_total"] = time.perf_counter() - t0
    out[name] = row
  return out


def h2h_targets(h: dict) -> list[dict]:
  """The ``auto`` targets judged on the head-to-head timing (:func:`head_to_head`): the value is the median of the
  per-round ratios against the comparator, "yes" when it reaches the target, "within noise" when it does not but
  the median's interval (coverage at least 90%: :func:`timing.median_interval` over the rounds) reaches it (these
  rounds cannot tell it from the target), "no" when the whole interval is below. A/A (the comparator timed again,
  its median per-round ratio's distance from 1x) is reported beside. An ``auto`` cell that ran ``ar``'s program on
  every timed call of every round (``timing.auto_calls``: timed_plain_calls = timed_calls; its plain fallback is
  the very executable the head-to-head's ``ar`` cell runs, at the same capacity, ``decoding.api``) is ``ar`` itself: its per-round ratios to ``ar`` are an
  A/A, at or above 1x by chance in half the runs, so "at least 1x ar" is met as equality ("= ar") whatever side of
  1x they fall (the value is still printed; what the calls spent around the program is in ``host_ms_per_call``)."""
  out = []
  for name, row in h.items():
    if name.startswith("_"):  # the run's notes (_command, _table2_from)
      continue
    vs = row["vs_base"]
    if int(row["batch"]) == 1:
      aa = abs(1.0 - vs["fixed_again"]["ratio"])
      stop = f" ({row['router_stop']})" if "router_stop" in row else ""  # none in runs before the gate (Table 4's τ)
      checks = [(f"auto vs the best fixed γ (γ = {row['fixed_gamma']})", vs["auto"], 1.0),
                (f"router{stop} inside auto vs fixed γ = {row['fixed_gamma']}", vs["router_auto"], 1.04)]
    else:
      aa = abs(1.0 - vs["ar_again"]["ratio"])
      checks = [("auto vs ar", vs["auto"], 1.0)]
    calls = row.get("auto", {})
    is_ar = int(row["batch"]) > 1 and 0 < calls.get("timed_calls", 0) == calls.get("timed_plain_calls", -1)
    for what, p, target in checks:
      value, ci = p["ratio"], p["interval"]
      met = "yes" if value >= target else ("within noise" if ci["hi"] >= target else "no")
      if is_ar and value < target:
        met = "yes (= ar: its program on every call)"
      out.append(dict(setting=name, what=what, value=float(value), target=target, aa=float(aa), met=met,
                      interval=ci, per_round=p["per_round"], pooled=p["pooled"]))
  return out


def call_costs(bench, models: dict) -> dict:
  """Table 3: per-call ms of the primary for k = 1..K+1 tokens and of both drafters' step, per batch size."""
  d = bench.decode
  k = max(int(g) for g in d.gammas)
  cap = buffer_sizes(32, int(d.max_new_tokens), max(k, int(bench.gamma_max)))[2]  # prompts of up to 32 tokens
  costs = {}
  for b in d.batch_sizes:
    kw = dict(capacity=cap, fill=32 + int(d.max_new_tokens) // 2, calls=int(bench.cost.calls),
              repeats=int(bench.cost.repeats))
    costs[int(b)] = {"primary": {kk: timing.call_ms(models["primary"], b, kk, **kw) for kk in range(1, k + 2)},
                     "tandem": {1: timing.call_ms(models["tandem"].secondary, b, 1, **kw)},
                     "standalone": {1: timing.call_ms(models["standalone"], b, 1, **kw)}}
  return costs


def greedy_identical(models: dict, prompts, max_new: int, gamma: int) -> bool:
  """Greedy outputs of speed and tandem_speed equal ar's for every prompt (one batch)."""
  ar = generate("ar", prompts, primary=models["primary"], max_new_tokens=max_new).tokens
  ts = generate("tandem_speed", prompts, tandem=models["tandem"], max_new_tokens=max_new, block_len=gamma).tokens
  sp = generate("speed", prompts, primary=models["primary"], drafter=models["standalone"], max_new_tokens=max_new,
                block_len=gamma).tokens
  return ts == ar and sp == ar


def leviathan_rows(table2: dict, costs: dict) -> dict:
  out = {}
  for name, row in table2.items():
    cb = costs[row["batch"]]
    t1 = cb["primary"][1]["median"]
    out[name] = {}
    for m, drafter in (("speed", "standalone"), ("tandem_speed", "tandem")):
      g = int(row["best_gamma"][m])
      cell = row[m][g]
      c = cb[drafter][1]["median"] / t1
      verify = cb["primary"][g + 1]["median"] / t1
      ideal = leviathan_speedup(cell["alpha"], g, c, verify)  # the measured verify cost
      out[name][m] = dict(gamma=g, alpha=cell["alpha"], c=c, verify_cost=verify, ideal=ideal,
                          ideal_verify_1=leviathan_speedup(cell["alpha"], g, c), realized=cell["speedup"],
                          realized_over_ideal=cell["speedup"] / ideal if ideal else float("nan"))
  return out


def headline(r: dict) -> dict:
  g1 = r["table2"]["greedy_b1"]
  ts_row, sp_row = g1["tandem_speed"], g1["speed"]
  gt = int(g1["best_gamma"]["tandem_speed"])
  g4 = 4 if 4 in ts_row else gt
  t1 = r["table1"]
  return dict(
      speedup_tandem_speed_vs_ar=ts_row[gt]["speedup"],
      alpha_tandem_speed=ts_row[gt]["alpha"],
      tokens_per_primary_call_gamma4=ts_row[g4]["tokens_per_primary_call"],
      tandem_vs_standalone_tokens_per_call=ts_row[g4]["tokens_per_primary_call"] /
      sp_row[g4]["tokens_per_primary_call"] - 1.0,
      agreement_gain=t1["tandem"]["agreement"] - t1["standalone"]["agreement"],
      realized_over_ideal=r["leviathan"]["greedy_b1"]["tandem_speed"]["realized_over_ideal"],
      best_gamma=gt)


TARGETS = (("speedup_tandem_speed_vs_ar", 1.5, "tandem_speed vs ar (greedy, batch 1, best γ) >= 1.5x"),
           ("alpha_tandem_speed", 0.75, "α of tandem_speed (greedy, batch 1, best γ) >= 0.75"),
           ("tokens_per_primary_call_gamma4", 3.0, "tokens per primary call at γ = 4 >= 3"),
           ("tandem_vs_standalone_tokens_per_call", 0.10, "Tandem vs standalone drafter, tokens per primary call "
            "at γ = 4, equal training: >= +10%"),
           ("agreement_gain", 0.0, "Tandem's agreement with the primary above the standalone drafter's (> 0)"),
           ("realized_over_ideal", 0.9, "realized / ideal (Leviathan with the measured verify cost) >= 0.9"))


def auto_targets(r: dict) -> list[dict]:
  """The ``auto`` policy's targets (issue 16), each judged against this run's A/A cell: ``auto`` at least 1.0x ``ar``
  at batch > 1; at least 1.0 of the best fixed γ at batch 1; the router inside ``auto`` at least 1.04 of the fixed
  γ (Table 4; paper 1.045-1.093). ``aa``: how far from 1x the same setting's ``ar`` timed as a second cell read (its
  very program); a value short of its target by no more than that is "within A/A", one short by more is "no"."""
  out = []

  def judge(setting, what, value, target, aa):
    met = "yes" if value >= target else ("within A/A" if target - value <= aa else "no")
    out.append(dict(setting=setting, what=what, value=float(value), target=target, aa=float(aa), met=met))

  for name, row in {**r["table2"], **r.get("table2_auto", {})}.items():
    if "auto" not in row or "ar_again" not in row:
      continue
    aa = abs(1.0 - float(row["ar_again"]["speedup"]))
    if int(row["batch"]) > 1:
      judge(name, "auto vs ar", row["auto"]["speedup"], 1.0, aa)
    else:
      judge(name, "auto vs the best fixed γ", row["auto"]["vs_best_fixed"], 1.0, aa)
  for name, t4 in r["table4"].items():
    row = r["table2"].get(name, {})
    if "adaptive_auto" in t4 and "ar_again" in row:
      judge(name, f"router inside auto vs fixed γ = {t4['fixed_gamma']}",
            t4["adaptive_auto"]["speedup"] / t4["fixed"]["speedup"], 1.04,
            abs(1.0 - float(row["ar_again"]["speedup"])))
  return out


def _f(x, fmt="{:.3f}"):
  return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def markdown(r: dict) -> str:
  lines = [f"# Tandem + SPEED over pretrained SmolLM2-135M ({r['preset']})", "",
           f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
           "Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["phases_seconds"].items()), "",
           "## Targets (greedy, batch 1 unless said)", "", "| target | value | met |", "|---|---|---|"]
  for k, t in r["targets"].items():
    lines.append(f"| {t['what']} | {_f(t['value'])} | {'yes' if t['met'] else 'no'} |")
  if r.get("auto_targets"):
    lines += ["", "## The auto policy's targets (issue 16), judged against this run's A/A cell", "",
              "A/A: how far from 1x `ar` timed as a second cell of the same setting read (its very program); a value "
              "short of its target by no more than that is within A/A.", "",
              "| setting | what | value | target | A/A | met |", "|---|---|---|---|---|---|"]
    for t in r["auto_targets"]:
      lines.append(f"| {t['setting']} | {t['what']} | {t['value']:.3f} | >= {t['target']:g} | {t['aa']:.3f} | "
                   f"{t['met']} |")
  if r.get("h2h_targets"):
    h = r["head_to_head"]
    lines += ["", "## The auto policy's targets, head to head", "",
              f"Only the cells a target compares, timed call by call in "
              f"{next(v['rounds'] for n, v in h.items() if not n.startswith('_'))} rounds (the "
              "order rotated at every call; " + (f"`{h['_command']}`; " if h.get("_command") else "")
              + "the fixed γ is the one Table 2 found fastest" + (f" in {h['_table2_from']}" if h.get("_table2_from")
                                                                  else "") + "). Value: the median of the per-round "
              "ratios (comparator's seconds / the cell's), with its distribution-free interval (order statistics of "
              "the rounds, coverage as given); within noise: short of the target, the interval not; A/A: the "
              "comparator timed again, the same way; = ar: auto ran ar's own executable on every timed call of "
              "every round, so its ratios to ar are themselves an A/A (met as equality).", "",
              "| setting | what | value | interval (coverage) | per round min / max | pooled | target | A/A | met |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in r["h2h_targets"]:
      ci = t["interval"]
      lines.append(f"| {t['setting']} | {t['what']} | {t['value']:.3f} | {ci['lo']:.3f} - {ci['hi']:.3f} "
                   f"({ci['coverage']:.2f}) | {t['per_round']['min']:.3f} / {t['per_round']['max']:.3f} | "
                   f"{t['pooled']:.3f} | >= {t['target']:g} | {t['aa']:.3f} | {t['met']} |")
    lines.append("")
    for name, row in h.items():
      if name.startswith("_"):
        continue
      for n in ("auto", "router_auto"):
        if n in row:
          a = row[n]
          hist = ", ".join(f"{g}: {c}" for g, c in enumerate(a["gamma_hist"]) if c)
          every = (f" ({a['timed_plain_calls']} of {a['timed_calls']} in all rounds)" if "timed_calls" in a
                   else "")  # runs before the count have the last round's only
          host = row.get("host_ms_per_call")
          host = ("; ms per call outside the program " + ", ".join(f"{c} {v:.2f}" for c, v in host.items())
                  if host and n == "auto" else "")
          lines.append(f"{name} {n}: {a['plain_calls']} of {a['calls']} calls of the last round on the plain "
                       f"program{every}, γ per iteration {hist}; probes in all rounds {a['probes']}{host}  ")
  lines += ["", "## Table 1: drafters at equal training (same data, steps, size, draft vocabulary)", "",
            "Held-out sequences of the self-distillation data (primary continuations never trained on); block "
            "phase 0 at the training γ.", "",
            "| drafter | agreement with primary (top-1) | TV(p, q) | CE of primary argmax | soft CE |",
            "|---|---|---|---|---|"]
  for n in ("tandem", "standalone"):
    v = r["table1"][n]
    lines.append(f"| {n} | {_f(v['agreement'])} | {_f(v['tv'])} | {_f(v['ce'])} | {_f(v['soft_ce'])} |")
  lines += ["", "## Table 3: per-call costs (ms, median of repeats; cached calls at a fixed fill)", ""]
  for b, cb in r["costs"].items():
    ks = sorted(int(k) for k in cb["primary"])
    lines.append(f"batch {b}: primary " + ", ".join(f"k={k} {cb['primary'][k]['median']:.2f}" for k in ks) +
                 f"; tandem secondary step {cb['tandem'][1]['median']:.2f}; standalone step "
                 f"{cb['standalone'][1]['median']:.2f}  ")
  lines += ["", "## Table 2: speedup over ar (ratio of median wall times; tokens per primary call; α)", ""]
  for name, row in {**r["table2"], **r.get("table2_auto", {})}.items():
    lines += [f"### {name} ({row['prompts']} {row.get('source', 'held-out')} prompts; ar "
              f"{row['ar']['tokens_per_second']:.1f} tokens/s" + ("" if "speed" in row else "; auto and ar only") + ")",
              "", "| γ | speed | tandem_speed | speed tok/call | tandem tok/call | speed α | tandem α |",
              "|---|---|---|---|---|---|---|"]
    for g in sorted(row.get("speed", ())):
      s, t = row["speed"][g], row["tandem_speed"][g]
      lines.append(f"| {g} | {_f(s['speedup'], '{:.2f}x')} | {_f(t['speedup'], '{:.2f}x')} | "
                   f"{_f(s['tokens_per_primary_call'], '{:.2f}')} | {_f(t['tokens_per_primary_call'], '{:.2f}')} | "
                   f"{_f(s.get('alpha'))} | {_f(t.get('alpha'))} |")
    if "auto" in row:
      a = row["auto"]
      hist = ", ".join(f"{g}: {n}" for g, n in enumerate(a["gamma_hist"]) if n)
      lines.append(f"| auto (≤ {a['gamma_max']}) | | {_f(a['speedup'], '{:.2f}x')} | | "
                   f"{_f(a['tokens_per_primary_call'], '{:.2f}')} | | {_f(a.get('alpha'))} |")
      lines += ["", f"auto: tandem_speed with γ chosen per iteration from its decode loop's calibration, and the plain "
                f"ar program for the calls where earlier ones measured speculation below 1x ({a.get('plain_calls', 0)} "
                f"of {a.get('calls', '?')} timed calls; γ per iteration: {hist})"
                + (f"; {_f(a['vs_best_fixed'], '{:.2f}x')} the best fixed γ" if "vs_best_fixed" in a else "")]
      if a.get("call_walls"):
        calls = ", ".join(f"{w:.2f}{' plain' if plain else ''}" for w, plain in a["call_walls"])
        lines.append(f"auto's calls in the last round (s): {calls}; ar's calls in that round: "
                     + ", ".join(f"{w:.2f}" for w in a["ar_call_walls"])
                     + (f"; timed calls that probed (speculated on a record below 1x, all rounds): {a['probes']}"
                        if "probes" in a else ""))
        if a.get("last_probe"):
          lines.append(f"the last probe's reason: {a['last_probe']}")
      if a.get("table"):
        lines.append(f"auto's loop table: {timing.table_line(a['table'])}")
    if "ar_again" in row:
      sp = row["ar_again"]["speedup_per_round"]
      lines.append(f"ar timed again as a second cell (its very program: the spread between two cells that cannot "
                   f"differ, this run): {_f(row['ar_again']['speedup'], '{:.2f}x')} (per round {sp['min']:.2f} / "
                   f"{sp['median']:.2f} / {sp['max']:.2f})")
    lines.append("")
  lines += ["## Table 4: adaptive γ and Leviathan's ideal", ""]
  for name, t4 in r["table4"].items():
    lines.append(f"{name}: adaptive (router, K = {t4['gamma_max']}, τ = {t4['threshold']}) "
                 f"{_f(t4['adaptive'].get('speedup'), '{:.2f}x')} over ar, fixed γ = {t4['fixed_gamma']} "
                 f"{_f(t4['fixed'].get('speedup'), '{:.2f}x')}; adaptive / fixed "
                 f"{_f(t4['speedup_adaptive_vs_fixed'], '{:.2f}')}"
                 + (f"; router inside the auto policy {_f(t4['adaptive_auto'].get('speedup'), '{:.2f}x')}"
                    + (f" ({t4['adaptive_auto']['plain_calls']} of {t4['adaptive_auto']['calls']} calls of the last "
                       f"round on the plain program, {t4['adaptive_auto']['probes']} probes in all rounds)"
                       if "calls" in t4["adaptive_auto"] else "")
                    if "adaptive_auto" in t4 else "")
                 + (f"; router with the cost-aware stop {_f(t4['adaptive_cost'].get('speedup'), '{:.2f}x')} "
                    f"({_f(t4['speedup_adaptive_cost_vs_fixed'], '{:.2f}')} of fixed; drafts "
                    f"{t4['adaptive_cost'].get('drafted', 0)} against the τ router's {t4['adaptive'].get('drafted', 0)}"
                    f" and fixed γ's {t4['fixed'].get('drafted', 0)})" if "adaptive_cost" in t4 else "")
                 + (f"; router's gate {_f(t4['adaptive_gate'].get('speedup'), '{:.2f}x')} "
                    f"({_f(t4['speedup_adaptive_gate_vs_fixed'], '{:.2f}')} of fixed; drafts "
                    f"{t4['adaptive_gate'].get('drafted', 0)} in {t4['adaptive_gate'].get('primary_calls', 0)} "
                    f"primary calls, fixed γ's {t4['fixed'].get('primary_calls', 0)})"
                    if "adaptive_gate" in t4 else "")
                 + "  ")
  lines += ["", "| setting | method | γ | α | c | verify cost (steps) | ideal | ideal (verify = 1) | realized | "
            "realized / ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, rows in r["leviathan"].items():
    for m, v in rows.items():
      lines.append(f"| {name} | {m} | {v['gamma']} | {_f(v['alpha'])} | {_f(v['c'])} | {_f(v['verify_cost'], '{:.2f}')} "
                   f"| {_f(v['ideal'], '{:.2f}')} | {_f(v['ideal_verify_1'], '{:.2f}')} | {_f(v['realized'], '{:.2f}')} "
                   f"| {_f(v['realized_over_ideal'], '{:.2f}')} |")
  lines += ["", "## Training", "", "```", json.dumps(r["training"], indent=1), "```", ""]
  return "\n".join(lines)


def _models_and_prompts(bench, trained: dict):
  """The decode phases' models (from :func:`train_all`'s runs) and the timed and τ-tuning held-out prompts."""
  from tandem_jax.data.heldout import HELDOUT_TUNING, PROMPTS
  from tandem_jax.workdir import load_workdir
  run_t, run_s = load_workdir(trained["paths"]["tandem"]), load_workdir(trained["paths"]["standalone"])
  models = dict(tandem=run_t.model, primary=run_t.model.primary, standalone=run_s.model,
                router=trained.pop("router_model"))
  tok, d = run_t.tokenizer, bench.decode
  cut = int(d.prompt_tokens) or None
  prompts = [tok.encode(p, add_bos=True)[:cut] for p in PROMPTS[:int(d.num_prompts)]]
  tune_prompts = [tok.encode(p, add_bos=True)[:cut] for p in HELDOUT_TUNING[:int(d.tune_prompts)]]
  return models, prompts, tune_prompts


def _auto_prompts(bench, trained: dict) -> dict:
  """{batch: prompts} of ``decode.auto_batches``: the first tokens of the recipe's validation rows."""
  from tandem_jax.recipe import validation_prompts
  d = bench.decode
  return {int(b): validation_prompts(trained["paths"]["tandem"], int(b), int(d.prompt_tokens) or 24)
          for b in d.get("auto_batches", ())}


# what the timed prompts and cells depend on: a --targets_only run must match the run whose Table 2 it reads
_SAME_DECODE = ("num_prompts", "batch1_prompts", "max_new_tokens", "gammas", "batch_sizes", "temperatures",
                "prompt_tokens", "seed", "auto_batches")


def targets_only(bench, workdir: str, command: str = "") -> dict:
  """``--targets_only``: the head-to-head phase (:func:`head_to_head`) alone, on a workdir whose benchmark has run:
  the models reused (finished training is not repeated), the best fixed γ and τ read from its results JSON (so
  they were chosen on rounds this phase does not reuse); that JSON and the report are written again with the new
  ``head_to_head`` section, everything else kept as that run measured it."""
  from tandem_jax.bench.report import jsonable
  workdir = os.path.abspath(os.path.expanduser(workdir))
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    raise ValueError(f"no {RESULTS_FILE} in {workdir}: run the whole benchmark there first (--targets_only reads "
                     "its Table 2 and Table 4)")
  with open(path) as fh:
    r = json.load(fh)
  d, was = bench.decode, r["config"]["decode"]
  differ = [key for key in _SAME_DECODE if key in d and jsonable(d[key]) != was.get(key)]
  if differ or r.get("preset") != bench.preset:
    raise ValueError(f"the run in {workdir} was made with other decode settings ({', '.join(differ) or 'preset'}: "
                     f"{[was.get(key) for key in differ] or r.get('preset')}); pass the same config, or run the "
                     "whole benchmark")
  if not int(d.get("h2h_rounds", 0)):
    raise ValueError("decode.h2h_rounds is 0: no head-to-head rounds to time")
  t0 = time.perf_counter()
  _say("[benchmark] --targets_only: the models of the workdir's run (finished training reused)")
  trained = train_all(bench, workdir)
  models, prompts, _ = _models_and_prompts(bench, trained)
  h = head_to_head(bench, models, prompts, _auto_prompts(bench, trained), r["table2"], r["table4"])
  h["_command"], h["_table2_from"] = command, f"the run of `{r['command']}`"
  r["head_to_head"] = jsonable(h)
  r["phases_seconds"]["head_to_head"] = time.perf_counter() - t0
  with open(path, "w") as fh:
    json.dump(r, fh, indent=1)
  return rerender(workdir)


def run(bench, workdir: str, command: str = "") -> dict:
  from tandem_jax.bench.run import machine
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  phases, t_all = {}, time.perf_counter()
  t0 = time.perf_counter()
  _say("[benchmark] phase train: primary, Tandem and standalone drafters, router (finished runs are reused)")
  trained = train_all(bench, workdir)
  phases["train"] = time.perf_counter() - t0
  _say(f"[benchmark] phase quality: Table 1, lossless check (train took {phases['train']:.0f} s)")

  t0 = time.perf_counter()
  models, prompts, tune_prompts = _models_and_prompts(bench, trained)
  d = bench.decode
  table1 = {"tandem": trained["tandem"]["validation"], "standalone": trained["standalone"]["validation"]}
  identical = greedy_identical(models, prompts[:8], int(d.max_new_tokens), 4)
  if not identical:
    raise AssertionError("speculative decoding differs from ar under greedy decoding: not lossless")
  phases["quality"] = time.perf_counter() - t0

  _say("[benchmark] phase costs: per-call costs of primary and drafters")
  t0 = time.perf_counter()
  costs = call_costs(bench, models)
  phases["costs"] = time.perf_counter() - t0

  _say("[benchmark] phase decode: Tables 2 and 4, timed decoding")
  t0 = time.perf_counter()
  before = machine()
  auto_prompts = _auto_prompts(bench, trained)
  tables = decode_tables(bench, models, prompts, tune_prompts, costs, auto_prompts)
  phases["decode"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  if int(d.get("h2h_rounds", 0)):
    _say("[benchmark] phase head to head: the auto targets' cells alone, call by call")
    tables["head_to_head"] = head_to_head(bench, models, prompts, auto_prompts, tables["table2"], tables["table4"])
    phases["head_to_head"] = time.perf_counter() - t0
  phases["total"] = time.perf_counter() - t_all
  training = {n: v for n, v in trained.items() if n != "paths"}
  r = dict(preset=bench.preset, command=command, workdir=workdir, config=bench.to_dict(), table1=table1,
           costs=costs, greedy_outputs_identical=identical, phases_seconds=phases, training=training,
           machine=f"{before.get('cpu_count')} CPU cores, load {before.get('loadavg')}, jax {before.get('jax')}",
           **tables)
  r["leviathan"] = leviathan_rows(r["table2"], costs)
  r.update(headline(r))
  r["targets"] = {key: dict(target=t, value=r[key], met=bool(r[key] >= t if key != "agreement_gain" else r[key] > t),
                            what=w) for key, t, w in TARGETS}
  r["auto_targets"] = auto_targets(r)
  if "head_to_head" in r:
    r["h2h_targets"] = h2h_targets(r["head_to_head"])
  from tandem_jax.bench.report import jsonable
  r["report"] = markdown(r)
  r = jsonable(r)
  with open(os.path.join(workdir, RESULTS_FILE), "w") as fh:
    json.dump(r, fh, indent=1)
  with open(os.path.join(workdir, REPORT_FILE), "w") as fh:
    fh.write(r["report"])
  return r


def rerender(workdir: str) -> dict:
  """The report of a finished run written again from its results JSON by this code (what is derived from the
  measurements, such as :func:`auto_targets`, recomputed; nothing is timed again)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), RESULTS_FILE)
  if not os.path.exists(path):
    raise ValueError(f"no {RESULTS_FILE} in {workdir}: run the benchmark there first")
  with open(path) as fh:
    r = json.load(fh)
  # JSON keeps the per-call costs' block sizes as strings; the report indexes them by int, as the run does
  r["costs"] = {b: {m: {int(k): v for k, v in d.items()} for m, d in cb.items()} for b, cb in r["costs"].items()}
  r["auto_targets"] = auto_targets(r)
  if "head_to_head" in r:
    r["h2h_targets"] = h2h_targets(r["head_to_head"])
  r["report"] = markdown(r)
  with open(path, "w") as fh:
    json.dump(r, fh, indent=1)
  with open(os.path.join(os.path.dirname(path), REPORT_FILE), "w") as fh:
    fh.write(r["report"])
  return r
