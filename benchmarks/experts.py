"""Expert decode: FFN and whole-model decode latency, dense vs top-2/8 and top-1/8, splice→TVM.

What is measured
----------------
A ``transformers`` ``LlamaForCausalLM`` built from a ``LlamaConfig`` (hidden 2048, FFN 5632,
4 layers, 16 heads, 16 KV heads, vocab 1024, untied lm_head; random weights,
``torch.manual_seed(0)``, fp32, eval), at **batch 1, one token** (``use_cache=False``), in
two cases:

* **FFN** — the SwiGLU MLP of layer 0 alone (``x [1, 1, 2048] → [1, 1, 2048]``, 138 MB of
  weights);
* **whole model** — one decode step of the whole model (``ids [1, 1] → logits``).

Variants, each the same program through the same backend (``splice.compile(program,
"host")`` → TVM, loaded as a ``CompiledModel``):

* ``dense`` — the captured program;
* ``top-2/8`` and ``top-1/8`` — splice's ``experts`` pass,
  ``experts{num_experts=8,top_k=k}`` (balanced k-means split, centroid router): every FFN
  becomes ``splice::moe_ffn``, which TVM lowers at one token to the sparse kernel that
  reads only the selected experts' weights (k/8 of the FFN's plus the router's).

Random weights: the numbers are latencies, not accuracy (``benchmarks/experts_fidelity.py``
measures fidelity on pretrained MiniLM). Each call takes the next of 64 inputs (random
hidden states / token ids), so the experts selected vary from call to call as in real
decoding, rather than one expert pair staying cache-resident. Per variant and case:
``--warmup`` seconds of untimed calls, then ``--rounds`` rounds of ``--repeats`` timed calls,
variants alternating round by round (load from other jobs spreads over all of them);
median and p10–p90 per call. The load other processes put on the machine during the run
is measured (``/proc/stat``) and reported.

Goal (issue #8): at least 2.5× the dense FFN's speed at top-2 of 8.

Run from the repository root::

    python benchmarks/experts.py                 # full run, writes benchmarks/RESULTS.md
    python benchmarks/experts.py --quick         # smoke run: fewer repeats, no write
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    LLAMA_DECODE_SHAPE,
    busy_seconds,
    cpu_model,
    git_state,
    llama_lm,
    log,
    lscpu,
    other_cores,
    version,
    write_marked_section,
)

import splice
from splice.ir.ops import moe_ffn, moe_gates
from splice.passes import parse_pipeline

SECTION = "## Experts decode: dense vs top-2/8 and top-1/8 FFN experts (benchmarks/experts.py)"
BEGIN, END = "<!-- experts:begin -->", "<!-- experts:end -->"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ATOL = 1e-3
GOAL = 2.5
POOL = 64
SHAPE: dict[str, int] = dict(LLAMA_DECODE_SHAPE)  # lowrank_decode.py's shape
VARIANTS = [("dense", None), ("top-2/8", 2), ("top-1/8", 1)]


def build_model(layers: int) -> Any:
    return llama_lm(layers, SHAPE)


@dataclass
class Variant:
    case: str
    name: str
    k: int | None
    program: Any
    inputs: list[tuple[torch.Tensor, ...]]
    compiled: Any = None
    rules: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0
    diff: float = 0.0
    times: list[float] = field(default_factory=list)
    experts_used: str = ""

    def median(self) -> float:
        return statistics.median(self.times)


def weight_bytes(program: Any, k: int | None) -> int:
    """Bytes of weights one call reads: every parameter except an embedding table (one row
    of it); of each moe_ffn's experts, k of E."""
    total = 0
    expert_weights: dict[str, float] = {}
    for n in program.graph.nodes:
        if n.target is moe_ffn.overload:
            for a in n.args[3:8]:  # w_in, b_in, w_gate, b_gate, w_out
                if a is not None and getattr(a, "op", "") == "get_attr":
                    E = program.get_weight(str(a.target)).shape[0]
                    expert_weights[str(a.target)] = (k or E) / E
    for name, w in program.named_parameters().items():
        nbytes = w.numel() * w.element_size()
        if "embed" in name and w.dim() == 2:
            nbytes = w.shape[1] * w.element_size()
        total += int(nbytes * expert_weights.get(name, 1.0))
    return total


