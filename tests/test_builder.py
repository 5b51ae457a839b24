"""The Builder infers every spec from its op: the spec equals what the op produces when run."""

from __future__ import annotations

import operator

import pytest
import torch
from conftest import ir

import splice
from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.builder import Builder, mark_part_start, starts_part
from splice.ir.rewriter import Rewriter

aten = torch.ops.aten
COND = torch.ops.higher_order.cond
INVOKE = torch.ops.higher_order.invoke_subgraph

TEXT = """weight @fc.weight : f32[6,4] param
weight @fc.bias : f32[6] param
program @p(%x : f32[3,4]) {
  %y : f32[3,6] = aten.linear(%x, @fc.weight, @fc.bias)  # fc @ m.py:7
  %z : f32[3,6] = aten.relu(%y)  # act @ m.py:8
  return out=%z
}
"""

SYM = """symbol s : hint=4 range=[1,64]
program @p(%x : f32[s,4]) {
  %y : f32[s,4] = aten.relu(%x)
  return out=%y
}
"""


def prog():
    return ir(TEXT, fc__weight=torch.randn(6, 4), fc__bias=torch.randn(6))


def spec_of(t):
    return M.spec_of_value(t)


def test_call_infers_the_spec_of_eager_execution_and_stamps_the_loc():
    p = prog()
    b = Builder(p, "mypass")
    y = p.node("y")
    with b.at(y, after=True):
        s = b.call(aten.split.Tensor, (y, 4, 1))
        first = b.call(operator.getitem, (s, 1))
        m = b.call(aten.mean.dim, (y, [0]), {"keepdim": True})
    eager = aten.split.Tensor(torch.zeros(3, 6), 4, 1)
    assert M.spec(s) == spec_of(eager)
    assert M.spec(first) == spec_of(eager[1]) == M.TensorSpec((3, 2), torch.float32)
    assert M.spec(m) == spec_of(torch.zeros(3, 6).mean(0, keepdim=True))
    assert M.loc(first) == M.Loc("fc", "m.py", 7, ("mypass",))
    assert b.created == [s, first, m]


def test_weight_and_placeholder():
    p = prog()
    b = Builder(p, "mypass")
    w = b.weight("fc.weight")
    assert w is b.weight("fc.weight")  # reused
    assert M.spec(w) == spec_of(p.get_weight("fc.weight"))
    t = b.placeholder("t", M.TensorSpec((2,), torch.int64))
    assert p.input_names == ["x", "t"] and M.spec(t) == M.TensorSpec((2,), torch.int64)
    with pytest.raises(PassError, match="no weight @nope"):
        b.weight("nope")


def test_symbolic_specs_keep_the_program_symbols():
    p = splice.parse_ir(SYM)
    b = Builder(p, "t")
    y = p.node("y")
    with b.at(y, after=True):
        c = b.call(aten.cat.default, ([y, y],))
        n = b.call(aten.sym_size.int, (y, 0))
    assert M.spec(c) == M.TensorSpec(("2*s", 4), torch.float32)
    assert M.spec(n) == M.ScalarSpec("int", "s")


def test_errors_name_the_node_and_leave_no_node_behind():
    p = prog()
    b = Builder(p, "mypass")
    y = p.node("y")
    n_before = len(p.graph.nodes)
    with b.at(y, after=True), pytest.raises(PassError) as e:
        b.call(aten.mm.default, (y, y))
    assert "mypass: new node aten.mm(%y: f32[3,6], %y: f32[3,6]) does not type-check" in str(
        e.value
    )
    assert "fc" in str(e.value)  # where: the Loc
    assert len(p.graph.nodes) == n_before


def _branch(b: Builder, spec: M.Spec, op) -> Builder:
    sub = b.sub()
    a = sub.placeholder("a", spec)
    sub.output((sub.call(op, (a,)),))
    return sub


