"""``targets`` / ``exclude`` options: which names a pass touches.

Passes that act on named layers or weights (``lowrank``, ``experts``, ``hyper``) take two
options of the same form: ``targets`` and ``exclude``, each a ``|``-separated list of
shell-style globs (:mod:`fnmatch`, case-sensitive) over module paths or state_dict names.
A name is selected when it matches some ``targets`` glob and no ``exclude`` glob; empty
patterns are ignored, so ``targets=""`` selects nothing.
"""

from __future__ import annotations

import fnmatch


def globs(patterns: str) -> list[str]:
    """The non-empty globs of a ``|``-separated option value."""
    return [p for p in patterns.split("|") if p]


def matches(name: str, targets: str, exclude: str = "") -> bool:
    """True if ``name`` matches a glob of ``targets`` and none of ``exclude``."""
    return any(fnmatch.fnmatchcase(name, p) for p in globs(targets)) and not any(
        fnmatch.fnmatchcase(name, p) for p in globs(exclude)
    )


__all__ = ["globs", "matches"]
