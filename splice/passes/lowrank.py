"""``lowrank``: factor Linear weights W (m×n) into A (m×k) · B (k×n) for low-rank decoding.

Papers: SVD-LLM (Wang et al., 2024: truncation-aware data whitening), ASVD (Yuan et al.,
2023: activation-aware SVD), Maestro (Horváth et al., 2024: ordered, nested low rank), TRP
and BitStack (rank budgets, nested truncation).

A decode step is a matrix–vector product per layer, bound by the bytes of weights it reads;
A·B reads k(m+n) values instead of mn. Every matching linear — ``aten.linear(x, W, b)``,
``aten.addmm(b, x, Wᵀ | W)`` (GPT-2's Conv1D), ``aten.matmul``/``aten.mm`` with a 2-D
parameter (:mod:`splice.passes.linears` recognises them) — whose weight is a parameter read
by linear sites only becomes ``splice::lowrank_linear(x, A, B, bias)``.

Sites are found in every graph of the program: the top graph and every sub-graph (``cond``
branches from ``capture_dynamic``, ``branches`` parts, ``stitch`` routes). Inside a
sub-graph a weight arrives as a placeholder bound to an operand of the call; the pass
follows that operand chain to the program weight (:class:`splice.passes.subgraphs.
GraphTree`), so a weight read in a branch is still that weight. A weight read by several
linear sites (the same layer on several paths, a loop body unrolled into branches) is
factored **once**: every site reads the same A and B (threaded into the sub-graphs as new
operands), the calibration statistics of all its sites are summed, and the dense weight
leaves the program (its now unused operands are dropped). The same weight read by two
Linears of one graph (tied layers), by anything but a linear site (a tied embedding), or
both as W and Wᵀ, is skipped, with every reader named (``readers``).

Stats list what was not factored, and why: ``skipped`` (one ``{layer, sites, reason}`` per
weight: tied, rank at or above break-even, already a low-rank factor, a ``moe_ffn``'s
routed experts, a sub-graph weight that is not one program weight, or a site no
calibration sample reaches when the method needs activations) and ``not_targeted`` (layers
``targets``/``exclude`` leave out). ``sites_factored`` / ``sites_in_subgraphs`` count the
nodes rewritten.

Methods (all in float64, the factors stored in the weight's dtype):

* ``svd``: W = UΣVᵀ, A = U_kΣ_k^½, B = Σ_k^½V_kᵀ. Weight error² = Σ_{i>k} σ_i².
* ``asvd``: S = diag(mean|x|^α) from calibration activations (α = ``alpha``); factor W·S,
  then B ← B·S⁻¹. With S = I this is ``svd``.
* ``whitened``: C = Σ XᵀX, L = chol(C) (a jitter is added when C is not positive definite,
  and reported); factor W·L, then B ← B·L⁻¹. Then ‖(W−W')Xᵀ‖_F = sqrt(Σ_{i>k} σ_i(WL)²)
  exactly, the smallest activation error any rank-k W' can reach.

Ranks — exactly one of:

* ``energy=e``: the smallest k with Σ_{i≤k}σ_i² ≥ e·Σσ_i² (σ of the matrix factored);
* ``ratio=ρ``: k = ⌊ρ·mn/(m+n)⌋, i.e. each layer keeps a fraction ρ of its parameters;
* ``budget_params=p``: keep a fraction p of the targeted layers' parameters in total, spread
  across layers greedily by marginal truncation loss per parameter — with ``alloc=relative``
  (the default) each layer's loss relative to its own energy Σσ_i² (for ``whitened``, its
  output energy ‖W X‖²: the relative output error), with ``alloc=absolute`` the loss itself
  (layers whose outputs are larger then weigh more);
  With ``alloc=sensitivity`` (ASVD's sensitivity-based truncation, Yuan et al. 2023 §3.3)
  the loss is measured end to end instead: each layer alone is truncated to ``grid`` ranks
  (fractions 1/(grid+1) … grid/(grid+1) of its break-even rank mn/(m+n)) and the program
  runs on ``sens_samples`` calibration samples; the loss is the relative squared error of
  its floating outputs, Σ‖y'−y‖²/Σ‖y‖². The ranks then come from an exact
  multiple-choice knapsack (dense or one grid rank per layer, least summed loss within the
  budget), assuming the layers' losses add. It costs len(layers)·grid program runs and
  needs calibration samples. On all-MiniLM-L6-v2 at ``budget_params=0.8`` it factors 21
  Linears (attention projections too) where ``relative`` factors 12 FFN ones, and keeps
  real text at 0.95 cosine against 0.90 calibrated on everyday English (0.92 against 0.84 on
  technical prose; benchmarks/heal.py, before heal, RESULTS.md).
* ``budget_latency=p``: the same allocation (any ``alloc``) with each layer's cost its
  predicted time on the target (roofline of the cost model: max(FLOPs/peak, bytes/bandwidth)).

A layer whose rank would be k ≥ mn/(m+n) would read as many bytes as W: it is skipped (kept
dense) and listed in ``stats["skipped"]`` with the reason. Singular directions are stored in
importance order, so a prefix of rank r < k is the best rank-r approximation of its kind:
:func:`set_rank` lowers ranks of a factored program (or ``splice.compile(...,
lowrank_rank=...)`` an artifact's) without refactoring — nested truncation, as in Maestro.

Invariants (tests/test_lowrank.py): full rank reproduces the layer (1e-5); error never rises
with rank; plain SVD error² = Σ_{i>k}σ_i²; the whitened activation error equals
sqrt(Σ_{i>k}σ_i(WL)²) and is ≤ plain SVD's; asvd with S = I equals svd; the skip rule.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from splice.errors import PassError, PipelineError
from splice.ir import meta as M
from splice.ir.builder import Builder
from splice.ir.ops import lowrank_linear, moe_ffn
from splice.ir.program import Program, set_weight_attr
from splice.ir.rewriter import Rewriter
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.globs import matches
from splice.passes.linears import (
    LinearSite,
    find_linears,
    is_transpose,
    linear_readers,
    unresolved_linears,
)
from splice.passes.registry import register_pass
from splice.passes.subgraphs import GraphTree, collect_activations, merge_stats
from splice.target import host_target

aten = torch.ops.aten
Method = Literal["svd", "asvd", "whitened"]
Alloc = Literal["relative", "absolute", "sensitivity"]


# ---------------------------------------------------------------------------------------
# the factorization


def cholesky_with_jitter(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower-triangular L with L Lᵀ = gram + jitter·I (float64); jitter 0 when it is PD."""
    g = gram.double()
    n = g.shape[0]
    L, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return L, 0.0
    lam_min = float(torch.linalg.eigvalsh(g)[0])
    scale = max(float(torch.diagonal(g).mean()), 1e-12)
    jitter = max(-lam_min, 0.0) + 1e-6 * scale
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(g + jitter * torch.eye(n, dtype=g.dtype))
        if int(info) == 0:
            return L, jitter
        jitter *= 10
    raise PassError(f"lowrank: could not whiten: Σ XᵀX is not positive definite (jitter {jitter})")