def test_cond_and_sub_graphs_from_the_branch_graphs_output_specs():
    p = prog()
    b = Builder(p, "mypass")
    z = p.node("z")
    with b.at(p.output_node):
        pred = b.call(aten.gt.Scalar, (b.call(aten.sum.default, (z,)), 0))
        t = b.graph_ref("then_0", _branch(b, M.spec(z), aten.neg.default))
        f = b.graph_ref("else_0", _branch(b, M.spec(z), aten.exp.default))
        c = b.call(COND, (pred, t, f, (z,)))
        out = b.call(operator.getitem, (c, 0))
    assert M.spec(t) == M.GraphRefSpec("then_0")
    assert M.spec(c) == M.TupleSpec((M.spec(z),))
    assert M.spec(out) == M.spec(z)
    p.set_output("out", out)
    splice.verify(p)
    x = torch.randn(3, 4)
    ref = torch.relu(
        torch.nn.functional.linear(x, p.get_weight("fc.weight"), p.get_weight("fc.bias"))
    )
    expect = -ref if ref.sum() > 0 else ref.exp()
    assert torch.allclose(p(x), expect)
    text = splice.print_ir(p)
    assert splice.print_ir(splice.parse_ir(text, p.weights)) == text


def test_nested_sub_graphs_go_with_their_parent():
    p = prog()
    b = Builder(p, "mypass")
    z = p.node("z")
    spec = M.spec(z)
    outer = b.sub()
    a = outer.placeholder("a", spec)
    pred = outer.call(aten.gt.Scalar, (outer.call(aten.sum.default, (a,)), 0))
    c = outer.call(COND, (pred, outer.graph_ref("t", _branch(outer, spec, aten.neg.default)),
                          outer.graph_ref("f", _branch(outer, spec, aten.abs.default)), (a,)))  # fmt: skip
    outer.output((outer.call(operator.getitem, (c, 0)),))
    with b.at(p.output_node):
        ref = b.graph_ref("outer", outer)
        part = b.call(INVOKE, (ref, "outer", z))
        out = b.call(operator.getitem, (part, 0))
    assert M.spec(part) == M.TupleSpec((spec,))
    p.set_output("out", out)
    splice.verify(p)
    x = torch.randn(3, 4)
    r = torch.relu(
        torch.nn.functional.linear(x, p.get_weight("fc.weight"), p.get_weight("fc.bias"))
    )
    assert torch.allclose(p(x), -r if r.sum() > 0 else r.abs())


def test_sub_graph_errors():
    p = prog()
    b = Builder(p, "mypass")
    z = p.node("z")
    sub = _branch(b, M.spec(z), aten.neg.default)
    with pytest.raises(PassError, match="weights live in the top graph"):
        sub.weight("fc.weight")
    b.graph_ref("g", sub)
    with pytest.raises(PassError, match="@g is taken"):
        b.graph_ref("g", _branch(b, M.spec(z), aten.neg.default))
    other = b.sub()
    a = other.placeholder("a", M.TensorSpec((2,), torch.float32))
    other.output((a,))
    with b.at(p.output_node), pytest.raises(PassError, match="does not type-check.*takes"):
        b.call(COND, (z, b.graph_ref("h", other), b.graph_ref("h2", other), (z,)))


def test_emit_inlines_aten_ops_with_inferred_specs():
    p = prog()
    b = Builder(p, "mypass")
    z = p.node("z")
    with b.at(p.output_node):
        w = b.weight("fc.weight")

        def f(z, w, scale):
            h = torch.nn.functional.linear(z.T @ z, w.T)  # [6,6] @ [4,6]^T
            return torch.relu(h) * scale, h.sum(-1)

        r, s = b.emit(f, z, w, 2.0)
    made = [n for n in b.created if n.op == "call_function"]

    class F(torch.nn.Module):
        def forward(self, z, w):
            return f(z, w, 2.0)

    captured = splice.capture(F(), (torch.randn(3, 6), torch.randn(6, 4)))
    ops = [n for n in captured.graph.nodes if n.op == "call_function"]
    assert [(n.target, n.name) for n in made] == [(n.target, n.name) for n in ops]
    assert aten.linear.default in [n.target for n in made]  # ATen level as export: not t + addmm
    zz = torch.randn(3, 6)
    ww = p.get_weight("fc.weight").detach()
    er, es = f(zz, ww, 2.0)
    assert M.spec(r) == spec_of(er) and M.spec(s) == spec_of(es)
    assert all(M.loc(n).from_passes == ("mypass",) for n in made)
    p.set_output("out", r)
    splice.verify(p)
    x = torch.randn(3, 4)
    zr = torch.relu(torch.nn.functional.linear(x, ww, p.get_weight("fc.bias")))
    assert torch.allclose(p(x), f(zr, ww, 2.0)[0], atol=1e-5)


