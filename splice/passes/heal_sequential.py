"""``heal{scope=sequential}``: refit every factored Linear in closed form, layer after layer.

Paper: SVD-LLM (Wang et al., 2024), whose *sequential low-rank update* corrects each
truncated layer for the error the layers before it already made. Here it is solved exactly,
as reduced-rank regression, instead of by gradient steps.

For each ``splice::lowrank_linear`` of the top graph whose factors A [m, k] and B [k, n]
train (``train=``), in program order of its input value:

* X' — the op's inputs in the *student* (the transformed program, with every earlier layer
  already refit), and Y — the outputs of the teacher's Linear of the same layer (the weight
  ``{layer}.weight`` the transform factored) on the *teacher's* inputs, over the training
  rows (every token a sample). Ops that read one input value (a block's q, k and v) are
  fitted from one pass over the data.
* M = argmin over rank-k M of ‖M X' + b − Y‖_F, in float64: with G = X'X'ᵀ (+ ``damp`` ·
  mean(diag G) · I, a ridge), L = chol(G) (with jitter when G is singular, as
  :func:`~splice.passes.lowrank.cholesky_with_jitter`), the least-squares map
  M_ls = (Y − b) X'ᵀ G⁻¹ and the best rank-k M is the rank-k truncation of M_ls·L carried
  back by L⁻¹ (the whitened truncation ``lowrank{method=whitened}`` does for W on the
  teacher's inputs). A = U_kΣ_k^½, B = Σ_k^½V_kᵀL⁻¹: directions stay in importance order, so
  a rank prefix (``set_rank``) is the best of its rank too.
* The bias: when it trains (``train=all`` or a glob naming it) it is fitted with M (the
  regression on centred X' and Y, b = ȳ − M x̄'); otherwise it is kept and M fits Y − b.

The rank of each layer is the one the transform chose. Every other trainable weight is left
as it is (a later ``heal{scope=global}`` trains it: ``heal{scope=sequential},heal{...}``).
No randomness: the result depends only on the program, the teacher and the training rows.

Measured (2026-12-03, all-MiniLM-L6-v2, ``lowrank{method=whitened,budget_params=0.8}``,
calibrated and refit on 384 docstring sentences, 72 training batches of 8×32 tokens): the
refit lowers the factored layers' mean relative output error on the training rows (0.146 →
0.129) but *lowers* the sentence-embedding cosine on held-out ``fortunes`` quotations
(0.843 → 0.799) and on the template corpus (0.862 → 0.818), and raises the held-out
docstring loss (3.08e-4 → 3.20e-4); a ridge (``damp=0.01``) is worse still (0.793). Each
layer's output-MSE optimum on perturbed inputs is not the end-to-end optimum of a
LayerNorm network; the gradient heal (``scope=global`` with ``match=``) is the one that
helps there. The scope stays for programs where the per-layer objective does align (the
small BERT of tests/test_heal.py: held-out loss 1.6e-4 → 3.7e-5 from plain SVD factors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from splice.errors import PassError
from splice.ir.program import Program
from splice.passes.linears import LinearSite, find_factored_linears, find_linears
from splice.passes.lowrank import cholesky_with_jitter, whitened_factors
from splice.passes.subgraphs import GraphTree
from splice.passes.training import ProgramModule

Row = tuple[Any, ...]


def fit_sequential(
    module: ProgramModule,
    teacher: Program,
    t_index: Sequence[int],
    rows: Sequence[Row],
    *,
    damp: float = 0.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Refit ``module``'s trainable low-rank factors in place (see the module docstring);
    returns the stats: sites fitted, and their mean relative output error on ``rows``
    (‖M X' + b − Y‖ / ‖Y‖) before and after."""
    prog = module.program
    params = module.named_program_parameters()
    trainable = {n for n, p in params.items() if p.requires_grad}
    factored = find_factored_linears(prog, GraphTree(prog))
    sites = [s for s in factored if s.path == "" and set(s.factors or ()) <= trainable]
    if not sites:
        raise PassError(
            f"heal{{scope=sequential}}: program {prog.name!r} has no factored Linear "
            "(splice::lowrank_linear of the top graph) whose factors train",
            hint="run lowrank before heal{scope=sequential}, and keep its factors in train= "
            "(train=new does); other transforms heal with scope=global or scope=local",
        )
    dense = {s.layer: s for s in find_linears(teacher) if s.factors is None and s.path == ""}
    for s in sites:
        t = dense.get(s.layer)
        if t is None:
            raise PassError(
                f"heal{{scope=sequential}}: the teacher has no dense Linear of layer "
                f"{s.layer!r} for %{s.node.name}",
                hint="scope=sequential fits each factored Linear to the teacher's Linear of "
                "the same layer; use scope=global when the teacher is not the dense program",
            )
        if s.bias is not None and not (s.bias.op == "get_attr" and s.bias.target in params):
            raise PassError(
                f"heal{{scope=sequential}}: the bias of %{s.node.name} is not a weight",
                hint="use scope=global",
            )
    order = {n: i for i, n in enumerate(prog.graph.nodes)}
    groups: dict[str, list[LinearSite]] = {}
    for s in sorted(sites, key=lambda s: order[s.x]):
        groups.setdefault(s.x.name, []).append(s)
    before: list[float] = []
    after: list[float] = []
    jitter = 0.0
    done = 0
    student = _Stream(prog, rows)
    t_stream = _Stream(teacher, [tuple(r[i] for i in t_index) for r in rows])
    for x_name, group in groups.items():
        stats = _statistics(student, t_stream, x_name, [dense[s.layer] for s in group])
        G, sx, N = stats["G"], stats["sx"], stats["N"]
        for s, (C, sy, yy) in zip(group, stats["Y"]):
            a_name, b_name = s.factors  # type: ignore[misc]
            A0, B0 = params[a_name], params[b_name]
            bias = s.bias.target if s.bias is not None else None  # type: ignore[union-attr]
            b0 = params[bias].detach().double() if bias is not None else None
            fit_bias = bias is not None and bias in trainable
            err = _Error(G, C, sx, sy, yy, N)
            before.append(err.relative(A0.detach().double() @ B0.detach().double(), b0))
            A, B, b, jit = _reduced_rank(G, C, sx, sy, N, int(A0.shape[1]), b0, fit_bias, damp)
            jitter = max(jitter, jit)
            after.append(err.relative(A @ B, b))
            with torch.no_grad():
                A0.copy_(A.to(A0.dtype))
                B0.copy_(B.to(B0.dtype))
                if fit_bias and b is not None:
                    params[bias].copy_(b.to(params[bias].dtype))  # type: ignore[index]
            done += 1
            if progress is not None:
                progress(f"heal: sequential fit of {s.layer}", done, len(sites))
    out: dict[str, Any] = {
        "sites": len(sites),
        "inputs": len(groups),
        "error_before": sum(before) / len(before),
        "error_after": sum(after) / len(after),
    }
    if len(factored) > len(sites):
        out["not_fitted"] = len(factored) - len(sites)
    if jitter:
        out["jitter"] = jitter
    return out


