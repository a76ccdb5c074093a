"""Compile for a Cloud TPU topology on a machine without one, and report HBM fit and XLA's cost estimates.

  pip install -e ".[tpu]"   # jax[tpu]: libtpu compiles for TPU topologies with no TPU attached
  python -m tandem_jax.aot --config=configs/tandem.py:v5e16 --topology=v5e:4x4 [--json] [--acceptance=0.75]

Programs compiled on the topology's mesh (``config.mesh``, its -1 filled with the chip count):
- ``train_step``: the configured stage's jitted step with its abstract, sharded train state;
- ``decode_ar``, ``decode_tandem_speed``, ``decode_tandem_speed_adaptive`` (with a router): whole generate
  programs (prefill + ``lax.while_loop``), for their memory; XLA's cost model counts a loop body once, so their
  time comes from the per-call programs below;
- ``primary_step`` (1 token), ``primary_block`` (K+1 tokens with hidden states: Tandem + SPEED's verify call),
  ``secondary_step`` (one Tandem secondary draft step) and ``tandem_commit`` (projecting a verified block into the
  secondary's cache), each one call with a full KV cache, so per-call costs are explicit.

Scanned layers (``scan_layers``, what the TPU presets use): XLA's cost analysis counts a ``lax.scan`` body once
(jax-ml/jax#18672), so for those models FLOPs, bytes and estimated time come from the same program compiled with
unrolled layers at depths (1, 1), (2, 1) and (1, 2) (primary, secondary), extrapolated linearly to the real depths
(every layer is the same computation on the same shapes); memory always comes from the real, scanned program.

Every number is an XLA cost-model estimate from a deviceless compile, not a TPU measurement. A program that does
not fit the chip's HBM makes the command fail (exit code 2) with a message naming the shortfall.
"""

from __future__ import annotations

import json
import logging
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
from jax.sharding import NamedSharding, PartitionSpec as P

from tandem_jax import cache as kvcache
from tandem_jax import sharding
from tandem_jax import tpu_projection as tp
from tandem_jax.models.router import Router
from tandem_jax.models.tandem import TandemLM
from tandem_jax.training import program as program_lib
from tandem_jax.training import stages
from tandem_jax.training.validate import resolved_mesh_shape, validate

DECODE_PROGRAMS = ("decode_ar", "decode_tandem_speed", "decode_tandem_speed_adaptive")
CALL_PROGRAMS = ("primary_step", "primary_block", "secondary_step", "tandem_commit")
GROUPS = ("train", "decode", "calls")


class DoesNotFit(SystemExit):
  """Raised (exit code 2) when a compiled program needs more HBM per device than the chip has."""

  def __init__(self, messages):
    self.messages = list(messages)
    super().__init__(2)

  def __str__(self):
    return "\n".join(self.messages)


