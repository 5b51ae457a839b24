"""``experts``: factor each dense FFN into a routed mixture of E experts of disjoint neurons.

Papers: MoEfication (Zhang et al., 2022: FFNs of a dense model split into experts by
balanced k-means on weight rows or by co-activation graph partitioning; a router
initialised from the cluster centroids, optionally trained on the experts' activations),
FactorLLM (Zhao et al., 2024: E/k output scaling, hard top-k masks), LLaMA-MoE (Zhu et al.,
2024: gate/up rows and down columns sliced with the same index set), and "Harder Tasks Need
More Experts: Dynamic Routing in MoE Models" (Huang et al., 2024: top-p routing).

Recognition (:mod:`splice.passes.ffns`, on the linear sites of :mod:`splice.passes.linears`)
    An FFN is ``Linear → φ → Linear`` or a gated ``act(x W_gᵀ) ⊙ (x W_uᵀ) → W_d``
    (SwiGLU/GeGLU), with or without biases, φ one of the activations ``splice::moe_ffn``
    knows (:data:`splice.ir.ops.MOE_ACTIVATIONS`), identified on probe values; the
    hidden width d_ff must be a multiple of E and larger than the input's. Candidates that
    come close (a nonlinearity between Linears) and do not match are listed with the reason
    in ``stats["not_matched"]`` and as ``remarks`` (printed by ``PrintIR``, e.g. ``splice opt
    --print-ir-after-change``). Existing routed experts (``splice::moe_ffn``, transformers'
    ``grouped_mm`` custom ops in Mixtral/Qwen2-MoE) are left as they are and listed in
    ``stats["existing_experts"]``.

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

Partition (``split``) of the d_ff neurons into E disjoint sets of s = d_ff/E
(:mod:`splice.passes.experts_partition`):

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
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from splice.errors import PassError, PipelineError
from splice.ir import meta as M
from splice.ir.ops import moe_ffn, moe_gates
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.experts_partition import (
    balanced_assign,
    balanced_kmeans,
    centroids,
    coactivation_partition,
    expert_mass,
    inside_weight,
    parts_of,
    train_router,
)
from splice.passes.ffns import FFNMatch, recognise
from splice.passes.globs import matches
from splice.passes.linears import LinearSite, is_transpose, linear_readers
from splice.passes.registry import register_pass
from splice.passes.subgraphs import GraphTree, collect_activations

aten = torch.ops.aten
Split = Literal["balanced_kmeans", "coactivation", "contiguous"]
Router = Literal["centroid", "trained"]
Scale = Literal["none", "e_over_k"]
Gates = Literal["unit", "prob"]


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
            groups.setdefault(tuple(m.weight_names(tree)), []).append(m)
        todo: list[list[FFNMatch]] = []
        for occ in groups.values():
            nodes = {s.node for m in occ for s in m.sites}
            tied = [
                w for s in occ[0].sites for w in s.weights
                if linear_readers(tree, w) - nodes
            ]  # fmt: skip
            if tied:
                skipped.append({
                    "ffn": occ[0].name, "sites": [m.where for m in occ],
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
                    "ffn": occ[0].name, "sites": [m.where for m in occ],
                    "reason": "needs calibration activations and no sample runs it "
                    "(its branch is never taken)",
                })  # fmt: skip
                continue
            ffns.append(self._replace(program, tree, occ, X, A))
            replaced.update(occ[0].weight_names(tree))
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
            for w in m.weight_names(tree)
            if w not in {tree.weight_of(m.down.bias)}
        )
        rec: dict[str, Any] = {
            "ffn": m.name,
            "sites": [o.where for o in occ],
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
            out_shape = M.tensor_spec(m.down.node).shape
            if M.tensor_spec(new).shape != out_shape:
                new = rw.call(aten.reshape.default, (new, list(out_shape)), name="moe_ffn_view")
        down_args = list(m.down.node.args)
        rw.replace(m.down.node, new)
        self._erase_ffn(rw, m, down_args)

    def _erase_ffn(self, rw: Rewriter, m: FFNMatch, down_args: list[Any]) -> None:
        """Erase the region, the replaced Linears and the transposes of their weights (the
        down Linear itself is already replaced)."""
        doomed: list[fx.Node] = [*reversed(m.region)]
        transposes = [a for a in down_args if is_transpose(a)]
        for site in (m.up, m.gate):
            if site is not None:
                doomed.append(site.node)
                transposes += [a for a in site.node.args if is_transpose(a)]
        for n in [*doomed, *transposes]:
            if not n.users:
                rw.erase(n)


def _drop_weights(program: Program, names: set[str]) -> None:
    """Drop the replaced FFNs' weights that nothing reads any more (other unread weights
    of the program are not this pass's business)."""
    rw = Rewriter(program)
    for n in list(rw.graph.find_nodes(op="get_attr")):
        if n.target in names and not n.users:
            rw.erase(n)
    read = {n.target for n in rw.graph.find_nodes(op="get_attr")}
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
