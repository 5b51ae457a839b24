"""The pass-by-pass HTML report (``splice view IN --html OUT``).

:func:`write_report` writes ONE self-contained HTML file (inline CSS and script, no fonts,
images or scripts from anywhere; it opens offline) for

* a **dump folder** (``splice opt --dump-dir D``; :class:`~splice.passes.instruments.DumpIR`
  writes ``dump.json`` beside the ``.ir`` files): the pipeline, a summary table, then per
  pass a collapsible section with its time, what it changed (node counts by op, before →
  after), its stats (records such as ``lowrank``'s per-layer ``layers`` as tables), its
  numeric check (``--numeric-check``) and the unified diff of its input and output IR text;
  a failed pass is named at the top;
* a **saved program folder** (``splice capture/opt -o``): one section with the program's
  signature, node counts by op, the cost model's summary (FLOPs, bytes, params by module)
  and its IR text.

All text taken from the input is escaped. Missing or damaged input raises
:class:`~splice.errors.ArtifactError` (the folder, the file and what is wrong with it); an
output path that cannot be written raises :class:`~splice.errors.SpliceError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.errors import ArtifactError, SpliceError
from splice.passes.instruments import DUMP_INDEX
from splice.tools import report_html as H

DUMP_VERSION = 1
PROGRAM_FORMAT = "splice.program/1"
MAX_DIFF_LINES = 20_000  # per pass; the rest is left out with a note
WHAT_OPENS = "a --dump-dir folder of `splice opt` or a saved program folder (splice capture/opt -o)"
_REDO = "rerun `splice opt IN -p PIPELINE --dump-dir D` (add --numeric-check for errors)"


@dataclass(frozen=True)
class DumpPass:
    """One pass of ``dump.json`` (see :class:`~splice.passes.instruments.DumpIR`)."""

    index: int
    name: str
    text: str  # the pass with its options, as in the pipeline
    file: str | None
    changed: bool
    seconds: float
    stats: dict[str, Any]
    numeric: dict[str, Any] | None
    ops: dict[str, int] | None


@dataclass(frozen=True)
class Dump:
    """A dump folder, checked: every file it names exists and is text."""

    root: Path
    pipeline: str
    input_file: str
    input_ops: dict[str, int] | None
    passes: list[DumpPass]
    failed: dict[str, Any] | None

    def text(self, file: str) -> str:
        """The IR text of one of its files (ArtifactError if unreadable)."""
        return _read_text(self.root, file)


def write_report(in_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the HTML report of ``in_path`` (a dump folder or a saved program folder) to
    ``out_path`` (replaced atomically) and return ``out_path`` as a Path."""
    out = Path(out_path)
    if out.is_dir():
        raise SpliceError(f"--html {out}: that is a folder", hint="name a file, e.g. report.html")
    if not out.resolve().parent.is_dir():
        raise SpliceError(
            f"--html {out}: the folder {out.resolve().parent} does not exist",
            hint="create it first",
        )
    text = render_report(in_path)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SpliceError(
            f"--html {out}: cannot write it ({e.strerror})", hint="choose a writable path"
        ) from None
    return out


def render_report(in_path: str | os.PathLike[str]) -> str:
    """The report's HTML text (what :func:`write_report` writes)."""
    root = Path(in_path)
    if not root.exists():
        raise ArtifactError(f"{root} does not exist", hint=f"name {WHAT_OPENS}")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file, not a folder", hint=f"name {WHAT_OPENS}")
    if (root / DUMP_INDEX).is_file():
        return _dump_page(read_dump(root))
    if (root / "manifest.json").is_file():
        return _program_page(root)
    if any(root.glob("[0-9][0-9][0-9]_*.ir")):
        raise ArtifactError(
            f"{root} has IR dumps but no {DUMP_INDEX} (written by an older splice)",
            hint=_REDO,
        )
    raise ArtifactError(f"{root} is neither a dump folder nor a saved program", hint=WHAT_OPENS)


# -- reading a dump folder -------------------------------------------------------------


