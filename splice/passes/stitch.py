"""``stitch``: stitching-layer insertion across a model family (SN-Net, Pan et al., CVPR 2023;
SN-Netv2, 2023).

Input: two or more captured programs of one family (the same architecture at different
widths or depths, e.g. small and base BERT) with the same inputs and output specs, and
calibration inputs. Output: one Program with an extra input ``config`` (an integer scalar)
that selects, at run time, either one anchor or a *stitch*: the front (smaller) anchor runs
its blocks ``0..j``, a stitching layer maps its activation to the end anchor's width, and
the end (larger) anchor continues from block ``m`` through its head.

* **Blocks** (:func:`find_blocks`): the repeated blocks of a program are the children of
  the module path with the most consecutive integer-indexed children
  (``encoder.layer.0..11``, ``transformer.h.*``, ``stages.*``). Each block's nodes must be
  contiguous; the value flowing from one block to the next is the *boundary* activation
  (exactly one per boundary, else the pass says why), and values computed before the first
  block and read inside them (attention masks, rotary tables) are *side* values.
* **Enumeration** follows SN-Net's paired stitching for equal depths: a window of ``window``
  blocks slides by ``stride``; every front/end pair ``(j, m)`` inside the window that no
  earlier window produced is a configuration, and each window adds one stitching layer that
  all its new pairs share (depth 12, window 2, stride 1 → 34 configurations, 11 layers). For
  unequal depths each front block ``j`` is stitched to the end block at the same relative
  depth, ``m = round((j + 1) · L_end / L_front)`` (SN-Netv2's rule), one layer each. With
  more than two anchors, adjacent anchors (by FLOPs) are paired, small → large.
* **Least squares** (:func:`least_squares`): on calibration activations X (front output of
  block ``j``) and Y (end input of block ``m``; the embedding output for ``m = 0``, not
  SN-Net's wrapped ``end_features[-1]``), ``[X, 1]·A ≈ Y``, W = A[:-1]ᵀ, b = A[-1], in float64.
  A layer shared by a window gets the mean of its pairs' solutions (SN-Net's rule,
  ``share=window``); ``share=pair`` gives every configuration its own least-squares layer.
  On real weights the mean is a poor map before fine-tuning (all-MiniLM-L6-v2 self-stitched:
  the window-shared consistent cuts fall to ~0 embedding cosine, per-pair layers keep them
  near 1; benchmarks/stitch.py), so ``pair`` is the choice when there is no training.
* **Layers**: ``kind=linear`` over the last dimension of ``[..., C]`` activations;
  ``conv1x1`` over the channels of ``[B, C, H, W]``; ``lora`` (SN-Netv2) is ``linear`` plus a
  rank-``lora_rank`` update ``(x Aᵀ) Bᵀ`` with B = 0, so it starts at the least-squares map.
* **Run-time choice**: the program is a chain of ``cond(config == k, route_k, ...)``; every
  route is built from copies of the anchors' pieces (prologue, blocks, stitching layer,
  head) whose first node is marked ``part_start``, so the ``branches`` pass makes each piece
  one part shared by every route that runs it, and the host compares ``config`` itself.
  Switching configuration changes the path through the host program, never a weight. A
  ``config`` outside ``[0, n)`` yields NaN outputs (the chain's last ``else``).

Invariants (tests): configurations that are one anchor equal that anchor exactly; least
squares between identical features gives W = I, b = 0; the counts follow SN-Net's rule;
switching configuration never changes weights; :func:`select_config` gives a static program
equal to the stitched one at that configuration.
"""

from __future__ import annotations

import copy as _copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError, PipelineError
from splice.ir import meta as M
from splice.ir.program import Program, build_graph_module, get_attr_path
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.registry import register_pass

aten = torch.ops.aten
COND = torch.ops.higher_order.cond
KINDS = ("linear", "conv1x1", "lora")
SHARES = ("window", "pair")

# -- blocks -----------------------------------------------------------------------------


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


