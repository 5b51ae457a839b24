"""Route building for ``stitch``: the stitched program (see :mod:`splice.passes.stitch`).

Every route is built from copies of the anchors' pieces (prologue, blocks, stitching layer,
head) whose first node is marked with :func:`~splice.ir.builder.mark_part_start`; the
program chooses among the routes with a chain of ``cond(config == k, route_k, ...)``. All
nodes are made through :class:`~splice.ir.builder.Builder`, so every spec is inferred (a
copied anchor node keeps its spec when its inputs keep theirs).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.builder import Builder, mark_part_start
from splice.ir.program import Program, build_graph_module
from splice.passes.stitch_blocks import Blocks
from splice.passes.stitch_fit import Config

aten = torch.ops.aten
COND = torch.ops.higher_order.cond
_LOC = M.Loc(module_path="stitch")  # the config choice itself


def _call(b: Builder, target: torch._ops.OpOverload, args: tuple, kwargs: dict | None = None,
          **kw) -> fx.Node:  # fmt: skip
    """``b.call`` with the value name torch.fx gives by default (``unsqueeze_default``), the
    names stitched programs have always had."""
    name = target.__name__.replace(".", "_").lower()
    return b.call(target, args, kwargs, name=name, **kw)


@dataclass
class Anchor:
    """One member of the family: its program, blocks, and weight prefix in the result."""

    program: Program
    blocks: Blocks
    prefix: str  # weight name prefix in the stitched program
    nodes: dict[str, fx.Node] = field(default_factory=dict)


def weight_placeholder_name(weight: str) -> str:
    """The placeholder through which a branch graph reads ``weight``."""
    return "w_" + weight.replace(".", "__")


class RouteBuilder:
    """Copies anchor pieces into the graph of ``b``; ``inputs`` are the program inputs
    there and ``weight(name)`` the node reading a weight there."""

    def __init__(
        self, b: Builder, inputs: dict[str, fx.Node], weight: Callable[[str], fx.Node]
    ) -> None:
        self.b = b
        self.inputs = inputs
        self.weight = weight

    def copy(self, a: Anchor, names: Sequence[str], env: dict[str, fx.Node]) -> None:
        """Copy nodes ``names`` of anchor ``a`` (those not in ``env``) into the graph; the
        first copied node starts a part."""
        started = False
        for name in names:
            if name in env:
                continue
            src = a.nodes[name]

            def arg(n: fx.Node) -> fx.Node:
                if n.name in env:
                    return env[n.name]
                if n.op == "placeholder":
                    return self.inputs[n.name]
                if n.op == "get_attr":
                    return self.weight(f"{a.prefix}.{n.target}")
                raise PassError(f"value %{n.name} of {a.program.name} is used before it is built")

            new = self.b.copy(src, arg)
            if not started:
                mark_part_start(new)
                started = True
            env[name] = new

    def needed(self, a: Anchor, outputs: Sequence[str], stop: set[str]) -> list[str]:
        """Names of ``a``'s call nodes that ``outputs`` need, not looking past ``stop``."""
        keep: set[str] = set()
        stack = [a.nodes[o] for o in outputs]
        while stack:
            n = stack.pop()
            if n.name in keep or n.op != "call_function":
                continue
            keep.add(n.name)
            if n.name in stop:
                continue
            stack.extend(n.all_input_nodes)
        return [n.name for n in a.program.graph.nodes if n.name in keep]


def route(rb: RouteBuilder, anc: list[Anchor], c: Config, kind: str) -> list[fx.Node]:
    """The output values of configuration ``c``, built in ``rb``'s graph."""
    if c.anchor is not None:
        a = anc[c.anchor]
        env: dict[str, fx.Node] = {}
        bl = a.blocks
        for piece in [bl.prologue, *bl.blocks, bl.epilogue]:
            rb.copy(a, piece, env)
        outs = a.program.output_values
        return [env[o.name] if o.name in env else rb.inputs[o.name] for o in outs]
    f, e = anc[c.front], anc[c.end]
    j, m = c.cut
    envf: dict[str, fx.Node] = {}
    # piece by piece, as in the anchor's own route, so that the parts are shared with it
    for piece in [f.blocks.prologue, *f.blocks.blocks[: j + 1]]:
        rb.copy(f, piece, envf)
    x = envf[f.blocks.boundary[j + 1]]
    h = stitch_layer(rb, x, c.layer, kind)
    enve: dict[str, fx.Node] = {e.blocks.boundary[m]: h}
    if e.blocks.side:
        rb.copy(e, rb.needed(e, e.blocks.side, set()), enve)
    for blk in e.blocks.blocks[m:]:
        rb.copy(e, blk, enve)
    rb.copy(e, e.blocks.epilogue, enve)
    return [enve[o.name] for o in e.program.output_values]


