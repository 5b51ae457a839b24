"""The ``splice`` command line.

::

    splice capture MODEL -o prog.splice         capture a model into a saved program
    splice opt IN -p PIPELINE -o out.splice      run a pass pipeline (with instruments)
    splice show IN [--locations]                 print the text IR
    splice stats IN [--depth N]                  params / FLOPs / bytes by module
    splice diff A B                              structural and numeric difference
    splice compile IN [-t TARGET] [--tune N] -o A  compile into an artifact (host, aarch64-linux, cuda)
    splice run A [--check]                       run an artifact (aarch64 ones under qemu)
    splice bench A [--torch-compile]             time an artifact against its PyTorch reference
    splice stitch-table MODEL MODEL... [--plot P] stitch a model family: FLOPs, latency, fidelity
    splice passes                                the registered passes and their options
    splice demo                                  the whole path on all-MiniLM-L6-v2

IN is a saved program folder or a MODEL. MODEL is ``package.module:factory`` naming a
function that returns ``(model, example_inputs)``; ``-a key=value`` passes arguments to it.
Errors print as one message (what, where, what to do) and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from splice.errors import SpliceError


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False)


# ---------------------------------------------------------------------------------------
# loading inputs


class Loaded:
    """A program plus the sample inputs that came with it (if any)."""

    def __init__(self, program: Any, samples: list[tuple[Any, ...]], source: str):
        self.program = program
        self.samples = samples
        self.source = source


def _parse_factory_args(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpliceError(f"factory argument {item!r} is not key=value")
        k, v = item.split("=", 1)
        val: Any = v
        for conv in (int, float):
            try:
                val = conv(v)
                break
            except ValueError:
                continue
        out[k] = val
    return out


def load_model_spec(spec: str, factory_args: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``package.module:factory`` -> (model, example_inputs)."""
    from splice.errors import CaptureError

    if ":" not in spec:
        raise CaptureError(
            f"{spec!r} is neither a saved program folder nor a MODEL",
            hint="name a model as package.module:factory, e.g. splice.models:gpt2",
        )
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise CaptureError(
            f"cannot import {mod_name!r}: {e}", hint="is the package installed and on PYTHONPATH?"
        ) from e
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise CaptureError(
            f"{mod_name} has no factory {fn_name!r}",
            hint=f"callables there: {', '.join(names[:20])}",
        )
    result = fn(**(factory_args or {}))
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CaptureError(
            f"{spec} must return (model, example_inputs), got {type(result).__name__}"
        )
    return result


def load_input(path_or_model: str, factory_args: dict[str, Any] | None = None) -> Loaded:
    import splice
    from splice.ir.serialize import is_saved_program, load_samples

    if is_saved_program(path_or_model):
        return Loaded(splice.load(path_or_model), load_samples(path_or_model), path_or_model)
    if os.path.exists(path_or_model):
        from splice.errors import ArtifactError

        raise ArtifactError(
            f"{path_or_model} exists but is not a saved splice program",
            hint="create one with `splice capture MODEL -o FILE`",
        )
    model, inputs = load_model_spec(path_or_model, factory_args)
    with _status(f"capturing {path_or_model}"):
        program = splice.capture(model, inputs)
    from splice.ir.capture import _split_inputs

    args, kwargs = _split_inputs(inputs)
    sample = tuple(args) + tuple(kwargs[n] for n in program.input_names[len(args) :] if n in kwargs)
    return Loaded(program, [sample], path_or_model)


@contextlib.contextmanager
def _status(message: str):
    con = _console(stderr=True)
    if con.is_terminal:
        with con.status(message):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------
# commands


def cmd_capture(a: argparse.Namespace) -> int:
    from splice.ir.serialize import save

    loaded = load_input(a.model, _parse_factory_args(a.arg))
    save(loaded.program, a.output, samples=loaded.samples, overwrite=a.force)
    _console().print(f"captured {loaded.program!r}\nwrote {a.output}")
    return 0


