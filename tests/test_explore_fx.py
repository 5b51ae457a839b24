"""splice.ir.explore_fx.copy_node gives what fx's Graph.node_copy gives.

Both copy every node of an exported graph (placeholders, weights, ATen calls with keyword
arguments, getitem, the output) into fresh graphs; the copies must agree node for node:
name, op, target, type, arguments, keyword arguments, users and meta, and the graphs
must print the same code and pass fx's lint.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from splice.ir.explore_fx import copy_node


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.bn(self.conv(x)))
        a, b = y.split(2, dim=1)
        return a.sum(dim=(2, 3), keepdim=True), torch.cat([a, b * 2], dim=1)


def _copy(graph: fx.Graph, fast: bool) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        env[n] = copy_node(g, n, env.__getitem__) if fast else g.node_copy(n, env.__getitem__)
    return g, env


def _graph() -> fx.Graph:
    ep = torch.export.export(_Net().eval(), (torch.randn(1, 3, 6, 6),), strict=False)
    return ep.graph_module.graph


def test_copy_node_equals_node_copy() -> None:
    graph = _graph()
    assert any(n.kwargs for n in graph.nodes) or any(
        isinstance(a, (list, tuple)) for n in graph.nodes for a in n.args
    )
    slow, env_slow = _copy(graph, fast=False)
    fast, env_fast = _copy(graph, fast=True)
    fast.lint()
    assert str(fast) == str(slow)
    assert fast.python_code("self").src == slow.python_code("self").src
    for n in graph.nodes:
        a, b = env_fast[n], env_slow[n]
        assert (a.name, a.op, a.target, a.type) == (b.name, b.op, b.target, b.type)
        assert a.graph is fast and b.graph is slow
        assert [u.name for u in b.users] == [u.name for u in a.users]
        assert set(a.meta) == set(b.meta) == set(n.meta)
        assert all(a.meta[k] is n.meta[k] for k in n.meta)
        assert a.meta is not n.meta  # a shallow copy, as node_copy makes
        target = a.target if a.op == "call_function" else None
        assert a in fast.find_nodes(op=a.op, target=target)  # the lookup table keys it


def test_copy_node_maps_arguments_and_uniquifies_names() -> None:
    graph = _graph()
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        env[n] = copy_node(g, n, env.__getitem__)
    # a second copy of the same nodes into the same graph: fresh names, users counted
    env2: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "output":
            continue
        env2[n] = copy_node(g, n, lambda a: env2.get(a, env[a]))
    names = [n.name for n in g.nodes]
    assert len(names) == len(set(names))
    for c in env2.values():
        assert all(x in env2.values() or x in env.values() for x in c.all_input_nodes)
        for a in c.all_input_nodes:
            assert c in a.users
