"""Per-node data overlays: what splice already computes, as Model Explorer node data.

An overlay is a number per node, by graph id and node id (:data:`Overlay`). The overlays
splice produces (:data:`OVERLAYS` names them, in the order the viewer lists them):

=======================  ================================================================
``FLOPs``                the cost model's FLOPs of every op node (:func:`node_cost`)
``bytes``                the cost model's bytes read + written of every op node
``lowrank rank``         the rank of every ``splice.lowrank_linear`` node (from its factor
                         B, or its ``rank`` argument when that is smaller)
``lowrank weight error`` ``lowrank``'s relative weight error of the layer, from the pass's
                         stats (a dump folder's ``dump.json``)
``lowrank activation error``  the same for the activation error on calibration data
``experts mass covered`` ``experts``' share of the dense FFN's activation mass that the
                         chosen experts cover, per ``splice.moe_ffn`` node (pass stats)
``numeric max abs error``  NumericCheck's max abs output error after a pass, on every node
                         that pass created or changed (``dump.json``'s ``numeric``)
``part check error``     an artifact's compile-time check of each compiled part against
                         the reference (the manifest's ``check_max_abs_diff``), on the
                         ``invoke_subgraph`` nodes that call the part
``part latency (ms)``    the mean wall time per call of each compiled part, measured on
                         request (``splice view ARTIFACT --time-parts N``,
                         :mod:`splice.tools.explorer.latency`), on the same nodes
=======================  ================================================================

Pass stats are matched to nodes by module path: a ``lowrank`` stats row names its layer
(``model.layers.0.self_attn.q_proj``) and applies to the ``lowrank_linear`` nodes of that
module; an ``experts`` row names its FFN (``model.layers.0.mlp``) and applies to the
``moe_ffn`` nodes at or under it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch.fx as fx
from model_explorer import node_data_builder as ndb

from splice.ir import meta as M
from splice.ir.printer import format_target
from splice.passes.analysis.cost import node_cost
from splice.tools.explorer.graph import GraphIndex

#: overlay name -> graph id -> node id -> value
Overlay = dict[str, dict[str, float]]

FLOPS = "FLOPs"
BYTES = "bytes"
RANK = "lowrank rank"
WEIGHT_ERROR = "lowrank weight error"
ACTIVATION_ERROR = "lowrank activation error"
MASS_COVERED = "experts mass covered"
NUMERIC = "numeric max abs error"
PART_CHECK = "part check error"
PART_LATENCY = "part latency (ms)"
OVERLAYS = (
    FLOPS,
    BYTES,
    RANK,
    WEIGHT_ERROR,
    ACTIVATION_ERROR,
    MASS_COVERED,
    NUMERIC,
    PART_CHECK,
    PART_LATENCY,
)

LOWRANK_OP = "splice.lowrank_linear"
MOE_OP = "splice.moe_ffn"


def _set(out: dict[str, Overlay], name: str, gid: str, node: str, value: float) -> None:
    out.setdefault(name, {}).setdefault(gid, {})[node] = value


def _op(n: fx.Node) -> str:
    return format_target(n) if n.op == "call_function" else ""


def _lowrank_rank(n: fx.Node) -> int | None:
    B = n.args[2] if len(n.args) > 2 else n.kwargs.get("B")
    spec = M.get_spec(B) if isinstance(B, fx.Node) else None
    if not isinstance(spec, M.TensorSpec) or not isinstance(spec.shape[0], int):
        return None
    k = spec.shape[0]
    rank = n.args[4] if len(n.args) > 4 else n.kwargs.get("rank")
    return min(k, rank) if isinstance(rank, int) else k


def graph_overlays(index: GraphIndex, hints: Mapping[str, int]) -> dict[str, Overlay]:
    """The overlays read from the graphs alone: FLOPs, bytes and lowrank ranks."""
    out: dict[str, Overlay] = {}
    for gid, n in index.nodes():
        if n.op != "call_function":
            continue
        try:
            cost = node_cost(n, dict(hints))
        except Exception:  # a spec the cost model cannot evaluate: no cost, not a failure
            cost = None
        if cost is not None:
            _set(out, FLOPS, gid, n.name, cost.flops)
            _set(out, BYTES, gid, n.name, cost.bytes)
        if _op(n) == LOWRANK_OP and (rank := _lowrank_rank(n)) is not None:
            _set(out, RANK, gid, n.name, rank)
    return out


def _number(v: Any) -> bool:
    """A finite number (``dump.json`` writes non-finite ones as strings; bools are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rows(stats: Any, key: str) -> list[Any]:
    """``stats[key]`` when it is a list (a damaged record gives no rows, not an error)."""
    rows = stats.get(key) if isinstance(stats, Mapping) else None
    return rows if isinstance(rows, list) else []


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def stats_overlays(
    index: GraphIndex, gids: Iterable[str], records: Iterable[Mapping[str, Any]]
) -> dict[str, Overlay]:
    """Overlays from pass records (``dump.json``'s ``passes`` entries: ``name``, ``stats``,
    ``numeric``) on the graphs ``gids`` (a program after those passes and its sub-graphs).

    ``lowrank`` rows go to the ``lowrank_linear`` nodes of their layer, ``experts`` rows to
    the ``moe_ffn`` nodes under their FFN (a later record wins), and a record's numeric
    error to every node whose passes include the record's pass."""
    out: dict[str, Overlay] = {}
    wanted = set(gids)
    nodes = [(gid, n) for gid, n in index.nodes() if gid in wanted]
    # the nodes stats rows can name, by module path (one pass over the graphs)
    lowrank: dict[str, list[tuple[str, fx.Node]]] = {}
    moe: list[tuple[str, fx.Node, str]] = []
    for gid, n in nodes:
        op = _op(n)
        if op == LOWRANK_OP:
            lowrank.setdefault(M.loc(n).module_path, []).append((gid, n))
        elif op == MOE_OP:
            moe.append((gid, n, M.loc(n).module_path))
    for rec in records:
        stats = rec.get("stats")
        for row in _rows(stats, "layers"):
            if not isinstance(row, Mapping) or not isinstance(row.get("layer"), str):
                continue
            for gid, n in lowrank.get(row["layer"], []):
                for name, key in (
                    (WEIGHT_ERROR, "weight_error"),
                    (ACTIVATION_ERROR, "activation_error"),
                ):
                    if _number(row.get(key)):
                        _set(out, name, gid, n.name, float(row[key]))
        for row in _rows(stats, "ffns"):
            if not isinstance(row, Mapping) or not isinstance(row.get("ffn"), str):
                continue
            for gid, n, path in moe:
                if _under(path, row["ffn"]) and _number(row.get("mass_covered")):
                    _set(out, MASS_COVERED, gid, n.name, float(row["mass_covered"]))
        numeric = rec.get("numeric")
        name = rec.get("name")
        if isinstance(numeric, Mapping) and _number(numeric.get("max_abs")):
            for gid, n in nodes:
                if name in M.loc(n).from_passes:
                    _set(out, NUMERIC, gid, n.name, float(numeric["max_abs"]))
    return out


def part_called(n: fx.Node) -> str | None:
    """The name of the part an ``invoke_subgraph`` node calls (``"part_3"``), else None."""
    if n.op != "call_function" or _op(n) != "higher_order.invoke_subgraph" or len(n.args) < 2:
        return None
    return n.args[1] if isinstance(n.args[1], str) else None


def part_overlays(
    index: GraphIndex,
    parts: Mapping[str, Mapping[str, Any]],
    latency_ms: Mapping[str, float] | None = None,
) -> dict[str, Overlay]:
    """The compiled parts' check errors (an artifact manifest's ``parts``, by name) and,
    when measured, their mean latency per call (ms, by part name; parts never called are
    left out) on the nodes that call them."""
    out: dict[str, Overlay] = {}
    for gid, n in index.nodes():
        name = part_called(n) or ""
        part = parts.get(name)
        if part is not None and _number(part.get("check_max_abs_diff")):
            _set(out, PART_CHECK, gid, n.name, float(part["check_max_abs_diff"]))
        if latency_ms and name in latency_ms:
            _set(out, PART_LATENCY, gid, n.name, float(latency_ms[name]))
    return out


def merge(*parts: Mapping[str, Overlay]) -> dict[str, Overlay]:
    """Overlays combined; a later part's value for the same node wins."""
    out: dict[str, Overlay] = {}
    for part in parts:
        for name, graphs in part.items():
            for gid, values in graphs.items():
                out.setdefault(name, {}).setdefault(gid, {}).update(values)
    return out


# low values pale, high values dark: the colour scale Model Explorer interpolates per overlay
_GRADIENT = [
    ndb.GradientItem(stop=0, bgColor="#fff5eb"),
    ndb.GradientItem(stop=1, bgColor="#d94801"),
]


def node_data(overlay: Overlay, name: str) -> ndb.ModelNodeData:
    """One overlay as Model Explorer node data (values by node id, per graph)."""
    return ndb.ModelNodeData(
        graphsData={
            gid: ndb.GraphNodeData(
                name=name,
                results={nid: ndb.NodeDataResult(value=v) for nid, v in values.items()},
                gradient=list(_GRADIENT),
            )
            for gid, values in overlay.items()
        }
    )


__all__ = [
    "ACTIVATION_ERROR",
    "BYTES",
    "FLOPS",
    "MASS_COVERED",
    "NUMERIC",
    "OVERLAYS",
    "PART_CHECK",
    "PART_LATENCY",
    "RANK",
    "WEIGHT_ERROR",
    "Overlay",
    "graph_overlays",
    "merge",
    "node_data",
    "part_called",
    "part_overlays",
    "stats_overlays",
]
