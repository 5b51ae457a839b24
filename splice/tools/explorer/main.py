"""The Model Explorer adapter (the module Model Explorer imports for ``--extensions``).

Model Explorer loads an extension named ``X`` by importing ``X.main``, so splice's adapter
lives here and is loaded with ``--extensions=splice.tools.explorer``::

    model-explorer --extensions=splice.tools.explorer path/to/program.splice

(``splice view`` does this for you.) :class:`SpliceAdapter` opens what
:func:`splice.tools.explorer.open_path` opens: a saved program folder, a ``--dump-dir``
folder or an artifact. A view is cached by path and modification time, so reloading the
page does not convert the program again. :class:`SpliceOverlays` is a node data provider
("splice overlays" in Model Explorer's menu) that gives any overlay of an input the adapter
opened, for the graph on screen.
"""

from __future__ import annotations

import os
from typing import Any

from model_explorer import (
    Adapter,
    AdapterMetadata,
    GetConfigEditorsResult,
    ModelExplorerGraphs,
    NodeDataProvider,
    NodeDataProviderFilter,
    NodeDataProviderMetadata,
    NodeDataProviderResult,
)
from model_explorer import config_editor as ce

from splice.tools.explorer import overlays as O
from splice.tools.explorer.inputs import View, open_path

ADAPTER_ID = "splice"
OVERLAYS_ID = "splice_overlays"

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
        return {"graphs": cached_view(_folder(model_path)).graphs}


def _folder(path: str) -> str:
    """``path``, or the folder of an ``.ir`` file in it (a dump or a program folder)."""
    return os.path.dirname(path) if os.path.isfile(path) and path.endswith(".ir") else path


class SpliceOverlays(NodeDataProvider):
    """One overlay of an input opened by :class:`SpliceAdapter`, as node data of a graph."""

    metadata = NodeDataProviderMetadata(
        id=OVERLAYS_ID,
        name="splice overlays",
        description="FLOPs, bytes, lowrank ranks and errors, experts coverage, numeric "
        "errors and compiled-part checks that splice computed, per node",
        icon="insights",
        filter=NodeDataProviderFilter(adapterIds=[ADAPTER_ID]),
    )

    def __init__(self) -> None:
        super().__init__()

    def get_config_editors(self, provider_id: str) -> GetConfigEditorsResult:
        """One drop-down: which overlay."""
        options = [ce.OptionItem(value=name, label=name) for name in O.OVERLAYS]
        editor = ce.DropDownConfigEditor(
            id="overlay", label="overlay", options=options, defaultValue=O.FLOPS
        )
        return GetConfigEditorsResult(configEditors=[editor])

    def run(
        self,
        provider_id: str,
        model_path: str,
        graph_id: str,
        config_values: dict[str, Any],
        graph: Any,
    ) -> NodeDataProviderResult:
        """The chosen overlay's values on ``graph_id`` (an error result when the input has
        none for that graph, e.g. lowrank errors of a program that was never lowranked)."""
        name = str(config_values.get("overlay") or O.FLOPS)
        values = cached_view(_folder(model_path)).overlays.get(name, {}).get(graph_id)
        if not values:
            return NodeDataProviderResult(error=f"no {name} values on graph {graph_id}")
        data = O.node_data({graph_id: values}, name).graphsData[graph_id]
        return NodeDataProviderResult(result=data)


__all__ = [
    "ADAPTER_ID",
    "OVERLAYS_ID",
    "SpliceAdapter",
    "SpliceOverlays",
    "cached_view",
    "remember",
]
