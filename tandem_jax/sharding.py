"""Meshes, logical axis rules and the one activation-constraint helper.

Every parameter carries logical axis names (e.g. ``("embed", "mlp")``); the mapping from logical names to mesh axes
lives in the config (``config.mesh.rules``) and is applied here and nowhere else.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# libtpu flags every TPU program of this project is compiled with (train on a TPU VM, the deviceless compiles).
# Windowed einsum (collective matmul) off: with FSDP it turned each MLP matmul into an 8-step loop that re-reads
# the [tokens, d_ff] activations or accumulates the whole output every step. Measured on the v5e16 tandem train
# step (deviceless compile, HBM traffic by aot.hbm_traffic; docs/tpu.md): 540 -> 227 GB per device per step, the MLP
# part 290 -> 22 GB. The weights are all-gathered whole instead (XLA's async collectives still overlap them with
# compute). A flag already in LIBTPU_INIT_ARGS wins over these.
TPU_XLA_FLAGS = {"xla_tpu_enable_windowed_einsum_for_all_gather": "false",
                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false"}


def set_tpu_flags(env=None) -> str:
  """Adds :data:`TPU_XLA_FLAGS` to ``env["LIBTPU_INIT_ARGS"]`` (default os.environ) where the flag is not set there
  already, and returns the result. libtpu reads it once, when it starts: call before the first TPU use."""
  env = os.environ if env is None else env
  args = env.get("LIBTPU_INIT_ARGS", "").split()
  have = {re.sub(r"^--?", "", a).split("=")[0] for a in args}
  args += [f"--{k}={v}" for k, v in TPU_XLA_FLAGS.items() if k not in have]
  env["LIBTPU_INIT_ARGS"] = " ".join(args)
  return env["LIBTPU_INIT_ARGS"]


Rules = tuple[tuple[str, Any], ...]

# Logical names used by the models. Parameters: vocab, embed, heads, kv_heads, mlp, norm, primary_embed, proj_hidden,
# layers (leading axis of stacked layers when scan_layers).
# Activations: batch, length, act_embed, act_heads, act_mlp, act_vocab. KV cache (tandem_jax.cache): cache_batch,
# cache_sequence, cache_heads, cache_kv.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("primary_embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("proj_hidden", "model"),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scan_layers models: every device holds its share of every layer
    ("cache_batch", ("data", "fsdp")),
    ("cache_sequence", None),
    ("cache_heads", "model"),
    ("cache_kv", None),
)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices=None) -> Mesh:
  """A mesh with Auto axis types (Explicit axes break logical sharding constraints)."""
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis names {axis_names} differ in length")
  devices = list(jax.devices()) if devices is None else list(devices)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but {len(devices)} are available "
                     f"({devices[0].platform})")
  return Mesh(np.asarray(devices).reshape(shape), axis_names, axis_types=(AxisType.Auto,) * len(shape))


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """``mesh_cfg.shape`` with its -1 (at most one) filled so that the mesh holds ``num_devices`` devices.

  Raises ValueError naming ``config.mesh.shape`` when the shape cannot hold exactly that many devices."""
  shape, axes = [int(s) for s in mesh_cfg.shape], tuple(mesh_cfg.axes)

  def check(ok: bool, message: str):
    if not ok:
      raise ValueError(f"config.mesh.shape: {message}")

  check(len(shape) == len(axes), f"{tuple(shape)} and config.mesh.axes {axes} differ in length")
  check(shape.count(-1) <= 1, f"at most one -1 is allowed, got {tuple(shape)}")
  check(all(s == -1 or s >= 1 for s in shape), f"sizes must be positive or -1, got {tuple(shape)}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    check(num_devices % known == 0, f"{tuple(shape)}: {num_devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  check(math.prod(shape) == num_devices,
        f"{tuple(shape)} needs {math.prod(shape)} devices but {num_devices} are available")
  return tuple(shape)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
  """``mesh_cfg.shape`` may contain one -1, filled with the remaining device count."""
  devices = list(jax.devices()) if devices is None else list(devices)
  return make_mesh(resolve_mesh_shape(mesh_cfg, len(devices)), mesh_cfg.axes, devices)


def batch_shards(rules: Rules, mesh_shape: dict[str, int]) -> int:
  """How many ways a batch is split: the product of the mesh axes (name -> size) the 'batch' rule maps to."""
  target = dict(rules).get("batch")
  axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return math.prod(mesh_shape.get(a, 1) for a in axes)


def rules_of(config) -> Rules:
  """The logical -> mesh rules of a config (``config.mesh.rules``; lists from config.json back to tuples)."""
  return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)


def _mesh_axes(logical: Sequence[str | None], rules: Rules, mesh_axis_names) -> P:
  table = dict(rules)
  out, used = [], set()
  for name in logical:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a in mesh_axis_names and a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def fit_spec(shape: Sequence[int], spec: P, mesh_shape: dict[str, int]) -> P:
  """``spec`` with the mesh axes that do not divide their dimension dropped (that dimension left unsharded)."""
  fixed = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    size = math.prod(mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else (axes or ())))
    fixed.append(axes if axes and dim % size == 0 else None)
  return P(*fixed)


def logical_sharding(shape: Sequence[int], logical: Sequence[str | None], rules: Rules, mesh: Mesh) -> NamedSharding:
  """The NamedSharding of an array of ``shape`` whose axes have the logical names ``logical``, fitted to ``shape``."""
  spec = _mesh_axes(tuple(logical), rules, mesh.axis_names)
  return NamedSharding(mesh, fit_spec(shape, spec, dict(mesh.shape)))


def logical_to_mesh(pspec_tree, rules: Rules, mesh: Mesh):
  """Maps a tree of logical PartitionSpecs to NamedShardings on ``mesh`` (mesh axes absent from it are dropped)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, _mesh_axes(tuple(spec), rules, mesh.axis_names)),
                      pspec_tree, is_leaf=lambda x: isinstance(x, P))


