"""Reading a compiled program's optimized HLO text (``compiled.as_text()``): what its loops do to the weights
(:func:`loop_weight_ops`) and the bytes it moves to and from HBM (:func:`hbm_traffic`). Used by
:mod:`tandem_jax.aot`; plain text parsing, no JAX."""

from __future__ import annotations

import math
import re


# -- what a decode loop does to its weights, read from the compiled HLO --------------------------------------------
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _computations(hlo_text: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif line.strip() == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def loop_bodies(hlo_text: str) -> dict[str, list[str]]:
  """{computation: the bodies of the ``while`` loops it runs directly}, for the entry computation and every loop
  body: loops reached through calls and conditional branches count, loops inside those loops belong to them (a
  decode loop's iterations, a drafting loop inside an iteration, ...)."""
  comps = _computations(hlo_text)
  entry = next((_COMPUTATION.match(line).group(1) for line in hlo_text.splitlines() if line.startswith("ENTRY")),
               None)

  def direct(name, seen):
    found = []
    for line in comps.get(name, ()):
      m = _OP.match(line)
      if m and m.group(2) == "while":
        found += re.findall(r"body=%?([\w.\-]+)", line)
      elif m and m.group(2) != "fusion":
        for group in _CALLEE.findall(line):
          for c in group.split(","):
            c = c.strip().lstrip("%")
            if c not in seen:
              seen.add(c)
              found += direct(c, seen)
    return found

  out, todo = {}, [entry]
  while todo:
    name = todo.pop()
    if name is None or name in out:
      continue
    out[name] = direct(name, {name})
    todo += out[name]
  return out


def loop_weight_ops(hlo_text: str, weight_elements, opcodes=("convert", "all-gather", "all-gather-done"),
                    whole_program: bool = False, result_dtypes=None, bodies=None) -> list[dict]:
  """The ``opcodes`` ops that write a weight-sized array (as many elements as a weight: ``weight_elements``, the
  counts per device and whole) inside ``while`` loop bodies and what they call: a weight converted or gathered
  on every iteration, where it should be done once before the loop. ``whole_program``: the whole program instead
  (a per-call program runs once per decoding step: all of it is the iteration).

  Only results that reach memory count: top-level ops and fusions whose root is such an op. Inside a fusion a
  convert is a register value (TPU computes a 1-row matmul as a fused multiply-reduce in f32, converting the bf16
  weight on the fly while reading it once). ``result_dtypes`` (e.g. {"bf16"}): only results of these HLO dtypes
  (the CPU backend upcasts bf16 dot operands to f32 itself, a lowering the TPU does not have).

  ``bodies``: only these loop bodies (and what they call, their inner loops included), instead of every loop's.

  Reads the optimized HLO text (``compiled.as_text()``); returns [{computation, opcode, shape, elements}]."""
  comps = _computations(hlo_text)
  sizes = {int(n) for n in weight_elements}

  def root_op(name):
    for line in comps.get(name, ()):
      if line.lstrip().startswith("ROOT"):
        m = _OP.match(line)
        return m.group(2) if m else None
    return None

  roots = set()
  for line in hlo_text.splitlines():
    if whole_program and line.startswith("ENTRY"):
      roots.add(_COMPUTATION.match(line).group(1))
    elif not whole_program and bodies is None and " while(" in line:
      roots.update(re.findall(r"body=%?([\w.\-]+)", line))
  if bodies is not None and not whole_program:
    roots.update(bodies)
  found, seen, todo = [], set(), sorted(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      m = _OP.match(line)
      callees = [c.strip().lstrip("%") for group in _CALLEE.findall(line) for c in group.split(",")]
      if m and m.group(2) == "fusion":
        opcode = next((root_op(c) for c in callees if root_op(c) in opcodes), None)
      else:
        todo += callees
        opcode = m.group(2) if m and m.group(2) in opcodes else None
      if opcode is None:
        continue
      for dtype, dims in _SHAPE.findall(m.group(1)):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        if n in sizes and (result_dtypes is None or dtype in result_dtypes):
          found.append(dict(computation=name, opcode=opcode, shape=f"{dtype}[{dims}]", elements=n))
  return found


# -- HBM traffic of a compiled program, from its memory spaces -----------------------------------------------------
# XLA's "bytes accessed" adds up every operand and result of every top-level op, whatever memory it lives in. On TPU
# the compiler's memory-space assignment prefetches weights into on-chip memory (layouts marked S(1); S(2)/S(6) are
# scalar memories): a weight is then counted when it is copied there (read and write) and again when a fusion reads
# it, so a decode call's "bytes accessed" is several times the HBM bytes it moves. hbm_traffic counts only arrays
# in HBM (layouts without S(n)): a copy/slice into on-chip memory reads its (sliced) source once; a fusion reads its
# HBM operands (only the slices it takes where a parameter feeds only dynamic-slice/slice/gather, nothing where it
# is the buffer of an in-place dynamic-update-slice) and writes its HBM results (only the update of an in-place
# dynamic-update-slice). A model of the compiled program, not a TPU measurement; on CPU (no memory spaces) it is
# the operand and result bytes of the top-level ops with those two refinements.
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\](\{[^}]*\})?")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_NO_TRAFFIC = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "copy-done", "slice-done",
               "partition-id", "replica-id", "after-all", "opt-barrier", "all-reduce-done", "all-gather-done",
               "collective-permute-done", "async-done", "send-done", "recv-done"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def _arrays(shape: str) -> list[tuple[int, int]]:
  """[(bytes, memory space)] of the arrays in an HLO shape (a tuple's leaves in order); space 0 is HBM."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      space = re.search(r"S\((\d+)\)", layout or "")
      out.append((n * _DTYPE_BYTES[dtype], int(space.group(1)) if space else 0))
  return out


def _hbm(shape: str) -> int:
  return sum(b for b, space in _arrays(shape) if space == 0)


def _instructions(hlo_text: str) -> tuple[dict[str, list[dict]], str | None]:
  comps, name, entry = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif line.strip() == "}":
      name = None
    elif name is not None:
      m = _INSTR.match(line)
      if m:
        root, iname, shape, opcode, rest = m.groups()
        args = rest.split("), ", 1)[0]
        comps[name].append(dict(root=bool(root), name=iname, shape=shape, opcode=opcode, line=line,
                                operands=re.findall(r"%([\w.\-]+)", args)))
  return comps, entry


def _fusion_io(body: list[dict]) -> tuple[dict[int, int | None], int | None]:
  """What a fusion body touches of its operands: {operand index: bytes read, None for all of it} and the bytes its
  root writes when that is an in-place dynamic-update-slice (None: the whole result)."""
  by_name = {i["name"]: i for i in body}
  uses: dict[str, list] = {}
  for ins in body:
    for pos, o in enumerate(ins["operands"]):
      uses.setdefault(o, []).append((ins, pos))

  def users(name):  # through bitcasts, which are views
    out = []
    for ins, pos in uses.get(name, ()):
      out += users(ins["name"]) if ins["opcode"] == "bitcast" else [(ins, pos)]
    return out

  reads = {}
  for ins in body:
    if ins["opcode"] != "parameter":
      continue
    idx = int(re.search(r"parameter\((\d+)\)", ins["line"]).group(1))
    us = users(ins["name"])
    if us and all(u["opcode"] in _SLICING and pos == 0 for u, pos in us):
      reads[idx] = sum(sum(b for b, _ in _arrays(u["shape"])) for u, _ in us)
    elif us and all(u["opcode"] == "dynamic-update-slice" and pos == 0 for u, pos in us):
      reads[idx] = 0
    else:
      reads[idx] = None

  def written(ins):
    if ins["opcode"] == "dynamic-update-slice":
      return sum(b for b, _ in _arrays(by_name[ins["operands"][1]]["shape"])) if ins["operands"][1] in by_name else None
    if ins["opcode"] == "bitcast":
      return written(by_name[ins["operands"][0]])
    if ins["opcode"] == "tuple":
      parts = [written(by_name[o]) for o in ins["operands"]]
      return None if any(p is None for p in parts) else sum(parts)
    return None

  root = next((i for i in body if i["root"]), None)
  return reads, (written(root) if root is not None else None)


def _loop_bound(comps, while_line: str) -> int | None:
  """The trip count of a while loop whose condition is ``counter < constant`` (XLA's windowed einsums over a mesh
  axis record no known_trip_count; their counters start at 0 and step by 1), else None."""
  cond = re.search(r"condition=%?([\w.\-]+)", while_line)
  body = comps.get(cond.group(1), []) if cond else []
  consts = {i["name"]: re.search(r"constant\((-?\d+)\)", i["line"]) for i in body if i["opcode"] == "constant"}
  root = next((i for i in body if i["root"]), None)
  if root is None or root["opcode"] != "compare" or "direction=LT" not in root["line"]:
    return None
  bound = consts.get(root["operands"][1]) if len(root["operands"]) > 1 else None
  return int(bound.group(1)) if bound else None


def hbm_traffic(hlo_text: str) -> dict:
  """Bytes a compiled program moves to and from HBM (see above), from its optimized HLO text
  (``compiled.as_text()``): {"bytes", "by_opcode": {opcode: bytes}, "by_source": the 12 JAX ops (metadata op_name)
  moving the most bytes, "by_scope": bytes per model part (:func:`scope_of`), "unknown_trip_counts"}. A while loop's body
  counts once per iteration where XLA recorded the trip count or its condition is ``counter < constant`` (else
  once, and counted in unknown_trip_counts)."""
  comps, entry = _instructions(hlo_text)
  shapes = {i["name"]: i["shape"] for body in comps.values() for i in body}
  by_opcode: dict[str, float] = {}
  unknown = 0

  def walk(name, times):
    nonlocal unknown
    for ins in comps.get(name, ()):
      op, operands = ins["opcode"], ins["operands"]
      if op in _NO_TRAFFIC:
        continue
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins["line"])
        n = int(trips.group(1)) if trips else _loop_bound(comps, ins["line"])
        unknown += n is None
        body = re.search(r"body=%?([\w.\-]+)", ins["line"])
        if body:
          walk(body.group(1), times * (n or 1))
        continue
      if op in ("call", "conditional", "async-start"):
        for callee in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-, %]+)\}?", ins["line"]):
          for c in callee.split(","):
            walk(c.strip().lstrip("%"), times)
        continue
      res = _arrays(ins["shape"])
      src_in_hbm = bool(operands) and _hbm(shapes.get(operands[0], "")) > 0
      if op in ("copy-start", "slice-start"):  # (dest, ...) / ((operand), dest, ...)
        dest = res[len(operands)] if op == "slice-start" else res[0]
        moved = dest[0] * src_in_hbm + dest[0] * (dest[1] == 0)
      elif op == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", ins["line"])
        reads, wrote = _fusion_io(comps.get(callee.group(1), [])) if callee else ({}, None)
        read = 0
        for i, o in enumerate(operands):
          hb = _hbm(shapes.get(o, ""))
          read += hb if reads.get(i) is None else min(hb, reads[i])
        out = _hbm(ins["shape"])
        moved = read + (out if wrote is None else min(out, wrote))
      elif op in _SLICING:
        moved = sum(b for b, _ in res) * src_in_hbm + _hbm(ins["shape"])
      elif op == "dynamic-update-slice":
        moved = 2 * sum(b for b, _ in _arrays(shapes.get(operands[1], ""))) if len(operands) > 1 else 0
      else:
        moved = sum(_hbm(shapes.get(o, "")) for o in operands) + _hbm(ins["shape"])
      by_opcode[op] = by_opcode.get(op, 0) + moved * times
      src = re.search(r'op_name="([^"]*)"', ins["line"])
      src = re.sub(r"^jit\([^)]*\)/", "", src.group(1)) if src else op
      by_source[src] = by_source.get(src, 0) + moved * times

  by_source: dict[str, float] = {}
  walk(entry, 1)
  top = dict(sorted(by_source.items(), key=lambda kv: -kv[1])[:12])
  by_scope: dict[str, float] = {}
  for src, b in by_source.items():
    by_scope[scope_of(src)] = by_scope.get(scope_of(src), 0) + b
  return dict(bytes=sum(by_opcode.values()), by_opcode=by_opcode, by_source=top, by_scope=by_scope,
              unknown_trip_counts=unknown)


def scope_of(op_name: str) -> str:
  """The model part an op belongs to: the outermost of the model's named scopes (models.layers.SCOPES) in its JAX
  op_name ("transpose(jvp(mlp))/dot_general" -> "mlp"; the projection's keys -> "projection", not "attn_proj"),
  else "other" (norms, embeddings, residual adds, collectives XLA added without a source op)."""
  from tandem_jax.models.layers import SCOPES
  m = re.search(r"(?<![\w.])(" + "|".join(SCOPES) + r")(?![\w.])", op_name)
  return m.group(1) if m else "other"
