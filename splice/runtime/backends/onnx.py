"""The ONNX exporter: a Program (after any pipeline) as one ONNX model (docs/onnx.md).

Steps (:func:`to_onnx`, :func:`export_onnx`), per graph (:func:`_lower`):

1. **Prepare** a copy: parts of a split program (``invoke_subgraph`` calls) are inlined
   into their callers; each ``cond`` is replaced by a stub op whose fake gives the cond's
   output specs (torch.export would trace nested conds once per enclosing level: 2^depth);
   every node's :class:`~splice.ir.meta.Loc` is copied into ``node.meta["custom"]``.
2. **torch.export** (non-strict) of the graph run node by node by an ``fx.Interpreter``
   under ``preserve_node_meta``, so each exported node keeps the Loc of the program node
   it came from. Inputs are placeholders with the (static) input specs.
3. **torch.onnx** (the dynamo exporter, ``opset_version=opset``, its ATen registry built
   once per process): ATen ops through torch's onnxscript library; each splice op through
   its ONNX lowering (registered below in :mod:`splice.ir.lowerings`, the translations in
   ``splice/runtime/kernels/onnx_*.py``), which records an opaque node of domain
   ``splice`` calling an ONNX function; an op declared to fall back on ONNX is decomposed
   into its reference's ATen ops first; a cond stub becomes an opaque placeholder node.
4. **Finish.** Each placeholder becomes an ONNX ``If`` whose branches are the cond's
   graphs, exported the same way (recursively) and renamed into the model's scope; every
   node gets ``splice.node``, ``splice.module``, ``splice.source`` and ``splice.passes``
   metadata. At the top: the inputs and outputs take the program's names; the splice
   functions are added to ``model.functions`` with the ``splice`` opset import (after
   torch.onnx's passes: its inliner never sees them); the model gets ``splice.program``,
   ``splice.version`` and ``splice.passes``; then ``onnx.checker.check_model(full_check=True)``.

Errors: anything that cannot be exported raises :class:`~splice.errors.LoweringError`
naming the program node, its module path and source line where torch.onnx names one.
onnx, onnxscript and torch.onnx are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import operator
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from splice.errors import LoweringError
from splice.ir import meta as M
from splice.ir.host_steps import is_cond, is_part_call
from splice.ir.lowerings import LOWERINGS, register_lowering
from splice.ir.ops import OPS
from splice.ir.program import Program, iter_graphs
from splice.ir.signatures import SignatureSet
from splice.runtime.kernels.onnx_common import SPLICE_DOMAIN, SPLICE_DOMAIN_VERSION, OnnxContext
from splice.runtime.kernels.onnx_moe_ffn import translate_moe_ffn
from splice.version import __version__

DEFAULT_OPSET = 18
"""The ai.onnx opset exported by default: torch.onnx's own (its onnxscript library's), so
no version conversion runs."""

EXTERNAL_DATA_LIMIT = 2**31 - 1
"""Weights above this many bytes go to an external data file (protobuf's 2 GB limit)."""

ONNX_EXTRA = "pip install 'splice[dev]'  (onnx, onnxscript, onnxruntime)"

# metadata keys written on every node (and the model)
KEY_MODULE = "splice.module"
KEY_SOURCE = "splice.source"
KEY_PASSES = "splice.passes"
KEY_NODE = "splice.node"
_CUSTOM = "splice_loc"  # node.meta["custom"][_CUSTOM] during the export

# ---------------------------------------------------------------------------------------
# the lowerings of the splice dialect (calling convention: splice.ir.lowerings)


@register_lowering("splice::lowrank_linear", "onnx")
def lower_lowrank_linear(ctx: OnnxContext, *args: Any, **kwargs: Any) -> Any:
    """``splice.lowrank_linear[_bias]``: :mod:`~splice.runtime.kernels.onnx_lowrank_linear`
    (imported here: it imports onnxscript)."""
    from splice.runtime.kernels.onnx_lowrank_linear import translate_lowrank_linear

    return translate_lowrank_linear(ctx, *args, **kwargs)


register_lowering("splice::moe_ffn", "onnx")(translate_moe_ffn)


def require_onnx() -> Any:
    """Import onnx, onnxscript and torch.onnx, or raise LoweringError naming the extra."""
    try:
        import onnx
        import onnxscript  # noqa: F401
        import torch.onnx  # noqa: F401
    except ImportError as e:
        raise LoweringError(
            f"ONNX export needs onnx and onnxscript, which are not importable ({e})",
            hint=ONNX_EXTRA,
        ) from e
    return onnx


def translation_table(ctx: OnnxContext) -> dict[Any, Any]:
    """torch.onnx's ``custom_translation_table``: each splice op with an ONNX lowering."""
    out = {}
    for qual, entry in LOWERINGS.for_backend("onnx").items():
        if entry.fn is not None:
            out[OPS[qual].overload] = functools.update_wrapper(
                functools.partial(entry.fn, ctx), entry.fn
            )
    return out


def fallback_decompositions() -> dict[Any, Any]:
    """``{overload: reference}`` of the ops declared to fall back on ONNX."""
    return {
        OPS[q].overload: OPS[q].reference
        for q, e in LOWERINGS.for_backend("onnx").items()
        if e.is_fallback
    }


# ---------------------------------------------------------------------------------------
# 1. prepare


def _loc_record(node: fx.Node) -> dict[str, str]:
    loc = M.loc(node)
    return {
        KEY_NODE: node.name,
        KEY_MODULE: loc.module_path,
        KEY_SOURCE: loc.source,
        KEY_PASSES: ",".join(loc.from_passes),
    }


def _inline_parts(gm: fx.GraphModule) -> None:
    """Replace each ``invoke_subgraph`` call in ``gm`` by the part's nodes (recursively)."""
    for node in list(gm.graph.nodes):
        if not is_part_call(node):
            continue
        sub_ref, _ident, *operands = node.args
        sub = getattr(gm, sub_ref.target)
        _inline_parts(sub)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands, strict=True))
        result: Any = None
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    result = fx.node.map_arg(n.args[0], env.__getitem__)
                    break
                if n.op == "get_attr":
                    name = _copy_attr(gm, sub, n.target)
                    new = gm.graph.get_attr(name)
                else:
                    new = gm.graph.node_copy(n, env.__getitem__)
                new.meta = dict(n.meta)
                env[n] = new
        outs = list(result) if isinstance(result, (list, tuple)) else [result]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            raise LoweringError(
                f"part call %{node.name} is used other than by indexing its outputs",
                where=str(M.loc(node)),
                hint="run splice.verify(program); a split program indexes its parts' outputs",
            )
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _copy_attr(gm: fx.GraphModule, sub: fx.GraphModule, target: str) -> str:
    """Make ``sub``'s attribute ``target`` reachable from ``gm`` (same object); its name."""
    value: Any = sub
    for part in target.split("."):
        value = getattr(value, part)
    name = "_part_" + target.replace(".", "_")
    i = 0
    while hasattr(gm, f"{name}{i}"):
        i += 1
    name = f"{name}{i}"
    setattr(gm, name, value)
    return name


