"""Compile for a Cloud TPU topology on a machine without one, and report HBM fit and XLA's cost estimates.

  pip install -e ".[tpu]"   # jax[tpu]: libtpu compiles for TPU topologies with no TPU attached
  python -m tandem_jax.aot --config=configs/tandem.py:v5e16 --topology=v5e:4x4 [--json] [--acceptance=0.75]
  python -m tandem_jax.aot --report=/tmp/aot_presets/tandem_v5e16.json   # reprint a saved JSON report

Programs compiled on the topology's mesh (``config.mesh``, its -1 filled with the chip count) for training, and on
the decode mesh (``config.serving.mesh_shape`` or ``--decode_mesh_shape``; the training mesh when neither is set)
with the serving weights (``config.serving.dtype``: cast once at load, see :func:`bundle.serving_config`) for
decoding:
- ``train_step``: the configured stage's jitted step with its abstract, sharded train state, with its MFU counted
  from XLA's FLOPs (remat recompute included) and from useful FLOPs (:func:`useful_train_flops`);
- ``decode_ar``, ``decode_tandem_speed``, ``decode_tandem_speed_adaptive`` (with a router): whole generate
  programs (prefill + ``lax.while_loop``), for their memory; XLA's cost model counts a loop body once, so their
  time comes from the per-call programs below;
- ``primary_step`` (1 token), ``primary_block`` (K+1 tokens with hidden states: Tandem + SPEED's verify call),
  ``secondary_step`` (one Tandem secondary draft step) and ``tandem_commit`` (projecting a verified block into the
  secondary's cache), each one call with a full KV cache, so per-call costs are explicit. Each is set against its
  HBM roofline (:func:`tandem_jax.tpu_estimates.decode_roofline`: its model's weights and KV cache read once) and
  its weight-sized converts and all-gathers are counted (:func:`loop_weight_ops`; a serving layout has none).

Scanned layers (``scan_layers``, what the TPU presets use): XLA's cost analysis counts a ``lax.scan`` body once
(jax-ml/jax#18672), so for those models FLOPs, bytes and estimated time come from the same program compiled with
unrolled layers at depths (1, 1), (2, 1) and (1, 2) (primary, secondary), extrapolated linearly to the real depths
(every layer is the same computation on the same shapes); memory always comes from the real, scanned program.

Every number is an XLA cost-model estimate from a deviceless compile, not a TPU measurement. A program that does
not fit the chip's HBM makes the command fail (exit code 2) with a message naming the shortfall.

This module compiles and reports; the abstract meshes, models and caches it compiles against come from
:mod:`tandem_jax.topology`, the chip facts, HBM fit, time and speedup estimates from :mod:`tandem_jax.tpu_estimates`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import types

# This machine compiles for TPU through libtpu's topology API; the runtime backend stays the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling never touches a chip, so it need not hold libtpu's single-process lock (/tmp/libtpu_lockfile), which
# another JAX process on the machine may hold.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp
from flax import nnx

from tandem_jax import sharding
from tandem_jax import tpu_estimates as tp
from tandem_jax.hlo_reading import hbm_traffic, loop_weight_ops
from tandem_jax.decoding import api
from tandem_jax.models import bundle as bundle_lib
from tandem_jax.models.router import Router
from tandem_jax.models.tandem import TandemLM
from tandem_jax.topology import (abstract_array, abstract_cache, abstract_module, depth_variant, topology_mesh,
                                 with_placeholder_inits)
from tandem_jax.training import program as program_lib
from tandem_jax.training.validate import validate

DECODE_PROGRAMS = ("decode_ar", "decode_tandem_speed", "decode_tandem_speed_adaptive")
CALL_PROGRAMS = ("primary_step", "primary_block", "secondary_step", "tandem_commit")
# Whose weights and KV cache bound a call from below (tandem_commit reads only the projection and the secondary's
# key/value weights of the secondary: its floor is an upper bound of the true one).
CALL_MODELS = {"primary_step": "primary", "primary_block": "primary", "secondary_step": "secondary",
               "tandem_commit": "secondary"}
GROUPS = ("train", "decode", "calls")


class DoesNotFit(SystemExit):
  """Raised (exit code 2) when a compiled program needs more HBM per device than the chip has."""

  def __init__(self, messages):
    self.messages = list(messages)
    super().__init__(2)

  def __str__(self):
    return "\n".join(self.messages)


# -- compiling and measuring ------------------------------------------------------------------------------------------
_COST_KEYS = ("flops", "bytes accessed", "optimal_seconds")


def _cost_of(compiled) -> dict:
  """XLA's cost analysis of ``compiled`` plus "hbm bytes", the HBM traffic read from its HLO (:func:`hbm_traffic`),
  and "hbm by scope", that traffic per model part (hlo_reading.scope_of)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA reports a negative optimal_seconds (e.g. -3.0) where its time model gave up: no estimate, not a time.
  out = {k: float(cost[k]) for k in _COST_KEYS
         if cost.get(k) is not None and (k != "optimal_seconds" or float(cost[k]) > 0)}
  hbm = hbm_traffic(compiled.as_text())
  out["hbm bytes"] = float(hbm["bytes"])
  out["hbm by scope"] = {k: float(v) for k, v in hbm["by_scope"].items()}
  return out


