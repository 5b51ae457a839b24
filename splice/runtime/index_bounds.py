"""Index bounds: the integer inputs of a program that index an embedding table, and its rows.

TVM lowers ``take`` without bounds checks (an out-of-range token id reads out of bounds,
or crashes), so compile records ``index_bound`` on each such input of the manifest, the
loader checks the manifest against the program, and the runtime checks every call's ids
against the bound before calling into a library.
"""

from __future__ import annotations

from typing import Any

import torch

from splice.ir import meta as M
from splice.ir.host_steps import COND, INVOKE
from splice.ir.program import Program
from splice.ir.signatures import SignatureSet


def merged_index_bounds(program: Program | SignatureSet) -> dict[str, dict[str, int]]:
    """:func:`index_bounds` over every member of a SignatureSet (the smallest per input)."""
    bounds: dict[str, dict[str, int]] = {}
    for p in program if isinstance(program, SignatureSet) else [program]:
        for name, b in index_bounds(p).items():
            old = bounds.get(name, b)["index_bound"]
            bounds[name] = {"index_bound": min(old, b["index_bound"])}
    return bounds


def index_bounds(program: Program) -> dict[str, dict[str, int]]:
    """Integer inputs used directly as embedding indices -> {"index_bound": rows}.

    TVM lowers ``take`` without bounds checks (an out-of-range token id reads out of
    bounds, or crashes), so the runtime checks these inputs against the bound before calling.
    """
    aten = torch.ops.aten
    # ops whose outputs only rearrange or select their first operand's values
    same_values = {
        aten.view.default, aten.reshape.default, aten._unsafe_view.default,
        aten.clone.default, aten.contiguous.default, aten.alias.default,
        aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.flatten.using_ints,
        aten.expand.default, aten.slice.Tensor, aten.select.int, aten.permute.default,
        aten.transpose.int,
    }  # fmt: skip
    bounds: dict[str, dict[str, int]] = {}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name in program.input_names:
        node = placeholders.get(name)
        if node is None or not isinstance(M.spec(node), M.TensorSpec):
            continue
        if M.spec(node).dtype.is_floating_point:
            continue
        frontier: list[tuple[Any, Any]] = [(program.graph_module, node)]
        seen = {node}
        while frontier:
            gm, value = frontier.pop()
            for user in value.users:
                if user in seen:
                    continue
                if user.target in same_values and user.args and user.args[0] is value:
                    seen.add(user)
                    frontier.append((gm, user))
                elif user.target is aten.embedding.default and user.args[1] is value:
                    rows = _rows(user.args[0])
                    if isinstance(rows, int):
                        old = bounds.get(name, {}).get("index_bound", rows)
                        bounds[name] = {"index_bound": min(old, rows)}
                else:
                    frontier += [(sub, ph) for sub, ph in _into_subgraphs(gm, user, value)]
    return bounds


def _rows(table: Any) -> int | None:
    """The row count of an embedding table node (None when its spec is not known)."""
    try:
        spec = M.spec(table)
    except Exception:  # a subgraph placeholder without a spec
        return None
    return spec.shape[0] if isinstance(spec, M.TensorSpec) and spec.shape else None


def _into_subgraphs(gm: Any, user: Any, value: Any) -> list[tuple[Any, Any]]:
    """(subgraph, placeholder) pairs that receive ``value`` when ``user`` is a part call
    (``invoke_subgraph``) or a ``cond`` of a split program, so that index bounds are found
    inside the parts too."""
    if user.target is INVOKE:
        subs, operands = [user.args[0]], list(user.args[2:])
    elif user.target is COND:
        subs, operands = list(user.args[1:3]), list(user.args[3])
    else:
        return []
    out = []
    for sub in subs:
        sub_gm = getattr(gm, sub.target, None) if getattr(sub, "op", None) == "get_attr" else None
        if sub_gm is None:
            continue
        phs = [n for n in sub_gm.graph.nodes if n.op == "placeholder"]
        out += [(sub_gm, phs[i]) for i, a in enumerate(operands) if a is value and i < len(phs)]
    return out


__all__ = ["index_bounds", "merged_index_bounds"]
