"""The cost model matches analytic FLOPs and parameter counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import splice
from splice.passes.analysis import cost_model


class _Lin(torch.nn.Module):
    def __init__(self, n_in=32, n_out=48, bias=True):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.fc(x)


def _only(report):
    (c,) = [c for c in report.nodes.values() if c.flops]
    return c


def test_linear():
    B, T, K, N = 3, 5, 32, 48
    r = cost_model(splice.capture(_Lin(K, N), (torch.randn(B, T, K),)))
    c = _only(r)
    assert c.flops == 2 * B * T * K * N + B * T * N
    assert c.params == K * N + N
    assert c.bytes_read == 4 * (B * T * K + K * N + N)
    assert c.bytes_written == 4 * B * T * N
    r2 = cost_model(splice.capture(_Lin(K, N, bias=False), (torch.randn(B, T, K),)))
    assert _only(r2).flops == 2 * B * T * K * N


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 8, kernel_size=3, stride=2, padding=1, groups=2)

    def forward(self, x):
        return self.conv(x)


def test_conv2d():
    N, H, W = 2, 16, 12
    r = cost_model(splice.capture(_Conv(), (torch.randn(N, 6, H, W),)))
    c = _only(r)
    Ho, Wo = 8, 6
    assert c.flops == 2 * N * 8 * Ho * Wo * (6 // 2) * 3 * 3 + N * 8 * Ho * Wo
    assert c.params == 8 * 3 * 3 * 3 + 8


class _MatMul(torch.nn.Module):
    def forward(self, a, b):
        return a @ b


def test_matmul_and_bmm():
    r = cost_model(splice.capture(_MatMul(), (torch.randn(4, 7, 5), torch.randn(4, 5, 9))))
    assert _only(r).flops == 2 * 4 * 7 * 9 * 5
    r = cost_model(splice.capture(_MatMul(), (torch.randn(7, 5), torch.randn(5, 9))))
    assert _only(r).flops == 2 * 7 * 9 * 5
    assert _only(r).params == 0


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_scaled_dot_product_attention():
    B, H, L, S, E, Ev = 2, 3, 5, 7, 8, 6
    r = cost_model(
        splice.capture(
            _Attn(), (torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, Ev))
        )
    )
    assert _only(r).flops == 2 * B * H * L * S * E + 2 * B * H * L * S * Ev


def test_real_model_parameter_count_and_rollup(captured, arch_model):
    model, _ = arch_model("gpt2")
    p = captured("gpt2")
    r = cost_model(p)
    # tied embeddings are counted once, as model.num_parameters() does
    assert r.total.params == model.num_parameters()
    by = r.by_module(3)
    assert by["transformer.h.0"].params == by["transformer.h.1"].params > 0
    block = sum(t.numel() for n, t in model.named_parameters() if n.startswith("transformer.h.0."))
    assert r.module_total("transformer.h.0").params == block
    assert r.module_total("").flops == r.total.flops
    # the attention scores of block 0 (sdpa) and its four Conv1D matmuls are all there
    h0 = r.module_total("transformer.h.0")
    T, D = 8, 64
    assert h0.flops >= 2 * T * D * (3 * D) + 2 * T * D * D + 2 * T * D * 4 * D * 2


def test_predicted_seconds_uses_the_roofline():
    from splice.target import Target

    r = cost_model(splice.capture(_Lin(1024, 1024), (torch.randn(1, 1024),)))
    t = Target("t", mem_bandwidth_gbs=10.0, peak_gflops=1000.0)
    c = _only(r)
    assert r.predicted_seconds(t) == max(c.flops / 1e12, c.bytes / 1e10)
