"""Estimates for a TPU from a deviceless compile: chip facts, the HBM-fit check, step time from XLA's cost model,
and the Tandem + SPEED speedup projected from the compiled per-call costs (Leviathan's formula).

No libtpu needed, so the arithmetic is tested on any machine; :mod:`tandem_jax.aot` feeds it the numbers XLA's cost
model gives for a deviceless compile. Everything here is an estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable

import jax

from tandem_jax.decoding.costs import expected_block_tokens, leviathan_speedup

GIB = 1024 ** 3
LABEL = "XLA cost-model estimate from a deviceless compile, not a TPU measurement"


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int         # per chip
  peak_bf16_flops: float  # per chip, dense
  hbm_bandwidth: float    # bytes/s per chip (roofline fallback when XLA gives no time estimate)


# Public Cloud TPU spec sheets (per chip).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}


def chip_of(topology: str, hbm_gib: float | None = None) -> Chip:
  """The chip of a topology name such as ``v5e:4x4``; ``hbm_gib`` overrides its capacity (tests, what-ifs)."""
  kind = topology.split(":", 1)[0].strip().lower()
  if kind not in CHIPS:
    raise ValueError(f"unknown TPU generation {kind!r} in topology {topology!r}; choose one of {sorted(CHIPS)} "
                     f"(e.g. v5e:4x4)")
  chip = CHIPS[kind]
  if hbm_gib is not None:
    chip = dataclasses.replace(chip, hbm_bytes=int(hbm_gib * GIB))
  return chip


def memory_per_device(stats) -> dict[str, int]:
  """Per-device bytes from ``compiled.memory_analysis()``; donated (aliased) arguments are counted once."""
  arg, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
  alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
  code = int(stats.generated_code_size_in_bytes)
  return dict(arguments=arg, outputs=out, aliased=alias, temporaries=temp, code=code,
              total=arg + out - alias + temp + code)


def fit_message(name: str, total: int, chip: Chip) -> str | None:
  """None when ``total`` bytes per device fit the chip's HBM, else a message naming the shortfall."""
  if total <= chip.hbm_bytes:
    return None
  return (f"{name} needs {total / GIB:.2f} GiB of HBM per device but a {chip.name} chip has "
          f"{chip.hbm_bytes / GIB:.2f} GiB: short by {(total - chip.hbm_bytes) / GIB:.2f} GiB. Use a larger "
          f"topology, a smaller batch (config.train.batch_size / --decode_batch) or more sharding (config.mesh).")


def estimated_seconds(cost: dict, chip: Chip) -> tuple[float, str]:
  """(seconds, source): XLA's ``optimal_seconds`` when present, else the per-device roofline."""
  t = cost.get("optimal_seconds")
  if t is not None and t > 0:
    return float(t), "xla_optimal_seconds"
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  return max(flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth), "roofline"


# -- how far from the roofline ---------------------------------------------------------------------------------------
def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of (abstract) arrays: each leaf's shard (its ``sharding``), or all of it."""
  total = 0
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    total += math.prod(int(d) for d in shape) * x.dtype.itemsize
  return total


def decode_roofline(bytes_accessed: float, seconds: float, weight_bytes: int, cache_bytes: int, chip: Chip,
                    hbm_bytes: float | None = None) -> dict:
  """A decode call against its floor: it must read its model's weights once (in their serving dtype) and its KV
  cache once, per device. minimum bytes = weight_bytes + cache_bytes (per device); roofline seconds = minimum bytes /
  the chip's HBM bandwidth. Returns both and the ratios of XLA's estimates to them (1.0: on the roofline);
  with ``hbm_bytes`` (the program's HBM traffic, aot.hbm_traffic) also its ratio and time at the bandwidth."""
  minimum = weight_bytes + cache_bytes
  roof = minimum / chip.hbm_bandwidth
  out = dict(min_bytes=minimum, weight_bytes=weight_bytes, cache_bytes=cache_bytes, roofline_ms=roof * 1e3,
             bytes_over_min=bytes_accessed / minimum, ms_over_roofline=seconds / roof)
  if hbm_bytes is not None:
    out.update(hbm_over_min=hbm_bytes / minimum, hbm_ms=hbm_bytes / chip.hbm_bandwidth * 1e3)
  return out


def useful_train_flops(tokens: int, trainable_params: int, frozen_params: int, attention) -> float:
  """Model FLOPs of one training step, without rematerialisation's recompute (the MFU convention of PaLM, App. B):

    useful = tokens * (6 N_trained + 2 N_frozen + sum_models a * L * H * Q * T)

  N_trained / N_frozen: parameters that get gradients / that only run forward (a frozen primary); every parameter
  counts as a matmul weight (the presets tie embeddings, so the table is the vocab x d output matmul; norms and
  biases are noise). Attention per model: L layers, H query heads of size Q, T keys per query (the full sequence,
  as PaLM counts it, not the causal half); a = 12 for a trained model (2 matmuls x 2 FLOPs forward, x3 with the
  backward), 4 for a forward-only one. ``attention``: [(L, H, Q, T, trained)].
  """
  attn = sum((12 if trained else 4) * layers * heads * head_dim * keys
             for layers, heads, head_dim, keys, trained in attention)
  return float(tokens) * (6 * trainable_params + 2 * frozen_params + attn)


