"""Every instrument has an observable effect; the manager never skips silently."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch

import splice
from splice.errors import PassError, VerificationError
from splice.ir import meta as M
from splice.ir.rewriter import Rewriter
from splice.passes import (
    CrashReproducer,
    DumpIR,
    Instrument,
    NumericCheck,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    PrintIR,
    Timing,
    VerifyEach,
    parse_pipeline,
    register_pass,
)


@register_pass
@dataclass(frozen=True)
class _Scale(Pass):
    """Multiplies the first output by `factor` (exact only if factor == 1)."""

    name = "test-scale"
    semantics = "exact"
    factor: float = 1.0

    def run(self, program, ctx):
        rw = Rewriter(program, self.name)
        out = program.output_values[0]
        with rw.at(program.output_node):
            y = rw.call(torch.ops.aten.mul.Tensor, (out, self.factor))
        program.set_output(program.output_names[0], y)
        return PassResult(program, True, {"factor": self.factor})


@register_pass
@dataclass(frozen=True)
class _ApproxScale(_Scale):
    name = "test-approx-scale"
    semantics = "approximate"


@register_pass
@dataclass(frozen=True)
class _Crash(Pass):
    name = "test-crash"

    def run(self, program, ctx):
        raise RuntimeError("boom inside the pass")


@register_pass
@dataclass(frozen=True)
class _Corrupt(Pass):
    """Breaks a spec without the Rewriter: VerifyEach must catch it."""

    name = "test-corrupt"

    def run(self, program, ctx):
        node = next(n for n in program.graph.nodes if n.op == "call_function")
        M.set_spec(node, M.TensorSpec((99,), torch.float32))
        return PassResult(program, True)


@pytest.fixture
def conv(captured, arch_model):
    _, args = arch_model("convnet")
    return captured("convnet"), args


def test_timing_reports_every_pass(conv):
    p, _args = conv
    t = Timing()
    parse_pipeline("cse,dce").run(p, instruments=[t])
    assert [n for n, _ in t.records] == ["cse", "dce"]
    assert all(s >= 0 for _, s in t.records)
    report = t.report()
    assert "cse" in report and "total" in report


def test_print_ir_after_all_and_after_change(conv):
    p, _ = conv
    buf = io.StringIO()
    parse_pipeline("dce,test-scale{factor=2.0}").run(
        p, instruments=[PrintIR(after=True, stream=buf)]
    )
    text = buf.getvalue()
    assert (
        "// ----- IR after dce (no change) -----" in text or "// ----- IR after dce -----" in text
    )
    assert "// ----- IR after test-scale{factor=2.0} -----" in text
    buf2 = io.StringIO()
    p2 = parse_pipeline("dce").run(p).program  # dce once so that a second dce changes nothing
    parse_pipeline("dce,test-scale{factor=2.0}").run(
        p2, instruments=[PrintIR(after=True, only_changed=True, stream=buf2)]
    )
    out = buf2.getvalue()
    assert "IR after dce" not in out and "IR after test-scale{factor=2.0}" in out
    assert "aten.mul.Tensor" in out
    buf3 = io.StringIO()
    parse_pipeline("cse").run(p, instruments=[PrintIR(before=True, after=False, stream=buf3)])
    assert buf3.getvalue().startswith("// ----- IR before cse -----")


def test_dump_ir_writes_numbered_files(conv, tmp_path):
    p, _ = conv
    d = DumpIR(tmp_path / "dump")
    parse_pipeline("cse,test-scale{factor=3.0},dce").run(p, instruments=[d])
    names = sorted(f.name for f in (tmp_path / "dump").iterdir())
    assert names == ["000_input.ir", "001_cse.ir", "002_test-scale.ir", "003_dce.ir", "dump.json"]
    dumped = (tmp_path / "dump" / "002_test-scale.ir").read_text()
    assert "[test-scale]" in dumped  # locations are on: the changed node says who changed it
    assert splice.print_ir(splice.parse_ir(dumped, p.weights), locations=True) == dumped


def test_verify_each_catches_a_pass_that_breaks_specs(conv):
    p, _ = conv
    v = VerifyEach()
    with pytest.raises(
        VerificationError, match="after pass 'test-corrupt': .* recorded as f32\\[99\\]"
    ):
        parse_pipeline("cse,test-corrupt").run(p, instruments=[v])
    assert v.verified == 2  # the input and the result of cse


def test_numeric_check_exact_and_approximate(conv):
    p, args = conv
    nc = NumericCheck()
    parse_pipeline("cse,test-scale{factor=1.0}").run(p, sample_inputs=[args], instruments=[nc])
    assert [r["ok"] for r in nc.reports] == [True, True]
    assert nc.reports[1]["max_abs"] == 0.0
    with pytest.raises(PassError, match="exact pass 'test-scale' changed the program's outputs"):
        parse_pipeline("test-scale{factor=1.5}").run(
            p, sample_inputs=[args], instruments=[NumericCheck()]
        )
    nc2 = NumericCheck()
    parse_pipeline("test-approx-scale{factor=1.5}").run(p, sample_inputs=[args], instruments=[nc2])
    (r,) = nc2.reports
    out = p(*args)
    assert r["semantics"] == "approximate" and not r["ok"]
    assert r["max_abs"] == pytest.approx(0.5 * out.abs().max().item(), rel=1e-5)
    assert r["max_rel"] == pytest.approx(0.5, rel=1e-5)
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6)
    nc3 = NumericCheck()
    parse_pipeline("cse").run(p, instruments=[nc3])
    assert nc3.reports[0]["skipped"] == "no sample inputs"


def test_crash_reproducer_writes_a_reproducible_folder(conv, tmp_path):
    p, args = conv
    cr = CrashReproducer(tmp_path / "crashes")
    with pytest.raises(
        PassError, match="pass 'test-crash' failed: RuntimeError: boom inside the pass"
    ):
        PassManager("cse,test-crash,dce", [cr]).run(p, PassContext([args]))
    (folder,) = cr.folders
    assert folder.name == "crash_002_test-crash"
    assert (folder / "pipeline.txt").read_text().strip() == "test-crash,dce"
    assert (folder / "full_pipeline.txt").read_text().strip() == "cse,test-crash,dce"
    assert "boom inside the pass" in (folder / "error.txt").read_text()
    assert (folder / "samples.safetensors").is_file()
    reloaded = splice.load(folder / "input.splice")
    # the saved input is the program cse produced, i.e. what the failing pass received
    cse_out = parse_pipeline("cse").run(p).program
    assert splice.print_ir(reloaded) == splice.print_ir(cse_out)
    with pytest.raises(PassError, match="boom"):
        parse_pipeline((folder / "pipeline.txt").read_text().strip()).run(reloaded)


def test_failed_pipeline_leaves_the_input_untouched(conv):
    p, _ = conv
    text, v = splice.print_ir(p), p.version
    with pytest.raises(PassError):
        parse_pipeline("test-scale{factor=2.0},test-crash").run(p)
    assert splice.print_ir(p) == text and p.version == v


class _SkipDce(Instrument):
    def should_run(self, p, program, ctx):
        return p.name != "dce"


def test_skipped_passes_are_recorded(conv):
    p, _ = conv
    result = PassManager("cse,dce", [_SkipDce()]).run(p)
    recs = result.stats["passes"]
    assert recs[1]["pass"] == "dce" and recs[1]["skipped_by"] == "_SkipDce"


def test_pass_that_changed_nothing_says_so(conv):
    p, _ = conv
    p = parse_pipeline("dce").run(p).program
    rec = parse_pipeline("dce").run(p).stats["passes"][0]
    assert rec["changed"] is False and rec["stats"]["reason"] == "no unused values or weights"


def test_analyses_are_cached_by_version(conv):
    from splice.passes.analysis import cost_model

    p, _ = conv
    ctx = PassContext()
    a = ctx.analysis(cost_model, p)
    b = ctx.analysis(cost_model, p.copy())  # an unedited copy has the same version
    assert a is b and ctx.analysis_hits == 1
    q = parse_pipeline("test-scale{factor=2.0}").run(p).program
    c = ctx.analysis(cost_model, q)
    assert c is not a and ctx.analysis_misses == 2
