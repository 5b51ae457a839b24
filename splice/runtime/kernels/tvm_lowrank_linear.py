"""TVM lowering of ``splice::lowrank_linear``: one fused kernel for few rows.

:func:`convert_lowrank_linear` is the Relax converter the TVM backend registers for the op
(:mod:`splice.runtime.backends.tvm`). Few rows, or shapes the matmul rule cannot tile, in
fp32 with static shapes: one fused TE kernel (:func:`_lowrank_te`) that keeps ``h = x Bᵀ``
in the call (one call for sibling layers of one shape on the same input), scheduled by the ``lowrank`` rule of :mod:`.tvm_schedules` (tiling from
:func:`~.tvm_schedules.lowrank_plan`); otherwise two ``relax.op.linear``. TVM is imported
lazily, inside the functions that build Relax or TE.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

from splice.ir.ops import lowrank_linear
from splice.runtime.kernels.tvm_common import static_shape
from splice.runtime.kernels.tvm_gemm import MIN_ROWS as GEMM_MIN_ROWS
from splice.runtime.kernels.tvm_schedules import LOWRANK_KERNEL, CpuShape, lowrank_plan

_CPU: contextvars.ContextVar[CpuShape | None] = contextvars.ContextVar(
    "splice_lowrank_cpu", default=None
)


@contextlib.contextmanager
def planning_for(target: Any) -> Iterator[None]:
    """Within the block, :func:`convert_lowrank_linear` plans its fused kernel for
    ``target`` (a :class:`splice.target.Target`: its vector lanes and registers; None: AVX2's,
    as outside any block). The TVM backend wraps its Relax import in it."""
    token = _CPU.set(CpuShape.of(target) if target is not None and target.kind != "cuda" else None)
    try:
        yield
    finally:
        _CPU.reset(token)


LOWRANK_FUSED_MAX_ROWS = 4
"""``splice::lowrank_linear`` with at most this many rows (the product of ``x``'s leading
dimensions) lowers to the fused kernel. More rows lower to two ``linear`` ops when the
matmul rule can tile both (rank and m a whole number of the target's vectors, or at most
four: multiples of 16 or at most 64 on AVX-512, of 8 or at most 32 on AVX2), and to the
fused kernel otherwise — up to the C GEMM kernel's threshold
(:data:`~.tvm_gemm.MIN_ROWS`): from there on both linears become calls of the C kernel,
which takes any width. On a 2-core AVX-512 Xeon at 256 rows the two C GEMM calls beat the
fused kernel by 1.2–1.45× on MiniLM's shapes (384×384 at rank 153: 305 vs 377 µs;
1536×384 at rank 245: 981 vs 1425 µs), where before the threshold an untileable rank kept
the fused kernel at every row count; and a rank that was a multiple of 8 but not of 16 went
to an unscheduled two-linear path on AVX-512 (MiniLM at ``lowrank{ratio=0.8}`` with ranks
padded to 8: 55.8 ms against 5.6 ms fused for 32 tokens).

