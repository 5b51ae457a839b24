"""DumpIR's dump.json, and the pass-by-pass HTML report built from it (splice.tools.report)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest
import torch

from splice.errors import ArtifactError, PassError, SpliceError
from splice.ir.rewriter import Rewriter
from splice.passes import (
    DumpIR,
    NumericCheck,
    Pass,
    PassResult,
    parse_pipeline,
    register_pass,
)
from splice.passes.instruments import json_safe, op_counts
from splice.tools.report import write_report
from splice.tools.report_html import MAX_CELL, fmt


@register_pass
@dataclass(frozen=True)
class _ReportScale(Pass):
    """Multiplies the first output by ``factor``; stats carry odd values for json_safe."""

    name = "test-report-scale"
    semantics = "approximate"
    factor: float = 1.0

    def run(self, program, ctx):
        rw = Rewriter(program, self.name)
        out = program.output_values[0]
        with rw.at(program.output_node):
            y = rw.call(torch.ops.aten.mul.Tensor, (out, self.factor))
        program.set_output(program.output_names[0], y)
        stats = {
            "factor": self.factor,
            "worst": math.inf,
            "t": torch.tensor(2.5),
            "remarks": ["<script>alert('x')</script> & more"],
            "layers": [{"layer": "a<b>", "rank": 3}, {"layer": "c", "error": 0.25}],
            "skipped": [],
            "note": "n" * 150,
        }
        return PassResult(program, True, stats)


@register_pass
@dataclass(frozen=True)
class _ReportCrash(Pass):
    name = "test-report-crash"

    def run(self, program, ctx):
        raise RuntimeError("boom <b>in</b> the pass")


@pytest.fixture
def conv(captured, arch_model):
    _, args = arch_model("convnet")
    return captured("convnet"), args


def _index(folder) -> dict:
    return json.loads((folder / "dump.json").read_text())


@pytest.mark.parametrize("numeric_first", [False, True])
def test_dump_json_records_every_pass(conv, tmp_path, numeric_first):
    p, args = conv
    dump, check = DumpIR(tmp_path / "d"), NumericCheck()
    instruments = [check, dump] if numeric_first else [dump, check]
    text = "cse,test-report-scale{factor=2.0},dce"
    result = parse_pipeline(text).run(p, sample_inputs=[args], instruments=instruments)
    idx = _index(tmp_path / "d")
    assert idx["version"] == 1 and idx["pipeline"] == text and idx["input"] == "000_input.ir"
    assert idx["input_ops"] == op_counts(p) and sum(idx["input_ops"].values()) > 0
    assert "failed" not in idx
    records = result.stats["passes"]
    assert [e["index"] for e in idx["passes"]] == [1, 2, 3]
    assert [e["name"] for e in idx["passes"]] == ["cse", "test-report-scale", "dce"]
    assert [e["pass"] for e in idx["passes"]] == [r["pass"] for r in records]
    assert [e["file"] for e in idx["passes"]] == [f.name for f in dump.files[1:]]
    for e, r in zip(idx["passes"], records):
        assert (tmp_path / "d" / e["file"]).is_file()
        assert e["changed"] == r["changed"]
        assert e["seconds"] >= 0
        assert e["stats"] == json_safe(r["stats"])
    # the numeric record of each pass, whatever the order of the instruments
    assert [e["numeric"] for e in idx["passes"]] == [json_safe(r) for r in check.reports]
    scale = idx["passes"][1]
    assert scale["stats"]["worst"] == "inf" and scale["stats"]["t"] == 2.5
    assert scale["numeric"]["semantics"] == "approximate" and scale["numeric"]["ok"] is False
    assert scale["numeric"]["max_rel"] == pytest.approx(1.0, rel=1e-5)  # 2x the output
    assert scale["ops"]["aten.mul.Tensor"] == idx["input_ops"].get("aten.mul.Tensor", 0) + 1
    assert scale["ops"] == op_counts(result.program)


def test_dump_json_without_numeric_check_and_only_changed(conv, tmp_path):
    p, _ = conv
    p = parse_pipeline("dce").run(p).program  # a second dce changes nothing
    parse_pipeline("dce,test-report-scale").run(
        p, instruments=[DumpIR(tmp_path / "d", only_changed=True)]
    )
    idx = _index(tmp_path / "d")
    dce, scale = idx["passes"]
    assert dce["changed"] is False and dce["file"] is None and dce["numeric"] is None
    assert scale["file"] == "002_test-report-scale.ir" and scale["numeric"] is None
    assert sorted(f.name for f in (tmp_path / "d").iterdir()) == [
        "000_input.ir",
        "002_test-report-scale.ir",
        "dump.json",
    ]


def test_dump_json_names_the_failed_pass(conv, tmp_path):
    p, _ = conv
    with pytest.raises(PassError, match="boom"):
        parse_pipeline("cse,test-report-crash,dce").run(p, instruments=[DumpIR(tmp_path / "d")])
    idx = _index(tmp_path / "d")
    assert [e["name"] for e in idx["passes"]] == ["cse"]
    assert idx["failed"]["index"] == 2 and idx["failed"]["name"] == "test-report-crash"
    assert idx["failed"]["error"] == "RuntimeError: boom <b>in</b> the pass"


def test_json_safe():
    import numpy as np

    value = {
        1: (math.nan, -math.inf, 0.5),
        "t": torch.zeros(2, 3, dtype=torch.float16),
        "s": {3, 1},
        "n": np.float32(1.5),
        "o": object,
    }
    out = json_safe(value)
    assert out == {
        "1": ["nan", "-inf", 0.5],
        "t": "tensor float16[2,3]",
        "s": [1, 3],
        "n": 1.5,
        "o": str(object),
    }
    json.dumps(out, allow_nan=False)  # strict JSON


# -- the HTML report ---------------------------------------------------------------------


class _Page(HTMLParser):
    """The parts of a report page the tests read: every tag with its attributes, the text
    of each element that has an id (nested text included), and the scripts' text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text_by_id: dict[str, str] = {}
        self.scripts: list[str] = []
        self._open: list[tuple[str, str | None, list[str]]] = []
        self.feed(text)
        self.close()
        assert not self._open, f"unclosed elements {[t for t, _, _ in self._open]}"

    _VOID = frozenset({"meta", "br", "img", "input", "link", "hr"})

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in self._VOID:
            self._open.append((tag, a.get("id"), []))

    def handle_endtag(self, tag):
        if tag in self._VOID:
            return
        name, id_, parts = self._open.pop()
        assert name == tag, f"</{tag}> closes <{name}>"
        text = "".join(parts)
        if id_:
            self.text_by_id[id_] = text
        if tag == "script":
            self.scripts.append(text)
        if self._open:
            self._open[-1][2].append(text)

    def handle_data(self, data):
        if self._open:
            self._open[-1][2].append(data)