def read_dump(root: str | os.PathLike[str]) -> Dump:
    """Read and check ``root/dump.json``: its version, the fields of every pass, and that
    every file it names is a plain name in ``root`` (no paths) that exists."""
    root = Path(root)
    where = str(root / DUMP_INDEX)
    try:
        data = json.loads((root / DUMP_INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {DUMP_INDEX}", hint=_REDO) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(
            f"{DUMP_INDEX} is not valid JSON: {e}", where=where, hint=_REDO
        ) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{DUMP_INDEX} is not a JSON object", where=where, hint=_REDO)
    if data.get("version") != DUMP_VERSION:
        raise ArtifactError(
            f"{DUMP_INDEX} has version {data.get('version')!r}; this splice reads version "
            f"{DUMP_VERSION}",
            where=where,
            hint=_REDO,
        )
    pipeline = _field(data, "pipeline", str, where)
    input_file = _file_name(_field(data, "input", str, where), root, where)
    passes_raw = _field(data, "passes", list, where)
    passes = [_dump_pass(rec, i, root, where) for i, rec in enumerate(passes_raw)]
    failed = data.get("failed")
    if failed is not None and not isinstance(failed, dict):
        raise ArtifactError(f"{DUMP_INDEX}: 'failed' is not an object", where=where, hint=_REDO)
    return Dump(root, pipeline, input_file, _ops(data, "input_ops", where), passes, failed)


def _dump_pass(rec: Any, i: int, root: Path, where: str) -> DumpPass:
    at = f"{where}, passes[{i}]"
    if not isinstance(rec, dict):
        raise ArtifactError(f"{DUMP_INDEX}: passes[{i}] is not an object", where=where, hint=_REDO)
    file = rec.get("file")
    if file is not None:
        file = _file_name(_field(rec, "file", str, at), root, at)
    numeric = rec.get("numeric")
    if numeric is not None and not isinstance(numeric, dict):
        raise ArtifactError(f"{DUMP_INDEX}: 'numeric' is not an object", where=at, hint=_REDO)
    seconds = _field(rec, "seconds", (int, float), at)
    name = _field(rec, "name", str, at)
    return DumpPass(
        index=_field(rec, "index", int, at),
        name=name,
        text=rec["pass"] if isinstance(rec.get("pass"), str) else name,
        file=file,
        changed=_field(rec, "changed", bool, at),
        seconds=float(seconds),
        stats=_field(rec, "stats", dict, at),
        numeric=numeric,
        ops=_ops(rec, "ops", at),
    )


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = "missing" if key not in data else f"a {type(value).__name__}"
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(
            f"{DUMP_INDEX}: {key!r} is {what}, expected {names}", where=where, hint=_REDO
        )
    return value


def _ops(data: dict[str, Any], key: str, where: str) -> dict[str, int] | None:
    """Optional op counts (DumpIR writes them; a hand-written dump.json may not)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in value.values()
    ):
        raise ArtifactError(
            f"{DUMP_INDEX}: {key!r} is not an object of counts", where=where, hint=_REDO
        )
    return {str(k): int(v) for k, v in value.items()}


def _file_name(name: str, root: Path, where: str) -> str:
    """``name`` if it is a plain file name of an existing file in ``root``."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(
            f"{DUMP_INDEX} names the file {name!r}, which is not a plain file name in the folder",
            where=where,
            hint=_REDO,
        )
    if not (root / name).is_file():
        raise ArtifactError(
            f"{DUMP_INDEX} names {name}, which is not in {root}", where=where, hint=_REDO
        )
    return name


