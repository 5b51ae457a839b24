"""Builder: create nodes whose specs are inferred from their ops, never written by hand.

A :class:`Builder` adds nodes to one graph of a :class:`~splice.ir.program.Program`: the top
graph, one of its sub-graphs, or a new graph that will become a sub-graph. Every node it
creates gets

* a **spec** from fake execution of its op (:class:`~splice.ir.shape_prop.FakeRunner`):
  ATen and splice ops, ``operator.getitem`` on tuples, ``higher_order.cond`` and
  ``higher_order.invoke_subgraph`` (from the called graphs' output specs), ``get_attr`` of
  weights and of sub-graphs (:class:`~splice.ir.meta.GraphRefSpec`). Only a placeholder's spec
  is given, because an input's type is data;
* a **Loc**: the one given, else the one of the node set by :meth:`Builder.at`, stamped with
  the pass name.

A node that does not type-check is removed again and raises :class:`~splice.errors.PassError`
naming it. :meth:`Builder.emit` traces a small torch function at ATen level (pre-dispatch, as
``torch.export`` records ops: ``aten.linear`` stays one op) on the fake values of its arguments
and inlines its ops, each with an inferred spec. Example::

    b = Builder(program, "mypass")
    with b.at(node):
        w = b.weight("fc.weight")
        y = b.emit(lambda x, w: torch.relu(x @ w.T) * 2, x, w)

A sub-graph is built with a child builder and referenced from its parent::

    sub = b.sub()
    a = sub.placeholder("a", M.spec(x))
    sub.output((sub.call(aten.neg.default, (a,)),))
    ref = b.graph_ref("neg_branch", sub)        # get_attr @neg_branch : graph

:class:`~splice.ir.rewriter.Rewriter` is a Builder that also replaces and erases nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.meta import mark_part_start, starts_part
from splice.ir.printer import format_target
from splice.ir.program import Program, build_graph_module, iter_graphs
from splice.ir.shape_prop import FakeRunner


class Builder:
    """Builds nodes of one graph of ``program`` on behalf of pass ``pass_name``.

    ``graph``: ``None`` for the program's top graph, an existing sub-graph (an ``fx.Graph`` or
    ``fx.GraphModule`` of the program) or a new ``fx.Graph``. A new graph becomes a module with
    :meth:`graph_module`; sub-graphs it references through :meth:`graph_ref` go with it.
    """

    def __init__(
        self,
        program: Program,
        pass_name: str | None = None,
        graph: fx.Graph | fx.GraphModule | None = None,
        *,
        runner: FakeRunner | None = None,
    ):
        self.program = program
        self.pass_name = pass_name
        if isinstance(graph, fx.GraphModule):
            graph = graph.graph
        self._graph: fx.Graph = program.graph if graph is None else graph
        self._runner = runner
        self._loc: M.Loc | None = None
        #: nodes this builder created, in order
        self.created: list[fx.Node] = []
        owner = next((gm for _, gm in iter_graphs(program) if gm.graph is self._graph), None)
        self._owner: fx.GraphModule | None = owner
        # where get_attr targets of this graph resolve: its module, or a holder of the
        # sub-graphs registered on a new graph
        self._scope: nn.Module = owner if owner is not None else nn.Module()

    # -- state ------------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self._graph

    @property
    def runner(self) -> FakeRunner:
        if self._runner is None:
            self._runner = FakeRunner(self.program)
        return self._runner

    @property
    def is_top(self) -> bool:
        return self._graph is self.program.graph

    def _what(self) -> str:
        return self.pass_name or "build"

    def _stamp(self, loc: M.Loc) -> M.Loc:
        return loc.with_pass(self.pass_name) if self.pass_name else loc

    def sub(self, graph: fx.Graph | None = None) -> Builder:
        """A builder of a new graph (or ``graph``) of the same program, sharing the fake
        runner and the current Loc."""
        child = Builder(self.program, self.pass_name, graph or fx.Graph(), runner=self.runner)
        child._loc = self._loc
        return child

    # -- insertion point --------------------------------------------------------------------
    @contextlib.contextmanager
    def at(self, node: fx.Node, *, after: bool = False) -> Iterator[None]:
        """Insert new nodes before (or after) ``node``; they inherit its Loc."""
        prev = self._loc
        self._loc = M.loc(node)
        ctx = self.graph.inserting_after(node) if after else self.graph.inserting_before(node)
        try:
            with ctx:
                yield
        finally:
            self._loc = prev

    @contextlib.contextmanager
    def loc(self, loc: M.Loc) -> Iterator[None]:
        """New nodes get ``loc`` (stamped with the pass), keeping the insertion point."""
        prev = self._loc
        self._loc = loc
        try:
            yield
        finally:
            self._loc = prev

    # -- creating nodes ---------------------------------------------------------------------
    def placeholder(self, name: str, spec: M.Spec, *, loc: M.Loc | None = None) -> fx.Node:
        """A new input of this graph, after its other inputs; of the top graph, a new program
        input (``name`` kept exactly)."""
        stamped = self._stamp(loc or self._loc or M.UNKNOWN_LOC)
        if self.is_top:
            try:
                node = self.program.add_input(name, spec, loc=stamped)
            except ValueError as e:
                raise PassError(f"{self._what()}: {e}") from e
        else:
            phs = list(self.graph.find_nodes(op="placeholder"))
            first = next(iter(self.graph.nodes), None)
            if phs:
                ctx = self.graph.inserting_after(phs[-1])
            elif first is not None:
                ctx = self.graph.inserting_before(first)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                node = self.graph.placeholder(name)
            M.set_spec(node, spec)
            M.set_loc(node, stamped)
        self.created.append(node)
        return node

    def call(
        self,
        target: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        loc: M.Loc | None = None,
    ) -> fx.Node:
        """A new ``call_function`` node; its spec is inferred, its Loc stamped with the pass."""
        if name is None and isinstance(target, torch._ops.OpOverload):
            name = target._schema.name.split("::")[-1]  # "linear", as export names nodes
        node = self.graph.call_function(target, tuple(args), dict(kwargs or {}), name=name)
        self._finish(node, loc)
        return node

    def _finish(self, node: fx.Node, loc: M.Loc | None) -> None:
        M.set_loc(node, self._stamp(loc or self._loc or M.UNKNOWN_LOC))
        self._infer(node)
        self.created.append(node)

    def _infer(self, node: fx.Node) -> None:
        try:
            M.set_spec(node, self.runner.infer(node, self._scope))
        except Exception as e:
            desc = _describe(node)
            self.graph.erase_node(node)
            raise PassError(
                f"{self._what()}: new node {desc} does not type-check: {e}",
                where=str(M.loc(node)) if not M.loc(node).is_unknown() else None,
            ) from e

    def copy(
        self, node: fx.Node, arg: Callable[[fx.Node], Any], *, loc: M.Loc | None = None
    ) -> fx.Node:
        """A copy of ``node`` (of any graph) with its inputs mapped by ``arg``; its meta
        (Loc, marks) goes with it, unstamped, since the computation is the same. The spec is
        re-inferred unless every input keeps its spec, in which case the copy's is the
        original's."""
        new = self.graph.node_copy(node, arg)
        new.meta = dict(node.meta)
        if loc is not None:
            M.set_loc(new, self._stamp(loc))
        olds, news = node.all_input_nodes, new.all_input_nodes
        keeps = len(olds) == len(news) and all(
            M.get_spec(o) is not None and M.get_spec(o) == M.get_spec(n) for o, n in zip(olds, news)
        )
        if node.op == "placeholder" or (keeps and M.get_spec(node) is not None):
            if M.get_spec(node) is None:  # a placeholder's spec is given, never inferred
                self.graph.erase_node(new)
                raise PassError(f"{self._what()}: placeholder %{node.name} has no spec")
        else:
            self._infer(new)
        self.created.append(new)
        return new

    def weight(self, name: str) -> fx.Node:
        """A ``get_attr`` node of the top graph reading weight ``name`` (reusing one)."""
        if not self.is_top:
            raise PassError(
                f"{self._what()}: weight @{name} read inside a sub-graph",
                hint="weights live in the top graph; pass them to sub-graphs as operands",
            )
        for n in self.graph.find_nodes(op="get_attr"):
            if n.target == name:
                return n
        if not self.program.has_weight(name):
            raise PassError(f"{self._what()}: program has no weight @{name}")
        first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        ctx = self.graph.inserting_before(first) if first is not None else contextlib.nullcontext()
        with ctx:
            node = self.graph.get_attr(name)
        M.set_loc(node, self._stamp(M.Loc(module_path=name.rpartition(".")[0])))
        self._infer(node)
        self.created.append(node)
        return node

    def set_weight_value(
        self, name: str, value: torch.Tensor, bound: Sequence[fx.Node] = ()
    ) -> None:
        """Give weight ``name`` a new value (keeping its kind) and re-type what stands for it:
        its ``get_attr`` nodes in the top graph, and ``bound`` -- sub-graph placeholders that
        every call binds to this weight (the caller knows the bindings; a placeholder bound
        to anything else must not be listed). Their spec is the new value's."""
        if not self.program.has_weight(name):
            raise PassError(f"{self._what()}: program has no weight @{name}")
        self.program.add_weight(name, value, self.program.weight_kind(name))
        self.runner._weight_fakes.pop(name, None)
        spec = self.runner.env.spec_of(self.runner.weight_fake(name))
        for n in [*self.program.graph.find_nodes(op="get_attr", target=name), *bound]:
            if n.op not in ("get_attr", "placeholder"):
                raise PassError(f"{self._what()}: %{n.name} does not stand for weight @{name}")
            M.set_spec(n, spec)
            M.set_loc(n, self._stamp(M.loc(n)))
        self.program.bump_version()

    def graph_ref(self, name: str, graph: fx.GraphModule | fx.Graph | Builder) -> fx.Node:
        """Register ``graph`` as sub-graph ``name`` of this graph (a ``Builder`` of a new
        graph gives its :meth:`graph_module`) and return a ``get_attr`` of it. Registering
        the same module twice under one name is allowed; another module under a taken name
        is a PassError."""
        gm = _as_module(graph)
        have = getattr(self._scope, name, None)
        if have is None:
            if self._owner is self.program.graph_module:
                self.program.add_subgraph(name, gm)
            else:
                self._scope.add_module(name, gm)
                self.program.bump_version()
        elif have is not gm:
            raise PassError(f"{self._what()}: sub-graph name @{name} is taken in this graph")
        node = self.graph.get_attr(name)
        M.set_loc(node, self._stamp(self._loc or M.UNKNOWN_LOC))
        self._infer(node)
        self.created.append(node)
        return node

    def graph_module(self, class_name: str = "SubGraph") -> fx.GraphModule:
        """This (new) graph as a module owning the sub-graphs registered on it."""
        if self._owner is not None:
            return self._owner
        children = {n: m for n, m in self._scope.named_children() if isinstance(m, fx.GraphModule)}
        return build_graph_module(self.graph, {}, children, class_name=class_name)

    def output(self, values: Sequence[Any]) -> fx.Node:
        """The graph's output node returning ``values`` (a tuple). On the top graph use
        ``program.set_outputs``, which also names the outputs."""
        if self.graph.find_nodes(op="output"):
            raise PassError(f"{self._what()}: the graph has an output already")
        node = self.graph.output(tuple(values))
        M.set_loc(node, self._stamp(self._loc or M.UNKNOWN_LOC))
        return node

    # -- tracing ----------------------------------------------------------------------------
    def emit(self, fn: Callable[..., Any], *args: Any) -> fx.Node | tuple[fx.Node, ...]:
        """Trace ``fn(*args)`` at ATen level on the fake values of the node arguments (other
        arguments are constants of the trace) and inline its ops here. Returns the node of a
        single tensor result, or a tuple of nodes for a tuple/list result. ``fn`` must
        return tensors computed from its arguments; a tensor it creates from data (not
        from an op like ``zeros``) is refused: pass it as a weight instead."""
        from torch.fx.experimental.proxy_tensor import make_fx

        nodes = [a for a in args if isinstance(a, fx.Node)]
        fakes = [self.runner.stored_fake(n, self._scope) for n in nodes]

        def traced(*vals: Any) -> Any:
            it = iter(vals)
            return fn(*(next(it) if isinstance(a, fx.Node) else a for a in args))

        fname = getattr(fn, "__name__", "fn")
        try:
            with torch.no_grad():
                gm = make_fx(traced, pre_dispatch=True)(*fakes)
        except Exception as e:
            raise PassError(f"{self._what()}: cannot trace {fname}: {e}") from e
        env: dict[fx.Node, Any] = {}
        phs = iter(nodes)
        result: Any = None
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(phs)
            elif n.op == "get_attr":
                raise PassError(
                    f"{self._what()}: {fname} creates the tensor constant {n.target}",
                    hint="add it as a weight and pass its node to emit",
                )
            elif n.op == "call_function":
                args_, kwargs_ = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                env[n] = self.call(n.target, args_, kwargs_, name=n.name)
            elif n.op == "output":
                result = fx.node.map_arg(n.args[0], env.__getitem__)
            else:  # pragma: no cover - make_fx emits only the ops above
                raise PassError(f"{self._what()}: {fname} traced to a {n.op} node")
        if isinstance(result, (list, tuple)):
            if not all(isinstance(r, fx.Node) for r in result):
                raise PassError(f"{self._what()}: {fname} returns a non-tensor value")
            return tuple(result)
        if not isinstance(result, fx.Node):
            raise PassError(f"{self._what()}: {fname} returns {result!r}, not a tensor")
        return result


def _as_module(graph: fx.GraphModule | fx.Graph | Builder) -> fx.GraphModule:
    if isinstance(graph, Builder):
        return graph.graph_module()
    if isinstance(graph, fx.GraphModule):
        return graph
    return build_graph_module(graph, {}, {}, class_name="SubGraph")


def _describe(node: fx.Node) -> str:
    return f"{format_target(node)}({', '.join(_arg_str(a) for a in node.args)})"


def _arg_str(a: Any) -> str:
    if isinstance(a, fx.Node):
        s = M.get_spec(a)
        return f"%{a.name}" + (f": {s}" if s is not None else "")
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg_str(x) for x in a) + "]"
    return repr(a)


__all__ = ["Builder", "mark_part_start", "starts_part"]
