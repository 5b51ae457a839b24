"""Linear layers in a program, in every graph: the recogniser ``lowrank``, ``experts``,
``hyper`` and later passes share.

A *linear site* is a node computing y = x Wᵀ + b with W a 2-D floating-point parameter:

* ``aten.linear(x, W, b?)``;
* ``aten.addmm(b, x, Wᵀ)`` with Wᵀ a transpose of W (``t``, ``permute(·, [1, 0])``,
  ``transpose(·, 0, 1)``), or ``aten.addmm(b, x, P)`` with the parameter P holding Wᵀ
  (GPT-2's ``Conv1D``: ``transposed``); ``b`` must be a vector (an addmm with a broadcast
  matrix "bias" is not a linear layer);
* ``aten.matmul`` / ``aten.mm`` of x by a transposed parameter or by a parameter holding Wᵀ.

Sites are found in the top graph and every sub-graph (``cond`` branches, ``branches``
parts, ``stitch`` routes). Inside a sub-graph a weight is a placeholder bound to an operand
of the call; it is followed to the program weight (:class:`~splice.passes.subgraphs.
GraphTree`). A ``splice::lowrank_linear(x, A, B, bias?, rank?)`` whose factors are
parameters is the Linear W = A·B it stands for (:func:`find_factored_linears`).

:func:`linear_readers` names every node that reads a weight (through transposes), so a
pass can tell a weight read by its linear sites only from a tied one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splice.ir import meta as M
from splice.ir.ops import lowrank_linear
from splice.ir.program import Program
from splice.passes.subgraphs import GraphTree

aten = torch.ops.aten


@dataclass
class LinearSite:
    """One linear node: y = x Wᵀ + b with W read from parameter ``weight``.

    ``x`` and ``bias`` are the operands when the site was found. Rewriting one site can
    replace the operand of another (a Linear feeding a Linear: the second one's ``x`` is the
    first one's node, erased when it is replaced), so code that edits the graph reads the
    operands through :meth:`current_x` / :meth:`current_bias`, which follow ``node.args``.
    """

    node: fx.Node
    x: fx.Node
    weight: str
    transposed: bool  # the parameter holds Wᵀ ([in, out]), as GPT-2's Conv1D does
    bias: fx.Node | None
    layer: str  # the weight name without ".weight": the layer's module path
    path: str = ""  # the graph it is in: "" for the top graph, else the sub-graph's path
    gm: fx.GraphModule | None = None  # that graph's module (None: the top graph)
    #: an already factored layer (``splice::lowrank_linear``): the names of its A and B
    #: weights (``weight`` is then A's name) and its run-time rank argument
    factors: tuple[str, str] | None = None
    rank: int | None = None

    @property
    def name(self) -> str:
        return self.layer

    @property
    def site(self) -> str:
        """``%node`` for a top-level site, ``path:%node`` for one inside a sub-graph."""
        return f"{self.path}:%{self.node.name}" if self.path else f"%{self.node.name}"

    @property
    def weights(self) -> tuple[str, ...]:
        """The weights the site reads: W, or A and B of a factored layer (no bias)."""
        return self.factors if self.factors is not None else (self.weight,)

    def current_x(self) -> fx.Node:
        """The input operand as the graph has it now (see the class docstring)."""
        return self.node.args[1] if self.node.target is aten.addmm.default else self.node.args[0]

    def current_bias(self) -> Any:
        """The bias operand as the graph has it now (None for matmul/mm sites)."""
        t = self.node.target
        if t is aten.addmm.default:
            return self.node.args[0]
        if t is lowrank_linear.overload:
            return self.node.args[3] if len(self.node.args) > 3 else self.node.kwargs.get("bias")
        if t is aten.linear.default:
            return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")
        return None


def param_of(program: Program, a: Any, tree: GraphTree | None = None) -> fx.Node | None:
    """``a`` if it reads a parameter: a ``get_attr`` of a weight of kind param, or (with
    ``tree``) a placeholder of a sub-graph that every call binds to such a weight."""
    if not isinstance(a, fx.Node):
        return None
    if tree is not None:
        w = tree.weight_of(a)
        return a if w is not None and program.weight_kind(w) == "param" else None
    if (
        a.op == "get_attr"
        and program.has_weight(a.target)
        and program.weight_kind(a.target) == "param"
    ):
        return a
    return None


def transpose_of(a: Any) -> fx.Node | None:
    """``a`` = t(p) or permute(p, [1, 0]) or transpose(p, 0, 1) -> p; else None."""
    if not isinstance(a, fx.Node) or a.op != "call_function":
        return None
    if a.target is aten.t.default:
        return a.args[0]
    if a.target is aten.permute.default and list(a.args[1]) == [1, 0]:
        return a.args[0]
    if a.target is aten.transpose.int and sorted(int(d) % 2 for d in a.args[1:3]) == [0, 1]:
        return a.args[0]
    return None


def is_transpose(a: Any) -> bool:
    """True if ``a`` is a 2-D transpose (see :func:`transpose_of`)."""
    return transpose_of(a) is not None


def find_linears(program: Program, tree: GraphTree | None = None) -> list[LinearSite]:
    """Every linear site of every graph of ``program`` (top first, then sub-graphs: cond
    branches, parts, stitch routes), weights followed through operand chains."""
    tree = tree or GraphTree(program)
    sites = []
    for path, gm in tree.graphs:
        for node in gm.graph.nodes:
            site = _linear_site(program, tree, node)
            if site is None:
                continue
            x, w_node, transposed, bias = site
            wspec = M.spec(w_node)
            if not isinstance(wspec, M.TensorSpec) or len(wspec.shape) != 2:
                continue
            if not isinstance(x, fx.Node) or not wspec.dtype.is_floating_point:
                continue
            w = str(tree.weight_of(w_node))
            layer = w.removesuffix(".weight")
            sites.append(
                LinearSite(node, x, w, transposed, bias, layer, path, None if path == "" else gm)
            )
    return sites


def _linear_site(program: Program, tree: GraphTree, node: fx.Node) -> tuple[Any, ...] | None:
    """(x, weight node, transposed, bias) if ``node`` is a linear layer on a parameter."""
    if node.op != "call_function":
        return None
    site = None
    if node.target is aten.linear.default:
        w = param_of(program, node.args[1], tree)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if w is not None and isinstance(node.args[0], fx.Node):
            site = (node.args[0], w, False, bias)
    elif node.target is aten.addmm.default and not node.kwargs:
        bias, x, mat = node.args[0], node.args[1], node.args[2]
        if (found := _matrix_weight(program, tree, mat)) is not None:
            site = (x, *found, bias)
        if site is not None and not (
            isinstance(bias, fx.Node)
            and isinstance(M.spec(bias), M.TensorSpec)
            and len(M.spec(bias).shape) == 1
        ):
            site = None  # addmm with a broadcast matrix "bias" is not a linear layer
    elif node.target in (aten.matmul.default, aten.mm.default):
        x, mat = node.args[0], node.args[1]
        if (found := _matrix_weight(program, tree, mat)) is not None:
            site = (x, *found, None)
    return site


def _matrix_weight(program: Program, tree: GraphTree, mat: Any) -> tuple[Any, bool] | None:
    """(weight node, transposed) for the right operand of ``x @ mat``: ``Wᵀ`` of a parameter
    ``W`` is an ``nn.Linear`` layout (not transposed), ``W`` itself the transposed one."""
    inner = transpose_of(mat)
    w = param_of(program, inner, tree) if inner is not None else None
    if w is not None:
        return w, False
    w = param_of(program, mat, tree)
    return (w, True) if w is not None else None


def find_factored_linears(program: Program, tree: GraphTree) -> list[LinearSite]:
    """Every ``splice::lowrank_linear`` of every graph whose factors are parameters, as a
    linear site (W = A·B: ``weight`` is A's name, ``factors`` names A and B)."""
    out = []
    for path, gm in tree.graphs:
        for n in gm.graph.find_nodes(op="call_function", target=lowrank_linear.overload):
            x = n.args[0]
            a, b = tree.weight_of(n.args[1]), tree.weight_of(n.args[2])
            if not isinstance(x, fx.Node) or a is None or b is None:
                continue
            if program.weight_kind(a) != "param" or program.weight_kind(b) != "param":
                continue
            bias = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
            rank = n.args[4] if len(n.args) > 4 else n.kwargs.get("rank")
            layer = a.removesuffix(".lowrank_A")
            out.append(
                LinearSite(
                    n, x, a, False, bias, layer, path, None if path == "" else gm,
                    factors=(a, b), rank=None if rank is None else int(rank),
                )
            )  # fmt: skip
    return out


def linear_readers(tree: GraphTree, weight: str) -> set[fx.Node]:
    """The nodes, in every graph, that use ``weight`` (through its get_attr or the
    placeholders it is bound to, and any transpose of it); passing it on is not a use."""
    return tree.readers(weight, through=is_transpose)


def unresolved_linears(tree: GraphTree) -> list[dict[str, str]]:
    """``aten.linear`` nodes (in any graph) whose weight is not a program parameter: a
    computed weight (``hyper``'s generated values), a program input, a buffer, or a
    sub-graph placeholder that is not one program weight on every call. One
    ``{layer, site, reason}`` each."""
    out = []
    for _path, gm in tree.graphs:
        for n in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
            w = n.args[1]
            if not isinstance(w, fx.Node):
                continue
            name = tree.weight_of(w)
            if name is not None:
                kind = tree.program.weight_kind(name)
                if kind == "param":
                    continue
                why = f"its weight @{name} is a {kind}, not a parameter"
            elif w.op == "placeholder" and not tree.is_top(w):
                why = (
                    f"its weight %{w.name} is not one program weight on every call of the sub-graph"
                )
            elif w.op == "placeholder":
                why = f"its weight is the program input %{w.name}"
            else:
                why = (
                    f"its weight is computed (%{w.name}), not a parameter (a weight generated "
                    "by a hypernetwork is factored only through its generator)"
                )
            out.append({"layer": M.loc(n).module_path or tree.where(n), "site": tree.where(n),
                        "reason": why})  # fmt: skip
    return out


__all__ = [
    "LinearSite",
    "find_factored_linears",
    "find_linears",
    "is_transpose",
    "linear_readers",
    "param_of",
    "transpose_of",
    "unresolved_linears",
]