def extrapolated_cost(lower_at) -> dict:
  """Cost of a program at the real depths (L_P, L_S) from ``lower_at(l_p, l_s)`` compiled unrolled at small depths.

  cost(L_P, L_S) = c(1,1) + (L_P - 1) (c(2,1) - c(1,1)) + (L_S - 1) (c(1,2) - c(1,1)); ``lower_at`` returns
  (lowered program, L_P, L_S) where the last two are the real depths. Dict-valued entries (per scope) are
  extrapolated key by key (a key missing from a compile counts 0).
  """
  c11, lp, ls = lower_at(1, 1)
  c11 = _cost_of(c11.compile())
  c21 = _cost_of(lower_at(2, 1)[0].compile())
  c12 = _cost_of(lower_at(1, 2)[0].compile())

  def line(a, b, c):
    return a + (lp - 1) * (b - a) + (ls - 1) * (c - a)

  out = {}
  for k in c11:
    if k not in c21 or k not in c12:
      continue
    if isinstance(c11[k], dict):
      keys = set(c11[k]) | set(c21[k]) | set(c12[k])
      out[k] = {s: line(c11[k].get(s, 0.0), c21[k].get(s, 0.0), c12[k].get(s, 0.0)) for s in keys}
    else:
      out[k] = line(c11[k], c21[k], c12[k])
  return out


def analyse(name: str, lowered, chip: tp.Chip, with_cost: bool = True, cost_lower_at=None,
            weight_sizes=None) -> dict:
  """Compiles ``lowered`` and returns its per-device memory and cost figures (or the compiler's OOM message).

  ``cost_lower_at`` (scanned models): costs by :func:`extrapolated_cost` instead of from ``lowered`` itself.
  ``weight_sizes`` (a per-call decode program): also counts the weight-sized converts and all-gathers it runs
  (:func:`loop_weight_ops` over the whole program), which a serving layout should have none of.
  """
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XLA reports HBM exhaustion as a compile error
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower():
      return dict(name=name, fits=False, error=f"{name}: the TPU compiler ran out of HBM: {msg.splitlines()[0]}")
    raise
  rec = dict(name=name, compile_seconds=time.perf_counter() - t0)
  mem = tp.memory_per_device(compiled.memory_analysis())
  rec["memory"] = mem
  problem = tp.fit_message(name, mem["total"], chip)
  rec["fits"] = problem is None
  if problem:
    rec["error"] = problem
  if weight_sizes:
    ops = loop_weight_ops(compiled.as_text(), weight_sizes, whole_program=True)
    rec.update(weight_ops_per_call=len(ops), weight_ops=ops[:8])
  if with_cost:
    t1 = time.perf_counter()
    cost = extrapolated_cost(cost_lower_at) if cost_lower_at else _cost_of(compiled)
    seconds, source = tp.estimated_seconds(cost, chip)
    rec.update(flops=cost.get("flops", 0.0), bytes_accessed=cost.get("bytes accessed", 0.0),
               hbm_bytes=cost.get("hbm bytes", 0.0), hbm_by_scope=cost.get("hbm by scope", {}),
               xla_optimal_seconds=cost.get("optimal_seconds"), seconds=seconds, seconds_source=source,
               cost_source="depth-extrapolated from unrolled 1-2 layer compiles" if cost_lower_at
               else "this program", cost_compile_seconds=time.perf_counter() - t1)
  return rec


