"""Block discovery for ``stitch``: the repeated blocks of a program and the activations at
their boundaries (see :mod:`splice.passes.stitch` for the rules).

:func:`find_blocks` cuts a program at the children of the module path with the most
consecutive integer-indexed, identical children; each block's nodes must be contiguous and
exactly one activation must cross each boundary, else a PassError says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.ops import lowrank_linear
from splice.ir.program import Program


@dataclass
class Blocks:
    """The repeated blocks of a program and the values at their boundaries.

    ``prologue``, ``blocks[i]`` and ``epilogue`` are node names in graph order (weights and
    inputs excluded); ``boundary[i]`` is the input of block ``i`` and ``boundary[-1]`` the
    output of the last block; ``side`` are prologue values that blocks or the epilogue read
    besides the boundary; ``channel_dim`` is where the boundary activation keeps its
    features (-1 for ``[..., C]``, 1 for ``[B, C, H, W]``).
    """

    prefix: str
    prologue: list[str]
    blocks: list[list[str]]
    epilogue: list[str]
    boundary: list[str]
    side: list[str]
    channel_dim: int

    @property
    def depth(self) -> int:
        return len(self.blocks)


#: ops compared as another when blocks are matched: a factored Linear is the block's Linear,
#: so a ``lowrank`` program whose blocks kept different Linears dense (``alloc=sensitivity``)
#: still has repeated blocks
_SAME_AS = {lowrank_linear.overload: torch.ops.aten.linear.default}


def _block_prefix(program: Program) -> str:
    """The module path whose integer-indexed children are the most repeated *same* blocks:
    children ``0..n-1`` that run the same sequence of ops, up to :data:`_SAME_AS` (a
    ``Sequential`` stem of conv, norm and activation has indexed children too, but they are
    not repeats)."""
    sigs: dict[str, dict[int, list[str]]] = {}
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        parts = M.loc(n).module_path.split(".")
        op = str(_SAME_AS.get(n.target, n.target))
        for k, p in enumerate(parts):
            if p.isdigit():
                sigs.setdefault(".".join(parts[:k]), {}).setdefault(int(p), []).append(op)
    best, best_score = "", 0
    for prefix, by_index in sigs.items():
        if set(by_index) != set(range(len(by_index))):
            continue
        counts: dict[tuple, int] = {}
        for ops in by_index.values():
            counts[tuple(ops)] = counts.get(tuple(ops), 0) + 1
        score = max(counts.values())
        if score >= 2 and (score, -len(prefix)) > (best_score, -len(best)):
            best, best_score = prefix, score
    if not best:
        raise PassError(
            f"program {program.name!r} has no repeated blocks: no module path has integer-"
            "indexed children 0, 1, ... that run the same ops",
            hint="stitch cuts models at repeated blocks (transformer layers, conv stages)",
        )
    return best


def _block_index(n: fx.Node, prefix: str) -> int | None:
    path = M.loc(n).module_path
    head = prefix + "." if prefix else ""
    if not path.startswith(head):
        return None
    rest = path[len(head) :].split(".", 1)[0]
    return int(rest) if rest.isdigit() else None


def find_blocks(program: Program) -> Blocks:
    """The repeated blocks of ``program`` (module docstring); PassError says why not."""
    prefix = _block_prefix(program)
    order = [n for n in program.graph.nodes if n.op == "call_function"]
    pos = {n: i for i, n in enumerate(order)}
    depth = 1 + max(i for n in order if (i := _block_index(n, prefix)) is not None)
    last = [-1] * depth
    first = [len(order)] * depth
    for n in order:
        i = _block_index(n, prefix)
        if i is not None:
            first[i] = min(first[i], pos[n])
            last[i] = max(last[i], pos[n])
    for i in range(1, depth):
        if first[i] <= last[i - 1]:
            raise PassError(
                f"blocks {prefix}.{i - 1} and {prefix}.{i} interleave in the graph",
                where=f"node %{order[first[i]].name}",
                hint="stitch needs blocks that run one after the other",
            )
    spans = [(first[0], last[0] + 1)] + [(last[i - 1] + 1, last[i] + 1) for i in range(1, depth)]
    blocks = [order[a:b] for a, b in spans]
    prologue = order[: first[0]]
    epilogue = order[last[-1] + 1 :]
    owner: dict[fx.Node, int] = {n: -1 for n in prologue}
    for i, b in enumerate(blocks):
        owner.update({n: i for n in b})
    owner.update({n: depth for n in epilogue})

    def live_in(nodes: list[fx.Node]) -> list[fx.Node]:
        inside = set(nodes)
        out: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and a not in out:
                    out.append(a)
        return out

    boundary: list[fx.Node | None] = [None] * (depth + 1)
    side: list[fx.Node] = []
    pre_reads: list[list[fx.Node]] = []
    for i, nodes in enumerate([*blocks, epilogue]):
        ins = live_in(nodes)
        here = f"{prefix}.{i}" if i < depth else "the epilogue"
        from_prev = [a for a in ins if owner.get(a, -1) == i - 1 and i > 0]
        later = [a for a in ins if owner.get(a, -1) not in (-1, i - 1)]
        if later:
            raise PassError(
                f"{here} reads %{later[0].name} of an earlier block, not only the previous "
                "block's output",
                hint="stitch supports chains of blocks (one activation between blocks)",
            )
        if i > 0:
            if len(from_prev) != 1:
                names = ", ".join(f"%{a.name}" for a in from_prev) or "nothing"
                raise PassError(
                    f"{here} reads {names} from the block before it; stitching needs exactly "
                    "one activation at each block boundary"
                )
            boundary[i] = from_prev[0]
        pre_reads.append([a for a in ins if owner.get(a, -1) == -1])
    # block 0's boundary: the prologue value it reads that has the hidden state's spec
    # (blocks keep it), else the one no later block reads
    later_reads = {a for r in pre_reads[1:] for a in r}
    cands = [a for a in pre_reads[0] if M.get_spec(a) == M.get_spec(boundary[1])]
    if len(cands) != 1:
        cands = [a for a in pre_reads[0] if a not in later_reads]
    if len(cands) != 1:
        raise PassError(
            f"cannot tell which value block {prefix}.0 takes as its activation among "
            + ", ".join(f"%{a.name}" for a in pre_reads[0]),
        )
    boundary[0] = cands[0]
    for r in pre_reads:
        for a in r:
            if a is not boundary[0] and a not in side:
                side.append(a)
    spec = M.get_spec(boundary[0])
    channel_dim = 1 if isinstance(spec, M.TensorSpec) and len(spec.shape) == 4 else -1
    return Blocks(
        prefix,
        [n.name for n in prologue],
        [[n.name for n in b] for b in blocks],
        [n.name for n in epilogue],
        [b.name for b in boundary if b is not None],
        [a.name for a in side],
        channel_dim,
    )


__all__ = ["Blocks", "find_blocks"]
