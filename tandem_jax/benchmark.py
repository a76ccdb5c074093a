"""The benchmark: every model trained (or reused), the paper's claims measured side by side.

  python -m tandem_jax.benchmark --workdir=/tmp/bench [--config=configs/benchmark.py:cpu] [--json]
  python -m tandem_jax.benchmark --workdir=/tmp/bwd --config=configs/benchmark.py:smollm2 --report_only
  python -m tandem_jax.benchmark --workdir=/tmp/bwd --config=configs/benchmark.py:smollm2 --targets_only

Trains primary, mid-size, secondary, secondary_long (equal-training control), secondary_distil, tandem (CE),
tandem_distil and router in
``<workdir>/<stage>/`` (finished stages are reused), then in this one process: Table 1 (validation quality),
Table 2 (speedup over ``ar`` of ``speed`` and ``tandem_speed`` for every γ, greedy and sampled, batch 1 and 8),
Tables 3-4 (standalone Tandem vs the mid-size model; adaptive vs fixed γ), Leviathan's ideal speedup with the
measured α and c. Writes ``<workdir>/results.json``, ``<workdir>/report.md`` and PNG plots (with matplotlib). The
parts live in ``tandem_jax/bench/``. Compiled programs are kept in JAX's persistent compilation cache under
``<workdir>/jax_cache`` (``--compilation_cache=false`` turns it off): a rerun on the same checkpoints skips most
of the decode part's compilation, which is excluded from every timing anyway.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "benchmark.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "configs/benchmark.py[:cpu|smoke]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the models are trained (one subdirectory per stage) and "
                               "the results written", allow_override=True)
_CACHE = flags.DEFINE_bool("compilation_cache", True, "keep compiled programs in <workdir>/jax_cache",
                           allow_override=True)
_JSON = flags.DEFINE_bool("json", False, "print results.json's headline and targets as one JSON document", allow_override=True)
_TARGETS_ONLY = flags.DEFINE_bool("targets_only", False, "real-model presets: time the head-to-head phase (the "
                                  "auto targets' cells alone, call by call) again on the workdir's finished run, "
                                  "reading its Table 2's best fixed γ, and write its results and report again",
                                  allow_override=True)
_RERENDER = flags.DEFINE_bool("report_only", False, "real-model presets: write the report of the workdir's finished "
                              "run again from its results JSON (derived tables recomputed, nothing timed)",
                              allow_override=True)

HEADLINE_KEYS = ("accuracy_gain_points", "speedup_tandem_speed_vs_ar", "speedup_tandem_speed_vs_speed",
                 "speedup_adaptive_vs_fixed", "realized_over_ideal")


def main(argv):
  del argv
  from tandem_jax.bench import report, run
  if _CACHE.value:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(_WORKDIR.value), "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # By default JAX also turns on XLA's GPU autotune cache under the cache directory and that path enters every
    # cache key: a copied or moved workdir then misses every entry (measured: a copy of the workdir recompiled all).
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  command = "python -m tandem_jax.benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  if "tiny" in _CONFIG.value:  # the real-model presets (configs/benchmark.py:smollm2)
    from tandem_jax.bench import real
    if _RERENDER.value:
      r = real.rerender(_WORKDIR.value)
    elif _TARGETS_ONLY.value:
      r = real.targets_only(_CONFIG.value, _WORKDIR.value, command=command)
    else:
      r = real.run(_CONFIG.value, _WORKDIR.value, command=command)
    if _JSON.value:
      print(json.dumps({k: r[k] for k in ("targets", "phases_seconds")}, indent=1))
    else:
      print(r["report"])
    return
  if _RERENDER.value or _TARGETS_ONLY.value:
    raise ValueError("--report_only and --targets_only apply to the real-model presets (configs/benchmark.py:smollm2)")
  r = run.run(_CONFIG.value, _WORKDIR.value, command=command)
  if _JSON.value:
    print(json.dumps(report.jsonable({k: r[k] for k in HEADLINE_KEYS + ("targets", "phases_seconds")}), indent=1))
  else:
    print(open(os.path.join(r["workdir"], report.REPORT_FILE)).read())


if __name__ == "__main__":
  from tandem_jax import cli
  flags.mark_flag_as_required("workdir")
  cli.run(main, "benchmark")