Measured with one-op programs on the 2-core EPYC VM (m = n = 2048, k = 512, weights
L3-resident, median of 10 alternating rounds): fused vs two matmuls 153 vs 157 µs at M = 1,
147 vs 144 at M = 2, 136 vs 137 at M = 4, then 2–7% slower fused at M = 8, 16, 32 (486 vs
475, 634 vs 590, 1364 vs 1305 µs). From DRAM at M = 1 the two are within 3% (403 vs 411
µs). When the rank is not a multiple of 8 (k = 750 for 5632×2048 at 50%) the matmul rule
cannot tile ``x Bᵀ`` and the two-linear path is 2–10× slower than the fused kernel at
every M measured (1–128)."""


def _matmul_tileable(n_out: int, lanes: int) -> bool:
    """The matmul rule has a panel width for ``n_out`` output columns on a target with
    ``lanes`` fp32 lanes per vector (:func:`~.tvm_schedules.matmul_candidates`: a whole
    number of vectors, or at most four)."""
    return n_out % lanes == 0 or n_out <= 4 * lanes


def _lowrank_te(x: Any, Ap: Any, Bp: Any, bias: Any, *, m: int, plan: Any, groups: int = 1) -> Any:
    """TE of the fused kernel, for ``x`` with M rows (its leading dimensions) and n columns:

    * ``lowrank_hs[M, s1, kp]``: ``x Bᵀ`` with the n-long reduction cut into ``s1`` segments,
      each accumulated on its own (``s1`` independent streams through the weight panel);
    * ``lowrank_h[M, kp]``: the sum of the segments;
    * ``lowrank_ys[M, s2, mp]`` and ``lowrank_y[M, mp]``: the same for ``h Aᵀ`` (kp long);
    * ``lowrank_out``: ``y[:, :m] + bias`` in ``x``'s leading shape.

    ``Bp[kp/nb1, n, nb1]`` and ``Ap[mp/nb2, kp, nb2]`` are B and A packed into column
    panels, zero-padded to ``kp`` and ``mp`` (k and m rounded up to multiples of the vector
    lanes); ``plan`` is the :class:`~.tvm_schedules.LowRankPlan`.

    ``groups`` > 1: G layers of one shape that read the same ``x`` (a decoder's q, k and v
    projections) in one call: ``Bp[G·kp/nb1, n, nb1]`` and ``Ap[G·mp/nb2, kp, nb2]`` hold
    the layers' packed factors one after the other (``mp == m``), ``h`` is ``[M, G·kp]``,
    output column j belongs to layer ``j // m`` and reads that layer's ``kp`` entries of
    ``h``; the output is ``[.., G·m]``, the layers' outputs side by side.
    ``tvm_schedules.schedule_lowrank`` schedules the blocks by name.
    """
    from tvm import te

    lead = [int(d) for d in x.shape[:-1]]
    n = int(x.shape[-1])
    rows = math.prod(lead)
    kp, mp, nb1, nb2, s1, s2 = plan.kp, plan.mp, plan.nb1, plan.nb2, plan.s1, plan.s2
    len1, len2 = n // s1, kp // s2

    def unravel(i: Any) -> list[Any]:  # a row of h -> x's leading indices
        idx = []
        for d in reversed(lead):
            idx.append(i % d)
            i = i // d
        return idx[::-1]

    def ravel(idx: Sequence[Any]) -> Any:  # x's leading indices -> a row of h
        out: Any = 0
        for d, v in zip(lead, idx):
            out = out * d + v
        return out

    r = te.reduce_axis((0, len1), name="r")
    hp = groups * kp  # h's columns: every layer's kp
    hs = te.compute(
        (rows, s1, hp),
        lambda i, g, c: te.sum(
            x[(*unravel(i), g * len1 + r)] * Bp[c // nb1, g * len1 + r, c % nb1], axis=r
        ),
        name="lowrank_hs",
    )
    g1 = te.reduce_axis((0, s1), name="g1")
    h = te.compute((rows, hp), lambda i, c: te.sum(hs[i, g1, c], axis=g1), name="lowrank_h")
    t = te.reduce_axis((0, len2), name="t")

    def first(j: Any) -> Any:  # the first column of h that output column j reads
        return (j // mp) * kp if groups > 1 else 0

    ys = te.compute(
        (rows, s2, groups * mp),
        lambda i, g, j: te.sum(
            h[i, first(j) + g * len2 + t] * Ap[j // nb2, g * len2 + t, j % nb2], axis=t
        ),
        name="lowrank_ys",
    )
    g2 = te.reduce_axis((0, s2), name="g2")
    y = te.compute(
        (rows, groups * mp), lambda i, j: te.sum(ys[i, g2, j], axis=g2), name="lowrank_y"
    )
    width = groups * m
    if bias is None:
        return te.compute(
            (*lead, width), lambda *idx: y[ravel(idx[:-1]), idx[-1]], name="lowrank_out"
        )
    return te.compute(
        (*lead, width), lambda *idx: y[ravel(idx[:-1]), idx[-1]] + bias[idx[-1]], name="lowrank_out"
    )


_GROUPED = "_splice_lowrank_grouped"
"""Attribute of the Relax importer: FX node -> its output, for the layers of a grouped call
that were converted with the first of them."""


def convert_lowrank_linear(node: Any, importer: Any) -> Any:
    """``y = (x Bᵀ) Aᵀ + bias``, A ``[m, k]``, B ``[k, n]``, ``rank`` r: the prefix A[:, :r], B[:r].

    Few rows (decode, at most :data:`LOWRANK_FUSED_MAX_ROWS`) or shapes the matmul rule
    cannot tile, fp32 and static shapes: one fused kernel (``_lowrank_te``, scheduled by
    the ``lowrank`` rule). A and B are sliced to the rank, zero-padded and packed into
    column panels by Relax ops that depend on the parameters only, so
    ``LiftTransformParams`` moves that work into ``main_transform_params`` (run once at load
    time); the kernel streams each weight byte once, and ``h = x Bᵀ`` never leaves the
    call. Otherwise: two ``relax.op.linear``.

    Layers of one shape and rank that read the same ``x`` (a decoder layer's q, k and v, or
    its gate and up projections, after ``lowrank``) share one fused call when their output
    width is a whole number of vectors: their factors are stacked at load time, the call
    computes every layer's output, and each layer takes its slice. A call is two parallel
    loops; a decode step of a 4-layer LLaMA after ``lowrank`` makes 16 calls instead of 28.
    """
    from tvm import relax

    done = getattr(importer, _GROUPED, None)
    if done is not None and node in done:
        return done[node]
    v = _bind(node, importer)
    bb = importer.block_builder
    shape = _fused_shape(v)
    if shape is None:
        A, B = _ranked(bb, v)
        h = bb.emit(relax.op.linear(v.x, B, None, "float32"))
        return bb.emit(relax.op.linear(h, A, v.bias, "float32"))
    rows, m, n, r = shape
    plan = lowrank_plan(rows, m, n, r, _CPU.get())
    members = [(node, v)]
    if plan.mp == m:
        members += _siblings(node, importer, shape, v.bias is not None)
    kp, mp, nb1, nb2 = plan.kp, plan.mp, plan.nb1, plan.nb2
    As, Bs, biases = [], [], []
    for _, w in members:
        A, B = _ranked(bb, w)
        # zero padding: B's rows and A's columns to kp (h's padded entries are 0), A's rows
        # to mp (the padded outputs are computed, not stored)
        if kp != r:
            B = bb.emit(relax.op.nn.pad(B, [0, kp - r, 0, 0]))
        if kp != r or mp != m:
            A = bb.emit(relax.op.nn.pad(A, [0, mp - m, 0, kp - r]))
        As.append(A)
        Bs.append(B)
        biases.append(w.bias)
    groups = len(members)
    A = As[0] if groups == 1 else bb.emit(relax.op.concat(As, axis=0))  # [G·mp, kp]
    B = Bs[0] if groups == 1 else bb.emit(relax.op.concat(Bs, axis=0))  # [G·kp, n]
    bias = biases[0] if groups == 1 or biases[0] is None else bb.emit(relax.op.concat(biases, 0))
    Bp = bb.emit(
        relax.op.permute_dims(relax.op.reshape(B, (groups * kp // nb1, nb1, n)), [0, 2, 1])
    )  # [G·kp/nb1, n, nb1]
    Ap = bb.emit(
        relax.op.permute_dims(relax.op.reshape(A, (groups * mp // nb2, nb2, kp)), [0, 2, 1])
    )  # [G·mp/nb2, kp, nb2]
    attrs = {
        "op_pattern": 8,  # kOpaque: FuseOps leaves the call (and its packed operands) alone
        "splice.kernel": LOWRANK_KERNEL,
        "splice.rows": rows,
        "splice.m": m,
        "splice.n": n,
        "splice.k": r,
        "splice.groups": groups,
        **{f"splice.{key}": value for key, value in plan.to_json().items()},
    }
    out = bb.emit(
        bb.call_te(
            # call_te takes Relax/TE kwargs only
            functools.partial(_lowrank_te, m=m, plan=plan, groups=groups),
            v.x,
            Ap,
            Bp,
            bias,
            primfunc_name_hint="lowrank_linear",
            primfunc_attrs=attrs,
        )
    )
    if groups == 1:
        return out
    axis = len(static_shape(v.x)) - 1
    outputs = {
        member: bb.emit(relax.op.strided_slice(out, axes=[axis], begin=[g * m], end=[g * m + m]))
        for g, (member, _) in enumerate(members)
    }
    if done is None:
        done = {}
        setattr(importer, _GROUPED, done)
    done.update(outputs)
    return outputs[node]


def _bind(node: Any, importer: Any) -> Any:
    return lowrank_linear.bind(
        *importer.retrieve_args(node), **importer._retrieve_args(dict(node.kwargs))
    )


def _fp32(e: Any) -> bool:
    return str(getattr(getattr(e, "ty", None), "dtype", "")) == "float32"


def _rank(v: Any, k: int) -> int:
    """The rank the call computes with: its ``rank`` clamped to [0, k], k when it has none."""
    return k if v.rank is None else max(0, min(int(v.rank), k))


def _fused_shape(v: Any) -> tuple[int, int, int, int] | None:
    """(rows, m, n, rank) when the call lowers to the fused kernel, else None."""
    xs, As, Bs = static_shape(v.x), static_shape(v.A), static_shape(v.B)
    if xs is None or As is None or Bs is None:
        return None
    r = _rank(v, As[1])
    rows = _numel(xs[:-1])
    lanes = (_CPU.get() or CpuShape()).lanes
    fused = (
        r > 0
        and all(_fp32(t) for t in (v.x, v.A, v.B))
        and (v.bias is None or _fp32(v.bias))
        and rows >= 1
        and (
            rows <= LOWRANK_FUSED_MAX_ROWS
            or (
                rows < GEMM_MIN_ROWS
                and not (_matmul_tileable(r, lanes) and _matmul_tileable(As[0], lanes))
            )
        )
    )
    return (rows, As[0], Bs[1], r) if fused else None


def _ranked(bb: Any, v: Any) -> tuple[Any, Any]:
    """A[:, :rank] and B[:rank] (the call's own A and B without a rank below k)."""
    from tvm import relax

    As = static_shape(v.A)
    r = None if As is None else _rank(v, As[1])
    if r is None or r == As[1]:
        return v.A, v.B
    A = bb.emit(relax.op.strided_slice(v.A, axes=[1], begin=[0], end=[r]))
    B = bb.emit(relax.op.strided_slice(v.B, axes=[0], begin=[0], end=[r]))
    return A, B


def _siblings(node: Any, importer: Any, shape: tuple[int, ...], bias: bool) -> list[Any]:
    """The other lowrank_linear calls on ``node``'s input not converted yet (the importer
    converts in graph order, so a compatible one before ``node`` would have taken ``node``
    into its own call) that lower to the fused kernel with the same (rows, m, n, rank) and
    bias presence, and whose operands are already converted (parameters): (node, bound
    arguments), in the input's order of uses."""
    if not node.args:
        return []
    found = []
    for user in node.args[0].users:
        if (
            user is node
            or user in importer.env
            or user.target is not node.target
            or user.args[:1] != node.args[:1]
        ):
            continue
        try:
            w = _bind(user, importer)
        except (KeyError, TypeError):  # an operand computed later in the graph
            continue
        if _fused_shape(w) == shape and (w.bias is not None) == bias:
            found.append((user, w))
    return found


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


__all__ = ["LOWRANK_FUSED_MAX_ROWS", "convert_lowrank_linear", "planning_for"]