def _assert_self_contained(text: str, page: _Page) -> None:
    """Nothing the page would fetch: no src/href to another document, no CSS imports/urls."""
    for tag, attrs in page.tags:
        assert "src" not in attrs, (tag, attrs)
        href = attrs.get("href")
        assert href is None or href.startswith("#"), (tag, attrs)
    assert "@import" not in text and "url(" not in text and "http" not in text.lower()


def test_report_of_a_dump_folder(conv, tmp_path):
    p, args = conv
    check = NumericCheck()
    text = "cse,test-report-scale{factor=2.0},dce"
    parse_pipeline(text).run(p, sample_inputs=[args], instruments=[DumpIR(tmp_path / "d"), check])
    out = write_report(tmp_path / "d", tmp_path / "r.html")
    assert out == tmp_path / "r.html"
    html = out.read_text()
    page = _Page(html)
    _assert_self_contained(html, page)
    assert page.text_by_id["pipeline"] == text
    idx = json.loads((tmp_path / "d" / "dump.json").read_text())
    for e in idx["passes"]:
        section = page.text_by_id[f"pass-{e['index']}"]
        assert e["pass"] in section and ("changed" if e["changed"] else "no change") in section
    assert "pass-4" not in page.text_by_id
    scale = page.text_by_id["pass-2"]
    # node counts: one more aten.mul.Tensor, and the totals before -> after
    before, after = idx["passes"][0]["ops"], idx["passes"][1]["ops"]
    mul = before.get("aten.mul.Tensor", 0)
    assert f"aten.mul.Tensor{mul}{mul + 1}+1" in scale
    assert f"{sum(before.values())} → {sum(after.values())} nodes" in scale
    # stats: the escaped remark, the records table with the union of keys, inf
    assert "<script>alert('x')</script> & more" in scale
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)" in html
    assert "layers (2)" in scale and "layerrankerror" in scale and "a<b>3–" in scale
    assert "worstinf" in scale and "skippednone" in scale
    # a long value is cut to MAX_CELL characters; the whole of it is the cell's tooltip
    assert "note" + "n" * (MAX_CELL - 1) + "…" in scale
    assert f'<td title="{"n" * 150}">' in html
    # the numeric check of that pass, and its diff: the new mul node is an added line
    rel = check.reports[1]["max_rel"]
    assert f"max rel {rel:.4g}" in scale and "(approximate)" in scale
    assert "cosine 1 (ok)" in page.text_by_id["pass-1"]
    new_lines = [
        line
        for line in (tmp_path / "d" / "002_test-report-scale.ir").read_text().splitlines()
        if "aten.mul.Tensor" in line and "[test-report-scale]" in line
    ]
    assert len(new_lines) == 1 and "+" + new_lines[0] in scale
    assert "001_cse.ir → 002_test-report-scale.ir" in scale
    # the input section lists every op of the input program
    assert all(op in page.text_by_id["pass-0"] for op in op_counts(p))
    # the summary: one row per pass with its time, and the total
    summary = page.text_by_id["summary"]
    for e in idx["passes"]:
        assert f"{e['index']}{e['pass']}" in summary
    assert f"total{fmt(sum(e['seconds'] for e in idx['passes']))}" in summary
    assert page.scripts and "setAll" in page.scripts[0]


