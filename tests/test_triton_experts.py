"""The Triton kernels of splice::moe_ffn, run on the CPU in Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernel module is imported (it is read when
``@triton.jit`` decorates a kernel), so it is set here first. Shapes are small and ragged
(not multiples of the blocks); blocks are forced down where a test needs several tiles.
Ground truth: the op's reference implementation. The interpreter runs a kernel program
by program in Python, so each case costs a fraction of a second: the cases are few.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib

import pytest
import torch

pytest.importorskip("triton")

import splice
from splice.errors import LoweringError
from splice.ir import moe_capture
from splice.ir.ops import _moe_ffn_ref, moe_gates
from splice.runtime.backends import triton as tb
from splice.runtime.kernels import triton_moe_ffn as kmod

if not kmod.is_interpreted():  # imported earlier in this process without the interpreter
    kmod = importlib.reload(kmod)

moe_ffn_triton = kmod.moe_ffn_triton
TOL = {"atol": 2e-5, "rtol": 2e-5}
SMALL = {"block_s": 16, "block_d": 16, "block_o": 16}  # several tiles of s, d and d_out


def _weights(E=4, s=20, d=24, d_out=18, *, gated=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh, sc=1.0: torch.randn(*sh, generator=g) * sc  # noqa: E731
    return [
        r(E, d), r(E) if bias else None,
        r(E, s, d, sc=d**-0.5), r(E, s) if bias else None,
        r(E, s, d, sc=d**-0.5) if gated else None, r(E, s) if gated and bias else None,
        r(E, s, d_out, sc=s**-0.5), r(d_out) if bias else None,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "lead,gated,bias,act,kw",
    [
        ((1,), False, True, "gelu", dict(top_k=2)),  # decode: one token, two experts
        ((1, 1), True, False, "silu", dict(top_k=1)),  # SwiGLU decode
        ((7,), True, True, "gelu_tanh", dict(top_k=3, scale="e_over_k")),
        ((2, 9), False, False, "relu", dict(top_p=0.5, weighted=True)),
        ((5,), False, True, "quick_gelu", dict(top_k=4)),  # all experts: the dense FFN
    ],
)
def test_kernels_match_the_reference(lead, gated, bias, act, kw):
    w = _weights(gated=gated, bias=bias)
    x = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(1))
    y = moe_ffn_triton(x, *w, act, **kw, **SMALL)
    assert y.shape == (*lead, 18)
    torch.testing.assert_close(y, _moe_ffn_ref(x, *w, act, **kw), **TOL)


@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid", "tanh", "relu2"])
def test_every_activation(act):
    w = _weights(E=2, s=16, d=16, d_out=16)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        moe_ffn_triton(x, *w, act, top_k=1), _moe_ffn_ref(x, *w, act, top_k=1), **TOL
    )


def test_alignment_groups_pairs_by_expert_with_static_sizes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 8, generator=g)
    R = torch.randn(5, 8, generator=g)
    gates = moe_gates(x, R, None, 2, 0.0, "none", False)
    tok, gv, block_expert = kmod.align_pairs(gates, 4, 2)
    P = tok.numel()
    assert P == -(-(11 * 2 + 5 * 3) // 4) * 4 and block_expert.numel() == P // 4  # static
    seen = set()
    for b in range(P // 4):
        rows = tok[b * 4 : (b + 1) * 4]
        e = int(block_expert[b])
        if e < 0:  # an empty block past the last group
            assert (rows < 0).all()
            continue
        for t, v in zip(rows.tolist(), gv[b * 4 : (b + 1) * 4].tolist()):
            if t >= 0:
                assert gates[t, e] == v == 1.0  # a selected pair, in its expert's block
                seen.add((t, e))
    assert seen == {tuple(p) for p in gates.nonzero().tolist()}  # each pair exactly once


def test_decode_reads_only_the_selected_experts():
    """Poison the experts a token does not select with NaN: the kernels never read them."""
    w = _weights(E=6, s=20, d=24, d_out=18, gated=True)
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(4))
    gates = moe_gates(x, w[0], w[1], 2, 0.0, "none", False)
    unselected = (gates[0] == 0).nonzero().flatten()
    assert unselected.numel() == 4
    clean = [t.clone() if t is not None else None for t in w]
    for i in (2, 3, 4, 5, 6):  # w_in, b_in, w_gate, b_gate, w_out
        w[i][unselected] = float("nan")
        clean[i][unselected] = 0.0
    y = moe_ffn_triton(x, *w, "silu", top_k=2)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, _moe_ffn_ref(x, *clean, "silu", top_k=2), **TOL)


def test_registered_op_and_program_swap():
    import splice
    from splice.passes import parse_pipeline

    table = tb.register_ops()
    assert table[torch.ops.splice.moe_ffn.default] is torch.ops.splice_triton.moe_ffn.default
    w = _weights()
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        torch.ops.splice_triton.moe_ffn(x, *w, "gelu", 2),
        _moe_ffn_ref(x, *w, "gelu", 2),
        **TOL,
    )

    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(0)
    x = torch.randn(1, 16)
    prog = (
        parse_pipeline("experts{num_experts=4,top_k=2}")
        .run(splice.capture(FFN().eval(), (x,)))
        .program
    )
    fast = tb.use_triton_kernels(prog)
    assert any(n.target is torch.ops.splice_triton.moe_ffn.default for n in fast.graph.nodes)
    torch.testing.assert_close(fast(x), prog(x), **TOL)


def test_bad_inputs_raise_lowering_error():
    w = _weights()
    with pytest.raises(LoweringError, match="share one dtype"):
        moe_ffn_triton(torch.randn(2, 24, dtype=torch.float64), *w, "relu", top_k=1)
    with pytest.raises(LoweringError, match="unknown activation 'swish'"):
        moe_ffn_triton(torch.randn(2, 24), *w, "swish", top_k=1)


def test_programs_with_opaque_routed_experts_still_run(captured, arch_model):
    """Mixtral's grouped-matmul experts (as transformers exports them, capture's MoE rules
    off) have no Triton kernel: the swap leaves them as they are (only splice ops are
    swapped) and the program runs as before."""
    model, args = arch_model("mixtral")
    with moe_capture.disabled():
        p = splice.capture(model, args)
    fast = tb.use_triton_kernels(p)
    assert any("grouped_mm" in str(n.target) for n in fast.graph.nodes)
    torch.testing.assert_close(fast(*args), p(*args))
