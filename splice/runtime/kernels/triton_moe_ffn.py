"""Triton kernels for ``splice::moe_ffn``: grouped products over the selected experts only.

Semantics are those of :func:`splice.ir.ops._moe_ffn_ref`; the routing (router logits, the
top-k / top-p rule and the gate values, an [N, E] problem) runs as the same torch code,
:func:`splice.ir.ops.moe_gates`, so every backend selects exactly the same experts. The
expert work — all the FLOPs and weight bytes — runs in two kernels over (token, expert)
*pairs* of the selection, grouped by expert:

1. **Alignment** (host, torch, :func:`align_pairs`): the selected pairs are sorted by
   expert and each expert's group is padded to a multiple of ``BLOCK_T`` rows (the usual
   MoE "align block size" step), giving ``tok[P]`` (the token of each row, -1 for
   padding), ``gate[P]`` and ``block_expert[P / BLOCK_T]``. Sizes are static upper bounds
   (no data-dependent shapes, so the launcher traces under ``torch.compile``); blocks of
   no expert (-1) return at once, and experts no token selected get no block.
2. **Up** (:func:`_moe_up_kernel`, grid blocks × s-tiles): a program takes one block of
   ``BLOCK_T`` rows that share expert e, gathers their tokens' rows of x, and computes
   ``h = x w_in[e]ᵀ (+ b_in[e])`` — and ``g = x w_gate[e]ᵀ (+ b_gate[e])`` when gated —
   over d in ``BLOCK_D`` chunks with ``tl.dot``; then ``a = act(h)`` or ``act(g) ⊙ h``,
   times the row's gate, stored to ``a[P, s]``. It reads only rows of expert e.
3. **Down** (:func:`_moe_down_kernel`, grid blocks × output tiles):
   ``y_pair = a[rows] · w_out[e]`` over s, stored per pair.
4. The per-pair outputs are summed into their tokens (``index_add_``, deterministic) in
   fp32 and ``b_out`` is added once.

A decode step (one token, k experts) is k blocks of one valid row each: the kernels read
k/E of the expert weights. Accumulation is fp32 (``input_precision="ieee"`` for fp32
unless TF32 is allowed, as in :mod:`.triton_lowrank_linear`); under ``TRITON_INTERPRET=1`` a
bfloat16 ``tl.dot`` is upcast to fp32 first (triton-lang/triton#11584). Block sizes are
defaults, not tuned (tuning needs a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splice.errors import LoweringError
from splice.ir.ops import MOE_ACTIVATIONS, moe_gates
from splice.runtime.kernels.triton_common import dot_precision, is_fake_tensor

#: activation name -> the ACT code the kernels switch on
ACT_CODES = {name: i for i, name in enumerate(MOE_ACTIVATIONS)}


@triton.jit
def _act(h, ACT: tl.constexpr):
    # codes follow MOE_ACTIVATIONS: relu, gelu, gelu_tanh, silu, sigmoid, tanh, quick_gelu, relu2
    if ACT == 0:
        out = tl.maximum(h, 0.0)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 3:
        out = h * tl.sigmoid(h)
    elif ACT == 4:
        out = tl.sigmoid(h)
    elif ACT == 5:
        out = 2.0 * tl.sigmoid(2.0 * h) - 1.0
    elif ACT == 6:
        out = h * tl.sigmoid(1.702 * h)
    else:
        r = tl.maximum(h, 0.0)
        out = r * r
    return out


@triton.jit
def _moe_up_kernel(
    x_ptr, tok_ptr, gv_ptr, block_expert_ptr,
    w_in_ptr, b_in_ptr, w_gate_ptr, b_gate_ptr, a_ptr,
    d, s,
    stride_xm, stride_xd,
    stride_wie, stride_wis, stride_wid,
    stride_bie, stride_bis,
    stride_wge, stride_wgs, stride_wgd,
    stride_bge, stride_bgs,
    stride_am, stride_as,
    HAS_B_IN: tl.constexpr, GATED: tl.constexpr, HAS_B_GATE: tl.constexpr,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b).to(tl.int64)
    if e < 0:  # a block past the last expert's group
        return
    rows = pid_b * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = tl.load(tok_ptr + rows)
    valid = tok >= 0
    tok = tl.where(valid, tok, 0).to(tl.int64)
    cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    col_ok = cols < s
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    accg = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    x_rows = x_ptr + tok[:, None] * stride_xm
    wi = w_in_ptr + e * stride_wie + cols.to(tl.int64)[None, :] * stride_wis
    wg = w_gate_ptr + e * stride_wge + cols.to(tl.int64)[None, :] * stride_wgs
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < d
        xt = tl.load(
            x_rows + dd[None, :] * stride_xd, mask=valid[:, None] & d_ok[None, :], other=0.0
        )
        # W tiles loaded as [BLOCK_D, BLOCK_S] (rows of expert e, transposed by the strides)
        wt = tl.load(wi + dd[:, None] * stride_wid, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        if GATED:
            gt = tl.load(
                wg + dd[:, None] * stride_wgd, mask=d_ok[:, None] & col_ok[None, :], other=0.0
            )
            if DOT_F32:
                gt = gt.to(tl.float32)
            accg = tl.dot(xt, gt, accg, input_precision=PRECISION)
    if HAS_B_IN:
        b = tl.load(b_in_ptr + e * stride_bie + cols * stride_bis, mask=col_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    if GATED:
        if HAS_B_GATE:
            bg = tl.load(b_gate_ptr + e * stride_bge + cols * stride_bgs, mask=col_ok, other=0.0)
            accg += bg.to(tl.float32)[None, :]
        a = _act(accg, ACT) * acc
    else:
        a = _act(acc, ACT)
    gv = tl.load(gv_ptr + rows, mask=valid, other=0.0)
    a = a * gv[:, None]
    ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :] * stride_as
    tl.store(ptrs, a.to(a_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    a_ptr, tok_ptr, block_expert_ptr, w_out_ptr, yp_ptr,
    s, d_out,
    stride_am, stride_as,
    stride_woe, stride_wos, stride_woo,
    stride_ym, stride_yo,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b).to(tl.int64)
    if e < 0:
        return
    rows = pid_b * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tl.load(tok_ptr + rows) >= 0
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < d_out
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    wo = w_out_ptr + e * stride_woe + outs.to(tl.int64)[None, :] * stride_woo
    for s0 in range(0, s, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < s
        at = tl.load(
            a_rows + ss[None, :] * stride_as, mask=valid[:, None] & s_ok[None, :], other=0.0
        )
        wt = tl.load(wo + ss[:, None] * stride_wos, mask=s_ok[:, None] & out_ok[None, :], other=0.0)
        if DOT_F32:
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(at, wt, acc, input_precision=PRECISION)
    ptrs = yp_ptr + rows.to(tl.int64)[:, None] * stride_ym + outs[None, :] * stride_yo
    tl.store(ptrs, acc, mask=valid[:, None] & out_ok[None, :])


# ---------------------------------------------------------------------------------------
# launcher

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted() -> bool:
    """Whether these kernels were built by Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when this module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_moe_up_kernel, InterpretedFunction)