@dataclass
class Factors:
    """A = U Σ^½ and B = Σ^½ Vᵀ T⁻¹ at full rank (columns of A / rows of B by importance)."""

    A: torch.Tensor  # [m, r_full], float64
    B: torch.Tensor  # [r_full, n], float64
    sigma: torch.Tensor  # singular values of the factored matrix (W, W·S or W·L)
    jitter: float = 0.0

    def tail_loss(self, k: int) -> float:
        """Σ_{i>k} σ_i²: the truncation loss of rank k in the method's own metric."""
        return float((self.sigma[k:] ** 2).sum())


def factorize(
    W: torch.Tensor,
    method: str,
    *,
    gram: torch.Tensor | None = None,
    abs_mean: torch.Tensor | None = None,
    alpha: float = 0.5,
) -> Factors:
    """Factor W [m, n] by ``method``; see the module docstring for the formulas."""
    w = W.detach().double()
    jitter = 0.0
    if method == "svd":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return Factors(U * S.sqrt(), S.sqrt()[:, None] * Vh, S)
    if method == "asvd":
        if abs_mean is None:
            raise PassError("lowrank{method=asvd} needs calibration activations")
        s = abs_mean.double().pow(alpha)
        s = torch.clamp(s, min=1e-6 * max(float(s.max()), 1e-30))
        U, S, Vh = torch.linalg.svd(w * s[None, :], full_matrices=False)
        return Factors(U * S.sqrt(), (S.sqrt()[:, None] * Vh) / s[None, :], S)
    if method == "whitened":
        if gram is None:
            raise PassError("lowrank{method=whitened} needs calibration activations")
        L, jitter = cholesky_with_jitter(gram)
        return whitened_factors(w @ L, L, jitter)
    raise PassError(f"lowrank: unknown method {method!r}", hint="methods: svd, asvd, whitened")


