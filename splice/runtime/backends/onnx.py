"""The ONNX exporter: a Program (after any pipeline) as one ONNX model.

Steps (:func:`to_onnx`, :func:`export_onnx`):

1. **Prepare.** A copy of the program; parts of a split program (``invoke_subgraph``
   calls) are inlined into their callers, so ``cond`` is the only control flow left; every
   node's :class:`~splice.ir.meta.Loc` is copied into ``node.meta["custom"]``.
2. **torch.export** (non-strict) of the program run node by node by an ``fx.Interpreter``
   under ``preserve_node_meta``, so each exported node keeps the Loc of the program node
   it came from. Inputs are placeholders with the program's (static) input specs.
3. **torch.onnx** (the dynamo exporter, ``opset_version=opset``): ATen ops through
   torch's onnxscript library, ``cond`` as ONNX ``If``; each splice op through its ONNX
   lowering (registered below in :mod:`splice.ir.lowerings`, the translations in
   ``splice/runtime/kernels/onnx_*.py``), which records a node of domain ``splice`` calling
   an ONNX function; an op declared to fall back on ONNX is decomposed into its
   reference's ATen ops before step 3.
4. **Finish.** The functions are added to ``model.functions`` with the ``splice`` opset
   import (after torch.onnx's passes: its inliner never sees them); inputs and outputs
   take the program's names; every node gets ``splice.module``, ``splice.source``,
   ``splice.passes`` and ``splice.node`` metadata and the model ``splice.program``,
   ``splice.version`` and ``splice.passes`` (see docs/onnx.md); then
   ``onnx.checker.check_model(full_check=True)``.

Errors: anything that cannot be exported raises :class:`~splice.errors.LoweringError`
naming the program node, its module path and source line where torch.onnx names one.
onnx, onnxscript and torch.onnx are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from splice.errors import LoweringError
from splice.ir import meta as M
from splice.ir.host_steps import is_part_call
from splice.ir.lowerings import LOWERINGS, register_lowering
from splice.ir.ops import OPS
from splice.ir.program import Program
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
            if user.op == "call_function" and user.target is getattr_item():
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


def getattr_item() -> Any:
    import operator

    return operator.getitem


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


def prepare(program: Program) -> fx.GraphModule:
    """The module that is exported: a copy of the program with its parts inlined and its
    nodes' Locs in ``meta["custom"]`` (every graph, branches included)."""
    gm = program.copy().to_module()
    _inline_parts(gm)
    for sub in [gm, *(m for m in gm.modules() if isinstance(m, fx.GraphModule))]:
        for node in sub.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module"):
                node.meta = dict(node.meta)
                custom = dict(node.meta.get("custom") or {})
                custom[_CUSTOM] = json.dumps(_loc_record(node))
                node.meta["custom"] = custom
                if M.loc(node).file:
                    loc = M.loc(node)
                    node.meta["stack_trace"] = f'  File "{loc.file}", line {loc.line}, in forward\n'
    return gm


def example_inputs(program: Program) -> tuple[torch.Tensor, ...]:
    """Placeholder inputs with the program's input specs (values are irrelevant)."""
    out = []
    for n in program.input_nodes:
        s = M.spec(n)
        if not isinstance(s, M.TensorSpec) or not s.is_static:
            raise LoweringError(
                f"input %{n.name} of program {program.name!r} has spec {s}; ONNX export "
                "takes static tensor shapes",
                where=str(M.loc(n)),
                hint="capture the model without dynamic_shapes (once per shape you deploy), "
                "or export a SignatureSet (one model per signature)",
            )
        out.append(torch.zeros(tuple(int(d) for d in s.shape), dtype=s.dtype))
    return tuple(out)


