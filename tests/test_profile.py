"""The decode profiler's parsing: scopes of compiled ops and per-op self times from a real jax.profiler trace."""

import jax
import jax.numpy as jnp

from tandem_jax.bench import profile


def test_importing_defines_no_flags():
  from absl import flags
  assert "gamma" not in flags.FLAGS  # its CLI flags exist only when run as a script (--json, --repeats collide)


def test_scope_of_innermost_known_scope():
  assert profile.scope_of("jit(_decode)/while/body/while/body/draft/draft_sample/add") == "draft_sample"
  assert profile.scope_of("jit(_decode)/while/body/verify/dot_general") == "verify"
  assert profile.scope_of("jit(_decode)/while/body/add") == "loop_other"
  assert profile.scope_of("jit(_decode)/dot_general") == "outside_loop"


def test_traced_ops_are_attributed_to_their_scopes(tmp_path):
  def f(x, w):
    def body(i, x):
      with jax.named_scope("verify"):
        x = jnp.tanh(x @ w)
      with jax.named_scope("append"):
        x = x + 1.0
      return x
    return jax.lax.fori_loop(0, 5, body, x)

  x, w = jnp.ones((64, 256)), jnp.full((256, 256), 1e-3)
  compiled = jax.jit(f).lower(x, w).compile()
  scopes = profile.op_scopes(compiled.as_text())
  assert "verify" in scopes.values()
  jax.block_until_ready(compiled(x, w))
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  jax.block_until_ready(compiled(x, w))
  jax.profiler.stop_trace()
  self_us, count, _ = profile.thunk_self_times(str(tmp_path))
  assert count > 0 and all(v >= -1.0 for v in self_us.values())
  by_scope = {}
  for name, us in self_us.items():
    by_scope[scopes.get(name, "unattributed")] = by_scope.get(scopes.get(name, "unattributed"), 0.0) + us
  assert by_scope.get("verify", 0.0) > 0.0
