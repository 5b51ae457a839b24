"""Dynamic-branch splitting (DyCL-style): splice against eager PyTorch and torch.compile.

What is measured
----------------
The models of the dynamic zoo (:mod:`splice.models_dynamic`): small fp32 networks whose
``forward`` branches on tensor values (early exit, SkipNet gates, a BlockDrop policy, a
dynamic-depth loop, a routed mixture of experts). Each model comes with ``branch_inputs``
that together take every outcome of every decision. Three peers run them:

* ``eager`` — the module under ``torch.inference_mode()``, with torch's default threads;
* ``eager-1t`` — the same with ``torch.set_num_threads(1)`` while it is timed: for models
  this small one thread is often faster, and it does not stall when another job holds a
  core (an op split over OpenMP threads waits at the barrier for a preempted thread);
* ``torch.compile`` — ``torch.compile(model)`` (default backend, Inductor). Dynamo breaks
  the graph at every data-dependent branch; ``torch._dynamo.explain(model)(*example)``
  counts the breaks on the example input. If it fails, the error is reported instead;
* ``splice`` — ``splice.ir.explore.capture_dynamic`` (every path of the control flow as
  ``torch.cond`` branches) → ``splice.compile(program, "host")`` (the ``branches`` pass
  splits it into branch-free parts, each compiled by TVM, and a host program that decides
  between them) → ``splice.load``.

``shape_branch`` (a branch on the input's width) is captured once per input shape
(``capture_dynamic(..., signatures=...)``, a SignatureSet); its host program picks the
capture by the input's shape, and the chosen signature counts as its branch decision.

Method
------
Per model and peer, one peer after the other (torch's OpenMP threads and TVM's thread pool
both spin after a call, so interleaving peers call by call makes them stall each other):
``--warmup`` untimed calls per branch input, then ``--rounds`` rounds; in each round the
peer runs every branch input once, each call timed with ``time.perf_counter``. A round's
figure is the mean latency over the branch inputs (the branches do different amounts of work, so this is the
latency of a uniform mix of them); the table gives the median over rounds and the 10th–90th
percentile. Ratios are of medians (> 1: splice faster). Outputs of torch.compile and
splice are checked against eager on every branch input (max abs diff; above 1e-3 fails
the run, and RESULTS.md is left alone), and splice's branch trace (``cm.last_trace``) is
checked to partition the branch inputs exactly as the model's own decisions
(``model.probe``) do. TVM's thread pool gets ``TVM_NUM_THREADS = torch.get_num_threads()``
unless it is set.

Run from the repository root::

    python benchmarks/branches.py                 # full run, writes benchmarks/RESULTS.md
    python benchmarks/branches.py --quick         # smoke run: 3 rounds, no write
    python benchmarks/branches.py --models skipnet,routed_moe --no-results
    python benchmarks/branches.py --large         # the paper-size models, own section

``--large`` runs the paper-size models of ``ZOO_LARGE`` instead (SDN on ResNet-56 with
``is_output`` flags, SkipNet-38's 18 gates, BlockDrop's policy over ResNet-110's 54
blocks, an MSDNet-style anytime net returning a list, a greedy Show-and-Tell decoder) with
10 rounds and 2 warm-up calls, and writes a section of its own. Most of its time is
setup: torch.compile compiles a graph per branch side, splice compiles a part per segment
(BlockDrop-110: 55 traces and over a hundred parts), so expect well over ten minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
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
from torch.utils._python_dispatch import TorchDispatchMode

import splice
from splice import models_dynamic as Z

SECTION = "## Dynamic branches: splice's DyCL-style splitting against eager and torch.compile (benchmarks/branches.py)"
BEGIN = "<!-- branches:begin -->"
END = "<!-- branches:end -->"
#: ``--large``: the paper-size models (``ZOO_LARGE``) have a section of their own
LARGE_SECTION = "## Dynamic branches at the papers' sizes: splice against eager and torch.compile (benchmarks/branches.py --large)"
LARGE_BEGIN = "<!-- branches-large:begin -->"
LARGE_END = "<!-- branches-large:end -->"
MODELS: dict[str, Callable[[], Z.DynamicCase]] = {**Z.ZOO, **Z.ZOO_LARGE}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ATOL = 1e-3
PEERS = ("eager", "eager-1t", "torch.compile", "splice")
UNSUPPORTED: dict[str, str] = {}
DYCL = (
    "DyCL (Chen et al., ISSTA 2023) reports 1.12×–20.21× over PyTorch for its rewritten "
    "dynamic models, measured on NVIDIA Jetson boards with TVM 0.11"
)


# -- results ------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float

    @staticmethod
    def of(times: Sequence[float]) -> Timing:
        ts = sorted(times)
        if len(ts) >= 2:
            q = statistics.quantiles(ts, n=10, method="inclusive")
            return Timing(statistics.median(ts), q[0], q[-1])
        return Timing(ts[0], ts[0], ts[0])


@dataclass
class Peer:
    """One peer on one model: a callable, or why there is none."""

    name: str
    fn: Callable[..., Any] | None = None
    threads: int | None = None  # torch threads while this peer is timed (None: unchanged)
    error: str | None = None
    max_abs_diff: float | None = None
    setup_s: float | None = None  # torch.compile: compile + first calls; splice: compile + load
    rounds: list[float] = field(default_factory=list)  # mean seconds per input, per round

    @property
    def timing(self) -> Timing | None:
        return Timing.of(self.rounds) if self.rounds else None


@dataclass
class ModelResult:
    name: str
    description: str
    n_inputs: int = 0
    unsupported: str | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    graph_breaks: int | None = None
    graph_count: int | None = None
    break_reason: str = ""
    explain_error: str | None = None
    paths: int | None = None
    parts: int | None = None
    host_branches: int | None = None
    capture_s: float | None = None
    compile_s: float | None = None
    trace_ok: bool | None = None
    trace_note: str = ""
    eager_paths: int | None = None  # distinct decision sequences over the branch inputs
    part_calls: float | None = None  # mean TVM part calls per input (splice)
    aten_ops: float | None = None  # mean aten ops per input (eager)


# -- helpers ------------------------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    """Counts the aten ops eager PyTorch dispatches (its per-op overhead is paid per op)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_part_calls(
    host: dict[str, Any], trace: Sequence[tuple[str, bool]], signature: int | None = None
) -> int:
    """How many compiled parts the host program called on a run with branch ``trace`` (and
    input ``signature``, for a program captured per input shape)."""
    taken: Iterator[tuple[str, bool]] = iter(trace)

    def walk(block: dict[str, Any]) -> int:
        n = 0
        for step in block["body"]:
            if step["op"] == "call":
                n += 1
            elif step["op"] == "branch":
                n += walk(step["then"] if next(taken)[1] else step["else"])
            elif step["op"] == "signature":
                n += walk(step["cases"][signature or 0]["block"])
        return n

    return walk(host["main"])


