"""Sharded models on 8 fake CPU devices compute what one device computes; every parameter has logical names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import tiny_config
from tandem_jax import sharding
from tandem_jax.models import LLMToSLM, TandemConfig, TandemLM, Transformer

MESHES = [((2, 4), ("data", "model")), ((8,), ("fsdp",)), ((2, 2, 2), ("data", "fsdp", "model"))]


def _tandem_ctor(rngs):
  p = tiny_config(d_model=64, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, d_ff=128)
  s = tiny_config(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64)
  return TandemLM(p, s, TandemConfig(), rngs)


def test_every_parameter_has_logical_names():
  for ctor in (_tandem_ctor, lambda r: LLMToSLM(tiny_config(), tiny_config(d_model=16, head_dim=4), r),
               lambda r: Transformer(tiny_config(tie_embeddings=False, qkv_bias=True), r)):
    with nnx.use_eager_sharding(False):
      state = nnx.state(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))), nnx.Param)
    names = jax.tree.leaves(sharding.logical_names(state), is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.tree.leaves(state)
    assert len(names) == len(shapes) > 0
    for n, v in zip(names, shapes):
      assert isinstance(n, tuple) and len(n) == v.ndim, (n, v.shape)


@pytest.mark.parametrize("mesh_shape,axes", MESHES)
def test_sharded_tandem_forward_equals_single_device(mesh_shape, axes):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)), jnp.int32)
  single = sharding.create_sharded(_tandem_ctor, seed=1)
  want_s, want_l = nnx.jit(lambda m, t: m.forward(t, 2))(single, tokens)

  mesh = sharding.make_mesh(mesh_shape, axes)
  model = sharding.create_sharded(_tandem_ctor, mesh, seed=1)
  params = nnx.state(model, nnx.Param)
  # parameters really are distributed: some leaf is split over more than one device
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
  with jax.set_mesh(mesh), sharding.use_rules(sharding.DEFAULT_RULES):
    tokens_sh = jax.device_put(tokens, jax.NamedSharding(mesh, jax.P(axes[0])))
    got_s, got_l = nnx.jit(lambda m, t: m.forward(t, 2))(model, tokens_sh)
  np.testing.assert_allclose(got_s, want_s, atol=2e-5)
  np.testing.assert_allclose(got_l, want_l, atol=2e-5)


def test_sharded_cached_extend_equals_single_device():
  ctor = lambda r: Transformer(tiny_config(num_heads=8, num_kv_heads=4, head_dim=8), r)  # noqa: E731
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 12)), jnp.int32)
  step = nnx.jit(lambda m, t, c: m.extend(t, c))
  single = sharding.create_sharded(ctor, seed=3)
  want, _, _ = step(single, tokens, single.init_cache(4, 16))
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  model = sharding.create_sharded(ctor, mesh, seed=3)
  with jax.set_mesh(mesh), sharding.use_rules(sharding.DEFAULT_RULES):
    got, _, cache = step(model, tokens, model.init_cache(4, 16))
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_array_equal(cache.lengths, 12)


def test_kv_cache_is_sharded_where_it_is_created_by_the_rules():
  from configs import base
  from tandem_jax import cache as kvcache
  from tandem_jax.topology import abstract_cache
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  rules = sharding.rules_of(base.get_config("tandem", "tiny"))  # config.mesh.rules: the one table
  cfg = tiny_config(num_kv_heads=4)
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    cache = jax.jit(lambda: kvcache.init_cache(cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim))()
  buffer = NamedSharding(mesh, P("data", None, "model", None))  # cache_batch, cache_sequence, cache_heads, cache_kv
  assert cache.k[0].sharding.is_equivalent_to(buffer, 4) and cache.v[-1].sharding.is_equivalent_to(buffer, 4)
  assert cache.lengths.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
  # the deviceless compile (tandem_jax.aot) lays the cache out by the same names and rules
  abstract = abstract_cache(cfg, 4, 16, mesh, rules)
  assert abstract.k[0].sharding.is_equivalent_to(buffer, 4)
  assert abstract.lengths.sharding.is_equivalent_to(cache.lengths.sharding, 1)


def test_mesh_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((2, 3), ("data", "model"))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_from_config(type("M", (), {"shape": (-1, -1), "axes": ("a", "b")}))
  mesh = sharding.mesh_from_config(type("M", (), {"shape": (-1, 2), "axes": ("data", "model")}))
  assert dict(mesh.shape) == {"data": 4, "model": 2}
