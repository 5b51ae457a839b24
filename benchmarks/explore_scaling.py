"""How capture and compile of data-dependent control flow grow with sequential decision sites.

What is measured
----------------
A SkipNet-style chain of ``n`` gated residual blocks, for n = 3, 9, 18 and 54 gates: the
zoo's :class:`splice.models_dynamic.SkipNet` (16 channels, 8x8 input; before block ``i`` a
gate -- global average pool, Linear to 1, sigmoid -- decides ``if gate(x) > 0.5: x = x +
block(x)``) with seeded random weights. Its ``n`` decisions are independent and sequential:
it has ``2**n`` paths, and a compiler that joins the two sides of each gate after the gate
(one ``cond`` per decision site) captures it from ``n + 1`` traces into ``n`` conds. Per
``n``:

* ``capture s`` -- wall-clock seconds of ``capture_dynamic(model, example)``, the fastest
  of ``--repeats`` captures (3 by default; each repeat is a whole capture of the same
  model; the report lists every repeat's CPU seconds);
* ``capture CPU s`` -- CPU seconds of this process during a capture, the least of the
  repeats (``time.process_time``; less sensitive than wall-clock to other jobs on the
  machine, though not immune: on a loaded 2-core machine single captures varied by ~25%,
  enough to move the 18 -> 54 slope by +-0.2, hence the repeats);
* ``traces`` -- ``torch.export.export`` calls during that capture (counted by wrapping
  ``torch.export.export``; ``program.attrs["traces"]`` where the explorer reports it);
* ``region traces`` -- how many of those paths were assembled from a *region trace*
  (``program.attrs["region_traces"]``): the first path is a full export of the model,
  every other path exports only the region from its decision to where it rejoins the
  first path, its prefix run untraced (``splice.ir.explore``'s module docs, "Cost").
  Before region traces (up to 3aa5509) every path was a full export, and capture time
  grew as n^2 (slope 1.95 from 18 to 54 gates in a quiet run). "(m replayed)": of those,
  the paths whose prefix was answered from the first trace's recorded calls instead of
  being run on fake tensors (``program.attrs["replayed_prefixes"]``,
  :mod:`splice.ir.explore_replay`; from f9e256e);
* ``conds`` -- ``higher_order.cond`` nodes in the captured program, over all its graphs;
* ``nodes`` -- FX nodes of the captured program, over all its graphs (placeholders and
  outputs included): the program's size;
* ``compile s`` -- ``splice.compile(program, "host")`` (the ``branches`` pass, one TVM
  library per part, each checked against PyTorch) plus ``splice.load``;
* ``parts`` / ``host branches`` -- compiled parts and branch steps of the host program.

Growth is reported per gate and as the log-log slope of each quantity against ``n``
between the two largest ``n`` that captured (the smallest includes first-call warm-up) (1.0 = linear; 2**n paths would
give a slope far above it). The issue's goal: 54 gates captured and compiled in under a
minute on this machine.

Checks (the run fails and RESULTS.md is left alone if one does not hold): on ``--inputs``
seeded random inputs per ``n`` (each decision at least ``MIN_MARGIN`` from its threshold), the compiled artifact equals eager (max abs diff <= 1e-4)
and its branch trace (``cm.last_trace``) equals eager's (``cond_trace(eager_decisions(
...))``). A size that fails to capture or compile is reported with its error (and fails
the run).

Method: ``--repeats`` captures (the counts and checks from the first) and one compile per size, in a fresh temporary folder, torch with its
default threads, TVM with ``TVM_NUM_THREADS = torch.get_num_threads()`` unless set;
``gc.collect()`` before each timed step. The load average and the CPU time other processes
used during the run are recorded: both times are wall-clock and grow on a busy machine.

Run from the repository root (estimated 5-7 minutes on a quiet 2-core machine: 88 traces
per round of captures, 3 rounds by default, and 172 parts in all; on a machine loaded by
other jobs at load 9 one round of captures took 5 minutes)::

    python benchmarks/explore_scaling.py                  # writes benchmarks/RESULTS.md
    python benchmarks/explore_scaling.py --quick          # 3 and 9 gates, no write
    python benchmarks/explore_scaling.py --gates 3,9 --no-compile --no-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    busy_seconds,
    cpu_model,
    error_text,
    flat_outputs,
    git_state,
    log,
    lscpu,
    max_abs_diff,
    other_cores,
    version,
    write_marked_section,
)

import splice
from splice import models_dynamic as Z
from splice.ir.explore import capture_dynamic, cond_trace, eager_decisions
from splice.ir.program import iter_graphs

SECTION = (
    "## Exploration scaling: sequential decision sites, capture and compile "
    "(benchmarks/explore_scaling.py)"
)
BEGIN = "<!-- explore_scaling:begin -->"
END = "<!-- explore_scaling:end -->"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GATES = (3, 9, 18, 54)
GOAL_GATES, GOAL_S = 54, 60.0
ATOL = 1e-4
CHANNELS, SIDE = 16, 8


@dataclass
class Row:
    gates: int
    capture_s: float | None = None
    capture_cpu_s: float | None = None
    capture_cpu_all: list[float] = field(default_factory=list)  # CPU s of every repeat
    traces: int | None = None
    region_traces: int | None = None
    replayed: int | None = None
    traces_reported: int | None = None
    conds: int | None = None
    nodes: int | None = None
    graphs: int | None = None
    compile_s: float | None = None
    parts: int | None = None
    host_branches: int | None = None
    max_abs_diff: float | None = None
    traces_equal: bool | None = None
    distinct_paths: int | None = None
    error: str | None = None

    @property
    def total_s(self) -> float | None:
        if self.capture_s is None or self.compile_s is None:
            return None
        return self.capture_s + self.compile_s


def gated_chain(n: int, count: int) -> tuple[torch.nn.Module, list[tuple[torch.Tensor]]]:
    """The n-gate SkipNet (seeded; gate weights scaled up so that the gates' logits spread
    over a few units) and ``count`` seeded inputs ``[1, 16, 8, 8]`` whose every decision
    lies at least ``MIN_MARGIN`` from its threshold (``model.probe``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 + n)
        model = Z.SkipNet(channels=CHANNELS, blocks=n).eval()
        with torch.no_grad():
            for gate in model.gates:
                gate.weight.mul_(8.0)
    g = torch.Generator().manual_seed(2000 + n)
    inputs: list[tuple[torch.Tensor]] = []
    with torch.no_grad():
        while len(inputs) < count:
            x = torch.randn(1, CHANNELS, SIDE, SIDE, generator=g)
            if min(d.margin for d in model.probe(x)[1]) >= Z.MIN_MARGIN:
                inputs.append((x,))
    return model, inputs