def _block_prefix(program: Program) -> str:
    """The module path whose integer-indexed children are the most repeated *same* blocks:
    children ``0..n-1`` that run the same sequence of ops (a ``Sequential`` stem of conv,
    norm and activation has indexed children too, but they are not repeats)."""
    sigs: dict[str, dict[int, list[Any]]] = {}
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        parts = M.loc(n).module_path.split(".")
        for k, p in enumerate(parts):
            if p.isdigit():
                sigs.setdefault(".".join(parts[:k]), {}).setdefault(int(p), []).append(n.target)
    best, best_score = "", 0
    for prefix, by_index in sigs.items():
        if set(by_index) != set(range(len(by_index))):
            continue
        counts: dict[tuple, int] = {}
        for ops in by_index.values():
            counts[tuple(map(str, ops))] = counts.get(tuple(map(str, ops)), 0) + 1
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


# -- enumeration and least squares -----------------------------------------------------


def paired_stitching(
    depth: int, window: int = 2, stride: int = 1
) -> tuple[list[tuple[int, int]], list[int]]:
    """SN-Net's paired stitching for two anchors of equal ``depth``: the (front block j,
    end block m) pairs and, per pair, its stitching layer (one per window with new pairs)."""
    if window < 1 or stride < 1:
        raise PassError(f"window and stride must be >= 1, got window={window} stride={stride}")
    pairs: list[tuple[int, int]] = []
    layer_of: list[int] = []
    layer = -1
    for start in range(0, depth, stride):
        ids = list(range(start, min(start + window, depth)))
        new = [(j, m) for j in ids for m in ids if (j, m) not in pairs]
        if new:
            layer += 1
            pairs.extend(new)
            layer_of.extend([layer] * len(new))
    return pairs, layer_of


def unpaired_stitching(front_depth: int, end_depth: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Different depths: front block j to the end block at the same relative depth."""
    pairs = []
    for j in range(front_depth - 1):
        m = round((j + 1) * end_depth / front_depth)
        if 0 < m < end_depth and (j, m) not in pairs:
            pairs.append((j, m))
    return pairs, list(range(len(pairs)))


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ‖[x, 1]·[Wᵀ; b] − y‖ (rows are samples), in float64."""
    if x.shape[0] != y.shape[0]:
        raise PassError(
            f"least squares needs as many rows in X ({x.shape[0]}) as in Y ({y.shape[0]})"
        )
    xt = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    a = torch.linalg.lstsq(xt, y.double(), driver="gelsd").solution
    return a[:-1].T.contiguous(), a[-1].contiguous()


def _rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    if channel_dim == 1:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


# -- the stitched program ---------------------------------------------------------------


@dataclass
class Config:
    """One configuration: an anchor alone, or front anchor's blocks 0..j → layer → end
    anchor's blocks m.. and head."""

    index: int
    anchor: int | None = None
    front: int | None = None
    end: int | None = None
    cut: tuple[int, int] | None = None
    layer: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index}
        if self.anchor is not None:
            d["anchor"] = self.anchor
        else:
            d.update(front=self.front, end=self.end, cut=list(self.cut or ()), layer=self.layer)
        return d

    def describe(self, names: Sequence[str]) -> str:
        if self.anchor is not None:
            return f"{names[self.anchor]}"
        j, m = self.cut or (0, 0)
        return f"{names[self.front]}[0..{j}] → {names[self.end]}[{m}..]"


@dataclass
class _Anchor:
    program: Program
    blocks: Blocks
    prefix: str  # weight name prefix in the stitched program
    nodes: dict[str, fx.Node] = field(default_factory=dict)


@dataclass
class StitchResult:
    program: Program
    configs: list[Config]
    stats: dict[str, Any]


