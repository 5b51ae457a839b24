"""verify catches broken programs, and its errors name the node, module path and source line."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import splice
from splice.errors import VerificationError
from splice.ir import meta as M


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "mixtral", "convnet"])
def test_captured_programs_verify(name, captured):
    splice.verify(captured(name))


def _linear_node(p):
    return next(
        n
        for n in p.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default
    )


def test_dangling_use(captured):
    p = captured("bert")
    node = _linear_node(p)
    # a value from another graph: what a pass leaves behind when it erases without redirecting
    other = fx.Graph()
    ghost = other.placeholder("ghost")
    node.args = (ghost, *node.args[1:])
    with pytest.raises(VerificationError) as info:
        splice.verify(p)
    e = info.value
    assert e.node == node.name
    assert "dangling use" in e.message and "%ghost" in e.message
    assert "module encoder.layer.0.attention.self.query" in str(e)
    assert "modeling_bert.py:" in str(e)


def test_wrong_shape_spec(captured):
    p = captured("bert")
    node = _linear_node(p)
    M.set_spec(node, M.TensorSpec((1, 8, 65), torch.float32))
    with pytest.raises(VerificationError) as info:
        splice.verify(p)
    e = info.value
    assert e.node == node.name
    assert r"recorded as f32[1,8,65] but its op computes f32[1,8,64]" in e.message
    assert "module encoder.layer.0.attention.self.query" in str(e)


def test_wrong_dtype_spec(captured):
    p = captured("gpt2")
    node = next(n for n in p.graph.nodes if n.op == "call_function" and "addmm" in str(n.target))
    s = M.tensor_spec(node)
    M.set_spec(node, M.TensorSpec(s.shape, torch.float16))
    with pytest.raises(VerificationError, match="recorded as f16"):
        splice.verify(p)


def test_unknown_op(captured):
    p = captured("llama")
    node = next(
        n
        for n in p.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.silu.default
    )
    node.target = torch.nn.functional.silu  # a Python function, not an op
    with pytest.raises(VerificationError) as info:
        splice.verify(p)
    e = info.value
    assert e.node == node.name
    assert "torch.nn.functional.silu, which is not a known op" in e.message
    assert "module model.layers.0.mlp.act_fn" in str(e)


def test_missing_parameter(captured):
    p = captured("vit")
    getter = next(
        n for n in p.graph.nodes if n.op == "get_attr" and n.target.endswith("dense.weight")
    )
    user = next(iter(getter.users))
    getter.target = "encoder.layer.0.nope.weight"
    with pytest.raises(VerificationError) as info:
        splice.verify(p)
    e = info.value
    assert e.node == getter.name
    assert "@encoder.layer.0.nope.weight, which does not exist" in e.message
    assert user.name  # the user is unchanged; the getter is what breaks


def test_splice_op_schema_mismatch():
    text = """weight @A : f32[4,2] param
weight @B : f32[2,3] param
program @p(%x : f32[5,3]) {
  %y : f32[5,4] = splice.lowrank_linear(%x, @A, @B, None, 2, 7)
  return out=%y
}"""
    p = splice.parse_ir(text, {"A": torch.randn(4, 2), "B": torch.randn(2, 3)})
    with pytest.raises(
        VerificationError, match="lowrank_linear takes at most 5 positional arguments, got 6"
    ):
        splice.verify(p)
    bad_shape = text.replace("f32[2,3] param", "f32[2,6] param").replace(", 7)", ")")
    p = splice.parse_ir(bad_shape, {"A": torch.randn(4, 2), "B": torch.randn(2, 6)})
    with pytest.raises(VerificationError, match="x has 3 features, B takes 6"):
        splice.verify(p)


def test_missing_spec_and_undeclared_symbol():
    text = """program @p(%x : f32[4]) {
  %y : f32[4] = aten.relu(%x)
  return out=%y
}"""
    p = splice.parse_ir(text)
    p.node("y").meta.clear()
    with pytest.raises(VerificationError, match="%y has no spec"):
        splice.verify(p)
    p = splice.parse_ir(
        text.replace("f32[4]) {", "f32[n]) {").replace("%y : f32[4]", "%y : f32[n]")
    )
    with pytest.raises(VerificationError, match="undeclared symbols"):
        splice.verify(p)


def test_output_names_must_match_outputs(captured):
    p = captured("convnet")
    p.output_node.args = ((*p.output_values, p.output_values[0]),)
    with pytest.raises(VerificationError, match="2 output values but 1 output names"):
        splice.verify(p)