class _CountExports:
    """Counts ``torch.export.export`` calls while active (the explorer's traces)."""

    def __enter__(self) -> _CountExports:
        self.count = 0
        self._orig = torch.export.export

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return self._orig(*args, **kwargs)

        torch.export.export = counted  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.export.export = self._orig  # type: ignore[assignment]


def program_size(program: Any) -> tuple[int, int, int]:
    """(FX nodes, graphs, cond nodes) over every graph of ``program``."""
    nodes = graphs = conds = 0
    for _, gm in iter_graphs(program):
        graphs += 1
        for node in gm.graph.nodes:
            nodes += 1
            if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
                conds += 1
    return nodes, graphs, conds


def bench(n: int, args: argparse.Namespace, tmp: Path) -> Row:
    row = Row(n)
    model, inputs = gated_chain(n, args.inputs)
    try:
        program = None
        for _ in range(args.repeats):  # the fastest of the repeats: the least disturbed
            gc.collect()
            with _CountExports() as counter:
                t0, c0 = time.perf_counter(), time.process_time()
                captured = capture_dynamic(model, inputs[0], max_paths=max(64, 4 * n))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            row.capture_s = wall if row.capture_s is None else min(row.capture_s, wall)
            row.capture_cpu_s = cpu if row.capture_cpu_s is None else min(row.capture_cpu_s, cpu)
            row.capture_cpu_all.append(cpu)
            if program is None:
                program, row.traces = captured, counter.count
            del captured
        assert program is not None
        row.traces_reported = program.attrs.get("traces")
        row.region_traces = program.attrs.get("region_traces")
        row.replayed = program.attrs.get("replayed_prefixes")
        row.nodes, row.graphs, row.conds = program_size(program)
        log(
            f"  {n} gates: captured in {row.capture_s:.1f} s ({row.capture_cpu_s:.1f} s CPU; "
            f"repeats {', '.join(f'{c:.2f}' for c in row.capture_cpu_all)} s CPU), "
            f"{row.traces} traces ({row.region_traces} region), {row.conds} conds, "
            f"{row.nodes} nodes"
        )
        if not args.compile:
            return row
        gc.collect()
        t0 = time.perf_counter()
        art = splice.compile(
            program, "host", output=tmp / f"gates{n}.artifact", samples=[inputs[0]]
        )
        cm = splice.load(art.path)
        row.compile_s = time.perf_counter() - t0
        row.parts = len(cm.manifest["parts"])
        row.host_branches = cm.manifest.get("branches")
        log(f"  {n} gates: compiled in {row.compile_s:.1f} s, {row.parts} parts")
        diffs, equal, paths = [], True, set()
        for x in inputs:
            with torch.no_grad():  # eager_decisions records nothing under inference_mode
                ref = [t.clone() for t in flat_outputs(model(*x))]
                diffs.append(max_abs_diff(cm(*x), ref))
            eager = cond_trace(eager_decisions(model, x))
            equal &= [t for _, t in cm.last_trace] == eager
            paths.add(tuple(eager))
        row.max_abs_diff, row.traces_equal, row.distinct_paths = max(diffs), equal, len(paths)
    except Exception as e:
        row.error = error_text(e, 300)
        log(f"  {n} gates: FAILED: {row.error}")
    return row


