"""Triton kernels for ``splice::lowrank_linear``: y = (x Bᵀ) Aᵀ + bias.

Shapes: x is flattened to ``[M, n]`` (M rows = batch × sequence), ``B: [k, n]``,
``A: [m, k]``, ``bias: [m]``; a run-time ``rank`` r ≤ k uses the prefixes ``A[:, :r]``,
``B[:r]``, passed to the kernels as the full tensors' pointers and strides plus ``r`` (no
copy). Neither kernel ever writes the rank-r intermediate ``h = x Bᵀ`` to global memory: it
is produced tile by tile in registers and consumed by the second contraction in the same
program. That is the point of the factorisation in LLM decode, where the op is
memory-bound: the dense ``W`` costs ``m·n`` reads, the factors ``r·(m + n)``, and a round
trip of ``h`` through global memory (plus a second launch) would eat part of that win.

Two kernels, chosen by the launcher on M:

* **GEMV / decode path** (``M ≤ 16``, :func:`_lowrank_gemv_kernel`). The grid is over
  *rank chunks* of ``BLOCK_R`` (× an optional split of the outputs, ``SPLIT_M``). Program
  ``(c, s)`` computes ``h_c = x · B[c]ᵀ`` (``[M, BLOCK_R]``, x padded to 16 rows for
  ``tl.dot``) over all of ``n``, reading its chunk of ``B`` once, then walks its share of
  the output columns and adds ``h_c · A[:, c]ᵀ`` into ``y``. Since
  ``y = Σ_c h_c A[:, c]ᵀ`` the chunks are independent; with more than one chunk the
  partial products are combined with ``tl.atomic_add`` into an fp32 buffer (with one
  chunk, a plain store). Bias is added by chunk 0. With ``SPLIT_M = 1`` every element of
  ``A`` and ``B`` is read exactly once overall and x (tiny at decode) once per chunk.
  ``SPLIT_M > 1`` buys parallelism when ``r / BLOCK_R`` is below the SM count, at the
  price of re-reading the ``B`` chunk ``SPLIT_M`` times; those re-reads are issued by
  concurrent programs and are expected to hit L2 (to be measured on a GPU).
* **GEMM path** (``M > 16``, :func:`_lowrank_gemm_kernel`). The grid is over
  ``(row block, output block)``; each program loops over rank chunks, computes
  ``h = X_blk · B[c]ᵀ`` (loop over n tiles, ``tl.dot``) and immediately accumulates
  ``acc += h · A[m_blk, c]ᵀ``. ``h`` lives in registers; ``B`` (and x) are re-read once
  per output block, the usual price of a fused two-GEMM kernel — at prefill sizes the
  op is compute-bound and these re-reads come from L2.

Precision: accumulation is fp32. fp32 inputs use ``input_precision="ieee"`` unless
``torch.get_float32_matmul_precision()`` allows TF32 (mirroring what ``F.linear`` does);
fp16/bf16 inputs use tensor-core dots with fp32 accumulation, and ``h`` is rounded to the
input dtype before the second dot, as the two-``linear`` reference does. Atomic
accumulation makes the GEMV path's summation order, hence its last bits, run-dependent.

Under ``TRITON_INTERPRET=1`` a bfloat16 ``tl.dot`` is not supported (the interpreter
multiplies raw bit patterns, triton-lang/triton#11584), so there — and only there — the
launcher sets ``DOT_F32`` and the operands of each dot are upcast to fp32 first; the loads,
roundings, atomics and stores are the same code as on the GPU.

Block sizes are defaults, not tuned: tuning (and the ``SPLIT_M`` heuristic) needs a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splice.errors import LoweringError
from splice.runtime.kernels.triton_common import dot_precision, is_fake_tensor

#: largest number of rows that take the GEMV (decode) path
GEMV_MAX_ROWS = 16


@triton.jit
def _h_chunk(
    x_ptr,
    b_ptr,
    rows,
    ranks,
    n_rows,
    n_in,
    rank,
    stride_xm,
    stride_xn,
    stride_bk,
    stride_bn,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """h[rows, ranks] = Σ_n x[rows, n] · B[ranks, n], accumulated in fp32 registers."""
    h = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    row_ok = rows < n_rows
    rank_ok = ranks < rank
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    b_col = b_ptr + ranks.to(tl.int64)[None, :] * stride_bk
    for n0 in range(0, n_in, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_in
        xt = tl.load(x_row + cols[None, :] * stride_xn, mask=row_ok[:, None] & col_ok[None, :])
        # B tile loaded as [BLOCK_N, BLOCK_R] (Bᵀ) straight from memory: no transpose op
        bt = tl.load(b_col + cols[:, None] * stride_bn, mask=col_ok[:, None] & rank_ok[None, :])
        if DOT_F32:
            xt = xt.to(tl.float32)
            bt = bt.to(tl.float32)
        h = tl.dot(xt, bt, h, input_precision=PRECISION)
    return h


@triton.jit
def _lowrank_gemv_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    n_rows,
    n_in,
    n_out,
    rank,
    stride_xm,
    stride_xn,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_bias,
    stride_ym,
    stride_yo,
    HAS_BIAS: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    SPLIT_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_B)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rank_ok = ranks < rank

    # 1) this chunk of h, over all of n: reads B[chunk] once; h stays in registers
    h = _h_chunk(
        x_ptr, b_ptr, rows, ranks, n_rows, n_in, rank, stride_xm, stride_xn,
        stride_bk, stride_bn, BLOCK_B, BLOCK_R, BLOCK_N, PRECISION, DOT_F32,
    )  # fmt: skip
    h = h.to(a_ptr.dtype.element_ty)  # rounded to the input dtype, as the reference's h is
    if DOT_F32:
        h = h.to(tl.float32)

    # 2) y[:, share] += h · A[share, chunk]ᵀ; this program's share of the outputs is a
    #    contiguous run of BLOCK_M tiles
    tiles = tl.cdiv(n_out, BLOCK_M)
    per_split = tl.cdiv(tiles, SPLIT_M)
    start = pid_s * per_split * BLOCK_M
    stop = tl.minimum(start + per_split * BLOCK_M, n_out)
    bias_lim = tl.where(pid_r == 0, n_out, 0)  # only chunk 0 adds the bias
    a_base = a_ptr + ranks[:, None] * stride_ak
    y_row = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    for m0 in range(start, stop, BLOCK_M):
        outs = m0 + tl.arange(0, BLOCK_M)
        out_ok = outs < n_out
        # A tile loaded as [BLOCK_R, BLOCK_M] (A[share, chunk]ᵀ)
        at = tl.load(
            a_base + outs.to(tl.int64)[None, :] * stride_am,
            mask=rank_ok[:, None] & out_ok[None, :],
        )
        if DOT_F32:
            at = at.to(tl.float32)
        part = tl.dot(h, at, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + outs * stride_bias, mask=outs < bias_lim, other=0.0)
            part += bias.to(tl.float32)[None, :]
        ptrs = y_row + outs[None, :] * stride_yo
        mask = row_ok[:, None] & out_ok[None, :]
        if USE_ATOMIC:
            tl.atomic_add(ptrs, part, mask=mask)
        else:
            tl.store(ptrs, part.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lowrank_gemm_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    n_rows,
    n_in,
    n_out,
    rank,
    stride_xm,
    stride_xn,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_bias,
    stride_ym,
    stride_yo,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    out_ok = outs < n_out
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    a_row = a_ptr + outs.to(tl.int64)[None, :] * stride_am
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        h = _h_chunk(
            x_ptr, b_ptr, rows, ranks, n_rows, n_in, rank, stride_xm, stride_xn,
            stride_bk, stride_bn, BLOCK_B, BLOCK_R, BLOCK_N, PRECISION, DOT_F32,
        )  # fmt: skip
        # A tile as [BLOCK_R, BLOCK_M] (A[m_blk, chunk]ᵀ)
        at = tl.load(
            a_row + ranks[:, None] * stride_ak,
            mask=(ranks < rank)[:, None] & out_ok[None, :],
        )
        h = h.to(a_ptr.dtype.element_ty)
        if DOT_F32:
            h = h.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(h, at, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs * stride_bias, mask=out_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + outs[None, :] * stride_yo
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


# ---------------------------------------------------------------------------------------
# launcher

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pow2_block(size: int, cap: int, floor: int = 16) -> int:
    """The smallest power of two ≥ size, clamped to [floor, cap] (tl.dot needs ≥ 16)."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(size), 1))))


