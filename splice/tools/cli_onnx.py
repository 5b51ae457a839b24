"""``splice export-onnx``: a saved program (or a MODEL) as an ONNX model.

::

    splice export-onnx IN -o model.onnx [--opset N] [--external-data]

A program with several signatures writes ``model.s0.onnx``, ``model.s1.onnx``, ... (see
:func:`splice.runtime.backends.onnx.export_onnx`); docs/onnx.md describes the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splice.runtime.backends.onnx import DEFAULT_OPSET, export_onnx
from splice.tools.common import (
    check_output_file,
    console,
    int_at_least,
    load_input,
    parse_factory_args,
)


def cmd_export_onnx(a: argparse.Namespace) -> int:
    check_output_file(a.output, "-o/--output")
    loaded = load_input(a.input, parse_factory_args(a.arg))
    written = export_onnx(
        loaded.program,
        a.output,
        opset=a.opset,
        external_data=True if a.external_data else None,
    )
    paths = written if isinstance(written, list) else [written]
    con = console()
    for p in paths:
        size = sum(f.stat().st_size for f in Path(p).parent.glob(Path(p).name + "*"))
        con.print(f"wrote {p} ({size / 1e6:.1f} MB, opset {a.opset})")
    return 0


def add_command(sub: Any, model_arg: Any) -> None:
    sp = sub.add_parser("export-onnx", help="export a program as an ONNX model")
    model_arg(sp)
    sp.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    sp.add_argument(
        "--opset",
        type=int_at_least(DEFAULT_OPSET),
        default=DEFAULT_OPSET,
        help=f"ai.onnx opset (default {DEFAULT_OPSET})",
    )
    sp.add_argument(
        "--external-data",
        action="store_true",
        help="write the weights to <output>.data (always done above 2 GB)",
    )
    sp.set_defaults(fn=cmd_export_onnx)