class _Stream:
    """A program run forward in stages over every row: between stages only the *live* values
    (computed so far and read later) are kept, so each stage runs from where the last one
    stopped instead of from the program's inputs. The weights are read at each stage, so a
    stage sees the factors refit before it."""

    def __init__(self, prog: Program, rows: Sequence[Row]):
        self.prog = prog
        self.nodes = [n for n in prog.graph.nodes if n.op in ("placeholder", "call_function")]
        self.pos = {n.name: i for i, n in enumerate(prog.graph.nodes)}
        self.rows = [list(r) for r in rows]
        self._start()

    def _start(self) -> None:
        self.names = list(self.prog.input_names)
        self.cache = [list(r) for r in self.rows]
        self.at = -1

    def advance(self, wanted: list[str], upto: int) -> list[list[Any]]:
        """The ``wanted`` values for every row; the stream then holds the values live after
        graph position ``upto`` (at least as far as ``wanted``)."""
        if upto < self.at:
            self._start()
        live = [
            n.name
            for n in self.nodes
            if self.pos[n.name] <= upto and any(self.pos[u.name] > upto for u in n.users)
        ]
        outs = list(dict.fromkeys([*wanted, *live]))
        stage = self.prog.extract(self.names, outs, name="heal_sequential_stage")
        got: list[list[Any]] = []
        cache = []
        with torch.no_grad():
            for values in self.cache:
                res = dict(zip(outs, stage.run(*values)))
                got.append([res[w] for w in wanted])
                cache.append([res[n] for n in live])
        self.names, self.cache, self.at = live, cache, upto
        return got


