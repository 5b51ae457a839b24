"""What a model *is* inside splice: Program, capture, text form, verifier, rewriter."""

from splice.ir import ops  # registers the splice dialect
from splice.ir.capture import capture
from splice.ir.meta import (
    Loc,
    ScalarSpec,
    SymbolInfo,
    TensorSpec,
    TupleSpec,
    get_spec,
    loc,
    set_loc,
    set_spec,
    spec,
)
from splice.ir.onnx_import import import_onnx
from splice.ir.parser import parse_ir
from splice.ir.printer import print_ir
from splice.ir.program import Program, compose
from splice.ir.rewriter import Rewriter
from splice.ir.serialize import load, save
from splice.ir.verify import verify

__all__ = [
    "Loc",
    "Program",
    "Rewriter",
    "ScalarSpec",
    "SymbolInfo",
    "TensorSpec",
    "TupleSpec",
    "capture",
    "compose",
    "get_spec",
    "import_onnx",
    "load",
    "loc",
    "ops",
    "parse_ir",
    "print_ir",
    "save",
    "set_loc",
    "set_spec",
    "spec",
    "verify",
]
