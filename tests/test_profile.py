"""The decode profiler's parsing: scopes of compiled ops and per-op self times from a real jax.profiler trace."""

import re

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
      with jax.named_scope("verify"):  # tanh before the multiply: no fusion carries it into append's add
        x = jnp.tanh(x) @ w
      with jax.named_scope("append"):
        x = x + 1.0
      return x
    return jax.lax.fori_loop(0, 5, body, x)

  x, w = jnp.ones((64, 256)), jnp.full((256, 256), 1e-3)
  compiled = jax.jit(f).lower(x, w).compile()
  text = compiled.as_text()
  scopes = profile.op_scopes(text)
  # the multiply is verify's, and so is the fusion that calls it; the add after it is append's; the counter the loop's
  dots = re.findall(r"%([\w.\-]+) = \S+ dot\(", text)
  computations = {block.split()[0].lstrip("%"): block for block in text.split("\n\n") if block.strip()}
  callers = [n for n, comp in re.findall(r"%([\w.\-]+) = .*calls=%([\w.\-]+)", text)
             if " dot(" in computations.get(comp, "")]
  assert dots and {scopes[n] for n in dots + callers} == {"verify"}
  assert {"append", "loop_other", "outside_loop"} <= set(scopes.values())
  jax.block_until_ready(compiled(x, w))
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  jax.block_until_ready(compiled(x, w))
  jax.profiler.stop_trace()
  self_us, count, _ = profile.thunk_self_times(str(tmp_path))
  assert count >= 5 and all(v >= -1.0 for v in self_us.values())  # every one of the 5 iterations ran ops
  by_scope = {}
  for name, us in self_us.items():
    by_scope[scopes.get(name, "unattributed")] = by_scope.get(scopes.get(name, "unattributed"), 0.0) + us
  # a tanh and a [64, 256] x [256, 256] multiply per iteration cost more than adding 1 to the result
  assert by_scope.get("verify", 0.0) > by_scope.get("append", 0.0)
