"""TVM lowering of ``splice::moe_ffn``: the sparse kernel (only the selected experts) and
the dense path; opaque routed experts (Mixtral) are a clear LoweringError.

Programs are small modules calling ``torch.ops.splice.moe_ffn`` on their own parameters,
captured and compiled with ``splice.compile``; outputs must equal the op's reference
within 1e-4, and the lowering report must say which path ran: the ``moe_ffn`` rule (the
sparse kernel) when rows·k ≤ E, matmul kernels otherwise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splice
from splice.errors import LoweringError
from splice.ir import moe_capture
from splice.ir.ops import moe_gates

pytest.importorskip("tvm")

ATOL = 1e-4


class MoE(nn.Module):
    def __init__(
        self, E=4, s=24, d=40, d_out=36, *, gated=False, bias=True, act="relu", top_k=2,
        top_p=0.0, scale="none", weighted=False, seed=0,
    ):  # fmt: skip
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        P = lambda *sh, sc=1.0: nn.Parameter(torch.randn(*sh, generator=g) * sc)  # noqa: E731
        self.rw, self.rb = P(E, d), P(E) if bias else None
        self.wi, self.bi = P(E, s, d, sc=d**-0.5), P(E, s) if bias else None
        self.wg = P(E, s, d, sc=d**-0.5) if gated else None
        self.bg = P(E, s) if gated and bias else None
        self.wo, self.bo = P(E, s, d_out, sc=s**-0.5), P(d_out) if bias else None
        self.opts = (act, top_k, top_p, scale, weighted)

    def forward(self, x):
        return torch.ops.splice.moe_ffn(
            x, self.rw, self.rb, self.wi, self.bi, self.wg, self.bg, self.wo, self.bo,
            *self.opts,
        )  # fmt: skip


def compile_and_check(tmp_path, model, shape, *, x=None):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) if x is None else x
    program = splice.capture(model, (x,))
    art = splice.compile(program, "host", output=tmp_path / "moe.artifact")
    compiled = art.load()
    with torch.no_grad():
        ref = model(x)
    out = compiled(x)
    assert out.shape == ref.shape
    diff = (out - ref).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"
    return art.manifest["lowering"], compiled


@pytest.mark.parametrize(
    "kw,shape",
    [
        pytest.param(dict(), (1, 40), id="decode-top2-bias"),
        pytest.param(
            dict(gated=True, bias=False, act="silu", top_k=1), (1, 1, 40), id="swiglu-top1"
        ),
        pytest.param(
            dict(act="gelu", top_k=0, top_p=0.5, weighted=True, scale="e_over_k", s=20, d_out=37),
            (1, 40),
            id="top-p-prob-e-over-k-padded",  # s and d_out not multiples of the panels
        ),
        pytest.param(dict(E=8, gated=True, act="gelu_tanh"), (2, 2, 40), id="rows4-top2-of-8"),
    ],
)
def test_sparse_kernel_matches_reference(tmp_path, kw, shape):
    report, _ = compile_and_check(tmp_path, MoE(**kw), shape)
    assert report["schedule_rules"].get("moe_ffn") == 1, report["schedule_rules"]
    assert report["schedule_rules"].get("matmul", 0) == 0  # no dense expert product
    (k,) = [v for v in report["matmuls"].values() if v.get("kernel") == "moe_ffn"]
    E = kw.get("E", 4)
    assert k["experts"] == E and k["slots"] == (kw.get("top_k", 2) or E)


def test_sparse_kernel_reads_only_the_selected_experts(tmp_path):
    """Experts the token does not select hold NaN: a dense computation masked afterwards
    would return NaN (NaN·0); the sparse kernel never reads them."""
    model = MoE(E=8, s=16, d=32, d_out=32, gated=True, act="silu", top_k=2)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    gates = moe_gates(x, model.rw.detach(), model.rb.detach(), 2, 0.0, "none", False)
    off = (gates[0] == 0).nonzero().flatten()
    assert off.numel() == 6
    clean = MoE(E=8, s=16, d=32, d_out=32, gated=True, act="silu", top_k=2)
    with torch.no_grad():
        for name in ("wi", "bi", "wg", "bg", "wo"):
            getattr(model, name)[off] = float("nan")
            getattr(clean, name)[off] = 0.0
    program = splice.capture(model, (x,))
    art = splice.compile(program, "host", output=tmp_path / "poisoned.artifact")
    out = art.load()(x)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(out, clean(x), atol=ATOL, rtol=ATOL)
        assert torch.isnan(model(x)).all()  # the reference computes every expert


@pytest.mark.parametrize(
    "kw,shape",
    [
        pytest.param(dict(), (3, 40), id="rows3-top2-of-4"),
        pytest.param(
            dict(act="tanh", top_k=0, top_p=0.6, gated=True), (2, 3, 40), id="top-p-rows6"
        ),
    ],
)
def test_more_rows_take_the_dense_path(tmp_path, kw, shape):
    report, _ = compile_and_check(tmp_path, MoE(**kw), shape)
    assert "moe_ffn" not in report["schedule_rules"]
    assert report["schedule_rules"].get("matmul", 0) >= 2


def test_experts_pass_on_gpt2_decode_compiles(tmp_path):
    """A real model: GPT-2 at one token, its FFN split by the pass, lowered end to end."""
    from splice import models
    from splice.passes import parse_pipeline

    model, (ids,) = models.gpt2(layers=1, seq=1)
    program = splice.capture(model, (ids,))
    q = parse_pipeline("experts{num_experts=4,top_k=2}").run(program).program
    art = splice.compile(q, "host", output=tmp_path / "gpt2.artifact")
    lowering = art.manifest["lowering"]
    # the sparse kernel runs the FFN; no matmul kernel has the FFN's width (d_ff = 256):
    # the dense FFN products are gone
    assert lowering["schedule_rules"].get("moe_ffn") == 1, lowering["schedule_rules"]
    mm = [v for v in lowering["matmuls"].values() if v.get("kernel") != "moe_ffn"]
    assert mm and all(256 not in (v["n"], v["k"]) for v in mm), mm
    with torch.no_grad():
        ref = q(ids)
    out = art.load()(ids)
    assert (out - ref).abs().max().item() <= 1e-3


def test_opaque_routed_experts_are_a_clear_lowering_error(arch_model, tmp_path):
    model, args = arch_model("mixtral")
    with moe_capture.disabled():  # the grouped matmuls transformers exports, not moe_ffn
        p = splice.capture(model, args)
    with pytest.raises(LoweringError) as info:
        splice.compile(p, "host", output=tmp_path / "mixtral.artifact")
    msg = str(info.value)
    assert "opaque grouped matmul, %grouped_mm_fallback (transformers.grouped_mm_fallback)" in msg
    assert "model.layers.0.mlp.experts" in msg
    assert "_experts_implementation = 'batched_mm'" in msg
    assert not (tmp_path / "mixtral.artifact").exists()