def _interpreted(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` running node by node (an ``fx.Interpreter``), so that under
    ``preserve_node_meta`` every exported node keeps its source node's meta; the
    weights keep their names (no wrapper module adds a prefix)."""

    def forward(*args: Any) -> Any:
        return fx.Interpreter(gm).run(*args)

    gm.forward = forward  # type: ignore[method-assign]
    return gm


# ---------------------------------------------------------------------------------------
# 2.-3. torch.export, torch.onnx


def export_program(program: Program) -> torch.export.ExportedProgram:
    """torch.export of the prepared program (nodes carry their Locs in meta["custom"])."""
    gm = prepare(program)
    decomp = fallback_decompositions()
    try:
        with torch.fx.traceback.preserve_node_meta():
            ep = torch.export.export(_interpreted(gm), example_inputs(program), strict=False)
        if decomp:
            ep = ep.run_decompositions(decomp)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"torch.export of program {program.name!r} failed: {type(e).__name__}: {e}",
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


def _conversion_error(program: Program, ep: Any, err: Exception) -> LoweringError:
    node = _failed_node(ep, err)
    first = next((s for s in str(err).splitlines() if s.strip()), type(err).__name__)
    causes = []
    e: BaseException | None = err.__cause__
    while e is not None and len(causes) < 4:
        causes.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        e = e.__cause__
    detail = "; ".join(causes) or first
    if node is None:
        return LoweringError(
            f"ONNX export of program {program.name!r} failed: {detail}",
            hint="see the cause above; an op ONNX cannot express must be rewritten "
            "or registered with register_lowering(op, 'onnx')",
        )
    rec = _record(node)
    where = (
        f"node %{rec.get(KEY_NODE, node.name)} ({node.target}), module "
        f"{rec.get(KEY_MODULE) or '<root>'}, source {rec.get(KEY_SOURCE) or '<unknown>'}"
    )
    return LoweringError(
        f"ONNX export of program {program.name!r}: torch.onnx cannot translate node "
        f"%{rec.get(KEY_NODE, node.name)} ({node.target}): {detail}",
        where=where,
        hint="rewrite the op into ops ONNX has (or give it an ONNX lowering with "
        "register_lowering(op, 'onnx')); torch.onnx's opset library lists what it translates",
    )


def _torch_onnx(program: Program, opset: int) -> tuple[Any, OnnxContext, Any]:
    """(torch.onnx's ONNXProgram, the call context, the ExportedProgram)."""
    require_onnx()
    ep = export_program(program)
    ctx = OnnxContext(opset)
    try:
        with _quiet():
            onx = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                custom_translation_table=translation_table(ctx),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except LoweringError:
        raise
    except Exception as e:
        raise _conversion_error(program, ep, e) from e
    return onx, ctx, ep


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress lines to stdout; keep them out of the user's output."""
    import io
    import sys

    old = sys.stdout
    sys.stdout = io.StringIO()
    try:
        yield
    finally:
        sys.stdout = old


# ---------------------------------------------------------------------------------------
# 4. finish


def _fx_name(node: Any) -> str | None:
    text = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
    m = re.match(r"%(\w+)", text)
    return m.group(1) if m else None


def _walk(graph: Any) -> Iterator[Any]:
    """Every node of an onnx-ir graph and of its sub-graphs (If branches)."""
    for node in graph:
        yield node
        for attr in node.attributes.values():
            g = getattr(attr, "value", None)
            if attr.type.name == "GRAPH":
                yield from _walk(g)
            elif attr.type.name == "GRAPHS":
                for sub in g:
                    yield from _walk(sub)


def _finish(program: Program, onx: Any, ctx: OnnxContext, ep: Any, opset: int) -> Any:
    """The onnx-ir model with names, functions and metadata (see the module docstring)."""
    from onnxscript import ir

    model = onx.model
    graph = model.graph
    if len(graph.inputs) != len(program.input_names):
        raise LoweringError(
            f"ONNX export of {program.name!r}: the model takes {len(graph.inputs)} inputs, "
            f"the program {len(program.input_names)} ({program.input_names})",
            hint="an input the program does not read is dropped by torch.export; remove it",
        )
    if len(graph.outputs) != len(program.output_names):
        raise LoweringError(
            f"ONNX export of {program.name!r}: the model returns {len(graph.outputs)} "
            f"values, the program {len(program.output_names)} ({program.output_names})",
            hint="every program output must be a tensor",
        )
    taken = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    for value, name in [
        *zip(graph.inputs, program.input_names),
        *zip(graph.outputs, program.output_names),
    ]:
        if value.name != name and name in taken:
            value.name = f"{name}__tmp"
    for value, name in [
        *zip(graph.inputs, program.input_names),
        *zip(graph.outputs, program.output_names),
    ]:
        value.name = name
    # node metadata: the Loc of the program node each ONNX node came from
    by_name = {n.name: n for g in _graphs(ep.graph_module) for n in g.graph.nodes}
    for node in _walk(graph):
        fx_name = _fx_name(node)
        src = by_name.get(fx_name) if fx_name else None
        rec = _record(src) if src is not None else {}
        for key, val in rec.items():
            node.metadata_props[key] = val
    # the splice functions (appended after torch.onnx's passes: nothing inlines them)
    for fn in ctx.functions.values():
        f = ir.serde.deserialize_function(fn)
        model.functions[f.identifier()] = f
    if ctx.functions:
        graph.opset_imports[SPLICE_DOMAIN] = SPLICE_DOMAIN_VERSION
    elif SPLICE_DOMAIN in graph.opset_imports and not any(
        n.domain == SPLICE_DOMAIN for n in _walk(graph)
    ):
        del graph.opset_imports[SPLICE_DOMAIN]
    passes = sorted({p for n in program.nodes for p in M.loc(n).from_passes})
    model.metadata_props["splice.program"] = program.name
    model.metadata_props["splice.version"] = __version__
    model.metadata_props[KEY_PASSES] = ",".join(passes)
    model.producer_name = "splice"
    model.producer_version = __version__
    graph.name = program.name or "main"
    return model


def _build(program: Program, opset: int) -> Any:
    """The program as an onnx-ir model (not yet checked)."""
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
    onx, ctx, ep = _torch_onnx(program, opset)
    return _finish(program, onx, ctx, ep, opset)


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
    from onnxscript import ir

    model = _build(program, opset)
    size = _weight_bytes(model)
    if size > EXTERNAL_DATA_LIMIT:
        raise LoweringError(
            f"program {program.name!r} has {size / 2**30:.2f} GiB of weights; one ONNX "
            "ModelProto holds at most 2 GB",
            hint="use export_onnx(program, path), which writes the weights as external data",
        )
    proto = ir.serde.serialize_model(model)
    _check(program, proto)
    return proto


def _weight_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


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

    The weights go to an external data file beside the model (``<name>.onnx.data``) when
    ``external_data=True``, or when ``None`` (the default) and they exceed 2 GB. A
    :class:`SignatureSet` writes one model per member, ``<stem>.s0.onnx``,
    ``<stem>.s1.onnx``, ... in member order (``SignatureSet.signatures`` gives each one's
    input shapes; the models' ``splice.signature`` metadata too). Files are written under
    temporary names and renamed at the end: nothing half-written is left; each model is
    checked with ``onnx.checker`` (full check) before it is moved into place."""
    target = Path(os.path.abspath(os.fspath(path)))
    if target.exists() and target.is_dir():
        raise LoweringError(
            f"cannot write the ONNX model to {target}: it is a folder",
            hint="give a file path such as model.onnx",
        )
    if isinstance(program, SignatureSet):
        from splice.ir.signatures import signature_text

        models = []
        for member, sig in zip(program, program.signatures, strict=True):
            model = _build(member, opset)
            model.metadata_props["splice.signature"] = signature_text(sig, member.input_names)
            models.append((member, model))
        paths = signature_paths(target, len(models))
        _write_all(list(zip(models, paths)), external_data)
        return paths
    model = _build(program, opset)
    _write_all([((program, model), target)], external_data)
    return target


def _write_all(items: list[tuple[tuple[Program, Any], Path]], external_data: bool | None) -> None:
    from onnxscript import ir

    if not items:
        return
    parent = items[0][1].parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".onnx-export.tmp-", dir=parent))
    except OSError as e:
        raise LoweringError(
            f"cannot write to {parent}: {e}", hint="choose a folder you can write to"
        ) from e
    try:
        staged: list[tuple[Path, Path]] = []
        for (program, model), final in items:
            external = (
                external_data
                if external_data is not None
                else _weight_bytes(model) > EXTERNAL_DATA_LIMIT
            )
            out = tmp / final.name
            data = f"{final.name}.data"
            if external:
                ir.save(model, out, external_data=data)
            else:
                ir.save(model, out)
            _check(program, str(out))
            staged.append((out, final))
            if external:
                staged.insert(0, (tmp / data, final.with_name(data)))
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
    "export_onnx",
    "export_program",
    "fallback_decompositions",
    "require_onnx",
    "signature_paths",
    "to_onnx",
    "translation_table",
]
