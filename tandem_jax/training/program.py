"""The compiled training program: train state, optimizer, shardings and the jitted step.

  state = {"step": int32[], "params": trainable params, "frozen": frozen params, "opt_state": optax state}

``params`` and ``frozen`` are pure dicts of the stage bundle's nnx state (see models/bundle.py); the optimizer sees only
``params``, so frozen weights have no gradient and no optimizer state. :func:`build_train_program` needs only a mesh
(which may be an abstract TPU topology with no devices attached) and never allocates, so a deviceless TPU compile can::

  program = build_train_program(config, mesh)
  compiled = program.step.lower(program.abstract_state, program.batch_spec, program.rng_spec).compile()
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tandem_jax import sharding
from tandem_jax.data import PAD_ID
from tandem_jax.models import bundle as bundle_lib
from tandem_jax.training import stages


def learning_rate(config) -> optax.Schedule:
  """Linear warmup to ``lr``, then cosine decay to 10% of it at ``steps``."""
  tr = config.train
  warmup = min(int(tr.warmup_steps), max(int(tr.steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, tr.lr, warmup, max(int(tr.steps), warmup + 1), tr.lr * 0.1)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) after global-norm clipping."""
  tr = config.train
  parts = [optax.clip_by_global_norm(tr.grad_clip)] if tr.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate(config), b1=0.9, b2=0.95, eps=1e-8, weight_decay=tr.weight_decay,
                           mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  return optax.chain(*parts)


def to_batch(tokens_bt: jax.Array, mask_bt: jax.Array | None = None) -> dict:
  """{"inputs", "targets", "mask"} from packed rows [B, seq_len]: a pad id is never a target."""
  inputs, targets = tokens_bt[:, :-1], tokens_bt[:, 1:]
  mask = (targets != PAD_ID).astype(jnp.float32)
  if mask_bt is not None:
    mask = mask * mask_bt[:, 1:].astype(jnp.float32)
  return {"inputs": inputs, "targets": targets, "mask": mask}


@dataclasses.dataclass
class TrainProgram:
  """Everything needed to initialise, run, checkpoint or AOT-compile one stage's training.

  Attributes:
    step: jitted ``train_step(state, batch, rng) -> (state, metrics)``; ``batch`` is ``{"tokens": int32[B, S]}``
      (optionally ``"mask"``), ``rng`` a key array; the state is donated.
    abstract_state: the state as ShapeDtypeStructs carrying their NamedShardings.
    state_shardings: the same tree of NamedShardings.
    batch_spec / rng_spec: ShapeDtypeStructs of the step's other arguments (global batch, sharded on 'batch').
    batch_sharding: NamedSharding for a [B, S] token batch.
    graphdef: the stage bundle's nnx GraphDef (``bundle.merge_bundle(graphdef, params, frozen)`` rebuilds it).
    optimizer: the optax transformation over ``state["params"]``.
    mesh, rules: where it all runs.
  """

  config: ml_collections.ConfigDict
  mesh: Any
  rules: tuple
  graphdef: Any
  optimizer: optax.GradientTransformation
  step: Callable
  abstract_state: dict
  state_shardings: dict
  batch_spec: dict
  rng_spec: jax.ShapeDtypeStruct
  batch_sharding: NamedSharding

  def init_state(self, bundle: nnx.Module) -> dict:
    """A fresh train state (step 0) from an initialised bundle, placed in ``state_shardings``."""
    _, params, frozen = bundle_lib.split_bundle(self.config.stage, bundle)
    return self.state_from(params, frozen)

  def state_from(self, params: dict, frozen: dict, step: int = 0, opt_state=None) -> dict:
    sh = self.state_shardings
    params = jax.device_put(params, sh["params"])
    frozen = jax.device_put(frozen, sh["frozen"])
    if opt_state is None:
      with jax.set_mesh(self.mesh):
        opt_state = jax.jit(self.optimizer.init, out_shardings=sh["opt_state"])(params)
    return {"step": jax.device_put(jnp.asarray(step, jnp.int32), sh["step"]), "params": params, "frozen": frozen,
            "opt_state": opt_state}

  def bundle(self, state: dict) -> nnx.Module:
    return bundle_lib.merge_bundle(self.graphdef, state["params"], state["frozen"])

  def global_batch(self, local: dict) -> dict:
    """Per-process numpy rows -> global arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_train_program(config: ml_collections.ConfigDict, mesh) -> TrainProgram:
  """The jitted train step of ``config.stage`` on ``mesh`` with its abstract state and argument specs.

  Call ``validate(config)`` first. Nothing is allocated or compiled here: ``mesh`` may be a device mesh or one
  built from an abstract TPU topology (``jax.experimental.topologies``), and ``program.step.lower(...)`` compiles.
  """
  rules = sharding.rules_of(config)
  graphdef, trainable, frozen = bundle_lib.abstract_bundle(config)
  params_abs = sharding.sharded_abstract(trainable, rules, mesh)
  frozen_abs = sharding.sharded_abstract(frozen, rules, mesh)
  param_sh, frozen_sh = (jax.tree.map(lambda x: x.sharding, t) for t in (params_abs, frozen_abs))
  tx = make_optimizer(config)
  replicated = NamedSharding(mesh, P())
  opt_abs = jax.eval_shape(tx.init, params_abs)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = {"step": replicated, "params": param_sh, "frozen": frozen_sh, "opt_state": opt_sh}
  abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": params_abs,
                    "frozen": frozen_abs, "opt_state": _with_sharding(opt_abs, opt_sh)}

  batch_sharding = sharding.logical_to_mesh(P("batch", None), rules, mesh)
  b, s = int(config.train.batch_size), int(config.data.seq_len)
  batch_spec = {"tokens": jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=batch_sharding)}
  rng_spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  schedule = learning_rate(config)

  def train_step(state, batch, rng):
    del rng  # No dropout or sampling in these stages; kept so every step has the same signature.
    data = to_batch(batch["tokens"], batch.get("mask"))

    def loss_of(params):
      return stages.loss_fn(config, bundle_lib.merge_bundle(graphdef, params, state["frozen"]), data)

    with sharding.use_rules(rules):
      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
    new_state = {"step": state["step"] + 1, "params": params, "frozen": state["frozen"], "opt_state": opt_state}
    return new_state, metrics

  step = jax.jit(train_step, in_shardings=(state_sh, batch_sharding, replicated),
                 out_shardings=(state_sh, replicated), donate_argnums=0)
  return TrainProgram(config=config, mesh=mesh, rules=rules, graphdef=graphdef, optimizer=tx,
                      step=_under_mesh(step, mesh, rules), abstract_state=abstract_state, state_shardings=state_sh,
                      batch_spec=batch_spec, rng_spec=rng_spec, batch_sharding=batch_sharding)


class _under_mesh:
  """Wraps a jitted function so calls and ``lower`` run under ``jax.set_mesh(mesh)`` and the logical rules."""

  def __init__(self, fn, mesh, rules):
    self.fn, self.mesh, self.rules = fn, mesh, rules
    functools.update_wrapper(self, fn)

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      return self.fn.lower(*args)
