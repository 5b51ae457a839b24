"""TVM lowering of ``splice::lowrank_linear``: the fused decode kernel and the two-linear path.

Programs are small modules calling ``torch.ops.splice.lowrank_linear`` on their own
parameters, captured with ``splice.capture`` and compiled with ``splice.compile``; the
compiled outputs must equal the op's reference (the eager module) within 1e-4, and the
lowering report must say which kernel ran: the ``lowrank`` rule for few rows, two matmul
kernels above ``LOWRANK_FUSED_MAX_ROWS`` rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splice
from splice.ir.ops import lowrank_linear
from splice.runtime.kernels.tvm_gemm import MIN_ROWS as GEMM_MIN_ROWS
from splice.runtime.kernels.tvm_lowrank_linear import LOWRANK_FUSED_MAX_ROWS
from splice.runtime.kernels.tvm_schedules import CpuShape, lowrank_plan
from splice.target import get_target

pytest.importorskip("tvm")

ATOL = 1e-4


class LowRank(nn.Module):
    """y = lowrank_linear(x, A, B, bias, rank), A [m, k], B [k, n], random (seeded)."""

    def __init__(self, m: int, n: int, k: int, *, bias: bool, rank: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
        self.A = nn.Parameter(torch.randn(m, k, generator=g) / k**0.5)
        self.B = nn.Parameter(torch.randn(k, n, generator=g) / n**0.5)
        self.bias = nn.Parameter(torch.randn(m, generator=g)) if bias else None
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.splice.lowrank_linear(x, self.A, self.B, self.bias, self.rank)


def compile_and_check(tmp_path, model: nn.Module, x_shape: tuple[int, ...]):
    """Compile ``model`` for ``x_shape``; check against the reference on a fresh input."""
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    program = splice.capture(model, (x,))
    assert any(n.target is lowrank_linear.overload for n in program.graph.nodes)
    art = splice.compile(program, "host", output=tmp_path / "lowrank.artifact")
    compiled = art.load()
    x2 = torch.randn(x_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x2)
        ref_op = lowrank_linear.reference(x2, model.A, model.B, model.bias, model.rank)
    torch.testing.assert_close(ref, ref_op, rtol=0, atol=0)
    out = compiled(x2)
    assert out.shape == ref.shape
    diff = (out - ref).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"
    return art.manifest["lowering"]


# (m, n, k, bias, rank, x shape): k or m not a multiple of 8 exercises the padding of B's or
# A's rows (76 and 100: more than 4 vectors and no whole number of them on AVX2 or AVX-512,
# so the matmul rule cannot tile them on either); rank < k the prefix; rank > k is clamped to k as in the reference
FUSED_CASES = [
    pytest.param(64, 48, 20, True, None, (1, 48), id="m1-bias"),
    pytest.param(64, 48, 20, False, None, (1, 48), id="m1-nobias"),
    pytest.param(64, 48, 20, True, 13, (1, 48), id="m1-rank"),
    pytest.param(96, 40, 24, False, 99, (1, 40), id="m1-rank-over-k"),
    pytest.param(64, 48, 20, True, 7, (4, 48), id="m4-bias-rank"),
    pytest.param(64, 48, 76, True, 69, (8, 48), id="m8-untileable-rank"),
    pytest.param(64, 48, 76, False, None, (8, 48), id="m8-untileable-k"),
    pytest.param(64, 48, 20, True, None, (1, 1, 48), id="3d-decode"),
    pytest.param(64, 48, 20, True, 9, (2, 2, 48), id="3d-m4-rank"),
    pytest.param(64, 48, 76, True, 69, (2, 3, 48), id="3d-m6-untileable-rank"),
    pytest.param(256, 128, 64, True, None, (1, 128), id="m1-wider"),
    pytest.param(60, 48, 20, True, None, (1, 48), id="m1-m-not-multiple-of-8"),
    pytest.param(44, 33, 5, False, 3, (3, 33), id="m3-odd-shapes"),
]


@pytest.mark.parametrize("m,n,k,bias,rank,x_shape", FUSED_CASES)
def test_fused_kernel_matches_reference(tmp_path, m, n, k, bias, rank, x_shape):
    report = compile_and_check(tmp_path, LowRank(m, n, k, bias=bias, rank=rank), x_shape)
    assert report["schedule_rules"].get("lowrank") == 1, report["schedule_rules"]
    assert "unscheduled" not in report["schedule_rules"]
    (kernel,) = [v for v in report["matmuls"].values() if v.get("kernel") == "lowrank_linear"]
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    r = k if rank is None else min(rank, k)
    assert (kernel["rows"], kernel["m"], kernel["n"], kernel["k"]) == (rows, m, n, r)
    # the plan of the target compiled for (this machine: its vector width sets the panels)
    plan = lowrank_plan(rows, m, n, r, CpuShape.of(get_target("host")))
    assert kernel == {**kernel, **plan.to_json()}
    # the packing of A and B runs at load time: only the fused kernel is a matmul-like call
    assert report["schedule_rules"].get("matmul", 0) == 0


@pytest.mark.parametrize(
    "m,n,k,bias,rank,x_shape",
    [
        pytest.param(64, 48, 40, True, 16, (8, 48), id="m8-two-linears"),
        pytest.param(64, 48, 20, False, None, (8, 48), id="m8-small-rank-two-linears"),
        pytest.param(64, 48, 40, True, 16, (32, 48), id="m32-two-linears"),
        pytest.param(64, 48, 40, False, None, (4, 8, 48), id="3d-m32-two-linears"),
    ],
)
def test_two_linear_path(tmp_path, m, n, k, bias, rank, x_shape):
    """More rows than LOWRANK_FUSED_MAX_ROWS and shapes the matmul rule tiles (rank and m
    whole numbers of the target's vectors, or at most four): two matmul-rule kernels."""
    report = compile_and_check(tmp_path, LowRank(m, n, k, bias=bias, rank=rank), x_shape)
    assert "lowrank" not in report["schedule_rules"]
    gemms = sum(1 for v in report["matmuls"].values() if v.get("kernel") == "gemm")
    assert report["schedule_rules"].get("matmul", 0) + gemms == 2, report


@pytest.mark.parametrize(
    "m,n,k,bias,rank,x_shape",
    [
        pytest.param(64, 48, 76, True, 69, (32, 48), id="m32-rank-not-multiple-of-8"),
        pytest.param(100, 48, 24, False, None, (2, 20, 48), id="3d-m40-m-not-multiple-of-8"),
    ],
)
def test_many_rows_untileable_shapes_stay_fused(tmp_path, m, n, k, bias, rank, x_shape):
    """Many rows, but a rank (or m) the matmul rule cannot tile: the fused kernel."""
    report = compile_and_check(tmp_path, LowRank(m, n, k, bias=bias, rank=rank), x_shape)
    assert report["schedule_rules"].get("lowrank") == 1, report["schedule_rules"]
    assert "unscheduled" not in report["schedule_rules"]


def test_gemm_row_count_takes_untileable_ranks_to_the_c_kernel(tmp_path):
    """From the C GEMM kernel's row threshold on, both linears are C GEMM calls, whatever
    the rank (the fused kernel was 1.15-1.5x slower there on MiniLM's shapes)."""
    model = LowRank(64, 48, 76, bias=True, rank=69)
    report = compile_and_check(tmp_path, model, (GEMM_MIN_ROWS, 48))
    assert "lowrank" not in report["schedule_rules"]
    assert sum(1 for v in report["matmuls"].values() if v.get("kernel") == "gemm") == 2
    report = compile_and_check(tmp_path / "fewer", model, (GEMM_MIN_ROWS - 1, 48))
    assert report["schedule_rules"].get("lowrank") == 1


def test_two_linear_path_needs_panels_of_the_targets_vector_width(tmp_path):
    """A rank of 9 AVX2 vectors is 4.5 AVX-512 vectors: the matmul rule has no panel for it
    there, so on an AVX-512 host the call stays fused (two linears were 9-17x slower); on
    AVX2 it is two matmul-rule kernels. Nothing is left unscheduled either way."""
    lanes = CpuShape.of(get_target("host")).lanes
    report = compile_and_check(tmp_path, LowRank(64, 48, 80, bias=True, rank=72), (32, 48))
    rules = report["schedule_rules"]
    assert "unscheduled" not in rules and "row" not in rules, rules
    if 72 % lanes == 0:
        assert "lowrank" not in rules and rules.get("matmul") == 2, rules
    else:
        assert rules.get("lowrank") == 1, rules


def test_fused_row_limit_is_inclusive(tmp_path):
    rows = LOWRANK_FUSED_MAX_ROWS
    report = compile_and_check(tmp_path, LowRank(32, 24, 8, bias=True), (rows, 24))
    assert report["schedule_rules"].get("lowrank") == 1
    report = compile_and_check(tmp_path / "more", LowRank(32, 24, 8, bias=True), (rows + 1, 24))
    assert "lowrank" not in report["schedule_rules"]


def test_two_lowrank_layers_and_residual(tmp_path):
    """Two fused kernels in one program, with element-wise work between them."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = LowRank(48, 48, 12, bias=True)
            self.b = LowRank(48, 48, 10, bias=False, rank=6)

        def forward(self, x):
            return x + self.b(torch.nn.functional.silu(self.a(x)))

    model = Two()
    x = torch.randn(1, 1, 48)
    program = splice.capture(model, (x,))
    art = splice.compile(program, "host", output=tmp_path / "two.artifact")
    x2 = torch.randn(1, 1, 48)
    with torch.no_grad():
        ref = model(x2)
    diff = (art.load()(x2) - ref).abs().max().item()
    assert diff <= ATOL
    assert art.manifest["lowering"]["schedule_rules"].get("lowrank") == 2


class Siblings(nn.Module):
    """Low-rank layers reading one input, as a decoder layer's q/k/v after ``lowrank``:
    ``shapes`` gives each layer's (m, k, bias, rank); the outputs are combined."""

    def __init__(self, n: int, shapes: list[tuple[int, int, bool, int | None]]):
        super().__init__()
        self.layers = nn.ModuleList(
            [LowRank(m, n, k, bias=bias, rank=rank) for m, k, bias, rank in shapes]
        )
        for i, layer in enumerate(self.layers):  # distinct weights for equal shapes
            with torch.no_grad():
                layer.A.mul_(1 + i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [torch.tanh(layer(x)) * (i + 1) for i, layer in enumerate(self.layers)], -1
        )


def _lowrank_kernels(report: dict) -> list[dict]:
    return sorted(
        (v for v in report["matmuls"].values() if v.get("kernel") == "lowrank_linear"),
        key=lambda v: (-v["groups"], v["m"]),
    )


@pytest.mark.parametrize(
    "shapes,x_shape,groups",
    [
        # three equal layers share a call; the one of another rank has its own
        pytest.param([(64, 20, False, None)] * 3 + [(64, 20, False, 9)], (1, 1, 48), [3, 1],
                     id="qkv-and-other-rank"),
        pytest.param([(64, 20, True, 13)] * 2, (1, 1, 48), [2], id="pair-bias-rank"),
        pytest.param([(64, 20, True, None), (64, 20, False, None)], (1, 48), [1, 1],
                     id="bias-differs"),
        pytest.param([(32, 12, False, None)] * 2, (3, 48), [2], id="m3-rows"),
        # an output width that is no whole number of vectors: padded rows, never grouped (the
        # two calls are one function of the library)
        pytest.param([(60, 20, False, None)] * 2, (1, 48), [1], id="m-not-whole-vectors"),
    ],
)  # fmt: skip
def test_sibling_layers_share_one_call(tmp_path, shapes, x_shape, groups):
    """``groups``: the layers each distinct fused kernel computes."""
    model = Siblings(48, shapes).eval()
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    program = splice.capture(model, (x,))
    art = splice.compile(program, "host", output=tmp_path / "siblings.artifact")
    x2 = torch.randn(x_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x2)
    diff = (art.load()(x2) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"
    report = art.manifest["lowering"]
    kernels = _lowrank_kernels(report)
    assert [k["groups"] for k in kernels] == groups
    assert report["schedule_rules"].get("lowrank") == len(groups)
    assert "unscheduled" not in report["schedule_rules"]


def test_llama_decode_groups_qkv_and_gate_up(tmp_path):
    """A LLaMA decode step after ``lowrank``: per layer q/k/v in one call, gate/up in one,
    o and down alone; the artifact equals the program."""
    import transformers

    from splice.passes import parse_pipeline

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    programs = splice.capture_lm(lm, max_len=16, prompt_len=4)
    decode = (
        parse_pipeline("lowrank{method=svd,ratio=0.5,targets=*.layers.*}")
        .run(programs.decode, sample_inputs=programs.calibration_samples()[1])
        .program
    )
    art = splice.compile(decode, "host", output=tmp_path / "decode.artifact")
    kernels = _lowrank_kernels(art.manifest["lowering"])
    assert [(k["groups"], k["m"]) for k in kernels] == [(3, 64), (2, 128), (1, 64), (1, 64)]
    from splice.runtime.backends.tvm import example_inputs

    inputs = list(example_inputs(decode))
    inputs[0] = torch.tensor([[5]])
    inputs[1] = torch.tensor([3])
    got = art.load().run(*inputs)
    want = decode(*inputs)
    for g, w in zip(got, want if isinstance(want, (list, tuple)) else [want]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
