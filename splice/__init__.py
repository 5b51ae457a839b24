"""splice: a compiler for the structure of neural networks.

Capture a PyTorch model into an FX-based IR (:func:`capture`), rewrite its structure with
passes (:mod:`splice.passes`), and lower it to compiled kernels (:func:`compile`, later).
"""

__version__ = "0.1.0"

from splice.errors import (
    ArtifactError,
    CaptureError,
    LoweringError,
    ParseError,
    PassError,
    PipelineError,
    SpliceError,
    VerificationError,
)
from splice.ir import Program, capture, compose, load, parse_ir, print_ir, save, verify

__all__ = [
    "ArtifactError",
    "CaptureError",
    "LoweringError",
    "ParseError",
    "PassError",
    "PipelineError",
    "Program",
    "SpliceError",
    "VerificationError",
    "__version__",
    "capture",
    "compose",
    "load",
    "parse_ir",
    "print_ir",
    "save",
    "verify",
]
