"""``experts``: factor each dense FFN into a routed mixture of E experts of disjoint neurons.

Papers: MoEfication (Zhang et al., 2022: FFNs of a dense model split into experts by
balanced k-means on weight rows or by co-activation graph partitioning; a router
initialised from the cluster centroids, optionally trained on the experts' activations),
FactorLLM (Zhao et al., 2024: E/k output scaling, hard top-k masks), LLaMA-MoE (Zhu et al.,
2024: gate/up rows and down columns sliced with the same index set), and "Harder Tasks Need
More Experts: Dynamic Routing in MoE Models" (Huang et al., 2024: top-p routing).

Recognition
    An FFN is ``Linear → φ → Linear`` or a gated ``act(x W_gᵀ) ⊙ (x W_uᵀ) → W_d``
    (SwiGLU/GeGLU), with or without biases. Linears are ``aten.linear``, ``aten.addmm``
    (GPT-2's ``Conv1D``, weight stored transposed) or ``aten.matmul``/``aten.mm`` with a 2-D
    parameter (:func:`splice.passes.lowrank.find_linears`). Starting from each Linear D, the
    values feeding its input are followed back through element-wise ops (``torch.Tag.
    pointwise``, not in place), views that keep the last dimension, identity casts and
    eval-mode dropout, up to the Linears they start from. The FFN matches when that region
    reads one or two Linears of the same input x (and constant scalars) and nothing else,
    its values are used only inside the FFN, the weights are not shared (tied), and the
    hidden width d_ff is a multiple of E and larger than x's width. The element-wise
    function is then identified by evaluating the region on probe values (a grid over
    [-12, 12] and random values) against the activations ``splice::moe_ffn`` knows
    (:data:`splice.ir.ops.MOE_ACTIVATIONS`: relu, gelu, gelu_tanh — GPT-2's decomposed
    ``gelu_new`` —, silu, sigmoid, tanh, quick_gelu, relu2), to 1e-5 relative; for a gated
    region both operand orders are tried. Candidates that come close (a nonlinearity between
    Linears) and do not match are listed with the reason in ``stats["not_matched"]`` and as
    ``remarks`` (printed by ``PrintIR``, e.g. ``splice opt --print-ir-after-change``).
    Existing routed experts (transformers' ``grouped_mm`` custom ops in Mixtral/Qwen2-MoE)
    are left as they are and listed in ``stats["existing_experts"]``.

Where FFNs are found: in every graph of the program — the top graph, ``cond`` branches
(``capture_dynamic``), ``branches`` parts and ``stitch`` routes. Inside a sub-graph the
weights are placeholders bound to operands of the call; they are followed to the program's
weights (:class:`splice.passes.subgraphs.GraphTree`). The same FFN (the same weights) on
several paths is split **once**: one partition and router (calibration rows of all its
occurrences pooled), one set of expert weights threaded into every sub-graph that reads
them, and the dense weights leave the program. An FFN whose weights are also read by
anything else is listed in ``stats["skipped"]`` with the reason; FFNs that ``targets`` /
``exclude`` leave out are listed in ``stats["not_targeted"]``.

Factored FFNs (``lowrank`` before ``experts``): a ``splice::lowrank_linear(x, A, B)`` is the
Linear W = A·B it stands for, so an FFN of them is recognised too, and split without
undoing the factorisation. The up projection's hidden units are the rows of its A
(W_in[S_e] = A_u[S_e]·B_u), so the experts read x' = x·B_uᵀ (one shared k-wide projection,
weight ``{ffn}.experts.lowrank_B``) and expert e holds rows S_e of A_u; for a gated FFN with
both projections factored x' = x·[B_g; B_u]ᵀ and the experts' rows are [A_g[S_e], 0] and
[0, A_u[S_e]] (when k_g + k_u ≥ d_model, or only one is factored, the expert slices are
stored dense, A·B rows, which is then smaller). The down projection's hidden units are the
columns of its B (W_out[:, S_e] = A_d·B_d[:, S_e]), so expert e holds columns S_e of B_d
and A_d (``{ffn}.experts.lowrank_A``) is applied once to the experts' sum, then the bias.
Both keep the contract: with every expert selected the output equals the factored FFN.
Partition and router are computed on the effective rows A·B; the router reads x' with
r_e·P = c_e (c_e lies in P's row space), so r_e·x' = c_e·x and top-k selects what the
dense-equivalent router selects (softmax probabilities are those of the normalised x').
Weights named ``*.lowrank_A``/``*.lowrank_B`` are factors: a later ``lowrank`` leaves them.

Partition (``split``) of the d_ff neurons into E disjoint sets of s = d_ff/E:

* ``balanced_kmeans`` (MoEfication's parameter clustering): k-means on the L2-normalised
  rows of W_in (of W_gate for a gated FFN: the rows whose activation decides sparsity),
  k-means++ initialisation, assignment under the capacity s by rounds of proposals (each
  unassigned neuron proposes to its nearest open cluster; a cluster keeps its nearest
  proposers up to capacity), 3 seeded restarts, the lowest inertia kept;
* ``coactivation`` (MoEfication's co-activation graph): M = |a| per calibration token,
  each token's row scaled to unit norm; edge weights A = MᵀM (zero diagonal); a balanced
  partition maximising the weight inside parts: balanced k-means on the neurons'
  normalised activation profiles, then Kernighan–Lin pair swaps between parts while a swap
  raises the inside weight (METIS is not a dependency);
* ``contiguous`` (FactorLLM): S_e = [e·s, (e+1)·s).

Expert e is rows S_e of W_in (and W_gate, b_in, b_gate) and columns S_e of W_out; b_out
is added once, outside the experts.

Router (``router``): logits = x̂·Rᵀ + b with x̂ = x/‖x‖ (as MoEfication's MLP router).

* ``centroid``: R_e = γ·c_e, c_e the mean of the normalised rows (of the clustered matrix)
  in S_e, b = 0 — MoEfication's similarity routing; γ sets the softmax temperature (top-k
  does not depend on it): 1/std of the centroid scores on calibration data, √d without;
* ``trained``: starting from the centroid router, a linear router trained with Adam
  (``lr``, ``epochs``, mini-batches of 512, seeded) on the calibration activations to
  predict each expert's activation mass with binary cross-entropy on logits, the target
  t_e = m_e / max_e' m_e' per token, m_e = Σ_{i∈S_e} |a_i| (a_i: the neuron's output after
  the activation and gate, i.e. what W_out reads). MoEfication's ``MLPCenter`` puts a Tanh
  and an E×E layer after the first layer; splice keeps one linear layer (one E×d product
  at decode) — a documented simplification.

Selection: ``top_k=k`` or ``top_p=p`` (keep experts, by descending probability, through the
first whose cumulative probability exceeds p); gates ``unit`` (hard 0/1 mask, the dense FFN
restricted to the selected experts) or ``prob`` (the raw softmax probability, not
renormalised); ``scale=e_over_k`` multiplies the expert sum by E / (experts selected).
The exact rule is :func:`splice.ir.ops.moe_gates`.

Calibration (``ctx.calibration``, needed by ``split=coactivation`` and ``router=trained``;
used when present for γ and the coverage statistics): the FFN inputs and the activations
W_out reads, at most ``calib_samples`` token rows per FFN (evenly spaced).

Stats: per FFN its form, activation, widths, experts, expert size, router kind,
parameters, and — with calibration data — the activation mass the router's selection
covers (mean over tokens of Σ_selected m_e / Σ m_e), the best any selection of as many
experts could cover (oracle top-k), and the mean number of experts selected.

Invariants (tests/test_experts.py): with every expert selected and unit gates (top_k = E)
the program equals the dense one to 1e-5 (GPT-2, LLaMA, BERT, ViT); the partition is
disjoint, covering and balanced, and gate/up/down use the same index set; the top-p count
is ≥ 1 and never falls as p grows; P = [.5, .3, .15, .05] keeps 1 expert at p = 0.4 and 2
at p = 0.6; the parameter count grows only by the router. ``semantics = "approximate"``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx

from splice.errors import PassError, PipelineError
from splice.ir import meta as M
from splice.ir.ops import MOE_ACTIVATIONS, lowrank_linear, moe_ffn, moe_gates
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.lowrank import LinearSite, _transpose_of, find_linears, matches
from splice.passes.registry import register_pass
from splice.passes.subgraphs import GraphTree, collect_activations

aten = torch.ops.aten
Split = Literal["balanced_kmeans", "coactivation", "contiguous"]
Router = Literal["centroid", "trained"]
Scale = Literal["none", "e_over_k"]
Gates = Literal["unit", "prob"]

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default}
# element-wise ops whose presence between two Linears makes a near miss worth reporting
_NONLINEAR = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "erf", "mish", "hardtanh", "leaky_relu",
    "elu", "softplus", "hardswish", "hardsigmoid", "relu6", "selu", "celu", "glu",
}  # fmt: skip
_MAX_REGION = 64
_PROBE_TOL = 1e-5


# ---------------------------------------------------------------------------------------
# recognition


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
        for w in site_weights(s):
            same = {
                o.node
                for o in by_node.values()
                if w in site_weights(o) and (o is s or o.node.graph is not s.node.graph)
            }
            if tree.readers(w, through=lambda u: _transpose_of(u) is not None) - same:
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


def site_weights(s: LinearSite) -> tuple[str, ...]:
    """The weights a linear site reads: W, or A and B of a factored layer."""
    return s.factors if s.factors is not None else (s.weight,)


def find_factored_linears(program: Program, tree: GraphTree) -> list[LinearSite]:
    """Every ``splice::lowrank_linear`` of every graph whose factors are parameters, as a
    linear site (the FFN recognition treats a factored Linear as the Linear it stands for)."""
    out = []
    for path, gm in tree.graphs:
        for n in gm.graph.find_nodes(op="call_function", target=lowrank_linear.overload):
            x = n.args[0]
            a, b = tree.weight_of(n.args[1]), tree.weight_of(n.args[2])
            if not isinstance(x, fx.Node) or a is None or b is None:
                continue
            if program.weight_kind(a) != "param" or program.weight_kind(b) != "param":
                continue
            bias = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
            rank = n.args[4] if len(n.args) > 4 else n.kwargs.get("rank")
            layer = a.removesuffix(".lowrank_A")
            out.append(
                LinearSite(
                    n, x, a, False, bias, layer, path, None if path == "" else gm,
                    factors=(a, b), rank=None if rank is None else int(rank),
                )
            )  # fmt: skip
    return out


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


# ---------------------------------------------------------------------------------------
# partitions


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign N points to E clusters of at most ``capacity`` by rounds of proposals: every
    unassigned point proposes to its cheapest open cluster; each cluster keeps its cheapest
    proposers up to what it has left. Returns the cluster of each point [N]."""
    N, E = cost.shape
    if capacity * E < N:
        raise PassError(f"cannot assign {N} points to {E} clusters of {capacity}")
    assign = torch.full((N,), -1, dtype=torch.long)
    left = torch.full((E,), capacity, dtype=torch.long)
    while True:
        free = (assign < 0).nonzero().flatten()
        if free.numel() == 0:
            return assign
        c = cost[free].clone()
        c[:, left == 0] = math.inf
        choice = c.argmin(1)
        for e in choice.unique().tolist():
            who = free[choice == e]
            order = cost[who, e].argsort(stable=True)
            take = who[order[: int(left[e])]]
            assign[take] = e
            left[e] -= take.numel()


