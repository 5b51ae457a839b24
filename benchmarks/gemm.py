"""fp32 GEMM throughput: splice's compiled Linear against eager PyTorch (MKL) and the machine's peak.

What is measured
----------------
One ``nn.Linear(k, n, bias=False)`` on ``x [m, k]`` for the GEMM shapes of the lowering
benchmark's workloads (GPT-2 block and MiniLM at 128 / 256 rows, LLaMA prefill), run by:

* ``eager`` — ``torch.nn.functional.linear`` under ``torch.inference_mode()`` (MKL), with
  torch's default threads;
* ``splice host`` / ``splice v3`` — ``splice.compile(p, "host" | "x86-64-v3")`` and
  ``splice.load`` with their defaults (the v3 build on x86 machines with AVX2 only).

GFLOP/s = 2·m·n·k / median time of ``--repeats`` calls (after 5 warm-up calls). The machine's
fp32 peak is the best rate seen in the run: ``torch.mm`` at 1024³ (``measure_host``) or any
GEMM above; "% of peak" is relative to it. Outputs are checked against eager (max abs diff
≤ 1e-3 · sqrt(k), else exit status 1 and RESULTS.md is left alone).

Run from the repository root::

    python benchmarks/gemm.py              # writes this CPU kind's section of RESULTS.md
    python benchmarks/gemm.py --no-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import busy_seconds, cpu_model, git_state, log, other_cores, write_marked_section
from lowering import time_calls

import splice
from splice.target import X86_LEVELS, host_target, measure_host

SECTION = "## GEMM throughput: splice's C kernel against MKL (benchmarks/gemm.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHAPES = [  # (m, k, n, where)
    (128, 768, 3072, "GPT-2 block MLP up"),
    (128, 3072, 768, "GPT-2 block MLP down"),
    (128, 768, 2304, "GPT-2 block QKV"),
    (256, 384, 1536, "MiniLM batch 8×32 FFN up"),
    (128, 512, 1376, "LLaMA prefill FFN"),
    (32, 768, 3072, "MLP batch 32"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    command = shlex.join(["python", *(sys.argv if argv is None else ["gemm.py", *argv])])
    host = host_target(measure=False)
    targets = {"splice host": "host"}
    if set(X86_LEVELS["x86-64-v3"][0]) <= set(host.features):
        targets["splice v3"] = "x86-64-v3"
    busy, t_start, load = busy_seconds(), time.perf_counter(), os.getloadavg()[0]
    peak = measure_host(10)["peak_gflops"]
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        for m, k, n, where in SHAPES:
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, n, bias=False).eval()
            x = torch.randn(m, k)
            flops = 2 * m * n * k
            ref = lin(x)
            rates = {
                "eager": flops
                / time_calls(lambda lin=lin, x=x: lin(x), 5, args.repeats).median_s
                / 1e9
            }
            for peer, target in targets.items():
                p = splice.capture(lin, (x,))
                art = splice.compile(p, target, output=Path(d) / f"{m}-{k}-{n}-{target}")
                cm = splice.load(art.path)
                worst = max(worst, (cm(x) - ref).abs().max().item() / max(1.0, k**0.5))
                rates[peer] = (
                    flops / time_calls(lambda cm=cm, x=x: cm(x), 5, args.repeats).median_s / 1e9
                )
            log(f"{m}x{k}x{n} ({where}): " + ", ".join(f"{p} {r:.1f}" for p, r in rates.items()))
            rows.append((m, k, n, where, rates))
    peak = max(peak, *(r for *_, rates in rows for r in rates.values()))
    peers = ["eager", *targets]
    kind = f"{cpu_model()}, {host.isa}"
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    heading, begin, end = (
        f"{SECTION} — {kind}",
        f"<!-- gemm:{slug}:begin -->",
        f"<!-- gemm:{slug}:end -->",
    )
    cores = other_cores(busy, time.perf_counter() - t_start)
    lines = [
        heading,
        begin,
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; machine: "
        f"{cpu_model()} ({host.isa}, {host.vector_bits}-bit, {host.vector_registers} vector "
        f"registers, L1d {host.l1d_bytes // 1024} KiB, L2 {host.l2_bytes // 1024} KiB), "
        f"{os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"- command: `{command}`; splice {splice.__version__} at {git_state()}; 1-min load "
        f"{load:.2f} before; other processes used {cores:.2f} cores during the run",
        f"- peak: {peak:.1f} GFLOP/s, the best rate seen (torch.mm 1024³ or any row below)",
        "",
        "| m × k × n | where | "
        + " | ".join(f"{p} GFLOP/s" for p in peers)
        + " | "
        + " | ".join(f"{p} % of peak" for p in peers[1:])
        + " | splice host / eager |",
        "|---|---|" + "--:|" * (2 * len(peers)),
    ]
    for m, k, n, where, rates in rows:
        lines.append(
            f"| {m} × {k} × {n} | {where} | "
            + " | ".join(f"{rates[p]:.1f}" for p in peers)
            + " | "
            + " | ".join(f"{100 * rates[p] / peak:.0f}%" for p in peers[1:])
            + f" | {rates['splice host'] / rates['eager']:.2f} |"
        )
    lines += ["", end]
    text = "\n".join(lines)
    print(text)
    if worst > 1e-3:
        log(f"ERROR: splice differs from eager by {worst:.3g}·sqrt(k); not writing")
        return 1
    if not args.no_results:
        write_marked_section(RESULTS, heading, begin, end, text)
        log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
