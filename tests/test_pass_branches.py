"""``branches``: Before/Expected in the text form.

Pinned: every graph is cut at its ``cond`` nodes into branch-free parts called through
``higher_order.invoke_subgraph``, whose inputs are the segment's live-in values and whose
outputs its live-out values (a branch predicate included), leaving host code (part calls,
``cond`` over host graphs, ``getitem``); outputs that are a live-in through an identity op
or depend on weights only are hoisted into the host (the latter as constant weights), and
a segment left with no outputs is no part; a program with no ``cond``, or one already split,
is left alone. The split program equals the input on every path. The pass has no error on
user input.
"""

from __future__ import annotations

import torch
from conftest import check_pass, seeded_weights

import splice

CAPTURED = """
weight @a.weight : f32[4,4] param
weight @a.bias : f32[4] param
weight @b.weight : f32[4,4] param
weight @b.bias : f32[4] param
program @M(%x : f32[2,4]) {
  graph @true_graph_0(%relu : f32[2,4], %p_b_bias : f32[4], %p_b_weight : f32[4,4]) {
    %linear : f32[2,4] = aten.linear(%relu, %p_b_weight, %p_b_bias)
    return (%linear,)
  }
  graph @false_graph_0(%relu : f32[2,4], %p_b_bias : f32[4], %p_b_weight : f32[4,4]) {
    %mul : f32[2,4] = aten.mul.Tensor(%relu, 2.0)
    return (%mul,)
  }
  %linear : f32[2,4] = aten.linear(%x, @a.weight, @a.bias)
  %relu : f32[2,4] = aten.relu(%linear)
  %sum_1 : f32[] = aten.sum(%relu)
  %gt : bool[] = aten.gt.Scalar(%sum_1, 0)
  %cond : (f32[2,4],) = higher_order.cond(%gt, @true_graph_0, @false_graph_0, (%relu, @b.bias, @b.weight))
  %getitem : f32[2,4] = operator.getitem(%cond, 0)
  %add : f32[2,4] = aten.add.Tensor(%getitem, 1.0)
  return out=%add
}
"""


SPLIT = """
# splice IR v1
weight @a.weight : f32[4,4] param
weight @a.bias : f32[4] param
weight @b.weight : f32[4,4] param
weight @b.bias : f32[4] param
program @M(%x : f32[2,4]) {
  graph @part_0(%x : f32[2,4], %w_a_weight : f32[4,4], %w_a_bias : f32[4]) {
    %linear : f32[2,4] = aten.linear(%x, %w_a_weight, %w_a_bias)
    %relu : f32[2,4] = aten.relu(%linear)
    %sum_1 : f32[] = aten.sum(%relu)
    %gt : bool[] = aten.gt.Scalar(%sum_1, 0)
    return (%relu, %gt)
  }
  graph @true_graph_0(%relu : f32[2,4], %p_b_bias : f32[4], %p_b_weight : f32[4,4]) {
    graph @part_1(%relu : f32[2,4], %w_b_weight : f32[4,4], %w_b_bias : f32[4]) {
      %linear : f32[2,4] = aten.linear(%relu, %w_b_weight, %w_b_bias)
      return (%linear,)
    }
    %invoke_subgraph : (f32[2,4],) = higher_order.invoke_subgraph(@part_1, "part_1", %relu, %p_b_weight, %p_b_bias)
    %getitem : f32[2,4] = operator.getitem(%invoke_subgraph, 0)
    return (%getitem,)
  }
  graph @false_graph_0(%relu : f32[2,4], %p_b_bias : f32[4], %p_b_weight : f32[4,4]) {
    graph @part_2(%relu : f32[2,4]) {
      %mul : f32[2,4] = aten.mul.Tensor(%relu, 2.0)
      return (%mul,)
    }
    %invoke_subgraph : (f32[2,4],) = higher_order.invoke_subgraph(@part_2, "part_2", %relu)
    %getitem : f32[2,4] = operator.getitem(%invoke_subgraph, 0)
    return (%getitem,)
  }
  graph @part_3(%getitem : f32[2,4]) {
    %add : f32[2,4] = aten.add.Tensor(%getitem, 1.0)
    return (%add,)
  }
  %invoke_subgraph : (f32[2,4], bool[]) = higher_order.invoke_subgraph(@part_0, "part_0", %x, @a.weight, @a.bias)
  %getitem : f32[2,4] = operator.getitem(%invoke_subgraph, 0)
  %getitem_1 : bool[] = operator.getitem(%invoke_subgraph, 1)
  %cond : (f32[2,4],) = higher_order.cond(%getitem_1, @true_graph_0, @false_graph_0, (%getitem, @b.bias, @b.weight))
  %getitem_2 : f32[2,4] = operator.getitem(%cond, 0)
  %invoke_subgraph_1 : (f32[2,4],) = higher_order.invoke_subgraph(@part_3, "part_3", %getitem_2)
  %getitem_3 : f32[2,4] = operator.getitem(%invoke_subgraph_1, 0)
  return out=%getitem_3
}
"""