def _read_text(root: Path, name: str) -> str:
    try:
        return (root / name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {name}: {e}", where=str(root), hint=_REDO) from None


# -- the dump page ---------------------------------------------------------------------


def _dump_page(dump: Dump) -> str:
    parts = [
        "<h1>splice pass report</h1>",
        f"<p class=muted>dump folder <code>{H.esc(dump.root)}</code></p>",
        "<h2>pipeline</h2>",
        f'<pre class="pipeline" id="pipeline">{H.esc(dump.pipeline or "(empty)")}</pre>',
    ]
    if dump.failed is not None:
        f = dump.failed
        parts.append(
            f'<p class="error" id="failed">pass {H.esc(f.get("index", "?"))} '
            f"<b>{H.esc(f.get('pass') or f.get('name') or '?')}</b> failed: "
            f"{H.esc(f.get('error', ''))}</p>"
        )
    parts.append("<h2>passes</h2>" + _summary_table(dump) + H.toolbar())
    input_text = dump.text(dump.input_file)
    ops_body = (
        H.op_counts_html(dump.input_ops)
        if dump.input_ops is not None
        else "<p class=muted>op counts not recorded</p>"
    )
    parts.append(
        H.details(
            f"0. input <span class=muted>{H.esc(dump.input_file)}</span>",
            "<h4>nodes by op</h4>" + ops_body + H.details("IR text", H.pre(input_text), cls="ir"),
            cls="pass",
            id_="pass-0",
        )
    )
    prev_file, prev_text, prev_ops = dump.input_file, input_text, dump.input_ops
    for p in dump.passes:
        text = dump.text(p.file) if p.file is not None else None
        parts.append(_pass_section(p, prev_file, prev_text, prev_ops, text))
        if text is not None:
            prev_file, prev_text = p.file, text
        if p.ops is not None:
            prev_ops = p.ops
    return H.page(f"splice report: {dump.pipeline}", "\n".join(parts))


def _summary_table(dump: Dump) -> str:
    head = ["#", "pass", "changed", "seconds", "nodes", "numeric check"]
    rows = []
    prev = dump.input_ops
    for p in dump.passes:
        nodes = (
            f"{sum(prev.values()):,} → {sum(p.ops.values()):,}"
            if prev is not None and p.ops is not None
            else "–"
        )
        rows.append(
            "<tr>"
            + H.cell(p.index)
            + f'<td><a href="#pass-{p.index}">{H.esc(p.text)}</a></td>'
            + H.cell(p.changed)
            + H.cell(p.seconds)
            + f"<td class=num>{H.esc(nodes)}</td>"
            + f"<td>{H.esc(_numeric_line(p.numeric))}</td>"
            + "</tr>\n"
        )
        prev = p.ops if p.ops is not None else prev
    total = sum(p.seconds for p in dump.passes)
    rows.append(f"<tr><td></td><td>total</td><td></td>{H.cell(total)}<td></td><td></td></tr>\n")
    th = "".join(f"<th>{H.esc(h)}</th>" for h in head)
    return f'<table class="summary" id="summary"><thead><tr>{th}</tr></thead><tbody>\n{"".join(rows)}</tbody></table>\n'  # fmt: skip


def _numeric_line(n: dict[str, Any] | None) -> str:
    if n is None:
        return "not run"
    if "skipped" in n:
        return f"not checked ({n['skipped']})"
    if "max_abs" not in n:
        return "did not finish"
    verdict = "ok" if n.get("ok") else "DIFFERS" if n.get("semantics") == "exact" else "approximate"
    return (
        f"max abs {H.fmt(n['max_abs'])}, max rel {H.fmt(n.get('max_rel'))}, "
        f"cosine {H.fmt(n.get('cosine'))} ({verdict})"
    )


def _pass_section(
    p: DumpPass,
    prev_file: str,
    prev_text: str,
    prev_ops: dict[str, int] | None,
    text: str | None,
) -> str:
    tags = [
        '<span class="tag changed">changed</span>'
        if p.changed
        else '<span class="tag">no change</span>',
        f'<span class="tag">{H.esc(H.fmt(p.seconds))} s</span>',
    ]
    if prev_ops is not None and p.ops is not None:
        tags.append(
            f'<span class="tag">{sum(prev_ops.values()):,} → {sum(p.ops.values()):,} nodes</span>'
        )
    if p.numeric is not None:
        bad = p.numeric.get("semantics") == "exact" and p.numeric.get("ok") is False
        good = p.numeric.get("ok") is True
        klass = " bad" if bad else " good" if good else ""
        tags.append(f'<span class="tag{klass}">{H.esc(_numeric_line(p.numeric))}</span>')
    summary = f"{p.index}. <b>{H.esc(p.text)}</b> " + " ".join(tags)
    body = ["<h4>nodes by op (changed ops)</h4>"]
    if prev_ops is not None and p.ops is not None:
        body.append(H.op_changes_html(prev_ops, p.ops))
    else:
        body.append("<p class=muted>op counts not recorded</p>")
    stats = {k: v for k, v in p.stats.items() if k != "changed"}
    body.append("<h4>stats</h4>" + H.stats_html(stats))
    body.append("<h4>numeric check</h4>")
    if p.numeric is None:
        body.append("<p class=muted>not run (splice opt --numeric-check runs it)</p>")
    else:
        rows = [(k, v) for k, v in p.numeric.items() if k != "pass"]
        body.append(H.table(["measure", "value"], rows, cls="kv"))
    if text is None:
        body.append(
            "<p class=muted>IR not written (the dump kept only the passes that changed "
            "the program)</p>"
        )
    else:
        lines = H.diff_lines(prev_text, text, prev_file, p.file or "")
        added = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
        removed = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
        title = f"IR diff <span class=muted>{H.esc(prev_file)} → {H.esc(p.file)}: +{added:,} −{removed:,} lines</span>"  # fmt: skip
        diff = (
            H.diff_html(lines, max_lines=MAX_DIFF_LINES)
            if lines
            else "<p class=muted>the IR text did not change</p>"
        )
        body.append(H.details(title, diff, cls="diff"))
    return H.details(summary, "\n".join(body), open_=True, cls="pass", id_=f"pass-{p.index}")


# -- a saved program -------------------------------------------------------------------


def _program_page(root: Path) -> str:
    import splice
    from splice.ir.printer import print_ir

    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"manifest.json is not valid JSON: {e}", where=str(root)) from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != PROGRAM_FORMAT:
        raise ArtifactError(
            f"{root} is not a saved program (manifest format {fmt!r})",
            hint=f"the HTML report reads {WHAT_OPENS}; `splice view` opens compiled artifacts",
        )
    program = splice.load(root)
    parts = [
        "<h1>splice program report</h1>",
        f"<p class=muted>saved program <code>{H.esc(root)}</code></p>",
        H.toolbar(),
        H.details(
            f"<b>{H.esc(program.name)}</b>",
            _program_body(program, print_ir(program, locations=True)),
            open_=True,
            cls="program",
            id_="program-0",
        ),
    ]
    return H.page(f"splice report: {program.name}", "\n".join(parts))


