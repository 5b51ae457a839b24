"""Feed-forward blocks (FFNs) in a program, in every graph: the recogniser that ``experts``
(and any later pass on FFNs) uses.

Recognition
    An FFN is ``Linear → φ → Linear`` or a gated ``act(x W_gᵀ) ⊙ (x W_uᵀ) → W_d``
    (SwiGLU/GeGLU), with or without biases. Linears are the sites of
    :mod:`splice.passes.linears` (``aten.linear``, ``aten.addmm`` — GPT-2's ``Conv1D``,
    weight stored transposed — or ``aten.matmul``/``aten.mm`` with a 2-D parameter, and
    ``splice::lowrank_linear``, the Linear W = A·B it stands for). Starting from each
    Linear D, the values feeding its input are followed back through element-wise ops
    (``torch.Tag.pointwise``, not in place), views that keep the last dimension, identity
    casts and eval-mode dropout, up to the Linears they start from. The FFN matches when
    that region reads one or two Linears of the same input x (and constant scalars) and
    nothing else, its values are used only inside the FFN, the weights are not shared
    (tied) except by the same layer in other graphs, and the hidden width d_ff is larger
    than x's width (and a multiple of ``num_experts`` when :func:`recognise` is given one). The element-wise function is then identified by
    evaluating the region on probe values (a grid over [-12, 12] and random values) against
    the activations ``splice::moe_ffn`` knows (:data:`splice.ir.ops.MOE_ACTIVATIONS`: relu,
    gelu, gelu_tanh — GPT-2's decomposed ``gelu_new`` —, silu, sigmoid, tanh, quick_gelu,
    relu2), to 1e-5 relative; for a gated region both operand orders are tried. Candidates
    that come close (a nonlinearity between Linears) and do not match are returned as
    :class:`Miss` with the reason. Existing routed experts (``splice::moe_ffn``, and
    transformers' ``grouped_mm`` custom ops in Mixtral/Qwen2-MoE) are listed apart.

Where: in every graph of the program — the top graph, ``cond`` branches
(``capture_dynamic``), ``branches`` parts and ``stitch`` routes; inside a sub-graph the
weights are placeholders followed to the program's weights
(:class:`splice.passes.subgraphs.GraphTree`). The same FFN on several paths is one
:class:`FFNMatch` per occurrence; :meth:`FFNMatch.weight_names` groups them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from splice.ir import meta as M
from splice.ir.ops import MOE_ACTIVATIONS, moe_ffn
from splice.ir.program import Program
from splice.passes.linears import (
    LinearSite,
    find_factored_linears,
    find_linears,
    linear_readers,
)
from splice.passes.subgraphs import GraphTree

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default}
# element-wise ops whose presence between two Linears makes a near miss worth reporting
_NONLINEAR = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "erf", "mish", "hardtanh", "leaky_relu",
    "elu", "softplus", "hardswish", "hardsigmoid", "relu6", "selu", "celu", "glu",
}  # fmt: skip
_MAX_REGION = 64
_PROBE_TOL = 1e-5


@dataclass
class FFNMatch:
    """A recognised FFN: ``down(φ(up(x)))`` or ``down(act(gate(x)) ⊙ up(x))``."""

    name: str  # the module path common to its Linears
    x: fx.Node
    up: LinearSite  # W_in: the plain FFN's first Linear, or the gated FFN's linear branch
    gate: LinearSite | None  # W_gate: the activated branch of a gated FFN
    down: LinearSite
    act: str
    region: list[fx.Node]  # the element-wise nodes between the Linears (graph order)
    d_model: int
    d_ff: int
    d_out: int
    path: str = ""  # the graph it is in ("" for the top graph)
    gm: fx.GraphModule | None = None  # that graph's module (None: the top graph)

    @property
    def sites(self) -> list[LinearSite]:
        return [s for s in (self.gate, self.up, self.down) if s is not None]

    @property
    def factored(self) -> bool:
        return any(s.factors is not None for s in self.sites)

    @property
    def form(self) -> str:
        return "gated" if self.gate is not None else "plain"

    @property
    def where(self) -> str:
        """Where this occurrence is: its down Linear's node (``path:%node`` in a sub-graph)."""
        return self.down.site

    def weight_names(self, tree: GraphTree) -> list[str]:
        """The weights the FFN reads: its Linears' weights (or factors) and their biases."""
        out = []
        for site in self.sites:
            out.extend(site.weights)
            b = tree.weight_of(site.bias)
            if b is not None:
                out.append(b)
        return out


