"""Partitions of an FFN's neurons into experts, and routers: the numerical half of ``experts``.

Partition of the d_ff neurons into E disjoint sets of s = d_ff/E (the pass's ``split``):

* :func:`balanced_kmeans` (MoEfication's parameter clustering): k-means on the
  L2-normalised rows of W_in (of W_gate for a gated FFN), k-means++ initialisation,
  assignment under the capacity s by rounds of proposals (:func:`balanced_assign`: each
  unassigned neuron proposes to its nearest open cluster; a cluster keeps its nearest
  proposers up to capacity), 3 seeded restarts, the lowest inertia kept;
* :func:`coactivation_partition` (MoEfication's co-activation graph): M = |a| per
  calibration token, each token's row scaled to unit norm; edge weights A = MᵀM (zero
  diagonal); a balanced partition maximising the weight inside parts
  (:func:`inside_weight`): balanced k-means on the neurons' normalised activation
  profiles, then Kernighan–Lin pair swaps between parts while a swap raises the inside
  weight (METIS is not a dependency);
* ``contiguous`` (FactorLLM): S_e = [e·s, (e+1)·s), computed by the pass itself.

Routers: :func:`centroids` gives c_e, the mean of the normalised rows in S_e (MoEfication's
similarity routing); :func:`train_router` fits a linear router from a start (W0, 0) with
Adam and binary cross-entropy on logits against each expert's activation mass
(:func:`expert_mass`: m_e = Σ_{i∈S_e} |a_i| per token), normalised per token.

Every function is deterministic for its seed and independent of the graph: plain tensors in,
plain tensors out.
"""

from __future__ import annotations

import math

import torch

from splice.errors import PassError

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


__all__ = [
    "balanced_assign",
    "balanced_kmeans",
    "centroids",
    "coactivation_partition",
    "expert_mass",
    "inside_weight",
    "parts_of",
    "train_router",
]
