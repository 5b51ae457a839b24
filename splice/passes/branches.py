"""``branches``: dynamic-branch splitting (DyCL, Chen et al., ISSTA 2023).

Input: a Program with data-dependent control flow as ``torch.cond`` nodes — from
:func:`splice.ir.explore.capture_dynamic` (which captures ``if``/early ``return``/bounded
loops/``modules[idx]`` from a model's own ``forward``) or from a model that calls
``torch.cond`` itself.

Output: the same function in *split form*. Every graph (the top one and every branch) is
cut at its ``cond`` nodes into maximal branch-free segments; each segment becomes a
**part**, a sub-graph called through ``higher_order.invoke_subgraph(@part, "part_k", ...)``,
whose inputs are the segment's live-in values and whose outputs are its live-out values
(those read after the segment: by a later part, a branch predicate or operand, or the
graph's results). What is left of each graph is its **host** code: part calls, ``cond``
over host sub-graphs, and tuple indexing. The runtime turns that into a serialisable host
program (``host.json``) and compiles each part on its own (:mod:`splice.runtime.host`).

As in DyCL's graph optimisation, outputs that need no compiled code are hoisted into the
host: an output that is a live-in passed through identity ops (``clone``, ``alias``,
``detach``, a same-shape ``view``) is replaced by that live-in, and an output that depends
on weights and literals only is evaluated once and stored as a constant weight. A segment
left with no outputs is not a part at all (a skipped block's "else" branch costs no call).
Parts that are the same computation on the same weights (the tail after a gate, reached
through many paths) are one part, called from several places. A comparison of a host
integer scalar with a literal (``eq(idx, k)`` in the switch chain of an index decision, or
a run-time configuration number) is host code too: the host evaluates it itself instead of
calling a part for one comparison.

A node marked with :func:`~splice.ir.builder.mark_part_start` starts a new part even inside a branch-free
segment. Passes that build programs from repeated pieces (``stitch`` routes made of the
same blocks) mark where a piece starts, so that the same piece on different paths becomes
one shared part instead of being compiled into every path's part.

Invariants (tests): the split program equals the input on every path (``exact``); parts
contain no control flow and export with ``torch.export`` with no graph break; each part's
inputs and outputs are exactly its segment's live-in and live-out values.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.builder import Builder, starts_part
from splice.ir.host_steps import (
    COND,
    INVOKE,
    has_control_flow,
    is_cond,
    is_host_compare,
    is_part_call,
    is_split,
)
from splice.ir.program import Program, build_graph_module, get_attr_path
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.registry import register_pass

_aten = torch.ops.aten

_IDENTITY = {
    _aten.alias.default,
    _aten.clone.default,
    _aten.detach.default,
    _aten.contiguous.default,
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
}


@dataclass
class _State:
    out: Program  # the split program, built in place; owns every weight and constant
    parts: dict[str, str] = field(default_factory=dict)  # structural key -> part name
    part_modules: dict[str, fx.GraphModule] = field(default_factory=dict)
    calls: int = 0
    hoisted_identity: int = 0
    hoisted_constant: int = 0
    empty_segments: int = 0
    branches: int = 0


@dataclass(frozen=True)
class _Bind:
    """What a host value is: a weight (by name) or a run-time value."""

    weight: str | None = None


class _Splitter:
    def __init__(self, state: _State):
        self.st = state

    def split(
        self, owner: fx.GraphModule, binds: list[_Bind] | None, b: Builder
    ) -> tuple[list[Any], list[str]]:
        """Split ``owner``'s graph into host code and parts, built by ``b``.

        ``binds`` says which placeholders are weights (None: the top graph, where weights
        are get_attr nodes). Returns the host values of the graph's outputs (a sub-graph's
        output node is made here) and the constants a sub-graph needs as extra trailing
        placeholders.
        """
        src = owner.graph
        env: dict[fx.Node, fx.Node] = {}
        weight_of: dict[fx.Node, str] = {}
        extra: list[str] = []
        top = binds is None
        phs = [n for n in src.nodes if n.op == "placeholder"]
        for i, ph in enumerate(phs):
            env[ph] = b.copy(ph, _same)
            if binds is not None and binds[i].weight is not None:
                weight_of[ph] = binds[i].weight
        segment: list[fx.Node] = []

        def const_node(name: str) -> fx.Node:
            if top:
                return b.weight(name)
            if name not in extra:
                extra.append(name)
            return self._const_placeholder(b, name)

        def flush() -> None:
            if segment:
                self._emit(b, segment, env, weight_of, const_node)
                segment.clear()

        for n in src.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "get_attr":
                child = get_attr_path(owner, n.target)
                if isinstance(child, fx.GraphModule):
                    continue  # a branch; handled at its cond
                env[n] = b.copy(n, _same)
                weight_of[n] = n.target
                continue
            if n.op == "output":
                flush()
                outs = fx.node.map_arg(n.args[0], env.__getitem__)
                if not top:
                    b.output(outs)
                return list(outs), extra
            if is_cond(n):
                flush()
                self._cond(owner, b, n, env, weight_of, const_node)
                continue
            if n.op == "call_function" and n.target is operator.getitem and is_cond(n.args[0]):
                env[n] = b.copy(n, env.__getitem__)
                continue
            if is_part_call(n):
                raise PassError(
                    "the program is already split into parts",
                    where=f"node %{n.name}",
                    hint="run branches once",
                )
            if is_host_compare(n) and n.args[0] in env:
                env[n] = b.copy(n, env.__getitem__)
                continue
            if starts_part(n):
                flush()
            segment.append(n)
        raise PassError(f"graph {owner.__class__.__name__} has no output")

    # -- branches -------------------------------------------------------------------------
    def _cond(self, owner, b: Builder, n, env, weight_of, const_node) -> None:
        pred, true_ref, false_ref, operands = n.args
        binds = [_Bind(weight_of.get(o)) for o in operands]
        results: list[tuple[str, Builder]] = []
        extras: list[list[str]] = []
        for ref in (true_ref, false_ref):
            child = get_attr_path(owner, ref.target)
            sb = b.sub()
            _, extra = _Splitter(self.st).split(child, binds, sb)
            results.append((ref.target, sb))
            extras.append(extra)
        # both branches take the same operands: every constant either of them needs
        needed = list(dict.fromkeys(extras[0] + extras[1]))
        new_refs = []
        for target, sb in results:
            # order: the original operands, then the constants in `needed` order
            phs = list(sb.graph.find_nodes(op="placeholder"))
            anchor = phs[len(operands) - 1] if operands else None
            for name in needed:
                p = self._const_placeholder(sb, name)
                if anchor is not None:
                    anchor.append(p)
                else:
                    next(iter(sb.graph.nodes)).prepend(p)
                anchor = p
            with b.loc(M.loc(true_ref)):
                new_refs.append(b.graph_ref(target, sb))
        new_ops = tuple(env[o] for o in operands) + tuple(const_node(c) for c in needed)
        env[n] = b.call(COND, (env[pred], new_refs[0], new_refs[1], new_ops), loc=M.loc(n))
        self.st.branches += 1

    def _const_placeholder(self, b: Builder, name: str) -> fx.Node:
        """The placeholder of hoisted constant ``name`` in ``b``'s sub-graph (appended if new)."""
        for p in b.graph.find_nodes(op="placeholder"):
            if p.name == _cname(name):
                return p
        # a placeholder's spec is given: the constant's
        spec = M.spec_of_value(self.st.out.get_weight(name))
        return b.placeholder(_cname(name), spec, loc=M.UNKNOWN_LOC)

    # -- parts ----------------------------------------------------------------------------
    def _emit(self, b: Builder, segment, env, weight_of, const_node) -> None:
        inside = set(segment)
        outputs: list[fx.Node] = []
        for n in segment:
            if any(u not in inside for u in n.users):
                outputs.append(n)
        # hoist identities and constants into the host
        part_outputs: list[fx.Node] = []
        alias: dict[fx.Node, fx.Node] = {}
        for o in outputs:
            root = o
            while (
                root in inside
                and root.op == "call_function"
                and root.target in _IDENTITY
                and isinstance(root.args[0], fx.Node)
                and M.get_spec(root.args[0]) == M.get_spec(root)
            ):
                root = root.args[0]
            if root not in inside:
                env[o] = env[root]
                self.st.hoisted_identity += 1
                continue
            if self._is_constant(root, inside, weight_of):
                name = self._fold(root, inside, weight_of)
                env[o] = const_node(name)
                weight_of[o] = name  # later parts read it as a weight, not a run-time value
                self.st.hoisted_constant += 1
                continue
            alias[o] = root
            if root not in part_outputs:
                part_outputs.append(root)
        if not part_outputs:
            self.st.empty_segments += 1
            return
        # the part: live-ins (values first, then weights), the segment's nodes, live-outs
        needed = _ancestors_within(part_outputs, inside)
        body = [n for n in segment if n in needed]
        live_in: list[fx.Node] = []
        for n in body:
            for a in n.all_input_nodes:
                if a not in inside and a not in live_in:
                    live_in.append(a)
        values = [a for a in live_in if a not in weight_of]
        weights = [a for a in live_in if a in weight_of]
        pb = b.sub()
        penv: dict[fx.Node, fx.Node] = {}
        for a in values + weights:
            nm = _cname(weight_of[a]) if a in weight_of else a.name
            # a part's input has the spec of the value it receives
            spec = M.spec(a) if M.get_spec(a) is not None else M.spec(env[a])
            penv[a] = pb.placeholder(nm, spec, loc=M.loc(a))
        for n in body:
            penv[n] = pb.copy(n, penv.__getitem__)
        pb.output(tuple(penv[o] for o in part_outputs))
        key = _part_key(pb.graph, [weight_of.get(a) for a in values + weights])
        name = self.st.parts.get(key)
        if name is None:
            name = f"part_{len(self.st.parts)}"
            self.st.parts[key] = name
            self.st.part_modules[name] = pb.graph_module("Part")
        with b.loc(M.loc(body[0])):
            ref = b.graph_ref(name, self.st.part_modules[name])
        call = b.call(INVOKE, (ref, name, *(env[a] for a in values + weights)), loc=M.loc(body[-1]))
        self.st.calls += 1
        for i, o in enumerate(part_outputs):
            env[o] = b.call(operator.getitem, (call, i), loc=M.loc(o))
        for o, root in alias.items():
            env[o] = env[root]

    def _is_constant(self, node: fx.Node, inside: set[fx.Node], weight_of: dict) -> bool:
        """Depends on weights and literals only (no run-time value)?"""
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n not in inside:
                if n in weight_of:
                    continue
                return False
            if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
                return False
            if torch.Tag.nondeterministic_seeded in n.target.tags:
                return False
            stack.extend(n.all_input_nodes)
        return True

    def _fold(self, node: fx.Node, inside: set[fx.Node], weight_of: dict) -> str:
        values: dict[fx.Node, Any] = {}
        out = self.st.out
        for n in _topo(node):
            if n not in inside:
                values[n] = out.get_weight(weight_of[n])
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
            with torch.no_grad():
                values[n] = n.target(*args, **kwargs)
        value = values[node]
        for name, kind in out.weight_kinds.items():
            t = out.get_weight(name)
            # the same constant folded on another path (or another route) is one weight,
            # so that parts reading it stay structurally identical and are shared
            if (
                kind == "constant"
                and name.startswith("branches.const_")
                and isinstance(value, torch.Tensor)
                and t.shape == value.shape
                and t.dtype == value.dtype
                and torch.equal(t, value)
            ):
                return name
        name = f"branches.const_{self.st.hoisted_constant}"
        while out.has_weight(name):
            name += "_"
        out.add_weight(name, value, "constant")
        return name


