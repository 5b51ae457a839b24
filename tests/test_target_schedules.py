"""Schedules come from the target: the GEMM kernel's tile, vector width and cache blocking are
derived from the Target's ISA, registers and caches (not from the machine the tests run on),
the C kernel is exact on awkward shapes, and one program compiled for ``host``,
``x86-64-v3`` and ``aarch64-linux`` gets a different plan where the ISA differs and equals
eager PyTorch on each (aarch64 under qemu)."""

from __future__ import annotations

import ctypes
import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch

import splice
from splice.errors import LoweringError
from splice.runtime import edge
from splice.runtime.kernels import tvm_gemm as G
from splice.target import X86_LEVELS, get_target, host_target

pytest.importorskip("tvm")


def test_named_targets_describe_their_isa():
    v3, v4 = get_target("x86-64-v3"), get_target("x86-64-v4")
    arm = get_target("aarch64-linux")
    assert (v3.isa, v3.vector_lanes, v3.vector_registers) == ("avx2", 8, 16)
    assert (v4.isa, v4.vector_lanes, v4.vector_registers) == ("avx512", 16, 32)
    assert (arm.isa, arm.vector_lanes, arm.vector_registers) == ("neon", 4, 32)
    assert set(X86_LEVELS["x86-64-v3"][0]) <= set(v4.features)
    a76 = get_target("aarch64-linux:cortex-a76")
    assert a76.cpu == "cortex-a76" and a76.l1d_bytes == 64 * 1024
    with pytest.raises(LoweringError, match="unknown ARM core 'cortex-z9'"):
        get_target("aarch64-linux:cortex-z9")
    with pytest.raises(LoweringError, match="x86-64-v3"):
        get_target("x86-64-v9")


