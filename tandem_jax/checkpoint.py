"""Orbax checkpoints of a train state plus the Grain iterator state.

Layout of ``workdir/checkpoints/<step>/``: ``params`` (trainable), ``frozen``, ``opt_state`` (orbax StandardSave,
restored straight into the target shardings) and ``data`` (Grain iterator, one JSON per process). A workdir written
by ``write_workdir`` (imported weights) has no ``opt_state`` or ``data``: training it starts a fresh optimizer.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(path, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iter=None, force: bool = False) -> bool:
  items = dict(params=ocp.args.StandardSave(state["params"]))
  if jax.tree.leaves(state["frozen"]):  # orbax refuses empty items; a stage without frozen parts saves none
    items["frozen"] = ocp.args.StandardSave(state["frozen"])
  if "opt_state" in state:
    items["opt_state"] = ocp.args.StandardSave(state["opt_state"])
  if data_iter is not None:
    import grain  # only with a data iterator: loading a model for decoding needs no Grain
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def items_at(mngr: ocp.CheckpointManager, step: int) -> set[str]:
  path = os.path.join(str(mngr.directory), str(step))
  return {d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))} if os.path.isdir(path) else set()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, data_iter=None,
            with_optimizer: bool = True) -> dict:
  """Restores ``params``/``frozen`` (and ``opt_state``, ``data`` when asked and present) into the abstract
  state's shardings. Returns a dict with the restored items and ``step``."""
  present = items_at(mngr, step)
  items = dict(params=ocp.args.StandardRestore(abstract_state["params"]))
  if jax.tree.leaves(abstract_state["frozen"]):
    items["frozen"] = ocp.args.StandardRestore(abstract_state["frozen"])
  if with_optimizer and "opt_state" in present:
    items["opt_state"] = ocp.args.StandardRestore(abstract_state["opt_state"])
  if data_iter is not None and "data" in present:
    import grain
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = dict(mngr.restore(step, args=ocp.args.Composite(**items)))
  out.pop("data", None)  # restored in place into data_iter
  out.setdefault("frozen", abstract_state["frozen"])  # empty
  out["step"] = step
  return out


def step_array(step: int, sharding) -> jax.Array:
  return jax.device_put(jnp.asarray(step, jnp.int32), sharding)