# -- peers --------------------------------------------------------------------------------


def setup_torch_compile(
    res: ModelResult, case: Z.DynamicCase, refs: list[list[torch.Tensor]]
) -> Peer:
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(case.model)(*case.example)
        res.graph_breaks, res.graph_count = ex.graph_break_count, ex.graph_count
        if ex.break_reasons:
            reason = " ".join(str(ex.break_reasons[0].reason).split())
            res.break_reason = reason[:120]
    except Exception as e:
        res.explain_error = error_text(e, 200)
    torch._dynamo.reset()
    peer = Peer("torch.compile")
    try:
        compiled = torch.compile(case.model)
        t0 = time.perf_counter()
        with torch.inference_mode():
            diffs = [max_abs_diff(compiled(*x), r) for x, r in zip(case.branch_inputs, refs)]
        peer.setup_s = time.perf_counter() - t0
        peer.max_abs_diff = max(diffs)
        peer.fn = compiled
    except Exception as e:
        peer.error = error_text(e, 200)
    return peer


def setup_splice(
    res: ModelResult, case: Z.DynamicCase, refs: list[list[torch.Tensor]], tmp: Path
) -> Peer:
    from splice.ir.explore import capture_dynamic

    peer = Peer("splice")
    try:
        t0 = time.perf_counter()
        # one capture per distinct input shape among the branch inputs (shape_branch)
        program = capture_dynamic(case.model, case.example, signatures=case.branch_inputs)
        t1 = time.perf_counter()
        art = splice.compile(
            program, "host", samples=case.branch_inputs, output=tmp / f"{case.name}.artifact"
        )
        cm = splice.load(art.path)
        t2 = time.perf_counter()
        res.capture_s, res.compile_s = t1 - t0, t2 - t1
        peer.setup_s = t2 - t0
        members = list(program) if isinstance(program, splice.SignatureSet) else [program]
        res.paths = sum(p.attrs.get("paths", 1) for p in members)
        res.parts = len(cm.manifest["parts"])
        res.host_branches = cm.manifest["branches"]
        host = cm._host.host if cm._host is not None else {"main": {"body": []}}
        diffs, traces, calls = [], [], []
        with torch.inference_mode():
            for x, r in zip(case.branch_inputs, refs):
                diffs.append(max_abs_diff(cm(*x), r))
                traces.append((cm.last_signature, *cm.last_trace))
                calls.append(count_part_calls(host, cm.last_trace, cm.last_signature))
        peer.max_abs_diff = max(diffs)
        res.part_calls = statistics.fmean(calls)
        check_traces(res, case, traces)
        peer.fn = cm
    except Exception as e:
        peer.error = error_text(e, 200)
    return peer


