"""A Program as Model Explorer graphs: one graph per FX graph, every node once.

For a Program whose top graph gets the id ``graph_id``:

* each FX node (inputs, weight reads, ops, the output) is one :class:`GraphNode` whose id
  is the node's name (unique within its graph) and whose label is its op
  (:func:`node_label`);
* its namespace is the module path of its :class:`~splice.ir.meta.Loc` (for a weight read
  without one, the module owning the weight: :func:`module_of`) as a ``/``-path of
  module paths (:func:`namespace_of`: ``model.layers.0.mlp`` becomes
  ``model/model.layers/model.layers.0/model.layers.0.mlp``), so every layer Model Explorer
  draws is labelled with the module path it stands for and a LLaMA collapses to
  ``model.layers.0`` … ``model.layers.N``;
* its attributes are the op, the value name, the spec, the module path, the source line
  and the passes that created or changed it (and ``starts part`` where ``stitch`` or a
  model marked the start of a piece that ``branches`` compiles on its own); its outputs
  metadata holds one ``tensor_shape`` per tensor it produces;
* an edge goes from every node input (in argument order) to the node;
* each sub-graph (a ``cond`` branch, a ``branches`` part, a ``stitch`` route) is its own
  graph with the id ``<graph_id>/<dotted path>`` (:func:`subgraph_id`); the node that reads
  it and the nodes that take it as an operand list it in ``subgraphIds``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch.fx as fx
from model_explorer import graph_builder as gb

from splice.ir import meta as M
from splice.ir.printer import format_target
from splice.ir.program import Program, iter_graphs


def namespace_of(module_path: str) -> str:
    """The Model Explorer namespace of a module path: its dotted prefixes joined by ``/``
    (``""`` for the root module)."""
    if not module_path:
        return ""
    parts = module_path.split(".")
    return "/".join(".".join(parts[: i + 1]) for i in range(len(parts)))


def subgraph_id(graph_id: str, path: str) -> str:
    """The id of the sub-graph at dotted ``path`` of the program shown as ``graph_id``."""
    return f"{graph_id}/{path}" if path else graph_id


def module_of(node: fx.Node) -> str:
    """The module path a node is drawn in: its Loc's, or for a weight read with no Loc of
    its own the module that owns the weight (``model.embed_tokens`` for
    ``@model.embed_tokens.weight``)."""
    path = M.loc(node).module_path
    if not path and node.op == "get_attr" and isinstance(node.target, str):
        path = node.target.rpartition(".")[0]
    return path


def node_label(node: fx.Node, subgraph_names: Collection[str] = ()) -> str:
    """What a node is: its op (``aten.linear``, ``splice.lowrank_linear``,
    ``higher_order.cond``), ``input``, ``weight``, ``graph`` (a sub-graph read) or
    ``output``."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "graph" if node.target in subgraph_names else "weight"
    return format_target(node)


@dataclass(frozen=True)
class GraphIndex:
    """Where each FX graph of a program went: graph id -> (its GraphModule, its dotted
    path in the program)."""

    graphs: dict[str, tuple[fx.GraphModule, str]]

    def nodes(self) -> Iterator[tuple[str, fx.Node]]:
        """(graph id, node) for every node of every graph."""
        for gid, (gm, _) in self.graphs.items():
            for n in gm.graph.nodes:
                yield gid, n


def _kv(key: str, value: str) -> gb.KeyValue:
    return gb.KeyValue(key=key, value=value)


def _outputs_metadata(spec: M.Spec | None) -> list[gb.MetadataItem]:
    if spec is None:
        return []
    items = spec.items if isinstance(spec, M.TupleSpec) else (spec,)
    return [
        gb.MetadataItem(id=str(i), attrs=[_kv("tensor_shape", str(s))])
        for i, s in enumerate(items)
        if isinstance(s, M.TensorSpec)
    ]


def build_node(node: fx.Node, subgraphs: dict[str, str]) -> gb.GraphNode:
    """The Model Explorer node of ``node``; ``subgraphs`` maps the names of its graph's
    sub-graph children to their graph ids."""
    loc = M.loc(node)
    spec = M.get_spec(node)
    label = node_label(node, subgraphs)
    attrs = [_kv("op", label), _kv("name", f"%{node.name}")]
    attrs.append(_kv("spec", str(spec) if spec is not None else "(none)"))
    if node.op in ("get_attr", "call_module"):
        attrs.append(_kv("target", f"@{node.target}"))
    module = module_of(node)
    attrs.append(_kv("module", module or "<root>"))
    attrs.append(_kv("source", loc.source or "(unknown)"))
    attrs.append(_kv("passes", ",".join(loc.from_passes) or "(none)"))
    if M.starts_part(node):
        attrs.append(_kv("starts part", "yes"))
    refs: list[str] = []
    if node.op in ("get_attr", "call_module") and node.target in subgraphs:
        refs.append(str(node.target))
    for inp in node.all_input_nodes:
        if inp.op == "get_attr" and inp.target in subgraphs and inp.target not in refs:
            refs.append(str(inp.target))
    edges = [
        gb.IncomingEdge(sourceNodeId=inp.name, targetNodeInputId=str(i))
        for i, inp in enumerate(node.all_input_nodes)
    ]
    return gb.GraphNode(
        id=node.name,
        label=label,
        namespace=namespace_of(module),
        subgraphIds=[subgraphs[r] for r in refs],
        attrs=attrs,
        incomingEdges=edges,
        outputsMetadata=_outputs_metadata(spec),
    )


def program_graphs(program: Program, graph_id: str = "main") -> tuple[list[gb.Graph], GraphIndex]:
    """The graphs of ``program`` (top graph first, then every sub-graph, breadth first)
    and the index of which FX graph each came from."""
    graphs: list[gb.Graph] = []
    index: dict[str, tuple[fx.GraphModule, str]] = {}
    for path, gm in iter_graphs(program):
        gid = subgraph_id(graph_id, path)
        children = {
            name: subgraph_id(graph_id, f"{path}.{name}" if path else name)
            for name, m in gm.named_children()
            if isinstance(m, fx.GraphModule)
        }
        graphs.append(gb.Graph(id=gid, nodes=[build_node(n, children) for n in gm.graph.nodes]))
        index[gid] = (gm, path)
    return graphs, GraphIndex(index)


__all__ = [
    "GraphIndex",
    "build_node",
    "module_of",
    "namespace_of",
    "node_label",
    "program_graphs",
    "subgraph_id",
]
