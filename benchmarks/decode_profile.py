"""Where a decode step's time goes: dense vs lowrank 50% LLaMA decode step, per kernel.

The decode program of :func:`splice.capture_lm` for the LLaMA of ``common.LLAMA_DECODE_SHAPE``
(hidden 2048, 4 layers, inter 5632, vocab 1024; cache of ``--max-len`` positions), dense and
after ``lowrank{method=svd,ratio=0.5,targets=*.layers.*}`` (as benchmarks/generate.py), each
compiled for the host (TVM) and loaded in this one process. Then:

* **step**: the two steps alternate (``--steps`` each, after a warm-up); median wall time and
  process CPU time per step, and the median of the per-pair ratios dense / lowrank (pairs
  taken back to back see the same load);
* **kernels**: every ``--every``-th pair also runs each program once on a second Relax VM
  with an instrument that times every call the VM makes; per kernel (TIR function or VM
  builtin): calls per step, median µs per call, the bytes of its arguments and outputs
  (what it must at least move), and those bytes / its median as GB/s; summed per category
  (lowrank GEMV pairs, dense GEMVs, attention over the cache, the cache write, the rest).

The instrumented runs add a Python callback per call (a few µs each): per-kernel sums exceed
the plain step time by that much; compare kernels with each other, and steps with steps.

The lowrank pass's SVDs (float64, 28 weights) take minutes: the two decode programs are saved
under ``--cache`` (default ``~/.cache/splice/bench/decode_profile``) and reused while the
shape and max length are the same.

::

    python benchmarks/decode_profile.py                 # ~2 min after the first run
    python benchmarks/decode_profile.py --threads 1 --steps 20
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import LLAMA_DECODE_SHAPE, llama_lm, log

PIPELINE = "lowrank{method=svd,ratio=0.5,targets=*.layers.*}"


def programs(cache: Path, max_len: int) -> dict[str, Any]:
    """The dense and lowrank decode programs (from ``cache`` when saved there before)."""
    import splice
    from splice.passes import parse_pipeline

    key = "-".join(f"{k}{v}" for k, v in sorted(LLAMA_DECODE_SHAPE.items())) + f"-len{max_len}"
    key += "-keys_t"  # capture_lm's cache layout (keys stored transposed since 2026-12-02)
    paths = {name: cache / key / name for name in ("dense", "lowrank")}
    if all((p / "manifest.json").exists() for p in paths.values()):
        return {name: splice.load(p) for name, p in paths.items()}
    lm = llama_lm(LLAMA_DECODE_SHAPE["layers"], LLAMA_DECODE_SHAPE)
    lm.config.max_position_embeddings = max(lm.config.max_position_embeddings, max_len)
    t0 = time.perf_counter()
    lmp = splice.capture_lm(lm, max_len=max_len, prompt_len=max_len // 2)
    dense = lmp.decode
    lowrank = (
        parse_pipeline(PIPELINE).run(dense, sample_inputs=lmp.calibration_samples()[1]).program
    )
    log(f"captured and factored in {time.perf_counter() - t0:.0f} s")
    out = {"dense": dense, "lowrank": lowrank}
    for name, p in paths.items():
        splice.save(out[name], p, overwrite=True)
    return out


@dataclass
class Run:
    """One compiled decode program, its inputs, and what was measured of it."""

    name: str
    part: Any
    inputs: list[torch.Tensor]
    tvm_args: list[Any]
    vm: Any
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    calls: dict[str, list[float]] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    runs: int = 0


def load(name: str, program: Any, out: Path, position: int, threads: int) -> Run:
    """Compile ``program`` into ``out``, load it, and make its instrumented second VM."""
    import tvm
    import tvm_ffi
    from tvm import relax

    import splice
    from splice.runtime.backends.tvm import example_inputs

    art = splice.compile(program, "host", output=out, overwrite=True)
    model = art.load(num_threads=threads)
    part = next(iter(model.parts.values()))
    inputs = list(example_inputs(program))
    inputs[0] = torch.ones_like(inputs[0])  # token 1
    inputs[1] = torch.full_like(inputs[1], position)
    library = out / art.manifest["parts"][0]["library"]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu(0))
    args = [tvm.runtime.from_dlpack(x.contiguous()) for x in inputs]
    run = Run(name, part, inputs, args, vm)
    started: list[float] = [0.0]

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            started[0] = time.perf_counter()
            return 0
        run.calls.setdefault(symbol, []).append(time.perf_counter() - started[0])
        if symbol not in run.nbytes:
            run.nbytes[symbol] = sum(_nbytes(a) for a in (*args, ret))
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    return run


def _nbytes(value: Any) -> int:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        bits = tvm_bits(str(dtype))
        return math.prod(int(d) for d in shape) * bits // 8
    except (TypeError, ValueError):
        return 0


def tvm_bits(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return int(digits) if digits else 8


def category(symbol: str) -> str:
    if symbol.startswith("lowrank_linear"):
        return "lowrank GEMV pairs"
    if symbol.startswith("NT_matmul"):
        return "dense GEMVs"
    if "write_slot" in symbol or ("where" in symbol and "softmax" not in symbol):
        return "cache write"
    if symbol.startswith("matmul") or "transpose" in symbol or "softmax" in symbol:
        return "attention"
    if symbol.startswith("vm.builtin"):
        return "VM builtins"
    return "other kernels"


def measure(runs: list[Run], steps: int, every: int) -> None:
    for r in runs:  # warm-up
        for _ in range(3):
            r.part(*r.inputs)
    for i in range(steps):
        for r in runs:
            c0, t0 = time.process_time(), time.perf_counter()
            r.part(*r.inputs)
            r.wall.append(time.perf_counter() - t0)
            r.cpu.append(time.process_time() - c0)
        if i % every == 0:
            for r in runs:
                r.vm["main"](*r.tvm_args, *r.part.params)
                r.runs += 1


def report(runs: list[Run], threads: int, load: float) -> str:
    dense, lowrank = runs
    lines = [
        f"threads {threads}; 1-min load average {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {len(dense.wall)} steps each, alternating",
        "",
        "| program | step ms (median wall) | step CPU ms (median) |",
        "|---|--:|--:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.name} | {statistics.median(r.wall) * 1e3:.2f} | "
            f"{statistics.median(r.cpu) * 1e3:.2f} |"
        )
    pairs = [d / w for d, w in zip(dense.wall, lowrank.wall)]
    cpu = statistics.median(dense.cpu) / statistics.median(lowrank.cpu)
    lines += [
        "",
        f"dense / lowrank: median of paired wall ratios {statistics.median(pairs):.3f}, "
        f"of median CPU times {cpu:.3f}",
        "",
    ]
    for r in runs:
        lines += [
            f"**{r.name}** ({r.runs} instrumented steps)",
            "",
            "| kernel | category | calls/step | µs/call (median) | MB moved | GB/s |",
            "|---|---|--:|--:|--:|--:|",
        ]
        sums: dict[str, float] = {}
        rows = []
        for symbol, ts in r.calls.items():
            per_step = len(ts) / max(1, r.runs)
            med = statistics.median(ts)
            sums[category(symbol)] = sums.get(category(symbol), 0.0) + med * per_step
            rows.append((med * per_step, symbol, per_step, med, r.nbytes.get(symbol, 0)))
        for _, symbol, per_step, med, nb in sorted(rows, reverse=True)[:14]:
            gbs = nb / med / 1e9 if med > 0 else 0.0
            lines.append(
                f"| {symbol[:60]} | {category(symbol)} | {per_step:.0f} | {med * 1e6:.1f} | "
                f"{nb / 1e6:.2f} | {gbs:.1f} |"
            )
        total = sum(sums.values())
        lines += [
            "",
            "per category (ms/step, instrumented): "
            + ", ".join(f"{c} {t * 1e3:.2f}" for c, t in sorted(sums.items(), key=lambda x: -x[1]))
            + f"; sum {total * 1e3:.2f}",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="TVM threads (all cores)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per program (60)")
    ap.add_argument("--every", type=int, default=4, help="instrument every N-th pair (4)")
    ap.add_argument("--max-len", type=int, default=256, help="cache positions (256)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "splice" / "bench" / "decode_profile",
        help="where the two decode programs are kept between runs",
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = args.threads or os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import tempfile

    load_before = os.getloadavg()[0]
    progs = programs(args.cache, args.max_len)
    with tempfile.TemporaryDirectory(prefix="splice-decode-profile-") as d:
        runs = [
            load(name, progs[name], Path(d) / f"{name}.artifact", args.max_len // 2, threads)
            for name in ("dense", "lowrank")
        ]
        log(f"timing {args.steps} steps each…")
        measure(runs, args.steps, args.every)
        print(report(runs, threads, load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