def _same(n: fx.Node) -> fx.Node:  # pragma: no cover - placeholders and get_attrs take no args
    return n


def _topo(node: fx.Node) -> list[fx.Node]:
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
        for a in n.all_input_nodes:
            visit(a)
        order.append(n)

    visit(node)
    return order


def _ancestors_within(outputs: list[fx.Node], inside: set[fx.Node]) -> set[fx.Node]:
    needed: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in needed or n not in inside:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed


def _cname(weight: str) -> str:
    return "w_" + weight.replace(".", "_")


def _part_key(g: fx.Graph, weight_names: list[str | None]) -> str:
    """Structural identity of a part: ops, literal arguments, specs, and which weights."""
    ids: dict[fx.Node, int] = {}
    lines = []
    for i, n in enumerate(g.nodes):
        ids[n] = i
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{ids[a]}")
        lines.append(f"{n.op}|{n.target if n.op != 'placeholder' else ''}|{args}|{M.get_spec(n)}")
    lines.append(repr(weight_names))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def split_program(program: Program) -> tuple[Program, dict[str, Any]]:
    """The split form of ``program`` (module docstring) and the pass statistics."""
    weights = {w: (program.get_weight(w), k) for w, k in program.weight_kinds.items()}
    g = fx.Graph()
    g.output(())
    out = Program(
        build_graph_module(g, weights, {}, class_name=f"Program_{program.name}"),
        output_names=[],
        weight_kinds=program.weight_kinds,
        symbols=program.symbols,
        name=program.name,
        attrs=program.attrs,
    )
    st = _State(out)
    b = Builder(out, "branches")
    with b.at(out.output_node):
        outs, _ = _Splitter(st).split(program.graph_module, None, b)
    out.set_outputs(outs, program.output_names)
    # hoisted constants are read at the top too: as get_attr, or as cond operands
    read = {n.target for n in out.graph.find_nodes(op="get_attr")}
    for w in list(out.weight_kinds):
        if w not in read:
            out.remove_weight(w)
    stats = {
        "parts": len(st.parts),
        "part_calls": st.calls,
        "branches": st.branches,
        "hoisted_identity": st.hoisted_identity,
        "hoisted_constant": st.hoisted_constant,
        "segments_without_part": st.empty_segments,
    }
    return out, stats


@register_pass
@dataclass(frozen=True)
class Branches(Pass):
    """Split data-dependent control flow into branch-free parts and host code (DyCL)."""

    name = "branches"
    semantics = "exact"
    summary = "split cond branches into branch-free parts and a host program (DyCL)"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if is_split(program):
            return PassResult(program, False, {"reason": "already split into parts"})
        if not has_control_flow(program):
            # a branch-free program is one part: splitting would only add a call
            return PassResult(program, False, {"reason": "no data-dependent control flow"})
        out, stats = split_program(program)
        return PassResult(out, True, stats)


__all__ = [
    "Branches",
    "has_control_flow",
    "is_cond",
    "is_host_compare",
    "is_part_call",
    "is_split",
    "split_program",
]