def check_traces(res: ModelResult, case: Z.DynamicCase, traces: list[tuple]) -> None:
    """splice's branch traces must group the branch inputs as the model's decisions do."""
    with torch.inference_mode():
        decided = [
            tuple((d.site, d.outcome) for d in case.model.probe(*x)[1]) for x in case.branch_inputs
        ]
    res.eager_paths = len(set(decided))
    fwd: dict[tuple, tuple] = {}
    back: dict[tuple, tuple] = {}
    ok = all(
        fwd.setdefault(d, t) == t and back.setdefault(t, d) == d for d, t in zip(decided, traces)
    )
    res.trace_ok = ok
    res.trace_note = (
        f"{len(set(traces))} distinct splice traces = {res.eager_paths} distinct eager decision "
        "sequences"
        if ok
        else f"MISMATCH: {len(set(traces))} splice traces vs {res.eager_paths} eager decision "
        "sequences, not one-to-one"
    )


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> ModelResult:
    case = MODELS[name]()
    res = ModelResult(name, case.description, len(case.branch_inputs))
    if name in UNSUPPORTED:
        res.unsupported = UNSUPPORTED[name]
        return res
    model, inputs = case.model.eval(), case.branch_inputs
    with torch.inference_mode():
        refs = [[t.clone() for t in flat_outputs(model(*x))] for x in inputs]
        counts = []
        for x in inputs:
            with _CountOps() as c:
                model(*x)
            counts.append(c.count)
    res.aten_ops = statistics.fmean(counts)
    res.peers["eager"] = Peer("eager", fn=model, max_abs_diff=0.0)
    res.peers["eager-1t"] = Peer("eager-1t", fn=model, threads=1, max_abs_diff=0.0)
    log(f"  {name}: torch.compile (explain, compile, first calls)…")
    res.peers["torch.compile"] = setup_torch_compile(res, case, refs)
    log(f"  {name}: splice (capture_dynamic, compile, load)…")
    res.peers["splice"] = setup_splice(res, case, refs, tmp)

    # One peer at a time: torch's OpenMP threads and TVM's pool both spin-wait after a call,
    # so interleaving the peers call by call would make each stall on the other's spinning.
    with torch.inference_mode():
        for p in (q for q in res.peers.values() if q.fn is not None):
            threads = torch.get_num_threads()
            if p.threads:
                torch.set_num_threads(p.threads)
            for x in inputs:
                for _ in range(args.warmup):
                    p.fn(*x)
            gc.collect()
            for _ in range(args.rounds):
                total = 0.0
                for x in inputs:
                    t0 = time.perf_counter()
                    p.fn(*x)
                    total += time.perf_counter() - t0
                p.rounds.append(total / len(inputs))
            torch.set_num_threads(threads)
    for peer in PEERS:
        p = res.peers[peer]
        if p.error is not None:
            log(f"    {peer:<14} FAILED: {p.error}")
            continue
        t = p.timing
        assert t is not None and p.max_abs_diff is not None
        flag = "" if p.max_abs_diff <= ATOL else f"  MISMATCH (> {ATOL:g})"
        log(
            f"    {peer:<14} {t.median_s * 1e3:8.3f} ms/input  max abs diff vs eager "
            f"{p.max_abs_diff:.1e}{flag}"
        )
    if res.trace_note:
        log(f"    branch traces: {res.trace_note}")
    torch._dynamo.reset()
    return res


# -- report -------------------------------------------------------------------------------


def _ms(p: Peer) -> str:
    t = p.timing
    if t is None:
        return "failed"
    return f"{t.median_s * 1e3:.3f} ({t.p10_s * 1e3:.3f}–{t.p90_s * 1e3:.3f})"


