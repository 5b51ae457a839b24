"""capture(model, example_inputs) -> Program, through ``torch.export``.

The model is exported with ``torch.export.export(strict=False)`` and unlifted, so that
parameters and buffers are ``get_attr`` nodes named by their state_dict names. Then the
graph is normalised into splice's form:

* the pytree calling convention becomes a flat signature: named tensor inputs, and a flat
  tuple of named outputs (``logits``, ``last_hidden_state``, ``out0``...);
* export's guard call and ``_assert_tensor_metadata`` checks are dropped;
* ``wrap_with_set_grad_enabled`` regions and disabled ``wrap_with_autocast`` regions are
  inlined (they do not change what an inference graph computes);
* every node gets a :class:`~splice.ir.meta.TensorSpec` (from export's fake values) and a
  :class:`~splice.ir.meta.Loc` (from ``nn_module_stack`` and the stack trace); export's own
  meta keys are dropped, since passes would leave them stale;
* symbolic dims get the names of the user's ``Dim`` objects where there are some.

``transformers`` decoders return a ``DynamicCache`` that export cannot flatten; a model
whose ``forward`` takes ``use_cache`` is captured with ``use_cache=False`` unless the caller
passed it. The model is captured in eval mode and its mode is restored afterwards.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from splice.errors import CaptureError
from splice.ir import meta as M
from splice.ir.dd_sizes import dense_selections_in
from splice.ir.moe_capture import recognise_moe
from splice.ir.output_tree import constant_leaf, output_names, tree_from_spec
from splice.ir.program import Program, build_graph_module, get_attr_path, weight_name_problem

_INLINE_HOPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")
_DROP_OPS = {"aten._assert_tensor_metadata.default"}


def capture(
    model: nn.Module,
    example_inputs: Any,
    dynamic_shapes: Any = None,
    *,
    name: str | None = None,
) -> Program:
    """Capture ``model`` on ``example_inputs`` into a Program.

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword
    inputs. ``dynamic_shapes`` follows ``torch.export`` (``Dim`` objects per input dim).
    Raises :class:`~splice.errors.CaptureError` naming the module path and source line
    when export fails.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture expects an nn.Module, got {type(model).__name__}",
            hint="wrap a function in an nn.Module whose forward calls it",
        )
    _check_weight_names(model)
    args, kwargs = split_inputs(example_inputs)
    user_kwargs = set(kwargs)
    kwargs = _transformers_kwargs(model, kwargs)
    dims_by_name = _dims_by_input_name(model, args, dynamic_shapes)
    if dynamic_shapes is not None and set(kwargs) != user_kwargs:
        # the added keyword inputs are constants: give export a dict keyed by argument name
        dynamic_shapes = {**dims_by_name, **{k: None for k in kwargs if k not in dims_by_name}}
    was_training = model.training
    model.eval()
    try:
        with recognise_moe(model) as moe:  # sparse-MoE blocks export as splice::moe_ffn
            ep = _export(model, args, kwargs, dynamic_shapes)
    finally:
        model.train(was_training)
    program = to_program(ep, args, kwargs, dims_by_name, name or type(model).__name__)
    moe.annotate(program)
    return program


def _check_weight_names(model: nn.Module) -> None:
    """Raise CaptureError when a parameter or buffer has a name a Program cannot hold.

    A Program keeps state_dict names as attribute paths of its GraphModule, so a name part
    that GraphModule or nn.Module already uses (``graph``, ``code``, ``meta``, ``forward``,
    ``to``...), a keyword or a non-identifier would break capture, the text IR or running.
    """
    named = [("parameter", n) for n, _ in model.named_parameters(remove_duplicate=False)]
    named += [("buffer", n) for n, _ in model.named_buffers(remove_duplicate=False)]
    for kind, name in named:
        problem = weight_name_problem(name)
        if problem is None:
            continue
        owner = name.rpartition(".")[0]
        raise CaptureError(
            f"cannot capture {type(model).__name__}: {kind} {name!r} has a name a splice "
            f"Program cannot hold ({problem})",
            where=f"module {owner!r}" if owner else "the model itself",
            hint="rename that attribute or submodule in the model (e.g. with a trailing "
            "underscore) and capture again",
        )


