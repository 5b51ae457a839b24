"""dce, cse, fold-constants: Before/Expected in the text form, and on real models."""

from __future__ import annotations

import pytest
import torch
from conftest import first_output, ir

import splice
from splice.passes import NumericCheck, VerifyEach, parse_pipeline


def run(pipeline: str, text: str, **weights):
    p = ir(text, **weights)
    return parse_pipeline(pipeline).run(p, instruments=[VerifyEach()])


def body(program) -> str:
    return "\n".join(
        line.strip() for line in splice.print_ir(program).splitlines() if line.startswith("  ")
    )


def test_cse_merges_repeated_computations():
    before = """weight @w : f32[4,4] param
program @p(%x : f32[2,4]) {
  %a : f32[2,4] = aten.linear(%x, @w)
  %b : f32[2,4] = aten.relu(%a)
  %c : f32[2,4] = aten.relu(%a)
  %d : f32[2,4] = aten.add.Tensor(%b, %c)
  %e : f32[2,4] = aten.linear(%x, @w)
  %f : f32[2,4] = aten.add.Tensor(%d, %e)
  return out=%f
}"""
    expected = """%a : f32[2,4] = aten.linear(%x, @w)
%b : f32[2,4] = aten.relu(%a)
%d : f32[2,4] = aten.add.Tensor(%b, %b)
%f : f32[2,4] = aten.add.Tensor(%d, %a)
return out=%f"""
    r = run("cse", before, w=torch.randn(4, 4))
    assert body(r.program) == expected
    assert r.stats["passes"][0]["stats"]["merged"] == 2


def test_cse_keeps_random_ops_and_distinguishes_literals():
    before = """program @p(%x : f32[8]) {
  %a : f32[8] = aten.dropout(%x, 0.5, True)
  %b : f32[8] = aten.dropout(%x, 0.5, True)
  %c : f32[8] = aten.mul.Tensor(%x, 2.0)
  %d : f32[8] = aten.mul.Tensor(%x, 2)
  %e : f32[8] = aten.add.Tensor(%a, %b)
  %f : f32[8] = aten.add.Tensor(%c, %d)
  %g : f32[8] = aten.add.Tensor(%e, %f)
  return out=%g
}"""
    r = run("cse", before)
    assert r.changed is False
    assert "dropout(%x, 0.5, True)" in body(r.program) and body(r.program).count("dropout") == 2


def test_dce_removes_unused_values_and_weights():
    before = """weight @w : f32[4,4] param
weight @unused : f32[3] buffer
program @p(%x : f32[2,4]) {
  %a : f32[2,4] = aten.linear(%x, @w)
  %dead : f32[2,4] = aten.sigmoid(%a)
  %dead2 : f32[2,4] = aten.mul.Tensor(%dead, 3.0)
  %b : f32[2,4] = aten.relu(%a)
  return out=%b
}"""
    r = run("dce", before, w=torch.randn(4, 4), unused=torch.zeros(3))
    assert (
        body(r.program)
        == """%a : f32[2,4] = aten.linear(%x, @w)
%b : f32[2,4] = aten.relu(%a)
return out=%b"""
    )
    assert set(r.program.weight_kinds) == {"w"}
    assert r.stats["passes"][0]["stats"] == {
        "nodes_removed": 2,
        "weights_removed": 1,
        "changed": True,
    }


def test_fold_constants_folds_buffers_not_params_by_default():
    before = """weight @w : f32[4,4] param
weight @scale : f32[4] buffer
program @p(%x : f32[2,4]) {
  %s2 : f32[4] = aten.mul.Tensor(@scale, 2.0)
  %r : f32[4] = aten.rsqrt(%s2)
  %wt : f32[4,4] = aten.t(@w)
  %a : f32[2,4] = aten.mm(%x, %wt)
  %b : f32[2,4] = aten.mul.Tensor(%a, %r)
  return out=%b
}"""
    scale = torch.rand(4) + 0.5
    w = torch.randn(4, 4)
    r = run("fold-constants", before, w=w, scale=scale)
    assert (
        body(r.program)
        == """%wt : f32[4,4] = aten.t(@w)
%a : f32[2,4] = aten.mm(%x, %wt)
%b : f32[2,4] = aten.mul.Tensor(%a, @_folded.r)
return out=%b"""
    )
    assert r.program.weight_kind("_folded.r") == "constant"
    assert torch.equal(r.program.get_weight("_folded.r"), torch.rsqrt(scale * 2.0))
    x = torch.randn(2, 4)
    assert torch.equal(r.program(x), ir(before, w=w, scale=scale)(x))
    r2 = run("fold-constants{params=true}", before, w=w, scale=scale)
    assert "aten.t(" not in body(r2.program) and "@_folded.wt" in body(r2.program)


def test_fold_constants_respects_max_numel():
    before = """program @p(%x : f32[64,64]) {
  %m : f32[64,64] = aten.ones([64, 64])
  %t : f32[64,64] = aten.triu(%m)
  %y : f32[64,64] = aten.mul.Tensor(%x, %t)
  return out=%y
}"""
    r = run("fold-constants{max_numel=100}", before)
    stats = r.stats["passes"][0]["stats"]
    assert r.changed is False and stats["folded"] == 0 and stats["kept_too_large"] == 1
    assert stats["reason"] == "constant values exceed max_numel"
    r2 = run("fold-constants", before)
    assert body(r2.program).splitlines()[0] == "%y : f32[64,64] = aten.mul.Tensor(%x, @_folded.t)"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "convnet"])
def test_cleanup_pipeline_is_exact_on_real_models(name, captured, arch_model):
    model, args = arch_model(name)
    p = captured(name)
    nc = NumericCheck()
    r = parse_pipeline("cse,fold-constants,dce").run(
        p, sample_inputs=[args], instruments=[VerifyEach(), nc]
    )
    assert all(rep["ok"] and rep["max_abs"] == 0.0 for rep in nc.reports)
    with torch.no_grad():
        out = r.program(*args)
        out = out[0] if isinstance(out, tuple) else out
        assert (out - first_output(model(*args))).abs().max() <= 1e-5
    n_before = sum(1 for n in p.graph.nodes if n.op == "call_function")
    n_after = sum(1 for n in r.program.graph.nodes if n.op == "call_function")
    assert n_after <= n_before
