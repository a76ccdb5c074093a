"""How well the benchmark's router predicts greedy acceptance on held-out greedy text: the recipe data's validation
rows (the primary's greedy continuations of prompts the secondary never trained on), teacher-forced at block length
K with block phase 0. Prints the mean predicted acceptance against the measured one, the ranking quality (AUC) of the
router's prediction and of the secondary's top-1 probability alone, per within-block index and by predicted bin.

  python benchmarks/router_calibration.py WORKDIR

WORKDIR: the workdir of `python -m tandem_jax.benchmark --config=configs/benchmark.py:smollm2`; the router is
WORKDIR/tandem/router.npz, reused while its settings are the preset's (else trained there first).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import benchmark as bench_cfg  # noqa: E402
from tandem_jax import recipe_router  # noqa: E402
from tandem_jax.recipe import DATA_DIR, RECIPE_FILE, RecipeConfig, batch_at, split_rows  # noqa: E402
from tandem_jax.recipe_data import target_index  # noqa: E402
from tandem_jax.workdir import load_workdir  # noqa: E402


def auc(score, y):
  order = np.argsort(score)
  rank = np.empty(len(score))
  rank[order] = np.arange(len(score))
  n1, n0 = y.sum(), len(y) - y.sum()
  return float((rank[y].sum() - n1 * (n1 - 1) / 2) / (n1 * n0))


def main():
  td = os.path.join(sys.argv[1], "tandem")
  tandem = load_workdir(td).model
  bench = bench_cfg.get_config("smollm2")
  k, r = int(bench.gamma_max), bench.router
  # the benchmark's router, as benchmarks/auto_policy.py gets it: reused while its settings match the preset's
  router = recipe_router.train_router(td, steps=int(r.steps), gamma_max=k, top_k=int(r.top_k), hidden=int(r.hidden),
                                      sampled_sequences=int(r.sampled_sequences))["router"]
  with open(os.path.join(td, RECIPE_FILE)) as fh:
    rc = RecipeConfig(**json.load(fh))
  dd = os.path.join(td, DATA_DIR)
  data = {f[:-4]: np.load(os.path.join(dd, f)) for f in os.listdir(dd) if f.endswith(".npy")}
  target = target_index(data["labels"], data["draft_ids"], tandem.primary.cfg.vocab_size)
  _, val = split_rows(len(data["tokens"]), rc.val_fraction)

  @jax.jit
  def predict(tokens, hidden, offset):
    q = tandem.secondary_forward(tokens, k, hidden, block_offset_b=offset)
    flat = q.reshape(-1, q.shape[-1])
    a = router.accept_prob(flat, tandem.secondary.output_embedding(), True).reshape(q.shape[:2])
    return jnp.argmax(q, -1), a, jnp.max(jax.nn.softmax(q.astype(jnp.float32), -1), -1)

  pred, ok, pos, top1 = [], [], [], []
  for i in range(0, len(val) - 7, 8):
    b = batch_at(data, val[i:i + 8], target, "tandem", k, None)
    am, a, p1 = (np.asarray(x) for x in predict(b["tokens"], b["hidden"], b["offset"]))
    m = b["mask"] > 0
    pred.append(a[m])
    ok.append((am == b["target"])[m])
    pos.append(np.broadcast_to(np.arange(am.shape[1]) % k, am.shape)[m])
    top1.append(p1[m])
  pred, ok, pos, top1 = map(np.concatenate, (pred, ok, pos, top1))
  print(f"{len(pred)} held-out greedy positions: acceptance {ok.mean():.3f}, predicted {pred.mean():.3f}; AUC of the "
        f"router {auc(pred, ok):.3f}, of the secondary's top-1 probability {auc(top1, ok):.3f}")
  for j in range(k):
    s = pos == j
    print(f"  block index {j}: acceptance {ok[s].mean():.3f}, predicted {pred[s].mean():.3f}, "
          f"AUC {auc(pred[s], ok[s]):.3f}")
  for lo, hi in [(0, .2), (.2, .4), (.4, .6), (.6, .8), (.8, 1.01)]:
    s = (pred >= lo) & (pred < hi)
    print(f"  predicted in [{lo}, {min(hi, 1)}): {s.mean():.3f} of positions, acceptance {ok[s].mean():.3f}")


if __name__ == "__main__":
  main()
