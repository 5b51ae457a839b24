"""``experts``: Before/Expected in the text form.

Pinned: a gated FFN (SwiGLU) becomes one ``splice.moe_ffn`` whose expert e holds rows S_e of
W_gate and W_up and columns S_e of W_down (``contiguous``: S_e = [e·s, (e+1)·s)), with every
expert selected it equals the dense FFN; a plain FFN with biases keeps b_out once, outside
the experts, and the selection options reach the op's literals (``top_p``, ``prob`` gates,
``e_over_k``); one FFN read in both branches of a ``cond`` is split once, its experts
threaded into both; FFNs the pass must not split are left alone; the option errors. (A
plain ReLU FFN with ``top_k=1`` is pinned in tests/test_experts.py.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_pass, seeded_weights

import splice
from splice.errors import PipelineError

GATED = """
weight @mlp.gate_proj.weight : f32[8,4] param
weight @mlp.up_proj.weight : f32[8,4] param
weight @mlp.down_proj.weight : f32[4,8] param
program @p(%x : f32[2,4]) {
  %g : f32[2,8] = aten.linear(%x, @mlp.gate_proj.weight)
  %s : f32[2,8] = aten.silu(%g)
  %u : f32[2,8] = aten.linear(%x, @mlp.up_proj.weight)
  %h : f32[2,8] = aten.mul.Tensor(%s, %u)
  %y : f32[2,4] = aten.linear(%h, @mlp.down_proj.weight)
  return out=%y
}
"""


def test_a_gated_ffn_becomes_moe_ffn():
    w = seeded_weights(GATED)
    q = check_pass(
        "experts{num_experts=2,top_k=2,split=contiguous}",
        GATED,
        """
        # splice IR v1
        weight @mlp.experts.router_w : f32[2,4] param
        weight @mlp.experts.w_in : f32[2,4,4] param
        weight @mlp.experts.w_gate : f32[2,4,4] param
        weight @mlp.experts.w_out : f32[2,4,4] param
        program @p(%x : f32[2,4]) {
          %moe_ffn : f32[2,4] = splice.moe_ffn(%x, @mlp.experts.router_w, None, @mlp.experts.w_in, None, @mlp.experts.w_gate, None, @mlp.experts.w_out, None, "silu", 2, 0.0, "none", False)
          return out=%moe_ffn
        }
        """,
        w,
    )
    assert torch.equal(q.get_weight("mlp.experts.w_gate"), w["mlp.gate_proj.weight"].view(2, 4, 4))
    assert torch.equal(q.get_weight("mlp.experts.w_in"), w["mlp.up_proj.weight"].view(2, 4, 4))
    w_out = w["mlp.down_proj.weight"].T.reshape(2, 4, 4)
    assert torch.equal(q.get_weight("mlp.experts.w_out"), w_out)
    x = torch.randn(2, 4)
    torch.testing.assert_close(q(x), splice.parse_ir(GATED, w)(x), atol=1e-5, rtol=1e-5)


def test_a_plain_ffn_with_biases_and_top_p_selection():
    before = """
    weight @fc1.weight : f32[8,4] param
    weight @fc1.bias : f32[8] param
    weight @fc2.weight : f32[4,8] param
    weight @fc2.bias : f32[4] param
    program @p(%x : f32[2,4]) {
      %h : f32[2,8] = aten.linear(%x, @fc1.weight, @fc1.bias)
      %a : f32[2,8] = aten.gelu(%h)
      %y : f32[2,4] = aten.linear(%a, @fc2.weight, @fc2.bias)
      return out=%y
    }
    """
    w = seeded_weights(before)
    q = check_pass(
        "experts{num_experts=4,top_p=0.6,gates=prob,scale=e_over_k}",
        before,
        """
        # splice IR v1
        weight @fc2.bias : f32[4] param
        weight @fc1.experts.router_w : f32[4,4] param
        weight @fc1.experts.w_in : f32[4,2,4] param
        weight @fc1.experts.b_in : f32[4,2] param
        weight @fc1.experts.w_out : f32[4,2,4] param
        program @p(%x : f32[2,4]) {
          %moe_ffn : f32[2,4] = splice.moe_ffn(%x, @fc1.experts.router_w, None, @fc1.experts.w_in, @fc1.experts.b_in, None, None, @fc1.experts.w_out, @fc2.bias, "gelu", 0, 0.6, "e_over_k", True)
          return out=%moe_ffn
        }
        """,
        w,
    )
    assert torch.equal(q.get_weight("fc2.bias"), w["fc2.bias"])  # b_out once, unsplit
    # balanced k-means: a disjoint, covering partition of W_in's rows, b_in sliced with them
    rows = q.get_weight("fc1.experts.w_in").reshape(8, 4)
    order = [int((w["fc1.weight"] == r).all(1).nonzero()) for r in rows]
    assert sorted(order) == list(range(8))
    assert torch.equal(q.get_weight("fc1.experts.b_in").reshape(8), w["fc1.bias"][order])


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


def test_one_ffn_in_both_branches_is_split_once():
    w = seeded_weights(BRANCHES)
    q = check_pass(
        "experts{num_experts=2,top_k=2,split=contiguous}",
        BRANCHES,
        """
        # splice IR v1
        weight @up.experts.router_w : f32[2,4] param
        weight @up.experts.w_in : f32[2,4,4] param
        weight @up.experts.w_out : f32[2,4,4] param
        program @p(%x : f32[2,4], %flag : bool[]) {
          graph @t(%x : f32[2,4], %w_up_experts_router_w : f32[2,4], %w_up_experts_w_in : f32[2,4,4], %w_up_experts_w_out : f32[2,4,4]) {
            %moe_ffn : f32[2,4] = splice.moe_ffn(%x, %w_up_experts_router_w, None, %w_up_experts_w_in, None, None, None, %w_up_experts_w_out, None, "relu", 2, 0.0, "none", False)
            return (%moe_ffn,)
          }
          graph @f(%x : f32[2,4], %w_up_experts_router_w : f32[2,4], %w_up_experts_w_in : f32[2,4,4], %w_up_experts_w_out : f32[2,4,4]) {
            %n : f32[2,4] = aten.neg(%x)
            %moe_ffn : f32[2,4] = splice.moe_ffn(%n, %w_up_experts_router_w, None, %w_up_experts_w_in, None, None, None, %w_up_experts_w_out, None, "relu", 2, 0.0, "none", False)
            return (%moe_ffn,)
          }
          %cond : (f32[2,4],) = higher_order.cond(%flag, @t, @f, (%x, @up.experts.router_w, @up.experts.w_in, @up.experts.w_out))
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
        torch.testing.assert_close(q(x, torch.tensor(flag)), want, atol=1e-5, rtol=1e-5)


NOT_AN_FFN = """
# splice IR v1
weight @up.weight : f32[8,4] param
weight @down.weight : f32[4,8] param
program @p(%x : f32[2,4]) {
  %h : f32[2,8] = aten.linear(%x, @up.weight)
  %e : f32[2,8] = aten.exp(%h)
  %y : f32[2,4] = aten.linear(%e, @down.weight)
  return out=%y
}
"""


@pytest.mark.parametrize(
    "pipeline,text",
    [
        ("experts{num_experts=2,top_k=1}", NOT_AN_FFN),  # exp is no activation moe_ffn knows
        ("experts{num_experts=3,top_k=1}", "# splice IR v1\n" + GATED.lstrip()),  # 8 % 3 != 0
    ],
)
def test_what_is_not_a_splittable_ffn_is_left_alone(pipeline, text):
    check_pass(pipeline, text, text)


def test_top_k_above_the_number_of_experts_is_an_error():
    with pytest.raises(PipelineError) as e:
        check_pass("experts{num_experts=2,top_k=3}", GATED, "")
    assert e.value.message == "experts: top_k must be in [1, num_experts=2], got 3"
