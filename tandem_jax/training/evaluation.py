"""Validation metrics of any stage's model: loss and accuracy against the ground truth and, where a primary exists,
agreement with its argmax and the mean total-variation distance to it (the paper's Table 1 columns)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tandem_jax import sharding
from tandem_jax.training import losses, program, stages
from tandem_jax.training.inputs import local_rows


class Evaluator:
  """``Evaluator(config, mesh)(model, reference, rows_batches) -> metrics``; compiles once per model structure."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.rules = sharding.rules_of(config)
    self.batch_sharding = sharding.logical_to_mesh(P("batch", None), self.rules, mesh)
    self._compiled = {}

  def _fn(self, graphdef, ref_graphdef, given_primary: bool = False):
    key = (graphdef, ref_graphdef, given_primary)
    if key not in self._compiled:
      config, rules = self.config, self.rules

      def sums(state, ref_state, tokens, primary_out):
        model = nnx.merge(graphdef, state)
        ref = None if ref_graphdef is None else nnx.merge(ref_graphdef, ref_state)
        with sharding.use_rules(rules):
          return stages.eval_sums(config, model, ref, program.to_batch(tokens), primary_out)

      self._compiled[key] = jax.jit(sums, out_shardings=NamedSharding(self.mesh, P()))
    return self._compiled[key]

  def _device_batches(self, batches: list[dict]):
    for batch in batches:
      rows = local_rows(np.asarray(batch["tokens"]), jax.process_index(), jax.process_count())
      yield jax.make_array_from_process_local_data(self.batch_sharding, rows)

  def primary_outputs(self, primary: nnx.Module, batches: list[dict]) -> list:
    """The primary's ``forward(inputs, return_hidden=True)`` (logits, hidden) of each batch, on device: computed
    once and passed as ``primary_outputs`` to evaluate several models against (or on top of) the same primary."""
    graphdef, state = nnx.split(primary)
    rules = self.rules

    @jax.jit
    def fwd(state, tokens):
      with sharding.use_rules(rules):
        return nnx.merge(graphdef, state).forward(program.to_batch(tokens)["inputs"], return_hidden=True)

    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      return [fwd(state, tokens) for tokens in self._device_batches(batches)]

  def __call__(self, model: nnx.Module, reference: nnx.Module | None, batches: list[dict],
               primary_outputs: list | None = None) -> dict:
    """Metrics over ``batches`` (each ``{"tokens": int32[B, seq_len]}``, the global batch on every process).

    ``primary_outputs`` (from ``primary_outputs``, one per batch) replace the primary's forward (the reference's,
    or the tandem's own primary, which must be the same model) for the primary, secondary and tandem stages.
    """
    if primary_outputs is not None and len(primary_outputs) != len(batches):
      raise ValueError(f"{len(primary_outputs)} primary outputs for {len(batches)} batches")
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = (None, None) if reference is None else nnx.split(reference)
    fn = self._fn(graphdef, ref_graphdef, primary_outputs is not None)
    total = None
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      for i, tokens in enumerate(self._device_batches(batches)):
        s = fn(state, ref_state, tokens, None if primary_outputs is None else primary_outputs[i])
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    if total is None:
      raise ValueError("no evaluation batches")
    return losses.finalize(jax.device_get(total))