def _dims_by_input_name(model: nn.Module, args: tuple, dynamic_shapes: Any) -> dict[str, Any]:
    """The user's dynamic_shapes keyed by forward argument name."""
    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, Mapping):
        return dict(dynamic_shapes)
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = [f"arg{i}" for i in range(len(args))]
    return dict(zip(names, dynamic_shapes))


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of what capture takes: a tensor, a tuple (or list) of positional
    inputs, a dict of keyword inputs, or ``(args, kwargs)``; CaptureError otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if (
            len(example_inputs) == 2
            and isinstance(example_inputs[1], Mapping)
            and isinstance(example_inputs[0], (tuple, list))
        ):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, got {type(example_inputs).__name__}"
    )


def _transformers_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn off the KV cache of transformers models: export cannot flatten DynamicCache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    config = getattr(model, "config", None)
    if "use_cache" in params and "use_cache" not in kwargs and config is not None:
        kwargs = {**kwargs, "use_cache": False}
    return kwargs


# ---------------------------------------------------------------------------------------
# export and its errors


def _export(
    model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any
) -> torch.export.ExportedProgram:
    try:
        with dense_selections_in(model):  # nonzero()/where(mask) dispatch, densely
            return torch.export.export(
                model, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, strict=False
            )
    except CaptureError:
        raise
    except Exception as e:  # export raises many types; all become CaptureError
        text = str(e)
        if "not a known type" in text and "in output" in text:
            _check_output_constants(model, args, kwargs)
        raise capture_error(model, e) from e


