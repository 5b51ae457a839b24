"""What the viewer opens: a saved program, a ``--dump-dir`` folder or a compiled artifact.

:func:`open_path` recognises the three and returns a :class:`View`: the Model Explorer
graphs and the overlays (:mod:`splice.tools.explorer.overlays`). :func:`program_view` is
the same for a Program in memory (what tests and notebooks use; no server, no files).

* **saved program** (``manifest.json`` with format ``splice.program/1``): loaded with
  :func:`splice.load` (checked and verified); one graph ``main`` and its sub-graphs.
* **dump folder** (``000_input.ir``, ``001_<pass>.ir``… written by
  :class:`~splice.passes.instruments.DumpIR`): one graph per file, with the file's stem as
  its id (``000_input``, ``001_lowrank``), so Model Explorer's side-by-side view compares
  a pass's input and output. The dumps hold no weights: weights are read as shapes only
  (on PyTorch's ``meta`` device). When the folder has a ``dump.json`` (the pipeline, and
  per pass its file, time, stats and numeric check), the stats and numeric errors become
  overlays of the graph after each pass.
* **artifact** (``manifest.json`` with format ``splice.artifact/1``): the program it was
  compiled from (one graph per signature for a multi-signature artifact); its split
  parts are that program's sub-graphs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from model_explorer import graph_builder as gb
from model_explorer import node_data_builder as ndb

from splice.errors import ArtifactError, SpliceError
from splice.ir import meta as M
from splice.ir.parser import parse_ir
from splice.ir.program import Program
from splice.passes.instruments import DUMP_INDEX, DUMP_INPUT
from splice.tools.explorer import overlays as O
from splice.tools.explorer.graph import GraphIndex, program_graphs

PROGRAM_FORMAT = "splice.program/1"
ARTIFACT_FORMAT = "splice.artifact/1"
_DUMP_FILE = re.compile(r"^(\d{3})_(.+)\.ir$")
_WEIGHT_LINE = re.compile(r"^weight @(\S+) : (\w+)\[([^\]]*)\] \w+", re.M)

WHAT_OPENS = (
    "a saved program folder (splice capture/opt -o), a --dump-dir folder of `splice opt`, "
    "or a compiled artifact folder (splice compile -o)"
)


@dataclass
class View:
    """What Model Explorer shows for one input: its graphs and per-node overlays.

    ``kind`` is ``program``, ``dump`` or ``artifact``; ``overlays`` maps an overlay name to
    graph id -> node id -> value (:data:`~splice.tools.explorer.overlays.Overlay`)."""

    label: str
    kind: str
    graphs: list[gb.Graph]
    overlays: dict[str, O.Overlay] = field(default_factory=dict)

    def graph(self, graph_id: str) -> gb.Graph:
        for g in self.graphs:
            if g.id == graph_id:
                return g
        raise KeyError(f"no graph {graph_id!r}; graphs: {[g.id for g in self.graphs]}")

    def to_json(self) -> dict[str, Any]:
        """The adapter's answer as JSON (``{"graphs": [...]}``, Model Explorer's format)."""
        return {"graphs": [asdict(g) for g in self.graphs]}

    def node_data(self) -> dict[str, ndb.ModelNodeData]:
        """Every overlay as Model Explorer node data (``ModelNodeData``), by name."""
        return {name: O.node_data(ov, name) for name, ov in self.overlays.items()}


def _hints(program: Program) -> dict[str, int]:
    return {n: s.hint for n, s in program.symbols.items()}


def _attach(graphs: list[gb.Graph], overlays: dict[str, O.Overlay]) -> None:
    """Each node's overlay values also become its attributes (seen without node data)."""
    by_id = {g.id: {n.id: n for n in g.nodes} for g in graphs}
    for name, ov in overlays.items():
        for gid, values in ov.items():
            for nid, v in values.items():
                node = by_id.get(gid, {}).get(nid)
                if node is not None:
                    text = str(int(v)) if float(v).is_integer() else f"{v:.6g}"
                    node.attrs.append(gb.KeyValue(key=name, value=text))


def _program_part(
    program: Program, graph_id: str, records: list[dict[str, Any]] | None = None
) -> tuple[list[gb.Graph], dict[str, O.Overlay]]:
    graphs, index = program_graphs(program, graph_id)
    ov = O.graph_overlays(index, _hints(program))
    if records:
        ov = O.merge(ov, O.stats_overlays(index, [g.id for g in graphs], records))
    return graphs, ov