def _statistics(
    student: _Stream,
    teacher: _Stream,
    x_name: str,
    linears: list[LinearSite],
) -> dict[str, Any]:
    """Over the rows: G = Σ x'x'ᵀ, Σ x', the sample count, and per teacher Linear
    (C = Σ y x'ᵀ, Σ y, Σ‖y‖²) — float64, every token a sample."""
    xs = student.advance([x_name], student.pos[x_name])
    t_names = [t.node.name for t in linears]
    ys = teacher.advance(t_names, max(teacher.pos[n] for n in t_names))
    G = sx = None
    N = 0
    Y: list[list[Any]] = [[None, None, 0.0] for _ in linears]
    for (x,), t_out in zip(xs, ys):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        G = x.mT @ x if G is None else G.addmm_(x.mT, x)
        sx = x.sum(0) if sx is None else sx.add_(x.sum(0))
        N += x.shape[0]
        for acc, y in zip(Y, t_out):
            y = y.detach().reshape(-1, y.shape[-1]).double()
            if y.shape[0] != x.shape[0]:
                raise PassError(
                    f"heal{{scope=sequential}}: %{x_name} has {x.shape[0]} rows and the "
                    f"teacher's Linear output {y.shape[0]}",
                    hint="use scope=global",
                )
            acc[0] = y.mT @ x if acc[0] is None else acc[0].addmm_(y.mT, x)
            acc[1] = y.sum(0) if acc[1] is None else acc[1].add_(y.sum(0))
            acc[2] += float((y * y).sum())
    return {"G": G, "sx": sx, "N": N, "Y": [tuple(a) for a in Y]}


class _Error:
    """‖M X' + b − Y‖² from the statistics, relative to ‖Y‖²."""

    def __init__(self, G, C, sx, sy, yy: float, N: int):
        self.G, self.C, self.sx, self.sy, self.yy, self.N = G, C, sx, sy, yy, N

    def relative(self, M: torch.Tensor, b: torch.Tensor | None) -> float:
        e = float(torch.einsum("ij,jk,ik->", M, self.G, M)) - 2 * float((M * self.C).sum())
        e += self.yy
        if b is not None:
            e += 2 * float(b @ (M @ self.sx)) + self.N * float(b @ b) - 2 * float(b @ self.sy)
        return max(e, 0.0) ** 0.5 / max(self.yy, 1e-300) ** 0.5


def _reduced_rank(
    G: torch.Tensor,
    C: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
    N: int,
    k: int,
    b0: torch.Tensor | None,
    fit_bias: bool,
    damp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(A, B, bias, jitter): the rank-k M = A·B minimising ‖M X' + b − Y‖_F (float64)."""
    if fit_bias:
        xm, ym = sx / N, sy / N
        Gf = G - N * torch.outer(xm, xm)
        Cf = C - N * torch.outer(ym, xm)
    else:
        Gf = G
        Cf = C if b0 is None else C - torch.outer(b0, sx)
    if damp > 0:
        Gf = Gf + damp * float(torch.diagonal(Gf).mean()) * torch.eye(len(Gf), dtype=Gf.dtype)
    L, jitter = cholesky_with_jitter(Gf)
    # M_ls L = Cf G⁻¹ L = Cf L⁻ᵀ =: Z, i.e. L Zᵀ = Cfᵀ
    Z = torch.linalg.solve_triangular(L, Cf.mT, upper=False).mT
    f = whitened_factors(Z, L, jitter)
    A, B = f.A[:, :k], f.B[:k]
    b = (sy / N - A @ (B @ (sx / N))) if fit_bias else b0
    return A, B, b, jitter


__all__ = ["fit_sequential"]