def balanced_kmeans(
    V: torch.Tensor, E: int, *, seed: int = 0, iters: int = 30, n_init: int = 3
) -> torch.Tensor:
    """Balanced k-means of the rows of ``V`` [N, D] into E clusters of N/E (MoEfication's
    ParamSplit); returns the cluster of each row [N]. Deterministic for a seed (float32:
    the clustering does not need more)."""
    V = V.detach().float()
    N = V.shape[0]
    cap = N // E
    g = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor] | None = None
    sq = (V * V).sum(1)
    for _ in range(n_init):
        # k-means++ seeding
        first = int(torch.randint(N, (1,), generator=g))
        C = [V[first]]

        def dist2(c: torch.Tensor) -> torch.Tensor:  # ‖v − c‖² for every row, one GEMV
            return sq - 2 * (V @ c) + c @ c

        d2 = dist2(V[first])
        for _ in range(1, E):
            w = d2.clamp_min(0)
            nxt = (
                int(torch.multinomial(w / w.sum(), 1, generator=g))
                if float(w.sum()) > 0
                else int(torch.randint(N, (1,), generator=g))
            )
            C.append(V[nxt])
            d2 = torch.minimum(d2, dist2(V[nxt]))
        cent = torch.stack(C)
        assign = None
        inertia = math.inf
        for _ in range(iters):
            cost = sq[:, None] - 2 * V @ cent.T + (cent * cent).sum(1)[None, :]
            new = balanced_assign(cost, cap)
            moved = N if assign is None else int((new != assign).sum())
            assign = new
            counts = torch.bincount(assign, minlength=E).clamp_min(1)[:, None].to(V.dtype)
            cent = torch.zeros_like(cent).index_add_(0, assign, V) / counts
            # Σ‖v − c_a(v)‖² = Σ‖v‖² − Σ_e |S_e|·‖c_e‖² when c_e is the mean of S_e
            prev, inertia = inertia, float(sq.sum() - (counts[:, 0] * (cent * cent).sum(1)).sum())
            # converged: at most 0.5% of the points moved, or the inertia fell by < 1e-4
            if moved <= N // 200 or prev - inertia < 1e-4 * abs(inertia):
                break
        if best is None or inertia < best[0]:
            best = (inertia, assign)
    return best[1]


