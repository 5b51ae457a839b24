"""splice's import structure: no cycles, dependencies point down, no private names across files.

Every ``import`` statement in ``splice/`` is parsed (module level, inside functions, under
``if TYPE_CHECKING:`` alike) and resolved to a splice module; the test fails on

* a **cycle** among splice's modules;
* an **upward import**: each module has a layer (:data:`LAYERS`) and may import modules of
  its own layer or of a lower one only;
* a **private import**: ``from splice.x import _name`` in another file (``_name`` a function,
  class or constant of ``splice.x``; modules named ``_x`` are package-private and may be
  imported from anywhere in splice).

The layers, lowest first (the direction of ``DESIGN.md``: tools -> runtime -> passes -> ir,
with target and errors below all)::

    base     splice.errors, splice.target, splice.version, splice._quiet
    ir       splice.ir.*          what a model is
    passes   splice.passes.*      what can be done to a Program
    runtime  splice.runtime.*     how a Program runs on a target
    face     splice               the package's public face (splice/__init__.py)
    models   splice.models, splice.models_dynamic, splice.zoo
    tools    splice.tools.*       how a person looks inside

The model libraries (``models``, ``models_dynamic``, ``zoo``) are example programs, not
compiler: what a user brings. They sit above the compiler (they may use its public face,
as a user's model code does) and below the tools (``splice demo`` runs them); no part of the
compiler may depend on them.

An import inside a function is an edge like any other: a function-level import is fine
only where a module-level one would be (third-party backends such as tvm, triton or onnx
are not splice modules and are not checked). Implicit imports of parent packages (running
``splice/__init__.py`` before ``splice.ir.meta``) are not edges.

:data:`KNOWN_TO_FIX` lists the edges, in files other engineers are changing, that still
break these rules; it is to be emptied, and an entry that no longer occurs is an error.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "splice"

#: Edges that still break the rules, each ``(importer, imported, name)``: ``name`` is the
#: private name for a private import, ``""`` for an upward or cyclic module edge. To be emptied.
KNOWN_TO_FIX: set[tuple[str, str, str]] = set()

#: layer name -> rank; a module may import modules of its own rank or lower
RANKS = {"base": 0, "ir": 1, "passes": 2, "runtime": 3, "face": 4, "models": 5, "tools": 6}

#: module (or package prefix, ending in ".") -> layer; the longest match wins
LAYERS = {
    "splice.errors": "base",
    "splice.target": "base",
    "splice.version": "base",
    "splice._quiet": "base",
    "splice.ir.": "ir",
    "splice.passes.": "passes",
    "splice.runtime.": "runtime",
    "splice": "face",
    "splice.models": "models",
    "splice.models_dynamic": "models",
    "splice.zoo": "models",
    "splice.tools.": "tools",
}


@dataclass(frozen=True)
class Edge:
    """One import of ``imported`` by ``importer`` at ``file:line`` (``name``: what it imports
    when that is a name, not a module)."""

    importer: str
    imported: str
    name: str
    file: str
    line: int

    def __str__(self) -> str:
        what = f"{self.imported}.{self.name}" if self.name else self.imported
        return f"{self.file}:{self.line}: {self.importer} imports {what}"


def modules() -> dict[str, Path]:
    """Every module of the splice package, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> str | None:
    """The layer of ``module`` (longest matching entry of :data:`LAYERS`), or None."""
    best: tuple[int, str] | None = None
    for key, layer in LAYERS.items():
        match = module == key[:-1] or module.startswith(key) if key.endswith(".") else module == key
        if match and (best is None or len(key) > best[0]):
            best = (len(key), layer)
    return best[1] if best else None


def _package_of(module: str, mods: dict[str, Path]) -> list[str]:
    is_package = mods[module].name == "__init__.py"
    parts = module.split(".")
    return parts if is_package else parts[:-1]


