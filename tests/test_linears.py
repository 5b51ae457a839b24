"""The shared recognisers of splice.passes: linear sites (every form lowrank, experts and
hyper read), their readers, and the targets/exclude globs."""

from __future__ import annotations

import torch
from conftest import ir

from splice.passes.globs import matches
from splice.passes.linears import find_linears, linear_readers, transpose_of, unresolved_linears
from splice.passes.subgraphs import GraphTree

FORMS = """weight @fc.weight : f32[3,4] param
weight @fc.bias : f32[3] param
weight @conv1d.weight : f32[4,3] param
weight @conv1d.bias : f32[3] param
weight @mm.weight : f32[3,4] param
weight @mat.weight : f32[4,3] param
weight @bm.weight : f32[3,4] param
weight @buf.weight : f32[3,4] buffer
weight @m : f32[2,3] param
program @p(%x : f32[2,4], %w : f32[3,4]) {
  %a : f32[2,3] = aten.linear(%x, @fc.weight, @fc.bias)
  %b : f32[2,3] = aten.addmm(@conv1d.bias, %x, @conv1d.weight)
  %mt : f32[4,3] = aten.t(@mm.weight)
  %c : f32[2,3] = aten.mm(%x, %mt)
  %d : f32[2,3] = aten.matmul(%x, @mat.weight)
  %bt : f32[4,3] = aten.t(@bm.weight)
  %e : f32[2,3] = aten.addmm(@m, %x, %bt)
  %f : f32[2,3] = aten.linear(%x, %w)
  %g : f32[2,3] = aten.linear(%x, @buf.weight)
  return a=%a, b=%b, c=%c, d=%d, e=%e, f=%f, g=%g
}"""


def _forms():
    g = torch.Generator().manual_seed(0)
    shapes = {"fc__weight": (3, 4), "fc__bias": (3,), "conv1d__weight": (4, 3),
              "conv1d__bias": (3,), "mm__weight": (3, 4), "mat__weight": (4, 3),
              "bm__weight": (3, 4), "buf__weight": (3, 4), "m": (2, 3)}  # fmt: skip
    return ir(FORMS, **{k: torch.randn(*s, generator=g) for k, s in shapes.items()})


def test_every_linear_form_is_a_site_and_the_others_are_named():
    p = _forms()
    sites = {s.node.name: s for s in find_linears(p)}
    # linear, Conv1D addmm (W stored transposed), mm of a transpose, matmul of a [in, out]
    # parameter; not: addmm with a matrix "bias", a program input, a buffer
    assert sorted(sites) == ["a", "b", "c", "d"]
    assert [(sites[n].weight, sites[n].transposed, sites[n].layer) for n in "abcd"] == [
        ("fc.weight", False, "fc"),
        ("conv1d.weight", True, "conv1d"),
        ("mm.weight", False, "mm"),
        ("mat.weight", True, "mat"),
    ]
    assert sites["a"].bias.target == "fc.bias" and sites["c"].bias is None
    assert sites["b"].current_x().name == "x" and sites["b"].current_bias() is sites["b"].bias
    assert sites["a"].site == "%a" and sites["a"].weights == ("fc.weight",)
    reasons = {u["site"]: u["reason"] for u in unresolved_linears(GraphTree(p))}
    assert reasons == {
        "%f": "its weight is the program input %w",
        "%g": "its weight @buf.weight is a buffer, not a parameter",
    }


def test_readers_look_through_transposes():
    p = _forms()
    tree = GraphTree(p)
    assert {n.name for n in linear_readers(tree, "mm.weight")} == {"c"}
    assert {n.name for n in linear_readers(tree, "fc.weight")} == {"a"}
    mt = next(n for n in p.graph.nodes if n.name == "mt")
    assert transpose_of(mt).target == "mm.weight"
    assert transpose_of(next(n for n in p.graph.nodes if n.name == "c")) is None


def test_targets_and_exclude_globs():
    assert matches("h.0.mlp.fc", "*.mlp.*")
    assert matches("h.0.mlp.fc", "h.1.*|*.fc", "")
    assert not matches("h.0.mlp.fc", "*.mlp.*", "h.0.*")
    assert not matches("h.0.mlp.fc", "")  # no target glob: nothing selected
    assert not matches("H.0", "h.*")  # case-sensitive