def _ratio(a: Peer, b: Peer) -> float | None:
    if a.timing is None or b.timing is None:
        return None
    return a.timing.median_s / b.timing.median_s


def _r(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _d(p: Peer) -> str:
    return "—" if p.max_abs_diff is None else f"{p.max_abs_diff:.1e}"


def _opt(x: Any) -> str:
    return "—" if x is None else str(x)


def table(results: list[ModelResult]) -> str:
    out = [
        f"| model | branch inputs | paths | parts | host branches "
        f"| eager ms ({torch.get_num_threads()} threads) | eager ms (1 thread) "
        "| torch.compile ms | splice ms | eager/splice | best eager/splice | compile/splice "
        "| graph breaks (compile) | max abs diff vs eager (compile / splice) "
        "| capture + compile s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.unsupported:
            out.append(f"| {r.name} | {r.n_inputs} | {r.unsupported} |" + " — |" * 12)
            continue
        p = r.peers
        comp = p["torch.compile"]
        if r.explain_error:
            breaks = f"explain failed: {r.explain_error[:80]}"
        else:
            breaks = _opt(r.graph_breaks)
        comp_ms = _ms(comp) if comp.error is None else f"failed: {comp.error[:100]}"
        setup = (
            "—"
            if r.capture_s is None or r.compile_s is None
            else f"{r.capture_s:.1f} + {r.compile_s:.1f}"
        )
        out.append(
            f"| {r.name} | {r.n_inputs} | {_opt(r.paths)} | {_opt(r.parts)} "
            f"| {_opt(r.host_branches)} | {_ms(p['eager'])} | {_ms(p['eager-1t'])} | {comp_ms} "
            f"| {_ms(p['splice'])} | {_r(_ratio(p['eager'], p['splice']))} "
            f"| **{_r(_ratio(_best_eager(r), p['splice']))}** "
            f"| {_r(_ratio(comp, p['splice']))} | {breaks} "
            f"| {_d(comp)} / {_d(p['splice'])} | {setup} |"
        )
    return "\n".join(out)


def overhead_table(results: list[ModelResult]) -> str:
    out = [
        "| model | eager aten ops / input | best eager µs / op | splice part calls / input "
        "| splice µs / part call | torch.compile graphs (example input) "
        "| torch.compile compile + first calls s | splice branch trace check |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        if r.unsupported:
            continue
        e, s, c = _best_eager(r), r.peers["splice"], r.peers["torch.compile"]
        per_op = f"{e.timing.median_s * 1e6 / r.aten_ops:.1f}" if e.timing and r.aten_ops else "—"
        per_part = (
            f"{s.timing.median_s * 1e6 / r.part_calls:.0f}" if s.timing and r.part_calls else "—"
        )
        ops = "—" if r.aten_ops is None else f"{r.aten_ops:.0f}"
        calls = "—" if r.part_calls is None else f"{r.part_calls:.1f}"
        setup = "—" if c.setup_s is None else f"{c.setup_s:.1f}"
        out.append(
            f"| {r.name} | {ops} | {per_op} | {calls} | {per_part} | {_opt(r.graph_count)} "
            f"| {setup} | {r.trace_note or '—'} |"
        )
    return "\n".join(out)


def _best_eager(r: ModelResult) -> Peer:
    """The faster of eager's two thread settings (by median)."""
    two, one = r.peers["eager"], r.peers["eager-1t"]
    if one.timing is None or (
        two.timing is not None and two.timing.median_s <= one.timing.median_s
    ):
        return two
    return one


def _range(xs: Sequence[float]) -> str:
    lo, hi = f"{min(xs):.2f}×", f"{max(xs):.2f}×"
    return lo if lo == hi else f"{lo}–{hi}"


def discussion(results: list[ModelResult], other_cores: float, large: bool = False) -> list[str]:
    ran = [r for r in results if not r.unsupported and r.peers["splice"].timing]
    if not ran:
        return []
    two = {r.name: _ratio(r.peers["eager"], r.peers["splice"]) for r in ran}
    best = {r.name: _ratio(_best_eager(r), r.peers["splice"]) for r in ran}
    comp = {
        r.name: _ratio(r.peers["torch.compile"], r.peers["splice"])
        for r in ran
        if r.peers["torch.compile"].timing
    }
    slower = [n for n, x in best.items() if x is not None and x < 1]
    faster = [n for n, x in best.items() if x is not None and x >= 1]
    text = (
        f"{DYCL}. Here splice's split programs run at {_range(list(two.values()))} eager "
        f"PyTorch with {torch.get_num_threads()} threads (eager/splice, geometric mean "
        f"{statistics.geometric_mean(list(two.values())):.2f}×) and at "
        f"{_range(list(best.values()))} the better of eager's 1- and "
        f"{torch.get_num_threads()}-thread runs (geometric mean "
        f"{statistics.geometric_mean(list(best.values())):.2f}×), on a {os.cpu_count()}-core "
        f"x86 CPU with TVM {version('tvm')}"
        + (f"; against torch.compile {_range(list(comp.values()))}" if comp else "")
        + ". The numbers are not comparable one to one: DyCL ran the original, larger "
        "networks on Jetson GPUs; "
        + (
            "these models have the papers' depths (tens of blocks and decision sites) at "
            "CIFAR widths (16/32/64 channels, 32x32 inputs, batch 1), so a call is a mix of "
            "arithmetic and per-call overhead: "
            if large
            else "the zoo models here are tiny (well under a millisecond of arithmetic per "
            "call), so a call is dominated by per-call overhead, not arithmetic: "
        )
        + "splice pays TVM's per-part call overhead (Relax VM entry, DLPack conversion of inputs "
        "and outputs) once per part on the path, plus the host program's Python dispatch per "
        "branch, against PyTorch's per-op dispatch overhead on every op (second table). "
    )
    if slower:
        text += (
            f"splice is slower than eager on {', '.join(slower)}"
            + (f" (faster on {', '.join(faster)})" if faster else "")
            + ": there the path crosses parts that each do too little work to pay for a part "
            "call; fusing more of a path into one part, or a host loop outside Python, is "
            "where the gap is."
        )
    else:
        text += (
            "splice is faster than eager on every model here, even against single-threaded "
            "eager: each branch-free segment is one fused TVM part, so a path costs a few part "
            "calls instead of tens of op dispatches. Where the margin is small "
            f"({', '.join(n for n, x in best.items() if x is not None and x < 2) or 'none'}: "
            "under 2× the better eager), splice's gain is just that: fewer calls, not faster "
            "arithmetic."
        )
    lines = [text]
    spread = [
        r.name for r in ran if (t := r.peers["eager"].timing) is not None and t.p90_s > 3 * t.p10_s
    ]
    if spread or other_cores >= 0.2:
        lines += [
            "",
            "Caveat on eager's multi-threaded figures: on this 2-core VM, an op that PyTorch "
            "splits over its OpenMP threads stalls at the barrier whenever the other core is "
            "busy ("
            + "; ".join(
                (
                    [f"other jobs used {other_cores:.2f} cores on average during this run"]
                    if other_cores >= 0.2
                    else []
                )
                + ([f"eager's p90 was over 3× its p10 on {', '.join(spread)}"] if spread else [])
            )
            + "), so its medians can be several times the quiet-machine figure and inflate "
            "eager/splice (and torch.compile's figures, whose kernels use the same threads); "
            "single-threaded eager does not stall this way, hence the bold best-eager ratio.",
        ]
    return lines


def section(
    results: list[ModelResult],
    args: argparse.Namespace,
    command: str,
    load: tuple[float, ...],
    other_cores: float,
    markers: tuple[str, str, str] = (SECTION, BEGIN, END),
) -> str:
    threads = torch.get_num_threads()
    failures = [
        f"- {r.name} / {peer}: {p.error}"
        for r in results
        for peer, p in r.peers.items()
        if p.error is not None
    ]
    traces_ok = all(r.trace_ok for r in results if r.trace_ok is not None)
    heading, begin, end = markers
    parts = [
        heading,
        begin,
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, L3 {lscpu('L3') or 'unknown'}; "
        f"threads: torch {threads}, TVM {os.environ.get('TVM_NUM_THREADS')}; 1-min load "
        f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after the run",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"apache-tvm {version('tvm')}, splice {splice.__version__} at {git_state()}",
        f"- command: `{command}` (from the repository root)",
        f"- method: fp32, eval, the zoo's seeded weights (`splice.models_dynamic`); per model "
        f"and peer {args.warmup} warm-up calls per branch input, then {args.rounds} rounds in "
        "which the peer runs every branch input once, each call timed with time.perf_counter "
        "(peers one after the other, not interleaved: torch's and TVM's thread pools spin "
        "after a call and would stall each other); a round's figure is the mean latency over the branch inputs; the "
        "table gives the median over rounds (10th–90th percentile in brackets), ms per call; "
        "ratios are of medians (> 1: splice faster); eager runs twice, with torch's "
        f"{threads} threads and with 1; best eager = the faster of the two (the bold ratio). "
        "torch.compile: default backend "
        "(Inductor); graph breaks counted by `torch._dynamo.explain` on the example input. "
        'splice: `capture_dynamic` → `splice.compile(program, "host")` (tune=0, tuning '
        "database on disk) → `splice.load`; paths = paths captured, parts = compiled TVM "
        "parts, host branches = branch steps in the host program",
        "",
        "| model | what branches |",
        "|---|---|",
        *(f"| {r.name} | {r.description} |" for r in results),
        "",
        "Milliseconds per call (mean over the branch inputs), median over rounds (p10–p90):",
        "",
        table(results),
        "",
        "Where the time goes (per call, averaged over the branch inputs; µs per op / part call "
        "= median latency divided by the count, overheads included):",
        "",
        overhead_table(results),
        "",
        *discussion(results, other_cores, large=markers[0] == LARGE_SECTION),
        "",
        f"Checks: torch.compile and splice matched eager within {ATOL:g} on every branch input "
        "(max abs diff over all outputs)"
        + (
            "; splice's branch trace grouped the branch inputs exactly as the models' own "
            "decisions (`probe`) did"
            if traces_ok
            else "; splice's branch traces did NOT match the models' decisions (see the table)"
        )
        + ("." if not failures else ". Peers that failed:"),
        *failures,
    ]
    if other_cores >= 0.2:
        parts += [
            "",
            f"- WARNING: other processes used {other_cores:.2f} cores on average during this "
            f"run (of {os.cpu_count()}), so some medians (above all eager and torch.compile, "
            "whose OpenMP threads stall each other when one is preempted) may be too slow; "
            "check the p10–p90 spread.",
        ]
    parts += ["", end]
    return "\n".join(parts)


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per model (30; 10 with --large)"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls per branch input and peer (10; 2 with --large)",
    )
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {','.join(MODELS)} (default: the small zoo, "
        "or with --large the paper-size one)",
    )
    ap.add_argument(
        "--large",
        action="store_true",
        help=f"the paper-size models ({','.join(Z.ZOO_LARGE)}), written to their own section",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, no write")
    ap.add_argument("--no-results", action="store_true", help="print only; do not write RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file to update")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 10 if args.large else 30)
    if args.warmup is None:
        args.warmup = 2 if args.large else 10
    write = not (args.no_results or args.quick)
    zoo = Z.ZOO_LARGE if args.large else Z.ZOO
    names = [n.strip() for n in (args.models or ",".join(zoo)).split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names or args.rounds < 1 or args.warmup < 0:
        ap.error(f"bad arguments (unknown models: {unknown}; models: {', '.join(MODELS)})")
    command = shlex.join(["python", *(sys.argv if argv is None else ["branches.py", *argv])])

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/pytree chatter
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break advice
    threads = torch.get_num_threads()
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # before TVM's pool starts
    load = os.getloadavg()
    busy = busy_seconds()
    t_start = time.perf_counter()

    results: list[ModelResult] = []
    with tempfile.TemporaryDirectory(prefix="splice-branches-") as d:
        for name in names:
            log(f"{name}…")
            results.append(run_model(name, args, Path(d)))

    wall = time.perf_counter() - t_start
    markers = (LARGE_SECTION, LARGE_BEGIN, LARGE_END) if args.large else (SECTION, BEGIN, END)
    text = section(results, args, command, load, other_cores(busy, wall), markers)
    print(text)
    log(f"(benchmark wall time {wall:.0f} s)")

    problems = [
        f"{r.name} / {peer}: max abs diff {p.max_abs_diff:.3g} > {ATOL:g}"
        for r in results
        for peer, p in r.peers.items()
        if p.max_abs_diff is not None and p.max_abs_diff > ATOL
    ]
    problems += [
        f"splice failed on {r.name}: {r.peers['splice'].error}"
        for r in results
        if "splice" in r.peers and r.peers["splice"].error is not None
    ]
    problems += [f"{r.name}: branch traces {r.trace_note}" for r in results if r.trace_ok is False]
    if problems:
        for m in problems:
            log(f"ERROR: {m}")
        log(f"not writing {args.results}")
        return 1
    if write:
        write_marked_section(args.results, *markers, text)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
