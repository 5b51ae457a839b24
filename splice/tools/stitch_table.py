"""The configuration table of a stitched model family (``splice stitch-table``).

Per configuration of a :mod:`stitch <splice.passes.stitch>` program: FLOPs and parameters
(the cost model on :func:`~splice.passes.stitch.select_config`'s static program), latency
after compiling the stitched program once for the target (every configuration runs through
the same artifact, chosen by its ``config`` input), and fidelity to the largest anchor on
the calibration inputs (mean cosine between flattened outputs, or a caller's own measure).
The Pareto front keeps the configurations that no other one beats on both FLOPs (fewer)
and fidelity (higher).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import splice
from splice.errors import SpliceError
from splice.ir import meta as M
from splice.ir.program import Program
from splice.passes.analysis.cost import cost_model
from splice.passes.stitch import StitchResult, select_config, stitch_programs
from splice.tools.common import check_output_file, load_model_spec, parse_factory_args


@dataclass
class Row:
    index: int
    what: str
    flops: int
    params: int
    fidelity: float
    latency_ms: float | None = None
    pareto: bool = False


def default_fidelity(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Mean cosine between flattened outputs, over samples."""
    cos = [
        torch.nn.functional.cosine_similarity(g.flatten().double(), w.flatten().double(), dim=0)
        for g, w in zip(got, want)
    ]
    return float(torch.stack(cos).mean())


def stitch_table(
    result: StitchResult,
    calib: Sequence[Sequence[torch.Tensor]],
    *,
    target: str | None = "host",
    fidelity: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], float] = default_fidelity,
    repeats: int = 20,
    output: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """The table of ``result``'s configurations (module docstring); ``target=None`` skips
    compiling and latency."""

    say = progress or (lambda m: None)
    program = result.program
    names = program.attrs["stitch"]["anchors"]
    largest = len(names) - 1  # anchors are sorted by FLOPs
    with torch.no_grad():
        ref = [program(*x, torch.tensor(largest)) for x in calib]
    cm = None
    if target is not None:
        say(f"compiling {len(result.configs)} configurations for {target}")
        cm = splice.compile(program, target, output=output).load()
    rows = []
    for c in result.configs:
        static = select_config(program, c.index)
        cost = cost_model(static).total
        with torch.no_grad():
            outs = [static(*x) for x in calib]
        row = Row(
            c.index, c.describe(names), int(cost.flops), int(cost.params), fidelity(outs, ref)
        )
        if cm is not None:
            x = (*calib[0], torch.tensor(c.index))
            for _ in range(3):
                cm(*x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                cm(*x)
                times.append(time.perf_counter() - t0)
            row.latency_ms = statistics.median(times) * 1e3
        say(f"config {c.index}: {row.what}")
        rows.append(row)
    for r in rows:
        r.pareto = not any(
            (o.flops <= r.flops and o.fidelity >= r.fidelity)
            and (o.flops < r.flops or o.fidelity > r.fidelity)
            for o in rows
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        "| config | route | GFLOPs | params (M) | fidelity | latency ms | Pareto |",
        "|--:|---|--:|--:|--:|--:|:-:|",
    ]
    for r in sorted(rows, key=lambda r: r.flops):
        lat = "—" if r.latency_ms is None else f"{r.latency_ms:.3f}"
        lines.append(
            f"| {r.index} | {r.what} | {r.flops / 1e9:.4f} | {r.params / 1e6:.3f} | "
            f"{r.fidelity:.4f} | {lat} | {'★' if r.pareto else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: str | Path, title: str = "stitch configurations") -> None:
    """FLOPs against fidelity, the Pareto front as a line (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SpliceError(
            "the Pareto plot needs matplotlib", hint="pip install 'splice[hyper]' or matplotlib"
        ) from e
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.flops / 1e9 for r in rows], [r.fidelity for r in rows], s=14, label="configs")
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.flops)
    ax.plot(
        [r.flops / 1e9 for r in front], [r.fidelity for r in front], "r-o", ms=4, label="Pareto"
    )
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("fidelity to the largest anchor")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration_inputs(
    program: Program, example: Sequence[torch.Tensor], n: int, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """``n`` inputs like ``example``: float inputs drawn from N(0, 1); integer inputs that
    feed an embedding drawn below its number of rows; other inputs kept as they are."""

    bounds: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            w, ids = node.args[:2]
            if getattr(ids, "op", None) == "placeholder":
                bounds[ids.name] = M.spec(w).shape[0]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sample = []
        for name, t in zip(program.input_names, example):
            if t.dtype.is_floating_point:
                sample.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
            elif name in bounds:
                sample.append(torch.randint(0, bounds[name], t.shape, generator=g, dtype=t.dtype))
            else:
                sample.append(t.clone())
        out.append(tuple(sample))
    return out


def main_stitch_table(args: Any) -> int:
    """``splice stitch-table MODEL MODEL... [options]`` (see cli.py)."""

    for option, path in (("-o", args.output), ("--plot", args.plot)):
        if path:
            check_output_file(path, option)
    anchors, example = [], None
    for spec in args.models:
        # package.module:factory?key=value&key=value (each member its own arguments)
        name, _, query = spec.partition("?")
        model, inputs = load_model_spec(name, parse_factory_args(query.split("&") if query else []))
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        anchors.append(splice.capture(model, inputs))
        example = example or inputs
    calib = calibration_inputs(anchors[0], example, args.calib)
    result = stitch_programs(
        anchors, calib, window=args.window, stride=args.stride, kind=args.kind,
        share=args.share, cuts=args.cuts,
        names=[s.rsplit(":", 1)[-1].replace("?", " ").replace("&", " ") for s in args.models],
    )  # fmt: skip
    rows = stitch_table(
        result, calib[: args.eval], target=None if args.no_latency else args.target,
        progress=lambda m: print(m, flush=True),
    )  # fmt: skip
    text = format_table(rows)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    if args.plot:
        plot(rows, args.plot)
        print(f"Pareto plot: {args.plot}")
    return 0


__all__ = ["Row", "calibration_inputs", "format_table", "plot", "stitch_table"]