def _pow2_block(size: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(int(size), 1))))


def align_pairs(
    gates: torch.Tensor, block_t: int, max_per_row: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tok [P], gate [P], block_expert [P / block_t]) for the nonzero gates [N, E]: the
    (token, expert) pairs sorted by expert then token, each expert's group padded to a
    multiple of ``block_t`` rows with tok = -1; blocks past the last group have expert -1.

    Every size is static — P = N·max_per_row + E·(block_t − 1) rounded up to block_t, an
    upper bound of the padded total — so the launch grid does not depend on the data and
    the function traces under fake tensors (``torch.compile``) without data-dependent
    shapes; the kernels skip the empty blocks.
    """
    N, E = gates.shape
    dev = gates.device
    P = -(-(N * max_per_row + E * (block_t - 1)) // block_t) * block_t
    sel = gates != 0
    e_idx = torch.arange(E, device=dev)[None, :].expand(N, E)
    t_idx = torch.arange(N, device=dev)[:, None].expand(N, E)
    key = torch.where(sel, e_idx * N + t_idx, N * E).flatten()  # unselected sort last
    order = torch.argsort(key, stable=True)
    key_s = key[order]
    ok = key_s < N * E
    exp = torch.where(ok, key_s // max(N, 1), 0)
    tok = torch.where(ok, key_s % max(N, 1), 0)
    counts = sel.sum(0)
    padded = (counts + block_t - 1) // block_t * block_t
    starts = torch.cumsum(padded, 0) - padded
    group_start = torch.cumsum(counts, 0) - counts
    r = torch.arange(N * E, device=dev)
    dest = torch.where(ok, starts[exp] + r - group_start[exp], P)  # slot P: a dump
    tok_p = torch.full((P + 1,), -1, dtype=torch.int32, device=dev)
    gv_p = torch.zeros((P + 1,), dtype=torch.float32, device=dev)
    tok_p = tok_p.scatter(0, dest, torch.where(ok, tok, -1).to(torch.int32))
    gv_p = gv_p.scatter(0, dest, torch.where(ok, gates.flatten()[order].float(), 0.0))
    # block b belongs to expert e when starts[e] <= b·block_t < starts[e] + padded[e]
    b0 = torch.arange(P // block_t, device=dev)[:, None] * block_t
    inside = (b0 >= starts[None, :]) & (b0 < (starts + padded)[None, :])
    block_expert = torch.where(inside.any(1), inside.int().argmax(1), -1).to(torch.int32)
    return tok_p[:P], gv_p[:P], block_expert


def _check(x: torch.Tensor, tensors: list[torch.Tensor], w_in: torch.Tensor) -> None:
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype for t in tensors):
        raise LoweringError(
            "moe_ffn Triton kernel: x and the expert weights must share one dtype among "
            f"float32, float16, bfloat16; got {sorted({str(t.dtype) for t in [x, *tensors]})}",
            hint="cast the weights, or run the op's reference implementation",
        )
    if len({t.device for t in [x, *tensors]}) != 1:
        raise LoweringError("moe_ffn Triton kernel: inputs on different devices")
    if x.device.type != "cuda" and not is_interpreted():
        raise LoweringError(
            f"moe_ffn Triton kernel: inputs are on {x.device}; Triton kernels run on CUDA",
            hint="move the tensors to a GPU, or set TRITON_INTERPRET=1 before importing "
            "splice.runtime.kernels to run the kernels in Triton's CPU interpreter (tests only)",
        )
    if w_in.dim() != 3 or x.shape[-1] != w_in.shape[2]:
        raise LoweringError(
            f"moe_ffn Triton kernel: x {tuple(x.shape)} and w_in {tuple(w_in.shape)} do not "
            "fit (w_in is [E, s, d] with d = x's last dimension)"
        )


def moe_ffn_triton(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    act: str,
    top_k: int = 0,
    top_p: float = 0.0,
    scale: str = "none",
    weighted: bool = False,
    router_norm: bool = True,
    *,
    block_t: int = 16,
    block_s: int | None = None,
    block_d: int | None = None,
    block_o: int | None = None,
) -> torch.Tensor:
    """``splice::moe_ffn`` through the Triton kernels (see the module docstring); same
    semantics as :func:`splice.ir.ops._moe_ffn_ref`. The ``block_*`` keywords override the
    (untuned) defaults; tests use them to force several tiles at small shapes."""
    if act not in ACT_CODES:
        raise LoweringError(f"moe_ffn Triton kernel: unknown activation {act!r}")
    weights = [t for t in (w_in, b_in, w_gate, b_gate, w_out) if t is not None]
    _check(x, weights, w_in)
    E, s, d = w_in.shape
    d_out = w_out.shape[2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    N = x2.shape[0]
    if is_interpreted() and is_fake_tensor(x2):
        # tracing (torch.export / make_fx) with interpreted kernels: wrap_triton cannot trace
        # an InterpretedFunction, so only the shape is produced (as lowrank_linear does)
        return x.new_empty((*lead, d_out))
    gates = moe_gates(x2, router_w, router_b, top_k, top_p, scale, weighted, router_norm)
    y = torch.zeros((N, d_out), dtype=torch.float32, device=x.device)
    if N and s and d_out:
        tok, gv, block_expert = align_pairs(gates, block_t, top_k if top_k > 0 else E)
        blocks = block_expert.numel()
        if blocks:
            bs = block_s or _pow2_block(s, 64)
            bd = block_d or _pow2_block(d, 64)
            bo = block_o or _pow2_block(d_out, 64)
            dot_f32 = x.dtype == torch.bfloat16 and is_interpreted()
            prec = dot_precision(x.dtype)
            a = torch.empty((tok.numel(), s), dtype=x.dtype, device=x.device)
            gated = w_gate is not None
            dummy = x2
            torch.library.wrap_triton(_moe_up_kernel)[(blocks, triton.cdiv(s, bs))](
                x2, tok, gv, block_expert,
                w_in, b_in if b_in is not None else dummy,
                w_gate if gated else dummy, b_gate if b_gate is not None else dummy, a,
                d, s,
                x2.stride(0), x2.stride(1),
                w_in.stride(0), w_in.stride(1), w_in.stride(2),
                *(b_in.stride() if b_in is not None else (0, 0)),
                *(w_gate.stride() if gated else (0, 0, 0)),
                *(b_gate.stride() if b_gate is not None else (0, 0)),
                a.stride(0), a.stride(1),
                HAS_B_IN=b_in is not None, GATED=gated, HAS_B_GATE=b_gate is not None,
                ACT=ACT_CODES[act], BLOCK_T=block_t, BLOCK_S=bs, BLOCK_D=bd,
                PRECISION=prec, DOT_F32=dot_f32,
            )  # fmt: skip
            yp = torch.zeros((tok.numel(), d_out), dtype=torch.float32, device=x.device)
            torch.library.wrap_triton(_moe_down_kernel)[(blocks, triton.cdiv(d_out, bo))](
                a, tok, block_expert, w_out, yp,
                s, d_out,
                a.stride(0), a.stride(1),
                w_out.stride(0), w_out.stride(1), w_out.stride(2),
                yp.stride(0), yp.stride(1),
                BLOCK_T=block_t, BLOCK_S=bs, BLOCK_O=bo, PRECISION=prec, DOT_F32=dot_f32,
            )  # fmt: skip
            # padding rows of yp stay 0: adding them to token 0 changes nothing
            y.index_add_(0, tok.clamp_min(0).long(), yp)
    if b_out is not None:
        y = y + b_out.float()
    return y.to(x.dtype).reshape(*lead, d_out)


__all__ = ["ACT_CODES", "align_pairs", "is_interpreted", "moe_ffn_triton"]
