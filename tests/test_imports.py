"""The package's import graph reads one way: every import (module level or inside a function) goes down the layers
below, or stays within its own layer; and no modules import each other in a circle."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tandem_jax")

# Bottom to top. A module belongs to the layer of its longest listed prefix.
LAYERS = (
    # what everything may use: the package, the CLI conventions, progress lines, meshes and rules, the KV cache
    ("base", ("tandem_jax", "tandem_jax.cli", "tandem_jax.progress", "tandem_jax.sharding", "tandem_jax.cache")),
    ("models and data", ("tandem_jax.models", "tandem_jax.data")),
    ("interop", ("tandem_jax.interop",)),  # pretrained formats and tokenizers, onto our models and tokenizer
    ("storage", ("tandem_jax.checkpoint", "tandem_jax.workdir")),  # checkpoints and workdirs: save, load a model
    ("training and decoding", ("tandem_jax.training", "tandem_jax.decoding")),
    # libraries behind the commands; some have a `python -m` entry of their own besides
    ("applications", ("tandem_jax.topology", "tandem_jax.tpu_estimates", "tandem_jax.hlo_reading", "tandem_jax.aot",
                      "tandem_jax.bench", "tandem_jax.convert", "tandem_jax.recipe", "tandem_jax.recipe_data",
                      "tandem_jax.recipe_router", "tandem_jax.quickstart")),
    ("commands", ("tandem_jax.train", "tandem_jax.evaluate", "tandem_jax.generate", "tandem_jax.benchmark")),
)


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _parents(name: str):
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str) -> dict[str, int]:
  """{imported tandem_jax module: line} for every import statement of module ``name``, wherever it stands.

  ``from a.b import c`` names the module a.b.c when there is one (else a.b); importing a module also runs its
  packages' __init__, so those count too."""
  path = MODULES[name]
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = {}
  for node in ast.walk(ast.parse(open(path).read(), path)):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    for t in targets:
      if t.split(".")[0] != "tandem_jax":
        continue
      for m in _parents(t) + [t]:
        if m != name and m not in _parents(name):
          found.setdefault(m, node.lineno)
  return found


def layer_of(name: str) -> int:
  best, level = -1, None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (name == p or name.startswith(p + ".")) and len(p) > best:
        best, level = len(p), i
  return level


def test_every_module_has_a_layer():
  assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_upward_imports():
  upward = []
  for name in sorted(MODULES):
    for target, line in imports_of(name).items():
      if target in MODULES and layer_of(target) > layer_of(name):
        upward.append(f"{MODULES[name]}:{line}: {name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                      f"({LAYERS[layer_of(target)][0]})")
  assert upward == [], "\n".join(upward)


def test_no_import_cycles():
  graph = {name: [t for t in imports_of(name) if t in MODULES] for name in MODULES}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in graph[m]:
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("entry", ["tandem_jax.workdir", "tandem_jax.decoding", "tandem_jax.generate"])
def test_loading_and_decoding_need_no_training_code(entry):
  """A model is loaded for generation by models/ and workdir.py alone: no optimizer, no train step."""
  seen, todo = set(), [entry]
  while todo:
    m = todo.pop()
    if m in seen or m not in MODULES:
      continue
    seen.add(m)
    todo += list(imports_of(m))
  assert sorted(m for m in seen if m.startswith("tandem_jax.training")) == []