def _program_body(program: Any, ir_text: str) -> str:
    from splice.passes.analysis.cost import cost_model
    from splice.passes.instruments import op_counts

    sig = [("input", n, str(s)) for n, s in zip(program.input_names, program.input_specs)]
    sig += [("output", n, str(s)) for n, s in zip(program.output_names, program.output_specs)]
    weights = program.weights
    sig.append(("weights", f"{len(weights):,}", f"{sum(w.numel() for w in weights.values()):,} elements"))  # fmt: skip
    report = cost_model(program)
    tot = report.total
    cost_rows: list[list[Any]] = [
        [path or "<root>", c.params, c.flops, c.bytes_read, c.bytes_written]
        for path, c in report.by_module(2).items()
    ]
    cost_rows.append(["total", tot.params, tot.flops, tot.bytes_read, tot.bytes_written])
    uncounted = (
        f"<p class=muted>not counted (unknown cost): {H.esc(', '.join(report.uncounted[:20]))}</p>"
        if report.uncounted
        else ""
    )
    return (
        "<h4>signature</h4>"
        + H.table(["", "name", "spec"], sig, cls="kv")
        + "<h4>nodes by op</h4>"
        + H.op_counts_html(op_counts(program))
        + "<h4>cost (by module, depth 2)</h4>"
        + H.table(["module", "params", "FLOPs", "bytes read", "bytes written"], cost_rows)
        + uncounted
        + H.details("IR text", H.pre(ir_text), cls="ir")
    )


__all__ = ["Dump", "DumpPass", "read_dump", "render_report", "write_report"]
