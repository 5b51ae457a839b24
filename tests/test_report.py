"""DumpIR's dump.json, and the pass-by-pass HTML report built from it (splice.tools.report)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from splice.errors import PassError
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
        stats = {"factor": self.factor, "worst": math.inf, "t": torch.tensor(2.5)}
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
