"""``hyper``: Before/Expected in the text form.

Pinned: a target weight becomes the output of a hypernetwork, θ = θ0 + Δθ(E(γ)), fed by a
new program input (named by ``input=``), with the MIP encoding [cos(πγ/2), sin(πγ/2)]; the
chunked form (⌈N/c⌉ chunk embeddings, one shared head of c rows, the surplus dropped);
weights the targets leave out are untouched; a target read inside ``cond`` branches is
computed once in the top graph and passed in as the operand; what the pass refuses, with
its message. (The hidden-layer and per-sample forms are pinned in tests/test_hyper.py.)
The pass has no "nothing to do" outcome: targets matching no parameter is an error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_pass, seeded_weights

import splice
from splice.errors import PassError

LINEAR = """
weight @fc.weight : f32[3,4] param
weight @fc.bias : f32[3] param
program @p(%x : f32[2,4]) {
  %a : f32[2,3] = aten.linear(%x, @fc.weight, @fc.bias)
  return out=%a
}
"""


def test_a_weight_becomes_the_hypernetwork_output_of_a_new_input():
    w = seeded_weights(LINEAR)
    q = check_pass(
        "hyper{targets=fc.weight,hidden=[],input=gamma}",
        LINEAR,
        """
        # splice IR v1
        attr hyper = {"hyper": {"batch": null, "chunk_size": null, "cond_dim": 1, "encoding": "mip", "hidden": [], "hypernet": ["hyper.net.0.weight"], "init": "preserve", "input": "gamma", "num_chunks": null, "per_sample": false, "targets": [{"name": "fc.weight", "offset": 0, "shape": [3, 4], "value": "hyper_w"}], "theta0": "hyper.theta0"}}
        weight @fc.bias : f32[3] param
        weight @hyper.net.0.weight : f32[12,2] param
        weight @hyper.theta0 : f32[12] param
        program @p(%x : f32[2,4], %gamma : f32[1]) {
          %mul : f32[1] = aten.mul.Tensor(%gamma, 1.5707963267948966)
          %cos : f32[1] = aten.cos(%mul)
          %sin : f32[1] = aten.sin(%mul)
          %cat : f32[2] = aten.cat([%cos, %sin], -1)
          %hyper_delta : f32[12] = aten.linear(%cat, @hyper.net.0.weight)
          %hyper_theta : f32[12] = aten.add.Tensor(%hyper_delta, @hyper.theta0)
          %slice_1 : f32[12] = aten.slice.Tensor(%hyper_theta, 0, 0, 12)
          %hyper_w : f32[3,4] = aten.view(%slice_1, [3, 4])
          %a : f32[2,3] = aten.linear(%x, %hyper_w, @fc.bias)
          return out=%a
        }
        """,
        w,
    )
    assert torch.equal(q.get_weight("fc.bias"), w["fc.bias"])  # not a target: untouched
    assert torch.equal(q.get_weight("hyper.theta0"), w["fc.weight"].reshape(-1))
    assert not q.get_weight("hyper.net.0.weight").any()  # init=preserve: a zero head
    x = torch.randn(2, 4)
    torch.testing.assert_close(q(x, torch.rand(1)), splice.parse_ir(LINEAR, w)(x))


def test_chunked_hypernetwork():
    """15 target values, chunks of 8: two chunk embeddings, one [8, 4] head, 1 value dropped."""
    w = seeded_weights(LINEAR)
    q = check_pass(
        "hyper{targets=fc.*,hidden=[],chunk_size=8,chunk_emb=2,encoding=identity,cond_dim=2}",
        LINEAR,
        """
        # splice IR v1
        attr hyper = {"hyper": {"batch": null, "chunk_size": 8, "cond_dim": 2, "encoding": "identity", "hidden": [], "hypernet": ["hyper.net.0.weight", "hyper.chunk_emb"], "init": "preserve", "input": "cond", "num_chunks": 2, "per_sample": false, "targets": [{"name": "fc.weight", "offset": 0, "shape": [3, 4], "value": "hyper_w"}, {"name": "fc.bias", "offset": 12, "shape": [3], "value": "hyper_w_1"}], "theta0": "hyper.theta0"}}
        weight @hyper.net.0.weight : f32[8,4] param
        weight @hyper.chunk_emb : f32[2,2] param
        weight @hyper.theta0 : f32[15] param
        program @p(%x : f32[2,4], %cond : f32[2]) {
          %unsqueeze : f32[1,2] = aten.unsqueeze(%cond, -2)
          %expand : f32[2,2] = aten.expand(%unsqueeze, [2, 2])
          %cat : f32[2,4] = aten.cat([%expand, @hyper.chunk_emb], -1)
          %hyper_delta : f32[2,8] = aten.linear(%cat, @hyper.net.0.weight)
          %view : f32[16] = aten.view(%hyper_delta, [16])
          %slice_1 : f32[15] = aten.slice.Tensor(%view, 0, 0, 15)
          %hyper_theta : f32[15] = aten.add.Tensor(%slice_1, @hyper.theta0)
          %slice_2 : f32[12] = aten.slice.Tensor(%hyper_theta, 0, 0, 12)
          %hyper_w : f32[3,4] = aten.view(%slice_2, [3, 4])
          %slice_3 : f32[3] = aten.slice.Tensor(%hyper_theta, 0, 12, 15)
          %hyper_w_1 : f32[3] = aten.view(%slice_3, [3])
          %a : f32[2,3] = aten.linear(%x, %hyper_w, %hyper_w_1)
          return out=%a
        }
        """,
        w,
    )
    x = torch.randn(2, 4)
    torch.testing.assert_close(q(x, torch.rand(2)), splice.parse_ir(LINEAR, w)(x))


BRANCHES = """
weight @up.weight : f32[8,4] param
weight @down.weight : f32[4,8] param
program @p(%x : f32[2,4], %flag : bool[]) {
  graph @t(%x : f32[2,4], %wu : f32[8,4], %wd : f32[4,8]) {
    %h : f32[2,8] = aten.linear(%x, %wu)
    %a : f32[2,8] = aten.relu(%h)
    %y : f32[2,4] = aten.linear(%a, %wd)
    return (%y,)
  }
  graph @f(%x : f32[2,4], %wu : f32[8,4], %wd : f32[4,8]) {
    %n : f32[2,4] = aten.neg(%x)
    %h : f32[2,8] = aten.linear(%n, %wu)
    %a : f32[2,8] = aten.relu(%h)
    %y : f32[2,4] = aten.linear(%a, %wd)
    return (%y,)
  }
  %cond : (f32[2,4],) = higher_order.cond(%flag, @t, @f, (%x, @up.weight, @down.weight))
  %out : f32[2,4] = operator.getitem(%cond, 0)
  return out=%out
}
"""


def test_a_target_read_in_branches_is_computed_once_and_passed_in():
    """The new input is ``cond_1``: the program already has a value ``%cond``."""
    w = seeded_weights(BRANCHES)
    q = check_pass(
        "hyper{targets=up.weight,hidden=[]}",
        BRANCHES,
        """
        # splice IR v1
        attr hyper = {"hyper": {"batch": null, "chunk_size": null, "cond_dim": 1, "encoding": "mip", "hidden": [], "hypernet": ["hyper.net.0.weight"], "init": "preserve", "input": "cond_1", "num_chunks": null, "per_sample": false, "targets": [{"name": "up.weight", "offset": 0, "shape": [8, 4], "value": "hyper_w"}], "theta0": "hyper.theta0"}}
        weight @down.weight : f32[4,8] param
        weight @hyper.net.0.weight : f32[32,2] param
        weight @hyper.theta0 : f32[32] param
        program @p(%x : f32[2,4], %flag : bool[], %cond_1 : f32[1]) {
          graph @t(%x : f32[2,4], %wu : f32[8,4], %wd : f32[4,8]) {
            %h : f32[2,8] = aten.linear(%x, %wu)
            %a : f32[2,8] = aten.relu(%h)
            %y : f32[2,4] = aten.linear(%a, %wd)
            return (%y,)
          }
          graph @f(%x : f32[2,4], %wu : f32[8,4], %wd : f32[4,8]) {
            %n : f32[2,4] = aten.neg(%x)
            %h : f32[2,8] = aten.linear(%n, %wu)
            %a : f32[2,8] = aten.relu(%h)
            %y : f32[2,4] = aten.linear(%a, %wd)
            return (%y,)
          }
          %mul : f32[1] = aten.mul.Tensor(%cond_1, 1.5707963267948966)
          %cos : f32[1] = aten.cos(%mul)
          %sin : f32[1] = aten.sin(%mul)
          %cat : f32[2] = aten.cat([%cos, %sin], -1)
          %hyper_delta : f32[32] = aten.linear(%cat, @hyper.net.0.weight)
          %hyper_theta : f32[32] = aten.add.Tensor(%hyper_delta, @hyper.theta0)
          %slice_1 : f32[32] = aten.slice.Tensor(%hyper_theta, 0, 0, 32)
          %hyper_w : f32[8,4] = aten.view(%slice_1, [8, 4])
          %cond : (f32[2,4],) = higher_order.cond(%flag, @t, @f, (%x, %hyper_w, @down.weight))
          %out : f32[2,4] = operator.getitem(%cond, 0)
          return out=%out
        }
        """,
        w,
    )
    p = splice.parse_ir(BRANCHES, w)
    x = torch.randn(2, 4)
    for flag in (True, False):
        want = p(x, torch.tensor(flag))
        torch.testing.assert_close(q(x, torch.tensor(flag), torch.rand(1)), want)


def test_targets_matching_no_parameter_are_an_error():
    with pytest.raises(PassError) as e:
        check_pass("hyper{targets=nothing.*}", LINEAR, "")
    assert e.value.message == "hyper: no parameter of program 'p' matches targets='nothing.*'"
    assert e.value.hint == "globs match state_dict names; parameters: fc.weight, fc.bias"


def test_a_per_sample_weight_read_by_a_reduction_is_an_error():
    before = """
    weight @fc.weight : f32[3,4] param
    weight @g : f32[3] param
    program @p(%x : f32[2,4]) {
      %a : f32[2,3] = aten.linear(%x, @fc.weight)
      %s : f32[] = aten.sum(@g)
      %b : f32[2,3] = aten.mul.Tensor(%a, %s)
      return out=%b
    }
    """
    with pytest.raises(PassError) as e:
        check_pass("hyper{targets=g,per_sample=true,hidden=[]}", before, "")
    assert e.value.message == (
        "hyper{per_sample=true}: %s (aten.sum) reads a target weight and has no per-sample form"
    )