def _annotate(gm: fx.GraphModule) -> None:
    """Copy each node's Loc into ``meta["custom"]`` (and a stack trace line), which
    ``preserve_node_meta`` carries onto the exported nodes."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        node.meta = dict(node.meta)
        custom = dict(node.meta.get("custom") or {})
        custom[_CUSTOM] = json.dumps(_loc_record(node))
        node.meta["custom"] = custom
        loc = M.loc(node)
        if loc.file:
            node.meta["stack_trace"] = f'  File "{loc.file}", line {loc.line}, in forward\n'


def _zeros(nodes: list[fx.Node], what: str) -> tuple[torch.Tensor, ...]:
    """Placeholder values with the specs of ``nodes`` (values are irrelevant to export)."""
    out = []
    for n in nodes:
        s = M.spec(n)
        if not isinstance(s, M.TensorSpec) or not s.is_static:
            raise LoweringError(
                f"input %{n.name} of {what} has spec {s}; ONNX export takes static tensor shapes",
                where=str(M.loc(n)),
                hint="capture the model without dynamic_shapes (once per shape you deploy), "
                "or export a SignatureSet (one model per signature)",
            )
        out.append(torch.zeros(tuple(int(d) for d in s.shape), dtype=s.dtype))
    return tuple(out)


def example_inputs(program: Program) -> tuple[torch.Tensor, ...]:
    """Placeholder inputs with the program's input specs (values are irrelevant)."""
    return _zeros(program.input_nodes, f"program {program.name!r}")