def stitch_layer(rb: RouteBuilder, x: fx.Node, key: str, kind: str) -> fx.Node:
    """The stitching layer ``key`` applied to ``x``; its nodes start a part of their own."""
    b = rb.b
    w, bias = rb.weight(f"{key}.weight"), rb.weight(f"{key}.bias")
    with b.loc(M.Loc(module_path=key)):
        if kind == "conv1x1":
            w3 = _call(b, aten.unsqueeze.default, (w, -1))
            first = w3
            w4 = _call(b, aten.unsqueeze.default, (w3, -1))
            y = _call(b, aten.conv2d.default, (x, w4, bias))
        else:
            y = first = _call(b, aten.linear.default, (x, w, bias))
            if kind == "lora":
                la, lb = rb.weight(f"{key}.lora_a"), rb.weight(f"{key}.lora_b")
                low = _call(b, aten.linear.default, (x, la))
                up = _call(b, aten.linear.default, (low, lb))
                y = _call(b, aten.add.Tensor, (y, up))
    mark_part_start(first)
    return y


def build_program(anc: list[Anchor], configs: list[Config], layers, kind: str) -> Program:
    """The stitched program: input ``config`` picks the route of ``configs[config]``."""
    first = anc[0].program
    weights: dict[str, tuple[torch.Tensor, str]] = {}
    for a in anc:
        for w, k in a.program.weight_kinds.items():
            weights[f"{a.prefix}.{w}"] = (a.program.get_weight(w), k)
    for key, ws in layers.items():
        for nm, t in ws.items():
            weights[f"{key}.{nm}"] = (t, "param")
    input_specs = dict(zip(first.input_names, first.input_specs))
    input_specs["config"] = M.TensorSpec((), torch.int64)
    weight_specs = {w: M.spec_of_value(t) for w, (t, _) in weights.items()}
    out_specs = first.output_specs

    # weights each route reads (built once in a scratch graph), and the union from k on
    scratch = Builder(_empty_program(first, {}, "stitch_scratch"), "stitch")
    used: list[list[str]] = []
    for c in configs:
        rb_ = scratch.sub()
        ins = {n: rb_.placeholder(n, s) for n, s in input_specs.items()}
        seen: dict[str, fx.Node] = {}

        def wt(name: str, b: Builder = rb_, seen: dict[str, fx.Node] = seen) -> fx.Node:
            if name not in seen:
                seen[name] = b.placeholder(weight_placeholder_name(name), weight_specs[name])
            return seen[name]

        route(RouteBuilder(rb_, ins, wt), anc, c, kind)
        used.append(list(seen))
    tails: list[list[str]] = [[] for _ in configs]
    acc: list[str] = []
    for k in range(len(configs) - 1, -1, -1):
        acc = list(dict.fromkeys(used[k] + acc))
        tails[k] = acc

    def level(
        k: int, b: Builder, ins: dict[str, fx.Node], wnodes: dict[str, fx.Node]
    ) -> list[fx.Node]:
        """Graph code choosing among configs k.. given inputs and weight nodes in ``b``."""
        if k == len(configs):
            nan = float("nan")
            full = aten.full.default
            return [
                _call(b, full, (list(s.shape), nan), {"dtype": s.dtype}, loc=_LOC)
                for s in out_specs
            ]
        pred = _call(b, aten.eq.Scalar, (ins["config"], k), loc=_LOC)
        operands = [*input_specs, *tails[k]]
        branches: list[Builder] = []
        for which in ("then", "else"):
            sb = b.sub()
            b_ins: dict[str, fx.Node] = {}
            b_w: dict[str, fx.Node] = {}
            for name in operands:
                if name in input_specs:
                    b_ins[name] = sb.placeholder(name, input_specs[name])
                else:
                    b_w[name] = sb.placeholder(weight_placeholder_name(name), weight_specs[name])
            if which == "then":
                outs = route(RouteBuilder(sb, b_ins, b_w.__getitem__), anc, configs[k], kind)
            else:
                outs = level(k + 1, sb, b_ins, b_w)
            sb.output(tuple(outs))
            branches.append(sb)
        refs = [b.graph_ref(f"config_{k}_{w}", sb) for w, sb in zip(("then", "else"), branches)]
        ops = tuple(ins[n] if n in input_specs else wnodes[n] for n in operands)
        cond = b.call(COND, (pred, refs[0], refs[1], ops), loc=_LOC)
        return [b.call(operator.getitem, (cond, i)) for i in range(len(out_specs))]

    kept = {w: weights[w] for w in tails[0]}
    program = _empty_program(first, kept, "stitched_" + "_".join(a.program.name for a in anc))
    top = Builder(program, "stitch")
    with top.at(program.output_node):
        tins = {name: top.placeholder(name, s) for name, s in input_specs.items()}
        tw = {name: top.weight(name) for name in tails[0]}
        outs = level(0, top, tins, tw)
    program.set_outputs(outs, first.output_names)
    return program


def _empty_program(
    like: Program, weights: dict[str, tuple[torch.Tensor, str]], name: str
) -> Program:
    """A program with no inputs and no outputs that owns ``weights``, to build into."""
    g = fx.Graph()
    g.output(())
    gm = build_graph_module(g, weights, {}, class_name="Program_stitched")
    return Program(
        gm,
        output_names=[],
        weight_kinds={w: k for w, (_, k) in weights.items()},
        symbols=like.symbols,
        name=name,
    )


__all__ = [
    "Anchor",
    "RouteBuilder",
    "build_program",
    "route",
    "stitch_layer",
    "weight_placeholder_name",
]
