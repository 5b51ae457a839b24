"""verify(program): the IR invariants every pass must keep.

Checked, in order, for the program graph and each sub-graph:

1. structure — every input of a node is a node of the same graph defined before it (no
   dangling or forward uses), there is exactly one output, output names are distinct,
   no value is named like something the generated Python code needs (a keyword, a
   builtin, ``self``, ``torch``...; see :func:`reserved_name_reason`), and ``fx`` lint
   passes;
2. ops — only known ops: ``torch.ops`` overloads (ATen, the splice dialect, registered
   custom ops), torch's higher-order control-flow ops, and a fixed table of Python
   callables on sizes; ``call_module`` only on sub-graphs; arguments fit the op's schema;
3. weights — every ``get_attr`` names a declared weight (or a sub-graph) that exists;
4. specs — every value has a spec, symbolic dims use declared symbols only, and the specs
   agree with fake-tensor re-propagation from the inputs' specs.

Failures raise :class:`~splice.errors.VerificationError` naming the node, its module path
and its source line.
"""

from __future__ import annotations

import builtins
import keyword
import re
from typing import Any

import torch
import torch.fx as fx

from splice.errors import VerificationError
from splice.ir import meta as M
from splice.ir.program import Program, get_attr_path, iter_graphs
from splice.ir.shape_prop import PY_OP_NAMES, FakeRunner

_SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IDENT_RE = _SYMBOL_RE
_SYMPY_FUNCS = {"Max", "Min", "FloorDiv", "Mod", "CeilDiv", "floor", "ceiling", "sqrt", "oo"}


def _fx_builtin_names() -> frozenset[str]:
    """Names torch.fx's generated code binds as globals (torch, device, inf, nan, ...)."""
    try:
        from torch.fx.graph import _custom_builtins

        return frozenset(_custom_builtins)
    except ImportError:  # private in torch.fx; this is its list in torch 2.x
        return frozenset({"NoneType", "device", "fx_pytree", "inf", "nan", "pytree", "torch"})


_FX_BUILTINS = _fx_builtin_names()


def reserved_name_reason(name: str) -> str | None:
    """Why a value may not be called ``name`` (None if it may).

    torch.fx generates Python code for ``forward(self, ...)``: a value named like a keyword,
    a builtin or a global that code uses would be renamed by fx or would shadow what the
    code needs (``self`` breaks every later weight read)."""
    if keyword.iskeyword(name):
        return "is a Python keyword"
    if name == "self":
        return "is the name of the module inside the generated forward() code"
    if name in _FX_BUILTINS:
        return f"is a name the generated code uses for {name!r}"
    if name in builtins.__dict__:
        return "shadows a Python builtin that the generated code may call"
    return None


def verify(program: Program, *, propagate: bool = True) -> None:
    """Raise :class:`VerificationError` if ``program`` breaks an IR invariant."""
    for path, gm in iter_graphs(program):
        top = path == ""
        _check_structure(program, gm, top)
        _check_ops_and_weights(program, gm, top)
        _check_specs_present(program, gm)
        try:
            gm.graph.lint()
        except (
            Exception
        ) as e:  # fx lint raises RuntimeError/AssertionError; our checks above name nodes
            raise _err(f"graph lint failed: {e}") from e
    if propagate:
        runner = FakeRunner(program)
        for _path, gm in iter_graphs(program):
            _check_propagation(runner, gm)


def _err(msg: str, node: fx.Node | None = None, hint: str | None = None) -> VerificationError:
    return VerificationError(
        msg,
        node=node.name if node is not None else None,
        loc=M.loc(node) if node is not None else None,
        hint=hint,
    )


