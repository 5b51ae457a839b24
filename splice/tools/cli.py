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
A MODEL spec imports your module and calls your function: name only code you trust (see
:func:`load_model_spec` for what is refused before anything runs; it is not a sandbox).

Errors print as one line on stderr (what, where, what to do) and exit with status 1; an
unexpected exception (a bug) prints one line too, and its traceback when the environment
variable SPLICE_DEBUG=1 is set.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import math
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from splice._quiet import quiet_torch_logs
from splice.errors import CaptureError, SpliceError

MODEL_HELP = (
    "MODEL is package.module:factory, a function returning (model, example_inputs); "
    "MODEL specs import and call your code, so name only code you trust"
)


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
        k, eq, v = item.partition("=")
        if not eq or not k.isidentifier():
            raise SpliceError(
                f"factory argument {item!r} is not key=value", hint="e.g. -a layers=2"
            )
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
    """``package.module:factory`` -> (model, example_inputs).

    This imports ``package.module`` and calls ``factory``: a MODEL spec runs your code, and
    this is not a sandbox (a module runs code when imported; a factory can do anything).
    What is refused before anything runs: a module of Python's standard library (no model
    factory lives there, and some modules act on import); after the import, an attribute
    that is not a Python function (``os:system``, a class, a builtin), a function defined
    in the standard library (``shutil:rmtree``), and ``-a`` arguments that the function
    does not take or whose type does not fit its default. What the factory raises becomes
    one :class:`CaptureError`.
    """
    mod_name, fn_name = _split_spec(spec)
    if _is_stdlib(mod_name):
        raise CaptureError(
            f"{spec}: {mod_name} is part of Python's standard library, not a model factory",
            hint="name your own function, e.g. mypackage.models:build (MODEL specs run it)",
        )
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise CaptureError(
            f"cannot import {mod_name!r}: {e}", hint="is the package installed and on PYTHONPATH?"
        ) from e
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        names = [
            n for n in dir(mod) if not n.startswith("_") and inspect.isfunction(getattr(mod, n))
        ]
        raise CaptureError(
            f"{mod_name} has no factory {fn_name!r}",
            hint=f"functions there: {', '.join(names[:20])}",
        )
    _check_factory(spec, fn)
    kwargs = _fit_factory_args(spec, fn, factory_args or {})
    result = _call_factory(spec, fn, kwargs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CaptureError(
            f"{spec} must return (model, example_inputs), got {type(result).__name__}"
        )
    return result


def _split_spec(spec: str) -> tuple[str, str]:
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name or not fn_name.isidentifier():
        raise CaptureError(
            f"{spec!r} is neither a saved program folder nor a MODEL",
            hint="name a model as package.module:factory, e.g. splice.models:gpt2",
        )
    return mod_name, fn_name


def _is_stdlib(module: str) -> bool:
    """Whether ``module`` belongs to Python's standard library, found without importing it
    (a user's own ``test.py`` or ``code.py`` that shadows a stdlib name is not refused)."""
    import importlib.util
    import sysconfig

    top = module.split(".", 1)[0]
    if top not in sys.stdlib_module_names and top not in sys.builtin_module_names:
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return True
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return True
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return stdlib in Path(spec.origin).resolve().parents


def _check_factory(spec: str, fn: Any) -> None:
    """Refuse what cannot be a model factory before calling it (see load_model_spec)."""
    target = inspect.unwrap(fn)
    if not inspect.isfunction(target):
        kind = "a class" if inspect.isclass(target) else f"a {type(target).__name__}"
        raise CaptureError(
            f"{spec} is {kind}, not a Python function returning (model, example_inputs)",
            hint="MODEL names a factory function defined in your own module",
        )
    module = getattr(target, "__module__", None) or ""
    if _is_stdlib(module):
        raise CaptureError(
            f"{spec} is {module}.{target.__qualname__} from Python's standard library, "
            "not a model factory",
            hint="name your own function, e.g. mypackage.models:build (MODEL specs run it)",
        )


_SCALAR_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


def _expected_type(param: inspect.Parameter) -> type | None:
    if param.default is not inspect.Parameter.empty and param.default is not None:
        t = type(param.default)
        return t if t in (int, float, bool, str) else None
    ann = param.annotation
    if isinstance(ann, str):
        return _SCALAR_TYPES.get(ann)
    return ann if ann in (int, float, bool, str) else None


def _fit_factory_args(spec: str, fn: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` checked against ``fn``'s signature and converted to its defaults' types."""
    sig = inspect.signature(fn)
    takes = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    try:
        sig.bind(**args)
    except TypeError as e:
        raise CaptureError(
            f"-a arguments do not fit {spec}: {e}",
            hint=f"its arguments: {', '.join(takes) or 'none'}",
        ) from None
    out = dict(args)
    for name, value in args.items():
        param = sig.parameters.get(name)
        want = _expected_type(param) if param is not None else None
        if want is not None:
            out[name] = _convert_arg(spec, name, value, want, param)
    return out


def _convert_arg(spec: str, name: str, value: Any, want: type, param: inspect.Parameter) -> Any:
    if want is str:
        return str(value)
    if want is bool and str(value).lower() in ("1", "true", "yes", "0", "false", "no"):
        return str(value).lower() in ("1", "true", "yes")
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, int):
        return value
    default = "" if param.default is inspect.Parameter.empty else f" (default {param.default!r})"
    raise CaptureError(
        f"-a {name}={value}: {spec} takes {want.__name__} for {name!r}{default}",
        hint=f"pass e.g. -a {name}={param.default if default else '...'}",
    )


def _call_factory(spec: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(**kwargs)
    except SpliceError:
        raise
    except Exception as e:
        raise CaptureError(
            f"{spec} raised {type(e).__name__}: {e}",
            where=_frame_in(e, inspect.unwrap(fn)),
            hint="check the -a arguments, or fix the factory (SPLICE_DEBUG=1 prints the traceback)",
        ) from e


def _frame_in(e: BaseException, fn: Any) -> str | None:
    """``file:line`` of the deepest frame of ``e`` in ``fn``'s source file (else the deepest)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return None
    code = getattr(fn, "__code__", None)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    f = (mine or frames)[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


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
# checking options before the work starts


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: str, option: str, create: bool) -> None:
    parent = Path(path).resolve().parent
    found = _nearest_existing(parent) if create else parent
    if not found.exists():
        raise SpliceError(
            f"{option} {path}: the folder {parent} does not exist", hint="create it first"
        )
    if not found.is_dir():
        raise SpliceError(
            f"{option} {path}: {found} is a file, not a folder", hint="choose another path"
        )
    try:  # the one reliable test of writability (root, read-only mounts, /proc)
        os.rmdir(tempfile.mkdtemp(prefix=".splice-probe-", dir=found))
    except OSError as e:
        raise SpliceError(
            f"{option} {path}: cannot write into {found} ({e.strerror})",
            hint="choose a path in a folder you can write to",
        ) from None


def check_output_folder(path: str, option: str = "-o") -> None:
    """A folder splice will write (created with its parents): not the current folder or
    one above it, and inside a writable folder. Whether an existing ``path`` may be
    replaced is decided by the writer (splice programs and artifacts only, or --force)."""
    p = Path(path)
    resolved, cwd = p.resolve(), Path.cwd().resolve()
    if p.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise SpliceError(
            f"{option} {path}: that is the current folder or a folder above it",
            hint=f"name a new folder, e.g. {option} out.splice",
        )
    _check_parent(path, option, create=True)


def check_output_file(path: str, option: str) -> None:
    """A file splice will write: its folder exists and ``path`` is not a folder."""
    if Path(path).is_dir():
        raise SpliceError(f"{option} {path}: that is a folder", hint="name a file in it")
    _check_parent(path, option, create=False)


def check_dump_folder(path: str, option: str) -> None:
    """A folder splice writes files into (--dump-dir, --crash-dir): not a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise SpliceError(
            f"{option} {path}: that is a file, not a folder", hint="name a folder to write into"
        )
    _check_parent(path, option, create=True)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_at_least(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= ``low``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}, got {text}")
        return value

    parse.__name__ = f"number >= {low:g}"
    return parse


# ---------------------------------------------------------------------------------------
# commands


def cmd_capture(a: argparse.Namespace) -> int:
    from splice.ir.serialize import save

    check_output_folder(a.output)
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
    if a.output:
        check_output_folder(a.output)
    for option, folder in (("--dump-dir", a.dump_dir), ("--crash-dir", a.crash_dir)):
        if folder:
            check_dump_folder(folder, option)
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
    from splice.ir.outputs import format_structure
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
        sys.stdout.write(format_structure(m))
        sys.stdout.write(print_ir(art.reference(), locations=a.locations))
        return 0
    program = load_input(a.input, _parse_factory_args(a.arg)).program
    # the output structure as comment lines: the text stays a program the parser reads
    structure = format_structure(getattr(program, "attrs", {}))
    sys.stdout.write("".join(f"# {line}\n" for line in structure.splitlines()))
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 1, like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message}; see `{self.prog} --help`\n")
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    from splice import __version__

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

    from splice.tools.cli_compile import add_commands

    add_commands(sub, model_arg)

    from splice.tools.cli_generate import add_command as add_generate

    add_generate(sub, model_arg)

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
        _console(stderr=True).print(f"error: {error_line(e, debug)}")
        return 1


def _debug() -> bool:
    return os.environ.get("SPLICE_DEBUG", "") not in ("", "0")


def error_line(e: BaseException, debug: bool = False) -> str:
    """One line for ``e``: a SpliceError's what, where and hint; an OSError's file and
    reason; anything else named as a possible bug, with how to see its traceback."""
    from splice.errors import one_line

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


__all__ = [
    "build_parser",
    "check_dump_folder",
    "check_output_file",
    "check_output_folder",
    "error_line",
    "float_at_least",
    "int_at_least",
    "load_input",
    "load_model_spec",
    "main",
    "stats_table",
]