# Weight matrices smaller than this are not looked for in the compiled programs: converting one costs nothing and
# their element counts collide with small activations' (a [1, 1, 32] state and a [16, 2] weight).
MIN_WEIGHT_ELEMENTS = 256


def weight_elements(module, min_rank: int = 2, min_elements: int = 0) -> set[int]:
  """Element counts of ``module``'s weight matrices (rank >= ``min_rank``), whole and per device (its shardings),
  and of one layer's slice of a stacked (scan_layers) weight."""
  sizes = set()
  for x in jax.tree.leaves(nnx.state(module)):
    if len(x.shape) < min_rank:
      continue
    sharding_ = getattr(x, "sharding", None)
    shapes = [tuple(x.shape)] + ([tuple(sharding_.shard_shape(x.shape))] if sharding_ is not None else [])
    for shape in shapes:
      sizes.add(math.prod(shape))
      if len(shape) > min_rank:
        sizes.add(math.prod(shape[1:]))
  return {n for n in sizes if n >= min_elements}


def useful_train_flops(config) -> float:
  """Model FLOPs of one train step of ``config`` (:func:`tandem_jax.tpu_estimates.useful_train_flops`): its
  bundle's trainable and frozen parameters, and the attention of the models the stage runs (trained: the primary
  in stage "primary", the secondary in the stages that train it)."""
  _, trainable, frozen = bundle_lib.abstract_bundle(config)
  count = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))  # noqa: E731
  pcfg, scfg, _ = bundle_lib.model_configs(config)
  stage, spec = config.stage, bundle_lib.spec(config.stage)
  keys = int(config.data.seq_len) - 1
  attention = []
  if spec.uses_primary and stage != "secondary":
    attention.append((pcfg.num_layers, pcfg.num_heads, pcfg.head_dim, keys, stage == "primary"))
  if spec.uses_secondary and stage != "primary":
    attention.append((scfg.num_layers, scfg.num_heads, scfg.head_dim, keys, stage != "router"))
  tokens = int(config.train.batch_size) * keys
  return tp.useful_train_flops(tokens, count(trainable), count(frozen), attention)


def lower_train(config, mesh):
  program = program_lib.build_train_program(config, mesh)
  return program.step.lower(program.abstract_state, program.batch_spec, program.rng_spec)


def _call_lowered(module, method_fn, args, mesh, rules, donate=()):
  """Lowers ``method_fn(module, *args)`` as one jitted call with the module's weights as an argument."""
  graphdef, state = nnx.split(module)

  def call(state, *a):
    return method_fn(nnx.merge(graphdef, state), *a)

  with jax.set_mesh(mesh), sharding.use_rules(rules):
    return jax.jit(call, donate_argnums=tuple(d + 1 for d in donate)).lower(state, *args)


