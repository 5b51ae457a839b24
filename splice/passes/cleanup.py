"""Cleanup passes: ``dce``, ``cse``, ``fold-constants``.

All three are ``exact``: the program computes the same outputs, bit for bit on the CPU.

* ``dce`` — erases values nobody uses (unless the op has side effects) and weights nobody
  reads any more.
* ``cse`` — merges nodes that apply the same op to the same operands (random ops and ops
  with side effects excepted), and duplicate reads of one weight.
* ``fold-constants`` — evaluates values that depend only on constants (buffers, constants,
  literals; parameters too with ``params=true``) and stores them as constant weights; results
  larger than ``max_numel`` elements stay computed, so folding never bloats the program
  (an ``expand`` of a mask, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PipelineError
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.registry import register_pass

_NONDETERMINISTIC_NAMES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


def is_random(node: fx.Node) -> bool:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in t.tags:
            return True
        name = t._schema.name.split("::")[-1]
        return (
            name in _NONDETERMINISTIC_NAMES
            or "rand" in name
            or "dropout" in name
            or "bernoulli" in name
        )
    return False


def is_pure(node: fx.Node) -> bool:
    """True if erasing or merging the node cannot change what the program does."""
    if node.op in ("placeholder", "output"):
        return False
    if node.op == "get_attr":
        return True
    try:
        return not node.is_impure()
    except Exception:
        return False


def dead_code_elimination(program: Program, rw: Rewriter) -> tuple[int, list[str]]:
    removed = 0
    for node in reversed(list(program.graph.nodes)):
        if node.op in ("placeholder", "output", "get_attr") or node.users:
            continue
        if is_pure(node):
            rw.erase(node)
            removed += 1
    dropped = rw.erase_unused_weights()
    return removed, dropped


@register_pass
@dataclass(frozen=True)
class DCE(Pass):
    """Dead-code elimination: erase unused pure values and unread weights."""

    name = "dce"
    semantics = "exact"
    summary = "erase values nobody uses and weights nobody reads"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        rw = Rewriter(program, self.name)
        removed, dropped = dead_code_elimination(program, rw)
        changed = bool(removed or dropped)
        stats: dict[str, Any] = {"nodes_removed": removed, "weights_removed": len(dropped)}
        if not changed:
            stats["reason"] = "no unused values or weights"
        return PassResult(program, changed, stats)


def _key(v: Any, canon: dict[fx.Node, fx.Node]) -> Any:
    if isinstance(v, fx.Node):
        return ("%", id(canon.get(v, v)))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_key(x, canon) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _key(x, canon)) for k, x in v.items())))
    if isinstance(v, slice):
        return ("slice", _key(v.start, canon), _key(v.stop, canon), _key(v.step, canon))
    if isinstance(v, float):
        return ("float", repr(v))  # so that nan == nan and -0.0 != 0.0
    return (type(v).__name__, v)


@register_pass
@dataclass(frozen=True)
class CSE(Pass):
    """Common-subexpression elimination over pure, deterministic nodes."""

    name = "cse"
    semantics = "exact"
    summary = "merge nodes that compute the same op on the same operands"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        rw = Rewriter(program, self.name)
        seen: dict[Any, fx.Node] = {}
        canon: dict[fx.Node, fx.Node] = {}
        merged = 0
        for node in list(program.graph.nodes):
            if node.op in ("placeholder", "output") or not is_pure(node) or is_random(node):
                continue
            key = (
                node.op,
                node.target if node.op != "call_function" else id(node.target),
                _key(node.args, canon),
                _key(node.kwargs, canon),
            )
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            canon[node] = first
            node.replace_all_uses_with(first)
            rw.mark_changed(first)
            rw.erase(node)
            merged += 1
        stats: dict[str, Any] = {"merged": merged}
        if not merged:
            stats["reason"] = "no repeated computations"
        return PassResult(program, merged > 0, stats)


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate constant subgraphs once and store their results as constant weights."""

    name = "fold-constants"
    semantics = "exact"
    summary = "precompute values that depend only on constants"

    params: bool = False
    max_numel: int = 1 << 16

    def validate(self) -> None:
        if self.max_numel < 0:
            raise PipelineError(
                f"fold-constants: max_numel must be >= 0 (elements), got {self.max_numel}",
                hint="0 folds only empty values; the default is 65536",
            )

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        rw = Rewriter(program, self.name)
        kinds = program.weight_kinds
        const: dict[fx.Node, Any] = {}
        for node in program.graph.nodes:
            if node.op == "get_attr":
                kind = kinds.get(node.target)
                if kind is not None and (kind != "param" or self.params):
                    const[node] = program.get_weight(node.target)
                continue
            if node.op != "call_function" or not is_pure(node) or is_random(node):
                continue
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                continue
            if not all(n in const for n in node.all_input_nodes):
                continue
            args = fx.node.map_arg(node.args, const.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, const.__getitem__)
            with torch.no_grad():
                const[node] = node.target(*args, **kwargs)
        folded, bytes_added, too_big = 0, 0, 0
        for node, value in const.items():
            if node.op == "get_attr" or not isinstance(value, torch.Tensor):
                continue
            live_users = [u for u in node.users if u not in const or u.op == "output"]
            if not live_users:
                continue
            if value.numel() > self.max_numel:
                too_big += 1
                continue
            with rw.at(node):
                w = rw.add_weight(
                    f"_folded.{node.name}",
                    value.detach().clone().contiguous(),
                    "constant",
                    unique=True,
                )
            for u in live_users:
                u.replace_input_with(node, w)
                rw.mark_changed(u)
            folded += 1
            bytes_added += value.numel() * value.element_size()
        removed, _ = dead_code_elimination(program, rw)
        stats: dict[str, Any] = {
            "folded": folded,
            "bytes_added": bytes_added,
            "nodes_removed": removed,
            "kept_too_large": too_big,
        }
        changed = folded > 0 or removed > 0
        if not changed:
            stats["reason"] = (
                "no constant values to fold" if not too_big else "constant values exceed max_numel"
            )
        return PassResult(program, changed, stats)


__all__ = ["CSE", "DCE", "FoldConstants", "dead_code_elimination", "is_pure", "is_random"]
