"""HTML pieces of the pass report (:mod:`splice.tools.report`): escaping, tables, diffs, page.

Every function returns HTML text in which all data is escaped (``esc``), so a module
path, a remark or an IR line holding ``<``, ``&`` or quotes shows as written. The page
is self-contained: its CSS and its small script are inline, it loads nothing.
"""

from __future__ import annotations

import difflib
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A table cell's text: floats to 4 significant digits, ints with thin separators."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


_SIGNED = re.compile(r"[+-]?[\d,]+")
MAX_CELL = 100  # characters of a table cell shown; the rest is in its tooltip


def cell(value: Any, tag: str = "td") -> str:
    """One escaped table cell; numbers are right-aligned (class ``num``). A list or dict
    prints on one line (``_flat``); past ``MAX_CELL`` characters it is cut, and the whole
    text is the cell's tooltip."""
    flat = _flat(value)
    num = (isinstance(flat, (int, float)) and not isinstance(flat, bool)) or (
        isinstance(flat, str) and _SIGNED.fullmatch(flat) is not None
    )
    text = fmt(flat)
    title = ""
    if len(text) > MAX_CELL:
        title = f' title="{esc(text)}"'
        text = text[: MAX_CELL - 1] + "…"
    return f"<{tag}{' class=num' if num else ''}{title}>{esc(text)}</{tag}>"


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "", caption: str = ""
) -> str:
    """A table of escaped cells (:func:`cell`), in a box that scrolls sideways when wide."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>\n" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    klass = f' class="{esc(cls)}"' if cls else ""
    return (
        f'<div class="scroll"><table{klass}>{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}</tbody></table></div>\n"
    )


def _flat(value: Any) -> Any:
    """A nested value as one line of text (lists joined by commas, dicts as k=v; an empty
    one as ``none``); anything else as it is."""
    if isinstance(value, (Mapping, list, tuple)) and not value:
        return "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={fmt(_flat(v))}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(_flat(v)) for v in value)
    return value


def stats_html(stats: Mapping[str, Any]) -> str:
    """A pass's stats: scalars (and short lists) in one key/value table, each list of
    records (``lowrank``'s ``layers``) as a table of its own with the union of their keys
    as columns, ``remarks`` as a list, nested dicts recursively."""
    scalars: list[tuple[str, Any]] = []
    blocks: list[str] = []
    for key, value in stats.items():
        if key == "remarks" and isinstance(value, list):
            items = "".join(f"<li>{esc(r)}</li>" for r in value)
            blocks.append(f"<h4>remarks</h4><ul class=remarks>{items}</ul>")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            columns: list[str] = []
            for rec in value:
                columns += [str(k) for k in rec if str(k) not in columns]
            rows = [[rec.get(c) for c in columns] for rec in value]
            blocks.append(
                f"<h4>{esc(key)} ({len(value)})</h4>" + table(columns, rows, cls="records")
            )
        elif isinstance(value, Mapping) and value:
            blocks.append(f'<h4>{esc(key)}</h4><div class="nested">{stats_html(value)}</div>')
        else:
            scalars.append((key, value))
    head = table(["stat", "value"], scalars, cls="kv") if scalars else ""
    return head + "".join(blocks) if head or blocks else "<p class=muted>no stats</p>"


def op_changes_html(before: Mapping[str, int], after: Mapping[str, int]) -> str:
    """The ops whose node count changed, before → after, and the totals."""
    ops = sorted(set(before) | set(after))
    rows = [
        [op, before.get(op, 0), after.get(op, 0), _signed(after.get(op, 0) - before.get(op, 0))]
        for op in ops
        if before.get(op, 0) != after.get(op, 0)
    ]
    tb, ta = sum(before.values()), sum(after.values())
    rows.append(["all ops", tb, ta, _signed(ta - tb)])
    return table(["op", "before", "after", "change"], rows, cls="ops")


def _signed(n: int) -> str:
    return f"+{n:,}" if n > 0 else f"{n:,}" if n < 0 else "0"


def op_counts_html(counts: Mapping[str, int]) -> str:
    """Node counts by op, most frequent first, and the total."""
    rows: list[list[Any]] = [
        [op, n] for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    rows.append(["all ops", sum(counts.values())])
    return table(["op", "nodes"], rows, cls="ops")


def diff_lines(before: str, after: str, a: str, b: str) -> list[str]:
    """The unified diff (3 lines of context) of two IR texts, without line ends."""
    return list(
        difflib.unified_diff(before.splitlines(), after.splitlines(), a, b, n=3, lineterm="")
    )


def diff_html(lines: Sequence[str], *, max_lines: int) -> str:
    """A unified diff as a ``<pre>``, one span per line coloured by kind; beyond
    ``max_lines`` lines the rest is left out with a note saying how many."""
    out = []
    for line in lines[:max_lines]:
        kind = (
            "hunk"
            if line.startswith("@@")
            else "file"
            if line.startswith(("---", "+++"))
            else "add"
            if line.startswith("+")
            else "del"
            if line.startswith("-")
            else "ctx"
        )
        out.append(f'<span class="{kind}">{esc(line)}</span>')
    more = ""
    if len(lines) > max_lines:
        more = f'<p class=muted>{len(lines) - max_lines:,} more diff lines left out (of {len(lines):,}); diff the .ir files for all of it.</p>'  # fmt: skip
    return '<pre class="diff">' + "\n".join(out) + "</pre>" + more


def pre(text: str, cls: str = "ir") -> str:
    return f'<pre class="{esc(cls)}">{esc(text)}</pre>'


def details(summary: str, body: str, *, open_: bool = False, cls: str = "", id_: str = "") -> str:
    """A collapsible block; ``summary`` is HTML (escape its data first)."""
    attrs = (f' class="{esc(cls)}"' if cls else "") + (f' id="{esc(id_)}"' if id_ else "")
    return f"<details{attrs}{' open' if open_ else ''}><summary>{summary}</summary>\n{body}</details>\n"  # fmt: skip


_CSS = """
:root { --fg:#1d2330; --muted:#6b7280; --line:#d9dde5; --bg:#fff; --head:#f3f5f9;
  --add:#e6f6ea; --addfg:#135f2b; --del:#fdecec; --delfg:#8c1d1d; --hunk:#eef2fb; --bad:#b42318;
  --good:#1e7b34; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); margin: 0 auto; padding: 1.5rem 2rem 4rem; max-width: 1200px; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; } h2 { font-size: 1.15rem; margin: 1.5rem 0 .5rem; }
h4 { margin: .9rem 0 .3rem; font-size: .95rem; }
code, pre, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12.5px; }
.muted { color: var(--muted); }
.pipeline { background: var(--head); border: 1px solid var(--line); border-radius: 6px;
  padding: .5rem .75rem; overflow-x: auto; }
table { border-collapse: collapse; margin: .4rem 0 .8rem; }
div.scroll { overflow-x: auto; max-width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: .2rem .6rem; text-align: left;
  vertical-align: top; }
th { background: var(--head); font-weight: 600; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.records td, table.records th { font-size: 12.5px; white-space: nowrap; }
details { border: 1px solid var(--line); border-radius: 6px; margin: .6rem 0; background: var(--bg); }
details > summary { cursor: pointer; padding: .45rem .75rem; background: var(--head);
  border-radius: 6px; list-style-position: inside; }
details[open] > summary { border-bottom: 1px solid var(--line); border-radius: 6px 6px 0 0; }
details > :not(summary) { margin-left: .75rem; margin-right: .75rem; }
details details { margin-right: .75rem; }
.tag { display: inline-block; padding: 0 .4rem; border-radius: 4px; font-size: 12px;
  border: 1px solid var(--line); margin-left: .3rem; }
.tag.changed { background: #fff4d6; } .tag.bad { color: var(--bad); border-color: var(--bad); }
.tag.good { color: var(--good); border-color: var(--good); }
pre { white-space: pre; overflow-x: auto; max-height: 70vh; padding: .5rem; margin: .4rem 0 .8rem;
  background: #fafbfc; border: 1px solid var(--line); border-radius: 4px; }
pre.diff span { display: block; } pre.diff .add { background: var(--add); color: var(--addfg); }
pre.diff .del { background: var(--del); color: var(--delfg); }
pre.diff .hunk { background: var(--hunk); color: #3a4a7a; } pre.diff .file { font-weight: 600; }
.error { color: var(--bad); border-color: var(--bad); }
.toolbar button { font: inherit; padding: .2rem .6rem; margin-right: .4rem; cursor: pointer; }
"""

_SCRIPT = """
function setAll(open) {
  document.querySelectorAll('details').forEach(function (d) { d.open = open; });
}
"""


def page(title: str, body: str) -> str:
    """The whole document: ``title`` is text (escaped here), ``body`` HTML."""
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n"
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def toolbar() -> str:
    return (
        '<p class="toolbar"><button type="button" onclick="setAll(true)">expand all</button>'
        '<button type="button" onclick="setAll(false)">collapse all</button></p>\n'
    )


__all__ = [
    "cell",
    "details",
    "diff_html",
    "diff_lines",
    "esc",
    "fmt",
    "op_changes_html",
    "op_counts_html",
    "page",
    "pre",
    "stats_html",
    "table",
    "toolbar",
]