def lower_calls(tandem, *, batch, capacity, max_block_len, mesh, rules) -> dict:
  """The four per-call programs of Tandem + SPEED decoding (see the module docstring)."""
  pcfg, scfg = tandem.primary.cfg, tandem.secondary.cfg
  tok = lambda t: abstract_array((batch, t), jnp.int32, ("batch", None), mesh, rules)  # noqa: E731
  k1 = max_block_len + 1
  pcache, scache = (abstract_cache(c, batch, capacity, mesh, rules) for c in (pcfg, scfg))
  hidden = abstract_array((pcfg.num_layers + 1, batch, k1, pcfg.d_model), jnp.dtype(pcfg.dtype),
                          (None, "batch", None, "act_embed"), mesh, rules)
  rows = abstract_array((batch,), jnp.int32, ("batch",), mesh, rules)
  return {
      "primary_step": _call_lowered(tandem.primary, lambda m, t, c: m.extend(t, c)[::2], (tok(1), pcache),
                                    mesh, rules, donate=(1,)),
      "primary_block": _call_lowered(tandem.primary, lambda m, t, c: m.extend(t, c, return_hidden=True),
                                     (tok(k1), pcache), mesh, rules, donate=(1,)),
      "secondary_step": _call_lowered(tandem, lambda m, t, c: m.secondary_step(t, c)[::2], (tok(1), scache),
                                      mesh, rules, donate=(1,)),
      "tandem_commit": _call_lowered(tandem, lambda m, c, h, s, n: m.commit(c, h, s, n),
                                     (scache, hidden, rows, rows), mesh, rules, donate=(0,)),
  }


def lower_decode(tandem, router, *, batch, prompt_len, max_new_tokens, max_block_len, mesh, rules,
                 names=DECODE_PROGRAMS):
  """The whole generate programs named in ``names`` (from DECODE_PROGRAMS), lowered lazily in that order."""
  kw = dict(batch_size=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens, max_block_len=max_block_len,
            mesh=mesh, rules=rules)
  programs = {"decode_ar": ("ar", {"primary": tandem.primary}),
              "decode_tandem_speed": ("tandem_speed", {"tandem": tandem}),
              "decode_tandem_speed_adaptive": ("tandem_speed", {"tandem": tandem, "router": router})}
  for name in names:
    method, models = programs[name]
    yield name, api.lower(method, models, **kw)


