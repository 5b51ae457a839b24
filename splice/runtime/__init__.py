"""How a Program runs on a target: compile to an artifact, load it, call it."""

from splice.runtime.artifact import Artifact, CompiledModel
from splice.runtime.compile import compile, load

__all__ = ["Artifact", "CompiledModel", "compile", "load"]
