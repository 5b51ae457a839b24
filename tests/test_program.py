"""Program: running, copies, versions, signature edits, weights, extract and compose."""

from __future__ import annotations

import pytest
import torch
from conftest import ir

import splice
from splice.errors import VerificationError
from splice.ir import meta as M
from splice.ir.program import compose

MLP = """
weight @fc1.weight : f32[8,4] param
weight @fc1.bias : f32[8] param
weight @fc2.weight : f32[3,8] param
program @mlp(%x : f32[2,4]) {
  %h : f32[2,8] = aten.linear(%x, @fc1.weight, @fc1.bias)
  %a : f32[2,8] = aten.relu(%h)
  %y : f32[2,3] = aten.linear(%a, @fc2.weight)
  return y=%y
}
"""


def mlp():
    g = torch.Generator().manual_seed(0)
    return ir(
        MLP,
        fc1__weight=torch.randn(8, 4, generator=g),
        fc1__bias=torch.randn(8, generator=g),
        fc2__weight=torch.randn(3, 8, generator=g),
    )


def reference(p, x):
    w = p.weights
    return torch.relu(x @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T


def test_run_positional_keyword_and_numpy():
    p = mlp()
    x = torch.randn(2, 4)
    ref = reference(p, x)
    assert torch.allclose(p(x), ref)
    assert torch.allclose(p(x=x), ref)
    assert torch.allclose(p(x.numpy()), ref)
    assert torch.allclose(p.run_named(x)["y"], ref)
    with pytest.raises(TypeError, match="missing input 'x'"):
        p()
    with pytest.raises(TypeError, match="unknown inputs"):
        p(x, z=x)


def test_version_changes_on_every_edit_and_copy_is_independent():
    p = mlp()
    v0 = p.version
    q = p.copy()
    assert q.version == v0 and q.uid != p.uid
    relu = q.node("a")
    with q.graph.inserting_after(relu):
        extra = q.graph.call_function(torch.ops.aten.neg.default, (relu,))
    assert q.version != v0
    v1 = q.version
    q.graph.erase_node(extra)
    assert q.version != v1
    v2 = q.version
    q.add_output("hidden", relu)
    assert q.version != v2
    v3 = q.version
    q.add_weight("extra", torch.zeros(2), "constant")
    assert q.version != v3
    # the original is untouched
    assert p.version == v0 and p.output_names == ["y"] and not p.has_weight("extra")
    assert splice.print_ir(p) == splice.print_ir(mlp())


def test_copy_shares_weights_but_not_graph():
    p = mlp()
    q = p.copy()
    assert q.get_weight("fc1.weight") is p.get_weight("fc1.weight")
    assert q.graph is not p.graph
    assert splice.print_ir(q, locations=True) == splice.print_ir(p, locations=True)


def test_named_parameters_and_buffers():
    p = mlp()
    p.add_weight("scale", torch.ones(3), "buffer")
    assert set(p.named_parameters()) == {"fc1.weight", "fc1.bias", "fc2.weight"}
    assert set(p.named_buffers()) == {"scale"}
    assert isinstance(p.get_weight("fc1.weight"), torch.nn.Parameter)
    assert not isinstance(p.get_weight("scale"), torch.nn.Parameter)
    module = p.to_module()
    assert {n for n, _ in module.named_parameters()} == {"fc1.weight", "fc1.bias", "fc2.weight"}
    with pytest.raises(ValueError, match="still read by"):
        p.remove_weight("fc1.weight")
    p.remove_weight("scale")
    assert not p.has_weight("scale")


def test_add_and_remove_inputs_and_outputs():
    p = mlp()
    cond = p.add_input("cond", M.TensorSpec((3,), torch.float32))
    y = p.node("y")
    with p.graph.inserting_after(y):
        z = p.graph.call_function(torch.ops.aten.add.Tensor, (y, cond))
    M.set_spec(z, M.TensorSpec((2, 3), torch.float32))
    p.set_output("y", z)
    p.add_output("hidden", p.node("a"))
    assert p.input_names == ["x", "cond"]
    assert p.output_names == ["y", "hidden"]
    splice.verify(p)
    x, c = torch.randn(2, 4), torch.randn(3)
    y_out, h = p(x, c)
    assert torch.allclose(y_out, reference(mlp(), x) + c)
    assert h.shape == (2, 8)
    with pytest.raises(ValueError, match="still used by"):
        p.remove_input("cond")
    p.remove_output("hidden")
    with pytest.raises(ValueError, match="already exists"):
        p.add_input("x", M.TensorSpec((1,), torch.float32))
    with pytest.raises(KeyError, match="no output 'nope'"):
        p.remove_output("nope")


def test_extract_between_values():
    p = mlp()
    head = p.extract(["a"], ["y"], name="head")
    assert head.input_names == ["a"] and head.output_names == ["y"]
    assert set(head.weight_kinds) == {"fc2.weight"}
    splice.verify(head)
    a = torch.randn(2, 8)
    assert torch.allclose(head(a), a @ p.get_weight("fc2.weight").T)
    front = p.extract(["x"], ["a"])
    assert set(front.weight_kinds) == {"fc1.weight", "fc1.bias"}
    with pytest.raises(VerificationError, match="needs program input %x"):
        p.extract([], ["a"])


def test_compose_reassembles_the_program():
    p = mlp()
    front = p.extract(["x"], ["a"])
    back = p.extract(["a"], ["y"])
    whole = compose(front, back)
    splice.verify(whole)
    x = torch.randn(2, 4)
    assert torch.equal(whole(x), p(x))
    assert whole.input_names == ["x"] and whole.output_names == ["y"]
    both = compose(front, back, keep_first_outputs=True)
    y, a = both(x)
    assert torch.equal(y, p(x)) and a.shape == (2, 8)


def test_compose_rejects_conflicting_weights():
    p, q = mlp(), mlp()  # equal values, but different tensors
    with pytest.raises(ValueError, match="different weight @fc1.bias"):
        compose(p.extract(["x"], ["x", "h"]), q.extract(["x"], ["y"]), {"x": "x"})


def test_compose_rejects_mismatched_bindings():
    p = mlp()
    with pytest.raises(ValueError, match=r"input x \(f32\[2,4\]\) .* output a \(f32\[2,8\]\)"):
        compose(p.extract(["x"], ["a"]), p.extract(["x"], ["y"]), {"x": "a"})


def test_repr_is_informative():
    assert repr(mlp()).startswith("Program('mlp', inputs=['x'], outputs=['y'], ops=3, weights=3")


def test_weight_for_input_reads_the_weight_with_the_inputs_spec():
    import torch.fx as fx

    from splice.ir.program import weight_for_input

    g = fx.Graph()
    ph = g.placeholder("w")
    M.set_spec(ph, M.TensorSpec((8, 4), torch.float32))
    node = weight_for_input(g, "fc1.weight", ph)
    assert node.op == "get_attr" and node.target == "fc1.weight"
    assert M.spec(node) == M.spec(ph) and M.loc(node).is_unknown()


def test_spec_json_is_the_manifest_form_of_a_tensor_spec():
    from splice.errors import ArtifactError

    assert M.spec_json(M.TensorSpec((2, "s0"), torch.float32)) == {
        "shape": [2, "s0"],
        "dtype": "f32",
    }
    with pytest.raises(ArtifactError, match="must be tensors"):
        M.spec_json(M.ScalarSpec("int"))