def cmd_opt(a: argparse.Namespace) -> int:
    from splice.ir.serialize import save
    from splice.passes import (
        CrashReproducer,
        DumpIR,
        NumericCheck,
        PassContext,
        PassManager,
        PrintIR,
        Timing,
        VerifyEach,
        parse_pipeline,
    )

    pipeline = parse_pipeline(a.pipeline)
    loaded = load_input(a.input, _parse_factory_args(a.arg))
    instruments: list[Any] = []
    timing = Timing() if a.time_passes else None
    if timing:
        instruments.append(timing)
    if a.verify_each:
        instruments.append(VerifyEach())
    if a.print_ir_before_all or a.print_ir_after_all or a.print_ir_after_change:
        instruments.append(
            PrintIR(
                before=a.print_ir_before_all,
                after=a.print_ir_after_all or a.print_ir_after_change,
                only_changed=a.print_ir_after_change and not a.print_ir_after_all,
                locations=a.locations,
            )
        )
    if a.dump_dir:
        instruments.append(DumpIR(a.dump_dir))
    check = NumericCheck() if a.numeric_check else None
    if check:
        instruments.append(check)
    if a.crash_dir:
        instruments.append(CrashReproducer(a.crash_dir))
    ctx = PassContext(loaded.samples, progress=_progress_printer())
    result = PassManager(pipeline, instruments).run(loaded.program, ctx)
    con = _console(stderr=a.output is None)
    _print_pass_records(con, result.stats["passes"])
    if timing:
        con.print(timing.report())
    if check:
        con.print(check.report())
    if a.output:
        save(result.program, a.output, samples=loaded.samples, overwrite=a.force)
        con.print(f"wrote {a.output}")
    elif not (a.print_ir_after_all or a.print_ir_after_change):
        from splice.ir.printer import print_ir

        sys.stdout.write(print_ir(result.program, a.locations))
    return 0


