"""Sub-graphs for passes: which weight a value inside a branch or part is, how to give a
sub-graph a new weight, and activations of values inside sub-graphs.

Weights live only in the top-level graph (``get_attr``); they reach sub-graphs as operands,
as ``torch.export`` passes them (:mod:`splice.ir.program`). The call forms that bind
operands to a sub-graph's placeholders, position by position, are

* ``higher_order.cond(pred, @true, @false, (op_0, op_1, ...))`` — both branches take the
  same operands, so their signatures move together (``capture_dynamic``, ``stitch`` routes);
* ``higher_order.invoke_subgraph(@part, "id", op_0, op_1, ...)`` — ``branches`` parts;
* ``call_module(@sub, op_0, ...)`` on a sub-graph.

:class:`GraphTree` indexes those calls once for a program and answers

* :meth:`GraphTree.weight_of` — the program weight a value is, followed through any chain of
  operands (a placeholder is weight W when *every* call of its graph passes W there);
* :meth:`GraphTree.readers` — the nodes, in every graph, that really read a weight (operand
  passing is not a read);
* :meth:`GraphTree.thread` — a value reading a weight inside a given graph: the top-level
  ``get_attr``, or a new placeholder whose operand is threaded through every call up to the
  top (for a ``cond`` the sibling branch gets the placeholder too);
* :meth:`GraphTree.prune` — drop placeholders (and their operands) that read given weights
  and that nothing uses any more, so a replaced weight leaves the program.

A sub-graph reached through any other op (``while_loop``, ``map``...) is *opaque*: its
placeholders resolve to no weight, so passes leave its sites alone and report them.

:func:`collect_activations` records values of any graph on calibration batches (a probe
copy of the program calls a recorder right after each value), for passes that calibrate
sites inside branches: a value inside a branch is seen on the batches that take it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.builder import Builder
from splice.ir.program import Program, get_attr_path, iter_graphs
from splice.ir.rewriter import Rewriter
from splice.ir.shape_prop import FakeRunner
from splice.passes.analysis.calibration import ActivationStats, accumulate, check_samples

COND = torch.ops.higher_order.cond
INVOKE = torch.ops.higher_order.invoke_subgraph


@dataclass(frozen=True)
class Call:
    """One call of a sub-graph: the ``parent`` graph module and the calling node."""

    parent: fx.GraphModule
    node: fx.Node
    kind: str  # "cond" | "invoke" | "module"


def _operands(call: Call) -> list[Any]:
    n = call.node
    if call.kind == "cond":
        return list(n.args[3])
    if call.kind == "invoke":
        return list(n.args[2:])
    return list(n.args)


def _set_operands(call: Call, ops: list[Any]) -> None:
    n = call.node
    if call.kind == "cond":
        n.args = (n.args[0], n.args[1], n.args[2], tuple(ops))
    elif call.kind == "invoke":
        n.args = (n.args[0], n.args[1], *ops)
    else:
        n.args = tuple(ops)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


class GraphTree:
    """Every graph of a program and the calls between them (see the module docstring)."""

    def __init__(self, program: Program):
        self.program = program
        self.top = program.graph_module
        self.graphs: list[tuple[str, fx.GraphModule]] = []
        self.calls: dict[int, list[Call]] = {}
        self.opaque: set[int] = set()
        self._gm_of_graph: dict[int, fx.GraphModule] = {}
        self._path: dict[int, str] = {}
        self._weight: dict[fx.Node, str | None] = {}
        self._values: dict[str, list[fx.Node]] | None = None
        self._runner: FakeRunner | None = None
        seen: set[int] = set()
        for path, gm in iter_graphs(program):
            if id(gm) in seen:
                continue
            seen.add(id(gm))
            self.graphs.append((path, gm))
            self._gm_of_graph[id(gm.graph)] = gm
            self._path[id(gm)] = path
        for _path, gm in self.graphs:
            self._index_calls(gm)

    def _index_calls(self, gm: fx.GraphModule) -> None:
        known: set[fx.Node] = set()  # get_attr refs used by a known call form
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is COND:
                for ref in n.args[1:3]:
                    self._add_call(gm, ref.target, Call(gm, n, "cond"))
                    known.add(ref)
            elif n.op == "call_function" and n.target is INVOKE:
                self._add_call(gm, n.args[0].target, Call(gm, n, "invoke"))
                known.add(n.args[0])
            elif n.op == "call_module":
                child = get_attr_path(gm, n.target)
                if isinstance(child, fx.GraphModule):
                    self.calls.setdefault(id(child), []).append(Call(gm, n, "module"))
        for n in gm.graph.find_nodes(op="get_attr"):
            if n in known:
                continue
            obj = get_attr_path(gm, n.target)
            if isinstance(obj, fx.GraphModule) and any(
                u.target not in (COND, INVOKE) for u in n.users
            ):
                self.opaque.add(id(obj))

    def _add_call(self, gm: fx.GraphModule, target: str, call: Call) -> None:
        child = get_attr_path(gm, target)
        calls = self.calls.setdefault(id(child), [])
        if not any(c.node is call.node for c in calls):
            calls.append(call)

    # -- where things are -----------------------------------------------------------------
    def gm_of(self, node: fx.Node) -> fx.GraphModule:
        return self._gm_of_graph[id(node.graph)]

    def path_of(self, node_or_gm: fx.Node | fx.GraphModule) -> str:
        gm = node_or_gm if isinstance(node_or_gm, fx.GraphModule) else self.gm_of(node_or_gm)
        return self._path[id(gm)]

    def where(self, node: fx.Node) -> str:
        """``%name`` for a top-level value, ``path:%name`` for one inside a sub-graph."""
        path = self.path_of(node)
        return f"{path}:%{node.name}" if path else f"%{node.name}"

    def is_top(self, node: fx.Node) -> bool:
        return node.graph is self.top.graph

    def call_nodes(self) -> set[fx.Node]:
        return {c.node for calls in self.calls.values() for c in calls}

    # -- weights -------------------------------------------------------------------------
    def weight_of(self, a: Any) -> str | None:
        """The program weight that value ``a`` is (through operand chains), or None."""
        if not isinstance(a, fx.Node):
            return None
        if a in self._weight:
            return self._weight[a]
        self._weight[a] = None  # guards against cycles while resolving
        w: str | None = None
        if self.is_top(a):
            if a.op == "get_attr" and self.program.has_weight(str(a.target)):
                w = str(a.target)
        elif a.op == "placeholder":
            gm = self.gm_of(a)
            calls = self.calls.get(id(gm), [])
            if calls and id(gm) not in self.opaque:
                i = _placeholders(gm).index(a)
                found = set()
                for c in calls:
                    ops = _operands(c)
                    found.add(self.weight_of(ops[i]) if i < len(ops) else None)
                if len(found) == 1:
                    w = found.pop()
        self._weight[a] = w
        return w

    def values_of(self, weight: str) -> list[fx.Node]:
        """Every node (in any graph) that is ``weight``: its get_attrs and placeholders."""
        if self._values is None:
            self._values = {}
            for _path, gm in self.graphs:
                for n in gm.graph.nodes:
                    if n.op in ("get_attr", "placeholder") and (w := self.weight_of(n)):
                        self._values.setdefault(w, []).append(n)
        return list(self._values.get(weight, []))

    def is_passthrough(self, user: fx.Node, value: fx.Node) -> bool:
        """True if ``user`` only passes ``value`` on as an operand of a sub-graph call."""
        if user.op == "call_function" and user.target is COND:
            return value in user.args[3] and value is not user.args[0]
        if user.op == "call_function" and user.target is INVOKE:
            return value in user.args[2:]
        if user.op == "call_module":
            return isinstance(get_attr_path(self.gm_of(user), user.target), fx.GraphModule)
        return False

    def readers(self, weight: str, *, through: Any = None) -> set[fx.Node]:
        """The nodes in every graph that read ``weight`` (operand passing is not reading).
        ``through(node) -> bool``: nodes that only re-express the weight (a transpose) are
        looked through, their users counted instead."""
        out: set[fx.Node] = set()
        for v in self.values_of(weight):
            for u in v.users:
                if self.is_passthrough(u, v):
                    continue
                if through is not None and through(u):
                    out.update(u.users)
                else:
                    out.add(u)
        return out

    # -- giving a sub-graph a weight ---------------------------------------------------
    def _group(self, gm: fx.GraphModule) -> list[fx.GraphModule]:
        """``gm`` and the graphs whose signatures must change with it (cond siblings)."""
        group: list[fx.GraphModule] = []
        stack = [gm]
        while stack:
            g = stack.pop()
            if any(g is x for x in group):
                continue
            group.append(g)
            for c in self.calls.get(id(g), []):
                if c.kind == "cond":
                    for ref in c.node.args[1:3]:
                        stack.append(get_attr_path(c.parent, ref.target))
        return group

    def _builder(self, graph: fx.Graph) -> Builder:
        """A Builder of ``graph`` sharing one fake runner (no pass stamp: threading a weight
        through operands changes no computation)."""
        if self._runner is None:
            self._runner = FakeRunner(self.program)
        return Builder(self.program, None, graph, runner=self._runner)

    def thread(self, gm: fx.GraphModule, weight: str) -> fx.Node:
        """A node of ``gm`` that reads ``weight`` (see the module docstring)."""
        if gm is self.top:
            node = self._builder(self.top.graph).weight(weight)
            self._weight[node] = weight
            self._values = None
            return node
        if id(gm) in self.opaque or not self.calls.get(id(gm)):
            raise PassError(
                f"cannot pass weight @{weight} into sub-graph {self.path_of(gm)!r}: it is "
                "called by an op splice does not know how to extend"
            )
        for ph in _placeholders(gm):
            if self.weight_of(ph) == weight:
                return ph
        group = self._group(gm)
        spec = M.spec_of_value(self.program.get_weight(weight))  # an input's type is data
        base = "w_" + weight.replace(".", "_")
        loc = M.Loc(module_path=weight.rpartition(".")[0])
        new: dict[int, fx.Node] = {}
        for g in group:
            ph = self._builder(g.graph).placeholder(base, spec, loc=loc)
            new[id(g)] = ph
            self._weight[ph] = weight
        done: set[fx.Node] = set()
        for g in group:
            for c in self.calls.get(id(g), []):
                if c.node in done:
                    continue
                done.add(c.node)
                v = self.thread(c.parent, weight)
                _set_operands(c, [*_operands(c), v])
        self._values = None
        self.program.bump_version()
        return new[id(gm)]

    def prune(self, weights: set[str]) -> int:
        """Drop placeholders of sub-graphs that read one of ``weights`` and that no graph of
        their signature group uses, with their operands; repeats up the call chain.
        Returns how many placeholders were dropped."""
        dropped = 0
        changed = True
        while changed:
            changed = False
            seen: set[int] = set()
            for _path, gm in self.graphs:
                if gm is self.top or id(gm) in seen or id(gm) in self.opaque:
                    continue
                if not self.calls.get(id(gm)):
                    continue
                group = self._group(gm)
                seen.update(id(g) for g in group)
                lists = [_placeholders(g) for g in group]
                if len({len(ps) for ps in lists}) != 1:
                    continue
                calls = {c.node: c for g in group for c in self.calls.get(id(g), [])}
                for i in reversed(range(len(lists[0]))):
                    phs = [ps[i] for ps in lists]
                    if any(p.users for p in phs):
                        continue
                    if self.weight_of(phs[0]) not in weights:
                        continue
                    for c in calls.values():
                        ops = _operands(c)
                        del ops[i]
                        _set_operands(c, ops)
                    for p in phs:
                        p.graph.erase_node(p)
                        self._weight.pop(p, None)
                    dropped += len(phs)
                    changed = True
        if dropped:
            self._values = None
            self.program.bump_version()
        return dropped

    def rewriter(self, gm: fx.GraphModule, pass_name: str) -> Rewriter:
        """A Rewriter that edits ``gm`` (the top graph's own Rewriter for the top)."""
        if gm is self.top:
            return Rewriter(self.program, pass_name)
        return SubgraphRewriter(self.program, gm, self, pass_name)


class SubgraphRewriter(Rewriter):
    """A :class:`~splice.ir.rewriter.Rewriter` over one sub-graph of a program: new nodes go
    into that graph (specs inferred from their inputs' stored specs, as for the top graph),
    and a weight read there is threaded in as an operand (:meth:`GraphTree.thread`)."""

    def __init__(self, program: Program, gm: fx.GraphModule, tree: GraphTree, pass_name: str):
        super().__init__(program, pass_name)
        self.gm = gm
        self.tree = tree

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def weight(self, name: str) -> fx.Node:
        return self.tree.thread(self.gm, name)


# ---------------------------------------------------------------------------------------
# activations anywhere


def collect_activations(
    program: Program,
    ctx: Any,
    *,
    values: Sequence[tuple[str, str]],
    stats: Sequence[str] = ("raw",),
) -> dict[tuple[str, str], Any]:
    """Activation statistics (:class:`splice.passes.analysis.calibration.ActivationStats`)
    of ``values`` — (graph path, node name) pairs, ``""`` for the top graph — over
    ``ctx.calibration``. A value inside a branch is recorded on the batches that run it
    (its ``count`` is 0 when none does). Cache it with ``ctx.analysis``."""
    data = check_samples(program, ctx, stats)
    probe = program.copy()
    graphs = dict(iter_graphs(probe))
    result = {v: ActivationStats() for v in values}
    for path, name in values:
        gm = graphs.get(path)
        node = next((n for n in gm.graph.nodes if n.name == name), None) if gm else None
        if node is None:
            raise PassError(f"calibration: no value %{name} in graph {path or 'top'!r}")
        acc = result[(path, name)]

        def record(t: torch.Tensor, acc: Any = acc) -> None:
            accumulate(acc, t, stats)

        record.__name__ = f"splice_record_{len(result)}"
        with gm.graph.inserting_after(node):
            gm.graph.call_function(record, (node,))
    probe.bump_version()
    progress = getattr(ctx, "progress", None)
    for b, batch in enumerate(data):
        with torch.no_grad():
            probe.run(*batch)
        if progress is not None:
            progress("calibrating", b + 1, len(data))
    return result


def merge_stats(parts: Sequence[Any]) -> Any:
    """One ActivationStats from several (the same weight read at several sites)."""
    from splice.passes.analysis.calibration import ActivationStats

    out = ActivationStats()
    for p in parts:
        out.count += p.count
        out.raw.extend(p.raw)
        if p.gram is not None:
            out.gram = p.gram if out.gram is None else out.gram + p.gram
        if p.abs_sum is not None:
            out.abs_sum = p.abs_sum if out.abs_sum is None else out.abs_sum + p.abs_sum
        if p.abs_max is not None:
            out.abs_max = (
                p.abs_max if out.abs_max is None else torch.maximum(out.abs_max, p.abs_max)
            )
    return out


def iter_nodes(tree: GraphTree) -> Iterator[tuple[fx.GraphModule, fx.Node]]:
    """Every node of every graph, top first."""
    for _path, gm in tree.graphs:
        for n in gm.graph.nodes:
            yield gm, n


__all__ = [
    "Call",
    "GraphTree",
    "SubgraphRewriter",
    "collect_activations",
    "iter_nodes",
    "merge_stats",
]