def coactivation_partition(
    acts: torch.Tensor, E: int, *, seed: int = 0, sweeps: int = 8
) -> torch.Tensor:
    """Balanced partition of the co-activation graph of ``acts`` [T, N] (see the module
    docstring); returns the part of each neuron [N].

    Kernighan–Lin refinement, batched: for each pair of parts the neurons of each side are
    sorted by the gain of moving to the other; the r-th best of each side are swapped while
    gain_i + gain_j − 2·A_ij > 0, then the inside weight is recomputed exactly and the batch
    is undone if it did not rise. Sizes never change (swaps), so balance is kept.
    """
    Mx = acts.detach().float().abs()
    Mx = Mx / Mx.norm(dim=1, keepdim=True).clamp_min(1e-12)
    profiles = Mx.T / Mx.T.norm(dim=1, keepdim=True).clamp_min(1e-12)
    part = balanced_kmeans(profiles, E, seed=seed)
    A = (Mx.T @ Mx).double()
    A.fill_diagonal_(0)
    G = A @ torch.nn.functional.one_hot(part, E).double()  # [N, E] weight to each part
    for _ in range(sweeps):
        improved = False
        for p in range(E):
            for q in range(p + 1, E):
                ip = (part == p).nonzero().flatten()
                iq = (part == q).nonzero().flatten()
                gp = G[ip, q] - G[ip, p]
                gq = G[iq, p] - G[iq, q]
                op, oq = gp.argsort(descending=True), gq.argsort(descending=True)
                i, j = ip[op], iq[oq]
                gain = gp[op] + gq[oq] - 2 * A[i, j]
                m = int((gain > 1e-12).int().cumprod(0).sum())
                before = float(G[ip, p].sum() + G[iq, q].sum())
                while m > 0:  # the batch, else halves of it (one swap alone always gains)
                    new = part.clone()
                    new[i[:m]], new[j[:m]] = q, p
                    np_, nq = (new == p).nonzero().flatten(), (new == q).nonzero().flatten()
                    Gp, Gq = A[:, np_].sum(1), A[:, nq].sum(1)
                    if float(Gp[np_].sum() + Gq[nq].sum()) > before + 1e-9:
                        part, G[:, p], G[:, q] = new, Gp, Gq
                        improved = True
                        break
                    m //= 2
        if not improved:
            break
    return part


