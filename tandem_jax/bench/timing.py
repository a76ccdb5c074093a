"""Decoding measurements: wall-clock of compiled decode programs (compilation excluded, a warm-up call first),
methods interleaved round-robin with the order rotated every round, medians and spread over repeats; and a
per-call microbenchmark of the models (the cost ratio c and the block-verify cost)."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np

from tandem_jax.decoding import SamplingParams, generate
from tandem_jax.decoding import costs as costs_lib
from tandem_jax.decoding.costs import call_ms, spread  # noqa: F401 - the benchmark's per-call table


def draw_prompts(val_rows: np.ndarray, n: int, prompt_len: int) -> list[list[int]]:
  """``n`` prompts of ``prompt_len`` tokens: windows of the validation rows, row by row, then further along."""
  rows, seq = val_rows.shape
  per_row = max(1, seq // prompt_len)
  if rows * per_row < n:
    raise ValueError(f"the validation split has {rows} rows of {seq} tokens: too few for {n} prompts of "
                     f"{prompt_len} tokens (lower decode.num_prompts or decode.prompt_len)")
  out = []
  for j in range(per_row):
    for i in range(rows):
      if len(out) < n:
        out.append([int(t) for t in val_rows[i, j * prompt_len:(j + 1) * prompt_len]])
  return out


def run_batches(method: str, prompts: list[list[int]], batch: int, **kw) -> dict:
  """Decodes ``prompts`` in batches of ``batch``; sums wall time (the compiled programs' runs), host time (the rest of
  each ``generate`` call: argument preparation, an ``auto`` call's decision, result conversion), tokens and the
  per-row counters."""
  wall, host = 0.0, 0.0
  agg = {"calls": 0, "plain_calls": 0, "call_walls": [], "call_notes": []}
  for i in range(0, len(prompts), batch):
    t0 = time.perf_counter()
    r = generate(method, prompts[i:i + batch], **kw)
    host += time.perf_counter() - t0 - r.wall_time  # what the call spent around its program (auto: the decision)
    wall += r.wall_time
    agg["call_walls"].append((round(r.wall_time, 4), bool(r.ran_plain)))  # per call: seconds, ran the plain program
    agg["call_notes"].append(r.policy_note)  # auto: why it ran the plain program or probed ("" when simply ahead)
    if r.costs is not None:  # auto: the loop's calibrated table, with the acceptance prior of this call
      it = costs_lib.iteration_costs(r.costs, r.costs.max_block_len)  # what choose_gamma weighs for γ = 0..K
      agg["table"] = dict(r.costs.as_dict(), break_even_alpha=r.costs.break_even_alpha(),
                          iteration_ms=[float(x) for x in np.asarray(it)])
    agg.setdefault("tokens", 0)
    agg["tokens"] += sum(len(t) for t in r.tokens)
    agg["calls"] += 1
    agg["plain_calls"] += int(r.ran_plain)  # auto ran the plain program
    for name, v in r.stats.items():
      if name == "trace":
        continue
      s = np.asarray(v).sum(0)
      agg[name] = agg[name] + s if name in agg else s
  agg["wall"], agg["host"] = wall, host
  return agg


def _warm_up(cells: dict[str, Callable[..., dict]]) -> None:
  """Every cell once, untimed: compiles and warms its program (an ``auto`` cell also calibrates its loop)."""
  for n, cell in cells.items():
    t0 = time.perf_counter()
    cell(warmup=True)
    logging.info("warm-up %s: %.1f s (compile included)", n, time.perf_counter() - t0)


def interleaved(cells: dict[str, Callable[..., dict]], repeats: int) -> dict[str, dict]:
  """Runs every cell once to compile and warm up (``cell(warmup=True)``: a cell may run just its first batch, which
  compiles and warms the same program), then ``repeats`` rounds, each cell once per round in an order rotated by one
  every round. Returns per cell ``{"times": [...], "host": [...], "run": last run's counters, "notes": every timed
  call's policy note, "timed_calls"/"timed_plain_calls": over all rounds}`` (:func:`_add_round`)."""
  names = list(cells)
  out = {n: _new_record() for n in names}
  _warm_up(cells)
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      _add_round(out[n], cells[n]())
  return out


def _new_record() -> dict:
  return {"times": [], "host": [], "run": None, "notes": [], "timed_calls": 0, "timed_plain_calls": 0}


def _add_round(rec: dict, run: dict) -> None:
  """One timed round's counters into a cell's record: its seconds, its host seconds, every timed call's policy note
  (auto cells) and how many of its calls ran the plain program, over all rounds; the last round's counters."""
  rec["times"].append(run["wall"])
  rec["host"].append(run.get("host", 0.0))
  rec["notes"] += run.get("call_notes", [])
  rec["timed_calls"] += int(run.get("calls", 0))
  rec["timed_plain_calls"] += int(run.get("plain_calls", 0))
  rec["run"] = run


def alpha_mle(run: dict) -> float:
  """Per-draft acceptance α: accepted / (accepted + rejections), each draft position being a Bernoulli(α) trial until
  the first reject (a block that ends on its γ or the router's word without a reject is censored, not a failure)."""
  accepted, rejections = int(run.get("accepted", 0)), int(run.get("rejections", 0))
  if not int(run.get("drafted", 0)) or not accepted + rejections:
    return float("nan")
  return accepted / (accepted + rejections)


def summarize(cell: dict, ar_times: list[float] | None = None) -> dict:
  """Timing spread, speedup over ar (ratio of medians; spread of the per-round ratios) and decode counters."""
  times, run = cell["times"], cell["run"]
  out = dict(seconds=spread(times), tokens=int(run["tokens"]), tokens_per_second=run["tokens"] / np.median(times))
  blocks = int(run["primary_calls"]) - int(run.get("rows", 0))
  out.update(primary_calls=int(run["primary_calls"]), secondary_calls=int(run["secondary_calls"]),
             tokens_per_primary_call=run["tokens"] / max(int(run["primary_calls"]), 1))
  if int(run.get("drafted", 0)):
    out.update(acceptance_rate=int(run["accepted"]) / int(run["drafted"]), alpha=alpha_mle(run),
               drafted=int(run["drafted"]), accepted=int(run["accepted"]), blocks=blocks,
               accepted_hist=[int(x) for x in np.asarray(run["block_hist"])],
               mean_accepted_per_block=int(run["accepted"]) / max(blocks, 1),
               secondary_calls_per_block=int(run["secondary_calls"]) / max(blocks, 1))
  if ar_times is not None:
    ratios = [a / t for a, t in zip(ar_times, times)]
    out["speedup"] = float(np.median(ar_times) / np.median(times))
    out["speedup_per_round"] = spread(ratios)
  return out


def decode_cell(method: str, prompts, batch: int, gamma: int | None, *, models: dict, sampling: SamplingParams,
                max_new: int, k: int, seed: int, router=None, threshold: float | str = 0.8, policy: str = "fixed",
                costs=None) -> Callable[..., dict]:
  kw = dict(models, max_new_tokens=max_new, sampling=sampling, seed=seed, eos_id=None)
  if policy != "fixed":  # γ chosen per iteration up to ``gamma`` from the cost table (decoding.costs)
    kw.update(policy=policy, costs=costs)
  if gamma is not None:
    # Every γ <= K runs one program per method compiled for K (γ = K its own, with one verify size): a γ < K
    # block verifies γ + 1 tokens (speculative.verify_sizes), so one compile serves the whole γ sweep. The adaptive
    # router needs its cap K.
    kw.update(block_len=int(gamma), max_block_len=max(int(k), int(gamma)))
  if router is not None:
    kw.update(router=router, threshold=threshold)

  def cell(warmup: bool = False, part: int | None = None):
    if warmup:  # every batch runs the same compiled program: one compiles and warms it
      return run_batches(method, prompts[:batch], batch, **kw)
    ps = prompts if part is None else prompts[part * batch:(part + 1) * batch]  # part: one call's batch alone
    run = run_batches(method, ps, batch, **kw)
    run["rows"] = len(ps)  # the prefill counted once per row in primary_calls
    return run

  cell.parts = -(-len(prompts) // batch)  # calls per pass over the prompts
  return cell


def merge_runs(runs: list[dict]) -> dict:
  """One pass's counters from the runs of its calls (:func:`run_batches` results, in call order): sums, the per-call
  lists joined, the last cost table kept."""
  out: dict = {}
  for run in runs:
    for name, v in run.items():
      if name == "table":
        out[name] = v
      elif isinstance(v, list):
        out[name] = out.get(name, []) + v
      else:
        out[name] = out[name] + v if name in out else v
  return out


def interleaved_calls(cells: dict[str, Callable[..., dict]], rounds: int) -> dict[str, dict]:
  """Like :func:`interleaved`, interleaved call by call: each round passes over every cell's prompts once, call by
  call (``cell(part=i)``), every cell running call i before any runs call i + 1, in an order rotated by one at every
  call. A slow stretch of the machine longer than a few calls then hits every cell of a round alike, so per-round
  ratios between cells (:func:`paired`) cancel it. The cells share their prompts and batch (the same ``parts``).
  Returns per cell what :func:`interleaved` does, per round."""
  names = list(cells)
  parts = {cells[n].parts for n in names}
  if len(parts) != 1:
    raise ValueError(f"cells timed call by call must make the same calls; their calls per pass: {sorted(parts)}")
  parts = parts.pop()
  out = {n: _new_record() for n in names}
  _warm_up(cells)
  step = 0
  for _ in range(rounds):
    runs = {n: [] for n in names}
    for i in range(parts):
      for n in names[step % len(names):] + names[:step % len(names)]:
        runs[n].append(cells[n](part=i))
      step += 1
    for n in names:
      _add_round(out[n], merge_runs(runs[n]))
  return out


def median_interval(xs, level: float = 0.9) -> dict:
  """A distribution-free confidence interval of the median: the order statistics x(k) and x(n + 1 - k) with the
  largest k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``level`` (rounds that are independent draws
  of one distribution; with too few for that level, the min and max and their coverage)."""
  xs = sorted(float(x) for x in xs)
  n = len(xs)
  below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2.0 ** n  # noqa: E731  P(Binomial(n, 1/2) < k)
  k = 1
  while k + 1 <= (n + 1) // 2 and 1 - 2 * below(k + 1) >= level:
    k += 1
  return dict(lo=xs[k - 1], hi=xs[n - k], coverage=1 - 2 * below(k))


def paired(base_times: list[float], times: list[float]) -> dict:
  """How much faster a cell ran than ``base`` in the same rounds: the per-round ratios base / cell (their min,
  median, max), the median the estimate (one slow round moves it little) with its interval of at least 90%
  coverage (:func:`median_interval`), and the ratio of the summed times."""
  ratios = [b / t for b, t in zip(base_times, times)]
  return dict(ratio=float(np.median(ratios)), per_round=spread(ratios), interval=median_interval(ratios),
              pooled=float(sum(base_times) / sum(times)), rounds=len(ratios))


# -- per-call costs ---------------------------------------------------------------------------------------------
def auto_calls(cell: dict) -> dict:
  """What an ``auto`` cell's calls did (an :func:`interleaved` result): the last round's calls, how many ran the plain
  program, their wall times and policy notes, the γ chosen per iteration, over every timed round how many probed
  (speculated on a record below 1x) and the last probe's reason, and the cost table the last call read (its loop's
  calibration, break-even acceptance and acceptance prior: what the γ choices followed)."""
  run = cell["run"]
  return dict(calls=int(run["calls"]), plain_calls=int(run["plain_calls"]),
              gamma_hist=np.asarray(run["gamma_hist"]).tolist(),
              call_walls=run["call_walls"],  # the last round's calls, (seconds, ran the plain program) each
              call_notes=run["call_notes"],  # their policy notes, in call_walls' order
              timed_calls=int(cell.get("timed_calls", 0)),  # every timed round's calls, and of them on the plain
              timed_plain_calls=int(cell.get("timed_plain_calls", 0)),  # program: all of them = ar's program alone
              probes=sum(n.startswith("probing") for n in cell["notes"]),
              last_probe=next((n for n in reversed(cell["notes"]) if n.startswith("probing")), ""),
              table=run.get("table"))  # the cost table its last call read (None: no auto call)


def table_line(t: dict) -> str:
  """An auto cell's cost table in words: the loop's iteration costs per γ, the plain step, the break-even acceptance
  of one draft and the acceptance prior the call started from."""
  it = t["iteration_ms"]
  return (f"iteration ms for γ = 0..{len(it) - 1} " + " / ".join(f"{x:.2f}" for x in it)
          + f", plain step {t['plain_ms']:.2f} ms, break-even acceptance {t['break_even_alpha']:.3f}, "
          f"prior α of the last call {t['prior_alpha']:.3f}")


def auto_row(res: dict, ar_times: list[float], best_fixed: str | None, gamma_max: int) -> dict:
  """Table 2's ``auto`` cell: its summary, what its calls did (:func:`auto_calls`) beside ar's calls of the last
  round, and its ratio to the best fixed γ's cell (None: no fixed γ timed, no ratio)."""
  row = dict(summarize(res["auto"], ar_times), gamma_max=gamma_max, **auto_calls(res["auto"]),
             ar_call_walls=[w for w, _ in res["ar"]["run"]["call_walls"]])
  if best_fixed is not None:
    row["vs_best_fixed"] = float(np.median(res[best_fixed]["times"]) / np.median(res["auto"]["times"]))
  return row


def table2_setting(prompts, batch: int, gammas, common: dict, repeats: int, *, primary, drafter, tandem,
                   auto: bool = True, auto_costs=None) -> tuple[dict, dict]:
  """One setting (sampling, batch) of Table 2, timed interleaved: ``ar``, ``speed`` and ``tandem_speed`` at every
  γ, and with ``auto`` the auto policy (γ up to ``common["k"]``; ``auto_costs``: its cost table, None to calibrate).
  Returns (cells, row): the cells for re-timing elsewhere (Table 4) and the row of summaries."""
  gammas = [int(g) for g in gammas]
  cells = {"ar": decode_cell("ar", prompts, batch, None, models=dict(primary=primary), **common)}
  for g in gammas:
    cells[f"speed@{g}"] = decode_cell("speed", prompts, batch, g, models=dict(primary=primary, drafter=drafter),
                                      **common)
    cells[f"tandem_speed@{g}"] = decode_cell("tandem_speed", prompts, batch, g, models=dict(tandem=tandem), **common)
  if auto:
    cells["auto"] = decode_cell("tandem_speed", prompts, batch, int(common["k"]), models=dict(tandem=tandem),
                                policy="auto", costs=auto_costs, **common)
    # ar's own program timed as a second cell: the ratio two cells that cannot differ show in this run (what an auto
    # cell running the plain program measures, ar's executable, is judged against it)
    cells["ar_again"] = decode_cell("ar", prompts, batch, None, models=dict(primary=primary), **common)
  res = interleaved(cells, repeats)
  ar_times = res["ar"]["times"]
  row = {"ar": summarize(res["ar"]), "prompts": len(prompts), "batch": batch,
         "temperature": float(common["sampling"].temperature)}
  for m in ("speed", "tandem_speed"):
    row[m] = {g: summarize(res[f"{m}@{g}"], ar_times) for g in gammas}
  row["best_gamma"] = {m: max(gammas, key=lambda g, m=m: row[m][g]["speedup"]) for m in ("speed", "tandem_speed")}
  if auto:
    row["auto"] = auto_row(res, ar_times, f"tandem_speed@{row['best_gamma']['tandem_speed']}", int(common["k"]))
    row["ar_again"] = summarize(res["ar_again"], ar_times)
  return cells, row


def auto_setting(prompts, batch: int, common: dict, repeats: int, *, primary, tandem) -> dict:
  """A setting timed for the ``auto`` policy alone, at a batch Table 2's γ sweep does not cover: ``ar``, ``auto``
  (γ up to ``common["k"]``, calibrating on its own program) and ``ar`` again (the A/A cell), interleaved."""
  k = int(common["k"])
  cells = {"ar": decode_cell("ar", prompts, batch, None, models=dict(primary=primary), **common),
           "auto": decode_cell("tandem_speed", prompts, batch, k, models=dict(tandem=tandem), policy="auto",
                               costs=None, **common),
           "ar_again": decode_cell("ar", prompts, batch, None, models=dict(primary=primary), **common)}
  res = interleaved(cells, repeats)
  ar_times = res["ar"]["times"]
  return {"ar": summarize(res["ar"]), "prompts": len(prompts), "batch": batch,
          "temperature": float(common["sampling"].temperature), "auto": auto_row(res, ar_times, None, k),
          "ar_again": summarize(res["ar_again"], ar_times)}


def tune_threshold(cell_for, thresholds, tune_prompts, repeats: int) -> dict:
  """Table 4's τ, chosen on held-out validation prompts (not the timed ones): the adaptive decoder is timed at
  every τ of ``thresholds`` (τ is traced: one compiled program) and the fastest median wins.

  ``cell_for(tau, prompts)`` builds the adaptive decode cell. Returns {"chosen", "seconds": {τ: median}, "prompts"}.
  """
  taus = [float(t) for t in thresholds]
  res = interleaved({t: cell_for(t, tune_prompts) for t in taus}, repeats)
  med = {t: float(np.median(res[t]["times"])) for t in taus}
  return dict(chosen=min(taus, key=lambda t: med[t]), seconds=med, prompts=len(tune_prompts))


def cost_table(primary_ms: dict, drafter_ms: dict, k: int):
  """The decode loop's :class:`~tandem_jax.decoding.costs.CostTable` from this module's per-call table (medians):
  ``primary_ms`` {size: spread} for sizes 1..k+1, ``drafter_ms`` {1: spread}."""
  from tandem_jax.decoding.costs import cost_table as make
  return make([primary_ms[s]["median"] for s in range(1, k + 2)], drafter_ms[1]["median"])


def call_costs(models: dict, batches, k_max: int, *, capacity: int, fill: int, calls: int, repeats: int) -> dict:
  """{batch: {"primary": {k: ms}, "drafter": {1: ms, 2: ms}, "mid": {1: ms}}} measured interleaved by model."""
  out = {}
  for b in batches:
    row = {"primary": {}, "drafter": {}, "mid": {}}
    for k in range(1, k_max + 2):
      row["primary"][k] = call_ms(models["primary"], b, k, capacity=capacity, fill=fill, calls=calls,
                                  repeats=repeats)
      if k <= 2:
        row["drafter"][k] = call_ms(models["drafter"], b, k, capacity=capacity, fill=fill, calls=calls,
                                    repeats=repeats)
      if k == 1:
        row["mid"][k] = call_ms(models["mid"], b, k, capacity=capacity, fill=fill, calls=calls, repeats=repeats)
    out[b] = row
  return out