# -- report -------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _o(x: Any) -> str:
    return "—" if x is None else str(x)


def _slope(rows: list[Row], value: str) -> float | None:
    pts = [(r.gates, getattr(r, value)) for r in rows if getattr(r, value) is not None]
    pts = [(g, v) for g, v in pts if v and v > 0]
    if len(pts) < 2 or pts[-2][0] == pts[-1][0]:
        return None
    # between the two largest sizes: the trend, without the first capture's warm-up
    (g0, v0), (g1, v1) = pts[-2], pts[-1]
    return math.log(v1 / v0) / math.log(g1 / g0)


def table(rows: list[Row]) -> str:
    out = [
        "| gates | paths (2^n) | capture s | capture CPU s | traces | region traces | conds "
        "| program nodes | graphs | compile + load s | parts | host branches "
        "| capture + compile s | max abs diff vs eager "
        "| branch traces = eager's (distinct paths) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if r.error and r.capture_s is None:
            out.append(f"| {r.gates} | {2**r.gates:.3g} | failed: {r.error[:160]} |" + " — |" * 12)
            continue
        traces = _o(r.traces)
        if r.traces_reported is not None and r.traces_reported != r.traces:
            traces += f" ({r.traces_reported} reported)"
        check = (
            "—"
            if r.traces_equal is None
            else f"{'yes' if r.traces_equal else 'NO'} ({r.distinct_paths})"
        )
        diff = "—" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        replayed = "" if r.replayed is None else f" ({r.replayed} replayed)"
        if r.error:
            diff = f"failed: {r.error[:120]}"
        out.append(
            f"| {r.gates} | {2**r.gates:.3g} | {_f(r.capture_s)} | {_f(r.capture_cpu_s)} "
            f"| {traces} | {_o(r.region_traces)}{replayed} | {_o(r.conds)} "
            f"| {_o(r.nodes)} | {_o(r.graphs)} | {_f(r.compile_s)} | {_o(r.parts)} "
            f"| {_o(r.host_branches)} | {_f(r.total_s)} | {diff} | {check} |"
        )
    return "\n".join(out)


def growth(rows: list[Row]) -> list[str]:
    ok = [r for r in rows if r.capture_s is not None]
    if len(ok) < 2:
        return []
    lines = []
    per = ", ".join(
        f"{r.gates}: {r.capture_s / r.gates:.2f} s capture"
        + (f" + {r.compile_s / r.gates:.2f} s compile" if r.compile_s else "")
        + (f", {r.nodes / r.gates:.0f} nodes" if r.nodes else "")
        for r in ok
    )
    lines.append(f"- per gate: {per}.")
    slopes = {
        name: _slope(ok, attr)
        for name, attr in (
            ("capture time", "capture_s"),
            ("capture CPU time", "capture_cpu_s"),
            ("traces", "traces"),
            ("program nodes", "nodes"),
            ("compile time", "compile_s"),
            ("parts", "parts"),
        )
    }
    text = ", ".join(f"{k} {v:.2f}" for k, v in slopes.items() if v is not None)
    worst = max((v for v in slopes.values() if v is not None), default=None)
    verdict = (
        "—"
        if worst is None
        else "linear (every slope <= 1.25)"
        if worst <= 1.25
        else f"NOT linear (largest slope {worst:.2f} > 1.25)"
    )
    lines.append(
        f"- log-log slope against the number of gates, {ok[-2].gates} → {ok[-1].gates}: "
        f"{text}; growth: **{verdict}**."
    )
    goal = next((r for r in rows if r.gates == GOAL_GATES), None)
    if goal is not None:
        if goal.total_s is not None:
            met = "met" if goal.total_s < GOAL_S else "NOT met"
            lines.append(
                f"- Goal ({GOAL_GATES} gates captured and compiled in under {GOAL_S:.0f} s): "
                f"**{met}** — {goal.capture_s:.1f} s capture + {goal.compile_s:.1f} s "
                "compile and load."
            )
        else:
            lines.append(
                f"- Goal ({GOAL_GATES} gates captured and compiled in under {GOAL_S:.0f} s): "
                f"not measured ({goal.error or 'compile skipped'})."
            )
    return lines


def section(
    rows: list[Row], args: argparse.Namespace, command: str, load: tuple[float, ...], busy: float
) -> str:
    machine = lscpu("Model name") or cpu_model()
    parts = [
        SECTION,
        BEGIN,
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine} (`lscpu` model name), {os.cpu_count()} cores; threads: torch "
        f"{torch.get_num_threads()}, TVM {os.environ.get('TVM_NUM_THREADS')}; 1-min load "
        f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after the run",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"apache-tvm {version('tvm')}, splice {splice.__version__} at {git_state()}",
        f"- command: `{command}` (from the repository root)",
        f"- model: `splice.models_dynamic.SkipNet(channels={CHANNELS}, blocks=n)`, seeded "
        f"random weights, input [1, {CHANNELS}, {SIDE}, {SIDE}]; n sequential gates "
        f"`if gate(x) > 0.5: x = x + block(x)`. Per n, the fastest of {args.repeats} captures "
        '(`capture_dynamic`) and one `splice.compile(program, "host")` + `splice.load`, '
        "wall-clock seconds (capture also in CPU seconds of the process, the least of the "
        "repeats); traces = `torch.export.export` calls "
        "during the capture, region traces = paths assembled from a region trace (the "
        "first path is a full export; replayed: their prefix answered from the first "
        "trace's recorded calls); conds, program nodes and "
        f"graphs over every graph of the captured program; checks on {args.inputs} seeded "
        "random inputs per n",
        "",
        table(rows),
        "",
        *growth(rows),
        "- capture CPU s of every repeat: "
        + "; ".join(
            f"{r.gates}: {', '.join(f'{c:.2f}' for c in r.capture_cpu_all)}"
            for r in rows
            if r.capture_cpu_all
        )
        + ".",
    ]
    if busy >= 0.2:
        parts += [
            "",
            f"- WARNING: other processes used {busy:.2f} cores on average during this run "
            f"(of {os.cpu_count()}): the times are wall-clock and too slow; re-measure on a "
            "quiet machine.",
        ]
    parts += ["", END]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", default=",".join(map(str, GATES)), help="comma-separated sizes")
    ap.add_argument("--quick", action="store_true", help="3 and 9 gates, no write")
    ap.add_argument("--inputs", type=int, default=8, help="inputs checked per size (8)")
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="compile too"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="captures per size; the fastest is reported (3: the machine's other jobs "
        "slow single captures by up to ~25%%)",
    )
    ap.add_argument("--no-results", action="store_true", help="print only; do not write")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file to update")
    args = ap.parse_args(argv)
    sizes = [3, 9] if args.quick else [int(s) for s in args.gates.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.inputs < 1 or args.repeats < 1:
        ap.error("bad arguments")
    write = not (args.no_results or args.quick)
    command = shlex.join(["python", *(sys.argv if argv is None else ["explore_scaling.py", *argv])])

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    load = os.getloadavg()
    busy = busy_seconds()
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="splice-explore-scaling-") as d:
        for n in sorted(sizes):
            log(f"{n} gates…")
            rows.append(bench(n, args, Path(d)))
    wall = time.perf_counter() - t_start
    text = section(rows, args, command, load, other_cores(busy, wall))
    print(text)
    log(f"(benchmark wall time {wall:.0f} s)")

    problems = [f"{r.gates} gates: {r.error}" for r in rows if r.error]
    problems += [
        f"{r.gates} gates: max abs diff {r.max_abs_diff:.3g} > {ATOL:g}"
        for r in rows
        if r.max_abs_diff is not None and r.max_abs_diff > ATOL
    ]
    problems += [
        f"{r.gates} gates: branch traces differ from eager's"
        for r in rows
        if r.traces_equal is False
    ]
    if problems:
        for m in problems:
            log(f"ERROR: {m}")
        log(f"not writing {args.results}")
        return 1
    if write:
        write_marked_section(args.results, SECTION, BEGIN, END, text)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
