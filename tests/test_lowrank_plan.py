"""The fused lowrank kernel's plan follows the target: panels of 4L / 2L / L columns for
the target's fp32 lanes L (as the dense decode GEMV's), padding to multiples of L, the
accumulator budget; and a kernel planned for a wider vector than the host's still computes
the op's reference (the layout is the plan's, the arithmetic the same)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import splice
from splice.ir.ops import lowrank_linear
from splice.runtime.kernels.tvm_lowrank_linear import _CPU, planning_for
from splice.runtime.kernels.tvm_schedules import (
    LOWRANK_ACCUMULATORS,
    CpuShape,
    lowrank_plan,
)
from splice.target import get_target, host_target

AVX2, AVX512, NEON = CpuShape(8, 16), CpuShape(16, 32), CpuShape(4, 32)


@pytest.mark.parametrize(
    "cpu,nb",
    [(AVX2, 32), (AVX512, 64), (NEON, 16)],
    ids=["avx2", "avx512", "neon"],
)
def test_decode_panels_are_four_vectors_wide(cpu, nb):
    plan = lowrank_plan(1, 2048, 2048, 512, cpu)
    assert (plan.nb1, plan.nb2, plan.mi) == (nb, nb, 1)
    assert (plan.kp, plan.mp) == (512, 2048)
    # the accumulators of a tile (panel vectors × segments) stay within the budget
    for width, s in ((plan.nb1, plan.s1), (plan.nb2, plan.s2)):
        assert plan.mi * s * (width // cpu.lanes) <= LOWRANK_ACCUMULATORS


@pytest.mark.parametrize("cpu", [AVX2, AVX512, NEON], ids=["avx2", "avx512", "neon"])
@pytest.mark.parametrize(
    "rows,m,n,k", [(1, 5632, 2048, 750), (4, 60, 48, 20), (3, 44, 33, 5), (96, 1536, 384, 245)]
)
def test_padding_and_segments_divide(cpu, rows, m, n, k):
    plan = lowrank_plan(rows, m, n, k, cpu)
    lanes = cpu.lanes
    assert plan.kp % lanes == 0 and 0 <= plan.kp - k < lanes
    assert plan.mp % lanes == 0 and 0 <= plan.mp - m < lanes
    assert plan.kp % plan.nb1 == 0 and plan.mp % plan.nb2 == 0
    assert plan.nb1 in (lanes, 2 * lanes, 4 * lanes) and plan.nb2 in (lanes, 2 * lanes, 4 * lanes)
    assert n % plan.s1 == 0 and plan.kp % plan.s2 == 0
    assert rows % plan.mi == 0 and plan.mi <= 4
    budget = cpu.accumulators if rows > plan.mi else max(LOWRANK_ACCUMULATORS, plan.mi)
    for width, s in ((plan.nb1, plan.s1), (plan.nb2, plan.s2)):
        assert plan.mi * s * (width // lanes) <= budget


@pytest.mark.parametrize(
    "cpu,kp,nb1,nb2",
    [(AVX2, 160, 16, 16), (AVX512, 160, 32, 64), (NEON, 156, 4, 16)],
    ids=["avx2", "avx512", "neon"],
)
def test_several_row_tiles_take_the_matmul_rules_register_budget(cpu, kp, nb1, nb2):
    """More rows than one tile (a prefill whose rank the matmul rule cannot tile): the
    panels serve every row tile from cache, so a tile fills the matmul rule's accumulator
    budget with the widest panel that fits, in one segment (MiniLM's 384x384 at rank 153)."""
    plan = lowrank_plan(32, 384, 384, 153, cpu)
    assert (plan.kp, plan.mp, plan.mi, plan.s1, plan.s2) == (kp, 384, 4, 1, 1)
    assert (plan.nb1, plan.nb2) == (nb1, nb2)
    for width in (plan.nb1, plan.nb2):
        assert plan.mi * (width // cpu.lanes) <= cpu.accumulators
    # one tile of rows (decode) keeps the decode budget
    one = lowrank_plan(4, 384, 384, 153, cpu)
    assert one.mi * one.s1 * (one.nb1 // cpu.lanes) <= LOWRANK_ACCUMULATORS


def test_no_target_plans_for_avx2():
    assert lowrank_plan(1, 2048, 2048, 512) == lowrank_plan(1, 2048, 2048, 512, AVX2)


def test_planning_for_sets_and_restores():
    assert _CPU.get() is None
    with planning_for(get_target("x86-64-v4")):
        assert _CPU.get() == CpuShape.of(get_target("x86-64-v4"))
        with planning_for(None):
            assert _CPU.get() is None
        assert _CPU.get() is not None
    assert _CPU.get() is None
    with pytest.raises(RuntimeError), planning_for(get_target("x86-64-v3")):
        raise RuntimeError("restored on error too")
    assert _CPU.get() is None


class LowRank(nn.Module):
    def __init__(self, m: int, n: int, k: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.A = nn.Parameter(torch.randn(m, k, generator=g) / k**0.5)
        self.B = nn.Parameter(torch.randn(k, n, generator=g) / n**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.splice.lowrank_linear(x, self.A, self.B, None, None)


def test_wider_vector_plan_runs_on_host_and_matches_reference(tmp_path):
    """The host target with twice its vector width: 2× wider panels (its code is split into
    the host's vectors by LLVM), same results as the reference."""
    pytest.importorskip("tvm")
    host = host_target()
    wide = dataclasses.replace(host, vector_bits=2 * host.vector_bits)
    model = LowRank(96, 128, 40)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(1))
    program = splice.capture(model, (x,))
    art = splice.compile(program, wide, output=tmp_path / "wide.artifact")
    kernels = [v for v in art.manifest["lowering"]["matmuls"].values() if "nb1" in v]
    assert len(kernels) == 1
    plan = lowrank_plan(1, 96, 128, 40, CpuShape.of(wide))
    narrow = lowrank_plan(1, 96, 128, 40, CpuShape.of(host))
    assert (plan.kp, plan.nb1) != (narrow.kp, narrow.nb1)  # the target changed the layout
    assert {key: kernels[0][key] for key in plan.to_json()} == plan.to_json()
    with torch.no_grad():
        ref = lowrank_linear.reference(x, model.A, model.B, None, None)
    out = art.load()(x)
    assert (out - ref).abs().max().item() <= 1e-4
