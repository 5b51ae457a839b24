"""Targets: what a program is compiled for, and what the cost model knows about it.

A :class:`Target` names the hardware (kind, triple, CPU features) and carries the numbers
the cost model and the passes' budget options read: cores, vector width, memory bandwidth
and peak FLOP/s. The host's numbers are measured (:func:`measure_host`, cached on disk);
other targets' numbers are declared. This module depends only on ``splice.errors``, so
both the passes and the runtime can read it.
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
    mem_bandwidth_gbs: float = 10.0
    peak_gflops: float = 10.0
    measured: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def roofline_seconds(self, flops: float, nbytes: float) -> float:
        """Predicted time of work that does ``flops`` and moves ``nbytes`` (roofline)."""
        return max(flops / (self.peak_gflops * 1e9), nbytes / (self.mem_bandwidth_gbs * 1e9))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Target:
        d = dict(d)
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


def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return tuple(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ()


def host_target(*, measure: bool = True) -> Target:
    """The machine splice runs on, with measured bandwidth and peak (cached on disk)."""
    flags = _cpu_flags()
    vec = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    machine = platform.machine()
    triple = "aarch64-linux-gnu" if machine in ("aarch64", "arm64") else f"{machine}-linux-gnu"
    base = Target(
        name="host",
        kind="llvm",
        triple=triple,
        cpu="native",
        features=flags,
        cores=os.cpu_count() or 1,
        vector_bits=vec,
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
# 4 cores, NEON 128-bit, ~4 GB/s LPDDR4 measured by users, ~24 GFLOP/s fp32.
AARCH64_LINUX = Target(
    name="aarch64-linux",
    kind="llvm",
    triple="aarch64-linux-gnu",
    cpu="cortex-a72",
    features=("neon",),
    cores=4,
    vector_bits=128,
    mem_bandwidth_gbs=4.0,
    peak_gflops=24.0,
)
CUDA = Target(
    name="cuda",
    kind="cuda",
    triple="nvptx64-nvidia-cuda",
    cores=132,
    vector_bits=1024,
    mem_bandwidth_gbs=3350.0,
    peak_gflops=67000.0,
)


def get_target(name: str) -> Target:
    """A target by name: ``host``, ``aarch64-linux`` or ``cuda``."""
    if name in ("host", "x86_64", "llvm"):
        return host_target()
    if name == AARCH64_LINUX.name:
        return AARCH64_LINUX
    if name == CUDA.name:
        return CUDA
    raise LoweringError(f"unknown target {name!r}", hint="targets: host, aarch64-linux, cuda")


__all__ = ["AARCH64_LINUX", "CUDA", "Target", "get_target", "host_target", "measure_host"]
