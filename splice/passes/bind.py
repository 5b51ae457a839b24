"""Bind a program input to a value and fold what it decides.

:func:`bind_input` is the core of ``specialize``: the input becomes a known value; every
node computed from known values, weights and literals (and from at least one known value)
is evaluated; every ``cond`` whose predicate is known is decided and its taken branch
inlined; the input leaves the program. A known tensor that something else still reads (an
op that also reads run-time values, an undecided branch's operand, an output) is stored as
a ``constant`` weight ``{prefix}.{node}``. Weights that the result no longer reads are
dropped; everything else is copied unchanged (a copied node keeps its spec and Loc: the
same op on the same values).

``stitch`` programs are one user: ``config = i`` decides their ``cond(config == k)`` chain,
which is :func:`splice.passes.stitch.select_config`.
"""

from __future__ import annotations

import copy as _copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.builder import Builder
from splice.ir.program import Program, build_graph_module, get_attr_path

COND = torch.ops.higher_order.cond


@dataclass(frozen=True)
class Known:
    """A value known at specialisation time."""

    value: Any


@dataclass(frozen=True)
class _Sub:
    """A sub-graph reference of the source program (registered in the result when used)."""

    name: str
    module: fx.GraphModule


@dataclass
class BindResult:
    program: Program
    value: torch.Tensor  # the value bound, with the input's spec
    decided: int  # cond nodes decided
    folded: int  # nodes evaluated
    constants: list[str]  # constant weights added


def bind_input(
    program: Program,
    name: str,
    value: Any,
    *,
    pass_name: str | None = "specialize",
    prefix: str = "specialize",
    result_name: str | None = None,
    drop_attrs: tuple[str, ...] = (),
) -> BindResult:
    """``program`` with input ``name`` bound to ``value`` (module docstring). ``value`` must
    have the input's spec. The input program is not changed."""
    inputs = {ph.name: ph for ph in program.input_nodes}
    if name not in inputs:
        raise PassError(f"program {program.name!r} has no input {name!r}; inputs: {list(inputs)}")
    value = _as_value(value, M.spec(inputs[name]), name)
    weights = {w: (program.get_weight(w), k) for w, k in program.weight_kinds.items()}
    g = fx.Graph()
    g.output(())
    gm = build_graph_module(g, weights, {}, class_name=f"Program_{result_name or program.name}")
    out = Program(
        gm,
        output_names=[],
        weight_kinds={w: k for w, (_, k) in weights.items()},
        symbols=program.symbols,
        name=result_name or program.name,
        attrs={k: v for k, v in program.attrs.items() if k not in drop_attrs},
    )
    folder = _Folder(out, Builder(out, pass_name), prefix)
    with folder.b.at(out.output_node):
        env: dict[fx.Node, Any] = {}
        for ph in program.input_nodes:
            if ph.name == name:
                env[ph] = Known(value)
            else:
                env[ph] = folder.b.copy(ph, lambda a: a)  # the same input
        results = folder.inline(program.graph_module, env, top=True)
        outs = [folder.materialise(v, f"{prefix}.out{i}") for i, v in enumerate(results)]
    out.set_outputs(outs, program.output_names)
    for n in list(out.graph.find_nodes(op="get_attr")):
        if not n.users:  # read only by what was folded or decided away
            out.graph.erase_node(n)
    read = {n.target for n in out.graph.find_nodes(op="get_attr")}
    for w in list(out.weight_kinds):
        if w not in read:
            out.remove_weight(w)
    return BindResult(out, value, folder.decided, folder.folded, folder.constants)


class _Folder:
    def __init__(self, out: Program, b: Builder, prefix: str) -> None:
        self.out = out
        self.b = b
        self.prefix = prefix
        self.decided = 0
        self.folded = 0
        self.constants: list[str] = []
        self._refs: dict[str, fx.Node] = {}

    def inline(self, gm: fx.GraphModule, env: dict[fx.Node, Any], *, top: bool) -> list[Any]:
        """Copy ``gm``'s nodes into the result (``env``: its placeholders' values); returns
        the values of its outputs."""
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                res = n.args[0] if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
                return [env[a] if isinstance(a, fx.Node) else a for a in res]
            if n.op == "get_attr":
                child = get_attr_path(gm, n.target)
                if isinstance(child, fx.GraphModule):
                    env[n] = _Sub(n.target, child)
                elif top:
                    env[n] = self.b.copy(n, lambda a: a)
                else:  # pragma: no cover - weights live in the top graph
                    raise PassError(f"sub-graph reads weight @{n.target} directly")
                continue
            if n.target is COND and isinstance(env.get(n.args[0]), Known):
                taken = bool(env[n.args[0]].value)
                sub = env[n.args[1] if taken else n.args[2]].module
                phs = [p for p in sub.graph.nodes if p.op == "placeholder"]
                inner = dict(zip(phs, (env[o] for o in n.args[3])))
                env[n] = self.inline(sub, inner, top=False)
                self.decided += 1
                continue
            if n.target is operator.getitem and isinstance(env.get(n.args[0]), list):
                env[n] = env[n.args[0]][n.args[1]]
                continue
            ins = [env[a] for a in n.all_input_nodes]
            if (
                n.op == "call_function"
                and any(isinstance(v, Known) for v in ins)
                and all(isinstance(v, Known) or self._is_weight(v) for v in ins)
                and _foldable(n)
            ):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self._value(env[a]))
                with torch.no_grad():
                    env[n] = Known(n.target(*args, **kwargs))
                self.folded += 1
                continue
            env[n] = self.b.copy(n, lambda a: self._use(env[a], f"{self.prefix}.{a.name}"))
        raise PassError("a graph has no output")

    def _is_weight(self, v: Any) -> bool:
        return isinstance(v, fx.Node) and v.op == "get_attr" and self.out.has_weight(v.target)

    def _value(self, v: Any) -> Any:
        return v.value if isinstance(v, Known) else self.out.get_weight(v.target)

    def _use(self, v: Any, name: str) -> Any:
        """``v`` as an argument of a copied node."""
        if isinstance(v, _Sub):
            ref = self._refs.get(v.name)
            if ref is None:
                ref = self._refs[v.name] = self.b.graph_ref(v.name, _copy.deepcopy(v.module))
            return ref
        return self.materialise(v, name)

    def materialise(self, v: Any, name: str) -> Any:
        """A node (or literal) for value ``v``: known tensors become constant weights."""
        if not isinstance(v, Known):
            return v
        x = v.value
        if isinstance(x, torch.Tensor):
            w = self.out.unique_weight_name(name)
            self.out.add_weight(w, x.detach().clone().contiguous(), "constant")
            self.constants.append(w)
            return self.b.weight(w)
        if isinstance(x, (bool, int, float)):
            return x
        raise PassError(f"cannot keep the known value {name} of type {type(x).__name__}")


def _foldable(n: fx.Node) -> bool:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded not in t.tags
    return t is operator.getitem


def _as_value(value: Any, spec: M.Spec, name: str) -> torch.Tensor:
    """``value`` as a tensor of the input's spec (a one-element input takes a scalar)."""
    if not isinstance(spec, M.TensorSpec) or not spec.is_static:
        raise PassError(f"input {name!r} is {spec}: only static tensor inputs can be bound")
    t = torch.as_tensor(value, dtype=spec.dtype)
    if tuple(t.shape) != spec.shape:
        if t.numel() != 1 or spec.numel() != 1:
            raise PassError(f"input {name!r} is {spec}; the value has shape {list(t.shape)}")
        t = t.reshape(spec.shape)
    return t


__all__ = ["BindResult", "Known", "bind_input"]