def make_variants(lm: Any, layers_for_model: bool) -> list[Variant]:
    """Programs of both cases and every variant (the pass run on the captured programs)."""
    g = torch.Generator().manual_seed(1)
    mlp = lm.model.layers[0].mlp
    xs = [(torch.randn(1, 1, SHAPE["hidden"], generator=g),) for _ in range(POOL)]
    ids = [(torch.randint(0, SHAPE["vocab"], (1, 1), generator=g),) for _ in range(POOL)]
    out = []
    cases = [("FFN", splice.capture(mlp, xs[0], name="llama_mlp"), xs)]
    if layers_for_model:
        cases.append(("whole model", splice.capture(lm, ids[0], name="llama_decode"), ids))
    for case, program, inputs in cases:
        for name, k in VARIANTS:
            if k is None:
                prog = program
            else:
                log(f"{case}: experts{{num_experts=8,top_k={k}}}…")
                t0 = time.perf_counter()
                res = parse_pipeline(f"experts{{num_experts=8,top_k={k}}}").run(program)
                st = res.stats["passes"][0]["stats"]
                log(f"  {st['ffns_split']} FFNs split in {time.perf_counter() - t0:.1f} s")
                prog = res.program
            out.append(Variant(case, name, k, prog, inputs))
    return out


def experts_used(v: Variant) -> str:
    """For the FFN case: how many distinct experts the pool's inputs select, and the
    largest share one expert gets (routing spreads the weight reads)."""
    node = next((n for n in v.program.graph.nodes if n.target is moe_ffn.overload), None)
    if node is None or v.case != "FFN":
        return ""
    w = [v.program.get_weight(str(a.target)) if getattr(a, "op", "") == "get_attr" else None
         for a in node.args[1:3]]  # fmt: skip
    x = torch.cat([i[0].reshape(1, -1) for i in v.inputs])
    sel = moe_gates(x, w[0], w[1], v.k or 0, 0.0, "none", False) > 0
    counts = sel.sum(0)
    return f"{int((counts > 0).sum())} of 8 used, busiest in {int(counts.max())}/{len(v.inputs)}"


def compile_variant(v: Variant, tmp: Path, threads: int) -> None:
    log(f"compiling {v.case} / {v.name}…")
    t0 = time.perf_counter()
    art = splice.compile(v.program, "host", output=tmp / f"{v.case}_{v.name}.artifact".replace(" ", "_").replace("/", "of"))  # fmt: skip
    v.compiled = art.load(num_threads=threads)
    v.rules = dict(art.manifest["lowering"]["schedule_rules"])
    v.weight_bytes = weight_bytes(v.program, v.k)
    with torch.inference_mode():
        for inp in v.inputs[:4]:
            ref = v.program(*inp)
            ref = ref if isinstance(ref, torch.Tensor) else ref[0]
            got = v.compiled(*inp)
            got = got if isinstance(got, torch.Tensor) else got[0]
            v.diff = max(v.diff, (got - ref).abs().max().item())
    v.experts_used = experts_used(v)
    log(f"  {time.perf_counter() - t0:.1f} s, rules {v.rules}, max abs diff vs eager {v.diff:.1e}")


def run_calls(v: Variant, n: int, start: int, record: bool) -> None:
    for i in range(n):
        inp = v.inputs[(start + i) % len(v.inputs)]
        t0 = time.perf_counter()
        v.compiled(*inp)
        if record:
            v.times.append(time.perf_counter() - t0)


def time_rounds(variants: list[Variant], warmup: float, rounds: int, repeats: int) -> None:
    for v in variants:
        t_end = time.perf_counter() + warmup
        i = 0
        while time.perf_counter() < t_end:
            run_calls(v, 1, i, False)
            i += 1
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            run_calls(v, repeats, r * repeats, True)
        log(
            f"  round {r + 1}/{rounds}: "
            + "; ".join(f"{v.case} {v.name} {v.median() * 1e3:.2f} ms" for v in variants)
            + f" (load {os.getloadavg()[0]:.2f})"
        )


def _ms(ts: list[float]) -> str:
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) >= 2 else [ts[0]] * 9
    return f"{statistics.median(ts) * 1e3:.2f} ({q[0] * 1e3:.2f}–{q[-1] * 1e3:.2f})"


