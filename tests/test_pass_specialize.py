"""``specialize``: Before/Expected in the text form.

Pinned: for a ``hyper`` program, ``specialize{cond=[γ]}`` binds the input, evaluates the
hypernetwork once and folds the result into parameters under the targets' names and shapes
(the input, the hypernetwork's nodes and weights and the ``hyper`` attr gone); for a
per-sample program the restored weight is broadcast to the batch (``expand``) where the
per-sample forms read it; ``specialize{config=i}`` decides a ``stitch`` program's
``cond(config == k)`` chain and inlines the chosen route. The result equals the program
before, run with the bound input. The errors on user input, with their messages. The pass
has no "nothing to do" outcome: a program with neither a hypernetwork nor ``config`` is an
error.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import check_pass, seeded_weights

import splice
from splice.errors import PassError, PipelineError

# hyper{targets=fc.weight,hidden=[],input=gamma} of a Linear; seeded weights give the
# hypernetwork a non-zero head, so the folded weight depends on γ
HYPER = """
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
"""


def test_cond_is_bound_and_the_hypernetwork_folded():
    w = seeded_weights(HYPER)
    q = check_pass(
        "specialize{cond=[0.5]}",
        HYPER,
        """
        # splice IR v1
        weight @fc.bias : f32[3] param
        weight @fc.weight : f32[3,4] param
        program @p(%x : f32[2,4]) {
          %a : f32[2,3] = aten.linear(%x, @fc.weight, @fc.bias)
          return out=%a
        }
        """,
        w,
    )
    e = torch.tensor([math.cos(math.pi / 4), math.sin(math.pi / 4)])  # MIP encoding of 0.5
    theta = w["hyper.theta0"] + w["hyper.net.0.weight"] @ e
    torch.testing.assert_close(q.get_weight("fc.weight"), theta.view(3, 4))
    assert "hyper" not in q.attrs
    x = torch.randn(2, 4)
    torch.testing.assert_close(q(x), splice.parse_ir(HYPER, w)(x, torch.tensor([0.5])))


# hyper{targets=fc.weight,hidden=[],per_sample=true,encoding=identity} of the same Linear
PER_SAMPLE = """
# splice IR v1
attr hyper = {"hyper": {"batch": 2, "chunk_size": null, "cond_dim": 1, "encoding": "identity", "hidden": [], "hypernet": ["hyper.net.0.weight"], "init": "preserve", "input": "cond", "num_chunks": null, "per_sample": true, "targets": [{"name": "fc.weight", "offset": 0, "shape": [3, 4], "value": "hyper_w"}], "theta0": "hyper.theta0"}}
weight @fc.bias : f32[3] param
weight @hyper.net.0.weight : f32[12,1] param
weight @hyper.theta0 : f32[12] param
program @p(%x : f32[2,4], %cond : f32[2,1]) {
  %hyper_delta : f32[2,12] = aten.linear(%cond, @hyper.net.0.weight)
  %hyper_theta : f32[2,12] = aten.add.Tensor(%hyper_delta, @hyper.theta0)
  %slice_1 : f32[2,12] = aten.slice.Tensor(%hyper_theta, 1, 0, 12)
  %hyper_w : f32[2,3,4] = aten.view(%slice_1, [2, 3, 4])
  %reshape : f32[2,1,4] = aten.reshape(%x, [2, 1, 4])
  %transpose : f32[2,4,3] = aten.transpose.int(%hyper_w, 1, 2)
  %bmm : f32[2,1,3] = aten.bmm(%reshape, %transpose)
  %add : f32[2,1,3] = aten.add.Tensor(%bmm, @fc.bias)
  %view : f32[2,3] = aten.view(%add, [2, 3])
  return out=%view
}
"""


def test_per_sample_weights_are_restored_and_broadcast_to_the_batch():
    w = seeded_weights(PER_SAMPLE)
    q = check_pass(
        "specialize{cond=[0.25]}",
        PER_SAMPLE,
        """
        # splice IR v1
        weight @fc.bias : f32[3] param
        weight @fc.weight : f32[3,4] param
        program @p(%x : f32[2,4]) {
          %expand : f32[2,3,4] = aten.expand(@fc.weight, [2, 3, 4])
          %reshape : f32[2,1,4] = aten.reshape(%x, [2, 1, 4])
          %transpose : f32[2,4,3] = aten.transpose.int(%expand, 1, 2)
          %bmm : f32[2,1,3] = aten.bmm(%reshape, %transpose)
          %add : f32[2,1,3] = aten.add.Tensor(%bmm, @fc.bias)
          %view : f32[2,3] = aten.view(%add, [2, 3])
          return out=%view
        }
        """,
        w,
    )
    x = torch.randn(2, 4)
    want = splice.parse_ir(PER_SAMPLE, w)(x, torch.full((2, 1), 0.25))
    torch.testing.assert_close(q(x), want)


# the shape of a stitch program (tests/test_pass_stitch.py), two configurations
STITCHED = """
attr stitch = {"configs": [{"anchor": 0, "index": 0}, {"anchor": 1, "index": 1}]}
weight @a.weight : f32[3,4] param
weight @b.weight : f32[3,4] param
program @s(%x : f32[1,4], %config : i64[]) {
  graph @config_0_then(%x : f32[1,4], %config : i64[], %wa : f32[3,4], %wb : f32[3,4]) {
    %y : f32[1,3] = aten.linear(%x, %wa)
    return (%y,)
  }
  graph @config_0_else(%x : f32[1,4], %config : i64[], %wa : f32[3,4], %wb : f32[3,4]) {
    graph @config_1_then(%x : f32[1,4], %config : i64[], %wb : f32[3,4]) {
      %y : f32[1,3] = aten.linear(%x, %wb)
      %r : f32[1,3] = aten.relu(%y)
      return (%r,)
    }
    graph @config_1_else(%x : f32[1,4], %config : i64[], %wb : f32[3,4]) {
      %fill : f32[1,3] = aten.full([1, 3], nan, dtype=torch.float32)
      return (%fill,)
    }
    %eq : bool[] = aten.eq.Scalar(%config, 1)
    %cond : (f32[1,3],) = higher_order.cond(%eq, @config_1_then, @config_1_else, (%x, %config, %wb))
    %getitem : f32[1,3] = operator.getitem(%cond, 0)
    return (%getitem,)
  }
  %eq : bool[] = aten.eq.Scalar(%config, 0)
  %cond : (f32[1,3],) = higher_order.cond(%eq, @config_0_then, @config_0_else, (%x, %config, @a.weight, @b.weight))
  %out : f32[1,3] = operator.getitem(%cond, 0)
  return out=%out
}
"""


def test_config_inlines_the_chosen_route():
    w = seeded_weights(STITCHED)
    q = check_pass(
        "specialize{config=0},dce",
        STITCHED,
        """
        # splice IR v1
        weight @a.weight : f32[3,4] param
        program @s_config0(%x : f32[1,4]) {
          %y : f32[1,3] = aten.linear(%x, @a.weight)
          return out=%y
        }
        """,
        w,
    )
    x = torch.randn(1, 4)
    assert torch.equal(q(x), splice.parse_ir(STITCHED, w)(x, torch.tensor(0)))


def test_config_keeps_only_the_weights_the_route_reads():
    check_pass(
        "specialize{config=1}",
        STITCHED,
        """
        # splice IR v1
        weight @b.weight : f32[3,4] param
        program @s_config1(%x : f32[1,4]) {
          %y : f32[1,3] = aten.linear(%x, @b.weight)
          %r : f32[1,3] = aten.relu(%y)
          return out=%r
        }
        """,
    )


@pytest.mark.parametrize(
    "pipeline,text,error,message",
    [
        (
            "specialize{cond=[0.5,0.2]}",
            HYPER,
            PassError,
            "specialize: cond has 2 values but hypernetwork 'hyper' takes cond_dim=1",
        ),
        (
            "specialize{cond=[0.5],prefix=nope}",
            HYPER,
            PassError,
            "program 'p' has no hypernetwork 'nope'",
        ),
        ("specialize{cond=[0.5]}", STITCHED, PassError, "program 's' has no hypernetwork"),
        ("specialize{config=2}", STITCHED, PassError, "configuration 2 does not exist (0..1)"),
        (
            "specialize",
            HYPER,
            PipelineError,
            "specialize needs cond=[...] (the hypernetwork input to fold) or config=i (the "
            "stitch configuration to keep)",
        ),
        (
            "specialize{config=1,cond=[0.5]}",
            STITCHED,
            PipelineError,
            "specialize takes cond=[...] or config=i, not both",
        ),
    ],
)
def test_errors(pipeline, text, error, message):
    with pytest.raises(error) as e:
        check_pass(pipeline, text, "")
    assert type(e.value) is error and e.value.message == message
