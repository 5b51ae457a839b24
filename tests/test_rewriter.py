"""The Rewriter keeps specs and Locs right on every edit."""

from __future__ import annotations

import pytest
import torch
from conftest import ir

import splice
from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.rewriter import Rewriter

TEXT = """weight @fc.weight : f32[6,4] param
weight @fc.bias : f32[6] param
program @p(%x : f32[3,4]) {
  %y : f32[3,6] = aten.linear(%x, @fc.weight, @fc.bias)  # fc @ m.py:7
  %z : f32[3,6] = aten.relu(%y)  # act @ m.py:8
  return out=%z
}
"""


def prog():
    return ir(TEXT, fc__weight=torch.randn(6, 4), fc__bias=torch.randn(6))


def test_new_nodes_get_inferred_specs_and_stamped_locs():
    p = prog()
    rw = Rewriter(p, "mypass")
    y = p.node("y")
    with rw.at(y, after=True):
        t = rw.call(torch.ops.aten.t.default, (y,))
    assert M.spec(t) == M.TensorSpec((6, 3), torch.float32)
    assert M.loc(t) == M.Loc("fc", "m.py", 7, ("mypass",))
    assert t in rw.created


def test_replace_with_a_lowrank_op_keeps_the_program_valid():
    p = prog()
    before = p(torch.ones(3, 4))
    rw = Rewriter(p, "lowrank")
    y = p.node("y")
    W = p.get_weight("fc.weight").detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with rw.at(y):
        A = rw.add_weight("fc.A", U * S.sqrt())
        B = rw.add_weight("fc.B", S.sqrt()[:, None] * Vh)
        new = rw.call(
            torch.ops.splice.lowrank_linear.default, (y.args[0], A, B, rw.weight("fc.bias"))
        )
    rw.replace(y, new)
    assert rw.erase_unused_weights() == ["fc.weight"]
    splice.verify(p)
    assert torch.allclose(p(torch.ones(3, 4)), before, atol=1e-5)
    text = splice.print_ir(p, locations=True)
    assert "splice.lowrank_linear(%x, @fc.A, @fc.B, @fc.bias)  # fc @ m.py:7 [lowrank]" in text
    assert splice.print_ir(splice.parse_ir(text, p.weights), locations=True) == text


def test_replace_refuses_a_different_spec():
    p = prog()
    rw = Rewriter(p, "bad")
    y = p.node("y")
    with rw.at(y, after=True):
        t = rw.call(torch.ops.aten.t.default, (y,))
    with pytest.raises(
        PassError, match=r"cannot replace %y \(f32\[3,6\]\) by %t \(f32\[6,3\]\): specs differ"
    ):
        rw.replace(y, t)


def test_a_node_that_does_not_type_check_is_not_left_behind():
    p = prog()
    n_before = len(p.graph.nodes)
    rw = Rewriter(p, "bad")
    y = p.node("y")
    with rw.at(y, after=True), pytest.raises(PassError, match="does not type-check"):
        rw.call(torch.ops.aten.mm.default, (y, y))
    assert len(p.graph.nodes) == n_before
    splice.verify(p)


def test_set_args_reinfers_and_marks_changed():
    p = prog()
    rw = Rewriter(p, "swap")
    z = p.node("z")
    v = p.version
    rw.set_args(z, (p.node("x"),))
    assert M.spec(z) == M.TensorSpec((3, 4), torch.float32)
    assert M.loc(z).from_passes == ("swap",)
    assert p.version != v


def test_erase_refuses_used_nodes_and_new_inputs_are_stamped():
    p = prog()
    rw = Rewriter(p, "p1")
    with pytest.raises(PassError, match="still used by %z"):
        rw.erase(p.node("y"))
    c = rw.add_input("cond", M.TensorSpec((2,), torch.float32))
    assert M.loc(c).from_passes == ("p1",)
    assert p.input_names == ["x", "cond"]


def test_set_weight_replaces_the_value_and_retypes_its_readers():
    p = prog()
    rw = Rewriter(p, "mypass")
    v0 = p.version
    rw.set_weight("fc.bias", torch.zeros(6, dtype=torch.float64))
    (getter,) = [n for n in p.graph.find_nodes(op="get_attr") if n.target == "fc.bias"]
    assert M.spec(getter) == M.TensorSpec((6,), torch.float64)
    assert "mypass" in M.loc(getter).from_passes and p.version != v0
    assert p.get_weight("fc.bias").dtype == torch.float64
    with pytest.raises(PassError, match="no weight @nothing"):
        rw.set_weight("nothing", torch.zeros(1))
