"""The splice dialect: custom ops that structural passes introduce.

Each op is registered with ``torch.library`` under the ``splice`` namespace and has

* a **schema**;
* a **reference implementation** in plain torch ops — the ground truth every backend is
  tested against (registered for ``CompositeExplicitAutograd``, so ``torch.export`` keeps
  the op as one node instead of decomposing it);
* a **fake implementation** for shape propagation;
* an **autograd formula**, derived from the reference with ``torch.func.vjp``, so that
  programs containing the op can be fine-tuned;
* a **cost function** (FLOPs, bytes) that the cost model reads.

Backends register their own lowering per op (``runtime/backends``); they never change
what an op means. The registry :data:`OPS` maps ``"splice::name"`` to its :class:`OpDef`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NAMESPACE = "splice"

_lib = torch.library.Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class OpCost:
    flops: int
    bytes_read: int
    bytes_written: int


@dataclass(frozen=True)
class OpDef:
    """One op of the dialect."""

    name: str
    schema: str
    reference: Callable[..., Any]
    fake: Callable[..., Any]
    cost: Callable[..., OpCost] | None
    doc: str

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


OPS: dict[str, OpDef] = {}


def define_op(
    name: str,
    schema: str,
    *,
    reference: Callable[..., Any],
    fake: Callable[..., Any],
    cost: Callable[..., OpCost] | None = None,
    differentiable: tuple[int, ...] = (),
) -> OpDef:
    """Register ``splice::name`` with its schema, reference, fake and autograd.

    ``differentiable`` lists the positional arguments that receive gradients.
    """
    _lib.define(f"{name}{schema}")
    qual = f"{NAMESPACE}::{name}"
    torch.library.impl(qual, "CompositeExplicitAutograd", lib=_lib)(reference)
    torch.library.register_fake(qual, lib=_lib)(fake)
    if differentiable:
        _register_vjp(qual, reference, differentiable)
    op = OpDef(name, schema, reference, fake, cost, (reference.__doc__ or "").strip())
    OPS[qual] = op
    return op


def _register_vjp(qual: str, reference: Callable[..., Any], diff: tuple[int, ...]) -> None:
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.inputs = inputs

    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        inputs = ctx.inputs
        idx = [i for i in diff if isinstance(inputs[i], torch.Tensor)]

        def f(*xs: torch.Tensor) -> torch.Tensor:
            args = list(inputs)
            for i, x in zip(idx, xs):
                args[i] = x
            return reference(*args)

        _, vjp = torch.func.vjp(f, *[inputs[i] for i in idx])
        grads = vjp(grad)
        out: list[Any] = [None] * len(inputs)
        for i, g in zip(idx, grads):
            out[i] = g
        return tuple(out)

    torch.library.register_autograd(qual, backward, setup_context=setup_context, lib=_lib)


def is_splice_op(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE


def op_def(target: Any) -> OpDef | None:
    """The OpDef of a node target, if it is a splice op."""
    if not is_splice_op(target):
        return None
    return OPS.get(f"{NAMESPACE}::{target._schema.name.split('::')[1]}")


# ---------------------------------------------------------------------------------------
# splice::lowrank_linear


def _lowrank_linear_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """y = (x Bᵀ) Aᵀ + bias with A: [out, k], B: [k, in].

    Singular directions are stored by importance, so ``rank`` r < k uses the prefix
    A[:, :r], B[:r] (nested truncation, as in Maestro).
    """
    k = A.shape[1]
    r = k if rank is None else max(0, min(int(rank), k))
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, B[:r]), A[:, :r])
    return y if bias is None else y + bias


def _lowrank_linear_fake(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    torch._check(A.dim() == 2 and B.dim() == 2, lambda: "lowrank_linear: A and B must be matrices")
    torch._check(
        A.shape[1] == B.shape[0],
        lambda: f"lowrank_linear: A is {tuple(A.shape)}, B is {tuple(B.shape)}",
    )
    torch._check(
        x.shape[-1] == B.shape[1],
        lambda: f"lowrank_linear: x has {x.shape[-1]} features, B takes {B.shape[1]}",
    )
    return x.new_empty((*x.shape[:-1], A.shape[0]))


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _lowrank_linear_cost(x: Any, A: Any, B: Any, bias: Any = None, rank: Any = None) -> OpCost:
    rows = _numel(x.shape[:-1])
    m, k = int(A.shape[0]), int(A.shape[1])
    n = int(B.shape[1])
    r = k if rank is None else min(int(rank), k)
    item = x.element_size() if hasattr(x, "element_size") else 4
    flops = 2 * rows * r * (m + n) + (rows * m if bias is not None else 0)
    read = item * (rows * n + r * (m + n) + (m if bias is not None else 0))
    return OpCost(flops, read, item * rows * m)


lowrank_linear = define_op(
    "lowrank_linear",
    "(Tensor x, Tensor A, Tensor B, Tensor? bias=None, SymInt? rank=None) -> Tensor",
    reference=_lowrank_linear_ref,
    fake=_lowrank_linear_fake,
    cost=_lowrank_linear_cost,
    differentiable=(0, 1, 2, 3),
)


__all__ = [
    "NAMESPACE",
    "OPS",
    "OpCost",
    "OpDef",
    "define_op",
    "is_splice_op",
    "lowrank_linear",
    "op_def",
]