def param_shardings(abstract_state, rules: Rules, mesh: Mesh):
  """NamedShardings for an nnx.State whose Params carry ``out_sharding`` logical names."""
  return logical_to_mesh(nnx.get_partition_spec(abstract_state), rules, mesh)


def sharded_abstract(abstract_state, rules: Rules, mesh: Mesh) -> dict:
  """An abstract nnx.State as a pure dict of ShapeDtypeStructs, each carrying its parameter's mesh sharding."""
  shardings = param_shardings(abstract_state, rules, mesh).to_pure_dict()
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state.to_pure_dict(), shardings)


def logical_names(abstract_state):
  """The logical axis names of every variable (None where a variable has none)."""
  def names(v):
    return v.get_metadata().get("out_sharding")
  return jax.tree.map(names, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def use_rules(rules: Rules):
  """Activates logical axis rules for :func:`constrain` (use together with ``jax.set_mesh(mesh)``)."""
  with flax_spmd.logical_axis_rules(rules):
    yield


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to the mesh sharding of its logical axes; a no-op with no mesh or no rules."""
  rules = flax_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  spec = _mesh_axes(tuple(logical), tuple(rules), mesh.axis_names)
  # Leave dimensions the mesh does not divide unconstrained rather than failing.
  return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, spec, dict(mesh.shape)))


def create_sharded(constructor, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, seed: int = 0):
  """Builds ``constructor(rngs)`` with every parameter created directly in its mesh sharding.

  The module is traced abstractly first (nothing allocated), its logical names mapped through ``rules``, then
  initialised by one jitted function with those ``out_shardings``, so no parameter is ever materialised unsharded.
  Without a mesh the module is built on the default device.
  """
  with nnx.use_eager_sharding(False):
    if mesh is None:
      return constructor(nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: constructor(nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, rules, mesh)

    def init():
      with nnx.use_eager_sharding(False):
        return nnx.state(constructor(nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
      state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
