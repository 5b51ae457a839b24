"""What the ``splice`` commands share: loading a MODEL or a saved program, checking output
paths and numeric options before the work starts, and printing progress and tables.

:mod:`splice.tools.cli` and the command modules beside it (``cli_compile``,
``cli_generate``, ``demo``, ``stitch_table``) import these; none of them imports another
command module's helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import splice
from splice.errors import ArtifactError, CaptureError, SpliceError
from splice.ir.capture import split_inputs
from splice.ir.serialize import is_saved_program, load_samples
from splice.passes.analysis import cost_model

MODEL_HELP = (
    "MODEL is package.module:factory, a function returning (model, example_inputs), or an "
    "ONNX file (.onnx, imported with splice.import_onnx); "
    "MODEL specs import and call your code, so name only code you trust"
)


def console(stderr: bool = False):
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


def parse_factory_args(items: list[str] | None) -> dict[str, Any]:
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
    """A saved program folder (with its samples), an ONNX file (``*.onnx``, imported; one
    seeded sample, :func:`onnx_sample`) or a MODEL spec, captured (its example inputs
    become the one sample)."""
    if is_saved_program(path_or_model):
        return Loaded(splice.load(path_or_model), load_samples(path_or_model), path_or_model)
    if path_or_model.endswith(".onnx") and os.path.isfile(path_or_model):
        with status(f"importing {path_or_model}"):
            program = splice.import_onnx(path_or_model)
        return Loaded(program, [onnx_sample(program)], path_or_model)
    if os.path.exists(path_or_model):
        raise ArtifactError(
            f"{path_or_model} exists but is not a saved splice program",
            hint="create one with `splice capture MODEL -o FILE`",
        )
    model, inputs = load_model_spec(path_or_model, factory_args)
    with status(f"capturing {path_or_model}"):
        program = splice.capture(model, inputs)
    args, kwargs = split_inputs(inputs)
    sample = tuple(args) + tuple(kwargs[n] for n in program.input_names[len(args) :] if n in kwargs)
    return Loaded(program, [sample], path_or_model)


def onnx_sample(program: splice.Program) -> tuple[torch.Tensor, ...]:
    """One sample for a program imported from ONNX, which brings no example inputs:
    seeded normal values for floating inputs, zeros for integer ones (a valid index into
    any table, e.g. token ids)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for s in program.input_specs:
        shape = tuple(int(d) for d in s.shape)
        if s.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(s.dtype))
        else:
            out.append(torch.zeros(shape, dtype=s.dtype))
    return tuple(out)


@contextlib.contextmanager
def status(message: str):
    con = console(stderr=True)
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
# reporting


def progress_printer():
    con = console(stderr=True)
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


def print_pass_records(con: Any, records: list[dict[str, Any]]) -> None:
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


def fmt_int(n: int) -> str:
    """``n`` with a G/M/k suffix (two decimals) at a thousand and above."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def stats_table(program: Any, depth: int = 2, title: str | None = None):
    from rich.table import Table

    report = cost_model(program)
    t = Table(title=title or f"{program.name}: cost by module (depth {depth})", show_edge=False)
    for col in ("module", "params", "FLOPs", "bytes read", "bytes written"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for path, c in report.by_module(depth).items():
        t.add_row(
            path or "<root>",
            fmt_int(c.params),
            fmt_int(c.flops),
            fmt_int(c.bytes_read),
            fmt_int(c.bytes_written),
        )
    tot = report.total
    t.add_section()
    t.add_row(
        "total",
        fmt_int(tot.params),
        fmt_int(tot.flops),
        fmt_int(tot.bytes_read),
        fmt_int(tot.bytes_written),
    )
    return t, report


__all__ = [
    "MODEL_HELP",
    "Loaded",
    "check_dump_folder",
    "check_output_file",
    "check_output_folder",
    "console",
    "float_at_least",
    "fmt_int",
    "int_at_least",
    "load_input",
    "load_model_spec",
    "parse_factory_args",
    "print_pass_records",
    "progress_printer",
    "stats_table",
    "status",
]
