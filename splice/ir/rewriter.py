"""Rewriter: the one API through which passes edit a Program.

It is a :class:`~splice.ir.builder.Builder` of the program's top graph: every node the
Rewriter creates gets a spec (inferred by fake execution of its op) and a Loc (inherited
from the node being rewritten, with the pass name appended to ``from_passes``); every node
it changes gets the pass name appended too. Passes therefore
cannot forget metadata — the complaint users of FX, executorch and onnxscript raise most.

Typical use::

    rw = Rewriter(program, "lowrank")
    with rw.at(node):                       # insert before node, inherit its Loc
        A = rw.add_weight("fc.A", a_tensor)
        y = rw.call(torch.ops.splice.lowrank_linear.default, (x, A, B, bias))
    rw.replace(node, y)                     # redirect uses, erase the old node
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.builder import Builder
from splice.ir.program import Program


class Rewriter(Builder):
    """Edits one Program on behalf of one pass (``pass_name``): a :class:`Builder` of its top
    graph that also replaces, re-types and erases nodes and adds weights and inputs."""

    def __init__(self, program: Program, pass_name: str | None = None):
        super().__init__(program, pass_name)
        self.changed: set[fx.Node] = set()

    def _what(self) -> str:
        return self.pass_name or "rewrite"

    def call_module(
        self, target: str, args: Sequence[Any] = (), *, loc: M.Loc | None = None
    ) -> fx.Node:
        node = self.graph.call_module(target, tuple(args))
        self._finish(node, loc)
        return node

    def add_weight(
        self, name: str, value: torch.Tensor, kind: str = "param", *, unique: bool = False
    ) -> fx.Node:
        """Add a weight to the program and return a node reading it."""
        if unique:
            name = self.program.unique_weight_name(name)
        elif self.program.has_weight(name):
            raise PassError(
                f"{self.pass_name or 'rewrite'}: weight @{name} already exists",
                hint="pass unique=True to get a fresh name",
            )
        self.program.add_weight(name, value, kind)
        self.runner._weight_fakes.pop(name, None)
        return self.weight(name)

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Replace the value of weight ``name`` (keeping its kind) and re-type its readers
        (:meth:`Builder.set_weight_value`), which count as changed."""
        self.set_weight_value(name, value)
        for n in self.graph.find_nodes(op="get_attr", target=name):
            self.mark_changed(n)

    def add_input(self, name: str, spec: M.Spec, *, index: int | None = None) -> fx.Node:
        node = self.program.add_input(name, spec, index=index, loc=self._stamp(M.UNKNOWN_LOC))
        self.created.append(node)
        return node

    # -- changing and removing nodes ------------------------------------------------------------
    def replace_all_uses(self, old: fx.Node, new: fx.Node) -> None:
        """Redirect every use of ``old`` to ``new`` (the graph output included)."""
        if old is new:
            return
        s_old, s_new = M.get_spec(old), M.get_spec(new)
        if s_old is not None and s_new is not None and s_old != s_new:
            raise PassError(
                f"{self.pass_name or 'rewrite'}: cannot replace %{old.name} ({s_old}) by %{new.name} ({s_new}): "
                "specs differ",
                where=str(M.loc(old)),
            )
        old.replace_all_uses_with(new)

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Replace ``old`` by ``new`` everywhere and erase ``old``."""
        self.replace_all_uses(old, new)
        self.erase(old)

    def erase(self, node: fx.Node) -> None:
        if node.users:
            users = ", ".join(f"%{u.name}" for u in node.users)
            raise PassError(
                f"{self.pass_name or 'rewrite'}: cannot erase %{node.name}: still used by {users}"
            )
        self.graph.erase_node(node)
        self.changed.discard(node)

    def set_args(
        self, node: fx.Node, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None
    ) -> None:
        """Change a node's arguments; its spec is re-inferred and it is marked changed."""
        if args is not None:
            node.args = tuple(args)
        if kwargs is not None:
            node.kwargs = dict(kwargs)
        M.set_spec(node, self.runner.infer(node))
        self.mark_changed(node)

    def mark_changed(self, node: fx.Node) -> None:
        M.set_loc(node, self._stamp(M.loc(node)))
        self.changed.add(node)
        self.program.bump_version()

    def erase_unused_weights(self) -> list[str]:
        """Drop ``get_attr`` nodes nobody reads and the weights nobody reads any more."""
        for n in list(self.graph.find_nodes(op="get_attr")):
            if not n.users:
                self.graph.erase_node(n)
        read = {n.target for n in self.graph.find_nodes(op="get_attr")}
        dropped = [w for w in self.program.weight_kinds if w not in read]
        for w in dropped:
            self.program.remove_weight(w)
        return dropped


__all__ = ["Rewriter"]
