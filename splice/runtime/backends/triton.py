"""Triton backend: splice ops as Triton kernels, registered with ``torch.library.triton_op``.

What it provides
    * ``splice_triton::lowrank_linear`` — a ``torch.library.triton_op`` with the schema of
      ``splice::lowrank_linear`` whose body launches the kernels of
      :mod:`splice.runtime.kernels.lowrank_linear` through ``wrap_triton``. Being a
      ``triton_op`` (not an opaque ``custom_op``), ``torch.compile`` and ``torch.export``
      see the kernels and Inductor can fuse around them on CUDA.
    * :func:`use_triton_kernels` — a copy of a Program or ``fx.GraphModule`` in which every
      ``splice::<op>`` node that has a Triton kernel calls it instead of the reference.
      Ops without a kernel (``moe_ffn``, ``branch``) keep running their reference.
      The copy is for *running*; it leaves the splice dialect (its swapped nodes are not
      splice ops), so run passes and ``verify`` on the original.

The lowrank_linear kernels (design in the kernel module's docstring)
    y = (x Bᵀ) Aᵀ + bias with the factors A [m, k], B [k, n] and a run-time rank prefix.
    In LLM decode the op is memory-bound and the whole point of the factorisation is to
    read k·(m + n) weights instead of m·n; the kernels therefore never write the rank-k
    intermediate h = x Bᵀ to global memory — it is produced tile by tile in registers and
    consumed by the second contraction in the same program (one launch, no h round trip).
    * M ≤ 16 rows (decode): grid over rank chunks; each program computes its chunk of h
      over all of n (reading that chunk of B once) and adds h_c · A[:, c]ᵀ into y with
      ``tl.atomic_add`` (fp32) — A and B are each read exactly once overall.
    * M > 16 rows (prefill): grid over (row block, output block); each program loops over
      rank chunks, h_c = X_blk · B[c]ᵀ then acc += h_c · A[blk, c]ᵀ; h stays on chip, B is
      re-read once per output block (from L2 in practice).

Requirements and errors
    triton is imported lazily: ``import splice`` and importing this module work without
    it; :func:`require_triton` (called by everything that needs it) raises a
    :class:`~splice.errors.LoweringError` naming ``pip install 'splice[triton]'``.
    The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before the kernel
    module is imported they run on CPU tensors in Triton's interpreter. The kernels are
    forward-only; the op's backward is the splice op's (the vjp of the reference, in
    plain torch ops), so a swapped program can still be fine-tuned.

Testing
    ``tests/test_triton_lowrank.py`` runs both paths under ``TRITON_INTERPRET=1`` on the
    CPU at small shapes (ragged sizes, rank prefixes, leading dims, strided inputs,
    several rank chunks with atomics, output splits, fp16/bf16) against the op's reference
    ``splice.ir.ops._lowrank_linear_ref``, through the launcher, the registered op and a
    captured Program. What the interpreter cannot show — compilation for a real GPU,
    TF32/tensor-core numerics, atomics under real concurrency, bf16 ``tl.dot`` (upcast in
    the interpreter), and speed (block sizes and the output split are untuned) — needs a
    CUDA machine.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx

from splice.errors import LoweringError
from splice.ir.ops import _lowrank_linear_ref, _register_vjp
from splice.ir.program import Program

#: namespace of the Triton-backed ops
NAMESPACE = "splice_triton"
INSTALL_HINT = "pip install 'splice[triton]'"

_LOWRANK_SCHEMA = "(Tensor x, Tensor A, Tensor B, Tensor? bias=None, SymInt? rank=None) -> Tensor"


def require_triton() -> Any:
    """Import and return the ``triton`` module, or raise a LoweringError saying how to get it."""
    try:
        import triton
    except ImportError as e:
        raise LoweringError(
            "the Triton backend needs the 'triton' package, which is not installed",
            hint=f"{INSTALL_HINT} (Triton kernels run on CUDA GPUs; for tests on a CPU set "
            "TRITON_INTERPRET=1 to use Triton's interpreter)",
        ) from e
    return triton


@functools.cache
def register_ops() -> dict[torch._ops.OpOverload, torch._ops.OpOverload]:
    """Register the ``splice_triton`` ops (once) and return {splice op: Triton op}.

    Raises LoweringError when triton is missing (nothing is cached then, so a later call
    after installing it works).
    """
    require_triton()
    from splice.runtime.kernels.lowrank_linear import lowrank_linear_triton

    def lowrank_linear(
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        rank: int | None = None,
    ) -> torch.Tensor:
        return lowrank_linear_triton(x, A, B, bias, rank)

    qual = f"{NAMESPACE}::lowrank_linear"
    torch.library.triton_op(qual, lowrank_linear, mutates_args=(), schema=_LOWRANK_SCHEMA)
    # gradients as the splice op's: the vjp of the reference (the kernel is forward-only)
    _register_vjp(qual, _lowrank_linear_ref, (0, 1, 2, 3))

    from splice.ir.ops import _moe_ffn_ref
    from splice.ir.ops import moe_ffn as moe_ffn_def
    from splice.runtime.kernels.moe_ffn import moe_ffn_triton

    def moe_ffn(
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
    ) -> torch.Tensor:
        return moe_ffn_triton(
            x, router_w, router_b, w_in, b_in, w_gate, b_gate, w_out, b_out, act,
            top_k, top_p, scale, weighted, router_norm,
        )  # fmt: skip

    qual = f"{NAMESPACE}::moe_ffn"
    torch.library.triton_op(qual, moe_ffn, mutates_args=(), schema=moe_ffn_def.schema)
    _register_vjp(qual, _moe_ffn_ref, tuple(range(9)))
    return {
        torch.ops.splice.lowrank_linear.default: torch.ops.splice_triton.lowrank_linear.default,
        torch.ops.splice.moe_ffn.default: torch.ops.splice_triton.moe_ffn.default,
    }


def lowrank_linear(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """``splice_triton::lowrank_linear(x, A, B, bias, rank)`` (registers the op on first use)."""
    register_ops()
    return torch.ops.splice_triton.lowrank_linear(x, A, B, bias, rank)


def _swap_targets(gm: fx.GraphModule, table: dict[Any, Any]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (weights and untouched sub-modules shared) with targets swapped."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    swapped = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
            swapped += 1
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule) and hasattr(new, name):
            sub, n = _swap_targets(child, table)
            if n:
                setattr(new, name, sub)
                swapped += n
    return new, swapped


def use_triton_kernels(obj: Any) -> Any:
    """A copy of a Program or ``fx.GraphModule`` whose splice ops run as Triton kernels.

    Every ``call_function`` node whose target is a splice op with a Triton kernel (today
    ``splice::lowrank_linear`` and ``splice::moe_ffn``) calls the ``splice_triton`` op
    instead; the arguments are unchanged (same schema). Sub-graphs (control-flow branches)
    are converted too. The original is not modified; weights are shared.
    """
    table = register_ops()
    if isinstance(obj, Program):
        prog = obj.copy()
        graph_modules = [m for m in prog.graph_module.modules() if isinstance(m, fx.GraphModule)]
        for mod in graph_modules:  # the program's graph and its sub-graphs (copies)
            for node in mod.graph.nodes:
                if node.op == "call_function" and node.target in table:
                    node.target = table[node.target]
        prog.bump_version()  # targets changed in place: regenerate the code before running
        return prog
    if isinstance(obj, fx.GraphModule):
        return _swap_targets(obj, table)[0]
    raise TypeError(
        f"use_triton_kernels takes a splice Program or an fx.GraphModule, got {type(obj)}"
    )


__all__ = [
    "INSTALL_HINT",
    "NAMESPACE",
    "lowrank_linear",
    "register_ops",
    "require_triton",
    "use_triton_kernels",
]
