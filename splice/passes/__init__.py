"""What can be done to a Program: the pass contract, registry, pipelines and instruments."""

from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.instruments import (
    CrashReproducer,
    DumpIR,
    Instrument,
    NumericCheck,
    PrintIR,
    Timing,
    VerifyEach,
)
from splice.passes.manager import PassManager, Pipeline, parse_pipeline
from splice.passes.pipeline import describe_passes, make_pass
from splice.passes.registry import available_passes, get_pass_class, register_pass

__all__ = [
    "CrashReproducer",
    "DumpIR",
    "Instrument",
    "NumericCheck",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Pipeline",
    "PrintIR",
    "Timing",
    "VerifyEach",
    "available_passes",
    "describe_passes",
    "get_pass_class",
    "make_pass",
    "parse_pipeline",
    "register_pass",
]
