"""The whole benchmark in one process: train (or reuse), quality tables, decode timing, results."""

from __future__ import annotations

import logging
import os
import subprocess
import time

import numpy as np

from tandem_jax.bench import chain, quality, report, timing
from tandem_jax.decoding import SamplingParams
from tandem_jax.decoding.api import buffer_sizes
from tandem_jax.decoding.costs import leviathan_speedup
from tandem_jax.progress import Progress


def setting_name(temperature: float, batch: int) -> str:
  return f"{'greedy' if temperature == 0 else f'T{temperature:g}'}_b{batch}"


def machine() -> dict:
  """Cores, load and the busiest other processes at the time of the call (the timings' context)."""
  out = dict(cpu_count=os.cpu_count(), loadavg=[round(x, 2) for x in os.getloadavg()])
  try:
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=5)
    rows = [line.split(None, 2) for line in ps.stdout.splitlines()[1:]]
    out["busiest_other_processes"] = [f"{r[2]} ({r[1]}% cpu)" for r in rows
                                      if len(r) == 3 and int(r[0]) != os.getpid() and float(r[1]) >= 10][:6]
  except (OSError, subprocess.SubprocessError, ValueError):
    pass
  try:
    import jax
    out.update(jax=jax.__version__, devices=[str(d) for d in jax.local_devices()][:1])
  except ImportError:
    pass
  return out


def decode_settings(d, prompts, k: int):
  """The settings of Tables 2 and 4, in order, with a progress line each: (name, batch, prompts, common decode_cell
  arguments) for every temperature x batch size of ``d`` (bench.decode); batch 1 times the first batch1_prompts."""
  bar = Progress(len(d.temperatures) * len(d.batch_sizes), "decode", unit="settings", every_s=0)
  started = 0
  for temp in d.temperatures:
    common = dict(sampling=SamplingParams(temperature=float(temp)), max_new=int(d.max_new_tokens), k=k,
                  seed=int(d.seed))
    for b in d.batch_sizes:
      name = setting_name(temp, b)
      ps = prompts[:int(d.batch1_prompts)] if b == 1 else prompts
      logging.info("table 2 %s: %d prompts, batch %d, γ in %s", name, len(ps), b, tuple(d.gammas))
      bar.update(started, now=name)  # settings finished so far; the ETA comes from them
      started += 1
      yield name, int(b), ps, common
  bar.update(bar.total)


def say(msg: str) -> None:
  print(msg, flush=True)
  logging.info(msg)


def decode_tables(bench, models: dict, prompts, tune_prompts=None, costs: dict | None = None) -> dict:
  """Tables 2-4. With ``costs`` (the per-call table by batch, reported beside) Table 2 gains the ``auto`` cell,
  calibrated on its own decode program (``api.calibrate_loop``, generate's default)."""
  d, k = bench.decode, int(bench.gamma_max)
  primary, drafter, tandem, router, mid = (models[n] for n in ("primary", "drafter", "tandem", "router", "mid"))
  table2, table4 = {}, {}
  for name, b, ps, common in decode_settings(d, prompts, k):
    cells, row = timing.table2_setting(ps, b, d.gammas, common, int(d.repeats), primary=primary, drafter=drafter,
                                       tandem=tandem, auto=bool(costs), auto_costs=None)
    table2[name] = row
    if b == 1:  # Table 4: adaptive against the best fixed γ, re-timed side by side
      g = row["best_gamma"]["tandem_speed"]

      def adaptive(tau, prompts_, common=common, b=b):
        return timing.decode_cell("tandem_speed", prompts_, b, k, models=dict(tandem=tandem), router=router,
                                  threshold=tau, **common)

      paper_tau = float(bench.threshold)
      tuned = (timing.tune_threshold(adaptive, d.thresholds, tune_prompts, int(d.repeats))
               if tune_prompts and d.thresholds else None)
      tau = tuned["chosen"] if tuned else paper_tau
      cells4 = {"ar": cells["ar"], "fixed": cells[f"tandem_speed@{g}"], "adaptive": adaptive(tau, ps)}
      if tau != paper_tau:
        cells4["adaptive_paper_tau"] = adaptive(paper_tau, ps)
      # the router's cost-aware stop: blocks end where one more draft no longer pays at the calibrated costs
      cells4["adaptive_cost"] = adaptive("cost", ps)
      res4 = timing.interleaved(cells4, int(d.repeats))
      t4 = {n: timing.summarize(res4[n], res4["ar"]["times"] if n != "ar" else None) for n in cells4}
      over_fixed = lambda n: float(np.median(res4["fixed"]["times"]) / np.median(res4[n]["times"]))  # noqa: E731
      t4.update(fixed_gamma=g, gamma_max=k, threshold=tau, paper_threshold=paper_tau, tuning=tuned,
                speedup_adaptive_vs_fixed=over_fixed("adaptive"),
                speedup_adaptive_cost_vs_fixed=over_fixed("adaptive_cost"),
                speedup_adaptive_paper_tau_vs_fixed=over_fixed("adaptive_paper_tau" if tau != paper_tau
                                                               else "adaptive"))
      table4[name] = t4
  # Table 3 (speed): standalone Tandem against the mid-size model (and the primary, the secondary) alone.
  g3 = int(d.standalone_block_len)
  common = dict(sampling=SamplingParams(), max_new=int(d.max_new_tokens), k=g3, seed=int(d.seed))
  ps = prompts[:int(d.batch1_prompts)]
  cells3 = {"primary": timing.decode_cell("ar", ps, 1, None, models=dict(primary=primary), **common),
            "mid": timing.decode_cell("ar", ps, 1, None, models=dict(primary=mid), **common),
            "secondary": timing.decode_cell("ar", ps, 1, None, models=dict(primary=drafter), **common),
            f"tandem@{g3}": timing.decode_cell("tandem", ps, 1, g3, models=dict(tandem=tandem), **common)}
  res3 = timing.interleaved(cells3, int(d.repeats))
  table3 = {n: timing.summarize(res3[n], res3["primary"]["times"]) for n in cells3}
  return dict(table2=table2, table3_speed=table3, table4=table4)


