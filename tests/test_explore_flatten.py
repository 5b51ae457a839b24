"""explore_replay.flatten: the explorer's fast flatten agrees with pytree.tree_flatten."""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.immutable_collections import immutable_dict, immutable_list

from splice.ir.explore_replay import flatten

_T = torch.zeros(2, 3)
_G = fx.Graph()
_N = _G.placeholder("x")
_M = _G.placeholder("y")

Point = collections.namedtuple("Point", "a b")

TREES: list[Any] = [
    (),
    (_N, 1),
    (_N, 1.0),
    (_M, 1),
    ((_N, [1, 2]), {}),
    ((_N, (1, 2)), {}),
    ((_N, immutable_list([1, 2])), immutable_dict({"dim": 0})),
    ((_N, immutable_list([1, 2])), immutable_dict({"dim": 1})),
    ((_N, immutable_list([1, 2])), immutable_dict({"keepdim": 1})),
    ((_N, immutable_list([_M, None])), {}),
    ((_T, torch.Size([2, 3]), torch.float32, torch.device("cpu")), {"out": None}),
    ((_T, (2, 3), torch.float32, torch.device("cpu")), {"out": None}),
    ((slice(0, 2), Ellipsis, torch.strided, torch.contiguous_format, "s", True, 3j), {}),
    ({"a": _T, "b": [_N, {"c": 1}]}, {}),
    ({"b": [_N, {"c": 1}], "a": _T}, {}),
    ((collections.OrderedDict(a=_T, b=1),), {}),
    ((Point(_T, 2),), {}),
    ((Point(_T, 3),), {}),
    ((collections.deque([_N, 1]),), {}),
]


def test_flatten_gives_pytrees_leaves_and_spec_equality() -> None:
    flat = [flatten(t) for t in TREES]
    ref = [pytree.tree_flatten(t) for t in TREES]
    for (_, leaves), (rleaves, _) in zip(flat, ref):
        assert len(leaves) == len(rleaves)
        assert all(a is b for a, b in zip(leaves, rleaves))
    for i in range(len(TREES)):
        for j in range(len(TREES)):
            assert (flat[i][0] == flat[j][0]) == (ref[i][1] == ref[j][1]), (TREES[i], TREES[j])


def test_flatten_of_fx_node_arguments() -> None:
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.aten.mean.dim, (x, [2, 3]), {"keepdim": True})
    z = g.call_function(torch.ops.aten.cat.default, ([x, y], 1))
    for n in (y, z):
        spec, leaves = flatten((n.args, n.kwargs))
        rleaves, _ = pytree.tree_flatten((n.args, n.kwargs))
        assert leaves == rleaves
        assert spec[0] == "plain"  # the fast path, not pytree's
        assert spec == flatten((n.args, n.kwargs))[0]
    assert flatten((y.args, y.kwargs))[0] != flatten((z.args, z.kwargs))[0]