def stitch_programs(
    anchors: Sequence[Program],
    calib: Sequence[Sequence[torch.Tensor]],
    *,
    window: int = 2,
    stride: int = 1,
    kind: str = "linear",
    lora_rank: int = 8,
    share: str = "window",
    names: Sequence[str] | None = None,
) -> StitchResult:
    """Stitch ``anchors`` (smallest first after sorting by FLOPs) into one program whose
    configuration is its ``config`` input; least squares on ``calib`` inputs."""
    from splice.passes.analysis.cost import cost_model

    if len(anchors) < 2:
        raise PassError(f"stitch needs two or more anchors, got {len(anchors)}")
    if kind not in KINDS:
        raise PassError(f"unknown stitching layer kind {kind!r}", hint=f"kinds: {', '.join(KINDS)}")
    if not calib:
        raise PassError("stitch needs calibration inputs for the least-squares initialisation")
    if share not in SHARES:
        raise PassError(f"unknown share={share!r}", hint=f"share: {', '.join(SHARES)}")
    first = anchors[0]
    for k, a in enumerate(anchors):
        if a.input_names != first.input_names or a.input_specs != first.input_specs:
            raise PassError(
                f"anchor {k} ({a.name}) takes {a.input_names} {a.input_specs}, anchor 0 takes "
                f"{first.input_names} {first.input_specs}",
                hint="anchors of one family take the same inputs",
            )
        if a.output_specs != first.output_specs:
            raise PassError(
                f"anchor {k} ({a.name}) returns {a.output_specs}, anchor 0 returns "
                f"{first.output_specs}",
                hint="stitched routes end in one anchor's head: the heads must agree",
            )
        if "config" in a.input_names:
            raise PassError(f"anchor {k} already has an input named 'config'")
    flops = [cost_model(a).total.flops for a in anchors]
    order = sorted(range(len(anchors)), key=lambda k: flops[k])
    names = list(names or [a.name for a in anchors])
    if len(set(names)) < len(names):
        names = [f"{n}#{k}" for k, n in enumerate(names)]
    names = [names[k] for k in order]
    anc = [_Anchor(anchors[k], find_blocks(anchors[k]), f"a{i}") for i, k in enumerate(order)]
    for a in anc:
        a.nodes = {n.name: n for n in a.program.graph.nodes}
    kind_needed = "conv1x1" if anc[0].blocks.channel_dim == 1 else "linear"
    if kind == "conv1x1" and kind_needed != "conv1x1":
        raise PassError("kind=conv1x1 stitches [B, C, H, W] activations; these are [..., C]")
    if kind == "linear" and kind_needed == "conv1x1":
        kind = "conv1x1"
    feats = [_boundary_features(a, calib) for a in anc]

    configs = [Config(i, anchor=i) for i in range(len(anc))]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    n_layers = 0
    for f in range(len(anc) - 1):
        e = f + 1
        lf, le = anc[f].blocks.depth, anc[e].blocks.depth
        pairs, layer_of = (
            paired_stitching(lf, window, stride) if lf == le else unpaired_stitching(lf, le)
        )
        if share == "pair":
            layer_of = list(range(len(pairs)))
        sols: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (j, m), li in zip(pairs, layer_of):
            x, y = feats[f][j + 1], feats[e][m]
            if x.shape[:-1] != y.shape[:-1]:
                raise PassError(
                    f"cannot stitch {names[f]} block {j} ({list(x.shape)}) to {names[e]} block "
                    f"{m} ({list(y.shape)}): token or spatial counts differ",
                )
            sols.setdefault(li, []).append(
                least_squares(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
            )
        for li, ss in sols.items():
            w = torch.stack([s[0] for s in ss]).mean(0).float()
            b = torch.stack([s[1] for s in ss]).mean(0).float()
            key = f"stitch.{f}_{e}.{li}"
            layers[key] = {"weight": w, "bias": b}
            if kind == "lora":
                g = torch.Generator().manual_seed(li)
                r = max(1, min(lora_rank, *w.shape))
                layers[key]["lora_a"] = torch.randn(r, w.shape[1], generator=g) / math.sqrt(
                    w.shape[1]
                )
                layers[key]["lora_b"] = torch.zeros(w.shape[0], r)
        n_layers += len(sols)
        for (j, m), li in zip(pairs, layer_of):
            configs.append(
                Config(len(configs), front=f, end=e, cut=(j, m), layer=f"stitch.{f}_{e}.{li}")
            )

    program = _build(anc, configs, layers, kind)
    program.attrs["stitch"] = {
        "anchors": names,
        "depths": [a.blocks.depth for a in anc],
        "kind": kind,
        "configs": [c.to_json() for c in configs],
    }
    stats = {
        "anchors": len(anc),
        "configs": len(configs),
        "stitching_layers": n_layers,
        "depths": [a.blocks.depth for a in anc],
        "block_prefixes": [a.blocks.prefix for a in anc],
        "kind": kind,
        "share": share,
    }
    return StitchResult(program, configs, stats)


def _boundary_features(a: _Anchor, calib: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Boundary activations of ``a`` on ``calib``, channels last, concatenated over samples."""
    p = a.program.copy()
    for i, name in enumerate(a.blocks.boundary):
        p.add_output(f"__boundary_{i}", p.node(name))
    n_out = len(a.program.output_names)
    per: list[list[torch.Tensor]] = [[] for _ in a.blocks.boundary]
    with torch.no_grad():
        for sample in calib:
            outs = p.run(*sample)[n_out:]
            for i, t in enumerate(outs):
                per[i].append(t.movedim(1, -1) if a.blocks.channel_dim == 1 else t)
    return [torch.cat(ts, dim=0) for ts in per]


class _RouteBuilder:
    """Copies anchor pieces into one graph; weights are placeholders named after them."""

    def __init__(self, g: fx.Graph, inputs: dict[str, fx.Node], weight: Any):
        self.g = g
        self.inputs = inputs
        self.weight = weight  # weight name -> node in g

    def copy(self, a: _Anchor, names: Sequence[str], env: dict[str, fx.Node]) -> None:
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

            new = self.g.node_copy(src, arg)
            new.meta = dict(src.meta)
            if not started:
                new.meta["part_start"] = True
                started = True
            env[name] = new

    def needed(self, a: _Anchor, outputs: Sequence[str], stop: set[str]) -> list[str]:
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


def _route(b: _RouteBuilder, anc: list[_Anchor], c: Config, layers, kind: str) -> list[fx.Node]:
    if c.anchor is not None:
        a = anc[c.anchor]
        env: dict[str, fx.Node] = {}
        bl = a.blocks
        for piece in [bl.prologue, *bl.blocks, bl.epilogue]:
            b.copy(a, piece, env)
        outs = a.program.output_values
        return [env[o.name] if o.name in env else b.inputs[o.name] for o in outs]
    f, e = anc[c.front], anc[c.end]
    j, m = c.cut
    envf: dict[str, fx.Node] = {}
    # piece by piece, as in the anchor's own route, so that the parts are shared with it
    for piece in [f.blocks.prologue, *f.blocks.blocks[: j + 1]]:
        b.copy(f, piece, envf)
    x = envf[f.blocks.boundary[j + 1]]
    h = _stitch_layer(b, x, c.layer, layers[c.layer], kind)
    enve: dict[str, fx.Node] = {e.blocks.boundary[m]: h}
    if e.blocks.side:
        b.copy(e, b.needed(e, e.blocks.side, set()), enve)
    for blk in e.blocks.blocks[m:]:
        b.copy(e, blk, enve)
    b.copy(e, e.blocks.epilogue, enve)
    return [enve[o.name] for o in e.program.output_values]


def _stitch_layer(b: _RouteBuilder, x: fx.Node, key: str, ws: dict, kind: str) -> fx.Node:
    """The stitching layer ``key`` applied to ``x``; its nodes start a part of their own."""
    g = b.g
    xs = M.spec(x)
    c_out, c_in = ws["weight"].shape
    loc = M.Loc(module_path=key, from_passes=("stitch",))
    made: list[fx.Node] = []

    def call(target: Any, args: tuple, shape: Sequence[int]) -> fx.Node:
        n = g.call_function(target, args)
        M.set_spec(n, M.TensorSpec(tuple(shape), xs.dtype))
        M.set_loc(n, loc)
        made.append(n)
        return n

    w, bias = b.weight(f"{key}.weight"), b.weight(f"{key}.bias")
    if kind == "conv1x1":
        w3 = call(aten.unsqueeze.default, (w, -1), (c_out, c_in, 1))
        w4 = call(aten.unsqueeze.default, (w3, -1), (c_out, c_in, 1, 1))
        y = call(aten.conv2d.default, (x, w4, bias), (xs.shape[0], c_out, *xs.shape[2:]))
    else:
        out_shape = (*xs.shape[:-1], c_out)
        y = call(aten.linear.default, (x, w, bias), out_shape)
        if kind == "lora":
            la, lb = b.weight(f"{key}.lora_a"), b.weight(f"{key}.lora_b")
            r = ws["lora_a"].shape[0]
            low = call(aten.linear.default, (x, la), (*xs.shape[:-1], r))
            up = call(aten.linear.default, (low, lb), out_shape)
            y = call(aten.add.Tensor, (y, up), out_shape)
    made[0].meta["part_start"] = True
    return y


def _build(anc: list[_Anchor], configs: list[Config], layers, kind: str) -> Program:
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
    out_specs = first.output_specs

    # weights each route reads, and the union over the routes from k on
    used: list[list[str]] = []
    for c in configs:
        g = fx.Graph()
        ins = {n: g.placeholder(n) for n in input_specs}
        seen: list[str] = []

        def wt(name: str, g: fx.Graph = g, seen: list[str] = seen) -> fx.Node:
            if name not in seen:
                seen.append(name)
            return g.placeholder("w_" + name.replace(".", "__"))

        _route(_RouteBuilder(g, ins, _memo(wt)), anc, c, layers, kind)
        used.append(seen)
    tails: list[list[str]] = [[] for _ in configs]
    acc: list[str] = []
    for k in range(len(configs) - 1, -1, -1):
        acc = list(dict.fromkeys(used[k] + acc))
        tails[k] = acc

    subs: dict[str, fx.GraphModule] = {}

    def level(
        k: int, g: fx.Graph, ins: dict[str, fx.Node], wnodes: dict[str, fx.Node]
    ) -> list[fx.Node]:
        """Graph code choosing among configs k.. given inputs and weight nodes in ``g``."""
        if k == len(configs):
            outs = []
            for s in out_specs:
                n = g.call_function(
                    aten.full.default, (list(s.shape), float("nan")), {"dtype": s.dtype}
                )
                M.set_spec(n, s)
                M.set_loc(n, M.Loc(module_path="stitch", from_passes=("stitch",)))
                outs.append(n)
            return outs
        pred = g.call_function(aten.eq.Scalar, (ins["config"], k))
        M.set_spec(pred, M.TensorSpec((), torch.bool))
        M.set_loc(pred, M.Loc(module_path="stitch", from_passes=("stitch",)))
        operands = [*input_specs, *tails[k]]
        branch_graphs = []
        for which in ("then", "else"):
            bg = fx.Graph()
            b_ins = {}
            b_w = {}
            for name in operands:
                if name in input_specs:
                    ph = bg.placeholder(name)
                    M.set_spec(ph, input_specs[name])
                    b_ins[name] = ph
                else:
                    ph = bg.placeholder("w_" + name.replace(".", "__"))
                    t = weights[name][0]
                    M.set_spec(ph, M.TensorSpec(tuple(t.shape), t.dtype))
                    b_w[name] = ph
                M.set_loc(ph, M.UNKNOWN_LOC)
            if which == "then":
                outs = _route(
                    _RouteBuilder(bg, b_ins, b_w.__getitem__), anc, configs[k], layers, kind
                )
            else:
                outs = level(k + 1, bg, b_ins, b_w)
            bg.output(tuple(outs))
            ref = f"config_{k}_{which}"
            children = {
                n.target: subs[n.target] for n in bg.find_nodes(op="get_attr") if n.target in subs
            }
            subs[ref] = build_graph_module(bg, {}, children, class_name="SubGraph")
            branch_graphs.append(ref)
        refs = []
        for ref in branch_graphs:
            r = g.get_attr(ref)
            M.set_spec(r, M.GraphRefSpec(ref))
            M.set_loc(r, M.UNKNOWN_LOC)
            refs.append(r)
        ops = tuple(ins[n] if n in input_specs else wnodes[n] for n in operands)
        cond = g.call_function(COND, (pred, refs[0], refs[1], ops))
        M.set_spec(cond, M.TupleSpec(tuple(out_specs)))
        M.set_loc(cond, M.Loc(module_path="stitch", from_passes=("stitch",)))
        outs = []
        for i, s in enumerate(out_specs):
            gi = g.call_function(operator.getitem, (cond, i))
            M.set_spec(gi, s)
            M.set_loc(gi, M.UNKNOWN_LOC)
            outs.append(gi)
        return outs

    top = fx.Graph()
    tins = {}
    for name, s in input_specs.items():
        ph = top.placeholder(name)
        M.set_spec(ph, s)
        M.set_loc(ph, M.UNKNOWN_LOC)
        tins[name] = ph
    tw = {}
    for name in tails[0]:
        n = top.get_attr(name)
        t = weights[name][0]
        M.set_spec(n, M.TensorSpec(tuple(t.shape), t.dtype))
        M.set_loc(n, M.UNKNOWN_LOC)
        tw[name] = n
    outs = level(0, top, tins, tw)
    top.output(tuple(outs))
    nested = {k: v for k, v in subs.items() if k.startswith("config_0_")}
    kept = {w: weights[w] for w in tails[0]}
    gm = build_graph_module(top, kept, nested, class_name="Program_stitched")
    return Program(
        gm,
        output_names=first.output_names,
        weight_kinds={w: k for w, (_, k) in kept.items()},
        name="stitched_" + "_".join(a.program.name for a in anc),
    )


def _memo(fn):
    cache: dict[str, fx.Node] = {}

    def get(name: str) -> fx.Node:
        if name not in cache:
            cache[name] = fn(name)
        return cache[name]

    return get


# -- choosing one configuration statically ----------------------------------------------


def select_config(program: Program, index: int, *, input: str = "config") -> Program:
    """The static program of configuration ``index``: every ``cond(input == k)`` is decided
    and its chosen branch inlined; ``input`` is no longer a program input."""
    if input not in program.input_names:
        raise PassError(
            f"program {program.name!r} has no input {input!r}",
            hint="select a configuration of a program made by the stitch pass",
        )
    n_configs = len(program.attrs.get("stitch", {}).get("configs", [])) or None
    if n_configs is not None and not 0 <= index < n_configs:
        raise PassError(f"configuration {index} does not exist (0..{n_configs - 1})")
    weights = program.weight_kinds
    g = fx.Graph()
    top_env: dict[fx.Node, Any] = {}
    for ph in program.input_nodes:
        if ph.name == input:
            top_env[ph] = ("config", None)
            continue
        new = g.placeholder(ph.name)
        new.meta = _copy.copy(ph.meta)
        top_env[ph] = new
    used: set[str] = set()

    def inline(gm: fx.GraphModule, env: dict[fx.Node, Any]) -> list[Any]:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "get_attr":
                child = get_attr_path(gm, n.target)
                if isinstance(child, fx.GraphModule):
                    env[n] = child
                    continue
                if n.target not in weights:
                    raise PassError(f"unknown weight @{n.target}")
                new = g.get_attr(n.target)
                new.meta = _copy.copy(n.meta)
                used.add(n.target)
                env[n] = new
                continue
            if n.op == "output":
                return [env[a] for a in n.args[0]]
            if n.target is aten.eq.Scalar and env.get(n.args[0]) == ("config", None):
                env[n] = ("decided", index == n.args[1])
                continue
            if n.target is COND and isinstance(env.get(n.args[0]), tuple):
                taken = env[n.args[0]][1]
                sub = env[n.args[1] if taken else n.args[2]]
                phs = [p for p in sub.graph.nodes if p.op == "placeholder"]
                inner = dict(zip(phs, (env[o] for o in n.args[3])))
                env[n] = inline(sub, inner)
                continue
            if n.target is operator.getitem and isinstance(env.get(n.args[0]), list):
                env[n] = env[n.args[0]][n.args[1]]
                continue
            if any(isinstance(env.get(a), tuple) for a in n.all_input_nodes):
                raise PassError(
                    f"input {input!r} is used by %{n.name} ({n.target}), not only by "
                    f"{input} == k branches",
                    where=f"node %{n.name}",
                )
            new = g.node_copy(n, lambda a: env[a])
            env[n] = new
        raise PassError("a graph has no output")

    outs = inline(program.graph_module, top_env)
    g.output(tuple(outs))
    kept = {
        w: (program.get_weight(w), program.weight_kind(w))
        for w in program.weight_kinds
        if w in used
    }
    gm = build_graph_module(g, kept, {}, class_name=f"Program_{program.name}_config{index}")
    return Program(
        gm,
        output_names=program.output_names,
        weight_kinds={w: k for w, (_, k) in kept.items()},
        name=f"{program.name}_config{index}",
    )


@register_pass
@dataclass(frozen=True)
class Stitch(Pass):
    """SN-Net stitching of the pipeline's program with ``anchors`` (module docstring).

    ``anchors``: ``|``-separated names of programs in the pass context
    (``PassContext(programs={...})``) or saved program folders. Least squares uses the first
    ``calib_samples`` calibration inputs of the context. The result takes an extra input
    ``config``; NumericCheck compares configuration 0 (the smallest anchor)."""

    name = "stitch"
    semantics = "approximate"
    summary = "stitch a model family into one program with run-time configurations (SN-Net)"

    anchors: str = ""
    window: int = 2
    stride: int = 1
    calib_samples: int = 16
    kind: str = "linear"
    lora_rank: int = 8
    share: str = "window"

    def validate(self) -> None:
        if not self.anchors:
            raise PipelineError(
                "stitch needs anchors=NAME|PATH, the other members of the model family",
                hint="e.g. stitch{anchors=small.program} or PassContext(programs={'small': p})",
            )
        if self.kind not in KINDS:
            raise PipelineError(
                f"stitch: unknown kind {self.kind!r}", hint=f"kinds: {', '.join(KINDS)}"
            )
        if self.share not in SHARES:
            raise PipelineError(
                f"stitch: unknown share {self.share!r}", hint=f"share: {', '.join(SHARES)}"
            )
        if self.window < 1 or self.stride < 1 or self.calib_samples < 1 or self.lora_rank < 1:
            raise PipelineError("stitch: window, stride, calib_samples and lora_rank must be >= 1")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from splice.ir.serialize import load

        others = []
        for ref in (a for a in self.anchors.split("|") if a):
            if ref in ctx.programs:
                others.append(ctx.programs[ref])
            else:
                try:
                    others.append(load(ref))
                except Exception as e:
                    raise PassError(
                        f"stitch: anchor {ref!r} is neither a program in the pass context nor a "
                        f"saved program ({e})",
                        hint="save it with splice.save or pass PassContext(programs={...})",
                    ) from e
        calib = ctx.calibration[: self.calib_samples]
        if not calib:
            raise PassError(
                "stitch needs calibration inputs for its least-squares initialisation",
                hint="give sample or calibration inputs to the pipeline (--samples on the CLI)",
            )
        ctx.progress("stitching", 0, 1)
        r = stitch_programs(
            [program, *others], calib, window=self.window, stride=self.stride, kind=self.kind,
            lora_rank=self.lora_rank, share=self.share,
        )  # fmt: skip
        ctx.progress("stitching", 1, 1)
        return PassResult(
            r.program, True, r.stats, sample_inputs_for_new_inputs={"config": torch.tensor(0)}
        )


__all__ = [
    "Blocks",
    "Config",
    "Stitch",
    "StitchResult",
    "find_blocks",
    "least_squares",
    "paired_stitching",
    "select_config",
    "stitch_programs",
    "unpaired_stitching",
]