def whitened_factors(ML: torch.Tensor, L: torch.Tensor, jitter: float = 0.0) -> Factors:
    """Factors of M from its whitened form M·L (L lower-triangular, float64): with
    M·L = UΣVᵀ, A = UΣ^½ and B = Σ^½VᵀL⁻¹, so a rank-k prefix is the k-term truncation
    that is best in the metric L defines (``whitened`` and heal's sequential refit)."""
    U, S, Vh = torch.linalg.svd(ML, full_matrices=False)
    # B = Σ^½ Vᵀ L⁻¹  <=>  Lᵀ Bᵀ = V Σ^½ (an upper-triangular solve)
    Bt = torch.linalg.solve_triangular(L.mT, Vh.mT * S.sqrt()[None, :], upper=True)
    return Factors(U * S.sqrt(), Bt.mT, S, jitter)


def break_even(m: int, n: int) -> float:
    """Ranks k ≥ mn/(m+n) read at least as many values as the dense weight."""
    return m * n / (m + n)


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    e = (sigma.double() ** 2).cumsum(0)
    total = float(e[-1]) if len(e) else 0.0
    if total == 0.0:
        return 1
    return (
        int(torch.searchsorted(e, torch.tensor(energy * total, dtype=e.dtype) - 1e-12 * total)) + 1
    )


# ---------------------------------------------------------------------------------------
# rank allocation under a global budget


def allocate(
    losses: list[torch.Tensor],
    costs: list[list[float]],
    dense_costs: list[float],
    budget: float,
) -> list[int | None]:
    """Greedy rank allocation: keep adding the move with the largest loss saved per cost.

    ``losses[i][k]`` is layer i's truncation loss at rank k (k = 0..r_full, non-increasing);
    ``costs[i][k]`` its cost at rank k; ``dense_costs[i]`` the cost of leaving it dense.
    Each layer starts at rank 0; a move adds one direction, or turns the layer dense when
    that is no costlier than its next rank. Returns per layer a rank, or None for dense.
    """
    n = len(losses)
    rank = [0] * n
    dense = [False] * n
    spent = sum(c[0] for c in costs)

    def move(i: int) -> tuple[float, float, bool] | None:
        k = rank[i]
        if dense[i] or k >= len(losses[i]) - 1:
            return None
        nxt = costs[i][k + 1]
        if nxt >= dense_costs[i]:  # the next rank is no cheaper than the dense weight
            dc = dense_costs[i] - costs[i][k]
            return float(losses[i][k]), dc, True
        return float(losses[i][k] - losses[i][k + 1]), nxt - costs[i][k], False

    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        mv = move(i)
        if mv is not None:
            gain, dc, _ = mv
            heapq.heappush(heap, (-(gain / dc) if dc > 0 else -math.inf, i))

    for i in range(n):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        mv = move(i)
        if mv is None:
            continue
        _, dc, to_dense = mv
        if spent + dc > budget:
            continue  # does not fit; cheaper moves of other layers may still fit
        spent += dc
        if to_dense:
            dense[i] = True
        else:
            rank[i] += 1
            push(i)
    return [None if dense[i] else rank[i] for i in range(n)]


def allocate_choices(
    choices: list[list[tuple[float, float, int | None]]], budget: float, units: int = 4000
) -> list[int | None] | None:
    """Exact multiple-choice knapsack: one ``(cost, loss, rank)`` of each layer's
    ``choices``, least summed loss with summed cost ≤ ``budget``. Costs are rounded *up*
    to ``budget/units``, so the result always fits. None when no combination fits."""
    unit = budget / units if budget > 0 else 1.0
    inf = math.inf
    best = [0.0] + [inf] * units  # best[c]: least loss at rounded cost exactly c
    back: list[list[int]] = []
    for opts in choices:
        steps = [(math.ceil(c / unit - 1e-9), loss) for c, loss, _ in opts]
        nxt = [inf] * (units + 1)
        arg = [-1] * (units + 1)
        for c0, v in enumerate(best):
            if v == inf:
                continue
            for j, (dc, loss) in enumerate(steps):
                c = c0 + dc
                if c <= units and v + loss < nxt[c]:
                    nxt[c], arg[c] = v + loss, j * (units + 1) + c0
        back.append(arg)
        best = nxt
    end = min(range(units + 1), key=lambda c: best[c])
    if best[end] == inf:
        return None
    picks: list[int | None] = []
    for opts, arg in zip(reversed(choices), reversed(back)):
        j, end = divmod(arg[end], units + 1)
        picks.append(opts[j][2])
    return picks[::-1]