# -- the speedup projection: Leviathan et al. (2211.17192) §3, PAPER_NOTES §2.2 ---------------------------------------
def block_seconds(step_s: float, block_s: float, max_block_len: int, gamma: int) -> float:
  """A (γ+1)-token primary call, interpolated linearly in tokens between the compiled 1- and (K+1)-token calls."""
  if max_block_len <= 0:
    return step_s
  frac = min(gamma, max_block_len) / max_block_len
  return step_s + frac * (block_s - step_s)


def project_speedup(alpha: float, gammas: Iterable[int], *, primary_step_s: float, primary_block_s: float,
                    max_block_len: int, secondary_step_s: float, commit_s: float = 0.0) -> list[dict[str, float]]:
  """Per γ: Leviathan's formula with c = secondary step / primary step, and the same projection with the
  compiled costs of the block call (γ+1 tokens) and Tandem's commit of the verified block.

  ms per generated token = (γ·secondary step + block call + commit) / E[tokens]; speedup is against the
  primary's 1-token step (autoregressive decoding, one token per call).
  """
  c = secondary_step_s / primary_step_s
  rows = []
  for g in gammas:
    e = expected_block_tokens(alpha, g)
    block = block_seconds(primary_step_s, primary_block_s, max_block_len, g)
    per_block = g * secondary_step_s + block + commit_s
    rows.append(dict(gamma=g, alpha=alpha, c=c, expected_tokens=e, leviathan_speedup=leviathan_speedup(alpha, g, c),
                     block_call_ms=block * 1e3, ms_per_token=per_block / e * 1e3,
                     ar_ms_per_token=primary_step_s * 1e3, projected_speedup=primary_step_s * e / per_block))
  return rows


def projection(programs: dict, alpha: float, where: str, max_block_len: int) -> dict:
  """The report's projected Tandem + SPEED speedup per γ in 1..K from the compiled per-call programs' estimated
  seconds (``programs[name]["seconds"]`` for primary_step, primary_block, secondary_step, tandem_commit)."""
  step = programs["primary_step"]["seconds"]
  return dict(
      label="projection from XLA's cost model (deviceless compile) and the given acceptance rate, not a TPU "
            "measurement",
      acceptance=alpha, acceptance_source=where,
      rows=project_speedup(alpha, range(1, max_block_len + 1), primary_step_s=step,
                           primary_block_s=programs["primary_block"]["seconds"], max_block_len=max_block_len,
                           secondary_step_s=programs["secondary_step"]["seconds"],
                           commit_s=programs["tandem_commit"]["seconds"]))


def projection_lines(pr: dict) -> list[str]:
  """:func:`projection`'s result as a markdown table (with its heading line)."""
  lines = ["", f"Projected Tandem + SPEED speedup ({pr['label']}; α = {pr['acceptance']:.3f} from "
               f"{pr['acceptance_source']}):", "",
           "| γ | E[tokens/call] | Leviathan (1-α^{γ+1})/((1-α)(γc+1)) | block call ms | ms/token | "
           "projected speedup vs AR |", "|---|---|---|---|---|---|"]
  for row in pr["rows"]:
    lines.append(f"| {row['gamma']} | {row['expected_tokens']:.2f} | {row['leviathan_speedup']:.2f}x | "
                 f"{row['block_call_ms']:.3f} | {row['ms_per_token']:.3f} | {row['projected_speedup']:.2f}x |")
  return lines


def load_acceptance(spec: str) -> tuple[float, str]:
  """``0.75`` or a JSON file (e.g. a benchmark's results.json) holding ``acceptance_rate`` values.

  From a file the mean of every ``acceptance_rate`` under a key path containing ``tandem_speed`` is used (all
  of them if none is), with a description of where it came from.
  """
  try:
    alpha = float(spec)
  except ValueError:
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
      raise ValueError(f"--acceptance must be a number in (0, 1) or a results.json path; {spec!r} is neither")
    with open(path) as f:
      found = list(_find(json.load(f), "acceptance_rate", ()))
    found = [(p, float(v)) for p, v in found if isinstance(v, (int, float)) and v == v]
    if not found:
      raise ValueError(f"{path}: no numeric 'acceptance_rate' entry found")
    chosen = [(p, v) for p, v in found if any("tandem_speed" in str(k) for k in p)] or found
    alpha = sum(v for _, v in chosen) / len(chosen)
    where = f"mean of {len(chosen)} acceptance_rate value(s) in {path}"
  else:
    where = "--acceptance"
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"acceptance rate must be in (0, 1], got {alpha}")
  return alpha, where


def _find(obj: Any, key: str, path: tuple):
  if isinstance(obj, dict):
    for k, v in obj.items():
      if k == key:
        yield path + (k,), v
      yield from _find(v, key, path + (k,))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      # A list of records: a record's "method" field names it in the path.
      tag = v.get("method", i) if isinstance(v, dict) else i
      yield from _find(v, key, path + (tag,))
