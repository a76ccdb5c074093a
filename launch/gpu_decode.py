"""The real-model benchmark's decode part on another machine (a GPU), from a small bundle of its trained models.

  python -m launch.gpu_decode --mode=pack --workdir=/tmp/bwd --out=.gpu [--part_mb=60]
  python -m launch.gpu_decode --mode=run --bundle=.gpu --out=/tmp/gpu_out [--gammas=1,2,3,4] [--repeats=2]

``pack`` (where the benchmark ran: ``python -m tandem_jax.benchmark --workdir=/tmp/bwd
--config=configs/benchmark.py:smollm2``): the Tandem and standalone drafters' trainable parameters (float32 npz),
their draft vocabularies, the router, configs, tokenizer, the run's results JSON (its τ and Table 1), and the SmolLM2
GGUF cut into parts of at most ``--part_mb`` MB (a machine that can fetch nothing gets the weights in a few
transfers). The drafters' frozen parts are the primary itself, its embedding and the draft-vocabulary rows of it:
``pack`` rebuilds them from the GGUF exactly as ``run`` does and checks them equal to the checkpoints' to the bit. A
primary not imported from a GGUF (the smoke preset's tiny one) travels as parameters instead.

``run`` (on the other machine; no TensorFlow or network needed, but Grain, ml-collections and gguf must be
importable: carry their wheels where the machine lacks them): reassembles the GGUF (sha256 checked),
rebuilds primary, Tandem, standalone drafter and router, checks that greedy ``speed`` and ``tandem_speed`` outputs
equal ``ar``'s, then times Table 3 (per-call costs) and Tables 2 and 4 with the benchmark's own code
(:func:`tandem_jax.bench.real.decode_tables`, the CPU run's τ), one setting at a time; after each setting
``<out>/gpu_results.json`` and ``<out>/gpu_report.md`` are rewritten, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time

from absl import flags

flags.DEFINE_enum("mode", None, ["pack", "run"], "pack a benchmark workdir, or run the decode part from a bundle")
flags.DEFINE_string("workdir", None, "pack: the real-model benchmark's workdir")
flags.DEFINE_string("gguf", "", "pack: the primary's GGUF (default: the one <workdir>/primary/convert.json names; a "
                    "primary not imported from a GGUF, the smoke preset's, is packed as parameters)")
flags.DEFINE_string("out", None, "pack: the bundle directory; run: where the results go")
flags.DEFINE_integer("part_mb", 60, "pack: the largest GGUF part, MB")
flags.DEFINE_string("bundle", None, "run: the bundle directory (GGUF parts may also be in --parts_dir)")
flags.DEFINE_string("parts_dir", "", "run: another directory holding some of the GGUF parts")
flags.DEFINE_list("gammas", [], "run: the fixed γ of Table 2 (default: the benchmark preset's)")
flags.DEFINE_integer("repeats", 0, "run: interleaved rounds per cell (0: the preset's)")
flags.DEFINE_list("settings", [], "run: Table 2/4 settings, in order (default: the CPU run's, e.g. greedy_b1,greedy_b8,"
                  "T1_b1,T1_b8)")

DRAFTERS = ("tandem", "standalone")
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "recipe.json")  # those present
GGUF_NAME = "primary.gguf"


def _primary_state(gguf_path: str):
  """The primary's parameters (pure dict) as ``quickstart.import_smollm2`` imports it (max_seq_len 512)."""
  from flax import nnx

  from tandem_jax import convert
  cfg, hf, tokenizer = convert.load_gguf(gguf_path, max_seq_len=512)
  return nnx.state(convert.model_from_hf(cfg, hf), nnx.Param).to_pure_dict()


def _primary_from_params(bundle: str):
  """The primary packed as parameters (``<bundle>/primary``: config.json, params.npz)."""
  import numpy as np

  from tandem_jax.models import bundle as bundle_lib
  from tandem_jax.workdir import config_from_dict
  with open(os.path.join(bundle, "primary", "config.json")) as fh:
    config = config_from_dict(json.load(fh))
  _, trainable, _ = bundle_lib.abstract_bundle(config)
  with np.load(os.path.join(bundle, "primary", "params.npz")) as z:
    return _fill(trainable.to_pure_dict(), {k: z[k] for k in z.files})


def _frozen(stage: str, primary: dict, draft_ids):
  """A drafter's frozen parameters from the primary's: embedding shared, LM head = its draft-vocabulary rows."""
  import numpy as np
  emb = np.asarray(primary["embed"]["embedding"])
  ids = np.asarray(draft_ids)
  drafter = {"draft_ids": ids, "embed": {"embedding": emb}, "lm_head": {"kernel": np.ascontiguousarray(emb[ids].T)}}
  return {"primary": primary, "secondary": drafter} if stage == "tandem" else drafter