def program_view(
    program: Program,
    graph_id: str = "main",
    *,
    records: list[dict[str, Any]] | None = None,
    label: str | None = None,
) -> View:
    """The view of one Program: its graph (id ``graph_id``), its sub-graphs, the cost and
    rank overlays, and the overlays of ``records`` (pass records as in ``dump.json``)."""
    graphs, ov = _program_part(program, graph_id, records)
    graphs[0].groupNodeAttributes = {"": _program_attrs(program)}
    _attach(graphs, ov)
    return View(label or program.name, "program", graphs, ov)


def _program_attrs(program: Program) -> dict[str, str]:
    """What the side panel shows with no node selected: the program's signature."""
    ins = ", ".join(f"{n}: {s}" for n, s in zip(program.input_names, program.input_specs))
    outs = ", ".join(f"{n}: {s}" for n, s in zip(program.output_names, program.output_specs))
    return {"program": program.name, "inputs": ins, "outputs": outs}


# ---------------------------------------------------------------------------------------
# opening files


def open_path(path: str | Path, *, time_parts: int = 0) -> View:
    """The view of a saved program, a dump folder or an artifact at ``path``.

    ``time_parts`` > 0 (artifacts only) runs the artifact's samples that many times to
    measure each compiled part (:func:`splice.tools.explorer.latency.time_parts`).
    Raises a :class:`~splice.errors.SpliceError` (one message: what, where, what to do)
    when ``path`` is missing, is none of the three, or is damaged."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{path} does not exist", hint=f"name {WHAT_OPENS}")
    if root.is_dir() and (root / "manifest.json").is_file():
        fmt = _manifest_format(root)
        if fmt == ARTIFACT_FORMAT:
            return _open_artifact(root, time_parts)
        if time_parts:
            raise ArtifactError(
                f"{path} is not a compiled artifact: only an artifact's parts can be timed",
                hint="leave out --time-parts, or compile it first (splice compile -o)",
            )
        if fmt == PROGRAM_FORMAT:
            return _open_program(root)
        raise ArtifactError(
            f"{root}/manifest.json has format {fmt!r}, which the viewer does not open",
            hint=f"name {WHAT_OPENS}",
        )
    if time_parts:
        raise ArtifactError(
            f"{path} is not a compiled artifact: only an artifact's parts can be timed",
            hint="leave out --time-parts, or compile it first (splice compile -o)",
        )
    if root.is_dir() and (root / DUMP_INPUT).is_file():
        return _open_dump(root)
    raise ArtifactError(
        f"{path} is not a saved splice program, a dump folder or an artifact",
        hint=f"name {WHAT_OPENS}",
    )


def _manifest_format(root: Path) -> Any:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(
            f"{root}/manifest.json cannot be read: {e}",
            hint="the folder is damaged; write it again (splice capture/opt/compile -o)",
        ) from None
    return manifest.get("format") if isinstance(manifest, dict) else None


def _open_program(root: Path) -> View:
    from splice.ir.serialize import load

    return program_view(load(root), label=root.name)


def _open_artifact(root: Path, time_parts: int = 0) -> View:
    from splice.ir.signatures import SignatureSet
    from splice.runtime.artifact import Artifact
    from splice.tools.explorer.latency import time_parts as measure

    art = Artifact(root)
    times = measure(root, time_parts) if time_parts else {}
    latency = {name: t.mean_ms for name, t in times.items() if t.calls}
    ref = art.reference()
    members = ref.members if isinstance(ref, SignatureSet) else [ref]
    parts = {p.get("name"): p for p in art.manifest.get("parts", []) if isinstance(p, dict)}
    graphs: list[gb.Graph] = []
    ov: dict[str, O.Overlay] = {}
    for i, p in enumerate(members):
        gid = "main" if len(members) == 1 else f"signature_{i}"
        g, index = program_graphs(p, gid)
        ov = O.merge(ov, O.graph_overlays(index, _hints(p)), O.part_overlays(index, parts, latency))
        _part_attrs(g, index, parts)
        g[0].groupNodeAttributes = {"": _artifact_attrs(art.manifest)}
        for name, t in times.items():  # every part, called or not, on the graph
            g[0].groupNodeAttributes[""][f"{name} latency"] = (
                f"{t.mean_ms:.4g} ms per call, {t.calls} calls over {time_parts} runs"
                if t.calls
                else f"not called by the samples ({time_parts} runs)"
            )
        graphs += g
    _attach(graphs, ov)
    return View(root.name, "artifact", graphs, ov)


def _part_attrs(graphs: list[gb.Graph], index: GraphIndex, parts: dict[str, Any]) -> None:
    """The compiled file and backend of each part, on the nodes that call it."""
    by_id = {g.id: {n.id: n for n in g.nodes} for g in graphs}
    for gid, n in index.nodes():
        part = parts.get(O.part_called(n))
        if part is None:
            continue
        node = by_id[gid][n.name]
        file = part.get("library") or part.get("model")
        for key, value in (("compiled part", file), ("part backend", part.get("backend"))):
            if value is not None:
                node.attrs.append(gb.KeyValue(key=key, value=str(value)))


def _artifact_attrs(manifest: dict[str, Any]) -> dict[str, str]:
    target = manifest.get("target") if isinstance(manifest.get("target"), dict) else {}
    attrs = {
        "program": str(manifest.get("program", "")),
        "backend": str(manifest.get("backend", "tvm")),
        "target": str(target.get("name", "")),
        "parts": str(len(manifest.get("parts", []))),
    }
    return {k: v for k, v in attrs.items() if v}


def shape_only_weights(text: str) -> dict[str, torch.Tensor]:
    """A tensor on the ``meta`` device for every ``weight`` line of a program's text (the
    dumps of DumpIR carry no weight values; the graph needs only their specs)."""
    out: dict[str, torch.Tensor] = {}
    for name, dtype, dims in _WEIGHT_LINE.findall(text):
        shape = [int(d) for d in dims.split(",") if d.strip()]
        out[name] = torch.empty(shape, dtype=M.dtype_from_name(dtype), device="meta")
    return out


def parse_dump_file(path: Path) -> Program:
    """One DumpIR file as a Program (weights as shapes only)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} cannot be read: {e}") from None
    try:
        return parse_ir(text, shape_only_weights(text))
    except SpliceError as e:
        raise e.with_message(f"{path}: {e.message}") from None
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read a weight declaration: {e}") from None


