"""Targets: what a program is compiled for, and what the cost model knows about it.

A :class:`Target` names the hardware (kind, triple, CPU model, ISA features) and carries the
numbers that the cost model, the passes' budget options and the backends' schedules read:
cores, vector width and vector register count, cache sizes, memory bandwidth and peak
FLOP/s. Every constant of a CPU schedule (vector lanes, register tile, cache blocking) is
derived from these fields, never from the machine splice happens to run on: compiling for
``x86-64-v3`` on an AVX-512 machine gives AVX2 kernels.

Named targets (:func:`get_target`):

``host``
    this machine: ISA features from ``/proc/cpuinfo``, caches from sysfs, bandwidth and
    peak measured once (:func:`measure_host`, cached on disk).
``x86-64-v3``
    any x86-64 CPU with AVX2 and FMA (Haswell and later, AMD Zen): 256-bit vectors, 16
    vector registers.
``x86-64-v4``
    x86-64 with AVX-512 (F, BW, CD, DQ, VL: Skylake-SP and later, AMD Zen 4): 512-bit
    vectors, 32 vector registers.
``aarch64-linux``
    64-bit ARM Linux with NEON (128-bit, 32 registers); a Cortex-A72-class board by default,
    another core by name: ``aarch64-linux:cortex-a76``.

The x86 ISA levels take their core count, bandwidth and peak from this machine when it has
the ISA (the usual case: compiling where one deploys), else declared numbers. This module
depends only on ``splice.errors``, so both the passes and the runtime can read it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from splice.errors import LoweringError


@dataclass(frozen=True)
class Target:
    """A compilation target and its performance model."""

    name: str
    kind: str = "llvm"  # llvm | cuda
    triple: str = "x86_64-linux-gnu"
    cpu: str = ""
    features: tuple[str, ...] = ()
    cores: int = 1
    vector_bits: int = 128
    vector_registers: int = 16
    l1d_bytes: int = 32 * 1024  # per core
    l2_bytes: int = 512 * 1024  # per core
    l3_bytes: int = 0  # shared; 0 when there is none
    mem_bandwidth_gbs: float = 10.0
    peak_gflops: float = 10.0
    measured: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def roofline_seconds(self, flops: float, nbytes: float) -> float:
        """Predicted time of work that does ``flops`` and moves ``nbytes`` (roofline)."""
        return max(flops / (self.peak_gflops * 1e9), nbytes / (self.mem_bandwidth_gbs * 1e9))

    @property
    def vector_lanes(self) -> int:
        """fp32 lanes of one vector register."""
        return max(1, self.vector_bits // 32)

    @property
    def isa(self) -> str:
        """The vector ISA the schedules target: ``avx512``, ``avx2``, ``neon``, ``sse``, or
        ``scalar`` (and ``cuda``)."""
        if self.kind == "cuda":
            return "cuda"
        if self.triple.startswith("aarch64"):
            return "neon"
        feats = set(self.features)
        if "avx512f" in feats and self.vector_bits >= 512:
            return "avx512"
        if "avx2" in feats and "fma" in feats and self.vector_bits >= 256:
            return "avx2"
        return "sse" if self.triple.startswith("x86_64") else "scalar"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Target:
        d = {k: v for k, v in d.items() if k in Target.__dataclass_fields__}
        d["features"] = tuple(d.get("features", ()))
        return Target(**d)


def _cache_path() -> Path:
    base = os.environ.get("SPLICE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "splice"
    )
    return Path(base) / "host.json"


def measure_host(repeats: int = 5) -> dict[str, float]:
    """STREAM-triad bandwidth (GB/s) and fp32 matmul peak (GFLOP/s) of this machine."""
    import numpy as np
    import torch

    n = 1 << 24  # 64 MiB per fp32 array: far beyond the caches
    a = np.zeros(n, dtype=np.float32)
    b = np.random.default_rng(0).random(n, dtype=np.float32)
    c = np.random.default_rng(1).random(n, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.multiply(c, np.float32(3.0), out=a)
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t0)
    # triad a = b + s*c touches 3 arrays; done in two numpy passes it moves 5 arrays
    bandwidth = 5 * 4 * n / best / 1e9
    m = 1024
    x = torch.randn(m, m)
    y = torch.randn(m, m)
    torch.mm(x, y)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, y)
        best = min(best, time.perf_counter() - t0)
    return {"mem_bandwidth_gbs": bandwidth, "peak_gflops": 2 * m**3 / best / 1e9}


def cpu_flags() -> tuple[str, ...]:
    """This machine's CPU feature flags (``/proc/cpuinfo``), sorted; empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return tuple(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ()


def _cache_sizes() -> dict[str, int]:
    """Per-core L1d and L2 and the shared L3 of this machine, in bytes, from sysfs (the
    declared defaults of :class:`Target` where sysfs does not say)."""
    out: dict[str, int] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1024, "M": 1024 * 1024}.get(size[-1:], 1)
        try:
            nbytes = int(size.rstrip("KM")) * scale
        except ValueError:
            continue
        if level == 1 and kind in ("Data", "Unified"):
            out["l1d_bytes"] = nbytes
        elif level == 2:
            out["l2_bytes"] = nbytes
        elif level == 3:
            out["l3_bytes"] = nbytes
    return out