def parts_of(assign: torch.Tensor, E: int) -> list[torch.Tensor]:
    """The sorted neuron indices of each part."""
    return [(assign == e).nonzero().flatten().sort().values for e in range(E)]


def inside_weight(A: torch.Tensor, assign: torch.Tensor) -> float:
    """Σ over parts of the edge weight between neurons of the same part."""
    same = assign[:, None] == assign[None, :]
    return float((A * same).sum() - A.diagonal().sum())


# ---------------------------------------------------------------------------------------
# routers


def expert_mass(acts: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """m [T, E]: Σ_{i∈S_e} |a_i| per token."""
    a = acts.abs()
    return torch.stack([a[:, idx].sum(1) for idx in parts], dim=1)


def centroids(rows: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """c_e = mean of the L2-normalised rows in S_e [E, d]."""
    r = rows.double()
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.stack([r[idx].mean(0) for idx in parts])


def train_router(
    xn: torch.Tensor,
    target: torch.Tensor,
    W0: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A linear router (W, b) from (W0, 0) trained with BCE-with-logits on ``target`` [T, E]
    in [0, 1]; returns W, b and the last epoch's mean loss."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(W0.float().clone())
    b = torch.nn.Parameter(torch.zeros(W0.shape[0]))
    opt = torch.optim.Adam([W, b], lr=lr)
    X, Y = xn.float(), target.float()
    threads = torch.get_num_threads()
    # hundreds of steps on [512, d] x [d, E] products: one thread is faster than a team
    # whose start-up and barriers dominate such small ops (restored afterwards)
    torch.set_num_threads(1)
    try:
        return _train(X, Y, W, b, opt, g, epochs=epochs, batch=batch)
    finally:
        torch.set_num_threads(threads)


def _train(
    X: torch.Tensor,
    Y: torch.Tensor,
    W: torch.nn.Parameter,
    b: torch.nn.Parameter,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
    *,
    epochs: int,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    loss_sum = 0.0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(X.shape[0], generator=g)
            loss_sum, steps = 0.0, 0
            for i in range(0, X.shape[0], batch):
                sel = order[i : i + batch]
                logits = torch.nn.functional.linear(X[sel], W, b)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, Y[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += loss.item()
                steps += 1
            loss_sum /= max(steps, 1)
    return W.detach(), b.detach(), loss_sum


# ---------------------------------------------------------------------------------------
# the pass


@register_pass
@dataclass(frozen=True)
class Experts(Pass):
    """Factor dense FFNs into routed experts of disjoint neurons (see the module docstring)."""

    name = "experts"
    semantics = "approximate"
    summary = "split FFNs into a routed mixture of disjoint-neuron experts (MoEfication)"

    num_experts: int = 8
    top_k: int | None = None
    top_p: float | None = None
    split: Split = "balanced_kmeans"
    router: Router = "centroid"
    calib_samples: int = 4096
    scale: Scale = "none"
    gates: Gates = "unit"
    targets: str = "*"
    exclude: str = ""
    epochs: int = 30
    lr: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        if self.num_experts < 2:
            raise PipelineError(
                f"experts: num_experts must be at least 2, got {self.num_experts}",
                hint="e.g. experts{num_experts=8,top_k=2}",
            )
        if (self.top_k is None) == (self.top_p is None):
            given = [k for k in ("top_k", "top_p") if getattr(self, k) is not None]
            raise PipelineError(
                f"experts needs exactly one of top_k, top_p, got {given or 'neither'}",
                hint="e.g. experts{num_experts=8,top_k=2} or experts{num_experts=8,top_p=0.4}",
            )
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise PipelineError(
                f"experts: top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise PipelineError(f"experts: top_p must be in (0, 1], got {self.top_p}")
        if self.calib_samples < 1:
            raise PipelineError(
                f"experts: calib_samples must be at least 1, got {self.calib_samples}"
            )
        if self.epochs < 0 or not self.lr > 0:
            raise PipelineError(
                f"experts: epochs must be >= 0 and lr > 0, got epochs={self.epochs}, lr={self.lr}"
            )

    # -- run -------------------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        E = self.num_experts
        tree = GraphTree(program)
        rec = recognise(program, E, tree)
        chosen = [m for m in rec.matches if matches(m.name, self.targets, self.exclude)]
        remarks = [f"experts: {m.candidate} (at %{m.node}) not matched: {m.reason}"
                   for m in rec.misses]  # fmt: skip
        remarks += [
            f"experts: {e['module'] or e['node']} (%{e['node']}, {e['op']}): {e['reason']}"
            for e in rec.existing
        ]
        skipped: list[dict[str, Any]] = []
        base = {
            "not_matched": [m.to_json() for m in rec.misses],
            "existing_experts": rec.existing,
            "not_targeted": sorted({m.name for m in rec.matches} - {m.name for m in chosen}),
            "skipped": skipped,
            "remarks": remarks,
        }
        # the same FFN (the same weights) on several paths is one group, split once
        groups: dict[tuple[str, ...], list[FFNMatch]] = {}
        for m in chosen:
            groups.setdefault(tuple(_weight_names(tree, m)), []).append(m)
        todo: list[list[FFNMatch]] = []
        for occ in groups.values():
            nodes = {s.node for m in occ for s in m.sites}
            tied = [
                w for s in occ[0].sites for w in site_weights(s)
                if tree.readers(w, through=lambda u: _transpose_of(u) is not None) - nodes
            ]  # fmt: skip
            if tied:
                skipped.append({
                    "ffn": occ[0].name, "sites": [_where(m) for m in occ],
                    "reason": f"weight shared with other nodes (tied): {', '.join(tied)}",
                })  # fmt: skip
                continue
            todo.append(occ)
        if not todo:
            if not rec.matches:
                why = "no FFN (Linear → activation → Linear, or gated) found"
            elif not chosen:
                why = f"no FFN matches targets={self.targets!r}"
            else:
                why = "every FFN skipped"
            return PassResult(program, False, {"changed": False, "reason": why, **base})

        needs_calib = self.split == "coactivation" or self.router == "trained"
        acts = None
        if ctx.calibration:
            values = tuple(sorted(
                {(m.path, m.x.name) for g in todo for m in g}
                | {(m.path, m.down.x.name) for g in todo for m in g}
            ))  # fmt: skip
            acts = ctx.analysis(collect_activations, program, values=values, stats=("raw",))
        elif needs_calib:
            what = "split=coactivation" if self.split == "coactivation" else "router=trained"
            raise PassError(
                f"experts{{{what}}} needs calibration activations, and no sample inputs were given",
                hint="pass sample_inputs=[...] (Python) or use a saved program with samples "
                "(CLI); split=balanced_kmeans|contiguous with router=centroid need none",
            )

        ffns: list[dict[str, Any]] = []
        replaced: set[str] = set()
        ctx.progress("experts: splitting FFNs", 0, len(todo))
        for i, occ in enumerate(todo):
            X = A = None
            if acts is not None:
                seen = [m for m in occ if acts[(m.path, m.x.name)].count > 0]
                if seen:
                    X, A = self._rows(
                        torch.cat([acts[(m.path, m.x.name)].matrix() for m in seen]),
                        torch.cat([acts[(m.path, m.down.x.name)].matrix() for m in seen]),
                    )
            if X is None and needs_calib:
                skipped.append({
                    "ffn": occ[0].name, "sites": [_where(m) for m in occ],
                    "reason": "needs calibration activations and no sample runs it "
                    "(its branch is never taken)",
                })  # fmt: skip
                continue
            ffns.append(self._replace(program, tree, occ, X, A))
            replaced.update(_weight_names(tree, occ[0]))
            ctx.progress("experts: splitting FFNs", i + 1, len(todo))
        if not ffns:
            return PassResult(
                program, False, {"changed": False, "reason": "every FFN skipped", **base}
            )
        tree.prune(replaced)
        _drop_weights(program, replaced)
        sizes = sorted({f["expert_size"] for f in ffns})
        covered = [f["mass_covered"] for f in ffns if "mass_covered" in f]
        stats: dict[str, Any] = {
            "changed": True,
            "ffns_split": len(ffns),
            "ffn_sites": sum(len(f["sites"]) for f in ffns),
            "ffn_sites_in_subgraphs": sum(
                1 for f in ffns for site in f["sites"] if not site.startswith("%")
            ),
            "experts": E,
            "expert_size": sizes[0] if len(sizes) == 1 else sizes,
            "router": self.router,
            "split": self.split,
            "selection": f"top_k={self.top_k}" if self.top_k is not None else f"top_p={self.top_p}",
            "params_before": sum(f["params_before"] for f in ffns),
            "params_after": sum(f["params_after"] for f in ffns),
        }
        if covered:
            stats["mass_covered"] = round(sum(covered) / len(covered), 4)
            stats["mass_covered_oracle"] = round(
                sum(f["mass_covered_oracle"] for f in ffns if "mass_covered_oracle" in f)
                / len(covered),
                4,
            )
            stats["experts_selected_mean"] = round(
                sum(f["experts_selected_mean"] for f in ffns if "experts_selected_mean" in f)
                / len(covered),
                3,
            )
        else:
            stats["mass_covered"] = "no calibration data"
        stats["ffns"] = ffns
        stats.update(base)
        return PassResult(program, True, stats)

    def _rows(self, X: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``calib_samples`` rows, evenly spaced (deterministic)."""
        n_rows = X.shape[0]
        if n_rows > self.calib_samples:
            idx = torch.linspace(0, n_rows - 1, self.calib_samples).round().long()
            X, A = X[idx], A[idx]
        return X.detach().float(), A.detach().float()

    # -- one FFN -------------------------------------------------------------------------------
    def _matrices(
        self, program: Program, s: LinearSite
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W [out, in] as the site computes it, A, B): A and B are the factors of a
        ``lowrank_linear`` site (W = A·B, its rank argument applied), else None."""
        if s.factors is not None:
            a = program.get_weight(s.factors[0]).detach()
            b = program.get_weight(s.factors[1]).detach()
            if s.rank is not None:
                a, b = a[:, : s.rank], b[: s.rank]
            return (a.double() @ b.double()).to(a.dtype), a, b
        w = program.get_weight(s.weight).detach()
        return (w.mT if s.transposed else w), None, None

    def _partition(
        self, W_cluster: torch.Tensor, A: torch.Tensor | None, d_ff: int
    ) -> torch.Tensor:
        E = self.num_experts
        if self.split == "contiguous":
            return torch.arange(d_ff) // (d_ff // E)
        if self.split == "coactivation":
            assert A is not None
            return coactivation_partition(A, E, seed=self.seed)
        rows = W_cluster.double()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return balanced_kmeans(rows, E, seed=self.seed)

    def _replace(
        self,
        program: Program,
        tree: GraphTree,
        occ: list[FFNMatch],
        X: torch.Tensor | None,
        A: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Split the FFN of ``occ`` (one FFN, possibly on several paths) once and replace
        every occurrence by the same ``moe_ffn`` (see the module docstring for a factored
        FFN)."""
        m = occ[0]
        E, d_ff, d = self.num_experts, m.d_ff, m.d_model
        s = d_ff // E
        W_in, Au, Bu = self._matrices(program, m.up)  # [d_ff, d]
        W_gate, Ag, Bg = (
            self._matrices(program, m.gate) if m.gate is not None else (None, None, None)
        )
        W_out, Ad, Bd = self._matrices(program, m.down)  # [d_out, d_ff]
        dtype = W_in.dtype
        # the experts' input: x itself, or x·Pᵀ when the up (and gate) projections are
        # factored (W = A·P): then the experts' rows are the neuron rows of A
        P: torch.Tensor | None = None
        Win_p, Wg_p = W_in, W_gate
        note = None
        if m.gate is None and Au is not None:
            P, Win_p = Bu, Au
        elif m.gate is not None and Au is not None and Ag is not None:
            kg, ku = Ag.shape[1], Au.shape[1]
            if kg + ku < d:
                P = torch.cat([Bg, Bu])
                Wg_p = torch.cat([Ag, Ag.new_zeros(d_ff, ku)], 1)
                Win_p = torch.cat([Au.new_zeros(d_ff, kg), Au], 1)
            else:
                note = (
                    f"gate and up ranks {kg}+{ku} >= d_model {d}: their expert slices are "
                    "stored dense (A·B rows), cheaper than the stacked factors"
                )
        elif Au is not None or Ag is not None:
            note = "only one of gate/up is factored: their expert slices are stored dense"
        # the down projection: W_out = A_d·B_d; the experts take columns of B_d and A_d is
        # applied once to their sum (Σ_e a_e B_d[:, S_e]ᵀ) A_dᵀ = a W_outᵀ
        Wout_p, post = (Bd, Ad) if Ad is not None else (W_out, None)
        W_cluster = W_gate if W_gate is not None else W_in  # the rows the FFN computes
        assign = self._partition(W_cluster, A, d_ff)
        parts = parts_of(assign, E)
        if sorted(int(p.numel()) for p in parts) != [s] * E:  # the contract, checked
            raise PassError(
                f"experts: the {self.split} partition of {m.name} is not balanced "
                f"({[int(p.numel()) for p in parts]}, expected {E} × {s})"
            )
        perm = torch.cat(parts)

        def bias(site: LinearSite) -> torch.Tensor | None:
            b = site.bias
            if b is None:
                return None
            w = tree.weight_of(b)
            if w is None:
                raise PassError(
                    f"experts: the bias of {site.layer} is computed (%{b.name}), not a weight",
                    where=str(M.loc(site.node)),
                )
            return program.get_weight(w).detach()

        b_in = bias(m.up)
        b_gate = bias(m.gate) if m.gate is not None else None

        # router: centroids c_e of the normalised rows; with a projection, r_e with r_e·P =
        # c_e (c_e lies in P's row space), so r_e·(x Pᵀ) = c_e·x and top-k picks the same
        C = centroids(W_cluster, parts)  # [E, d]
        if P is not None:
            rows_p = (Wg_p if W_gate is not None else Win_p).double()
            norms = W_cluster.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
            C = torch.stack([(rows_p[idx] / norms[idx]).mean(0) for idx in parts])
            if X is not None:
                X = X.double() @ P.double().T
        gamma, router_note = math.sqrt(C.shape[1]), "γ = √d (no calibration data)"
        xn = mass = None
        if X is not None and A is not None:
            xn = X.double() / X.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
            scores = xn @ C.T
            sd = float(scores.std())
            if sd > 0:
                gamma, router_note = 1.0 / sd, "γ = 1/std of the centroid scores (calibration)"
            mass = expert_mass(A, parts)
        R = (gamma * C).to(dtype)
        Rb = None
        train_loss = None
        if self.router == "trained":
            assert xn is not None and mass is not None
            target = mass / mass.max(1, keepdim=True).values.clamp_min(1e-12)
            Rw, Rb, train_loss = train_router(
                xn, target, R.float(), epochs=self.epochs, lr=self.lr, seed=self.seed
            )
            R, Rb = Rw.to(dtype), Rb.to(dtype)

        def stack(W: torch.Tensor) -> torch.Tensor:  # rows S_e of W [d_ff, n] -> [E, s, n]
            return W[perm].reshape(E, s, W.shape[1]).to(dtype).contiguous()

        prefix = f"{m.name}.experts"
        tensors: dict[str, torch.Tensor | None] = {
            "router_w": R.contiguous(),
            "router_b": Rb.contiguous() if Rb is not None else None,
            "w_in": stack(Win_p),
            "b_in": b_in[perm].reshape(E, s).contiguous() if b_in is not None else None,
            "w_gate": stack(Wg_p) if Wg_p is not None else None,
            "b_gate": b_gate[perm].reshape(E, s).contiguous() if b_gate is not None else None,
            "w_out": stack(Wout_p.T),  # columns S_e of W_out (or B_d), transposed
            # factors kept outside the experts: named as lowrank's factors, so a later
            # lowrank pass knows them as factors and leaves them alone
            "lowrank_B": P.to(dtype).contiguous() if P is not None else None,
            "lowrank_A": post.to(dtype).contiguous() if post is not None else None,
        }
        names: dict[str, str] = {}
        for key, t in tensors.items():
            if t is not None:
                names[key] = program.unique_weight_name(f"{prefix}.{key}")
                program.add_weight(names[key], t, "param")
        for o in occ:
            self._rewrite(tree, o, names)

        params_before = sum(
            int(program.get_weight(w).numel())
            for w in _weight_names(tree, m)
            if w not in {tree.weight_of(m.down.bias)}
        )
        rec: dict[str, Any] = {
            "ffn": m.name,
            "sites": [_where(o) for o in occ],
            "form": m.form,
            "act": m.act,
            "bias": b_in is not None,
            "linears": [x.layer for x in (m.gate, m.up, m.down) if x is not None],
            "d_model": d,
            "d_ff": d_ff,
            "d_out": m.d_out,
            "experts": E,
            "expert_size": s,
            "router": self.router,
            "router_temperature": router_note,
            "params_before": params_before,
            "params_after": sum(int(t.numel()) for t in tensors.values() if t is not None),
            "active_fraction": (self.top_k / E) if self.top_k else None,
        }
        if m.factored:
            rec["factored"] = {
                "gate": Ag is not None,
                "up": Au is not None,
                "down": Ad is not None,
                "expert_input_width": int(P.shape[0]) if P is not None else d,
            }
            if P is not None:
                rec["router_input"] = (
                    "x·Pᵀ (the up projection's factor output): top-k picks the experts the "
                    "dense-equivalent centroid router picks; probabilities are those of x·Pᵀ"
                )
            if note:
                rec["factored"]["note"] = note
        if train_loss is not None:
            rec["router_bce"] = round(train_loss, 5)
        if xn is not None and mass is not None:
            gates = moe_gates(
                X.to(dtype), R, Rb, self.top_k or 0, float(self.top_p or 0.0), "none", False
            )
            sel = gates > 0
            total = mass.sum(1).clamp_min(1e-12)
            rec["mass_covered"] = round(float(((mass * sel).sum(1) / total).mean()), 4)
            k_sel = sel.sum(1)
            top = mass.sort(1, descending=True).values
            ranks = torch.arange(E)[None, :] < k_sel[:, None]
            rec["mass_covered_oracle"] = round(float(((top * ranks).sum(1) / total).mean()), 4)
            rec["experts_selected_mean"] = round(float(k_sel.double().mean()), 3)
            rec["calibration_rows"] = int(X.shape[0])
        return rec

    def _rewrite(self, tree: GraphTree, m: FFNMatch, names: dict[str, str]) -> None:
        """Replace one occurrence of an FFN by ``moe_ffn`` on the weights ``names``."""
        rw = tree.rewriter(m.gm if m.gm is not None else tree.top, self.name)

        def w(key: str) -> fx.Node | None:
            return rw.weight(names[key]) if key in names else None

        # operands as the graph has them now: an FFN fed by an FFN replaced before it reads
        # that FFN's new output, not its erased down Linear (``m.x`` is from recognition)
        x_now = m.up.current_x()
        with rw.at(m.down.node):
            if "lowrank_B" in names:
                x_now = rw.call(aten.linear.default, (x_now, w("lowrank_B")), name="moe_proj")
            post = w("lowrank_A")
            args = [
                x_now, w("router_w"), w("router_b"), w("w_in"), w("b_in"), w("w_gate"),
                w("b_gate"), w("w_out"), m.down.current_bias() if post is None else None,
                m.act, self.top_k or 0, float(self.top_p or 0.0), self.scale, self.gates == "prob",
            ]  # fmt: skip
            new = rw.call(moe_ffn.overload, args, name="moe_ffn")
            if post is not None:
                new = rw.call(
                    aten.linear.default, (new, post, m.down.current_bias()), name="moe_out"
                )
            out_shape = _shape(m.down.node)
            if _shape(new) != out_shape:
                new = rw.call(aten.reshape.default, (new, list(out_shape)), name="moe_ffn_view")
        down_args = list(m.down.node.args)
        rw.replace(m.down.node, new)
        self._erase_ffn(rw, m, down_args)

    def _erase_ffn(self, rw: Rewriter, m: FFNMatch, down_args: list[Any]) -> None:
        """Erase the region, the replaced Linears and the transposes of their weights (the
        down Linear itself is already replaced)."""
        doomed: list[fx.Node] = [*reversed(m.region)]
        transposes = [a for a in down_args if isinstance(a, fx.Node) and _transpose_of(a)]
        for site in (m.up, m.gate):
            if site is not None:
                doomed.append(site.node)
                transposes += [
                    a for a in site.node.args if isinstance(a, fx.Node) and _transpose_of(a)
                ]
        for n in [*doomed, *transposes]:
            if not n.users:
                rw.erase(n)


def _where(m: FFNMatch) -> str:
    """Where an FFN occurrence is: its down Linear's node (``path:%node`` in a sub-graph)."""
    return m.down.site


def _weight_names(tree: GraphTree, m: FFNMatch) -> list[str]:
    """The weights an FFN reads (its Linears' weights or factors, and their biases)."""
    out = []
    for site in m.sites:
        out.extend(site_weights(site))
        b = tree.weight_of(site.bias)
        if b is not None:
            out.append(b)
    return out


def _drop_weights(program: Program, names: set[str]) -> None:
    """Drop the replaced FFNs' weights that nothing reads any more (other unread weights
    of the program are not this pass's business)."""
    graph = program.graph
    for n in list(graph.find_nodes(op="get_attr")):
        if n.target in names and not n.users:
            graph.erase_node(n)
    read = {n.target for n in graph.find_nodes(op="get_attr")}
    for w in sorted(names - read):
        if program.has_weight(w):
            program.remove_weight(w)


__all__ = [
    "Experts",
    "FFNMatch",
    "balanced_assign",
    "balanced_kmeans",
    "centroids",
    "coactivation_partition",
    "expert_mass",
    "inside_weight",
    "parts_of",
    "recognise",
    "train_router",
]
