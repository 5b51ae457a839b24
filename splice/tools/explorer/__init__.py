"""splice in Google's Model Explorer: an adapter, graph JSON and per-node overlays.

Needs the ``explorer`` extra (``pip install 'splice[explorer]'``, which installs
``ai-edge-model-explorer``). See ``docs/explorer.md``.

* :func:`program_view` (a Program in memory) and :func:`open_path` (a saved program, a
  ``--dump-dir`` folder, an artifact) return a :class:`View`: Model Explorer graphs
  (``View.to_json()`` is the adapter's JSON) and overlays (``View.node_data()``);
* :class:`~splice.tools.explorer.main.SpliceAdapter` is the adapter Model Explorer loads
  with ``--extensions=splice.tools.explorer`` (``splice view`` starts it for you), and
  :class:`~splice.tools.explorer.main.SpliceOverlays` the node data provider that gives
  the overlays from Model Explorer's menu.
"""

from __future__ import annotations

from splice.tools.explorer.graph import namespace_of, node_label, program_graphs, subgraph_id
from splice.tools.explorer.inputs import View, open_path, program_view
from splice.tools.explorer.main import ADAPTER_ID, SpliceAdapter, SpliceOverlays
from splice.tools.explorer.overlays import OVERLAYS

__all__ = [
    "ADAPTER_ID",
    "OVERLAYS",
    "SpliceAdapter",
    "SpliceOverlays",
    "View",
    "namespace_of",
    "node_label",
    "open_path",
    "program_graphs",
    "program_view",
    "subgraph_id",
]
