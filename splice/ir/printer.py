"""The text form of a Program.

One line per node, stable value names, specs inline, locations optional::

    symbol t : hint=8 range=[2,128]
    weight @h.0.mlp.c_fc.weight : f32[64,256] param
    program @GPT2LMHeadModel(%input_ids : i64[1,t]) {
      %addmm : f32[t,256] = aten.addmm(@h.0.mlp.c_fc.bias, %view_3, @h.0.mlp.c_fc.weight)  # h.0.mlp.c_fc @ modeling_gpt2.py:311 [cse]
      ...
      return logits=%linear
    }

* ``weight`` lines declare every weight with its spec and kind (``param``, ``buffer``,
  ``constant``); the graph reads a weight as ``@name`` (``get_attr`` nodes are not lines);
* ``graph @name(...) { ... }`` blocks inside a graph define its sub-graphs (branches of
  ``torch.cond``, split parts), which the graph names as ``@name`` too;
* ops print as ``namespace.op`` with the overload when it is not ``default``
  (``aten.mul.Tensor``), Python callables on sizes as ``operator.mul``;
* a ``part`` line before a value marks it as the start of a piece ``branches`` compiles as
  a part of its own (:func:`splice.ir.meta.mark_part_start`; ``stitch`` marks copied blocks);
* with ``locations=True`` each line ends in ``# module.path @ file.py:line [passes]``.

:func:`splice.ir.parser.parse_ir` reads this back; printing the parsed program gives the
same text.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.fx as fx

from splice.ir import meta as M
from splice.ir.program import Program, get_attr_path
from splice.ir.shape_prop import PY_OP_NAMES
from splice.ir.signatures import SignatureSet, format_signature_set

HEADER = "# splice IR v1"


def format_target(node: fx.Node) -> str:
    """The printed name of a node's op."""
    t = node.target
    if node.op == "call_module":
        return f"call @{t}"
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        op = t._schema.name.split("::", 1)[1]
        ov = t._overloadname
        return f"{ns}.{op}" if ov == "default" else f"{ns}.{op}.{ov}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order.{t.name()}"
    name = PY_OP_NAMES.get(t)
    if name is not None:
        return name
    qual = getattr(t, "__qualname__", None) or repr(t)
    return f"<unknown:{getattr(t, '__module__', '?')}.{qual}>"


def format_float(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def format_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"@{a.target}" if a.op == "get_attr" else f"%{a.name}"
    if a is None or isinstance(a, bool):
        return repr(a)
    if isinstance(a, int):
        return str(a)
    if isinstance(a, float):
        return format_float(a)
    if isinstance(a, str):
        return json.dumps(a)
    if isinstance(a, list):
        return "[" + ", ".join(format_arg(x) for x in a) + "]"
    if isinstance(a, tuple):
        if len(a) == 1:
            return f"({format_arg(a[0])},)"
        return "(" + ", ".join(format_arg(x) for x in a) + ")"
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, torch.device):
        return f'device("{a}")'
    if isinstance(a, (torch.layout, torch.memory_format)):
        return str(a)
    if isinstance(a, slice):
        return f"slice({format_arg(a.start)}, {format_arg(a.stop)}, {format_arg(a.step)})"
    if a is Ellipsis:
        return "..."
    raise TypeError(f"cannot print argument {a!r} of type {type(a).__name__}")


def format_loc(loc: M.Loc) -> str:
    if loc.is_unknown():
        return ""
    out = f"# {loc.module_path or '<root>'}"
    if loc.file:
        out += f" @ {os.path.basename(loc.file)}:{loc.line if loc.line is not None else 0}"
    if loc.from_passes:
        out += f" [{','.join(loc.from_passes)}]"
    return out


def format_node(node: fx.Node, locations: bool = False) -> str:
    s = M.get_spec(node)
    args = [format_arg(a) for a in node.args]
    args += [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    line = (
        f"%{node.name} : {s if s is not None else '?'} = {format_target(node)}({', '.join(args)})"
    )
    if locations:
        c = format_loc(M.loc(node))
        if c:
            line += "  " + c
    return line


def _print_graph(
    gm: fx.GraphModule,
    out: list[str],
    indent: str,
    header: str,
    locations: bool,
    output_names: list[str] | None,
) -> None:
    params = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            s = M.get_spec(n)
            params.append(f"%{n.name} : {s if s is not None else '?'}")
    out.append(f"{indent}{header}({', '.join(params)}) {{")
    inner = indent + "  "
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule):
            _print_graph(child, out, inner, f"graph @{name}", locations, None)
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            out.append(inner + _format_return(n, output_names))
            continue
        if M.starts_part(n):
            out.append(inner + "part")
        out.append(inner + format_node(n, locations))
    out.append(f"{indent}}}")


def _format_return(node: fx.Node, output_names: list[str] | None) -> str:
    val = node.args[0]
    if output_names is not None:
        vals = list(val) if isinstance(val, (tuple, list)) else [val]
        body = ", ".join(f"{nm}={format_arg(v)}" for nm, v in zip(output_names, vals))
        return f"return {body}".rstrip()
    return f"return {format_arg(val)}"


def print_ir(program: Program | SignatureSet, locations: bool = False) -> str:
    """The text form of ``program`` (see the module docstring for the grammar).

    A :class:`~splice.ir.signatures.SignatureSet` prints as its members' texts, each under a
    comment naming its input signature."""
    if isinstance(program, SignatureSet):
        return format_signature_set(program, lambda p: print_ir(p, locations))
    out = [HEADER]
    for name, info in program.symbols.items():
        hi = "inf" if info.max is None else str(info.max)
        out.append(f"symbol {name} : hint={info.hint} range=[{info.min},{hi}]")
    for key, value in sorted(program.attrs.items()):
        out.append(f"attr {key} = {json.dumps(value, sort_keys=True)}")
    for name, kind in program.weight_kinds.items():
        t = get_attr_path(program.graph_module, name)
        out.append(f"weight @{name} : {M.TensorSpec(tuple(t.shape), t.dtype)} {kind}")
    _print_graph(
        program.graph_module, out, "", f"program @{program.name}", locations, program.output_names
    )
    return "\n".join(out) + "\n"


__all__ = ["HEADER", "format_arg", "format_loc", "format_node", "format_target", "print_ir"]