def is_interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when this module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lowrank_gemm_kernel, InterpretedFunction)


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0] or x.shape[-1] != B.shape[1]:
        raise LoweringError(
            f"lowrank_linear: shapes x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
            "do not fit y = (x Bᵀ) Aᵀ with A [m, k], B [k, n]"
        )
    if not (x.dtype == A.dtype == B.dtype) or x.dtype not in _DTYPES:
        raise LoweringError(
            f"lowrank_linear Triton kernel: x, A, B are {x.dtype}, {A.dtype}, {B.dtype}; "
            "it takes one dtype among float32, float16, bfloat16",
            hint="cast the factors, or run the op's reference implementation",
        )
    tensors = [x, A, B] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise LoweringError(
            "lowrank_linear Triton kernel: inputs on different devices: "
            + ", ".join(str(t.device) for t in tensors)
        )
    if x.device.type != "cuda" and not is_interpreted():
        raise LoweringError(
            f"lowrank_linear Triton kernel: inputs are on {x.device}; Triton kernels run on CUDA",
            hint="move the tensors to a GPU, or set TRITON_INTERPRET=1 before importing "
            "splice.runtime.kernels to run the kernels in Triton's CPU interpreter (tests only)",
        )


def _default_split_m(device: torch.device, rank_chunks: int, out_tiles: int) -> int:
    """Output split of the GEMV path: enough programs for ~2 per SM, at most 8."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(out_tiles, 8, triton.cdiv(2 * sms, rank_chunks)))


def lowrank_linear_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int | None = None,
    *,
    block_r: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    block_b: int | None = None,
    split_m: int | None = None,
) -> torch.Tensor:
    """``splice::lowrank_linear`` through the Triton kernels; same semantics as
    :func:`splice.ir.ops._lowrank_linear_ref`.

    ``M = x.numel() // n`` rows of at most :data:`GEMV_MAX_ROWS` take the GEMV path, larger
    ones the GEMM path. The ``block_*`` and ``split_m`` keywords override the (untuned)
    defaults (``block_b``, rows per program, only on the GEMM path: the GEMV path pads its
    ≤ 16 rows to one 16-row tile); tests use them to force several rank chunks and output
    splits at small shapes. Kernels are launched through ``torch.library.wrap_triton`` so this function
    can be the body of a ``torch.library.triton_op``.
    """
    _check(x, A, B, bias)
    n = B.shape[1]
    m, k = A.shape
    r = k if rank is None else max(0, min(int(rank), k))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)  # a view when possible; the kernels take any strides
    rows = x2.shape[0]
    kernel_bias = bias is not None and tuple(bias.shape) == (m,) and bias.dtype == x.dtype
    # Triton's interpreter multiplies the raw bits of bfloat16 dot operands
    # (triton-lang/triton#11584, unsupported upstream): there, and only there, dot in fp32
    dot_f32 = x.dtype == torch.bfloat16 and is_interpreted()

    if rows == 0 or r == 0 or m == 0:
        y = x.new_zeros((rows, m))
        kernel_bias = False
    elif is_interpreted() and is_fake_tensor(x2):
        # tracing (torch.export / make_fx) with interpreted kernels: wrap_triton cannot trace
        # an InterpretedFunction (torch returns it as is), so only shapes are produced here;
        # compiled kernels are traced as triton_kernel_wrapper nodes instead
        y = x2.new_empty((rows, m))
    elif rows <= GEMV_MAX_ROWS:
        br = block_r or _pow2_block(r, 32)
        bn = block_n or _pow2_block(n, 128)
        bm = block_m or _pow2_block(m, 64)
        chunks = triton.cdiv(r, br)
        tiles = triton.cdiv(m, bm)
        split = max(1, min(split_m or _default_split_m(x.device, chunks, tiles), tiles))
        atomic = chunks > 1
        # several chunks add into y: accumulate in fp32, zero-initialised
        y = x2.new_zeros((rows, m), dtype=torch.float32) if atomic else x2.new_empty((rows, m))
        torch.library.wrap_triton(_lowrank_gemv_kernel)[(chunks, split)](
            x2, A, B, bias if kernel_bias else x2, y,
            rows, n, m, r,
            x2.stride(0), x2.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
            bias.stride(0) if kernel_bias else 0, y.stride(0), y.stride(1),
            HAS_BIAS=kernel_bias, USE_ATOMIC=atomic, SPLIT_M=split,
            BLOCK_B=GEMV_MAX_ROWS, BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm,
            PRECISION=dot_precision(x.dtype), DOT_F32=dot_f32, num_warps=4,
        )  # fmt: skip
        y = y.to(x.dtype)
    else:
        bb = block_b or _pow2_block(rows, 64)
        br = block_r or _pow2_block(r, 64)
        bn = block_n or _pow2_block(n, 64)
        bm = block_m or _pow2_block(m, 64)
        y = x2.new_empty((rows, m))
        grid = (triton.cdiv(rows, bb), triton.cdiv(m, bm))
        torch.library.wrap_triton(_lowrank_gemm_kernel)[grid](
            x2, A, B, bias if kernel_bias else x2, y,
            rows, n, m, r,
            x2.stride(0), x2.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
            bias.stride(0) if kernel_bias else 0, y.stride(0), y.stride(1),
            HAS_BIAS=kernel_bias, BLOCK_B=bb, BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm,
            PRECISION=dot_precision(x.dtype), DOT_F32=dot_f32, num_warps=4, num_stages=2,
        )  # fmt: skip
    y = y.reshape(*lead, m)
    if bias is not None and not kernel_bias:  # broadcast or promoted bias: as the reference
        y = y + bias
    return y


__all__ = ["GEMV_MAX_ROWS", "is_interpreted", "lowrank_linear_triton"]