def headline(results: dict) -> dict:
  """The headline numbers (greedy, batch 1, best γ) and the Leviathan comparison."""
  t1, t2, costs = results["table1"], results["table2"], results["costs"]
  g1 = t2["greedy_b1"]
  gs, gt = g1["best_gamma"]["speed"], g1["best_gamma"]["tandem_speed"]
  ts, sp = g1["tandem_speed"][str(gt)], g1["speed"][str(gs)]
  c1 = costs["1"]
  t_l1 = c1["primary"]["1"]["median"]
  c = c1["drafter"]["1"]["median"] / t_l1
  lev = {}
  for name, row in t2.items():
    b = str(row["batch"])
    if b not in costs:
      continue
    cb = costs[b]
    cr = cb["drafter"]["1"]["median"] / cb["primary"]["1"]["median"]
    lev[name] = {}
    for m in ("speed", "tandem_speed"):
      g = row["best_gamma"][m]
      cell = row[m][str(g)]
      ideal = leviathan_speedup(cell["alpha"], g, cr)
      verify = cb["primary"][str(g + 1)]["median"]
      per_block_model = verify + cell["secondary_calls_per_block"] * cb["drafter"]["1"]["median"]
      # Rows advance in lockstep: per loop iteration (all B rows) = per row-block x B, per ar step = per token x B.
      ar_ms_tok = row["ar"]["seconds"]["median"] * 1e3 * row["batch"] / row["ar"]["tokens"]
      ms_block = cell["seconds"]["median"] * 1e3 * row["batch"] / max(cell["blocks"], 1)
      lev[name][m] = dict(
          gamma=g, alpha=cell["alpha"], c=cr, ideal=ideal, realized=cell["speedup"],
          realized_over_ideal=cell["speedup"] / ideal if ideal else float("nan"),
          verify_cost_ratio=verify / cb["primary"]["1"]["median"],
          cost_model_speedup=(cell["tokens"] / max(cell["blocks"], 1)) * cb["primary"]["1"]["median"] /
          per_block_model,
          profile_ms=dict(primary_call_k1=cb["primary"]["1"]["median"], verify_call=verify,
                          drafter_per_block=per_block_model - verify, model_per_block=per_block_model,
                          measured_per_block=ms_block, overhead_per_block=ms_block - per_block_model,
                          ar_measured_per_token=ar_ms_tok, ar_overhead_per_token=ar_ms_tok - cb["primary"]["1"]["median"]))
  a4 = results["table4"].get("greedy_b1", {})
  return dict(
      accuracy_gain_points=100.0 * (t1["tandem"]["accuracy"] - t1["secondary"]["accuracy"]),
      # Tandem-CE against a standalone secondary trained for as many steps as the tandem's secondary in all.
      accuracy_gain_points_equal_steps=100.0 * (t1["tandem"]["accuracy"] - t1["secondary_long"]["accuracy"]),
      accuracy_gain_points_distil=100.0 * (t1["tandem_distil"]["accuracy"] - t1["secondary_distil"]["accuracy"]),
      speedup_tandem_speed_vs_ar=ts["speedup"],
      speedup_speed_vs_ar=sp["speedup"],
      speedup_tandem_speed_vs_speed=sp["seconds"]["median"] / ts["seconds"]["median"],
      speedup_adaptive_vs_fixed=a4.get("speedup_adaptive_vs_fixed", float("nan")),
      realized_over_ideal=lev["greedy_b1"]["tandem_speed"]["realized_over_ideal"],
      best_gamma=dict(speed=gs, tandem_speed=gt), cost_ratio_c=c, leviathan=lev)