def test_report_of_a_failed_and_only_changed_dump(conv, tmp_path):
    p, _ = conv
    p = parse_pipeline("dce").run(p).program
    with pytest.raises(PassError):
        parse_pipeline("dce,test-report-scale,test-report-crash").run(
            p, instruments=[DumpIR(tmp_path / "d", only_changed=True)]
        )
    html = write_report(tmp_path / "d", tmp_path / "r.html").read_text()
    page = _Page(html)
    failed = page.text_by_id["failed"]
    assert failed == "pass 3 test-report-crash failed: RuntimeError: boom <b>in</b> the pass"
    assert "IR not written" in page.text_by_id["pass-1"]
    assert "000_input.ir → 002_test-report-scale.ir" in page.text_by_id["pass-2"]
    assert "numeric check" in page.text_by_id["pass-2"] and "not run" in page.text_by_id["pass-2"]


def test_report_of_a_hand_written_minimal_dump(tmp_path):
    """Only the fields the format requires (no op counts, no pass text): still a report."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "000_input.ir").write_text("a\nb\n")
    (d / "001_x.ir").write_text("a\nc\n")
    index = {
        "version": 1,
        "pipeline": "x",
        "input": "000_input.ir",
        "passes": [
            {"index": 1, "name": "x", "file": "001_x.ir", "changed": True, "seconds": 0.5,
             "stats": {"n": 1}, "numeric": None},
        ],
    }  # fmt: skip
    (d / "dump.json").write_text(json.dumps(index))
    page = _Page(write_report(d, tmp_path / "r.html").read_text())
    section = page.text_by_id["pass-1"]
    assert "op counts not recorded" in section
    assert "-b\n+c" in section and "+1 −1 lines" in section


def test_report_of_a_saved_program(conv, tmp_path):
    import splice
    from splice.passes.analysis.cost import cost_model

    p, _ = conv
    splice.save(p, tmp_path / "p.splice")
    html = write_report(tmp_path / "p.splice", tmp_path / "r.html").read_text()
    page = _Page(html)
    _assert_self_contained(html, page)
    body = page.text_by_id["program-0"]
    for op, n in op_counts(p).items():
        assert f"{op}{n}" in body
    tot = cost_model(p).total
    assert f"total{fmt(tot.params)}{fmt(tot.flops)}" in body
    assert splice.print_ir(p, locations=True) in body  # the IR text, unescaped by the parser
    assert all(n in body for n in p.input_names + p.output_names)


def _dump(tmp_path, index=None, files=("000_input.ir",)):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    for f in files:
        (d / f).write_text("x\n")
    if index is not None:
        (d / "dump.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return d


_GOOD_PASS = {"index": 1, "name": "x", "file": "001_x.ir", "changed": True, "seconds": 0.5,
              "stats": {}, "numeric": None}  # fmt: skip


@pytest.mark.parametrize(
    "index, files, message",
    [
        (None, (), "is neither a dump folder nor a saved program"),
        (None, ("000_input.ir", "001_x.ir"), "has IR dumps but no dump.json"),
        ("{not json", (), "dump.json is not valid JSON"),
        ([1], (), "dump.json is not a JSON object"),
        ({"version": 2}, (), "dump.json has version 2; this splice reads version 1"),
        ({"version": 1, "input": "000_input.ir", "passes": []}, (), "'pipeline' is missing"),
        ({"version": 1, "pipeline": "x", "input": "../000_input.ir", "passes": []}, (),
         "names the file '../000_input.ir', which is not a plain file name"),
        ({"version": 1, "pipeline": "x", "input": "000_input.ir", "passes": [_GOOD_PASS]}, (),
         "dump.json names 001_x.ir, which is not in"),
        ({"version": 1, "pipeline": "x", "input": "000_input.ir",
          "passes": [{**_GOOD_PASS, "changed": "yes"}]}, ("001_x.ir",),
         "'changed' is a str, expected bool"),
        ({"version": 1, "pipeline": "x", "input": "000_input.ir",
          "passes": [{**_GOOD_PASS, "ops": {"a": "1"}}]}, ("001_x.ir",),
         "'ops' is not an object of counts"),
    ],
)  # fmt: skip
def test_report_of_a_damaged_folder_names_the_problem(tmp_path, index, files, message):
    d = _dump(tmp_path, index, ("000_input.ir", *files) if index is not None else files)
    with pytest.raises(ArtifactError) as e:
        write_report(d, tmp_path / "r.html")
    assert message in str(e.value)
    assert not (tmp_path / "r.html").exists()


def test_report_input_and_output_errors(conv, tmp_path):
    import splice

    with pytest.raises(ArtifactError, match="does not exist"):
        write_report(tmp_path / "nope", tmp_path / "r.html")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        write_report(tmp_path / "f.txt", tmp_path / "r.html")
    p, _ = conv
    splice.save(p, tmp_path / "p.splice")
    (tmp_path / "p.splice" / "program.ir").write_text("garbage")
    with pytest.raises(ArtifactError):  # the manifest's sha256 no longer matches
        write_report(tmp_path / "p.splice", tmp_path / "r.html")
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "splice.artifact/1"}')
    with pytest.raises(ArtifactError, match="is not a saved program"):
        write_report(bad, tmp_path / "r.html")
    good = _dump(tmp_path, {"version": 1, "pipeline": "", "input": "000_input.ir", "passes": []})
    with pytest.raises(SpliceError, match="that is a folder"):
        write_report(good, tmp_path)
    with pytest.raises(SpliceError, match="does not exist"):
        write_report(good, tmp_path / "no" / "r.html")
    assert "0. input" in write_report(good, tmp_path / "r.html").read_text()
