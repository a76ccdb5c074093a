"""Deviceless stand-ins for a Cloud TPU topology: its mesh, and models and KV caches as abstract arrays that carry
their mesh shardings but hold no memory. What :mod:`tandem_jax.aot` compiles against on a machine without a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax import cache as kvcache
from tandem_jax import sharding
from tandem_jax.models.config import dtype_of


def topology_mesh(topology: str, mesh_cfg):
  """A mesh over the devices of a named TPU topology (no TPU needed): ``config.mesh`` with its -1 filled.
  Compiles for it use :data:`sharding.TPU_XLA_FLAGS` (set here, before libtpu starts, unless
  LIBTPU_INIT_ARGS sets them)."""
  sharding.set_tpu_flags()
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # noqa: BLE001 - libtpu absent or a topology name it does not know
    raise RuntimeError(f"cannot build TPU topology {topology!r}: {e}. Install the tpu extra "
                       f"(pip install -e '.[tpu]') and use a name such as v5e:2x2, v5e:4x4, v5e:16x16") from None
  shape = sharding.resolve_mesh_shape(mesh_cfg, len(topo.devices))
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


def abstract_array(shape, dtype, logical, mesh, rules) -> jax.ShapeDtypeStruct:
  """An abstract array whose axes have the logical names ``logical``, sharded through ``rules``."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.logical_sharding(shape, logical, rules, mesh))


def abstract_cache(cfg, batch: int, capacity: int, mesh, rules) -> kvcache.KVCache:
  """The KV cache ``cfg``'s model would create (:func:`tandem_jax.cache.init_cache`), as abstract arrays."""
  shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype_of(cfg.dtype)
  lengths = abstract_array((batch,), jnp.int32, kvcache.LENGTHS_AXES, mesh, rules)
  if cfg.scan_layers:  # one [L, B, S, K, H] buffer, the layer axis unsharded
    stacked = abstract_array((cfg.num_layers, *shape), dtype, kvcache.STACKED_AXES, mesh, rules)
    return kvcache.KVCache(k=stacked, v=stacked, lengths=lengths)
  buf = abstract_array(shape, dtype, kvcache.BUFFER_AXES, mesh, rules)
  return kvcache.KVCache(k=(buf,) * cfg.num_layers, v=(buf,) * cfg.num_layers, lengths=lengths)


def with_placeholder_inits(config):
  """Weights are abstract here, so a stage that continues from trained workdirs needs none to compile."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field in config.init:
      config.init[field] = config.init[field] or "<abstract: not read by tandem_jax.aot>"
  return config


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
