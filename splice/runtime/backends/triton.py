"""Triton backend: splice ops as Triton kernels, registered with ``torch.library.triton_op``.

What it provides
    * The Triton lowering of every splice op, registered in :mod:`splice.ir.lowerings`
      (``@register_lowering(op, "triton")``): a loader that imports the op's kernel module,
      ``splice/runtime/kernels/triton_<op>.py``, and returns its launcher, a function with
      the op's arguments that launches the kernels through ``wrap_triton``. Today ``splice::lowrank_linear`` and ``splice::moe_ffn`` have one;
      an op declared ``register_fallback(op, "triton")`` keeps running its reference.
    * :func:`register_ops` — registers each lowering as ``splice_triton::<op>``, a
      ``torch.library.triton_op`` with the schema of ``splice::<op>`` read from its
      :class:`~splice.ir.ops.OpDef` and the gradients of its reference. Being a
      ``triton_op`` (not an opaque ``custom_op``), ``torch.compile`` and ``torch.export``
      see the kernels and Inductor can fuse around them on CUDA.
    * :func:`use_triton_kernels` — a copy of a Program or ``fx.GraphModule`` in which every
      ``splice::<op>`` node with a Triton lowering calls ``splice_triton::<op>`` instead of
      the reference. The copy is for *running*; it leaves the splice dialect (its swapped
      nodes are not splice ops), so run passes and ``verify`` on the original.

The lowrank_linear kernels (design in :mod:`splice.runtime.kernels.triton_lowrank_linear`)
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

The moe_ffn kernels (design in :mod:`splice.runtime.kernels.triton_moe_ffn`)
    The routing runs as the reference's torch code; the experts' work runs in grouped
    kernels over the selected (token, expert) pairs only.

Requirements and errors
    triton is imported lazily: ``import splice`` and importing this module work without
    it; :func:`require_triton` (called by everything that needs it) raises a
    :class:`~splice.errors.LoweringError` naming ``pip install 'splice[triton]'``.
    The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before the kernel
    module is imported they run on CPU tensors in Triton's interpreter. The kernels are
    forward-only; the op's backward is the splice op's (the vjp of the reference, in
    plain torch ops), so a swapped program can still be fine-tuned.

Testing
    ``tests/test_triton_lowrank.py`` and ``tests/test_triton_experts.py`` run the kernels
    under ``TRITON_INTERPRET=1`` on the CPU at small shapes (ragged sizes, rank prefixes,
    leading dims, strided inputs, several tiles, atomics, fp16/bf16) against the op's
    reference, through the launcher, the registered op and a captured Program. What the
    interpreter cannot show — compilation for a real GPU, TF32/tensor-core numerics,
    atomics under real concurrency, bf16 ``tl.dot`` (upcast in the interpreter), and speed
    (block sizes and the output split are untuned) — needs a CUDA machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from splice.errors import LoweringError
from splice.ir.lowerings import lowering_for, register_lowering
from splice.ir.ops import OPS, OpDef, register_vjp
from splice.ir.program import Program

#: namespace of the Triton-backed ops
NAMESPACE = "splice_triton"
INSTALL_HINT = "pip install 'splice[triton]'"


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


# The Triton lowerings. Each is a loader: it imports the op's kernel module (which imports
# triton, an optional dependency: hence at the first use, not here) and returns the launcher,
# a function that takes the op's arguments (checked against the schema by register_ops).


@register_lowering("splice::lowrank_linear", "triton")
def _lowrank_linear_launcher() -> Callable[..., torch.Tensor]:
    from splice.runtime.kernels.triton_lowrank_linear import lowrank_linear_triton

    return lowrank_linear_triton


@register_lowering("splice::moe_ffn", "triton")
def _moe_ffn_launcher() -> Callable[..., torch.Tensor]:
    from splice.runtime.kernels.triton_moe_ffn import moe_ffn_triton

    return moe_ffn_triton


def _as_op(op: OpDef, launcher: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``launcher`` with exactly the op's annotated signature, from which ``triton_op``
    infers the schema (the launcher may add keyword-only tuning knobs; they are left out).
    ``triton_op`` finds the kernels by reading this function's source: hence the call of
    the closure variable ``launcher``."""

    def kernels(*args: Any, **kwargs: Any) -> torch.Tensor:
        return launcher(*args, **kwargs)

    kernels.__signature__ = op.signature()  # type: ignore[attr-defined]
    kernels.__name__ = kernels.__qualname__ = op.name
    return kernels


@functools.cache
def register_ops() -> dict[torch._ops.OpOverload, torch._ops.OpOverload]:
    """Register the ``splice_triton`` ops (once) and return {splice op: Triton op}.

    For every splice op with a Triton lowering (not a fallback), ``splice_triton::<op>`` is
    a ``triton_op`` with the schema of ``splice::<op>`` (read from its OpDef) running the
    lowering's launcher, with the gradients of the op's reference (the kernels are
    forward-only). Raises LoweringError when triton is missing (nothing is cached then, so
    a later call after installing it works) and, naming the op, when a splice op has no
    Triton lowering registered; TypeError when a launcher does not take the op's arguments.
    """
    require_triton()
    table = {}
    for qual, op in OPS.items():
        lowering = lowering_for(qual, "triton")
        if lowering.fn is None:
            continue  # falls back: the splice op runs its reference
        launcher = lowering.fn()
        op.check_signature(launcher)
        name = f"{NAMESPACE}::{op.name}"
        torch.library.triton_op(name, _as_op(op, launcher), mutates_args=())
        register_vjp(name, op.reference, op.differentiable)
        table[op.overload] = getattr(getattr(torch.ops, NAMESPACE), op.name).default
    return table


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

    Every ``call_function`` node whose target is a splice op with a Triton lowering (see
    :func:`register_ops`) calls the ``splice_triton`` op instead; the arguments are unchanged (same schema). Sub-graphs (control-flow branches)
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