def edges() -> list[Edge]:
    """Every import of a splice module by a splice module, resolved."""
    mods = modules()
    out = []
    for module, path in mods.items():
        file = str(path.relative_to(ROOT.parent))
        for node in ast.walk(ast.parse(path.read_text(), filename=file)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        out.append(Edge(module, alias.name, "", file, node.lineno))
                    elif alias.name.split(".")[0] == "splice":
                        raise AssertionError(f"{file}:{node.lineno}: no module {alias.name}")
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                package = _package_of(module, mods)
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            if base.split(".")[0] != "splice":
                continue
            if base not in mods:
                raise AssertionError(f"{file}:{node.lineno}: no module {base}")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in mods:  # `from splice.ir import meta`: the module splice.ir.meta
                    out.append(Edge(module, sub, "", file, node.lineno))
                else:
                    out.append(Edge(module, base, alias.name, file, node.lineno))
    return out


def _known(e: Edge) -> bool:
    return (e.importer, e.imported, e.name) in KNOWN_TO_FIX or (
        (e.importer, e.imported, "") in KNOWN_TO_FIX
    )


def upward_imports(all_edges: list[Edge]) -> list[Edge]:
    """Edges from a module to a module of a higher layer."""
    bad = []
    for e in all_edges:
        if e.importer == e.imported:
            continue
        if RANKS[layer_of(e.imported)] > RANKS[layer_of(e.importer)]:  # type: ignore[index]
            bad.append(e)
    return bad


def private_imports(all_edges: list[Edge]) -> list[Edge]:
    """Edges that import an underscore-private name of another module."""
    return [
        e
        for e in all_edges
        if e.name.startswith("_") and not e.name.startswith("__") and e.importer != e.imported
    ]


def cycles(all_edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle through each module that is on a cycle, as the edges along it
    (every import statement of each step), without repeating a cycle."""
    graph: dict[str, set[str]] = {}
    for e in all_edges:
        if e.importer != e.imported:
            graph.setdefault(e.importer, set()).add(e.imported)
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(graph):
        path = _shortest_path_back(graph, start)
        if path is not None and frozenset(path) not in seen:
            seen.add(frozenset(path))
            found.append(path)
    out = []
    for path in found:
        steps = list(zip(path, path[1:] + path[:1]))
        out.append([e for a, b in steps for e in all_edges if (e.importer, e.imported) == (a, b)])
    return out


def _on_cycle(edge: Edge, all_edges: list[Edge]) -> bool:
    """Whether ``edge.importer`` can be reached back from ``edge.imported``."""
    graph: dict[str, set[str]] = {}
    for e in all_edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    seen, todo = {edge.imported}, [edge.imported]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w == edge.importer:
                return edge.importer != edge.imported
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def _shortest_path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The modules of a shortest cycle start -> ... -> start (breadth first), or None."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def _steps(cycle: list[Edge]) -> list[Edge]:
    """The first edge of each step of a cycle."""
    out: list[Edge] = []
    for e in cycle:
        if not out or (out[-1].importer, out[-1].imported) != (e.importer, e.imported):
            out.append(e)
    return out


def _listing(title: str, bad: list[Edge]) -> str:
    """``title`` and one line per import statement (names of one statement joined)."""
    lines: dict[tuple[str, int, str, str], list[str]] = {}
    for e in bad:
        lines.setdefault((e.file, e.line, e.importer, e.imported), []).append(e.name)
    out = [title]
    for (file, line, importer, imported), names in lines.items():
        what = f"{imported}.{{{', '.join(n for n in names if n)}}}" if any(names) else imported
        out.append(f"  {file}:{line}: {importer} imports {what}")
    return "\n".join(out)


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"modules with no layer (add them to LAYERS in {__file__}): {missing}"


def test_no_upward_imports() -> None:
    bad = [e for e in upward_imports(edges()) if not _known(e)]
    if bad:
        pytest.fail(
            _listing(
                "imports against the direction tools -> models -> face -> runtime -> passes -> ir -> "
                "base (move the shared piece down a layer):",
                bad,
            ),
            pytrace=False,
        )


def test_no_private_imports_across_files() -> None:
    bad = [e for e in private_imports(edges()) if not _known(e)]
    if bad:
        pytest.fail(
            _listing(
                "underscore-private names imported from another module (make them public where "
                "they are defined, or move them):",
                bad,
            ),
            pytrace=False,
        )


def test_no_import_cycles() -> None:
    kept = [e for e in edges() if not _known(e)]
    found = cycles(kept)
    if found:
        pytest.fail(
            "\n".join(
                _listing(
                    "import cycle "
                    + " -> ".join([*(e.importer for e in _steps(c)), c[0].importer])
                    + ":",
                    c,
                )
                for c in found
            ),
            pytrace=False,
        )


def test_known_to_fix_entries_still_occur() -> None:
    """An entry of KNOWN_TO_FIX that no longer occurs is removed from the list."""
    all_edges = edges()
    bad_modules = {(e.importer, e.imported) for e in upward_imports(all_edges)} | {
        (e.importer, e.imported) for e in all_edges if _on_cycle(e, all_edges)
    }
    private = {(e.importer, e.imported, e.name) for e in private_imports(all_edges)}
    stale = sorted(
        k
        for k in KNOWN_TO_FIX
        if (k[2] and k not in private) or (not k[2] and k[:2] not in bad_modules)
    )
    assert not stale, f"fixed: remove these entries from KNOWN_TO_FIX in {__file__}: {stale}"


def test_the_checks_see_what_they_should() -> None:
    """The resolver and checks on a few known facts, so that a broken parser cannot pass."""
    all_edges = edges()
    assert any(
        e.importer == "splice.ir.capture" and e.imported == "splice.errors" for e in all_edges
    )
    assert layer_of("splice.ir.capture") == "ir" and layer_of("splice") == "face"
    assert layer_of("splice.passes") == "passes" and layer_of("splice.tools.cli") == "tools"
    up = Edge("splice.ir.x", "splice.passes.base", "", "f.py", 1)
    assert upward_imports([up]) == [up]
    private = Edge("splice.ir.a", "splice.ir.b", "_hidden", "f.py", 1)
    assert private_imports([private]) == [private]
    loop = [
        Edge("splice.ir.a", "splice.ir.b", "", "a.py", 1),
        Edge("splice.ir.b", "splice.ir.a", "", "b.py", 2),
    ]
    assert cycles(loop) == [loop]
