"""The ``splice`` command line.

::

    splice capture MODEL -o prog.splice         capture a model into a saved program
    splice opt IN -p PIPELINE -o out.splice      run a pass pipeline (with instruments)
    splice show IN [--locations]                 print the text IR
    splice stats IN [--depth N]                  params / FLOPs / bytes by module
    splice diff A B                              structural and numeric difference
    splice compile IN [-t TARGET] [--tune N] -o A  compile into an artifact (host, aarch64-linux, cuda)
    splice export-onnx IN -o model.onnx          export as ONNX (splice ops as `splice` functions)
    splice run A [--check]                       run an artifact (aarch64 ones under qemu)
    splice bench A [--torch-compile]             time an artifact against its PyTorch reference
    splice stitch-table MODEL MODEL... [--plot P] stitch a model family: FLOPs, latency, fidelity
    splice view IN [--port P] [--html OUT]       IN in Model Explorer, or a pass report (HTML)
    splice passes                                the registered passes and their options
    splice demo                                  the whole path on all-MiniLM-L6-v2

IN is a saved program folder or a MODEL. MODEL is ``package.module:factory`` naming a
function that returns ``(model, example_inputs)``; ``-a key=value`` passes arguments to it.
An ONNX file (``model.onnx``) is a MODEL too: it is imported (:func:`splice.import_onnx`).
A MODEL spec imports your module and calls your function: name only code you trust (see
:func:`splice.tools.common.load_model_spec` for what is refused before anything runs; it
is not a sandbox).

Errors print as one line on stderr (what, where, what to do) and exit with status 1; an
unexpected exception (a bug) prints one line too, and its traceback when the environment
variable SPLICE_DEBUG=1 is set.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from splice._quiet import quiet_torch_logs
from splice.errors import SpliceError, one_line
from splice.ir.output_tree import format_structure
from splice.ir.printer import print_ir
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
    describe_passes,
    parse_pipeline,
)
from splice.passes.instruments import compare_outputs, op_counts
from splice.runtime.artifact import FORMAT, Artifact, read_manifest
from splice.runtime.host import format_host
from splice.tools.cli_compile import add_commands as add_compile_commands
from splice.tools.cli_generate import add_command as add_generate_command
from splice.tools.cli_onnx import add_command as add_onnx_command
from splice.tools.cli_view import add_command as add_view_command
from splice.tools.common import (
    MODEL_HELP,
    check_dump_folder,
    check_output_folder,
    console,
    fmt_int,
    int_at_least,
    load_input,
    parse_factory_args,
    print_pass_records,
    progress_printer,
    stats_table,
)
from splice.tools.demo import run_demo
from splice.tools.stitch_table import main_stitch_table
from splice.version import __version__

# ---------------------------------------------------------------------------------------
# commands


def cmd_capture(a: argparse.Namespace) -> int:
    check_output_folder(a.output)
    loaded = load_input(a.model, parse_factory_args(a.arg))
    save(loaded.program, a.output, samples=loaded.samples, overwrite=a.force)
    console().print(f"captured {loaded.program!r}\nwrote {a.output}")
    return 0


def cmd_opt(a: argparse.Namespace) -> int:
    pipeline = parse_pipeline(a.pipeline)
    if a.output:
        check_output_folder(a.output)
    for option, folder in (("--dump-dir", a.dump_dir), ("--crash-dir", a.crash_dir)):
        if folder:
            check_dump_folder(folder, option)
    loaded = load_input(a.input, parse_factory_args(a.arg))
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
    ctx = PassContext(loaded.samples, progress=progress_printer())
    result = PassManager(pipeline, instruments, verify=not a.no_verify).run(loaded.program, ctx)
    con = console(stderr=a.output is None)
    print_pass_records(con, result.stats["passes"])
    if timing:
        con.print(timing.report())
    if check:
        con.print(check.report())
    if a.output:
        save(result.program, a.output, samples=loaded.samples, overwrite=a.force)
        con.print(f"wrote {a.output}")
    elif not (a.print_ir_after_all or a.print_ir_after_change):
        sys.stdout.write(print_ir(result.program, a.locations))
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    root = Path(a.input)
    if (root / "manifest.json").is_file() and read_manifest(root).get("format") == FORMAT:
        # a compiled artifact: its host program and parts, then the program it was built from
        import json

        art = Artifact(root)
        m = art.manifest
        if m.get("host"):
            host = json.loads((root / m["host"]).read_text())
            sys.stdout.write(format_host(host, m["parts"]))
        else:
            part = m["parts"][0]
            file = part.get("library") or part.get("model")  # a TVM library or an ONNX model
            sys.stdout.write(f"one part, no host program: {file}\n")
        sys.stdout.write(format_structure(m))
        sys.stdout.write(print_ir(art.reference(), locations=a.locations))
        return 0
    program = load_input(a.input, parse_factory_args(a.arg)).program
    # the output structure as comment lines: the text stays a program the parser reads
    structure = format_structure(getattr(program, "attrs", {}))
    sys.stdout.write("".join(f"# {line}\n" for line in structure.splitlines()))
    sys.stdout.write(print_ir(program, locations=a.locations))
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    loaded = load_input(a.input, parse_factory_args(a.arg))
    table, report = stats_table(loaded.program, a.depth)
    con = console()
    con.print(table)
    if report.uncounted:
        con.print(f"not counted (unknown cost): {', '.join(report.uncounted[:10])}")
    return 0


def cmd_diff(a: argparse.Namespace) -> int:
    left, right = load_input(a.a), load_input(a.b)
    con = console()
    ta, tb = print_ir(left.program).splitlines(), print_ir(right.program).splitlines()
    # every graph (a cond's branches, branches parts), as the dump index counts them
    ops_a, ops_b = Counter(op_counts(left.program)), Counter(op_counts(right.program))
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
    t.add_row("weight elements", fmt_int(wa), fmt_int(wb))
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


def cmd_stitch_table(a: argparse.Namespace) -> int:
    return main_stitch_table(a)


def cmd_passes(a: argparse.Namespace) -> int:
    from rich.table import Table

    t = Table(title="passes", show_edge=False)
    for col in ("pass", "semantics", "options", "summary"):
        t.add_column(col)
    for d in describe_passes():
        opts = ", ".join(f"{o['name']}={o['default']} ({o['type']})" for o in d["options"]) or "-"
        t.add_row(d["name"], d["semantics"], opts, d["summary"])
    console().print(t)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    return run_demo(pipeline=a.pipeline, sentences=a.sentences, lowrank=not a.no_lowrank)


# ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 1, like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message}; see `{self.prog} --help`\n")
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="splice",
        description="A compiler for the structure of neural networks.",
        epilog=MODEL_HELP + ".",
    )
    p.add_argument("--version", action="version", version=f"splice {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(
        sp: argparse.ArgumentParser,
        name: str = "input",
        help: str = "saved program folder or MODEL",
    ):
        sp.add_argument(name, help=f"{help} (MODEL specs import and call your code)")
        sp.epilog = MODEL_HELP + "."
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
    checks = sp.add_mutually_exclusive_group()
    checks.add_argument(
        "--verify-each", action="store_true", help="verify the program after every pass"
    )
    checks.add_argument(
        "--no-verify",
        action="store_true",
        help="do not verify the result (to inspect what a broken pipeline returns)",
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
        "--depth",
        type=int_at_least(0),
        default=2,
        help="module path depth of the table (default 2)",
    )
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("diff", help="structural and numeric difference of two programs")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--text", action="store_true", help="also print a unified diff of the text IR")
    sp.add_argument("--exit-code", action="store_true", help="exit with 1 if the texts differ")
    sp.set_defaults(fn=cmd_diff)

    add_compile_commands(sub, model_arg)

    add_generate_command(sub, model_arg)
    add_onnx_command(sub, model_arg)
    add_view_command(sub)

    sp = sub.add_parser(
        "stitch-table",
        help="stitch a model family (SN-Net) and tabulate its configurations",
        description="Stitch the models (package.module:factory, one family) and print per "
        "configuration FLOPs, parameters, latency after compile and fidelity to the largest.",
        epilog=MODEL_HELP + ".",
    )
    sp.add_argument(
        "models",
        nargs="+",
        help="two or more package.module:factory[?key=value&...] (arguments per member; "
        "MODEL specs import and call your code)",
    )
    sp.add_argument("--window", type=int_at_least(1), default=2)
    sp.add_argument("--stride", type=int_at_least(1), default=1)
    sp.add_argument("--kind", default="linear", help="linear | conv1x1 | lora")
    sp.add_argument(
        "--share",
        default="window",
        choices=("window", "pair"),
        help="one stitching layer per window (SN-Net) or one per configuration",
    )
    sp.add_argument(
        "--cuts",
        default="forward",
        choices=("forward", "all"),
        help="forward: only cuts j -> m > j, every block runs once (SN-Netv2, default); "
        "all: every pair of a window (SN-Net), some re-run blocks",
    )
    sp.add_argument(
        "--calib", type=int_at_least(1), default=16, help="calibration inputs (random, seeded)"
    )
    sp.add_argument(
        "--eval", type=int_at_least(1), default=8, help="inputs the fidelity is measured on"
    )
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
        "--sentences",
        type=int_at_least(1),
        default=8,
        help="number of sample sentences (default 8)",
    )
    sp.add_argument(
        "--no-lowrank", action="store_true", help="skip the low-rank part (lowrank + TVM)"
    )
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error ends in one line on stderr and exit status 1."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0), or a usage error already printed (1)
        return e.code if isinstance(e.code, int) else 1
    debug = _debug()
    try:
        with quiet_torch_logs(enabled=not debug):
            return int(a.fn(a) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `splice show ... | head`: the reader left, nothing to report
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if debug:
            traceback.print_exception(e)
        console(stderr=True).print(f"error: {error_line(e, debug)}")
        return 1


def _debug() -> bool:
    return os.environ.get("SPLICE_DEBUG", "") not in ("", "0")


def error_line(e: BaseException, debug: bool = False) -> str:
    """One line for ``e``: a SpliceError's what, where and hint; an OSError's file and
    reason; anything else named as a possible bug, with how to see its traceback."""
    if isinstance(e, SpliceError):
        return f"{type(e).__name__}: {e.one_line()}"
    if isinstance(e, OSError) and e.strerror:
        where = " ".join(f"'{f}'" for f in (e.filename, e.filename2) if f is not None)
        return (
            f"{type(e).__name__}: {e.strerror}{': ' + where if where else ''}; "
            "hint: check the path and its permissions"
        )
    text = f"{type(e).__name__}: {one_line(str(e)) or '(no message)'}"
    if debug:
        return f"{text} (an unexpected error: the traceback is above)"
    return f"{text} (an unexpected error, maybe a bug: run with SPLICE_DEBUG=1 for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "error_line", "main"]
