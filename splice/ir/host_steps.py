"""The split form of a program, as the IR sees it: which nodes are host steps.

The ``branches`` pass (:mod:`splice.passes.branches`) turns data-dependent control flow
into *parts* (branch-free sub-graphs, called through ``invoke_subgraph``) and *host code*
that chooses between them (``cond`` nodes, and integer compares such as the ``eq(idx, k)``
of a switch chain). The pass that makes this form and the runtime that runs it
(:mod:`splice.runtime.host`, the compile driver) both read it through these predicates,
which therefore live in the IR, below both.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from splice.ir import meta as M
from splice.ir.program import Program, iter_graphs

#: ``torch.cond``: a data-dependent branch between two sub-graphs
COND = torch.ops.higher_order.cond
#: ``invoke_subgraph``: a call of a part in a split program
INVOKE = torch.ops.higher_order.invoke_subgraph


def is_cond(node: fx.Node) -> bool:
    """Whether ``node`` is a ``cond``."""
    return node.op == "call_function" and node.target is COND


def is_part_call(node: fx.Node) -> bool:
    """Whether ``node`` calls a part (``invoke_subgraph``)."""
    return node.op == "call_function" and node.target is INVOKE


def is_host_compare(node: fx.Node) -> bool:
    """``eq(v, k)`` of a one-element integer or bool tensor ``v`` with an integer literal ``k``:
    host code."""
    if node.op != "call_function" or node.target is not torch.ops.aten.eq.Scalar:
        return False
    v, k = node.args[:2]
    spec = M.get_spec(v) if isinstance(v, fx.Node) else None
    return (
        isinstance(k, int)
        and isinstance(spec, M.TensorSpec)
        and all(d == 1 for d in spec.shape)
        and not spec.dtype.is_floating_point
        and not spec.dtype.is_complex
    )


def has_control_flow(program: Program) -> bool:
    """True if the program (or any sub-graph) has a ``cond`` node."""
    return any(is_cond(n) for _, gm in iter_graphs(program) for n in gm.graph.nodes)


def is_split(program: Program) -> bool:
    """True if the program is in split form (it calls parts)."""
    return any(is_part_call(n) for _, gm in iter_graphs(program) for n in gm.graph.nodes)


__all__ = [
    "COND",
    "INVOKE",
    "has_control_flow",
    "is_cond",
    "is_host_compare",
    "is_part_call",
    "is_split",
]
