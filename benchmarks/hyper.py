"""Hypernetworks: the cost of a conditioned forward — splice (TVM) against hyperlight (eager).

What is measured
----------------
Per model, the ``hyper`` pass (``cond_dim=2``, ``hidden=[64,64]``, ``encoding=mip``,
``init=fanout``) turns the chosen weights into θ0 + Δθ(E(cond)); ``specialize`` folds the
hypernetwork for one cond back into constants. Peers, one forward each at batch 1:

* ``eager original`` — the nn.Module under ``torch.inference_mode``;
* ``hyperlight`` — the same model through hyperlight 0.0.5 (the MIP authors' library):
  ``hl.hypernetize(model, modules=...)`` + ``hl.HyperNet`` (``encoding="cos|sin"``, θ0 as its
  output bias, i.e. ``from_existing``) loaded with *the same hypernetwork weights* as
  splice's program, then ``with model.using_externals(hypernet(h=cond)): model(x)``;
  checked against splice's conditioned program (max abs diff);
* ``splice eager`` — the conditioned Program run eagerly (its GraphModule);
* ``TVM original`` / ``TVM specialised`` / ``TVM conditioned`` — ``splice.compile(program,
  "host")`` of the captured program, of the specialised one, and of the conditioned one with
  ``cond`` a run-time input; each checked against its eager program.

Overhead per forward = conditioned − its base: hyperlight − eager original, and TVM
conditioned − TVM specialised (the deployed program without the hypernetwork).

Method: peers one after the other (thread pools spin after a call); per peer ``--warmup``
untimed calls, then ``--rounds`` rounds of ``--calls`` calls, a round's figure is the mean
per call; the table gives the median over rounds (p10–p90). torch and TVM both get
``--threads`` threads (default 1: at batch 1 the work is small, and on this shared 2-core VM
a 2-thread OpenMP op stalls whenever another job holds the other core — GPT-2's eager
forward measured 137 ms at 2 threads under load). The load average and the CPU time other
processes used during the run are reported.

    python benchmarks/hyper.py                  # full run, writes benchmarks/RESULTS.md
    python benchmarks/hyper.py --quick          # smoke run, no write
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
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
from torch import nn

import splice
from splice import models
from splice.passes import parse_pipeline
from splice.passes.specialize import specialize

SECTION = "## Hypernetworks: conditioned vs specialised vs original, splice→TVM and hyperlight (benchmarks/hyper.py)"
BEGIN, END = "<!-- hyper:begin -->", "<!-- hyper:end -->"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ATOL = 1e-4
HIDDEN = (64, 64)
COND = (0.3, 0.7)


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    targets: str
    modules: Callable[[nn.Module], list[nn.Module]]  # hyperlight: the modules to hypernetize
    chunk_size: int | None = None


def _mlp():
    return models.mlp(d=256, hidden=1024, batch=1)


def _gpt2():
    return models.gpt2(layers=2, hidden=64, heads=4, vocab=128, seq=8, batch=1)


CASES = {
    "mlp": Case(
        "mlp", "MLP 256→1024→256 (GELU), batch 1; targets: both Linear layers (525,568 values)",
        _mlp, "fc*", lambda m: [m.fc1, m.fc2],
    ),
    "mlp-chunked": Case(
        "mlp-chunked", "the same MLP, `chunk_size=4096` (129 chunks, hypnettorch-style)",
        _mlp, "fc*", lambda m: [m.fc1, m.fc2], chunk_size=4096,
    ),
    "gpt2-mlp": Case(
        "gpt2-mlp", "GPT-2, 2 layers, hidden 64, seq 8, batch 1; targets: both MLP Conv1Ds of "
        "each layer (66,112 values)",
        _gpt2, "transformer.h.*.mlp.*",
        lambda m: [b.mlp.c_fc for b in m.transformer.h] + [b.mlp.c_proj for b in m.transformer.h],
    ),
}  # fmt: skip


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float


@dataclass
class Peer:
    name: str
    fn: Callable[[], Any] | None = None
    error: str | None = None
    diff: float | None = None
    diff_against: str = ""
    rounds: list[float] = field(default_factory=list)

    @property
    def timing(self) -> Timing | None:
        if not self.rounds:
            return None
        ts = sorted(self.rounds)
        if len(ts) >= 2:
            q = statistics.quantiles(ts, n=10, method="inclusive")
            return Timing(statistics.median(ts), q[0], q[-1])
        return Timing(ts[0], ts[0], ts[0])


@dataclass
class Result:
    case: Case
    peers: dict[str, Peer] = field(default_factory=dict)
    target_values: int = 0
    hypernet_params: int = 0
    compile_s: dict[str, float] = field(default_factory=dict)


# -- hyperlight ---------------------------------------------------------------------------


def hyperlight_peer(case: Case, model: nn.Module, args: tuple, conditioned) -> Peer:
    """The same model and hypernetwork through hyperlight, or why it could not run."""
    peer = Peer("hyperlight")
    if case.chunk_size is not None:
        peer.error = "n/a: hyperlight has no chunked hypernetwork"
        return peer
    try:
        import hyperlight as hl
    except Exception as e:
        peer.error = f"hyperlight not importable: {error_text(e, 160)}"
        return peer
    try:
        import copy

        main = copy.deepcopy(model)
        main = hl.hypernetize(main, modules=case.modules(main))
        info = conditioned.attrs["hyper"]["hyper"]
        shapes = {t["name"]: tuple(t["shape"]) for t in info["targets"]}
        assert shapes == {k: tuple(v) for k, v in main.external_shapes().items()}, (
            f"hyperlight's externals {main.external_shapes()} != splice's targets {shapes}"
        )
        hn = hl.HyperNet(
            input_shapes={"h": (len(COND),)},
            output_shapes=shapes,  # splice's target order = the offsets of θ0
            hidden_sizes=list(HIDDEN),
            encoding="cos|sin",
        )
        w = conditioned.weights
        b = hn.backbone
        with torch.no_grad():
            for i in range(len(HIDDEN)):
                getattr(b, f"block{i}_lin").weight.copy_(w[f"hyper.net.{2 * i}.weight"])
                getattr(b, f"block{i}_lin").bias.copy_(w[f"hyper.net.{2 * i}.bias"])
            b.output.weight.copy_(w[f"hyper.net.{2 * len(HIDDEN)}.weight"])
            b.output.bias.copy_(w["hyper.theta0"])  # MIP: θ0 is the output layer's bias
        hn.eval()
        main.eval()
        cond = torch.tensor(COND)

        def run() -> Any:
            with main.using_externals(hn(h=cond)):
                return main(*args)

        peer.fn = run
        with torch.inference_mode():
            peer.diff = max_abs_diff(_logits(run()), flat_outputs(conditioned(*args, cond)))
        peer.diff_against = "splice eager"
    except Exception as e:
        peer.error = f"failed: {error_text(e, 200)}"
        peer.fn = None
    return peer


def _logits(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    return out


# -- one model ----------------------------------------------------------------------------


def run_case(case: Case, args: argparse.Namespace, tmp: Path) -> Result:
    res = Result(case)
    torch.manual_seed(0)
    model, inputs = case.build()
    model.eval()
    program = splice.capture(model, inputs)
    chunk = f",chunk_size={case.chunk_size}" if case.chunk_size else ""
    text = (
        f"hyper{{targets={case.targets},cond_dim={len(COND)},"
        f"hidden=[{','.join(map(str, HIDDEN))}],encoding=mip,init=fanout{chunk}}}"
    )
    r = parse_pipeline(text).run(program)
    conditioned = r.program
    st = r.stats["passes"][0]["stats"]
    res.target_values, res.hypernet_params = st["target_params"], st["hypernet_params"]
    special = specialize(conditioned, list(COND))
    cond = torch.tensor(COND)
    with torch.inference_mode():
        ref_orig = flat_outputs(program(*inputs))
        ref_cond = flat_outputs(conditioned(*inputs, cond))
        ref_spec = flat_outputs(special(*inputs))
        assert max_abs_diff(ref_spec, ref_cond) <= 1e-5, "specialised != conditioned"

    def model_call() -> Any:
        return model(*inputs)

    res.peers["eager original"] = Peer("eager original", model_call, diff=0.0)
    res.peers["hyperlight"] = hyperlight_peer(case, model, inputs, conditioned)
    res.peers["splice eager"] = Peer(
        "splice eager", lambda: conditioned(*inputs, cond), diff=0.0, diff_against="itself"
    )
    for peer, prog, extra, ref in (
        ("TVM original", program, (), ref_orig),
        ("TVM specialised", special, (), ref_spec),
        ("TVM conditioned", conditioned, (cond,), ref_cond),
    ):
        p = Peer(peer, diff_against="its eager program")
        try:
            t0 = time.perf_counter()
            cm = splice.compile(
                prog, "host", output=tmp / f"{case.name}-{peer.split()[1]}.artifact"
            )
            cm = cm.load()
            res.compile_s[peer] = time.perf_counter() - t0
            with torch.inference_mode():
                p.diff = max_abs_diff(cm(*inputs, *extra), ref)
            p.fn = (lambda cm=cm, extra=extra: cm(*inputs, *extra))  # fmt: skip
        except Exception as e:
            p.error = f"failed: {error_text(e, 200)}"
        res.peers[peer] = p

    with torch.inference_mode():
        for p in res.peers.values():
            if p.fn is None:
                continue
            for _ in range(args.warmup):
                p.fn()
            gc.collect()
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    p.fn()
                p.rounds.append((time.perf_counter() - t0) / args.calls)
    for p in res.peers.values():
        t = p.timing
        if t is None:
            log(f"    {p.name:<16} {p.error}")
        else:
            log(f"    {p.name:<16} {t.median_s * 1e3:8.3f} ms  (diff {p.diff:.1e})")
    return res


# -- report -------------------------------------------------------------------------------


def _ms(p: Peer) -> str:
    t = p.timing
    if t is None:
        return p.error or "—"
    return f"{t.median_s * 1e3:.3f} ({t.p10_s * 1e3:.3f}–{t.p90_s * 1e3:.3f})"


def _over(a: Peer, b: Peer) -> str:
    if a.timing is None or b.timing is None:
        return "—"
    d = a.timing.median_s - b.timing.median_s
    return f"{d * 1e3:+.3f} ({a.timing.median_s / b.timing.median_s:.2f}×)"


def table(results: list[Result]) -> str:
    out = [
        "| model | targets → hypernet params | eager original | hyperlight | hyperlight "
        "overhead / forward | splice eager (conditioned) | TVM original | TVM specialised "
        "| TVM conditioned | TVM overhead / forward (conditioned − specialised) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        p = r.peers
        out.append(
            f"| {r.case.name} | {r.target_values:,} → {r.hypernet_params:,} "
            f"| {_ms(p['eager original'])} | {_ms(p['hyperlight'])} "
            f"| {_over(p['hyperlight'], p['eager original'])} | {_ms(p['splice eager'])} "
            f"| {_ms(p['TVM original'])} | {_ms(p['TVM specialised'])} "
            f"| {_ms(p['TVM conditioned'])} "
            f"| **{_over(p['TVM conditioned'], p['TVM specialised'])}** |"
        )
    return "\n".join(out)


def checks(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        parts = []
        for p in r.peers.values():
            if p.diff is not None and p.name != "eager original" and p.name != "splice eager":
                parts.append(f"{p.name} {p.diff:.1e} (vs {p.diff_against})")
        comp = ", ".join(f"{k.split()[1]} {v:.1f} s" for k, v in r.compile_s.items())
        lines.append(f"- {r.case.name}: max abs diff {'; '.join(parts)}; TVM compile {comp}")
    return lines


def section(results: list[Result], args, command: str, load, cores: float, wall: float) -> str:
    threads = torch.get_num_threads()
    rows = "\n".join(f"| {r.case.name} | {r.case.description} |" for r in results)
    parts = [
        SECTION,
        BEGIN,
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, L3 {lscpu('L3') or 'unknown'}; "
        f"threads: torch {threads}, TVM {os.environ.get('TVM_NUM_THREADS')}; 1-min load "
        f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; other processes used "
        f"{cores:.2f} cores on average during the run ({wall:.0f} s)",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"apache-tvm {version('tvm')}, hyperlight {_hl_version()}, transformers "
        f"{version('transformers')}, splice {splice.__version__} at {git_state()}",
        f"- command: `{command}` (from the repository root)",
        f"- hypernetwork: `hyper{{cond_dim=2,hidden=[64,64],encoding=mip,init=fanout}}`, "
        f"cond = {list(COND)}, fp32, random weights (seeded); hyperlight runs the same "
        "hypernetwork weights (θ0 as its output bias) and matches splice's conditioned program",
        f"- method: peers one after the other; {args.warmup} warm-up calls, then "
        f"{args.rounds} rounds × {args.calls} calls; median ms per forward over rounds "
        "(p10–p90); overhead = difference of medians (ratio in brackets)",
        "",
        "| model | what |",
        "|---|---|",
        rows,
        "",
        "Milliseconds per forward:",
        "",
        table(results),
        "",
        "Checks:",
        *checks(results),
    ]
    if cores >= 0.2:
        parts += [
            "",
            f"- WARNING: other processes used {cores:.2f} cores on average during this run (of "
            f"{os.cpu_count()}): medians may be slower than on a quiet machine; see p10–p90.",
        ]
    parts += ["", END]
    return "\n".join(parts)


def _hl_version() -> str:
    try:
        from importlib.metadata import version as v

        return v("hyperlight")
    except Exception:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per peer (15)")
    ap.add_argument("--calls", type=int, default=20, help="calls per round (20)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, no write")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch and TVM threads (1: batch-1 work is small, and a 2-thread OpenMP op stalls "
        "whenever another job holds the other core of this shared 2-core VM)",
    )  # fmt: skip
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 15)
    write = not (args.no_results or args.quick)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    if any(n not in CASES for n in names):
        ap.error(f"cases: {', '.join(CASES)}")
    command = shlex.join(["python", *(sys.argv if argv is None else ["hyper.py", *argv])])
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Input tensor has dimensions outside")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # before TVM's pool starts
    load = os.getloadavg()
    busy = busy_seconds()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="splice-hyper-") as d:
        for n in names:
            log(f"{n}…")
            results.append(run_case(CASES[n], args, Path(d)))
    wall = time.perf_counter() - t0
    text = section(results, args, command, load, other_cores(busy, wall), wall)
    print(text)
    bad = [
        f"{r.case.name} / {p.name}: max abs diff {p.diff:.3g}"
        for r in results
        for p in r.peers.values()
        if p.diff is not None and p.diff > ATOL
    ]
    bad += [
        f"{r.case.name} / {p.name}: {p.error}"
        for r in results
        for p in r.peers.values()
        if p.error is not None and p.name.startswith("TVM")
    ]
    if bad:
        for b in bad:
            log(f"ERROR: {b}")
        log(f"not writing {args.results}")
        return 1
    if write:
        write_marked_section(args.results, SECTION, BEGIN, END, text)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