def _named_leaves(tree) -> dict:
  import jax
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fill(abstract, named: dict):
  """``abstract``'s pure-dict structure with each leaf taken from ``named`` by its path."""
  import jax
  import jax.numpy as jnp
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, a in paths:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name not in named:
      raise KeyError(f"bundle has no parameter {name!r}")
    v = named[name]
    if tuple(v.shape) != tuple(a.shape) or str(v.dtype) != str(a.dtype):
      raise ValueError(f"parameter {name!r}: bundle has {v.shape} {v.dtype}, the config wants {a.shape} {a.dtype}")
    leaves.append(jnp.asarray(v))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _sha256(path: str) -> str:
  from tandem_jax.convert import sha256_file
  return sha256_file(path)


def pack(workdir: str, gguf: str, out: str, part_mb: int) -> None:
  import jax
  import numpy as np
  from flax import nnx

  from tandem_jax import checkpoint, sharding
  from tandem_jax import workdir as wd
  from tandem_jax.models import bundle as bundle_lib
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(out, exist_ok=True)
  conv_path = os.path.join(workdir, "primary", "convert.json")
  if not gguf and os.path.isfile(conv_path):
    with open(conv_path) as fh:
      conv = json.load(fh)
    gguf = conv["path"] if conv.get("format") == "gguf" else ""
  if gguf:
    gguf = os.path.abspath(os.path.expanduser(gguf))
    primary = _primary_state(gguf)
  else:  # a primary trained or imported otherwise: its parameters travel in the bundle
    loaded = wd.load_workdir(os.path.join(workdir, "primary"))
    primary = jax.tree.map(np.asarray, nnx.state(loaded.model, nnx.Param).to_pure_dict())
    os.makedirs(os.path.join(out, "primary"), exist_ok=True)
    np.savez(os.path.join(out, "primary", "params.npz"), **_named_leaves(primary))
    shutil.copyfile(os.path.join(workdir, "primary", "config.json"), os.path.join(out, "primary", "config.json"))
  for name in DRAFTERS:
    src, dst = os.path.join(workdir, name), os.path.join(out, name)
    os.makedirs(dst, exist_ok=True)
    config = wd.load_config(src)
    mesh, rules = wd.default_mesh(config), sharding.rules_of(config)
    _, trainable, frozen = bundle_lib.abstract_bundle(config)
    mngr = checkpoint.manager(src, async_save=False)
    step = max(mngr.all_steps())
    restored = checkpoint.restore(mngr, step, {"params": sharding.sharded_abstract(trainable, rules, mesh),
                                               "frozen": sharding.sharded_abstract(frozen, rules, mesh)},
                                  with_optimizer=False)
    mngr.close()
    have = _named_leaves(restored["frozen"])
    ids = have["secondary/draft_ids" if config.stage == "tandem" else "draft_ids"]
    rebuilt = _named_leaves(_frozen(config.stage, primary, ids))
    if set(rebuilt) != set(have) or not all(np.array_equal(np.asarray(have[k]), np.asarray(v))
                                            for k, v in rebuilt.items()):
      raise ValueError(f"{src}: its frozen parameters are not the primary's (rebuilt from "
                       f"{gguf or 'the primary workdir'}): cannot pack")
    params = {k: np.asarray(v) for k, v in _named_leaves(restored["params"]).items()}
    np.savez(os.path.join(dst, "params.npz"), **params, __draft_ids=np.asarray(ids))
    for f in FILES:
      if os.path.isfile(os.path.join(src, f)):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    print(f"[pack] {name}: step {step}, {sum(v.size for v in params.values())} "
          f"trainable parameters; frozen parts rebuilt from the GGUF equal the checkpoint's")
  for f in ("router.npz", "router.json"):
    shutil.copyfile(os.path.join(workdir, "tandem", f), os.path.join(out, f))
  shutil.copyfile(os.path.join(workdir, "results_smollm2.json"), os.path.join(out, "cpu_results.json"))
  if not gguf:
    print(f"[pack] {out}: the primary packed as parameters")
    return
  size, part, parts = os.path.getsize(gguf), part_mb * 1000 * 1000, []
  with open(gguf, "rb") as fh:
    for i in range((size + part - 1) // part):
      p = os.path.join(out, f"gguf.part{i}")
      with open(p, "wb") as o:
        o.write(fh.read(part))
      parts.append(os.path.basename(p))
  with open(os.path.join(out, "manifest.json"), "w") as fh:
    json.dump(dict(gguf=os.path.basename(gguf), sha256=_sha256(gguf), size=size, parts=parts, workdir=workdir), fh,
              indent=1)
  print(f"[pack] {out}: GGUF in {len(parts)} part(s) of <= {part_mb} MB; move parts elsewhere as transfers need")


def _gguf_from_parts(bundle: str, parts_dir: str) -> str:
  if not os.path.isfile(os.path.join(bundle, "manifest.json")):
    raise FileNotFoundError(f"{bundle!r} has neither primary/params.npz nor manifest.json (the GGUF's parts): not a "
                            f"bundle written by --mode=pack")
  with open(os.path.join(bundle, "manifest.json")) as fh:
    m = json.load(fh)
  path = os.path.join(bundle, GGUF_NAME)
  if os.path.isfile(path) and _sha256(path) == m["sha256"]:
    return path
  with open(path + ".tmp", "wb") as o:
    for p in m["parts"]:
      found = [d for d in (bundle, parts_dir) if d and os.path.isfile(os.path.join(d, p))]
      if not found:
        raise FileNotFoundError(f"GGUF part {p} is in neither {bundle!r} nor --parts_dir={parts_dir!r}")
      with open(os.path.join(found[0], p), "rb") as fh:
        shutil.copyfileobj(fh, o)
  if _sha256(path + ".tmp") != m["sha256"]:
    raise ValueError(f"the GGUF reassembled from {m['parts']} does not match its sha256 {m['sha256']}")
  os.replace(path + ".tmp", path)
  return path


def load_models(bundle: str, parts_dir: str = "") -> dict:
  import numpy as np
  from flax import nnx

  from tandem_jax import recipe_router
  from tandem_jax.interop.hf_tokenizer import load_tokenizer
  from tandem_jax.models import bundle as bundle_lib
  from tandem_jax.models import router as router_lib
  from tandem_jax.workdir import config_from_dict
  if os.path.isfile(os.path.join(bundle, "primary", "params.npz")):
    primary = _primary_from_params(bundle)
  else:
    primary = _primary_state(_gguf_from_parts(bundle, parts_dir))
  models = {}
  for name in DRAFTERS:
    d = os.path.join(bundle, name)
    with open(os.path.join(d, "config.json")) as fh:
      config = config_from_dict(json.load(fh))
    graphdef, trainable, frozen = bundle_lib.abstract_bundle(config)
    with np.load(os.path.join(d, "params.npz")) as z:
      named = {k: z[k] for k in z.files}
    params = _fill(trainable.to_pure_dict(), named)
    frozen = _fill(frozen.to_pure_dict(), _named_leaves(_frozen(config.stage, primary, named["__draft_ids"])))
    models[name] = bundle_lib.public_model(config.stage, bundle_lib.merge_bundle(graphdef, params, frozen))
  models["primary"] = models["tandem"].primary
  with open(os.path.join(bundle, "router.json")) as fh:
    rset = json.load(fh)
  with nnx.use_eager_sharding(False):
    router = router_lib.Router(models["tandem"].secondary.cfg.d_model, int(rset["top_k"]), int(rset["hidden"]),
                               rngs=nnx.Rngs(0))
  state = nnx.state(router)
  nnx.replace_by_pure_dict(state, recipe_router.read_params(os.path.join(bundle, "router.npz")))
  nnx.update(router, state)
  models["router"] = router
  models["tokenizer"] = load_tokenizer(os.path.join(bundle, "tandem"))
  return models


def _machine() -> str:
  import jax
  d = jax.devices()[0]
  return (f"{getattr(d, 'device_kind', d.platform)} ({d.platform}), {os.cpu_count()} CPU cores, jax {jax.__version__}, "
          f"python {platform.python_version()}")


def run(bundle: str, out: str, parts_dir: str, gammas, repeats: int, settings) -> dict:
  import ml_collections

  from configs import benchmark as bench_cfg
  from tandem_jax.bench import real
  from tandem_jax.bench.run import setting_name
  from tandem_jax.data.heldout import HELDOUT_TUNING, PROMPTS
  os.makedirs(out, exist_ok=True)
  t_all = time.perf_counter()
  with open(os.path.join(bundle, "cpu_results.json")) as fh:
    cpu = json.load(fh)
  models = load_models(bundle, parts_dir)
  tok = models.pop("tokenizer")
  bench = ml_collections.ConfigDict(bench_cfg.get_config(cpu["preset"]).to_dict())  # the packed run's preset
  d = bench.decode
  if gammas:
    d.gammas = tuple(int(g) for g in gammas)
  if repeats:
    d.repeats = int(repeats)
  settings = list(settings) or list(cpu["table2"])
  cut = int(d.prompt_tokens) or None
  prompts = [tok.encode(p, add_bos=True)[:cut] for p in PROMPTS[:int(d.num_prompts)]]
  tune_prompts = [tok.encode(p, add_bos=True)[:cut] for p in HELDOUT_TUNING[:int(d.tune_prompts)]]
  phases = {"load": time.perf_counter() - t_all}
  print(f"[gpu_decode] models rebuilt on {_machine()} ({phases['load']:.0f} s)", flush=True)

  t0 = time.perf_counter()
  identical = real.greedy_identical(models, prompts[:8], int(d.max_new_tokens), 4)
  phases["lossless_check"] = time.perf_counter() - t0
  print(f"[gpu_decode] greedy speed and tandem_speed outputs equal ar's on 8 prompts: {identical}", flush=True)

  t0 = time.perf_counter()
  costs = real.call_costs(bench, models)
  phases["costs"] = time.perf_counter() - t0
  print("[gpu_decode] per-call costs (ms): " + "; ".join(
      f"batch {b}: primary k=1 {c['primary'][1]['median']:.2f}, tandem step {c['tandem'][1]['median']:.2f}"
      for b, c in costs.items()), flush=True)

  bench.lock()
  tables = dict(table2={}, table4={})
  r = {}
  for name in settings:
    temp = 0.0 if name.startswith("greedy") else 1.0
    b = int(name.rsplit("_b", 1)[1])
    if setting_name(temp, b) != name:
      raise ValueError(f"unknown setting {name!r}")
    t0 = time.perf_counter()
    with bench.unlocked():
      bench.decode.temperatures, bench.decode.batch_sizes = (temp,), (b,)
      if name in cpu["table4"]:  # the CPU run's tuned τ of this setting: no retuning here
        bench.decode.thresholds = (float(cpu["table4"][name]["threshold"]),)
    part = real.decode_tables(bench, models, prompts, tune_prompts, costs)
    for key in tables:
      tables[key].update(part[key])
    phases[name] = time.perf_counter() - t0
    r = _results(bench, cpu, costs, identical, phases, tables, out, t_all)
    print(f"[gpu_decode] {name} done ({phases[name]:.0f} s)", flush=True)
  return r


def _results(bench, cpu, costs, identical, phases, tables, out, t_all) -> dict:
  from tandem_jax.bench import real
  from tandem_jax.bench.report import jsonable
  phases = dict(phases, total=time.perf_counter() - t_all)
  r = dict(preset="smollm2, decode part on " + _machine().split(",")[0], command=COMMAND, workdir=out,
           config=bench.to_dict(), table1=cpu["table1"], costs=costs, greedy_outputs_identical=identical,
           phases_seconds=phases, machine=_machine(), **tables,
           training={"models": f"trained on CPU by {cpu.get('command')} (cpu_results.json); rebuilt here from the "
                     f"bundle"})
  r["leviathan"] = real.leviathan_rows(r["table2"], costs)
  if "greedy_b1" in r["table2"]:
    r.update(real.headline(r))
    r["targets"] = {key: dict(target=t, value=r[key], met=bool(r[key] >= t if key != "agreement_gain" else r[key] > t),
                              what=w) for key, t, w in real.TARGETS}
  else:
    r["targets"] = {}
  r["report"] = real.markdown(r)
  r = jsonable(r)
  with open(os.path.join(out, "gpu_results.json"), "w") as fh:
    json.dump(r, fh, indent=1)
  with open(os.path.join(out, "gpu_report.md"), "w") as fh:
    fh.write(r["report"])
  return r


COMMAND = ""


def main(argv):
  del argv
  global COMMAND
  import shlex
  import sys
  COMMAND = "python -m launch.gpu_decode " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  f = flags.FLAGS
  if f.mode == "pack":
    if not f.workdir or not f.out:
      raise flags.ValidationError("--mode=pack needs --workdir and --out")
    pack(f.workdir, f.gguf, f.out, f.part_mb)
  else:
    if not f.bundle or not f.out:
      raise flags.ValidationError("--mode=run needs --bundle and --out")
    r = run(f.bundle, f.out, f.parts_dir, f.gammas, f.repeats, f.settings)
    print(r["report"])


if __name__ == "__main__":
  from tandem_jax import cli
  flags.mark_flag_as_required("mode")
  cli.run(main, "gpu_decode", workdir_flag=None)
