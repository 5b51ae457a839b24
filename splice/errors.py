"""The one error hierarchy of splice.

Every failure a user can cause raises a :class:`SpliceError` subclass. A message says
what failed, where (node, module path, source line) and what to do about it.
"""

from __future__ import annotations

import copy
from typing import Any


class SpliceError(Exception):
    """Base class of every error splice raises on bad input.

    ``where`` names the place (node, module path, source line) and ``hint`` what to do;
    both are appended to the message so that a bare ``str(err)`` carries them.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(_compose(message, where, hint))

    def with_message(self, message: str) -> SpliceError:
        """A copy of this error with ``message`` instead (``where`` and ``hint`` kept, and
        ``str(err)`` rebuilt: assigning ``err.message`` alone would not change it)."""
        new = copy.copy(self)
        new.message = message
        new.args = (_compose(message, self.where, self.hint),)
        return new

    def one_line(self) -> str:
        """The message, where and hint on one line (what the command line prints)."""
        text = one_line(self.message)
        if self.where:
            text += f" (at {one_line(self.where)})"
        if self.hint:
            text += f"; hint: {one_line(self.hint)}"
        return text


def _compose(message: str, where: str | None, hint: str | None) -> str:
    parts = [message]
    if where:
        parts.append(f"  at: {where}")
    if hint:
        parts.append(f"  hint: {hint}")
    return "\n".join(parts)


def one_line(text: str) -> str:
    """``text`` with its lines stripped and joined by "; " (no newline left)."""
    return "; ".join(s for s in (line.strip() for line in str(text).splitlines()) if s)


class CaptureError(SpliceError):
    """A model could not be captured into a Program."""


class VerificationError(SpliceError):
    """A Program breaks an IR invariant. ``node`` is the offending node's name, if any."""

    def __init__(
        self, message: str, *, node: str | None = None, loc: Any = None, hint: str | None = None
    ):
        self.node = node
        self.loc = loc
        where = []
        if node is not None:
            where.append(f"node %{node}")
        if loc is not None and str(loc):
            where.append(str(loc))
        super().__init__(message, where=", ".join(where) or None, hint=hint)


class ParseError(SpliceError):
    """The text form of a Program could not be parsed. ``line`` is 1-based."""

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        text: str | None = None,
        hint: str | None = None,
    ):
        self.line = line
        where = None
        if line is not None:
            where = f"line {line}" + (f": {text.strip()}" if text else "")
        super().__init__(message, where=where, hint=hint)


class PipelineError(SpliceError):
    """A pipeline description names an unknown pass or a bad option."""


class PassError(SpliceError):
    """A pass failed on a Program, or broke its declared contract."""


class LoweringError(SpliceError):
    """A Program could not be lowered or compiled for a target."""


class ArtifactError(SpliceError):
    """A compiled artifact or saved program is missing, corrupt or incompatible."""


__all__ = [
    "ArtifactError",
    "CaptureError",
    "LoweringError",
    "ParseError",
    "PassError",
    "PipelineError",
    "SpliceError",
    "VerificationError",
]
