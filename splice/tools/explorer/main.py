"""The Model Explorer adapter (the module Model Explorer imports for ``--extensions``).

Model Explorer loads an extension named ``X`` by importing ``X.main``, so splice's adapter
lives here and is loaded with ``--extensions=splice.tools.explorer``::

    model-explorer --extensions=splice.tools.explorer path/to/program.splice

(``splice view`` does this for you.) The adapter opens what
:func:`splice.tools.explorer.open_path` opens: a saved program folder, a ``--dump-dir``
folder or an artifact. A view is cached by path and modification time, so reloading the
page does not convert the program again.
"""

from __future__ import annotations

import os
from typing import Any

from model_explorer import Adapter, AdapterMetadata, ModelExplorerGraphs

from splice.tools.explorer.inputs import View, open_path

ADAPTER_ID = "splice"

_cache: dict[tuple[str, float], View] = {}


def _stamp(path: str) -> float:
    """The newest modification time of ``path`` and the files directly inside it."""
    times = [os.stat(path).st_mtime]
    if os.path.isdir(path):
        times += [e.stat().st_mtime for e in os.scandir(path)]
    return max(times)


def cached_view(path: str) -> View:
    """:func:`open_path` of ``path``, cached until a file of it changes."""
    path = os.path.abspath(path)
    key = (path, _stamp(path))
    if key not in _cache:
        for old in [k for k in _cache if k[0] == path]:
            del _cache[old]
        _cache[key] = open_path(path)
    return _cache[key]


def remember(path: str, view: View) -> None:
    """Store a view already built for ``path`` (``splice view`` builds it before serving,
    to report a bad input before the server starts)."""
    path = os.path.abspath(path)
    _cache[(path, _stamp(path))] = view


class SpliceAdapter(Adapter):
    """Opens splice programs, pass dumps and artifacts in Model Explorer."""

    metadata = AdapterMetadata(
        id=ADAPTER_ID,
        name="splice adapter",
        description="splice programs (program.ir folders), --dump-dir folders (one graph "
        "per pass) and compiled artifacts; layers are module paths",
        source_repo="",
        fileExts=["splice", "ir"],
    )

    def __init__(self) -> None:
        super().__init__()

    def convert(self, model_path: str, settings: dict[str, Any]) -> ModelExplorerGraphs:
        """The graphs of ``model_path`` (a file inside a dump or program folder opens
        its folder)."""
        path = model_path
        if os.path.isfile(path) and path.endswith(".ir"):
            path = os.path.dirname(path)
        return {"graphs": cached_view(path).graphs}


__all__ = ["ADAPTER_ID", "SpliceAdapter", "cached_view", "remember"]