def _dump_index(root: Path) -> dict[str, Any] | None:
    f = root / DUMP_INDEX
    if not f.is_file():
        return None
    try:
        index = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(
            f"{f} is not valid JSON: {e}", hint="run the pipeline again with --dump-dir"
        ) from None
    if not isinstance(index, dict) or not isinstance(index.get("passes", []), list):
        raise ArtifactError(
            f"{f} is not a dump index (a JSON object with a 'passes' list)",
            hint="run the pipeline again with --dump-dir",
        )
    return index


def _open_dump(root: Path) -> View:
    index = _dump_index(root)
    records = [r for r in (index or {}).get("passes", []) if isinstance(r, dict)]
    by_file = {r.get("file"): r for r in records if r.get("file")}
    files = sorted(p for p in root.iterdir() if p.is_file() and _DUMP_FILE.match(p.name))
    graphs: list[gb.Graph] = []
    ov: dict[str, O.Overlay] = {}
    for f in files:
        step = int(f.name[:3])
        # the records of this pass and the ones before it (the program after them)
        done = [r for r in records if isinstance(r.get("index"), int) and r["index"] <= step]
        g, o = _program_part(parse_dump_file(f), f.stem, done)
        g[0].groupNodeAttributes = {"": _graph_attrs(f, by_file.get(f.name), index)}
        graphs += g
        ov = O.merge(ov, o)
    _attach(graphs, ov)
    return View(root.name, "dump", graphs, ov)


def _graph_attrs(
    f: Path, rec: dict[str, Any] | None, index: dict[str, Any] | None
) -> dict[str, str]:
    attrs = {"file": f.name}
    if index and isinstance(index.get("pipeline"), str):
        attrs["pipeline"] = index["pipeline"]
    if rec is not None:
        for key in ("pass", "changed", "seconds"):
            if key in rec:
                attrs[key] = str(rec[key])
        numeric = rec.get("numeric")
        if isinstance(numeric, dict):
            for key in ("max_abs", "max_rel", "cosine", "ok", "skipped"):
                if key in numeric:
                    attrs[f"numeric {key}"] = str(numeric[key])
    return attrs


__all__ = [
    "ARTIFACT_FORMAT",
    "PROGRAM_FORMAT",
    "View",
    "open_path",
    "parse_dump_file",
    "program_view",
    "shape_only_weights",
]
