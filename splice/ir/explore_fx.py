"""A cheaper ``fx.Graph.node_copy`` for the explorer's path assembly.

The explorer copies many nodes per path (:func:`splice.ir.explore._synthesize` assembles
each region-traced path from the first trace's graph; the emitter copies every node it
emits). ``Graph.node_copy`` goes through ``Graph.create_node``, which walks the new
node's arguments with pytree to warn about raw ``SymInt`` leaves -- the larger part of a
copy's cost, and a check that cannot fire here: the copied arguments are those of nodes
export already built (sizes are nodes, never raw symbolic values), mapped node for node.

:func:`copy_node` creates the node without arguments (so the walk has nothing to visit)
and then sets them as the constructor does (``Node._update_args_kwargs``, which registers
the node as a user of its inputs; the public setters where a torch version lacks it),
past ``Node.__setattr__``, whose re-keying of the graph's lookup table on every attribute
write is a no-op for arguments and ``meta``. The result equals ``node_copy``'s: the same name (uniquified in the
graph's namespace), op, target, type, arguments, keyword arguments, users and a shallow
copy of ``meta``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch.fx.node import map_arg

__all__ = ["copy_node"]


def copy_node(graph: fx.Graph, node: fx.Node, arg_transform: Callable[[fx.Node], Any]) -> fx.Node:
    """``graph.node_copy(node, arg_transform)``, without ``create_node``'s argument walk
    (module docs)."""
    args = map_arg(node.args, arg_transform)
    kwargs = map_arg(node.kwargs, arg_transform)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        return graph.node_copy(node, arg_transform)  # what node_copy would reject: its error
    out = graph.create_node(node.op, node.target, None, None, node.name, node.type)
    if args or kwargs:
        update = getattr(out, "_update_args_kwargs", None)
        if update is not None:
            update(args, kwargs)  # what the constructor calls: registers the users
        else:
            out.args, out.kwargs = args, kwargs
    # meta is no part of the graph's lookup key: set past Node.__setattr__'s re-keying
    object.__setattr__(out, "meta", node.meta.copy())
    return out