def _check_structure(program: Program, gm: fx.GraphModule, top: bool) -> None:
    graph = gm.graph
    seen: set[fx.Node] = set()
    outputs = 0
    for node in graph.nodes:
        reason = reserved_name_reason(node.name) if node.op != "get_attr" else None
        if reason is not None:
            raise _err(
                f"value name %{node.name} {reason}",
                node,
                hint="rename the value (torch.fx generates Python code that needs that name)",
            )
        for inp in node.all_input_nodes:
            if inp.graph is not graph:
                raise _err(
                    f"%{node.name} uses %{inp.name}, which is not a value of this graph (dangling use)",
                    node,
                    hint="a pass erased or moved a value but kept a use of it; redirect uses with Rewriter.replace",
                )
            if inp not in seen:
                raise _err(f"%{node.name} uses %{inp.name} before it is defined", node)
        if node.op == "output":
            outputs += 1
        seen.add(node)
    if outputs != 1:
        raise _err(f"a graph must have exactly one output, this one has {outputs}")
    if top:
        vals = program.output_values
        if len(vals) != len(program.output_names):
            raise _err(f"{len(vals)} output values but {len(program.output_names)} output names")
        for name in program.output_names:
            if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
                raise _err(
                    f"output name {name!r} is not an identifier, so the text form cannot name it",
                    program.output_node,
                    hint="rename the output (Program.rename_output)",
                )
        dupes = sorted({n for n in program.output_names if program.output_names.count(n) > 1})
        if dupes:
            raise _err(
                f"output name(s) {', '.join(map(repr, dupes))} appear more than once",
                program.output_node,
                hint="outputs are looked up by name, so one would be dropped; rename one",
            )
        for v in vals:
            if not isinstance(v, fx.Node):
                raise _err(f"program output {v!r} is not a value", program.output_node)


def _check_ops_and_weights(program: Program, gm: fx.GraphModule, top: bool) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function":
            t = node.target
            if isinstance(t, torch._ops.OpOverload):
                _check_schema(node, t)
            elif isinstance(t, torch._ops.HigherOrderOperator) or t in PY_OP_NAMES:
                pass
            else:
                name = getattr(t, "__qualname__", repr(t))
                raise _err(
                    f"%{node.name} calls {getattr(t, '__module__', '?')}.{name}, which is not a known op",
                    node,
                    hint="use ATen ops, splice dialect ops (splice.ir.ops) or ops registered with torch.library",
                )
        elif node.op == "call_module":
            sub = _maybe_attr(gm, node.target)
            if not isinstance(sub, fx.GraphModule):
                raise _err(
                    f"%{node.name} calls @{node.target}, which is not a sub-graph of this graph",
                    node,
                )
        elif node.op == "call_method":
            raise _err(f"%{node.name} calls method {node.target!r}; the IR has only op calls", node)
        elif node.op == "get_attr":
            obj = _maybe_attr(gm, node.target)
            if top and program.has_weight(node.target):
                if not isinstance(obj, torch.Tensor):
                    raise _err(f"weight @{node.target} is declared but its value is missing", node)
            elif isinstance(obj, fx.GraphModule):
                pass
            elif obj is None:
                raise _err(
                    f"%{node.name} reads @{node.target}, which does not exist",
                    node,
                    hint="add the weight with Program.add_weight or Rewriter.add_weight",
                )
            else:
                raise _err(
                    f"%{node.name} reads @{node.target}, which is not a declared weight",
                    node,
                    hint="weights live in the top-level program; pass them to sub-graphs as operands",
                )


def _maybe_attr(gm: fx.GraphModule, target: str) -> Any:
    try:
        return get_attr_path(gm, target)
    except AttributeError:
        return None