@dataclass
class Miss:
    candidate: str
    node: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"candidate": self.candidate, "node": self.node, "reason": self.reason}


@dataclass
class Recognition:
    matches: list[FFNMatch] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    existing: list[dict[str, str]] = field(default_factory=list)


def _last_dim(n: Any) -> int | str | None:
    s = M.get_spec(n) if isinstance(n, fx.Node) else None
    return s.shape[-1] if isinstance(s, M.TensorSpec) and s.shape else None


def _shape(n: fx.Node) -> tuple[Any, ...] | None:
    s = M.get_spec(n)
    return tuple(s.shape) if isinstance(s, M.TensorSpec) else None


def _opname(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    return getattr(t, "__name__", str(t))


def _node_args(n: fx.Node) -> list[Any]:
    out: list[Any] = []
    for a in (*n.args, *n.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _is_scalar_constant(tree: GraphTree, a: fx.Node) -> bool:
    s = M.get_spec(a)
    return (
        tree.weight_of(a) is not None
        and isinstance(s, M.TensorSpec)
        and s.is_static
        and s.numel() == 1
    )


def _classify(tree: GraphTree, n: fx.Node) -> tuple[str, list[fx.Node]] | str:
    """``(kind, tensor operands to follow)`` for an allowed region node, else a reason."""
    if n.op == "placeholder" and (w := tree.weight_of(n)) is not None:
        return f"reads weight @{w}"
    if n.op == "placeholder":
        return f"reads {'program' if tree.is_top(n) else 'sub-graph'} input %{n.name}"
    if n.op == "get_attr":
        return f"reads weight @{n.target}"
    if n.op != "call_function":
        return f"%{n.name} ({n.op}) is not an element-wise op"
    t = n.target
    name = _opname(n)
    if t in _VIEWS:
        src = n.args[0]
        if _last_dim(src) != _last_dim(n):
            return f"%{n.name} ({name}) changes the last dimension"
        return "view", [src]
    if t in _CASTS:
        src = n.args[0]
        s_in, s_out = M.get_spec(src), M.get_spec(n)
        if not (isinstance(s_in, M.TensorSpec) and isinstance(s_out, M.TensorSpec)):
            return f"%{n.name} ({name}) has no tensor spec"
        if s_in.dtype != s_out.dtype:
            return f"%{n.name} ({name}) casts {s_in.dtype} to {s_out.dtype} inside the FFN"
        return "identity", [src]
    if t is aten.dropout.default:
        train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", False)
        if train:
            return f"%{n.name} (dropout in training mode) is random"
        return "identity", [n.args[0]]
    if t is operator.getitem and isinstance(n.args[0], fx.Node):
        src = n.args[0]
        return (
            f"%{n.name} takes a piece of %{src.name} ({_opname(src)}), which is not "
            "element-wise: a fused projection split in pieces (gate and up in one Linear) is "
            "not supported"
        )
    if not isinstance(t, torch._ops.OpOverload) or torch.Tag.pointwise not in t.tags:
        return f"%{n.name} ({name}) is not element-wise"
    if t._schema.is_mutable:
        return f"%{n.name} ({name}) works in place"
    if torch.Tag.nondeterministic_seeded in t.tags:
        return f"%{n.name} ({name}) is random"
    shape = _shape(n)
    follow: list[fx.Node] = []
    for a in _node_args(n):
        if not isinstance(a, fx.Node):
            continue
        if _is_scalar_constant(tree, a):
            continue
        if _shape(a) != shape:
            return f"%{n.name} ({name}) broadcasts %{a.name} of shape {_shape(a)} against {shape}"
        follow.append(a)
    return "pointwise", follow


@dataclass
class _Trace:
    region: list[fx.Node] = field(default_factory=list)
    leaves: list[fx.Node] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    nonlinear: bool = False


def _trace(tree: GraphTree, z: fx.Node, site_nodes: set[fx.Node]) -> _Trace:
    """The element-wise region feeding ``z``, back to the Linears it starts from."""
    tr = _Trace()
    seen: set[fx.Node] = set()
    stack = [z]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in site_nodes:
            tr.leaves.append(n)
            continue
        c = _classify(tree, n)
        if isinstance(c, str):
            tr.failures.append(c)
            continue
        kind, follow = c
        tr.region.append(n)
        if kind == "pointwise" and _opname(n).split(".")[-1] in _NONLINEAR:
            tr.nonlinear = True
        if len(tr.region) > _MAX_REGION:
            tr.failures.append(f"more than {_MAX_REGION} element-wise nodes between Linears")
            break
        stack.extend(follow)
    return tr


def _probe_values(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-12.0, 12.0, n).reshape(shape)
    return [grid, torch.randn(shape, generator=g) * 3.0, torch.randn(shape, generator=g) * 0.5]


def _eval_region(
    tree: GraphTree, region: list[fx.Node], env: dict[fx.Node, torch.Tensor]
) -> dict[fx.Node, torch.Tensor]:
    env = dict(env)
    for n in region:  # graph order

        def val(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a in env:
                    return env[a]
                if (w := tree.weight_of(a)) is not None:
                    return tree.program.get_weight(w)
                raise KeyError(a.name)
            if isinstance(a, (list, tuple)):
                return type(a)(val(x) for x in a)
            return a

        args = [val(a) for a in n.args]
        kwargs = {k: val(v) for k, v in n.kwargs.items()}
        env[n] = n.target(*args, **kwargs)
    return env


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or not torch.isfinite(a).all():
        return False
    tol = max(_PROBE_TOL, 4 * torch.finfo(a.dtype).eps)
    return bool(((a - b).abs() <= tol * (1.0 + b.abs())).all())


def _identify(
    tree: GraphTree, region: list[fx.Node], z: fx.Node, leaves: list[fx.Node]
) -> tuple[str, int | None] | str:
    """``(activation, index of the activated leaf or None)`` or a reason."""
    shapes = [_shape(v) for v in leaves]
    if any(s is None or not all(isinstance(d, int) for d in s) for s in shapes):
        if any(n.target in _VIEWS for n in region):
            return "symbolic shapes: the element-wise region cannot be evaluated on probes"
        shapes = [(4096,)] * len(leaves)  # no views: any shape evaluates the same function
    with torch.no_grad():
        probes = [
            [p.to(M.spec(v).dtype) for p in _probe_values(tuple(s), seed=i + 1)]
            for i, (v, s) in enumerate(zip(leaves, shapes))
        ]
        trials = [(probes[0][j],) if len(leaves) == 1 else (probes[0][j], probes[1][j])
                  for j in range(3)]  # fmt: skip
        outs = []
        for t in trials:
            env = _eval_region(tree, region, dict(zip(leaves, t)))
            outs.append(env[z].reshape(t[0].shape) if z in env else t[0])
        # compare on at most 16384 values of each probe, spread over its whole range
        step = max(1, outs[0].numel() // 16384)
        outs = [o.flatten()[::step] for o in outs]
        trials = [tuple(v.flatten()[::step] for v in t) for t in trials]
        for name, fn in MOE_ACTIVATIONS.items():
            if len(leaves) == 1:
                if all(_close(o, fn(t[0])) for o, t in zip(outs, trials)):
                    return name, None
            else:
                for g in (0, 1):
                    if all(_close(o, fn(t[g]) * t[1 - g]) for o, t in zip(outs, trials)):
                        return name, g
    form = "act(h)" if len(leaves) == 1 else "act(g) ⊙ u"
    return (
        f"the element-wise function between the Linears is not {form} for a known activation "
        f"({', '.join(MOE_ACTIVATIONS)})"
    )


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    if len(out) == len(parts[0]) and len(parts) > 1:
        out = out[:-1]
    return ".".join(out) or names[0]


def _match(
    tree: GraphTree,
    down: LinearSite,
    by_node: dict[fx.Node, LinearSite],
    num_experts: int | None,
) -> FFNMatch | Miss | None:
    """The FFN ending in Linear ``down``, a near miss with its reason, or None (not an FFN)."""
    z = down.x
    d_ff = _last_dim(z)
    tr = _trace(tree, z, set(by_node))
    leaves = [by_node[v] for v in tr.leaves]
    name = _common_prefix([s.layer for s in [*leaves, down]]) if leaves else down.layer

    def miss(reason: str) -> Miss:
        return Miss(name, down.node.name, reason)

    if tr.failures:  # reported when a nonlinearity between Linears makes it look like an FFN
        return miss(tr.failures[0]) if tr.nonlinear and (leaves or tr.region) else None
    if not leaves:
        return None
    if len(leaves) > 2:
        return miss(f"{len(leaves)} Linears feed the element-wise region (one or two expected)")
    if not tr.region and len(leaves) == 1:
        return None  # Linear → Linear: not an FFN, and nothing to report
    xs = {s.x for s in leaves}
    if len(xs) != 1:
        inputs = ", ".join("%" + s.x.name for s in leaves)
        return miss(f"the gate and up Linears read different inputs ({inputs})")
    x = leaves[0].x
    if any(_last_dim(s.node) != d_ff for s in leaves):
        return miss("the Linears' widths do not match the down projection's input")
    inside = set(tr.region) | {s.node for s in leaves}
    leak = next(
        ((v, u) for v in inside for u in v.users if u not in inside and u is not down.node),
        None,
    )
    if leak is not None:
        return miss(f"%{leak[0].name} is also used outside the FFN (by %{leak[1].name})")
    # a weight may be read by the same layer on other paths, in other graphs (one group of
    # occurrences, checked by the pass), but by nothing else
    shared = []
    for s in [*leaves, down]:
        for w in s.weights:
            same = {
                o.node
                for o in by_node.values()
                if w in o.weights and (o is s or o.node.graph is not s.node.graph)
            }
            if linear_readers(tree, w) - same:
                shared.append(s.layer)
                break
    if shared:
        return miss(f"weight shared with other nodes (tied): {', '.join(shared)}")
    region = [n for n in down.node.graph.nodes if n in set(tr.region)]
    ident = _identify(tree, region, z, tr.leaves)
    if isinstance(ident, str):
        return miss(ident)
    act, g_idx = ident
    if g_idx is None:
        up, gate = leaves[0], None
    else:
        gate, up = leaves[g_idx], leaves[1 - g_idx]
    d_model, d_out = _last_dim(x), _last_dim(down.node)
    if not all(isinstance(v, int) for v in (d_model, d_ff, d_out)):
        return miss("symbolic feature widths")
    if d_ff <= d_model:
        return miss(
            f"d_ff = {d_ff} is not larger than the input width {d_model}: not an expanding FFN"
        )
    if num_experts is not None and d_ff % num_experts:
        return miss(f"d_ff = {d_ff} is not a multiple of num_experts = {num_experts}")
    if not M.spec(x).dtype.is_floating_point:
        return miss("the FFN input is not floating point")
    return FFNMatch(name, x, up, gate, down, act, region, d_model, d_ff, d_out, down.path, down.gm)


def recognise(
    program: Program, num_experts: int | None = None, tree: GraphTree | None = None
) -> Recognition:
    """Every FFN of ``program`` (in every graph: branches, parts, routes; Linears dense or
    already factored by ``lowrank``), near misses with reasons, and existing routed experts."""
    rec = Recognition()
    tree = tree or GraphTree(program)
    sites = find_linears(program, tree) + find_factored_linears(program, tree)
    by_node = {s.node: s for s in sites}
    for path, gm in tree.graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is moe_ffn.overload:
                rec.existing.append({
                    "node": f"{path}:{n.name}" if path else n.name, "op": _opname(n),
                    "module": M.loc(n).module_path or "",
                    "reason": "already routed experts (splice::moe_ffn); left unchanged",
                })  # fmt: skip
            elif n.op == "call_function" and "grouped_mm" in _opname(n):
                rec.existing.append({
                    "node": n.name, "op": _opname(n), "module": M.loc(n).module_path or "",
                    "reason": "already routed experts (an opaque grouped matmul); left unchanged",
                })  # fmt: skip
    for down in sites:
        found = _match(tree, down, by_node, num_experts)
        if isinstance(found, FFNMatch):
            rec.matches.append(found)
        elif isinstance(found, Miss):
            rec.misses.append(found)
    return rec


__all__ = ["FFNMatch", "Miss", "Recognition", "recognise"]
