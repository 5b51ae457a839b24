"""The `specialize` pass: folding a hypernetwork for a fixed cond back into constant weights —
equal to the conditioned program at that cond, the original weights' names and shapes back,
composing with lowrank, NumericCheck and TVM compilation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import _captured_batch, first_output

import splice
from splice import models
from splice.errors import PassError, PipelineError
from splice.ir import parse_ir, print_ir, verify
from splice.passes import NumericCheck, VerifyEach, parse_pipeline
from splice.passes.hyper import to_module
from splice.passes.specialize import specialize

TARGETS = {
    "gpt2": "transformer.h.*.attn.c_attn.*|transformer.h.*.mlp.c_fc.weight",
    "llama": "model.layers.*.self_attn.*_proj.weight|model.layers.0.mlp.*",
    "convnet": "stem.0.*|stage*.conv*.weight|head.*",
}


def _batched(name: str):
    return _captured_batch(name, 2)


def _mlp():
    model, args = models.mlp(d=16, hidden=32, batch=3)
    return model, splice.capture(model, args), args


def run(program, text: str, **kw):
    return parse_pipeline(text).run(program, **kw).program


@pytest.mark.parametrize("name", ["gpt2", "llama", "convnet"])
@pytest.mark.parametrize("mode", ["shared", "per_sample", "chunked"])
def test_specialised_equals_conditioned_at_that_cond(name, mode):
    p, args = _batched(name)
    extra = {"shared": "", "per_sample": ",per_sample=true", "chunked": ",chunk_size=500"}[mode]
    q = run(p.copy(), f"hyper{{targets={TARGETS[name]},cond_dim=2,hidden=[8],init=fanout{extra}}}")
    gamma = [0.3, 0.8]
    s = run(q, "specialize{cond=[0.3,0.8]}")
    verify(s)
    cond = torch.tensor(gamma)
    if mode == "per_sample":
        cond = cond.expand(2, 2)
    with torch.no_grad():
        ref = first_output(q(*args, cond))
        got = first_output(s(*args))
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        # and it is not simply the original program: fanout changed the weights
        assert (got - first_output(p(*args))).abs().max() > 1e-3
    # cond, the hypernetwork and its weights are gone; the targets are back, same shapes
    assert s.input_names == p.input_names
    assert "hyper" not in s.attrs
    assert not any(w.startswith("hyper.") for w in s.weight_kinds)
    assert set(s.weight_kinds) == set(p.weight_kinds)
    for n, t in p.weights.items():
        assert s.get_weight(n).shape == t.shape and s.weight_kind(n) == p.weight_kind(n)
    extra_ops = ops(s) - ops(p)
    assert not {"aten.leaky_relu.default", "aten.cos.default", "aten.sin.default"} & set(extra_ops)
    if mode != "per_sample":  # the original graph, op for op
        assert ops(s) == ops(p)


def ops(program) -> Counter:
    return Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def test_shared_specialisation_restores_the_original_graph():
    model, p, (x,) = _mlp()
    q = run(p, "hyper{targets=fc*,cond_dim=3,init=fanout}")
    s = specialize(q, [0.1, 0.2, 0.3])
    # same program text as the original, up to the weight list's order

    def body(prog):
        return [line for line in print_ir(prog).splitlines() if not line.startswith("weight ")]

    assert body(s) == body(p)
    # with a zero head (init=preserve) the restored weights are the original values
    s0 = specialize(run(p, "hyper{targets=fc*,cond_dim=3}"), [0.5, 0.5, 0.5])
    for n, t in p.weights.items():
        torch.testing.assert_close(s0.get_weight(n), t, atol=0, rtol=0)
    torch.testing.assert_close(s0(x), model(x), atol=0, rtol=0)


def test_specialise_a_trained_hypernetwork_for_each_task():
    _, p, (x,) = _mlp()
    m = to_module(run(p, "hyper{targets=fc2.*,cond_dim=1,hidden=[8]}"))
    opt = torch.optim.Adam(m.hypernet_parameters(), lr=1e-2)
    y = {0.0: torch.zeros(3, 16), 1.0: torch.ones(3, 16)}
    for _ in range(30):
        opt.zero_grad()
        sum(((m(x, torch.tensor([k])) - v) ** 2).mean() for k, v in y.items()).backward()
        opt.step()
    trained = m.to_program()
    for k in y:
        s = specialize(trained, [k])
        with torch.no_grad():
            torch.testing.assert_close(s(x), m(x, torch.tensor([k])), atol=1e-6, rtol=1e-6)
    a, b = specialize(trained, [0.0]), specialize(trained, [1.0])
    assert not torch.equal(a.get_weight("fc2.bias"), b.get_weight("fc2.bias"))


def test_composes_with_lowrank_under_numeric_check():
    p, args = _batched("llama")
    check = NumericCheck()
    r = parse_pipeline(
        "hyper{targets=model.layers.*.mlp.*,cond_dim=2,hidden=[8],init=fanout},"
        "specialize{cond=[0.25,0.75]},lowrank{ratio=0.5,targets=model.layers.*.mlp.*}"
    ).run(p.copy(), sample_inputs=[args], instruments=[VerifyEach(), check])
    hyper_rec, spec_rec, low_rec = check.reports
    assert hyper_rec["semantics"] == "approximate" and "max_abs" in hyper_rec  # fanout
    # specialize is exact: checked against the program before it, run with cond = [0.25, 0.75]
    assert spec_rec["semantics"] == "exact" and spec_rec["ok"] and spec_rec["max_abs"] <= 1e-5
    assert "max_abs" in low_rec  # lowrank saw (and was checked on) the restored weights
    st = r.stats["passes"][2]["stats"]
    assert {layer["layer"] for layer in st["layers"]} == {
        f"model.layers.{i}.mlp.{k}_proj" for i in range(2) for k in ("gate", "up", "down")
    }
    assert r.program.input_names == ["input_ids"]
    # lowrank at full energy (skips every layer) leaves the specialised program unchanged
    q = run(p.copy(), "hyper{targets=model.layers.0.mlp.*,cond_dim=2,init=fanout}")
    s = specialize(q, [0.4, 0.6])
    r2 = parse_pipeline("lowrank{energy=1.0,targets=model.layers.0.mlp.*}").run(s)
    assert r2.stats["passes"][0]["stats"]["reason"] == "every layer skipped"


def test_two_hypernetworks_specialise_one_at_a_time():
    _, p, (x,) = _mlp()
    q = run(
        p,
        "hyper{targets=fc1.*,cond_dim=2,init=fanout},"
        "hyper{targets=fc2.*,cond_dim=1,init=fanout,prefix=h2,input=task}",
    )
    with pytest.raises(PassError, match=r"has 2 hypernetworks \(hyper, h2\)"):
        run(q, "specialize{cond=[0.5]}")
    s = run(q, "specialize{cond=[0.5],prefix=h2}")
    assert s.input_names == ["x", "cond"] and set(s.attrs["hyper"]) == {"hyper"}
    assert not any(w.startswith("h2.") for w in s.weight_kinds)
    c = torch.tensor([0.2, 0.9])
    torch.testing.assert_close(s(x, c), q(x, c, torch.tensor([0.5])), atol=1e-6, rtol=0)
    s2 = run(s, "specialize{cond=[0.2,0.9]}")
    assert s2.input_names == ["x"] and "hyper" not in s2.attrs
    torch.testing.assert_close(s2(x), q(x, c, torch.tensor([0.5])), atol=1e-6, rtol=0)


def test_specialise_a_parsed_program():
    _, p, (x,) = _mlp()
    q = run(p, "hyper{targets=fc1.weight,cond_dim=2,init=fanout,chunk_size=64}")
    back = parse_ir(print_ir(q), q.weights)
    s = run(back, "specialize{cond=[1.0,0.0]}")
    torch.testing.assert_close(s(x), q(x, torch.tensor([1.0, 0.0])), atol=1e-6, rtol=0)


def test_errors():
    _, p, _ = _mlp()
    with pytest.raises(PipelineError) as e:
        parse_pipeline("specialize")
    assert e.value.message == (
        "specialize needs cond=[...] (the hypernetwork input to fold) or config=i "
        "(the stitch configuration to keep)"
    )
    assert "specialize{input=NAME,value=[...]}" in e.value.hint
    with pytest.raises(PipelineError, match="cond=\\[...\\] or config=i, not both"):
        parse_pipeline("specialize{cond=[1.0],config=2}")
    with pytest.raises(PipelineError, match="one of .*, not value and config"):
        parse_pipeline("specialize{input=config,value=[1],config=2}")
    with pytest.raises(PipelineError, match="value=.*needs input=NAME"):
        parse_pipeline("specialize{value=[1.0]}")
    with pytest.raises(PipelineError) as e:
        parse_pipeline("specialize{config=1,input=mode}")
    assert e.value.hint == "write specialize{input=mode,value=[i]}"
    with pytest.raises(PipelineError, match="specialize: option cond: 'x' is not a float"):
        parse_pipeline("specialize{cond=[x]}")
    with pytest.raises(PassError) as e:
        run(p, "specialize{cond=[0.5]}")
    assert e.value.message == "program 'MLP' has no hypernetwork"
    assert e.value.hint == "run the hyper pass first"
    q = run(p, "hyper{targets=fc1.*,cond_dim=2}")
    with pytest.raises(PassError) as e:
        run(q, "specialize{cond=[0.5]}")
    assert e.value.message == (
        "specialize: cond has 1 values but hypernetwork 'hyper' takes cond_dim=2"
    )
    with pytest.raises(PassError, match="has no hypernetwork 'h9'"):
        run(q, "specialize{cond=[0.5,0.5],prefix=h9}")
    with pytest.raises(PassError, match="no hypernetwork reads input 'x'"):
        run(q, "specialize{cond=[0.5,0.5],input=x}")
    with pytest.raises(PassError, match="has no input 'nope'"):
        run(q, "specialize{input=nope,value=[1.0]}")


def test_input_value_names_the_hyper_input_like_cond():
    _, p, _ = _mlp()
    q = run(p, "hyper{targets=fc1.*,cond_dim=2,init=fanout}")
    a = run(q.copy(), "specialize{cond=[0.3,0.8]}")
    b = run(q.copy(), f"specialize{{input={q.attrs['hyper']['hyper']['input']},value=[0.3,0.8]}}")
    assert print_ir(a) == print_ir(b)


BIND = """weight @w : f32[4,4] param
weight @other : f32[4] param
program @p(%x : f32[2,4], %mode : f32[2]) {
  graph @twice(%x : f32[2,4], %s : f32[4,4]) {
    %mm : f32[2,4] = aten.mm(%x, %s)
    %y : f32[2,4] = aten.mul.Tensor(%mm, 2)
    return (%y,)
  }
  graph @negated(%x : f32[2,4], %s : f32[4,4]) {
    %y : f32[2,4] = aten.neg(%x)
    return (%y,)
  }
  %total : f32[] = aten.sum(%mode)
  %gt : bool[] = aten.gt.Scalar(%total, 0)
  %scaled : f32[4,4] = aten.mul.Tensor(@w, %total)
  %cond : (f32[2,4],) = higher_order.cond(%gt, @twice, @negated, (%x, %scaled))
  %y : f32[2,4] = operator.getitem(%cond, 0)
  %m : f32[2,1] = aten.unsqueeze(%mode, 1)
  %out : f32[2,4] = aten.add.Tensor(%y, %m)
  return out=%out
}
"""


@pytest.mark.parametrize("mode", [[1.0, 2.0], [-1.0, 0.5]])
def test_binding_any_input_decides_its_branches_and_folds_its_values(mode):
    p = parse_ir(BIND, {"w": torch.randn(4, 4), "other": torch.randn(4)})
    r = parse_pipeline(f"specialize{{input=mode,value={mode}}}").run(p.copy())
    s = r.program
    verify(s)
    assert s.input_names == ["x"]
    x = torch.randn(2, 4)
    assert torch.equal(s(x), p(x, torch.tensor(mode)))
    text = print_ir(s)
    assert "higher_order.cond" not in text and "%mode" not in text
    stats = r.stats["passes"][0]["stats"]
    assert stats["decided"] == 1
    # mode's own values that run-time code reads are constants; unread weights leave
    assert "weight @other" not in text and "weight @w " not in text
    assert all(c.startswith("specialize.") for c in stats["constants"])
    assert len(stats["constants"]) == (2 if sum(mode) > 0 else 1)  # w * sum(mode), mode[:, None]


# ---------------------------------------------------------------------------------------
# TVM: the specialised program compiles as an ordinary one


@pytest.mark.parametrize("per_sample", [False, True])
def test_tvm_specialised_equals_eager(per_sample, tmp_path):
    pytest.importorskip("tvm")
    model, args = models.mlp(d=16, hidden=32, batch=2)
    options = "targets=fc*,cond_dim=2,hidden=[8],init=fanout" + (
        ",per_sample=true" if per_sample else ""
    )
    p = splice.capture(model, args)
    q = run(p, f"hyper{{{options}}}")
    s = specialize(q, [0.6, 0.1])
    cm = splice.compile(s, "llvm", output=tmp_path / "spec.artifact").load()
    assert cm.input_names == p.input_names
    got = first_output(cm(*args))
    cond = torch.tensor([0.6, 0.1])
    if "per_sample=true" in options:
        cond = cond.expand(2, 2)
    with torch.no_grad():
        torch.testing.assert_close(got, first_output(s(*args)), atol=1e-4, rtol=0)
        torch.testing.assert_close(got, first_output(q(*args, cond)), atol=1e-4, rtol=0)
