"""Explicit op backwards (splice.ir.ops): they equal the autograd of the op's reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from splice.ir import ops
from splice.ir.ops import (
    _BACKWARDS,
    _lowrank_linear_backward,
    _lowrank_linear_ref,
    lowrank_linear,
    moe_ffn,
)


def _inputs(lead: tuple[int, ...], with_bias: bool, seed: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, A, B = rand(*lead, 5), rand(4, 3), rand(3, 5)
    return [x, A, B, rand(4) if with_bias else None]


@pytest.mark.parametrize(
    "lead,with_bias,rank,wants",
    [
        (lead, bias, rank, wants)
        for lead, bias, rank in itertools.product(
            [(2,), (2, 3), (0,)], [False, True], [None, 2, 0, 9]
        )
        for wants in [
            (True, True, True, True),
            (False, True, True, True),
            (True, False, False, False),
        ]
    ],
)
def test_lowrank_linear_backward_equals_the_reference_autograd(
    lead: tuple[int, ...], with_bias: bool, rank: int | None, wants: tuple[bool, ...]
) -> None:
    """Every combination of bias, rank (None, truncating, 0, past k), leading shape and
    which inputs need gradients: the op's gradients equal autograd through the reference."""
    vals = _inputs(lead, with_bias, seed=len(lead) + 10 * (rank or 0))
    ours = [v.clone().requires_grad_(w) if v is not None else None for v, w in zip(vals, wants)]
    ref = [v.clone().requires_grad_(w) if v is not None else None for v, w in zip(vals, wants)]
    gy = torch.randn(*lead, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.ops.splice.lowrank_linear(*ours, rank)
    y_ref = _lowrank_linear_ref(*ref, rank)
    assert torch.equal(y, y_ref)
    if not y.requires_grad:
        return
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    for name, a, b in zip(["x", "A", "B", "bias"], ours, ref):
        if a is None or not a.requires_grad:
            continue
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("rank", [None, 2, 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lowrank_linear_gradcheck(rank: int | None, with_bias: bool) -> None:
    x, A, B, b = _inputs((2, 3), with_bias, seed=1)
    args = [t.requires_grad_() for t in (x, A, B)] + ([b.requires_grad_()] if b is not None else [])

    def f(*ts: torch.Tensor) -> torch.Tensor:
        return torch.ops.splice.lowrank_linear(*ts[:3], ts[3] if len(ts) > 3 else None, rank)

    assert torch.autograd.gradcheck(f, tuple(args))


def test_lowrank_linear_keyword_arguments_reach_the_backward() -> None:
    """rank and bias given by name: the backward sees them as the schema's positions."""
    x, A, B, b = (t.requires_grad_() for t in _inputs((3,), True, seed=2))  # type: ignore[union-attr]
    torch.ops.splice.lowrank_linear(x, A, B, bias=b, rank=1).sum().backward()
    assert torch.equal(A.grad[:, 1:], torch.zeros_like(A.grad[:, 1:]))
    assert torch.equal(B.grad[1:], torch.zeros_like(B.grad[1:]))
    assert torch.allclose(b.grad, torch.full_like(b, 3.0))


def test_backends_reregistering_the_op_get_the_explicit_backward() -> None:
    """register_vjp (what a backend re-registering lowrank_linear from its reference calls,
    as the Triton backend does) finds the explicit backward by the reference function."""
    assert lowrank_linear.backward is _lowrank_linear_backward
    assert _BACKWARDS[_lowrank_linear_ref] is _lowrank_linear_backward
    assert moe_ffn.backward is None  # moe_ffn: the vjp of its reference


@pytest.mark.parametrize(
    "gated,weighted,scale,router_norm",
    [(False, False, "none", True), (True, True, "renorm", False), (False, True, "e_over_k", True)],
)
def test_moe_ffn_gradients_equal_the_reference_autograd(
    gated: bool, weighted: bool, scale: str, router_norm: bool
) -> None:
    """moe_ffn's backward (the reference re-run under autograd) equals autograd through the
    reference, for plain and gated experts and weighted gates; gradcheck in float64."""
    g = torch.Generator().manual_seed(5)
    E, s, d = 3, 2, 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, rw, rb = rand(5, d), rand(E, d), rand(E)
    wi, bi, wo, bo = rand(E, s, d), rand(E, s), rand(E, s, d), rand(d)
    wg, bg = (rand(E, s, d), rand(E, s)) if gated else (None, None)
    opts = ("silu" if gated else "gelu", 2, 0.0, scale, weighted, router_norm)
    tensors = [x, rw, rb, wi, bi, wg, bg, wo, bo]
    live = [i for i, t in enumerate(tensors) if t is not None]

    def call(fn, *ts: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        args = list(tensors)
        for i, t in zip(live, ts):
            args[i] = t
        return fn(*args, *opts)

    leaves = tuple(tensors[i] for i in live)
    assert torch.autograd.gradcheck(lambda *ts: call(torch.ops.splice.moe_ffn, *ts), leaves)
    gy = torch.randn(5, d, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((call(torch.ops.splice.moe_ffn, *leaves) * gy).sum(), leaves)
    ref = torch.autograd.grad(
        (call(ops._moe_ffn_ref, *leaves) * gy).sum(), leaves, allow_unused=True
    )
    for a, b, t in zip(ours, ref, leaves):  # unit gates: the router gets no gradient (0)
        torch.testing.assert_close(
            a, b if b is not None else torch.zeros_like(t), rtol=1e-12, atol=1e-12
        )