def _interpreted(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` running node by node (an ``fx.Interpreter``), so that under
    ``preserve_node_meta`` every exported node keeps its source node's meta; the
    weights keep their names (no wrapper module adds a prefix)."""

    def forward(*args: Any) -> Any:
        return fx.Interpreter(gm).run(*args)

    gm.forward = forward  # type: ignore[method-assign]
    return gm


# ---------------------------------------------------------------------------------------
# control flow: each cond is exported as a stub, its branches on their own, then an If


STUB_DOMAIN = "splice.export_stub"
"""The domain of the placeholder nodes that stand for a ``cond`` until its If is built
(none is left in an exported model)."""

_TENSOR_TYPES = [
    f"tensor({t})"
    for t in (
        "float", "double", "float16", "bfloat16", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool",
    )
]  # fmt: skip
_STUB_OUTPUTS: dict[int, list[M.TensorSpec]] = {}
_stub_keys = itertools.count()


@dataclass
class _Cond:
    """A cond replaced by a stub: its branches and what they are called with."""

    node_name: str
    record: dict[str, str]
    branches: tuple[fx.GraphModule, fx.GraphModule]
    n_out: int


@functools.cache
def _cond_stub() -> Any:
    """``splice_onnx::cond_stub(key, pred, operands) -> outputs``: a torch op whose fake
    gives the cond's output specs, so torch.export does not trace the branches (tracing
    nested conds costs 2^depth traces)."""

    @torch.library.custom_op("splice_onnx::cond_stub", mutates_args=())
    def cond_stub(key: int, pred: torch.Tensor, operands: list[torch.Tensor]) -> list[torch.Tensor]:
        raise LoweringError("splice_onnx::cond_stub only stands for a cond during ONNX export")

    @cond_stub.register_fake
    def _fake(key: int, pred: torch.Tensor, operands: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            torch.empty(tuple(int(d) for d in s.shape), dtype=s.dtype) for s in _STUB_OUTPUTS[key]
        ]

    return torch.ops.splice_onnx.cond_stub.default


def _stub_conds(gm: fx.GraphModule) -> dict[int, _Cond]:
    """Replace each ``cond`` of ``gm``'s own graph by a stub; ``{key: _Cond}``."""
    out: dict[int, _Cond] = {}
    for node in list(gm.graph.nodes):
        if not is_cond(node):
            continue
        pred, true_ref, false_ref, operands = node.args[:4]
        spec = M.spec(node)
        items = list(spec.items) if isinstance(spec, M.TupleSpec) else [spec]
        if not all(isinstance(s, M.TensorSpec) and s.is_static for s in items):
            raise LoweringError(
                f"cond %{node.name} returns {spec}; ONNX If is exported for static tensor "
                "results only",
                where=str(M.loc(node)),
                hint="capture with static shapes",
            )
        key = next(_stub_keys)
        _STUB_OUTPUTS[key] = items
        branches = (getattr(gm, true_ref.target), getattr(gm, false_ref.target))
        with gm.graph.inserting_before(node):
            stub = gm.graph.call_function(_cond_stub(), (key, pred, list(operands)))
        stub.meta = dict(node.meta)
        node.replace_all_uses_with(stub)
        gm.graph.erase_node(node)
        out[key] = _Cond(node.name, _loc_record(node), branches, len(items))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return out


def _translate_stub(conds: dict[int, _Cond]) -> Any:
    """torch.onnx's translation of the stub: an opaque node ``splice.export_stub.cond_<key>``."""
    import onnxscript
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter

    def translate(key: int, pred: Any, operands: Any) -> Any:
        n_in, n_out = len(operands), conds[key].n_out
        schema = OpSchema(
            f"cond_{key}",
            STUB_DOMAIN,
            1,
            inputs=[param("pred", "B"), *(param(f"i{j}", f"T{j}") for j in range(n_in))],
            outputs=[param(f"o{j}", f"O{j}") for j in range(n_out)],
            type_constraints=[
                ("B", ["tensor(bool)"], ""),
                *((f"T{j}", _TENSOR_TYPES, "") for j in range(n_in)),
                *((f"O{j}", _TENSOR_TYPES, "") for j in range(n_out)),
            ],
        )
        op = onnxscript.values.Op(onnxscript.values.Opset(STUB_DOMAIN, 1), f"cond_{key}", schema)
        out = op(pred, *operands)
        return out if isinstance(out, (list, tuple)) else [out]

    return translate


def _rename_graph(g: Any, rename: Any) -> None:
    """Apply ``rename`` to every value name of GraphProto ``g`` and its sub-graphs."""
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            v.name = rename(v.name)
    for t in g.initializer:
        t.name = rename(t.name)
    for node in g.node:
        node.input[:] = [rename(x) if x else x for x in node.input]
        node.output[:] = [rename(x) if x else x for x in node.output]
        node.name = rename(node.name) if node.name else node.name
        for a in node.attribute:
            if a.g.ByteSize():
                _rename_graph(a.g, rename)
            for sub in a.graphs:
                _rename_graph(sub, rename)


def _as_branch(model: Any, outer: list[str], prefix: str) -> Any:
    """The graph of ModelProto ``model`` as an If branch: no inputs (its inputs are the
    outer values ``outer``), every other name prefixed (names are unique model-wide), an
    Identity per output (an output never is an outer value)."""
    import onnx

    g = onnx.GraphProto()
    g.CopyFrom(model.graph)
    mapping = {v.name: o for v, o in zip(g.input, outer, strict=True)}
    _rename_graph(g, lambda n: mapping.get(n, prefix + n))
    del g.input[:]
    for i, out in enumerate(g.output):
        name = f"{prefix}out{i}"
        g.node.append(
            onnx.helper.make_node("Identity", [out.name], [name], name=f"{prefix}Identity{i}")
        )
        out.name = name
    g.name = prefix.rstrip("/")
    return g


# ---------------------------------------------------------------------------------------
# 2.-3. torch.export, torch.onnx


def _export_gm(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], what: str) -> Any:
    """torch.export of ``gm`` (nodes carry their Locs in meta["custom"])."""
    decomp = fallback_decompositions()
    try:
        with torch.fx.traceback.preserve_node_meta():
            ep = torch.export.export(_interpreted(gm), inputs, strict=False)
        if decomp:
            ep = ep.run_decompositions(decomp)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"torch.export of {what} failed: {type(e).__name__}: {e}",
            hint="run splice.verify(program); the program must be exportable",
        ) from e
    return ep


_FX_NODE = re.compile(r"translating node %(\w+)")


def _failed_node(ep: torch.export.ExportedProgram, err: BaseException) -> fx.Node | None:
    """The exported node torch.onnx names in ``err`` (or in an error it was raised from)."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        m = _FX_NODE.search(str(e))
        if m:
            for g in _graphs(ep.graph_module):
                for n in g.graph.nodes:
                    if n.name == m.group(1):
                        return n
        e = e.__cause__ or e.__context__
    return None


def _graphs(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    yield gm
    for m in gm.modules():
        if isinstance(m, fx.GraphModule) and m is not gm:
            yield m


def _record(node: fx.Node) -> dict[str, str]:
    raw = (node.meta.get("custom") or {}).get(_CUSTOM)
    return json.loads(raw) if raw else {}


def _conversion_error(what: str, ep: Any, err: Exception) -> LoweringError:
    node = _failed_node(ep, err)
    causes = []
    e: BaseException | None = err.__cause__
    while e is not None and len(causes) < 4:
        text = str(e).strip().splitlines()
        causes.append(f"{type(e).__name__}: {text[0] if text else ''}")
        e = e.__cause__
    detail = "; ".join(causes) or f"{type(err).__name__}: {str(err).splitlines()[0]}"
    if node is None:
        return LoweringError(
            f"ONNX export of {what} failed: {detail}",
            hint="an op ONNX cannot express must be rewritten, or registered with "
            "register_lowering(op, 'onnx')",
        )
    rec = _record(node)
    name = rec.get(KEY_NODE, node.name)
    where = (
        f"node %{name} ({node.target}), module {rec.get(KEY_MODULE) or '<root>'}, "
        f"source {rec.get(KEY_SOURCE) or '<unknown>'}"
    )
    return LoweringError(
        f"ONNX export of {what}: torch.onnx cannot translate node %{name} ({node.target}): "
        f"{detail}",
        where=where,
        hint="rewrite the op into ops ONNX has, or give it an ONNX lowering with "
        "register_lowering(op, 'onnx')",
    )


@functools.cache
def _torchlib_registry(opset: int) -> Any:
    """torch.onnx's registry of ATen translations for ``opset``, built once per process."""
    return _ORIGINAL_FROM_TORCHLIB[0](opset_version=opset)


_ORIGINAL_FROM_TORCHLIB: list[Any] = []


@contextlib.contextmanager
def _cached_registry() -> Iterator[None]:
    """torch.onnx.export rebuilds its registry of ~550 ATen translations on every call
    (seconds; a program with k conds is k·2 + 1 exports); inside this block it gets a copy
    of one built once (the copy takes the custom translations of one export)."""
    from torch.onnx._internal.exporter import _registration

    cls = _registration.ONNXRegistry
    if not _ORIGINAL_FROM_TORCHLIB:
        _ORIGINAL_FROM_TORCHLIB.append(cls.from_torchlib)
    original = cls.__dict__["from_torchlib"]

    def from_torchlib(klass: Any, opset_version: int = DEFAULT_OPSET) -> Any:
        base = _torchlib_registry(opset_version)
        reg = klass()
        reg._opset_version = base._opset_version
        reg.functions = {k: list(v) for k, v in base.functions.items()}
        return reg

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress lines to stdout and logs warnings about torchvision ops
    it skips; keep them out of the user's output."""
    import io
    import logging
    import sys

    logs = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter", "onnxscript")]
    old, levels = sys.stdout, [log.level for log in logs]
    sys.stdout = io.StringIO()
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        sys.stdout = old
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


# ---------------------------------------------------------------------------------------
# 4. finish


def _fx_name(node: Any) -> str | None:
    text = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
    m = re.match(r"%(\w+)", text)
    return m.group(1) if m else None


def _add_locs(model: Any, ep: Any) -> None:
    """Node metadata: the Loc of the program node each ONNX node came from."""
    by_name = {n.name: n for g in _graphs(ep.graph_module) for n in g.graph.nodes}
    for node in model.graph.all_nodes():
        fx_name = _fx_name(node)
        src = by_name.get(fx_name) if fx_name else None
        for key, val in (_record(src) if src is not None else {}).items():
            node.metadata_props[key] = val


def _export_and_translate(
    gm: fx.GraphModule,
    inputs: tuple[torch.Tensor, ...],
    what: str,
    ctx: OnnxContext,
    conds: dict[int, _Cond],
) -> tuple[Any, Any]:
    """(ExportedProgram, torch.onnx's ONNXProgram) of the prepared ``gm``."""
    ep = _export_gm(gm, inputs, what)
    table = translation_table(ctx)
    if conds:
        table[_cond_stub()] = _translate_stub(conds)
    try:
        with _quiet(), _cached_registry():
            onx = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                custom_translation_table=table,
                opset_version=ctx.opset,
                optimize=True,
                verbose=False,
            )
    except LoweringError:
        raise
    except Exception as e:
        raise _conversion_error(what, ep, e) from e
    return ep, onx


def _lower(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], what: str, ctx: OnnxContext
) -> Any:
    """``gm`` (a copy: it is changed) as a ModelProto, conds as If (recursively); the
    splice functions are collected in ``ctx``, not yet in the model."""
    import onnx
    from onnxscript import ir

    _inline_parts(gm)
    conds = _stub_conds(gm)
    _annotate(gm)
    try:
        ep, onx = _export_and_translate(gm, inputs, what, ctx, conds)
    finally:  # the stubs' specs are read while torch.export and torch.onnx trace
        for key in conds:
            _STUB_OUTPUTS.pop(key, None)
    _add_locs(onx.model, ep)
    proto = ir.serde.serialize_model(onx.model)
    if not conds:
        return proto
    # each stub becomes an If whose branches are the cond's graphs, exported on their own
    for i, node in enumerate(proto.graph.node):
        if node.domain != STUB_DOMAIN:
            continue
        key = int(node.op_type.split("_")[1])
        cond = conds[key]
        branches = []
        for tag, branch in zip(("then", "else"), cond.branches, strict=True):
            sub = _lower(
                _copy_gm(branch),
                _zeros(
                    [n for n in branch.graph.nodes if n.op == "placeholder"],
                    f"cond %{cond.node_name}",
                ),
                f"the {tag} branch of cond %{cond.node_name} in {what}",
                ctx,
            )
            branches.append(_as_branch(sub, list(node.input[1:]), f"{cond.node_name}.{tag}/"))
            _merge_imports(proto, sub)
        new = onnx.helper.make_node(
            "If",
            [node.input[0]],
            list(node.output),
            name=node.name or f"If_{cond.node_name}",
            then_branch=branches[0],
            else_branch=branches[1],
        )
        props = {p.key: p.value for p in node.metadata_props}
        props.update(cond.record)
        _set_props(new.metadata_props, props)
        proto.graph.node[i].CopyFrom(new)
    imports = [o for o in proto.opset_import if o.domain != STUB_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    return proto


def _copy_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a branch graph (with its sub-graphs) that the export may change."""
    import copy

    return copy.deepcopy(gm)


def _merge_imports(proto: Any, sub: Any) -> None:
    have = {o.domain for o in proto.opset_import}
    for o in sub.opset_import:
        if o.domain not in have and o.domain != STUB_DOMAIN:
            proto.opset_import.append(o)
            have.add(o.domain)


def _build(program: Program, opset: int) -> Any:
    """The program as a ModelProto with names, functions and metadata (not yet checked)."""
    import onnx

    if not isinstance(program, Program):
        raise LoweringError(
            f"to_onnx takes a Program, got {type(program).__name__}",
            hint="export_onnx writes one model per member of a SignatureSet",
        )
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise LoweringError(
            f"opset {opset!r} is below {DEFAULT_OPSET}, the lowest torch.onnx exports",
            hint=f"pass opset >= {DEFAULT_OPSET}",
        )
    require_onnx()
    ctx = OnnxContext(opset)
    what = f"program {program.name!r}"
    proto = _lower(program.copy().to_module(), example_inputs(program), what, ctx)
    graph = proto.graph
    if len(graph.input) != len(program.input_names):
        raise LoweringError(
            f"ONNX export of {what}: the model takes {len(graph.input)} inputs, the program "
            f"{len(program.input_names)} ({program.input_names})",
            hint="an input the program does not read is dropped by torch.export; remove it",
        )
    if len(graph.output) != len(program.output_names):
        raise LoweringError(
            f"ONNX export of {what}: the model returns {len(graph.output)} values, the "
            f"program {len(program.output_names)} ({program.output_names})",
            hint="every program output must be a tensor",
        )
    _rename_io(graph, program)
    for fn in ctx.functions.values():
        proto.functions.append(fn)
    imports = {o.domain: o.version for o in proto.opset_import}
    if ctx.functions:
        imports[SPLICE_DOMAIN] = SPLICE_DOMAIN_VERSION
    elif not any(n.domain == SPLICE_DOMAIN for n in all_nodes(graph)):
        imports.pop(SPLICE_DOMAIN, None)
    del proto.opset_import[:]
    proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    passes = sorted(
        {p for _, g in iter_graphs(program) for n in g.graph.nodes for p in M.loc(n).from_passes}
    )
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(
        {
            "splice.program": program.name,
            "splice.version": __version__,
            KEY_PASSES: ",".join(passes),
        }
    )
    _set_props(proto.metadata_props, props)
    proto.producer_name = "splice"
    proto.producer_version = __version__
    graph.name = program.name or "main"
    return proto


def _set_props(field: Any, props: dict[str, str]) -> None:
    """Replace the StringStringEntryProto list ``field`` by ``props``."""
    del field[:]
    for k, v in props.items():
        entry = field.add()
        entry.key, entry.value = k, v


def all_nodes(graph: Any) -> Iterator[Any]:
    """Every NodeProto of ``graph`` and of its sub-graphs."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g.ByteSize():
                yield from all_nodes(a.g)
            for sub in a.graphs:
                yield from all_nodes(sub)


def _rename_io(graph: Any, program: Program) -> None:
    """Give the graph's inputs and outputs the program's names."""
    pairs = [
        *((v.name, n) for v, n in zip(graph.input, program.input_names)),
        *((v.name, n) for v, n in zip(graph.output, program.output_names)),
    ]
    mapping = {old: new for old, new in pairs if old != new}
    if not mapping:
        return
    clash = set(mapping.values()) - set(mapping)
    used = {x for node in all_nodes(graph) for x in (*node.input, *node.output)}
    used |= {t.name for t in graph.initializer}
    for name in clash & used:  # an internal value already has a wanted name: move it away
        mapping[name] = f"{name}__renamed"
    if len({*mapping.values()}) != len(mapping):
        raise LoweringError(
            f"program {program.name!r}: an input and an output share a value, which ONNX "
            "cannot name twice",
            hint="return a copy of the input (e.g. x.clone()) instead of the input itself",
        )
    _rename_graph(graph, lambda n: mapping.get(n, n))


def _check(program: Program, model: Any) -> None:
    """onnx.checker (full check: with shape inference) on a ModelProto or a file path."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, InferenceError
        raise LoweringError(
            f"the ONNX model of program {program.name!r} fails onnx.checker: "
            f"{type(e).__name__}: {e}",
            hint="this is a bug in splice's exporter (or torch.onnx); please report it "
            "with the program's text",
        ) from e


def to_onnx(program: Program, *, opset: int = DEFAULT_OPSET) -> Any:
    """The program as one ONNX ``ModelProto``, weights as initializers inside it; input and
    output names are the program's ``input_names`` / ``output_names``; checked with
    ``onnx.checker.check_model(full_check=True)``.

    Raises LoweringError for what cannot be exported (naming the node, its module path
    and source line) and for a model whose weights exceed protobuf's 2 GB (use
    :func:`export_onnx`, which writes them as external data)."""
    proto = _build(program, opset)
    size = weight_bytes(proto)
    if size > EXTERNAL_DATA_LIMIT:
        raise LoweringError(
            f"program {program.name!r} has {size / 2**30:.2f} GiB of weights; one ONNX "
            "ModelProto holds at most 2 GB",
            hint="use export_onnx(program, path), which writes the weights as external data",
        )
    _check(program, proto)
    return proto


def weight_bytes(proto: Any) -> int:
    """Bytes of the initializers of ``proto``'s graph and sub-graphs."""
    graphs = [
        proto.graph,
        *(a.g for n in all_nodes(proto.graph) for a in n.attribute if a.g.ByteSize()),
    ]
    return sum(len(t.raw_data) for g in graphs for t in g.initializer)


# ---------------------------------------------------------------------------------------
# files


def signature_paths(path: Path, n: int) -> list[Path]:
    """The files of a SignatureSet's members: ``model.s0.onnx``, ``model.s1.onnx``, ..."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return [path.with_name(f"{stem}.s{i}.onnx") for i in range(n)]


def export_onnx(
    program: Program | SignatureSet,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> Path | list[Path]:
    """Write ``program`` as ONNX at ``path``; returns the path(s) written.

    The weights go to an external data file beside the model (``<name>.data``) when
    ``external_data=True``, or when ``None`` (the default) and they exceed 2 GB. A
    :class:`SignatureSet` writes one model per member, ``<stem>.s0.onnx``,
    ``<stem>.s1.onnx``, ... in member order (``SignatureSet.signatures`` gives each one's
    input shapes; so does each model's ``splice.signature`` metadata). Files are written
    under temporary names, checked with ``onnx.checker`` (full check) and renamed at the
    end: nothing half-written is left, and on an error nothing is written."""
    target = Path(os.path.abspath(os.fspath(path)))
    if target.is_dir():
        raise LoweringError(
            f"cannot write the ONNX model to {target}: it is a folder",
            hint="give a file path such as model.onnx",
        )
    if isinstance(program, SignatureSet):
        from splice.ir.signatures import signature_text

        items = []
        paths = signature_paths(target, len(program))
        for member, sig, out in zip(program, program.signatures, paths, strict=True):
            proto = _build(member, opset)
            props = {p.key: p.value for p in proto.metadata_props}
            props["splice.signature"] = signature_text(sig, member.input_names)
            _set_props(proto.metadata_props, props)
            items.append((member, proto, out))
        _write_all(items, external_data)
        return paths
    _write_all([(program, _build(program, opset), target)], external_data)
    return target


def _write_all(items: list[tuple[Program, Any, Path]], external_data: bool | None) -> None:
    import onnx

    parent = items[0][2].parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".onnx-export.tmp-", dir=parent))
    except OSError as e:
        raise LoweringError(
            f"cannot write to {parent}: {e}", hint="choose a folder you can write to"
        ) from e
    try:
        staged: list[tuple[Path, Path]] = []
        for program, proto, final in items:
            external = (
                external_data
                if external_data is not None
                else weight_bytes(proto) > EXTERNAL_DATA_LIMIT
            )
            out = tmp / final.name
            data = f"{final.name}.data"
            if external:
                onnx.save_model(
                    proto,
                    out,
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data,
                    size_threshold=0,
                )
                staged.append((tmp / data, final.with_name(data)))
            else:
                onnx.save_model(proto, out)
            _check(program, str(out))
            staged.append((out, final))
        for src, dst in staged:
            os.replace(src, dst)
    except OSError as e:
        raise LoweringError(
            f"cannot write the ONNX model(s) to {parent}: {e}",
            hint="check the folder's permissions and free space",
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_LIMIT",
    "all_nodes",
    "export_onnx",
    "fallback_decompositions",
    "require_onnx",
    "signature_paths",
    "to_onnx",
    "translation_table",
    "weight_bytes",
]
