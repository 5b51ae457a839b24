"""The splice dialect: schema, reference, fake, autograd, export."""

from __future__ import annotations

import torch

import splice
from splice.ir.ops import OPS, lowrank_linear, op_def


def _factors(m=6, n=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, k, generator=g),
        torch.randn(k, n, generator=g),
        torch.randn(m, generator=g),
    )


def test_registered_with_schema():
    assert "splice::lowrank_linear" in OPS
    op = torch.ops.splice.lowrank_linear.default
    assert op_def(op) is lowrank_linear
    assert str(op._schema).startswith(
        "splice::lowrank_linear(Tensor x, Tensor A, Tensor B, Tensor? bias=None"
    )


def test_reference_equals_dense_product_and_rank_prefix():
    A, B, b = _factors()
    x = torch.randn(3, 5)
    y = torch.ops.splice.lowrank_linear(x, A, B, b)
    assert torch.allclose(y, x @ (A @ B).T + b, atol=1e-5)
    y2 = torch.ops.splice.lowrank_linear(x, A, B, None, 2)
    assert torch.allclose(y2, x @ (A[:, :2] @ B[:2]).T, atol=1e-5)
    assert torch.allclose(
        torch.ops.splice.lowrank_linear(x, A, B, None, 99), x @ (A @ B).T, atol=1e-5
    )


def test_fake_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    A, B, _ = _factors()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 7, 5))
        out = torch.ops.splice.lowrank_linear(x, mode.from_tensor(A), mode.from_tensor(B))
    assert out.shape == (2, 7, 6)


def test_gradients_match_the_dense_formula():
    A, B, b = _factors()
    A.requires_grad_()
    B.requires_grad_()
    x = torch.randn(3, 5, requires_grad=True)
    torch.ops.splice.lowrank_linear(x, A, B, b).square().sum().backward()
    ga, gb, gx = A.grad.clone(), B.grad.clone(), x.grad.clone()
    for t in (A, B, x):
        t.grad = None
    (x @ (A @ B).T + b).square().sum().backward()
    assert torch.allclose(ga, A.grad, atol=1e-4) and torch.allclose(gb, B.grad, atol=1e-4)
    assert torch.allclose(gx, x.grad, atol=1e-4)


class _LR(torch.nn.Module):
    def __init__(self):
        super().__init__()
        A, B, b = _factors()
        self.A, self.B, self.b = torch.nn.Parameter(A), torch.nn.Parameter(B), torch.nn.Parameter(b)

    def forward(self, x):
        return torch.ops.splice.lowrank_linear(x, self.A, self.B, self.b, 3)


def test_export_keeps_the_op_as_one_node_and_costs_it():
    p = splice.capture(_LR(), (torch.randn(2, 5),))
    ops = [n.target for n in p.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.splice.lowrank_linear.default]
    splice.verify(p)
    from splice.passes.analysis import cost_model

    c = cost_model(p).total
    # 2 rows, rank 3: 2·2·3·(6+5) FLOPs for the two thin products, plus the bias add
    assert c.flops == 2 * 2 * 3 * (6 + 5) + 2 * 6


def test_fake_and_cost_take_the_arguments_by_schema_name():
    """fake and cost receive the call bound to the schema: keywords and defaults alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from splice.ir.ops import moe_ffn

    E, s, d = 4, 3, 5
    w = [torch.randn(E, d), None, torch.randn(E, s, d), None, None, None, torch.randn(E, s, 6)]
    with FakeTensorMode() as mode:
        f = [None if t is None else mode.from_tensor(t) for t in w]
        x = mode.from_tensor(torch.randn(2, d))
        out = torch.ops.splice.moe_ffn(x, *f, b_out=None, act="relu", top_k=2)
    assert out.shape == (2, 6)
    by_position = moe_ffn.cost(torch.randn(2, d), *w, None, "relu", 2)
    by_name = moe_ffn.cost(torch.randn(2, d), *w, b_out=None, act="relu", top_k=2)
    assert by_position == by_name and by_name.flops > 0
    assert lowrank_linear.cost(torch.randn(2, 5), *_factors()[:2]) == lowrank_linear.cost(
        torch.randn(2, 5), *_factors()[:2], bias=None, rank=None
    )
