"""stitch's least squares on LayerNorm outputs (the cause of stitch{share=window} + heal
diverging on all-MiniLM-L6-v2): bounded weights, the same fit, a usable window mean."""

from __future__ import annotations

import torch

from splice.passes.stitch_fit import least_squares


def _layernormed(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    """float32 LayerNorm outputs with their own γ, β: Σᵢ (xᵢ − βᵢ)/γᵢ = 0 in every row, up
    to float32 rounding (a near-null direction that differs from one boundary to another)."""
    ln = torch.nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(d, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(d, generator=g) * 0.1)
        return ln(torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g))


def _residual(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    y = y.double()
    return float((x.double() @ w.T + b - y).norm() / (y - y.mean(0)).norm())


def test_window_mean_of_layernorm_pair_solutions_stays_a_usable_map():
    g = torch.Generator().manual_seed(0)
    d = 32
    xs = [_layernormed(g, 2000, d) for _ in range(3)]
    ys = [_layernormed(g, 2000, d) + 0.5 * x @ torch.randn(d, d, generator=g) for x in xs]
    sols = [least_squares(x, y) for x, y in zip(xs, ys)]
    for (w, b), x, y in zip(sols, xs, ys):
        assert w.abs().max() < 10  # the unconditioned solve gave 10^3-10^4 here
        # the same fit as ordinary least squares with an intercept column
        xt = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        a = torch.linalg.lstsq(xt, y.double(), driver="gelsd").solution
        assert _residual(x, y, w, b) <= _residual(x, y, a[:-1].T, a[-1]) + 1e-4
    w = torch.stack([s[0] for s in sols]).mean(0)
    b = torch.stack([s[1] for s in sols]).mean(0)
    # SN-Net's window layer (the mean): worse than each pair's own, but no blow-up
    assert all(_residual(x, y, w, b) < 1.5 for x, y in zip(xs, ys))


def test_least_squares_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64)
    w0, b0 = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, generator=g)
    w, b = least_squares(x, x @ w0.T + b0)
    assert torch.allclose(w, w0, atol=1e-9) and torch.allclose(b, b0.double(), atol=1e-9)