def run(config, topology: str, *, decode_batch: int = 0, prompt_len: int = 128, max_new_tokens: int = 128,
        block_len: int = 8, groups=GROUPS, hbm_gib: float | None = None, acceptance: str | None = None,
        decode_programs=DECODE_PROGRAMS, decode_mesh_shape=None, check_depth: bool = False,
        log=logging.info) -> dict:
  """Compiles the selected program groups of ``config`` for ``topology``; returns the report (see :func:`main`).

  ``check_depth`` (scanned models): also compiles each per-call program unrolled at the real depths and records
  its own cost (``unrolled``) beside the depth-extrapolated one, to check the extrapolation.
  Raises ConfigError for a bad config and ValueError for bad arguments before compiling anything.
  """
  bad = [g for g in groups if g not in GROUPS]
  if bad:
    raise ValueError(f"--programs: unknown group(s) {bad}; choose from {GROUPS}")
  bad = [p for p in decode_programs if p not in DECODE_PROGRAMS]
  if bad:
    raise ValueError(f"unknown decode program(s) {bad}; choose from {DECODE_PROGRAMS}")
  if block_len < 1 or prompt_len < 1 or max_new_tokens < 1:
    raise ValueError("--block_len, --prompt_len and --max_new_tokens must be >= 1")
  alpha = tp.load_acceptance(acceptance) if acceptance else None
  chip = tp.chip_of(topology, hbm_gib)
  mesh = topology_mesh(topology, config.mesh)
  n = mesh.devices.size
  validate(with_placeholder_inits(config), num_devices=n, check_workdirs=False)
  rules = sharding.rules_of(config)
  # Decoding uses its own layout (config.serving.mesh_shape, or --decode_mesh_shape): model-parallel instead of
  # FSDP, which would all-gather every weight on every decode call.
  dmesh_cfg = (types.SimpleNamespace(shape=tuple(decode_mesh_shape), axes=config.mesh.axes) if decode_mesh_shape
               else bundle_lib.decode_mesh_config(config))
  dmesh = mesh if dmesh_cfg is config.mesh else topology_mesh(topology, dmesh_cfg)
  # ... and its own weights: cast once at load to config.serving.dtype (bundle.serving_config).
  serving = bundle_lib.serving_config(config)
  shape = dict(dmesh.shape)
  shards = sharding.batch_shards(rules, shape)
  batch = decode_batch or shards
  if batch % shards:
    raise ValueError(f"--decode_batch {batch} must be a multiple of the {shards} batch shards of the decode mesh "
                     f"{shape}")
  capacity = api.buffer_sizes(prompt_len, max_new_tokens, block_len)[2]
  pcfg, scfg, tcfg = bundle_lib.model_configs(serving)
  if capacity > min(pcfg.max_seq_len, scfg.max_seq_len):
    raise ValueError(f"--prompt_len {prompt_len} + --max_new_tokens {max_new_tokens} (+ block slack, padded to "
                     f"{capacity}) exceeds the models' max_seq_len {min(pcfg.max_seq_len, scfg.max_seq_len)}")

  report = dict(label=tp.LABEL, config=f"{config.stage}:{config.preset}", topology=topology, chips=n,
                libtpu_init_args=os.environ.get("LIBTPU_INIT_ARGS", ""),
                mesh=dict(mesh.shape), decode_mesh=dict(dmesh.shape),
                serving_dtype=bundle_lib.serving_dtype(config) or "training dtypes", chip=dict(name=chip.name, hbm_gib=chip.hbm_bytes / tp.GIB,
                                                 peak_bf16_tflops=chip.peak_bf16_flops / 1e12),
                params=dict(primary=pcfg.num_params, secondary=scfg.num_params),
                decode=dict(batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                            max_block_len=block_len, cache_capacity=capacity),
                programs={})

  scanned = pcfg.scan_layers or scfg.scan_layers

  def add(name, lowered, with_cost=True, cost_lower_at=None, weight_sizes=None):
    rec = analyse(name, lowered, chip, with_cost, cost_lower_at if scanned else None, weight_sizes)
    report["programs"][name] = rec
    log("compiled %s in %.1fs", name, rec.get("compile_seconds", 0.0))
    return rec

  if "train" in groups:
    rec = add("train_step", lower_train(config, mesh),
              cost_lower_at=lambda lp, ls: (lower_train(depth_variant(config, lp, ls), mesh), pcfg.num_layers,
                                            scfg.num_layers))
    if "seconds" in rec:
      tokens = int(config.train.batch_size) * (int(config.data.seq_len) - 1)
      rec["mfu"] = rec["flops"] / (rec["seconds"] * chip.peak_bf16_flops)
      # per device: the step's model FLOPs are spread over every chip of the training mesh
      rec["useful_flops"] = useful_train_flops(config) / n
      rec["mfu_useful"] = rec["useful_flops"] / (rec["seconds"] * chip.peak_bf16_flops)
      # the same with the step's time from its HBM traffic (hbm_traffic, loops counted per iteration) and the larger
      # of the two FLOP counts: XLA's cost model counts a while body once (blockwise attention's key-block loop; with
      # windowed einsums on, the FSDP matmuls' loops)
      rec["hbm_seconds"] = max(max(rec["flops"], rec["useful_flops"]) / chip.peak_bf16_flops,
                               rec["hbm_bytes"] / chip.hbm_bandwidth)
      rec["mfu_useful_hbm"] = rec["useful_flops"] / (rec["hbm_seconds"] * chip.peak_bf16_flops)
      rec["step_ms"] = rec["seconds"] * 1e3
      rec["tokens_per_second"] = tokens / rec["seconds"]
  if "decode" in groups or "calls" in groups:
    tandem = abstract_module(lambda r: TandemLM(pcfg, scfg, tcfg, r), dmesh, rules)
  if "decode" in groups:
    router = abstract_module(lambda r: Router(scfg.d_model, config.router.top_k, config.router.hidden, rngs=r),
                             dmesh, rules)
    for name, lowered in lower_decode(tandem, router, batch=batch, prompt_len=prompt_len,
                                      max_new_tokens=max_new_tokens, max_block_len=block_len, mesh=dmesh,
                                      rules=rules, names=decode_programs):
      add(name, lowered, with_cost=False)
  if "calls" in groups:
    call_kw = dict(batch=batch, capacity=capacity, max_block_len=block_len, mesh=dmesh, rules=rules)

    def call_at(name):
      def lower_at(lp, ls):
        p, s_, t = bundle_lib.model_configs(depth_variant(serving, lp, ls))
        small = abstract_module(lambda r: TandemLM(p, s_, t, r), dmesh, rules)
        return lower_calls(small, **call_kw)[name], pcfg.num_layers, scfg.num_layers
      return lower_at

    # A call's floor: its model's weights and its KV cache, each read once (per device, in the serving dtype).
    primary_w = tp.bytes_per_device(nnx.state(tandem.primary))
    secondary_w = tp.bytes_per_device(nnx.state(tandem)) - primary_w  # + the projection
    floors = {"primary": (primary_w, tp.bytes_per_device(abstract_cache(pcfg, batch, capacity, dmesh, rules))),
              "secondary": (secondary_w, tp.bytes_per_device(abstract_cache(scfg, batch, capacity, dmesh, rules)))}
    sizes = weight_elements(tandem, min_elements=MIN_WEIGHT_ELEMENTS)
    for name, lowered in lower_calls(tandem, **call_kw).items():
      rec = add(name, lowered, cost_lower_at=call_at(name), weight_sizes=sizes)
      if "seconds" in rec:
        rec["ms_per_call"] = rec["seconds"] * 1e3
        rec["roofline"] = tp.decode_roofline(rec["bytes_accessed"], rec["seconds"],
                                             *floors[CALL_MODELS[name]], chip, hbm_bytes=rec["hbm_bytes"])
      if check_depth and scanned and "seconds" in rec:
        full = _cost_of(call_at(name)(pcfg.num_layers, scfg.num_layers)[0].compile())
        rec["unrolled"] = dict(bytes_accessed=full.get("bytes accessed", 0.0), flops=full.get("flops", 0.0),
                               bytes_over_min=full.get("bytes accessed", 0.0) / rec["roofline"]["min_bytes"],
                               hbm_bytes=full["hbm bytes"],
                               hbm_over_min=full["hbm bytes"] / rec["roofline"]["min_bytes"])
        log("compiled %s unrolled at full depth", name)
    progs = report["programs"]
    if all("seconds" in progs[c] for c in CALL_PROGRAMS):
      step = progs["primary_step"]["seconds"]
      report["per_token"] = dict(ar_ms_per_token=step * 1e3,
                                 c=progs["secondary_step"]["seconds"] / step,
                                 block_over_step=progs["primary_block"]["seconds"] / step)
      if alpha is not None:
        report["projection"] = tp.projection(progs, *alpha, max_block_len=block_len)
  report["failures"] = [r["error"] for r in report["programs"].values() if not r["fits"]]
  return report


