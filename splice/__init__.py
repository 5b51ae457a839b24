"""splice: a compiler for the structure of neural networks.

Capture a PyTorch model into an FX-based IR (:func:`capture`), rewrite its structure with
passes (:mod:`splice.passes`), compile it for a target (:func:`compile`) and run the
artifact (:func:`load`).
"""

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
from splice.ir import (
    Program,
    capture,
    compose,
    import_onnx,
    parse_ir,
    print_ir,
    save,
    verify,
)
from splice.ir.explore import capture_dynamic
from splice.ir.lm import GenerationError, LMPrograms, capture_lm
from splice.ir.signatures import SignatureSet
from splice.runtime import Artifact, CompiledModel, Generator, compile, export_onnx, load
from splice.version import __version__

__all__ = [
    "Artifact",
    "ArtifactError",
    "CaptureError",
    "CompiledModel",
    "GenerationError",
    "Generator",
    "LMPrograms",
    "LoweringError",
    "ParseError",
    "PassError",
    "PipelineError",
    "Program",
    "SignatureSet",
    "SpliceError",
    "VerificationError",
    "__version__",
    "capture",
    "capture_dynamic",
    "capture_lm",
    "compile",
    "compose",
    "export_onnx",
    "import_onnx",
    "load",
    "parse_ir",
    "print_ir",
    "save",
    "verify",
]