def _check_output_constants(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """After export refused a type in the output: run the model once and raise the
    CaptureError of :func:`splice.ir.output_tree.constant_leaf`, which names the output and
    says what to do (returns if the eager run does not show it)."""
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    except Exception:
        return
    for path, value in pytree.tree_flatten_with_path(out)[0]:
        if not isinstance(value, torch.Tensor):
            constant_leaf(value, pytree.keystr(path), type(model).__name__)


_DATA_DEP = (
    "data-dependent",
    "Could not guard on data-dependent",
    "GuardOnDataDependentSymNode",
    "Could not extract specialized integer from data-dependent",
    "dynamic control flow",
)


def capture_error(model: nn.Module, e: BaseException, *, dynamic: bool = False) -> CaptureError:
    """The CaptureError for export's exception ``e``; ``dynamic``: raised while
    :func:`splice.capture_dynamic` traces a path (its hint cannot be "use capture_dynamic")."""
    module_path, source = _locate(model, e)
    text = str(e)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    where = f"module {module_path or '<root>'}" + (f", {source}" if source else "")
    if any(k in text or k in type(e).__name__ for k in _DATA_DEP) and dynamic:
        return CaptureError(
            f"torch.export cannot capture a data-dependent value here: {first}",
            where=where,
            hint="capture_dynamic explores bool and argmax/argmin index conversions only; a "
            "tensor value that sets a shape (nonzero, masked_select, a size from .item()) or a "
            "float turned into a Python number cannot be explored: keep it a tensor, or bound "
            "the shape and mask",
        )
    if any(k in text or k in type(e).__name__ for k in _DATA_DEP):
        return CaptureError(
            f"torch.export cannot capture data-dependent control flow: {first}",
            where=where,
            hint="a tensor value decides a Python branch or loop here: capture the model with "
            "splice.capture_dynamic(model, inputs), which explores every path (then the "
            "branches pass splits it), or rewrite the branch with torch.cond",
        )
    if "Constraints violated" in text:
        fixes = text[text.find("Suggested fixes") :].strip() if "Suggested fixes" in text else ""
        return CaptureError(
            f"the dynamic shapes given do not hold for this model: {first}",
            where=where,
            hint=fixes or "narrow the Dim ranges as torch.export suggests",
        )
    if "not a known type" in text and "pytree" in text:
        return CaptureError(
            f"the model returns a type torch.export cannot flatten: {first}",
            where=where,
            hint="return tensors (or register the type with torch.utils._pytree)",
        )
    return CaptureError(
        f"torch.export failed ({type(e).__name__}): {first}",
        where=where,
        hint="run torch.export.export(model, args, strict=False) to see the full report",
    )


def _locate(model: nn.Module, e: BaseException) -> tuple[str, str]:
    """Innermost frame of the model's own code in the traceback: (module path, file:line)."""
    paths = {id(m): name for name, m in model.named_modules()}
    torch_dir = M._TORCH_DIR
    best_path, best_src = "", ""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    # the innermost exception's traceback reaches deepest into the model's own code
    for exc in reversed(chain):
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            fname = frame.f_code.co_filename
            if not fname.startswith(torch_dir) and not fname.startswith(_HERE):
                self_obj = frame.f_locals.get("self")
                if self_obj is not None and id(self_obj) in paths:
                    best_path = paths[id(self_obj)]
                best_src = f"{fname}:{tb.tb_lineno}"
            tb = tb.tb_next
        if best_src:
            break
    if not best_src:
        m = re.findall(r'File "([^"]+)", line (\d+)', str(e))
        user = [(f, int(ln)) for f, ln in m if not f.startswith(torch_dir)]
        if user:
            best_src = f"{user[-1][0]}:{user[-1][1]}"
    if best_src and not best_path:
        file, _, line = best_src.rpartition(":")
        best_path = _module_for_source(model, file, int(line))
    return best_path, best_src


def _module_for_source(model: nn.Module, file: str, line: int) -> str:
    """The module whose forward contains file:line (the first such, by module order)."""
    for name, m in model.named_modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is None or code.co_filename != file:
            continue
        lines = [ln for _, _, ln in code.co_lines() if ln is not None]
        if lines and min(lines) <= line <= max(lines):
            return name
    return ""


_HERE = __file__.rsplit("/", 2)[0]


# ---------------------------------------------------------------------------------------
# normalisation into a Program


def _symbol_names(
    ep: torch.export.ExportedProgram, gm: fx.GraphModule, dims_by_name: Mapping[str, Any]
) -> dict[str, tuple[str, M.SymbolInfo]]:
    """export symbol -> (program symbol name, info), named after the user's Dims if possible."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    hints = {str(k): v for k, v in _symbol_hints(ep).items()}
    result: dict[str, tuple[str, M.SymbolInfo]] = {}
    counter = 0
    for ph in placeholders:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        per_dim = dims_by_name.get(ph.name)
        for d, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
                continue
            expr = size.node.expr
            if not expr.is_Symbol or str(expr) in result:
                continue
            name = None
            if (isinstance(per_dim, Mapping) and d in per_dim) or (
                isinstance(per_dim, (tuple, list)) and d < len(per_dim)
            ):
                name = getattr(per_dim[d], "__name__", None)
            if not name or not name.isidentifier() or name in {v[0] for v in result.values()}:
                name = f"s{counter}"
                counter += 1
            hint = int(hints.get(str(expr), 1))
            vr = ranges.get(str(expr))
            lo = int(vr.lower) if vr is not None and vr.lower.is_finite else 0
            hi = int(vr.upper) if vr is not None and vr.upper.is_finite else None
            result[str(expr)] = (name, M.SymbolInfo(hint=hint, min=lo, max=hi))
    return result


def _symbol_hints(ep: torch.export.ExportedProgram) -> dict[Any, int]:
    """Example values of export's symbols (from the shape env of its fake inputs)."""
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape):
            env = next(d for d in v.shape if isinstance(d, torch.SymInt)).node.shape_env
            return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def _make_expr_str(rename: Mapping[str, str]):
    import sympy

    def expr_str(v: Any) -> str:
        expr = v.node.expr
        subs = {s: sympy.Symbol(rename[str(s)]) for s in expr.free_symbols if str(s) in rename}
        return M._compact(str(expr.xreplace(subs)) if subs else str(expr))

    return expr_str