# ---------------------------------------------------------------------------------------
# the pass


@register_pass
@dataclass(frozen=True)
class LowRank(Pass):
    """Factor matching Linear weights into two thin matrices (see the module docstring)."""

    name = "lowrank"
    semantics = "approximate"
    summary = "factor Linear weights W ≈ A·B (svd | asvd | whitened SVD) for low-rank decoding"

    method: Method = "svd"
    energy: float | None = None
    ratio: float | None = None
    budget_params: float | None = None
    budget_latency: float | None = None
    targets: str = "*"
    exclude: str = ""
    alpha: float = 0.5
    alloc: Alloc = "relative"
    grid: int = 7
    sens_samples: int = 8

    def validate(self) -> None:
        chosen = [
            k
            for k in ("energy", "ratio", "budget_params", "budget_latency")
            if getattr(self, k) is not None
        ]
        if len(chosen) != 1:
            raise PipelineError(
                f"lowrank needs exactly one rank rule, got {chosen or 'none'}",
                hint="e.g. lowrank{ratio=0.5}, lowrank{energy=0.95}, lowrank{budget_params=0.8}, "
                "lowrank{budget_latency=0.6}",
            )
        v = getattr(self, chosen[0])
        if not 0.0 < v <= 1.0:
            raise PipelineError(f"lowrank: {chosen[0]} must be in (0, 1], got {v}")
        if self.alpha < 0:
            raise PipelineError(f"lowrank: alpha must be >= 0, got {self.alpha}")
        if self.alloc == "sensitivity" and chosen[0] not in ("budget_params", "budget_latency"):
            raise PipelineError(
                f"lowrank: alloc=sensitivity allocates a budget, and {chosen[0]}= sets each "
                "layer's rank on its own",
                hint="use budget_params= or budget_latency= with alloc=sensitivity",
            )
        if self.grid < 1 or self.sens_samples < 0:
            raise PipelineError(
                f"lowrank: grid must be >= 1 and sens_samples >= 0, got grid={self.grid}, "
                f"sens_samples={self.sens_samples}"
            )

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        tree = GraphTree(program)
        sites = find_linears(program, tree)
        skipped: list[dict[str, Any]] = unresolved_linears(tree)
        not_targeted: list[str] = []
        groups: dict[str, list[LinearSite]] = {}
        for s in sites:
            groups.setdefault(s.weight, []).append(s)
        chosen: list[list[LinearSite]] = []
        for weight, group in groups.items():
            layer = group[0].layer
            where = [s.site for s in group]
            if not matches(layer, self.targets, self.exclude):
                not_targeted.append(layer)
                continue
            if weight.endswith((".lowrank_A", ".lowrank_B")):
                skipped.append(
                    {"layer": layer, "sites": where, "reason": "already a low-rank factor"}
                )
                continue
            readers = linear_readers(tree, weight)
            tied = (
                readers - {s.node for s in group}  # read by something else
                or len({s.node.graph for s in group}) < len(group)  # two Linears, one graph
                or len({s.transposed for s in group}) > 1  # read as W and as Wᵀ
            )
            if tied:
                named = sorted(tree.where(n) for n in readers)
                skipped += [
                    {
                        "layer": layer,
                        "site": s.site,
                        "reason": "weight shared with other nodes (tied)",
                        "readers": named,
                    }
                    for s in group
                ]
                continue
            chosen.append(group)
        skipped += _moe_skips(program, tree) + _factored_skips(tree)
        base = {"skipped": skipped, "not_targeted": not_targeted}
        if not chosen:
            return PassResult(
                program,
                False,
                {
                    "changed": False,
                    "reason": (
                        f"every Linear layer matching targets={self.targets!r} was skipped "
                        "(see skipped)"
                        if skipped
                        else f"no Linear layer matches targets={self.targets!r}"
                    ),
                    **base,
                },
            )

        calib = self._calibrate(program, ctx, chosen)
        if calib is not None and self.method != "svd":
            kept = []
            for g in chosen:
                if calib[g[0].weight].count == 0:
                    skipped.append({
                        "layer": g[0].layer, "sites": [s.site for s in g],
                        "reason": f"method={self.method} needs its activations and no "
                        "calibration sample runs it (its branch is never taken)",
                    })  # fmt: skip
                else:
                    kept.append(g)
            chosen = kept
        ctx.progress("lowrank: factoring", 0, len(chosen))
        reused = ctx.memo_hits
        factors: list[Factors] = []
        weights: list[torch.Tensor] = []
        for i, g in enumerate(chosen):
            s = g[0]
            stored = program.get_weight(s.weight)
            w = stored.detach()
            w = w.mT if s.transposed else w
            weights.append(w)
            st = calib.get(s.weight) if calib else None
            if self.method == "svd":  # from the weight alone: once per weight and context
                factors.append(
                    ctx.memo(
                        ("lowrank.factorize", "svd", s.transposed),
                        stored,
                        lambda w=w: factorize(w, "svd"),
                    )
                )
            else:
                factors.append(
                    factorize(
                        w,
                        self.method,
                        gram=st.gram if st is not None else None,
                        abs_mean=st.abs_mean if st is not None else None,
                        alpha=self.alpha,
                    )
                )
            ctx.progress("lowrank: factoring", i + 1, len(chosen))
        reused = ctx.memo_hits - reused

        sens: dict[str, dict[int, float]] = {}
        ranks = self._ranks(program, ctx, chosen, factors, sens)
        layers: list[dict[str, Any]] = []
        for g, f, w, k in zip(chosen, factors, weights, ranks):
            m, n = w.shape
            if k is None or k >= break_even(m, n):
                kk = "dense" if k is None else k
                skipped.append({
                    "layer": g[0].layer, "sites": [s.site for s in g],
                    "reason": f"rank {kk} >= mn/(m+n) = {break_even(m, n):.1f}",
                })  # fmt: skip
                continue
            layers.append(self._replace(program, tree, g, f, w, k, calib))
            if g[0].weight in sens:
                layers[-1]["output_error"] = sens[g[0].weight][k]
        if not layers:
            return PassResult(
                program,
                False,
                {"changed": False, "reason": "every layer skipped", **base},
            )
        replaced = {r["layer_weight"] for r in layers}
        tree.prune(replaced)
        Rewriter(program, self.name).erase_unused_weights()
        for r in layers:
            del r["layer_weight"]
        before = sum(r["params_before"] for r in layers)
        after = sum(r["params_after"] for r in layers)
        all_before = sum(int(w.numel()) for w in weights)
        stats = {
            "changed": True,
            "method": self.method,
            "factored": len(layers),
            "factorizations_reused": reused,  # computed earlier in this context (same weight)
            "sites_factored": sum(len(r["sites"]) for r in layers),
            "sites_in_subgraphs": sum(
                1 for r in layers for site in r["sites"] if not site.startswith("%")
            ),
            "skipped_count": len(skipped),
            "params_before": all_before,
            "params_after": all_before - before + after,
            "params_kept": round((all_before - before + after) / max(all_before, 1), 4),
            "layers": layers,
            **base,
        }
        if sens:
            stats["alloc"] = "sensitivity"
            # the sum of the layers' measured errors, each alone: the knapsack's objective
            stats["predicted_output_error"] = sum(r["output_error"] for r in layers)
        return PassResult(program, True, stats)

    # -- calibration --------------------------------------------------------------------------
    def _calibrate(
        self, program: Program, ctx: PassContext, groups: list[list[LinearSite]]
    ) -> dict[str, Any] | None:
        """Activation statistics per weight, merged over every site that reads it."""
        needs = {"svd": (), "asvd": ("abs_mean",), "whitened": ("gram",)}[self.method]
        if not ctx.calibration:
            if needs:
                raise PassError(
                    f"lowrank{{method={self.method}}} needs calibration activations, and no "
                    "sample inputs were given",
                    hint="pass sample_inputs=[...] (Python) or use a saved program with samples "
                    "(CLI); method=svd needs none",
                )
            return None
        values = tuple(sorted({(s.path, s.x.name) for g in groups for s in g}))
        stats = tuple(sorted({"gram", *needs}))  # gram also gives the activation error
        acts = ctx.analysis(collect_activations, program, values=values, stats=stats)
        return {g[0].weight: merge_stats([acts[(s.path, s.x.name)] for s in g]) for g in groups}

    # -- ranks -------------------------------------------------------------------------------
    def _ranks(
        self,
        program: Program,
        ctx: PassContext,
        groups: list[list[LinearSite]],
        factors: list[Factors],
        info: dict[str, dict[int, float]],
    ) -> list[int | None]:
        """Per group a rank, or None to keep it dense; ``info`` receives, for
        ``alloc=sensitivity``, each weight's measured loss per probed rank."""
        shapes = [(int(f.A.shape[0]), int(f.B.shape[1])) for f in factors]
        if self.energy is not None:
            return [energy_rank(f.sigma, self.energy) for f in factors]
        if self.ratio is not None:
            return [max(1, math.floor(self.ratio * break_even(m, n))) for m, n in shapes]
        if self.budget_params is not None:
            costs = [[float(k * (m + n)) for k in range(len(f.sigma) + 1)]
                     for f, (m, n) in zip(factors, shapes)]  # fmt: skip
            dense = [float(m * n) for m, n in shapes]
            budget = self.budget_params * sum(dense)
        else:
            target = ctx.target if ctx.target is not None else host_target()
            costs, dense = [], []
            for g, f, (m, n) in zip(groups, factors, shapes):
                rows = sum(_rows(s.x) for s in g)
                item = M.spec(g[0].x).dtype.itemsize
                dense.append(
                    target.roofline_seconds(2 * rows * m * n, item * (m * n + rows * (m + n)))
                )
                costs.append([
                    target.roofline_seconds(2 * rows * k * (m + n), item * (k * (m + n) + rows * (m + n)))
                    for k in range(len(f.sigma) + 1)
                ])  # fmt: skip
            budget = self.budget_latency * sum(dense)
        if self.alloc == "sensitivity":
            return self._sensitivity_ranks(
                program, ctx, groups, factors, shapes, costs, dense, budget, info
            )
        # the truncation loss at each rank: the energy of the dropped singular values
        losses = [torch.cat([(f.sigma.flip(0) ** 2).cumsum(0).flip(0), f.sigma.new_zeros(1)])
                  for f in factors]  # fmt: skip
        if self.alloc == "relative":
            # relative to each layer's energy, so layers whose activations differ in scale compare
            losses = [loss / max(float(loss[0]), 1e-30) for loss in losses]
        return allocate(losses, costs, dense, budget)

    def _sensitivity_ranks(
        self,
        program: Program,
        ctx: PassContext,
        groups: list[list[LinearSite]],
        factors: list[Factors],
        shapes: list[tuple[int, int]],
        costs: list[list[float]],
        dense: list[float],
        budget: float,
        info: dict[str, dict[int, float]],
    ) -> list[int | None]:
        """ASVD-style allocation: each layer's end-to-end output error at ``grid`` ranks,
        then the knapsack (see the module docstring)."""
        samples = list(ctx.calibration or [])
        if not samples:
            raise PassError(
                "lowrank{alloc=sensitivity} measures each layer's effect on the program's "
                "outputs and needs calibration samples; none were given",
                hint="pass sample_inputs=[...] / calibration_inputs=[...], or use alloc=relative",
            )
        if self.sens_samples:
            samples = samples[: self.sens_samples]
        probe = program.copy()
        gm = probe.graph_module
        with torch.no_grad():
            want = [_float_outputs(probe.run(*b)) for b in samples]
        ref = sum(float((y.double() ** 2).sum()) for ys in want for y in ys)
        total = len(groups) * self.grid
        ctx.progress("lowrank: sensitivity", 0, total)
        choices: list[list[tuple[float, float, int | None]]] = []
        for i, (g, f, (m, n)) in enumerate(zip(groups, factors, shapes)):
            s, kind = g[0], program.weight_kind(g[0].weight)
            stored = program.get_weight(s.weight)
            ranks = sorted(
                {
                    max(1, int(j * break_even(m, n) / (self.grid + 1)))
                    for j in range(1, self.grid + 1)
                }
            )
            opts: list[tuple[float, float, int | None]] = [(dense[i], 0.0, None)]
            measured: dict[int, float] = {}
            try:
                for k in ranks:
                    w = (f.A[:, :k] @ f.B[:k]).to(stored.dtype)
                    set_weight_attr(gm, s.weight, w.mT if s.transposed else w, kind)
                    err = 0.0
                    with torch.no_grad():
                        for b, ys in zip(samples, want):
                            got = _float_outputs(probe.run(*b))
                            err += sum(float(((a.double() - y.double()) ** 2).sum())
                                       for a, y in zip(got, ys))  # fmt: skip
                    loss = err / max(ref, 1e-30)
                    if not math.isfinite(loss):
                        loss = math.inf
                    measured[k] = loss
                    if math.isfinite(loss):
                        opts.append((costs[i][k], loss, k))
                    ctx.progress(
                        "lowrank: sensitivity", len(choices) * self.grid + len(measured), total
                    )
            finally:
                set_weight_attr(gm, s.weight, stored, kind)
            info[s.weight] = measured
            choices.append(opts)
        picks = allocate_choices(choices, budget)
        if picks is None:
            raise PassError(
                f"lowrank{{alloc=sensitivity}}: no choice of the grid ranks fits the budget "
                f"({budget:.4g} of {sum(dense):.4g}); the smallest grid rank is 1/{self.grid + 1} "
                "of each layer's break-even rank",
                hint="raise the budget, raise grid=, or use alloc=relative (it can go to rank 0)",
            )
        return picks

    # -- rewriting ------------------------------------------------------------------------------
    def _replace(
        self,
        program: Program,
        tree: GraphTree,
        group: list[LinearSite],
        f: Factors,
        w: torch.Tensor,
        k: int,
        calib: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Factor the weight once and make every site that reads it a lowrank_linear."""
        s0 = group[0]
        m, n = w.shape
        A = f.A[:, :k].to(w.dtype).contiguous()
        B = f.B[:k].to(w.dtype).contiguous()
        a_name = program.unique_weight_name(f"{s0.layer}.lowrank_A")
        program.add_weight(a_name, A, "param")
        b_name = program.unique_weight_name(f"{s0.layer}.lowrank_B")
        program.add_weight(b_name, B, "param")
        for s in group:
            rw = tree.rewriter(s.gm if s.gm is not None else tree.top, self.name)
            w_arg = s.node.args[2] if s.node.target is aten.addmm.default else s.node.args[1]
            with rw.at(s.node):
                a_node, b_node = rw.weight(a_name), rw.weight(b_name)
                new = rw.call(
                    lowrank_linear.overload,
                    (s.current_x(), a_node, b_node, s.current_bias()),
                    name="lowrank_linear",
                )
            rw.replace(s.node, new)
            if is_transpose(w_arg) and not w_arg.users:
                rw.erase(w_arg)
        rows = sum(_rows(s.x) for s in group)
        item = w.element_size()
        wd = w.double()
        approx = A.double() @ B.double()
        diff = wd - approx
        rec = {
            "layer": s0.layer,
            "layer_weight": s0.weight,
            "sites": [s.site for s in group],
            "shape": [m, n],
            "rank": k,
            "break_even_rank": round(break_even(m, n), 1),
            "params_before": m * n,
            "params_after": k * (m + n),
            "flops_before": 2 * rows * m * n,
            "flops_after": 2 * rows * k * (m + n),
            "bytes_before": item * (m * n + rows * (m + n)),
            "bytes_after": item * (k * (m + n) + rows * (m + n)),
            "weight_error": float(diff.norm() / max(float(wd.norm()), 1e-30)),
            "truncation_loss": f.tail_loss(k),
        }
        if f.jitter:
            rec["whitening_jitter"] = f.jitter
        st = calib.get(s0.weight) if calib else None
        if st is not None and st.gram is not None:
            g = st.gram.double()
            err = float(torch.einsum("ij,jk,ik->", diff, g, diff).clamp_min(0).sqrt())
            ref = float(torch.einsum("ij,jk,ik->", wd, g, wd).clamp_min(0).sqrt())
            rec["activation_error"] = err / max(ref, 1e-30)
        return rec


def _factored_skips(tree: GraphTree) -> list[dict[str, Any]]:
    """Layers that are already ``splice::lowrank_linear``: not factored again, said so."""
    by_layer: dict[str, list[str]] = {}
    for _path, gm in tree.graphs:
        for n in gm.graph.find_nodes(op="call_function", target=lowrank_linear.overload):
            a = tree.weight_of(n.args[1]) or ""
            by_layer.setdefault(a.removesuffix(".lowrank_A") or tree.where(n), []).append(
                tree.where(n)
            )
    return [
        {
            "layer": layer,
            "sites": sites,
            "reason": "already factored (splice::lowrank_linear); lower its rank with "
            "splice.passes.lowrank.set_rank",
        }
        for layer, sites in by_layer.items()
    ]


def _moe_skips(program: Program, tree: GraphTree) -> list[dict[str, Any]]:
    """Routed experts (``splice::moe_ffn``) are not factored: say so."""
    out = []
    for _path, gm in tree.graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is moe_ffn.overload:
                w = tree.weight_of(n.args[3]) or ""
                out.append({
                    "layer": w.removesuffix(".w_in") or tree.where(n),
                    "sites": [tree.where(n)],
                    "reason": "routed experts (splice::moe_ffn): their [E, s, d] expert "
                    "slices are not factored (each slice is already s = d_ff/E rows)",
                })  # fmt: skip
    return out


def _float_outputs(outputs: list[Any]) -> list[torch.Tensor]:
    """The floating-point tensors among a program's flat outputs (what sensitivity compares)."""
    return [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _rows(x: fx.Node) -> int:
    spec = M.spec(x)
    rows = 1
    for d in spec.shape[:-1]:
        rows *= int(d) if isinstance(d, int) else 1
    return rows


# ---------------------------------------------------------------------------------------
# run-time rank (nested truncation)


def lowrank_nodes(program: Program) -> list[fx.Node]:
    """Every ``lowrank_linear`` node, top graph first, then sub-graphs (branches, parts)."""
    return [
        n
        for _path, gm in GraphTree(program).graphs
        for n in gm.graph.find_nodes(op="call_function", target=lowrank_linear.overload)
    ]


def set_rank(
    program: Program, rank: float | int | dict[str, int], *, physical: bool = True
) -> Program:
    """A copy of ``program`` with lower ranks in its ``lowrank_linear`` layers, in every
    graph (a layer read in several branches gets one rank; its factors are sliced once).

    ``rank``: a float in (0, 1] keeps that fraction of each layer's stored rank; an int sets
    every layer's rank (capped at the stored one); a dict maps layer names (the ``A`` weight's
    name without ``.lowrank_A``) to ranks. Because directions are stored by importance, the
    prefix is the best truncation of its kind (nested, as in Maestro): nothing is refactored.
    ``physical=True`` slices the stored factors (fewer bytes); ``False`` only sets the op's
    ``rank`` argument, keeping the full factors for raising the rank later.
    """
    out = program.copy()
    tree = GraphTree(out)
    nodes = lowrank_nodes(out)
    if not nodes:
        raise PassError(
            f"program {program.name!r} has no lowrank_linear layers", hint="run lowrank first"
        )
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise PassError(f"set_rank: a fraction must be in (0, 1], got {rank}")
    sliced: dict[str, int] = {}
    for node in nodes:
        a_name, b_name = tree.weight_of(node.args[1]), tree.weight_of(node.args[2])
        if a_name is None or b_name is None:
            continue  # factors that are not program weights: nothing to slice
        layer = a_name.removesuffix(".lowrank_A")
        if isinstance(rank, dict) and layer not in rank:
            continue
        if a_name in sliced:  # the same layer read at another site: the same rank
            r = sliced[a_name]
        else:
            k = int(out.get_weight(a_name).shape[1])
            if isinstance(rank, dict):
                r = int(rank[layer])
            elif isinstance(rank, float):
                r = max(1, math.floor(rank * k))
            else:
                r = int(rank)
            r = max(1, min(r, k))
        args = list(node.args) + [None] * (5 - len(node.args))
        if physical:
            if a_name not in sliced:
                b = Builder(out, "set-rank")
                for name, t in ((a_name, out.get_weight(a_name)[:, :r]),
                                (b_name, out.get_weight(b_name)[:r])):  # fmt: skip
                    # its get_attr and the branch placeholders bound to it
                    b.set_weight_value(name, t.contiguous(), tree.values_of(name))
            args[4] = None
        else:
            args[4] = r
        sliced[a_name] = r
        rw = tree.rewriter(tree.gm_of(node), "set-rank")
        rw.set_args(node, args[: 5 if args[4] is not None else 4])
    out.bump_version()
    return out


__all__ = [
    "Factors",
    "LowRank",
    "allocate",
    "factorize",
    "find_linears",
    "set_rank",
    "whitened_factors",
]