def host_target(*, measure: bool = True) -> Target:
    """The machine splice runs on, with measured bandwidth and peak (cached on disk)."""
    flags = cpu_flags()
    machine = platform.machine()
    arm = machine in ("aarch64", "arm64")
    vec = 128 if arm else 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    triple = "aarch64-linux-gnu" if arm else f"{machine}-linux-gnu"
    base = Target(
        name="host",
        kind="llvm",
        triple=triple,
        cpu="native",
        features=flags,
        cores=os.cpu_count() or 1,
        vector_bits=vec,
        vector_registers=32 if arm or "avx512f" in flags else 16,
        **_cache_sizes(),
    )
    if not measure:
        return base
    path = _cache_path()
    key = f"{platform.node()}|{machine}|{os.cpu_count()}"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return replace(
                base,
                mem_bandwidth_gbs=cached["mem_bandwidth_gbs"],
                peak_gflops=cached["peak_gflops"],
                measured=True,
            )
    except (OSError, ValueError, KeyError):
        pass
    numbers = measure_host()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, **numbers}))
    except OSError:
        pass
    return replace(base, measured=True, **numbers)


# Declared targets. Numbers for the edge board are a Cortex-A72-class part (Raspberry Pi 4):
# 4 cores, NEON 128-bit, 32 KiB L1d per core, 1 MiB L2 shared by the 4 cores, no L3,
# ~4 GB/s LPDDR4 measured by users, ~24 GFLOP/s fp32.
AARCH64_LINUX = Target(
    name="aarch64-linux",
    kind="llvm",
    triple="aarch64-linux-gnu",
    cpu="cortex-a72",
    features=("neon",),
    cores=4,
    vector_bits=128,
    vector_registers=32,
    l1d_bytes=32 * 1024,
    l2_bytes=256 * 1024,
    l3_bytes=0,
    mem_bandwidth_gbs=4.0,
    peak_gflops=24.0,
)
# Other ARM cores by name (``aarch64-linux:<core>``): caches per core and declared numbers.
ARM_CORES: dict[str, dict[str, Any]] = {
    "cortex-a72": {},
    "cortex-a55": {"l1d_bytes": 32 * 1024, "l2_bytes": 128 * 1024, "l3_bytes": 1 << 20,
                   "peak_gflops": 16.0},
    "cortex-a76": {"l1d_bytes": 64 * 1024, "l2_bytes": 512 * 1024, "l3_bytes": 2 << 20,
                   "mem_bandwidth_gbs": 8.0, "peak_gflops": 60.0},
    "neoverse-n1": {"l1d_bytes": 64 * 1024, "l2_bytes": 1 << 20, "l3_bytes": 32 << 20,
                    "mem_bandwidth_gbs": 20.0, "peak_gflops": 80.0},
}  # fmt: skip

# The x86-64 micro-architecture levels (psABI): the features each guarantees.
_X86_V3 = ("sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe")
_X86_V4 = (*_X86_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
X86_LEVELS: dict[str, tuple[tuple[str, ...], int, int]] = {
    "x86-64-v3": (_X86_V3, 256, 16),
    "x86-64-v4": (_X86_V4, 512, 32),
}
CUDA = Target(
    name="cuda",
    kind="cuda",
    triple="nvptx64-nvidia-cuda",
    cores=132,
    vector_bits=1024,
    mem_bandwidth_gbs=3350.0,
    peak_gflops=67000.0,
)


TARGET_NAMES = ("host", "x86-64-v3", "x86-64-v4", "aarch64-linux", "cuda")


def x86_level(name: str) -> Target:
    """``x86-64-v3`` / ``x86-64-v4``: an ISA level, with this machine's cores, caches and
    measured numbers when it has that ISA (declared ones otherwise)."""
    features, bits, regs = X86_LEVELS[name]
    host = host_target(measure=False)
    base = Target(
        name=name,
        kind="llvm",
        triple="x86_64-linux-gnu",
        cpu=name,
        features=features,
        cores=4,
        vector_bits=bits,
        vector_registers=regs,
        l1d_bytes=32 * 1024,
        l2_bytes=1 << 20,
        l3_bytes=16 << 20,
        mem_bandwidth_gbs=20.0,
        peak_gflops=100.0 if bits == 256 else 200.0,
    )
    if host.triple.startswith("x86_64") and set(features) <= set(host.features):
        measured = host_target()
        return replace(
            base,
            cores=measured.cores,
            l1d_bytes=measured.l1d_bytes,
            l2_bytes=measured.l2_bytes,
            l3_bytes=measured.l3_bytes,
            mem_bandwidth_gbs=measured.mem_bandwidth_gbs,
            peak_gflops=measured.peak_gflops,
            measured=measured.measured,
        )
    return base


def get_target(name: str) -> Target:
    """A target by name: ``host``, ``x86-64-v3``, ``x86-64-v4``, ``aarch64-linux`` (or
    ``aarch64-linux:<core>``, e.g. ``aarch64-linux:cortex-a76``) or ``cuda``."""
    if name in ("host", "x86_64", "llvm"):
        return host_target()
    if name in X86_LEVELS:
        return x86_level(name)
    base, _, core = name.partition(":")
    if base == AARCH64_LINUX.name:
        core = core or AARCH64_LINUX.cpu
        if core not in ARM_CORES:
            raise LoweringError(
                f"unknown ARM core {core!r} in target {name!r}",
                hint=f"cores: {', '.join(ARM_CORES)}",
            )
        if core == AARCH64_LINUX.cpu:
            return AARCH64_LINUX
        return replace(AARCH64_LINUX, name=name, cpu=core, **ARM_CORES[core])
    if name == CUDA.name:
        return CUDA
    raise LoweringError(
        f"unknown target {name!r}",
        hint=f"targets: {', '.join(TARGET_NAMES)} (or aarch64-linux:<core>)",
    )


__all__ = [
    "AARCH64_LINUX",
    "ARM_CORES",
    "CUDA",
    "TARGET_NAMES",
    "X86_LEVELS",
    "Target",
    "cpu_flags",
    "get_target",
    "host_target",
    "measure_host",
    "x86_level",
]