def _inline_hops(gm: fx.GraphModule) -> None:
    """Inline grad-mode and disabled-autocast wrapper regions in place."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _INLINE_HOPS:
            continue
        hop = node.target.__name__
        if hop == "wrap_with_set_grad_enabled":
            sub_node, operands = node.args[1], node.args[2:]
        else:
            enabled = node.args[2]
            if enabled:
                continue
            sub_node, operands = node.args[4], node.args[5:]
        sub = get_attr_path(gm, sub_node.target)
        _inline_hops(sub)
        env: dict[fx.Node, Any] = {}
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, arg in zip(phs, operands):
            env[ph] = arg
        result: Any = None
        with gm.graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    continue
                if sn.op == "output":
                    result = fx.node.map_arg(sn.args[0], env.__getitem__)
                    break
                new = gm.graph.node_copy(sn, env.__getitem__)
                if "nn_module_stack" not in new.meta and "nn_module_stack" in node.meta:
                    new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
                env[sn] = new
        for user in list(node.users):
            if user.op == "call_function" and user.target.__name__ == "getitem":
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
            if not sub_node.users:
                gm.graph.erase_node(sub_node)
                delattr(gm, sub_node.target)


def _convert_graph(
    src: fx.GraphModule,
    weight_names: set[str],
    expr_str,
    top: bool,
    subgraphs_out: dict[str, fx.GraphModule],
) -> fx.Graph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in src.graph.nodes:
        if n.op == "call_function" and str(n.target) in _DROP_OPS:
            continue
        if (
            n.op == "placeholder"
            and not n.users
            and not isinstance(n.meta.get("val"), torch.Tensor)
        ):
            continue  # a constant keyword input (use_cache=False) that export specialised
        if n.op == "output":
            out = n.args[0]
            flat = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            if top:
                graph.output(tuple(env[a] for a in flat if isinstance(a, fx.Node)))
            else:
                graph.output(fx.node.map_arg(out, lambda a: env[a]))
            continue
        new = graph.node_copy(n, lambda a: env[a])
        loc = M.loc_from_export_meta(n.meta)
        val = n.meta.get("val")
        M.clear_foreign_meta(new)
        if n.op == "get_attr" and n.target not in weight_names:
            child = get_attr_path(src, n.target)
            if isinstance(child, fx.GraphModule):
                subgraphs_out[n.target] = _convert_sub(child, expr_str)
                M.set_spec(new, M.GraphRefSpec(n.target))
                M.set_loc(new, loc)
                env[n] = new
                continue
        if val is None and n.op == "get_attr":
            val = get_attr_path(src, n.target)
        if val is not None:
            M.set_spec(new, M.spec_of_value(val, expr_str))
        elif n.op == "call_function":
            M.set_spec(new, M.NONE)
        M.set_loc(new, loc)
        env[n] = new
    return graph


def _convert_sub(sub: fx.GraphModule, expr_str) -> fx.GraphModule:
    nested: dict[str, fx.GraphModule] = {}
    graph = _convert_graph(sub, set(), expr_str, top=False, subgraphs_out=nested)
    return build_graph_module(graph, {}, nested, class_name="SubGraph")


def to_program(
    ep: torch.export.ExportedProgram,
    args: tuple,
    kwargs: dict,
    dims_by_name: Mapping[str, Any],
    name: str,
) -> Program:
    """The Program of an exported program, normalised into splice's form (see the module
    docstring): flat named inputs and outputs, weights as ``get_attr``, specs and Locs on
    every node, symbols named after ``dims_by_name`` (input name -> its ``Dim`` objects)."""
    gm = ep.module()
    sig = ep.graph_signature
    kinds: dict[str, str] = {p: "param" for p in sig.parameters}
    nonpersistent = set(sig.non_persistent_buffers)
    for b in sig.buffers:
        kinds[b] = "constant" if b in nonpersistent else "buffer"
    for c in sig.lifted_tensor_constants:
        kinds[c] = "constant"
    # unlifting may name constants differently; take every tensor the graph reads
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in kinds:
            obj = get_attr_path(gm, n.target)
            if isinstance(obj, torch.Tensor):
                kinds[n.target] = "param" if isinstance(obj, nn.Parameter) else "constant"
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards_fn"):
            gm.graph.erase_node(n)
    _inline_hops(gm)
    syms = _symbol_names(ep, gm, dims_by_name)
    expr_str = _make_expr_str({k: v[0] for k, v in syms.items()})
    subgraphs: dict[str, fx.GraphModule] = {}
    graph = _convert_graph(gm, set(kinds), expr_str, top=True, subgraphs_out=subgraphs)
    out_node = graph.find_nodes(op="output")[0]
    n_out = len(out_node.args[0])
    out_spec = ep.call_spec.out_spec
    leaves = _flat_outputs(gm)
    attrs: dict[str, Any] = {}
    if out_spec is not None and any(not isinstance(a, fx.Node) for a in leaves):
        # constants among the outputs: the tensors are the outputs, the tree keeps the rest
        out_names, attrs["output_tree"] = _output_tree(out_spec, leaves, n_out, name)
    else:
        out_names = output_names(out_spec, n_out) if out_spec else None
    if out_names is not None and len(out_names) != n_out:
        out_names = None
    used = {n.target for n in graph.find_nodes(op="get_attr")}
    weights = {w: (get_attr_path(gm, w), k) for w, k in kinds.items() if w in used}
    new_gm = build_graph_module(graph, weights, subgraphs, class_name=f"Program_{ident(name)}")
    program = Program(
        new_gm,
        output_names=out_names,
        weight_kinds={w: k for w, (_, k) in weights.items()},
        symbols={v[0]: v[1] for v in syms.values()},
        name=ident(name),
        attrs=attrs,
    )
    return program


def _flat_outputs(gm: fx.GraphModule) -> list[Any]:
    """The leaves of the exported graph's output: nodes, and the constants export kept."""
    out = gm.graph.find_nodes(op="output")[0].args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _output_tree(
    out_spec: Any, leaves: list[Any], n_out: int, model: str
) -> tuple[list[str], dict[str, Any]]:
    """(output names, output tree) of an output with constant leaves: each node leaf is an
    output (named from its place, as for tensor-only outputs), each constant a ``const``
    leaf; a constant that is not a JSON scalar is a CaptureError naming the output."""
    if out_spec.num_leaves != len(leaves):
        raise CaptureError(
            f"torch.export returned {len(leaves)} output values for an output structure of "
            f"{out_spec.num_leaves} leaves",
            where=f"the output of {model}",
            hint="return a flat tuple of tensors",
        )
    all_names = output_names(out_spec, len(leaves))
    names = [n for n, a in zip(all_names, leaves) if isinstance(a, fx.Node)]
    if len(names) != n_out:
        raise CaptureError(
            f"the output of {model} has {len(names)} tensor leaves but its graph returns "
            f"{n_out} values",
            hint="return a flat tuple of tensors",
        )

    def leaf(i: int, value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, fx.Node):
            return {"output": all_names[i]}
        return constant_leaf(value, path, model)

    return names, tree_from_spec(out_spec, leaves, leaf, where=model)


def ident(name: str) -> str:
    """``name`` as a Python identifier (non-word characters become ``_``; a leading digit
    gets a ``p_`` prefix): program and graph-module class names."""
    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else f"p_{s}"


__all__ = ["capture", "capture_error", "ident", "output_names", "split_inputs", "to_program"]