def section(
    variants: list[Variant],
    args: argparse.Namespace,
    command: str,
    threads: int,
    load: tuple[float, float],
    others: float,
    wall: float,
) -> str:
    rows = []
    speedups: dict[tuple[str, str], float] = {}
    for v in variants:
        dense = next(d for d in variants if d.case == v.case and d.k is None)
        sp = dense.median() / v.median()
        speedups[(v.case, v.name)] = sp
        rules = ", ".join(f"{k} {n}" for k, n in sorted(v.rules.items()))
        rows.append(
            f"| {v.case} | {v.name} | {v.weight_bytes / 1e6:.1f} | {_ms(v.times)} | "
            f"**{sp:.2f}×** | {v.weight_bytes / v.median() / 1e9:.1f} | {rules} | {v.diff:.1e} |"
            + (f" {v.experts_used} |" if v.experts_used else " |")
        )
    ffn2 = speedups.get(("FFN", "top-2/8"))
    verdict = (
        f"- Goal (≥ {GOAL}× the dense FFN's speed at top-2 of 8): **{ffn2:.2f}×** → "
        f"**{'met' if ffn2 >= GOAL else 'MISSED'}**"
        if ffn2 is not None
        else "- Goal: not measured"
    )
    whole = [(n, speedups[("whole model", n)]) for n, _ in VARIANTS[1:] if ("whole model", n) in speedups]  # fmt: skip
    s = SHAPE
    warn = (
        f"- WARNING: other processes kept {others:.2f} cores busy on average during this run "
        f"(of {os.cpu_count()}); medians may be slower than on a quiet machine — compare the "
        "p10–p90 spreads."
        if others >= 0.2
        else f"- load: other processes kept {others:.2f} cores busy on average (quiet run)."
    )
    parts = [
        SECTION,
        BEGIN,
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores (a VM), L3 {lscpu('L3') or '?'}; "
        f"threads: torch {threads}, TVM {os.environ.get('TVM_NUM_THREADS')}; 1-min load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after; run took {wall:.0f} s",
        warn,
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, apache-tvm "
        f"{version('tvm')}, transformers {version('transformers')}, splice {splice.__version__} "
        f"at {git_state()}",
        f"- command: `{command}` (from the repository root)",
        f"- model: `LlamaForCausalLM`, {s['layers']} layers, hidden {s['hidden']}, FFN "
        f"{s['inter']} (SwiGLU), {s['heads']} heads, vocab {s['vocab']}, untied lm_head, random "
        "weights (`torch.manual_seed(0)`), fp32. FFN = layer 0's MLP alone, x [1, 1, 2048]; "
        "whole model = one decode step, ids [1, 1], `use_cache=False` (no KV cache read)",
        "- variants: the same captured program, dense or after `experts{num_experts=8,top_k=k}` "
        "(balanced k-means, centroid router; 8 experts of 704 neurons per FFN), all through "
        '`splice.compile(program, "host")` → TVM; `moe_ffn` at one token lowers to the '
        "sparse kernel (rule `moe_ffn`), which reads only the k selected experts' rows",
        f"- method: {args.warmup:g} s warm-up per variant, then {args.rounds} rounds × "
        f"{args.repeats} calls, variants alternating; each call takes the next of {POOL} "
        "random inputs (the selected experts change from call to call); median (p10–p90) ms",
        "",
        "| case | variant | weight MB read / call | ms | speed vs dense | GB/s | TVM schedule "
        "rules | max abs diff vs eager | routing over the inputs |",
        "|---|---|--:|--:|--:|--:|---|--:|---|",
        *rows,
        "",
        "Weight MB: every parameter a call reads (of the experts, k of 8; the router's E×d; "
        "one embedding row); GB/s = those bytes / median time.",
        "",
        verdict,
        "- Whole decode step: "
        + ", ".join(f"{n} {x:.2f}× the dense step" for n, x in whole)
        + " (attention, norms and lm_head are unchanged: the FFNs are 67% of the step's weights)."
        if whole
        else "- Whole decode step: not measured (--no-model).",
        "",
        END,
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per round (16)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed calls (2)")
    ap.add_argument("--layers", type=int, default=SHAPE["layers"], help="decoder layers (4)")
    ap.add_argument("--no-model", action="store_true", help="the FFN case only")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds × 5, no write")
    ap.add_argument("--no-results", action="store_true", help="print only")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file to update")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.repeats = args.repeats or (5 if args.quick else 16)
    SHAPE["layers"] = args.layers
    write = not (args.no_results or args.quick)
    command = shlex.join(
        ["python", *(sys.argv if argv is None else ["benchmarks/experts.py", *argv])]
    )
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    load_before = os.getloadavg()[0]
    busy = busy_seconds()
    t_start = time.perf_counter()

    log(f"building LLaMA ({SHAPE})…")
    lm = build_model(args.layers)
    variants = make_variants(lm, not args.no_model)
    del lm
    with tempfile.TemporaryDirectory(prefix="splice-experts-") as d:
        for v in variants:
            compile_variant(v, Path(d), threads)
        log(f"timing ({args.rounds} rounds × {args.repeats} calls per variant)…")
        time_rounds(variants, args.warmup, args.rounds, args.repeats)
    wall = time.perf_counter() - t_start
    others = other_cores(busy, wall)
    text = section(
        variants, args, command, threads, (load_before, os.getloadavg()[0]), others, wall
    )
    print(text)
    bad = [v for v in variants if v.diff > ATOL]
    if bad:
        for v in bad:
            log(f"ERROR: {v.case} {v.name}: splice differs from eager by {v.diff:.3g} > {ATOL}")
        return 1
    if write:
        write_marked_section(args.results, SECTION, BEGIN, END, text)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