def test_a_cond_becomes_parts_and_host_code():
    w = seeded_weights(CAPTURED)
    q = check_pass("branches", CAPTURED, SPLIT, w)
    p = splice.parse_ir(CAPTURED, w)
    # x whose first Linear is all -1 (relu 0: the false branch), then +1 (the true branch)
    for target in (-1.0, 1.0):
        y = torch.full((2, 4), target) - w["a.bias"]
        x = torch.linalg.solve(w["a.weight"], y.T).T
        assert torch.equal(q(x), p(x))


HOISTED = """
weight @s : f32[4] buffer
program @p(%x : f32[2,4], %flag : bool[]) {
  graph @t(%x : f32[2,4], %s : f32[4]) {
    %c : f32[2,4] = aten.clone(%x)
    %k : f32[4] = aten.mul.Tensor(%s, 3.0)
    return (%c, %k)
  }
  graph @f(%x : f32[2,4], %s : f32[4]) {
    %n : f32[2,4] = aten.neg(%x)
    %k : f32[4] = aten.mul.Tensor(%s, 2.0)
    return (%n, %k)
  }
  %cond : (f32[2,4], f32[4]) = higher_order.cond(%flag, @t, @f, (%x, @s))
  %a : f32[2,4] = operator.getitem(%cond, 0)
  %b : f32[4] = operator.getitem(%cond, 1)
  %y : f32[2,4] = aten.add.Tensor(%a, %b)
  return out=%y
}
"""


def test_identity_and_weight_only_outputs_are_hoisted_into_the_host():
    w = seeded_weights(HOISTED)
    q = check_pass(
        "branches",
        HOISTED,
        """
        # splice IR v1
        weight @s : f32[4] buffer
        weight @branches.const_0 : f32[4] constant
        weight @branches.const_1 : f32[4] constant
        program @p(%x : f32[2,4], %flag : bool[]) {
          graph @t(%x : f32[2,4], %s : f32[4], %w_branches_const_0 : f32[4], %w_branches_const_1 : f32[4]) {
            return (%x, %w_branches_const_0)
          }
          graph @f(%x : f32[2,4], %s : f32[4], %w_branches_const_0 : f32[4], %w_branches_const_1 : f32[4]) {
            graph @part_0(%x : f32[2,4]) {
              %n : f32[2,4] = aten.neg(%x)
              return (%n,)
            }
            %invoke_subgraph : (f32[2,4],) = higher_order.invoke_subgraph(@part_0, "part_0", %x)
            %getitem : f32[2,4] = operator.getitem(%invoke_subgraph, 0)
            return (%getitem, %w_branches_const_1)
          }
          graph @part_1(%a : f32[2,4], %b : f32[4]) {
            %y : f32[2,4] = aten.add.Tensor(%a, %b)
            return (%y,)
          }
          %cond : (f32[2,4], f32[4]) = higher_order.cond(%flag, @t, @f, (%x, @s, @branches.const_0, @branches.const_1))
          %a : f32[2,4] = operator.getitem(%cond, 0)
          %b : f32[4] = operator.getitem(%cond, 1)
          %invoke_subgraph : (f32[2,4],) = higher_order.invoke_subgraph(@part_1, "part_1", %a, %b)
          %getitem : f32[2,4] = operator.getitem(%invoke_subgraph, 0)
          return out=%getitem
        }
        """,
        w,
    )
    assert torch.equal(q.get_weight("branches.const_0"), w["s"] * 3.0)
    assert torch.equal(q.get_weight("branches.const_1"), w["s"] * 2.0)
    p = splice.parse_ir(HOISTED, w)
    x = torch.randn(2, 4)
    for flag in (True, False):
        assert torch.equal(q(x, torch.tensor(flag)), p(x, torch.tensor(flag)))


def test_an_already_split_program_is_left_alone():
    check_pass("branches", SPLIT, SPLIT, seeded_weights(CAPTURED))


def test_a_program_without_cond_is_left_alone():
    text = """
    # splice IR v1
    weight @w : f32[4,4] param
    program @p(%x : f32[2,4]) {
      %a : f32[2,4] = aten.linear(%x, @w)
      %b : f32[2,4] = aten.relu(%a)
      return out=%b
    }
    """
    check_pass("branches", text, text)