def test_gemm_plan_follows_registers_lanes_and_caches():
    v3 = get_target("x86-64-v3")
    v4 = get_target("x86-64-v4")
    arm = get_target("aarch64-linux")
    p3, p4, pa = (G.gemm_plan(t, 128, 3072, 768) for t in (v3, v4, arm))
    # register tile: 3/4 of the registers accumulate, NR = 2 vectors (x86) / 4 (NEON)
    assert (p3.lanes, p3.mr, p3.nr) == (8, 6, 16)
    assert (p4.lanes, p4.mr, p4.nr) == (16, 12, 32)
    assert (pa.lanes, pa.mr, pa.nr) == (4, 6, 16)
    for t, p in ((v3, p3), (v4, p4), (arm, pa)):
        assert p.mr * (p.nr // p.lanes) + p.nr // p.lanes + 1 <= t.vector_registers
        # the B micro-panel fills half of L1d; the packed A block at most half of L2
        assert p.kc * p.nr * 4 <= t.l1d_bytes // 2 or p.kc == 64
        assert p.mc % p.mr == 0 and p.mc * p.kc * 4 <= max(t.l2_bytes // 2, p.mr * p.kc * 4)
        assert p.tasks == t.cores
    # a bigger L1 gives a deeper KC; a smaller L2 a shorter MC
    # (from a fixed 32 KiB: the host's target is measured, and its L1d may be 48 KiB)
    big_l1 = G.gemm_plan(replace(v3, l1d_bytes=64 * 1024), 512, 3072, 4096)
    assert big_l1.kc == 2 * G.gemm_plan(replace(v3, l1d_bytes=32 * 1024), 512, 3072, 4096).kc
    small_l2 = G.gemm_plan(replace(v3, l2_bytes=128 * 1024), 512, 3072, 4096)
    assert small_l2.mc < G.gemm_plan(v3, 512, 3072, 4096).mc
    # KC and MC never exceed the problem (rounded up to the tile)
    tiny = G.gemm_plan(v4, 5, 40, 24)
    assert tiny.kc == 32 and tiny.mc == tiny.mr == 6  # 6-row tiles pad the fewest rows
    # tile height: the tallest that pads at most 1/8 of the rows
    assert G.gemm_plan(v4, 16, 3072, 768).mr == 9  # not 12 + 12 with 8 rows of zeros
    assert G.gemm_plan(v3, 37, 3072, 768).mr == 5


def _kernel(plan: G.GemmPlan, target, tmp_path) -> ctypes.CDLL:
    obj = G.compile_kernel(plan, target)
    so = tmp_path / f"{plan.symbol}.so"
    subprocess.run(["gcc", "-shared", str(obj), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    fn = getattr(lib, plan.symbol)
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int32] * 5
    fn.restype = ctypes.c_int32
    return fn


def _pack(w: torch.Tensor, nr: int) -> torch.Tensor:
    """W [n, k] as the kernel reads it: [ceil(n/nr), k, nr], zero-padded."""
    n, k = w.shape
    panels = -(-n // nr)
    wp = torch.zeros(panels * nr, k)
    wp[:n] = w
    return wp.reshape(panels, nr, k).permute(0, 2, 1).contiguous()


def _x86_targets() -> list[str]:
    host = host_target(measure=False)
    if not host.triple.startswith("x86_64"):
        return []
    return [n for n, (feats, _, _) in X86_LEVELS.items() if set(feats) <= set(host.features)]


@pytest.mark.parametrize("level", ["x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize(
    "m,n,k,tasks",
    [
        (1, 1, 1, 1),
        (5, 7, 3, 2),
        (13, 33, 17, 3),
        (37, 100, 150, 2),
        (64, 257, 300, 5),
        (3, 16, 64, 4),
    ],
)
def test_c_kernel_matches_torch_on_edge_shapes(level, m, n, k, tasks, tmp_path):
    if level not in _x86_targets():
        pytest.skip(f"this machine cannot run {level} code")
    # a small L1 and L2 force several KC slices and MC blocks at these sizes
    target = replace(get_target(level), l1d_bytes=4096, l2_bytes=16384)
    plan = replace(G.gemm_plan(target, m, n, k), tasks=tasks)
    fn = _kernel(plan, target, tmp_path)
    g = torch.Generator().manual_seed(m * 1000 + n)
    a, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    bp = _pack(w, plan.nr)
    c = torch.full((m, n), float("nan"))
    work = torch.empty(tasks * plan.mc * plan.kc)
    for t in range(tasks):
        assert (
            fn(a.data_ptr(), bp.data_ptr(), c.data_ptr(), work.data_ptr(), m, n, k, t, tasks) == 0
        )
    # fp32 sums in another order than the float64 reference: error grows like sqrt(k)·eps·|x|
    want = (a.double() @ w.double().T).float()
    torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5 * max(1.0, k**0.5))


def _mlp128():
    """128 rows (G.MIN_ROWS), as [2, 64, 96]: the GEMMs take the C kernel."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 200), torch.nn.GELU(), torch.nn.Linear(200, 40))
    x = torch.randn(2, 64, 96)
    assert G.MIN_ROWS <= 2 * 64
    return model.eval(), x


@pytest.fixture(scope="module")
def mlp_artifacts(tmp_path_factory):
    model, x = _mlp128()
    program = splice.capture(model, (x,))
    out = tmp_path_factory.mktemp("targets")
    names = ["host", *(n for n in _x86_targets() if n == "x86-64-v3")]
    arts = {t: splice.compile(program, t, output=out / f"{t}.artifact") for t in names}
    return model, x, arts, out, program


def _gemm_plans(art) -> dict[str, dict]:
    manifest = json.loads((art.path / "manifest.json").read_text())
    return {k: v for k, v in manifest["lowering"]["matmuls"].items() if v.get("kernel") == "gemm"}


def test_each_target_gets_its_own_plan_and_matches_eager(mlp_artifacts):
    model, x, arts, _, _ = mlp_artifacts
    with torch.inference_mode():
        want = model(x)
    for name, art in arts.items():
        plans = _gemm_plans(art)
        target = get_target(name)
        assert sorted((p["m"], p["n"], p["k"]) for p in plans.values()) == [
            (128, 40, 200),
            (128, 200, 96),
        ]
        for p in plans.values():
            expected = G.gemm_plan(target, p["m"], p["n"], p["k"]).to_json()
            assert {key: p[key] for key in expected} == expected
        got = splice.load(art.path)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "x86-64-v3" in arts and host_target(measure=False).isa == "avx512":
        host_plan = next(iter(_gemm_plans(arts["host"]).values()))
        v3_plan = next(iter(_gemm_plans(arts["x86-64-v3"]).values()))
        # 12 × 32 tiles of 16-lane vectors (AVX-512) against 6 × 16 of 8 lanes (AVX2)
        assert (host_plan["lanes"], host_plan["mr"], host_plan["nr"]) == (16, 12, 32)
        assert (v3_plan["lanes"], v3_plan["mr"], v3_plan["nr"]) == (8, 6, 16)
        manifest = json.loads((arts["x86-64-v3"].path / "manifest.json").read_text())
        assert "avx2" in manifest["required_features"]
        assert "avx512f" not in manifest["required_features"]


def test_aarch64_gets_a_neon_plan_and_matches_eager_under_qemu(mlp_artifacts, need_edge):
    model, x, arts, out, program = mlp_artifacts
    arm = splice.compile(program, "aarch64-linux", output=out / "arm.artifact")
    plans = _gemm_plans(arm)
    assert plans and all((p["lanes"], p["mr"], p["nr"]) == (4, 6, 16) for p in plans.values())
    host_plan = next(iter(_gemm_plans(arts["host"]).values()))
    assert host_plan["lanes"] != 4  # an x86 host: 8 or 16 lanes
    run = edge.run_under_qemu(arm.path, (x,))
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(run.outputs[0], want, rtol=0, atol=1e-5)
