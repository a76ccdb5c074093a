"""Every stage on :tiny, chained as in the paper: primary -> secondary -> secondary_distil, tandem (both) ->
tandem_distil -> router, llm_to_slm. Frozen parameters stay bitwise unchanged and have no optimizer state."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base

from tandem_jax import workdir as workdir_lib
from tandem_jax.models import LLMToSLM, TandemLM, Transformer
from tandem_jax.models.bundle import RouterBundle

pytestmark = pytest.mark.slow  # seven chained trainings: ~2.5 min of compiles on 2 free cores


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def adam_mu(opt_state):
  """The first-moment tree of the AdamW state (it mirrors exactly the trainable params)."""
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")):
    if hasattr(node, "mu"):
      return node.mu
  raise AssertionError("no Adam state")


@pytest.fixture(scope="module")
def runs(tiny_chain):
  return tiny_chain


def test_every_stage_trains_and_reports(runs):
  for stage, r in runs.items():
    assert r["step"] == 2, stage
    assert np.isfinite(r["train"]["loss"]), stage
  for stage in ("secondary", "secondary_distil", "tandem", "tandem_distil", "llm_to_slm"):
    ev = runs[stage]["eval"]
    assert 0 <= ev["agreement"] <= 1 and 0 <= ev["tv"] <= 1, stage
  assert "distil_ce" in runs["secondary_distil"]["train"] and "distil_ce" in runs["tandem_distil"]["train"]
  ev = runs["router"]["eval"]
  for name in ("router", "router_greedy"):
    assert 0 <= ev[f"{name}_pred"] <= 1 and 0 <= ev[f"{name}_label"] <= 1 and 0 <= ev[f"{name}_decision_acc"] <= 1


def test_frozen_parts_unchanged_and_without_optimizer_state(runs):
  primary = workdir_lib.load_workdir(runs["primary"]["workdir"]).model
  primary_params = jax.tree.map(np.asarray, primary)
  for stage, attr in (("secondary_distil", "teacher"), ("tandem", "primary"), ("tandem_distil", "primary"),
                      ("llm_to_slm", "primary")):
    state = runs[stage]["state"]
    assert set(state["frozen"]) == {attr}, stage
    assert leaves_equal(state["frozen"][attr], primary_params), stage
    assert attr not in adam_mu(state["opt_state"]), stage
    assert jax.tree.structure(adam_mu(state["opt_state"])) == jax.tree.structure(state["params"]), stage
  # The tandem's secondary started from the standalone secondary's weights: two AdamW steps (the first at lr 0 in
  # warmup, the second moving each weight by about lr) leave it within a few lr of them, where an independent
  # initialisation would be about its own scale away.
  secondary = nnx.state(workdir_lib.load_workdir(runs["secondary"]["workdir"]).model, nnx.Param).to_pure_dict()
  drift = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       runs["tandem"]["state"]["params"]["secondary"], secondary)
  assert max(jax.tree.leaves(drift)) < 3 * base.get_config("tandem", "tiny").train.lr
  router = runs["router"]["state"]
  assert set(router["frozen"]) == {"tandem"} and set(adam_mu(router["opt_state"])) == {"router"}
  tandem_distil = workdir_lib.load_workdir(runs["tandem_distil"]["workdir"]).model
  assert leaves_equal(router["frozen"]["tandem"], jax.tree.map(np.asarray, tandem_distil))


def test_loaded_models_and_provenance(runs):
  kinds = {"primary": Transformer, "secondary": Transformer, "secondary_distil": Transformer, "tandem": TandemLM,
           "tandem_distil": TandemLM, "llm_to_slm": LLMToSLM, "router": RouterBundle}
  for stage, kind in kinds.items():
    loaded = workdir_lib.load_workdir(runs[stage]["workdir"])
    assert isinstance(loaded.model, kind) and loaded.stage == stage and loaded.step == 2
  sources = workdir_lib.read_json(runs["tandem_distil"]["workdir"])["sources"]
  assert sources["tandem_workdir"]["sources"]["primary_workdir"]["workdir"] == runs["primary"]["workdir"]


def test_evaluator_with_the_primary_computed_once(runs):
  """Metrics from shared primary outputs (the benchmark computes the primary's forward once for all its models)
  equal those of each model's own primary forward, for the primary, a secondary (reference) and the tandems."""
  from tandem_jax.bench import quality
  from tandem_jax.training import evaluation

  loaded = {s: workdir_lib.load_workdir(runs[s]["workdir"]) for s in ("primary", "secondary", "tandem_distil")}
  primary = loaded["primary"]
  cfg = primary.config
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(1, cfg.primary.vocab_size, (cfg.train.batch_size, cfg.data.seq_len))}
             for _ in range(2)]
  mesh = workdir_lib.default_mesh(cfg)
  shared = evaluation.Evaluator(cfg, mesh).primary_outputs(primary.model, batches)
  assert quality.same_weights(loaded["tandem_distil"].model.primary, primary.model)
  assert not quality.same_weights(loaded["secondary"].model, primary.model)
  for stage, model, reference in (("primary", primary.model, None),
                                  ("secondary", loaded["secondary"].model, primary.model),
                                  ("tandem_distil", loaded["tandem_distil"].model, None)):
    config = loaded.get(stage, primary).config
    own = evaluation.Evaluator(config, mesh)(model, reference, batches)
    given = evaluation.Evaluator(config, mesh)(model, None, batches, shared)
    assert set(own) == set(given) and own["tokens"] == given["tokens"] > 0, stage
    for k in own:
      np.testing.assert_allclose(given[k], own[k], rtol=1e-5, atol=1e-6, err_msg=f"{stage} {k}")
  with pytest.raises(ValueError, match="primary outputs for"):
    evaluation.Evaluator(cfg, mesh)(primary.model, None, batches, shared[:1])
