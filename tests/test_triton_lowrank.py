"""The Triton kernels of splice::lowrank_linear, run on the CPU in Triton's interpreter.

``TRITON_INTERPRET=1`` is read when ``@triton.jit`` decorates a kernel (it then builds an
interpreted function), so it must be set before the kernel module is imported; it is set
here before anything imports triton. Shapes are small and ragged (not multiples of the
block sizes); block sizes are forced down where a test needs several rank chunks (the
atomic path) or several output tiles. Ground truth: the op's reference implementation.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from splice.errors import LoweringError
from splice.ir.ops import _lowrank_linear_ref
from splice.runtime.backends import triton as tb
from splice.runtime.kernels import triton_lowrank_linear as kmod

if not kmod.is_interpreted():  # imported earlier in this process without the interpreter
    kmod = importlib.reload(kmod)

lowrank_linear_triton = kmod.lowrank_linear_triton

TOL = {"atol": 1e-4, "rtol": 1e-4}
SMALL = {"block_r": 16, "block_n": 16, "block_m": 16}  # several chunks/tiles at small sizes


def _factors(n, m, k, *, bias=True, dtype=torch.float32):
    A = (torch.randn(m, k) / k**0.5).to(dtype)
    B = (torch.randn(k, n) / n**0.5).to(dtype)
    b = torch.randn(m).to(dtype) if bias else None
    return A, B, b


@pytest.mark.parametrize("rows", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_both_paths_ragged_sizes(rows, with_bias):
    n, m, k = 37, 45, 13
    x = torch.randn(rows, n)
    A, B, b = _factors(n, m, k, bias=with_bias)
    y = lowrank_linear_triton(x, A, B, b)
    torch.testing.assert_close(y, _lowrank_linear_ref(x, A, B, b), **TOL)


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
@pytest.mark.parametrize("rank", [None, 29, 16, 3])
def test_rank_prefix_several_chunks(rows, rank):
    # k = 40 with BLOCK_R = 16: three rank chunks, so the GEMV path adds with atomics and
    # the GEMM path loops over chunks; rank takes the prefix without copying the factors
    n, m, k = 37, 45, 40
    x = torch.randn(rows, n)
    A, B, b = _factors(n, m, k)
    y = lowrank_linear_triton(x, A, B, b, rank, **SMALL)
    torch.testing.assert_close(y, _lowrank_linear_ref(x, A, B, b, rank), **TOL)


@pytest.mark.parametrize("split_m", [2, 3, 8])
def test_gemv_output_split(split_m):
    n, m, k = 24, 70, 40
    x = torch.randn(2, n)
    A, B, b = _factors(n, m, k)
    y = lowrank_linear_triton(x, A, B, b, 35, split_m=split_m, **SMALL)
    torch.testing.assert_close(y, _lowrank_linear_ref(x, A, B, b, 35), **TOL)


@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 2), (4, 10)])
def test_leading_dims(lead):
    n, m, k = 37, 45, 13
    x = torch.randn(*lead, n)
    A, B, b = _factors(n, m, k)
    y = lowrank_linear_triton(x, A, B, b, 9)
    assert y.shape == (*lead, m)
    torch.testing.assert_close(y, _lowrank_linear_ref(x, A, B, b, 9), **TOL)


@pytest.mark.parametrize("rows", [3, 20])
def test_strided_inputs(rows):
    n, m, k = 37, 45, 21
    x = torch.randn(n, rows).t()  # non-contiguous activations
    A = torch.randn(k, m).t()  # A[m, k] as a transposed view
    B = torch.randn(n, 2 * k)[:, ::2].t()  # B[k, n] with stride 2 in one dim
    b = torch.randn(2 * m)[::2]  # strided bias
    assert not (x.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    y = lowrank_linear_triton(x, A, B, b, 17, **SMALL)
    torch.testing.assert_close(y, _lowrank_linear_ref(x, A, B, b, 17), **TOL)


def test_degenerate_ranks_and_bias_forms():
    n, m, k = 10, 12, 6
    x = torch.randn(2, 3, n)
    A, B, b = _factors(n, m, k)
    for rank in (0, -2, 100):  # clamped to [0, k] like the reference
        torch.testing.assert_close(
            lowrank_linear_triton(x, A, B, b, rank), _lowrank_linear_ref(x, A, B, b, rank), **TOL
        )
    scalar_bias = torch.tensor(0.5)  # broadcast bias: added after the kernel
    torch.testing.assert_close(
        lowrank_linear_triton(x, A, B, scalar_bias), _lowrank_linear_ref(x, A, B, scalar_bias)
    )
    empty = torch.randn(0, n)
    assert lowrank_linear_triton(empty, A, B, b).shape == (0, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 40])
def test_half_precision_inputs(dtype, rows):
    n, m, k = 37, 45, 40
    x = torch.randn(rows, n).to(dtype)
    A, B, b = _factors(n, m, k, dtype=dtype)
    y = lowrank_linear_triton(x, A, B, b, 29, **SMALL)
    assert y.dtype == dtype
    exact = _lowrank_linear_ref(x.float(), A.float(), B.float(), b.float(), 29)
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # fp32 accumulation, output rounding
    torch.testing.assert_close(y.float(), exact, atol=tol, rtol=tol)


def test_bad_inputs_raise_lowering_error():
    A, B, _ = _factors(8, 6, 4)
    with pytest.raises(LoweringError, match="one dtype"):
        lowrank_linear_triton(torch.randn(2, 8, dtype=torch.float64), A, B)
    with pytest.raises(LoweringError, match="shapes"):
        lowrank_linear_triton(torch.randn(2, 7), A, B)


def test_registered_triton_op_matches_reference():
    n, m, k = 37, 45, 40
    A, B, b = _factors(n, m, k)
    table = tb.register_ops()
    assert table[torch.ops.splice.lowrank_linear.default] is (
        torch.ops.splice_triton.lowrank_linear.default
    )
    for rows in (3, 33):
        x = torch.randn(rows, n)
        y = torch.ops.splice_triton.lowrank_linear(x, A, B, b, 20)
        torch.testing.assert_close(y, _lowrank_linear_ref(x, A, B, b, 20), **TOL)
    torch.testing.assert_close(tb.lowrank_linear(x, A, B), _lowrank_linear_ref(x, A, B), **TOL)


def test_registered_op_exports_and_has_gradients():
    tb.register_ops()
    n, m, k = 24, 20, 12
    A, B, b = (t.requires_grad_() for t in _factors(n, m, k))
    x = torch.randn(3, n, requires_grad=True)
    y = torch.ops.splice_triton.lowrank_linear(x, A, B, b, 7)
    grads = torch.autograd.grad(y.square().sum(), (x, A, B, b))
    y_ref = _lowrank_linear_ref(x, A, B, b, 7)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, A, B, b))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B = torch.nn.Parameter(A.detach()), torch.nn.Parameter(B.detach())

        def forward(self, x):
            return torch.ops.splice_triton.lowrank_linear(x, self.A, self.B, None, 5)

    net = Net()
    ep = torch.export.export(net, (torch.randn(3, n),))  # fake tracing through the op
    assert "splice_triton.lowrank_linear" in ep.graph_module.code
    x = torch.randn(3, n)
    torch.testing.assert_close(ep.module()(x), _lowrank_linear_ref(x, net.A, net.B, None, 5))


class _LowRank(torch.nn.Module):
    def __init__(self, n=24, m=20, k=12, rank=7):
        super().__init__()
        A, B, b = _factors(n, m, k)
        self.A, self.B, self.bias = torch.nn.Parameter(A), torch.nn.Parameter(B), b
        self.rank = rank

    def forward(self, x):
        h = torch.ops.splice.lowrank_linear(x, self.A, self.B, self.bias, self.rank)
        return torch.relu(h) + 1


def _splice_nodes(gm, namespace):
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "namespace", None) == namespace
    ]


def test_use_triton_kernels_on_program_and_graph_module():
    import splice

    model = _LowRank()
    x = torch.randn(2, 3, 24)
    prog = splice.capture(model, (x,))
    assert len(_splice_nodes(prog.graph_module, "splice")) == 1
    fast = tb.use_triton_kernels(prog)
    assert len(_splice_nodes(fast.graph_module, "splice_triton")) == 1
    assert len(_splice_nodes(prog.graph_module, "splice")) == 1  # original untouched
    torch.testing.assert_close(fast(x), prog(x), **TOL)

    gm = prog.to_module()
    fast_gm = tb.use_triton_kernels(gm)
    assert _splice_nodes(fast_gm, "splice_triton") and _splice_nodes(gm, "splice")
    torch.testing.assert_close(fast_gm(x)[0], model(x), **TOL)

    with pytest.raises(TypeError, match="Program or an fx.GraphModule"):
        tb.use_triton_kernels(model)


def test_missing_triton_is_a_lowering_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(LoweringError, match=r"pip install 'splice\[triton\]'") as info:
        tb.require_triton()
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(LoweringError, match=r"splice\[triton\]"):
        tb.register_ops.__wrapped__()  # the uncached body: checks for triton first


def test_backend_imports_without_triton():
    # a fresh interpreter where `import triton` fails: splice and the backend module still
    # import (triton is imported lazily), and using the backend names the extra
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import splice, splice.runtime.backends.triton as tb\n"
        "from splice.errors import LoweringError\n"
        "try:\n    tb.use_triton_kernels(None)\n"
        "except LoweringError as e:\n    print('LoweringError', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "LoweringError" in out.stdout and "pip install 'splice[triton]'" in out.stdout