def _progress_printer():
    con = _console(stderr=True)
    last = {"t": 0.0}

    def report(message: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last["t"] > 0.5:
            last["t"] = now
            if con.is_terminal:
                con.print(f"{message}: {done}/{total}", end="\r")
            elif done == total:
                con.print(f"{message}: {done}/{total}")

    return report


def _print_pass_records(con: Any, records: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(title="passes", show_edge=False)
    t.add_column("pass")
    t.add_column("changed")
    t.add_column("seconds", justify="right")
    t.add_column("stats")
    for r in records:
        stats = {k: v for k, v in r["stats"].items() if k != "changed"}
        note = f"skipped by {r['skipped_by']}" if "skipped_by" in r else _short(stats)
        t.add_row(r["pass"], "yes" if r["changed"] else "no", f"{r['seconds']:.3f}", note)
    con.print(t)


def _short(stats: dict[str, Any], limit: int = 160) -> str:
    s = ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def cmd_show(a: argparse.Namespace) -> int:
    from splice.ir.printer import print_ir
    from splice.runtime.artifact import FORMAT, Artifact, read_manifest

    root = Path(a.input)
    if (root / "manifest.json").is_file() and read_manifest(root).get("format") == FORMAT:
        # a compiled artifact: its host program and parts, then the program it was built from
        import json

        from splice.runtime.host import format_host

        art = Artifact(root)
        m = art.manifest
        if m.get("host"):
            host = json.loads((root / m["host"]).read_text())
            sys.stdout.write(format_host(host, m["parts"]))
        else:
            sys.stdout.write(f"one part, no host program: {m['parts'][0]['library']}\n")
        sys.stdout.write(print_ir(art.reference(), locations=a.locations))
        return 0
    program = load_input(a.input, _parse_factory_args(a.arg)).program
    sys.stdout.write(print_ir(program, locations=a.locations))
    return 0


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def stats_table(program: Any, depth: int = 2, title: str | None = None):
    from rich.table import Table

    from splice.passes.analysis import cost_model

    report = cost_model(program)
    t = Table(title=title or f"{program.name}: cost by module (depth {depth})", show_edge=False)
    for col in ("module", "params", "FLOPs", "bytes read", "bytes written"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for path, c in report.by_module(depth).items():
        t.add_row(
            path or "<root>",
            _fmt_int(c.params),
            _fmt_int(c.flops),
            _fmt_int(c.bytes_read),
            _fmt_int(c.bytes_written),
        )
    tot = report.total
    t.add_section()
    t.add_row(
        "total",
        _fmt_int(tot.params),
        _fmt_int(tot.flops),
        _fmt_int(tot.bytes_read),
        _fmt_int(tot.bytes_written),
    )
    return t, report


def cmd_stats(a: argparse.Namespace) -> int:
    loaded = load_input(a.input, _parse_factory_args(a.arg))
    table, report = stats_table(loaded.program, a.depth)
    con = _console()
    con.print(table)
    if report.uncounted:
        con.print(f"not counted (unknown cost): {', '.join(report.uncounted[:10])}")
    return 0


def cmd_diff(a: argparse.Namespace) -> int:
    from splice.ir.printer import print_ir
    from splice.passes.instruments import compare_outputs

    left, right = load_input(a.a), load_input(a.b)
    con = _console()
    ta, tb = print_ir(left.program).splitlines(), print_ir(right.program).splitlines()
    ops_a, ops_b = _op_counts(left.program), _op_counts(right.program)
    from rich.table import Table

    t = Table(title="structure", show_edge=False)
    for col in ("", a.a, a.b):
        t.add_column(col)
    t.add_row("inputs", ", ".join(left.program.input_names), ", ".join(right.program.input_names))
    t.add_row(
        "outputs", ", ".join(left.program.output_names), ", ".join(right.program.output_names)
    )
    t.add_row("ops", str(sum(ops_a.values())), str(sum(ops_b.values())))
    wa = sum(v.numel() for v in left.program.weights.values())
    wb = sum(v.numel() for v in right.program.weights.values())
    t.add_row("weight elements", _fmt_int(wa), _fmt_int(wb))
    for op in sorted(set(ops_a) | set(ops_b)):
        if ops_a[op] != ops_b[op]:
            t.add_row(f"  {op}", str(ops_a[op]), str(ops_b[op]))
    con.print(t)
    samples = left.samples or right.samples
    if samples and left.program.input_names == right.program.input_names:
        import torch

        with torch.no_grad():
            ra = [left.program.run_named(*s) for s in samples]
            rb = [right.program.run_named(*s) for s in samples]
        common = [n for n in left.program.output_names if n in right.program.output_names]
        m = compare_outputs([r[n] for r in ra for n in common], [r[n] for r in rb for n in common])
        con.print(
            f"numeric ({len(samples)} sample(s), outputs {common}): max abs {m['max_abs']:.3g}, "
            f"max rel {m['max_rel']:.3g}, cosine {m['cosine']:.6f}"
        )
    else:
        con.print("numeric: not compared (no sample inputs, or the inputs differ)")
    if a.text:
        sys.stdout.writelines(
            line + "\n" for line in difflib.unified_diff(ta, tb, a.a, a.b, lineterm="")
        )
    return 0 if ta == tb else 1 if a.exit_code else 0


def _op_counts(program: Any) -> Counter[str]:
    from splice.ir.printer import format_target

    return Counter(
        format_target(n) for n in program.graph.nodes if n.op in ("call_function", "call_module")
    )


def cmd_stitch_table(a: argparse.Namespace) -> int:
    from splice.tools.stitch_table import main_stitch_table

    return main_stitch_table(a)


def cmd_passes(a: argparse.Namespace) -> int:
    from rich.table import Table

    from splice.passes import describe_passes

    t = Table(title="passes", show_edge=False)
    for col in ("pass", "semantics", "options", "summary"):
        t.add_column(col)
    for d in describe_passes():
        opts = ", ".join(f"{o['name']}={o['default']} ({o['type']})" for o in d["options"]) or "-"
        t.add_row(d["name"], d["semantics"], opts, d["summary"])
    _console().print(t)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from splice.tools.demo import run_demo

    return run_demo(pipeline=a.pipeline, sentences=a.sentences, lowrank=not a.no_lowrank)


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from splice import __version__

    p = argparse.ArgumentParser(
        prog="splice", description="A compiler for the structure of neural networks."
    )
    p.add_argument("--version", action="version", version=f"splice {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(
        sp: argparse.ArgumentParser,
        name: str = "input",
        help: str = "saved program folder or MODEL",
    ):
        sp.add_argument(name, help=help)
        sp.add_argument(
            "-a",
            "--arg",
            action="append",
            metavar="KEY=VALUE",
            help="argument for the model factory",
        )

    def force_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--force",
            action="store_true",
            help="replace OUTPUT even if it is not a splice program or artifact",
        )

    sp = sub.add_parser("capture", help="capture a model into a saved program")
    model_arg(sp, "model", "MODEL as package.module:factory")
    sp.add_argument("-o", "--output", required=True, help="program folder to write")
    force_arg(sp)
    sp.set_defaults(fn=cmd_capture)

    sp = sub.add_parser("opt", help="run a pass pipeline")
    model_arg(sp)
    sp.add_argument("-p", "--pipeline", required=True, help='e.g. "cse,fold-constants,dce"')
    sp.add_argument("-o", "--output", help="program folder to write (default: print the IR)")
    force_arg(sp)
    sp.add_argument("--print-ir-before-all", action="store_true")
    sp.add_argument("--print-ir-after-all", action="store_true")
    sp.add_argument("--print-ir-after-change", action="store_true")
    sp.add_argument(
        "--locations", action="store_true", help="print module paths, source lines and passes"
    )
    sp.add_argument("--dump-dir", metavar="D", help="write the IR after every pass into D")
    sp.add_argument(
        "--verify-each", action="store_true", help="verify the program after every pass"
    )
    sp.add_argument("--time-passes", action="store_true", help="report the time of every pass")
    sp.add_argument(
        "--numeric-check", action="store_true", help="compare outputs before/after every pass"
    )
    sp.add_argument("--crash-dir", metavar="D", help="write a reproducer into D if a pass fails")
    sp.set_defaults(fn=cmd_opt)

    sp = sub.add_parser("show", help="print the text IR")
    model_arg(sp)
    sp.add_argument("--locations", action="store_true")
    sp.set_defaults(fn=cmd_show)

    sp = sub.add_parser("stats", help="parameters, FLOPs and bytes by module")
    model_arg(sp)
    sp.add_argument(
        "--depth", type=int, default=2, help="module path depth of the table (default 2)"
    )
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("diff", help="structural and numeric difference of two programs")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--text", action="store_true", help="also print a unified diff of the text IR")
    sp.add_argument("--exit-code", action="store_true", help="exit with 1 if the texts differ")
    sp.set_defaults(fn=cmd_diff)

    from splice.tools.cli_compile import add_commands

    add_commands(sub, model_arg)

    sp = sub.add_parser(
        "stitch-table",
        help="stitch a model family (SN-Net) and tabulate its configurations",
        description="Stitch the models (package.module:factory, one family) and print per "
        "configuration FLOPs, parameters, latency after compile and fidelity to the largest.",
    )
    sp.add_argument(
        "models",
        nargs="+",
        help="two or more package.module:factory[?key=value&...] (arguments per member)",
    )
    sp.add_argument("--window", type=int, default=2)
    sp.add_argument("--stride", type=int, default=1)
    sp.add_argument("--kind", default="linear", help="linear | conv1x1 | lora")
    sp.add_argument("--calib", type=int, default=16, help="calibration inputs (random, seeded)")
    sp.add_argument("--eval", type=int, default=8, help="inputs the fidelity is measured on")
    sp.add_argument("-t", "--target", default="host")
    sp.add_argument("--no-latency", action="store_true", help="skip compiling and timing")
    sp.add_argument("-o", "--output", help="also write the table (Markdown) here")
    sp.add_argument("--plot", help="write the FLOPs / fidelity Pareto plot (PNG) here")
    sp.set_defaults(fn=cmd_stitch_table)

    sp = sub.add_parser("passes", help="list the registered passes and their options")
    sp.set_defaults(fn=cmd_passes)

    sp = sub.add_parser("demo", help="capture all-MiniLM-L6-v2 and run a pipeline on it")
    sp.add_argument("-p", "--pipeline", default="cse,fold-constants,dce")
    sp.add_argument(
        "--sentences", type=int, default=8, help="number of sample sentences (default 8)"
    )
    sp.add_argument(
        "--no-lowrank", action="store_true", help="skip the low-rank part (lowrank + TVM)"
    )
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.fn(a) or 0)
    except SpliceError as e:
        con = _console(stderr=True)
        con.print("error:", style="bold red", end=" ")
        con.print(f"{type(e).__name__}: {e.message}")
        if e.where:
            con.print(f"  at: {e.where}")
        if e.hint:
            con.print(f"  hint: {e.hint}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "load_input", "load_model_spec", "main", "stats_table"]