# -- output -----------------------------------------------------------------------------------------------------------
def _gib(b):
  return f"{b / tp.GIB:.3f}"


def format_report(report: dict) -> str:
  """The report as markdown tables."""
  chip = report["chip"]
  lines = [f"# AOT compile of {report['config']} for {report['topology']} ({report['chips']} x {chip['name']}, "
           f"mesh {report['mesh']}, decode mesh {report.get('decode_mesh', report['mesh'])}, decode weights "
           f"{report.get('serving_dtype', 'training dtypes')})",
           f"_{report['label']}._ libtpu flags: `{report.get('libtpu_init_args') or 'none'}`.",
           f"Parameters: primary {report['params']['primary'] / 1e6:,.1f}M, secondary "
           f"{report['params']['secondary'] / 1e6:,.1f}M (ratio "
           f"{report['params']['primary'] / report['params']['secondary']:.1f}). Decode: {report['decode']}.", "",
           "| TPU | HBM per chip (GiB) | peak bf16 TFLOP/s |", "|---|---|---|"]
  lines += [f"| {c.name} | {c.hbm_bytes / tp.GIB:.0f} | {c.peak_bf16_flops / 1e12:.0f} |" for c in tp.CHIPS.values()]
  lines += ["", f"HBM per device (GiB) against {chip['hbm_gib']:.2f} GiB:", "",
            "| program | arguments | temporaries | outputs | aliased | total | fits | GFLOP/device | GB accessed "
            "| est. ms |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in report["programs"].items():
    if "memory" not in r:
      lines.append(f"| {name} | - | - | - | - | - | NO | - | - | - |")
      continue
    m = r["memory"]
    cost = (f"{r['flops'] / 1e9:.2f} | {r['bytes_accessed'] / 1e9:.3f} | {r['seconds'] * 1e3:.3f}"
            if "seconds" in r else "- | - | -")
    lines.append(f"| {name} | {_gib(m['arguments'])} | {_gib(m['temporaries'])} | {_gib(m['outputs'])} | "
                 f"{_gib(m['aliased'])} | {_gib(m['total'])} | {'yes' if r['fits'] else 'NO'} | {cost} |")
  tr = report["programs"].get("train_step", {})
  if "mfu" in tr:
    lines += ["", f"Training: est. {tr['step_ms']:.1f} ms/step, {tr['tokens_per_second']:,.0f} tokens/s, "
                  f"est. MFU {tr['mfu'] * 100:.1f}% (XLA flops / (est. seconds x peak)), est. MFU "
                  f"{tr['mfu_useful'] * 100:.1f}% counting useful FLOPs (6 N tokens + attention, no remat "
                  f"recompute: {tr['useful_flops'] / 1e9:.1f} GFLOP/device against XLA's "
                  f"{tr['flops'] / 1e9:.1f})."]
    if "mfu_useful_hbm" in tr:
      lines[-1] += (f" By HBM traffic ({tr['hbm_bytes'] / 1e9:.1f} GB/device, aot.hbm_traffic, against XLA's "
                    f"{tr['bytes_accessed'] / 1e9:.1f} GB accessed): est. {tr['hbm_seconds'] * 1e3:.1f} ms/step, "
                    f"MFU {tr['mfu_useful_hbm'] * 100:.1f}% (useful FLOPs).")
  if tr.get("hbm_by_scope"):
    lines += ["", "Where the train step's HBM traffic goes, by model part (the JAX named scopes in the compiled "
                  "program's metadata, hlo_reading.scope_of; forward, backward and remat recompute together):", "",
              "| part | GB/device/step | share |", "|---|---|---|"]
    total = sum(tr["hbm_by_scope"].values()) or 1.0
    lines += [f"| {k} | {v / 1e9:.1f} | {100 * v / total:.0f}% |"
              for k, v in sorted(tr["hbm_by_scope"].items(), key=lambda kv: -kv[1])]
  calls = [(name, r) for name, r in report["programs"].items() if "roofline" in r]
  if calls:
    lines += ["", "Decode calls against the HBM roofline (minimum bytes = the model's weights once + its KV cache "
                  "once, per device; roofline ms = minimum bytes / HBM bandwidth). GB accessed: XLA's cost "
                  "analysis, which counts on-chip copies and reads too; HBM GB: the bytes the compiled program "
                  "moves to and from HBM by its memory spaces (aot.hbm_traffic), and HBM ms = that / bandwidth:", "",
              "| program | GB accessed | HBM GB | minimum GB | bytes / minimum | HBM / minimum | est. ms | HBM ms | "
              "roofline ms | est. / roofline | weight converts + gathers per call |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in calls:
      rf = r["roofline"]
      lines.append(f"| {name} | {r['bytes_accessed'] / 1e9:.3f} | {r.get('hbm_bytes', 0.0) / 1e9:.3f} | "
                   f"{rf['min_bytes'] / 1e9:.3f} | {rf['bytes_over_min']:.2f}x | {rf.get('hbm_over_min', 0.0):.2f}x | "
                   f"{r['seconds'] * 1e3:.3f} | {rf.get('hbm_ms', 0.0):.3f} | {rf['roofline_ms']:.3f} | "
                   f"{rf['ms_over_roofline']:.2f}x | {r.get('weight_ops_per_call', '-')} |")
    unrolled = [(name, r) for name, r in calls if "unrolled" in r]
    if unrolled:
      lines += ["", "Depth extrapolation against the program unrolled at full depth (GB per device):", "",
                "| program | accessed, extrapolated | accessed, unrolled | unrolled / minimum | HBM, extrapolated | "
                "HBM, unrolled | HBM unrolled / minimum |", "|---|---|---|---|---|---|---|"]
      lines += [f"| {name} | {r['bytes_accessed'] / 1e9:.3f} | {r['unrolled']['bytes_accessed'] / 1e9:.3f} | "
                f"{r['unrolled']['bytes_over_min']:.2f}x | {r.get('hbm_bytes', 0.0) / 1e9:.3f} | "
                f"{r['unrolled']['hbm_bytes'] / 1e9:.3f} | {r['unrolled']['hbm_over_min']:.2f}x |"
                for name, r in unrolled]
  if "per_token" in report:
    pt = report["per_token"]
    lines += ["", f"Decoding: primary step {pt['ar_ms_per_token']:.3f} ms/call (= ms/token autoregressive); "
                  f"block call of {report['decode']['max_block_len'] + 1} tokens = {pt['block_over_step']:.2f}x "
                  f"a step; secondary step / primary step c = {pt['c']:.3f}."]
  if "projection" in report:
    lines += tp.projection_lines(report["projection"])
  for f in report["failures"]:
    lines += ["", f"DOES NOT FIT: {f}"]
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import app, flags
  f = flags.FLAGS
  if f.report:  # reprint a saved report (e.g. launch.compile_presets' JSONs); compiles nothing
    with open(f.report) as fh:
      print(format_report(json.load(fh)))
    return
  if f.config is None or f.topology is None:
    raise app.UsageError("--config and --topology are required (or --report=<saved JSON report>)")
  report = run(f.config, f.topology, decode_batch=f.decode_batch, prompt_len=f.prompt_len,
               max_new_tokens=f.max_new_tokens, block_len=f.block_len, groups=tuple(f.programs),
               hbm_gib=f.hbm_gib, acceptance=f.acceptance,
               log=lambda fmt, *a: print(fmt % a, file=sys.stderr, flush=True),  # progress; stdout: the report
               decode_mesh_shape=[int(x) for x in f.decode_mesh_shape] or None, check_depth=f.check_depth)
  print(json.dumps(report, indent=1, default=float) if f.json else format_report(report))
  if report["failures"]:
    print("\n".join(report["failures"]), file=sys.stderr)
    raise DoesNotFit(report["failures"])


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<preset>", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x1, v6e:2x2")
  flags.DEFINE_bool("json", False, "print the report as JSON")
  flags.DEFINE_integer("decode_batch", 0, "decode batch (0: one row per batch shard of the decode mesh)")
  flags.DEFINE_list("decode_mesh_shape", [], "mesh shape over config.mesh.axes for the decode programs "
                    "(default: config.serving.mesh_shape, else the training mesh), e.g. 4,1,4")
  flags.DEFINE_bool("check_depth", False, "scanned models: also compile each per-call program unrolled at full "
                    "depth and report its bytes beside the depth-extrapolated estimate")
  flags.DEFINE_integer("prompt_len", 128, "decode prompt length")
  flags.DEFINE_integer("max_new_tokens", 128, "decode budget")
  flags.DEFINE_integer("block_len", 8, "K: the largest γ (drafts per block); the block call verifies K+1 tokens")
  flags.DEFINE_list("programs", list(GROUPS), f"program groups to compile, from {GROUPS}")
  flags.DEFINE_float("hbm_gib", None, "override the chip's HBM capacity in GiB (what-ifs, tests)")
  flags.DEFINE_string("acceptance", None, "acceptance rate α (e.g. 0.75) or a results.json with acceptance_rate "
                      "values: adds the projected Tandem + SPEED speedup per γ")
  flags.DEFINE_string("report", None, "print the markdown report of a saved JSON report (--json output, or "
                      "launch.compile_presets' <stage>_<preset>.json) instead of compiling")


if __name__ == "__main__":
  from tandem_jax import cli
  _define_flags()
  cli.run(main, "aot", workdir_flag=None)