# -- meshes and abstract models ---------------------------------------------------------------------------------------
def topology_mesh(topology: str, mesh_cfg):
  """A mesh over the devices of a named TPU topology (no TPU needed): ``config.mesh`` with its -1 filled."""
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # noqa: BLE001 - libtpu absent or a topology name it does not know
    raise RuntimeError(f"cannot build TPU topology {topology!r}: {e}. Install the tpu extra "
                       f"(pip install -e '.[tpu]') and use a name such as v5e:2x2, v5e:4x4, v5e:16x16") from None
  shape = resolved_mesh_shape(mesh_cfg, len(topo.devices))
  axes = tuple(mesh_cfg.axes)
  try:
    return topologies.make_mesh(topo, shape, axes)
  except NotImplementedError:
    # e.g. (1, 64, 4) on a 16x16 torus: an axis must split a physical axis.
    from jax.experimental import mesh_utils
    devices = mesh_utils.create_device_mesh(shape, topo.devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(devices, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def abstract_module(constructor, mesh, rules):
  """``constructor(rngs)`` as an abstract module whose ShapeDtypeStructs carry their mesh shardings."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: constructor(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = sharding.param_shardings(state, rules, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return nnx.merge(graphdef, state)


def _fit(mesh, shape, spec: P) -> NamedSharding:
  """``spec`` with the mesh axes that do not divide their dimension dropped."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for a in names:
      size *= mesh.shape[a]
    out.append(axes if names and dim % size == 0 else None)
  return NamedSharding(mesh, P(*out))


def _logical(mesh, rules, shape, logical) -> NamedSharding:
  spec = sharding.logical_to_mesh(P(*logical), rules, mesh).spec
  return _fit(mesh, shape, spec)


def abstract_cache(cfg, batch: int, capacity: int, mesh, rules) -> kvcache.KVCache:
  shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  sh = _logical(mesh, rules, shape, ("batch", None, "act_heads", None))
  from tandem_jax.models.config import dtype_of
  buf = jax.ShapeDtypeStruct(shape, dtype_of(cfg.dtype), sharding=sh)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=_logical(mesh, rules, (batch,), ("batch",)))
  if cfg.scan_layers:  # one [L, B, S, K, H] buffer, the layer axis unsharded
    lshape = (cfg.num_layers, *shape)
    stacked = jax.ShapeDtypeStruct(lshape, dtype_of(cfg.dtype),
                                   sharding=_logical(mesh, rules, lshape, (None, "batch", None, "act_heads", None)))
    return kvcache.KVCache(k=stacked, v=stacked, lengths=lengths)
  return kvcache.KVCache(k=(buf,) * cfg.num_layers, v=(buf,) * cfg.num_layers, lengths=lengths)


def _with_placeholder_inits(config):
  """Weights are abstract here, so a stage that continues from trained workdirs needs none to compile."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field in config.init:
      config.init[field] = config.init[field] or "<abstract: not read by tandem_jax.aot>"
  return config


def _bucket(n: int, quantum: int = 16) -> int:
  return -(-n // quantum) * quantum  # as tandem_jax.decoding.api sizes its buffers


def decode_capacity(prompt_len: int, max_new_tokens: int, max_block_len: int) -> int:
  return _bucket(_bucket(prompt_len) + _bucket(max_new_tokens) + max_block_len + 2)


# -- compiling and measuring ------------------------------------------------------------------------------------------
_COST_KEYS = ("flops", "bytes accessed", "optimal_seconds")


def _cost_of(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {k: float(cost[k]) for k in _COST_KEYS if cost.get(k) is not None}


def depth_variant(config, primary_layers: int, secondary_layers: int):
  """``config`` with unrolled layers at the given depths.

  Layer map "last": every secondary layer reads the primary's last state, so every primary layer is computed, as in
  a scanned program (XLA can drop unread trailing layers of an unrolled primary, not iterations of a scan).
  """
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for model, depth in ((c.primary, primary_layers), (c.secondary, secondary_layers)):
      model.num_layers, model.scan_layers = depth, False
    c.tandem.layer_map = "last"
  return c


def extrapolated_cost(lower_at) -> dict:
  """Cost of a program at the real depths (L_P, L_S) from ``lower_at(l_p, l_s)`` compiled unrolled at small depths.

  cost(L_P, L_S) = c(1,1) + (L_P - 1) (c(2,1) - c(1,1)) + (L_S - 1) (c(1,2) - c(1,1)); ``lower_at`` returns
  (lowered program, L_P, L_S) where the last two are the real depths.
  """
  c11, lp, ls = lower_at(1, 1)
  c11 = _cost_of(c11.compile())
  c21 = _cost_of(lower_at(2, 1)[0].compile())
  c12 = _cost_of(lower_at(1, 2)[0].compile())
  return {k: c11[k] + (lp - 1) * (c21.get(k, 0.0) - c11[k]) + (ls - 1) * (c12.get(k, 0.0) - c11[k])
          for k in c11}


def analyse(name: str, lowered, chip: tp.Chip, with_cost: bool = True, cost_lower_at=None) -> dict:
  """Compiles ``lowered`` and returns its per-device memory and cost figures (or the compiler's OOM message).

  ``cost_lower_at`` (scanned models): costs by :func:`extrapolated_cost` instead of from ``lowered`` itself.
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
  if with_cost:
    t1 = time.perf_counter()
    cost = extrapolated_cost(cost_lower_at) if cost_lower_at else _cost_of(compiled)
    seconds, source = tp.estimated_seconds(cost, chip)
    rec.update(flops=cost.get("flops", 0.0), bytes_accessed=cost.get("bytes accessed", 0.0),
               xla_optimal_seconds=cost.get("optimal_seconds"), seconds=seconds, seconds_source=source,
               cost_source="depth-extrapolated from unrolled 1-2 layer compiles" if cost_lower_at
               else "this program", cost_compile_seconds=time.perf_counter() - t1)
  return rec


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
  tok = lambda t: jax.ShapeDtypeStruct((batch, t), jnp.int32,  # noqa: E731
                                       sharding=_logical(mesh, rules, (batch, t), ("batch", None)))
  k1 = max_block_len + 1
  pcache, scache = (abstract_cache(c, batch, capacity, mesh, rules) for c in (pcfg, scfg))
  hidden_shape = (pcfg.num_layers + 1, batch, k1, pcfg.d_model)
  hidden = jax.ShapeDtypeStruct(hidden_shape, jnp.dtype(pcfg.dtype),
                                sharding=_logical(mesh, rules, hidden_shape, (None, "batch", None, "act_embed")))
  rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=_logical(mesh, rules, (batch,), ("batch",)))
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
  from tandem_jax.decoding import api
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
        decode_programs=DECODE_PROGRAMS, decode_mesh_shape=None, log=logging.info) -> dict:
  """Compiles the selected program groups of ``config`` for ``topology``; returns the report (see :func:`main`).

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
  validate(_with_placeholder_inits(config), num_devices=n, check_workdirs=False)
  rules = program_lib.rules_of(config)
  dmesh = mesh
  if decode_mesh_shape:
    # Decoding may use another layout than training (e.g. model-parallel instead of FSDP, which would
    # all-gather every weight on every decode call).
    dmesh = topology_mesh(topology, types.SimpleNamespace(shape=tuple(decode_mesh_shape), axes=config.mesh.axes))
  shape = dict(dmesh.shape)
  batch_rule = dict(rules).get("batch")
  batch_axes = (batch_rule,) if isinstance(batch_rule, str) else tuple(batch_rule or ())
  shards = 1
  for a in batch_axes:
    shards *= shape.get(a, 1)
  batch = decode_batch or shards
  if batch % shards:
    raise ValueError(f"--decode_batch {batch} must be a multiple of the {shards} batch shards of the decode mesh "
                     f"{shape}")
  capacity = decode_capacity(prompt_len, max_new_tokens, block_len)
  pcfg, scfg, tcfg = stages.model_configs(config)
  if capacity > min(pcfg.max_seq_len, scfg.max_seq_len):
    raise ValueError(f"--prompt_len {prompt_len} + --max_new_tokens {max_new_tokens} (+ block slack, padded to "
                     f"{capacity}) exceeds the models' max_seq_len {min(pcfg.max_seq_len, scfg.max_seq_len)}")

  report = dict(label=tp.LABEL, config=f"{config.stage}:{config.preset}", topology=topology, chips=n,
                mesh=dict(mesh.shape), decode_mesh=dict(dmesh.shape), chip=dict(name=chip.name, hbm_gib=chip.hbm_bytes / tp.GIB,
                                                 peak_bf16_tflops=chip.peak_bf16_flops / 1e12),
                params=dict(primary=pcfg.num_params, secondary=scfg.num_params),
                decode=dict(batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                            max_block_len=block_len, cache_capacity=capacity),
                programs={})

  scanned = pcfg.scan_layers or scfg.scan_layers

  def add(name, lowered, with_cost=True, cost_lower_at=None):
    rec = analyse(name, lowered, chip, with_cost, cost_lower_at if scanned else None)
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
        p, s_, t = stages.model_configs(depth_variant(config, lp, ls))
        small = abstract_module(lambda r: TandemLM(p, s_, t, r), dmesh, rules)
        return lower_calls(small, **call_kw)[name], pcfg.num_layers, scfg.num_layers
      return lower_at

    for name, lowered in lower_calls(tandem, **call_kw).items():
      rec = add(name, lowered, cost_lower_at=call_at(name))
      if "seconds" in rec:
        rec["ms_per_call"] = rec["seconds"] * 1e3
    progs = report["programs"]
    if all("seconds" in progs[c] for c in CALL_PROGRAMS):
      step = progs["primary_step"]["seconds"]
      report["per_token"] = dict(ar_ms_per_token=step * 1e3,
                                 c=progs["secondary_step"]["seconds"] / step,
                                 block_over_step=progs["primary_block"]["seconds"] / step)
      if alpha is not None:
        a, where = alpha
        report["projection"] = dict(
            label="projection from XLA's cost model (deviceless compile) and the given acceptance rate, "
                  "not a TPU measurement",
            acceptance=a, acceptance_source=where,
            rows=tp.project_speedup(a, range(1, block_len + 1), primary_step_s=step,
                                    primary_block_s=progs["primary_block"]["seconds"], max_block_len=block_len,
                                    secondary_step_s=progs["secondary_step"]["seconds"],
                                    commit_s=progs["tandem_commit"]["seconds"]))
  report["failures"] = [r["error"] for r in report["programs"].values() if not r["fits"]]
  return report


# -- output -----------------------------------------------------------------------------------------------------------
def _gib(b):
  return f"{b / tp.GIB:.3f}"


def format_report(report: dict) -> str:
  """The report as markdown tables."""
  chip = report["chip"]
  lines = [f"# AOT compile of {report['config']} for {report['topology']} ({report['chips']} x {chip['name']}, "
           f"mesh {report['mesh']}, decode mesh {report.get('decode_mesh', report['mesh'])})",
           f"_{report['label']}._",
           f"Parameters: primary {report['params']['primary'] / 1e6:.3g}M, secondary "
           f"{report['params']['secondary'] / 1e6:.3g}M (ratio "
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
                  f"est. MFU {tr['mfu'] * 100:.1f}% (XLA flops / (est. seconds x peak))."]
  if "per_token" in report:
    pt = report["per_token"]
    lines += ["", f"Decoding: primary step {pt['ar_ms_per_token']:.3f} ms/call (= ms/token autoregressive); "
                  f"block call of {report['decode']['max_block_len'] + 1} tokens = {pt['block_over_step']:.2f}x "
                  f"a step; secondary step / primary step c = {pt['c']:.3f}."]
  if "projection" in report:
    pr = report["projection"]
    lines += ["", f"Projected Tandem + SPEED speedup ({pr['label']}; α = {pr['acceptance']:.3f} from "
                  f"{pr['acceptance_source']}):", "",
              "| γ | E[tokens/call] | Leviathan (1-α^{γ+1})/((1-α)(γc+1)) | block call ms | ms/token | "
              "projected speedup vs AR |", "|---|---|---|---|---|---|"]
    for row in pr["rows"]:
      lines.append(f"| {row['gamma']} | {row['expected_tokens']:.2f} | {row['leviathan_speedup']:.2f}x | "
                   f"{row['block_call_ms']:.3f} | {row['ms_per_token']:.3f} | {row['projected_speedup']:.2f}x |")
  for f in report["failures"]:
    lines += ["", f"DOES NOT FIT: {f}"]
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  report = run(f.config, f.topology, decode_batch=f.decode_batch, prompt_len=f.prompt_len,
               max_new_tokens=f.max_new_tokens, block_len=f.block_len, groups=tuple(f.programs),
               hbm_gib=f.hbm_gib, acceptance=f.acceptance,
               log=lambda fmt, *a: print(fmt % a, file=sys.stderr, flush=True),  # progress; stdout: the report
               decode_mesh_shape=[int(x) for x in f.decode_mesh_shape] or None)
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
                    "(default: the training mesh), e.g. 4,1,4")
  flags.DEFINE_integer("prompt_len", 128, "decode prompt length")
  flags.DEFINE_integer("max_new_tokens", 128, "decode budget")
  flags.DEFINE_integer("block_len", 8, "K: the largest γ (drafts per block); the block call verifies K+1 tokens")
  flags.DEFINE_list("programs", list(GROUPS), f"program groups to compile, from {GROUPS}")
  flags.DEFINE_float("hbm_gib", None, "override the chip's HBM capacity in GiB (what-ifs, tests)")
  flags.DEFINE_string("acceptance", None, "acceptance rate α (e.g. 0.75) or a results.json with acceptance_rate "
                      "values: adds the projected Tandem + SPEED speedup per γ")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  from tandem_jax import cli
  _define_flags()
  cli.run(main, "aot", workdir_flag=None)
