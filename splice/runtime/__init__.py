"""How a Program runs on a target: compile to an artifact, load it, call it."""

from splice.runtime.artifact import Artifact, CompiledModel
from splice.runtime.backends.onnx import export_onnx
from splice.runtime.compile import compile, load
from splice.runtime.generate import GenerationResult, Generator

__all__ = [
    "Artifact",
    "CompiledModel",
    "GenerationResult",
    "Generator",
    "compile",
    "export_onnx",
    "load",
]