def test_emit_keeps_symbolic_dims_and_refuses_tensor_constants():
    p = splice.parse_ir(SYM)
    b = Builder(p, "t")
    y = p.node("y")
    with b.at(p.output_node):
        out = b.emit(lambda y: torch.cat([y, y * 2]).softmax(-1), y)
    assert M.spec(out) == M.TensorSpec(("2*s", 4), torch.float32)
    p.set_output("out", out)
    splice.verify(p)
    x = torch.randn(5, 4)
    assert torch.allclose(p(x), torch.cat([x.relu(), x.relu() * 2]).softmax(-1))
    with b.at(p.output_node), pytest.raises(PassError, match="tensor constant"):
        b.emit(lambda y: y + torch.tensor([1.0, 2.0, 3.0, 4.0]), y)
    with b.at(p.output_node), pytest.raises(PassError, match="cannot trace"):
        b.emit(lambda y: y @ torch.ones(3, 3), y)


def test_copy_keeps_spec_and_loc_or_reinfers():
    p = prog()
    q = prog()
    b = Builder(q, "mypass")
    y, z = p.node("y"), p.node("z")
    qz = q.node("z")  # f32[3,6]: linear with fc.weight f32[6,4] does not apply
    with b.at(q.output_node):
        same = b.copy(z, lambda a: q.node("y"))
        other = b.copy(z, lambda a: q.node("x"))  # relu of an f32[3,4]
    assert M.loc(same) == M.loc(z) and M.spec(same) == M.spec(z)
    assert M.spec(other) == M.TensorSpec((3, 4), torch.float32)  # re-inferred
    with b.at(q.output_node), pytest.raises(PassError, match="does not type-check"):
        b.copy(y, {y.args[0]: qz, y.args[1]: b.weight("fc.weight"),
                   y.args[2]: b.weight("fc.bias")}.__getitem__)  # fmt: skip
    mark_part_start(same)
    assert starts_part(same) and not starts_part(other)


def test_rewriter_is_a_builder():
    p = prog()
    rw = Rewriter(p, "x")
    assert isinstance(rw, Builder)
    with rw.at(p.node("z")), pytest.raises(PassError, match="^x: new node"):
        rw.call(aten.mm.default, (p.node("y"), p.node("y")))


def test_a_builder_of_an_existing_sub_graph_and_an_explicit_loc():
    p = prog()
    b = Builder(p, "mypass")
    z = p.node("z")
    with b.at(p.output_node):
        ref = b.graph_ref("then_0", _branch(b, M.spec(z), aten.neg.default))
    sub = p.subgraphs["then_0"]
    sb = Builder(p, "other", sub)
    a = next(iter(sub.graph.find_nodes(op="placeholder")))
    neg = next(n for n in sub.graph.nodes if n.op == "call_function")
    with sb.at(neg, after=True), sb.loc(M.Loc("here")):
        t = sb.call(aten.t.default, (a,))
        w = sb.placeholder("w", M.TensorSpec((2,), torch.float32))
    assert M.spec(t) == M.TensorSpec((6, 3), torch.float32)
    assert M.loc(t) == M.Loc("here", from_passes=("other",))
    assert [n.name for n in sub.graph.find_nodes(op="placeholder")] == ["a", "w"]
    assert M.spec(w) == M.TensorSpec((2,), torch.float32) and M.spec(ref) == M.GraphRefSpec(
        "then_0"
    )