TARGETS = (("accuracy_gain_points", 3.3, "tandem-CE accuracy - secondary accuracy (points) >= 3.3"),
           ("speedup_tandem_speed_vs_speed", 1.15, "tandem_speed vs speed at each one's best γ >= 1.15x"),
           ("speedup_tandem_speed_vs_ar", 2.0, "tandem_speed vs ar (greedy, batch 1) >= 2x"),
           ("speedup_adaptive_vs_fixed", 1.04, "adaptive vs fixed γ >= 1.04x"),
           ("realized_over_ideal", 0.9, "realized / Leviathan ideal >= 0.9"))


def run(bench, workdir: str, config_arg: str = "", command: str = "") -> dict:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  phases, t_all = {}, time.perf_counter()
  t0 = time.perf_counter()
  say("[benchmark] phase train: the models of configs/benchmark.py (finished stages are reused)")
  trained = chain.train_all(bench, workdir)
  phases["train"] = time.perf_counter() - t0
  say(f"[benchmark] phase quality: Table 1 (train took {phases['train']:.0f} s)")

  t0 = time.perf_counter()
  loaded = quality.load_models(workdir)
  val_rows = quality.validation_rows(loaded)
  q = quality.evaluate(bench, loaded, val_rows)
  phases["quality"] = time.perf_counter() - t0

  say("[benchmark] phase costs: per-call costs")
  t0 = time.perf_counter()
  machine_before = machine()
  models = dict(primary=loaded["primary"].model, drafter=loaded["secondary_distil"].model,
                tandem=loaded["tandem_distil"].model, router=loaded["router"].model.router, mid=loaded["mid"].model)
  d = bench.decode
  # The timed prompts, then held-out ones (other validation rows) for choosing the router's τ.
  prompts = timing.draw_prompts(val_rows, int(d.num_prompts) + int(d.tune_prompts), int(d.prompt_len))
  prompts, tune_prompts = prompts[:int(d.num_prompts)], prompts[int(d.num_prompts):]
  cap = buffer_sizes(int(d.prompt_len), int(d.max_new_tokens), int(bench.gamma_max))[2]  # the decode's cache
  costs = timing.call_costs(models, d.batch_sizes, int(bench.gamma_max), capacity=cap,
                            fill=int(d.prompt_len) + int(d.max_new_tokens) // 2, calls=int(bench.cost.calls),
                            repeats=int(bench.cost.repeats))
  phases["costs"] = time.perf_counter() - t0
  say("[benchmark] phase decode: Tables 2-4, timed decoding")
  t1 = time.perf_counter()
  tables = decode_tables(bench, models, prompts, tune_prompts, costs)
  phases["decode"] = time.perf_counter() - t1
  machine_after = machine()

  results = dict(q, **tables, costs=report.jsonable(costs))
  results = report.jsonable(results)
  results.update(headline(results))
  results["targets"] = {k: dict(target=t, value=results[k], met=bool(results[k] >= t), what=w)
                        for k, t, w in TARGETS}
  phases["total"] = time.perf_counter() - t_all
  results.update(
      preset=bench.preset, config=bench.to_dict(), config_arg=config_arg, command=command, workdir=workdir,
      training=report.jsonable({s: {k: v for k, v in r.items() if k != "eval"} for s, r in trained.items()}),
      phases_seconds=phases, machine=dict(before_decode=machine_before, after_decode=machine_after),
      prompts=dict(count=len(prompts), threshold_tuning=len(tune_prompts), tokens=int(d.prompt_len),
                   max_new_tokens=int(d.max_new_tokens), source="validation split"),
      params={n: report.param_count(m) for n, m in models.items() if n != "router"})
  report.write_all(results, workdir, plots=bool(bench.plots))
  return results