def _check_schema(node: fx.Node, op: torch._ops.OpOverload) -> None:
    schema = op._schema
    params = schema.arguments
    positional = [a for a in params if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise _err(
            f"%{node.name}: {schema.name} takes at most {len(positional)} positional arguments, "
            f"got {len(node.args)}",
            node,
            hint=f"schema: {schema}",
        )
    names = {a.name for a in params}
    for k in node.kwargs:
        if k not in names:
            raise _err(
                f"%{node.name}: {schema.name} has no argument {k!r}", node, hint=f"schema: {schema}"
            )
    given = {a.name for a in positional[: len(node.args)]} | set(node.kwargs)
    for a in params:
        if (
            a.name not in given
            and not a.has_default_value()
            and not a.type.kind() == "OptionalType"
        ):
            raise _err(
                f"%{node.name}: {schema.name} is missing argument {a.name!r}",
                node,
                hint=f"schema: {schema}",
            )


def _check_specs_present(program: Program, gm: fx.GraphModule) -> None:
    known = set(program.symbols)
    for node in gm.graph.nodes:
        if node.op in ("output",):
            continue
        s = M.get_spec(node)
        if s is None:
            raise _err(
                f"%{node.name} has no spec",
                node,
                hint="create nodes through splice.ir.rewriter.Rewriter",
            )
        for ts in M.iter_tensor_specs(s):
            for d in ts.shape:
                if isinstance(d, str):
                    unknown = set(_SYMBOL_RE.findall(d)) - known - _SYMPY_FUNCS
                    if unknown:
                        raise _err(
                            f"%{node.name} has dim {d!r} with undeclared symbols {sorted(unknown)}",
                            node,
                        )


def _check_propagation(runner: FakeRunner, gm: fx.GraphModule) -> None:
    """Re-infer every node from its inputs' specs, in order.

    Going node by node from *stored* input specs is equivalent to propagating from the
    placeholders: the first node whose stored spec disagrees stops the walk, so every
    input spec used before it has been checked already.
    """
    symbols = set(runner.program.symbols)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stored = M.get_spec(node)
        if isinstance(stored, M.GraphRefSpec):
            continue
        _check_operand_dtypes(node)
        try:
            derived = runner.infer(node, gm)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise _err(
                f"%{node.name}: its op fails on its input specs: {type(e).__name__}: {first}",
                node,
                hint="the inputs' shapes or dtypes do not fit the op",
            ) from e
        if not _same(stored, derived, symbols):
            raise _err(
                f"%{node.name} is recorded as {stored} but its op computes {derived}",
                node,
                hint="a pass changed the node or its inputs without updating specs; use the Rewriter",
            )


# ATen ops whose kernels require every tensor operand to have one dtype, which torch's fake
# (meta) kernels do not all check: ``linear(int x, f32 w, f32 b)`` propagates (addmm promotes
# with the bias) and then fails when run with "mat1 and mat2 must have the same dtype".
_ONE_DTYPE_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "linear", "addmm", "mm", "bmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot",
        "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d",
    )
)  # fmt: skip


def _check_operand_dtypes(node: fx.Node) -> None:
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op._schema.name not in _ONE_DTYPE_OPS:
        return
    specs = [M.get_spec(a) for a in node.all_input_nodes]
    dtypes = {s.dtype for s in specs if isinstance(s, M.TensorSpec)}
    if len(dtypes) > 1:
        names = ", ".join(sorted(M.dtype_name(d) for d in dtypes))
        raise _err(
            f"%{node.name}: {op._schema.name} needs operands of one dtype, got {names}",
            node,
            hint="cast the operands to one dtype first (aten._to_copy / aten.to)",
        )


def _same(a: M.Spec | None, b: M.Spec, symbols: set[str]) -> bool:
    """Spec equality, where dims built from undeclared (data-dependent) symbols match each other."""
    if a == b:
        return True
    if isinstance(a, M.TensorSpec) and isinstance(b, M.TensorSpec):
        if a.dtype != b.dtype or len(a.shape) != len(b.shape):
            return False
        return all(
            x == y or (_fresh(x, symbols) and _fresh(y, symbols)) for x, y in zip(a.shape, b.shape)
        )
    if isinstance(a, M.TupleSpec) and isinstance(b, M.TupleSpec):
        return len(a.items) == len(b.items) and all(
            _same(x, y, symbols) for x, y in zip(a.items, b.items)
        )
    if isinstance(a, M.ScalarSpec) and isinstance(b, M.ScalarSpec):
        return a.kind == b.kind and (
            a.expr == b.expr or (_fresh(a.expr, symbols) and _fresh(b.expr, symbols))
        )
    return False


def _fresh(d: M.Dim | None, symbols: set[str]) -> bool:
    return isinstance(d, str) and bool(set(_SYMBOL_RE.findall(d)) - symbols - _SYMPY_FUNCS)


__all__ = ["reserved_name_reason", "verify"]
