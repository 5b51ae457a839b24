"""``lowrank``: Before/Expected in the text form.

Pinned: a Linear becomes ``splice.lowrank_linear`` with A [m, k] and B [k, n] of the rank the
rule gives (``ratio=0.6`` on 8×6: k = ⌊0.6·48/14⌋ = 2), the bias kept; GPT-2's ``addmm``
(weight stored [in, out]) too; a Linear feeding a Linear; one weight read in both branches
of a ``cond`` factored once and threaded into both; tied weights left alone; the rank rule's
error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_pass, seeded_weights

import splice
from splice.errors import PipelineError
from splice.passes import parse_pipeline


def _rank_k(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _factored(q, layer: str) -> torch.Tensor:
    return q.get_weight(f"{layer}.lowrank_A").double() @ q.get_weight(f"{layer}.lowrank_B").double()


LINEAR = """
weight @fc.weight : f32[8,6] param
weight @fc.bias : f32[8] param
program @p(%x : f32[2,6]) {
  %y : f32[2,8] = aten.linear(%x, @fc.weight, @fc.bias)
  return out=%y
}
"""


def test_a_linear_becomes_lowrank_linear_of_the_chosen_rank():
    w = seeded_weights(LINEAR)
    q = check_pass(
        "lowrank{ratio=0.6}",
        LINEAR,
        """
        # splice IR v1
        weight @fc.bias : f32[8] param
        weight @fc.lowrank_A : f32[8,2] param
        weight @fc.lowrank_B : f32[2,6] param
        program @p(%x : f32[2,6]) {
          %lowrank_linear : f32[2,8] = splice.lowrank_linear(%x, @fc.lowrank_A, @fc.lowrank_B, @fc.bias)
          return out=%lowrank_linear
        }
        """,
        w,
    )
    assert torch.equal(q.get_weight("fc.bias"), w["fc.bias"])
    torch.testing.assert_close(_factored(q, "fc"), _rank_k(w["fc.weight"], 2))


def test_conv1d_addmm_with_the_weight_stored_transposed():
    before = """
    weight @c_fc.weight : f32[6,8] param
    weight @c_fc.bias : f32[8] param
    program @p(%x : f32[2,6]) {
      %y : f32[2,8] = aten.addmm(@c_fc.bias, %x, @c_fc.weight)
      return out=%y
    }
    """
    w = seeded_weights(before)
    q = check_pass(
        "lowrank{ratio=0.6}",
        before,
        """
        # splice IR v1
        weight @c_fc.bias : f32[8] param
        weight @c_fc.lowrank_A : f32[8,2] param
        weight @c_fc.lowrank_B : f32[2,6] param
        program @p(%x : f32[2,6]) {
          %lowrank_linear : f32[2,8] = splice.lowrank_linear(%x, @c_fc.lowrank_A, @c_fc.lowrank_B, @c_fc.bias)
          return out=%lowrank_linear
        }
        """,
        w,
    )
    # A·B stands for the [out, in] weight, i.e. the transpose of the stored one
    torch.testing.assert_close(_factored(q, "c_fc"), _rank_k(w["c_fc.weight"].T, 2))


def test_a_linear_feeding_a_linear():
    before = """
    weight @up.weight : f32[8,6] param
    weight @down.weight : f32[6,8] param
    program @p(%x : f32[2,6]) {
      %h : f32[2,8] = aten.linear(%x, @up.weight)
      %y : f32[2,6] = aten.linear(%h, @down.weight)
      return out=%y
    }
    """
    w = seeded_weights(before)
    q = check_pass(
        "lowrank{ratio=0.6}",
        before,
        """
        # splice IR v1
        weight @up.lowrank_A : f32[8,2] param
        weight @up.lowrank_B : f32[2,6] param
        weight @down.lowrank_A : f32[6,2] param
        weight @down.lowrank_B : f32[2,8] param
        program @p(%x : f32[2,6]) {
          %lowrank_linear : f32[2,8] = splice.lowrank_linear(%x, @up.lowrank_A, @up.lowrank_B, None)
          %lowrank_linear_1 : f32[2,6] = splice.lowrank_linear(%lowrank_linear, @down.lowrank_A, @down.lowrank_B, None)
          return out=%lowrank_linear_1
        }
        """,
        w,
    )
    x = torch.randn(2, 6)
    want = x.double() @ _rank_k(w["up.weight"], 2).T @ _rank_k(w["down.weight"], 2).T
    torch.testing.assert_close(q(x).double(), want, atol=1e-5, rtol=1e-5)


def test_a_weight_read_in_both_branches_is_factored_once():
    before = """
    weight @fc.weight : f32[8,6] param
    program @p(%x : f32[2,6], %flag : bool[]) {
      graph @t(%x : f32[2,6], %w : f32[8,6]) {
        %y : f32[2,8] = aten.linear(%x, %w)
        return (%y,)
      }
      graph @f(%x : f32[2,6], %w : f32[8,6]) {
        %n : f32[2,6] = aten.neg(%x)
        %y : f32[2,8] = aten.linear(%n, %w)
        return (%y,)
      }
      %cond : (f32[2,8],) = higher_order.cond(%flag, @t, @f, (%x, @fc.weight))
      %out : f32[2,8] = operator.getitem(%cond, 0)
      return out=%out
    }
    """
    w = seeded_weights(before)
    q = check_pass(
        "lowrank{ratio=0.6}",
        before,
        """
        # splice IR v1
        weight @fc.lowrank_A : f32[8,2] param
        weight @fc.lowrank_B : f32[2,6] param
        program @p(%x : f32[2,6], %flag : bool[]) {
          graph @t(%x : f32[2,6], %w_fc_lowrank_a : f32[8,2], %w_fc_lowrank_b : f32[2,6]) {
            %lowrank_linear : f32[2,8] = splice.lowrank_linear(%x, %w_fc_lowrank_a, %w_fc_lowrank_b, None)
            return (%lowrank_linear,)
          }
          graph @f(%x : f32[2,6], %w_fc_lowrank_a : f32[8,2], %w_fc_lowrank_b : f32[2,6]) {
            %n : f32[2,6] = aten.neg(%x)
            %lowrank_linear : f32[2,8] = splice.lowrank_linear(%n, %w_fc_lowrank_a, %w_fc_lowrank_b, None)
            return (%lowrank_linear,)
          }
          %cond : (f32[2,8],) = higher_order.cond(%flag, @t, @f, (%x, @fc.lowrank_A, @fc.lowrank_B))
          %out : f32[2,8] = operator.getitem(%cond, 0)
          return out=%out
        }
        """,
        w,
    )
    torch.testing.assert_close(_factored(q, "fc"), _rank_k(w["fc.weight"], 2))


TIED = """
# splice IR v1
weight @fc.weight : f32[8,6] param
weight @emb.weight : f32[8,6] param
program @p(%x : f32[2,6], %ids : i64[2]) {
  %a : f32[2,8] = aten.linear(%x, @fc.weight)
  %b : f32[2,8] = aten.linear(%x, @fc.weight)
  %e : f32[2,6] = aten.embedding(@emb.weight, %ids)
  %c : f32[2,8] = aten.linear(%e, @emb.weight)
  %s : f32[2,8] = aten.add.Tensor(%a, %b)
  %t : f32[2,8] = aten.add.Tensor(%s, %c)
  return out=%t
}
"""


def test_tied_weights_are_left_alone():
    """Two Linears of one graph on one weight, and a weight an embedding also reads."""
    check_pass("lowrank{ratio=0.6}", TIED, TIED)
    r = parse_pipeline("lowrank{ratio=0.6}").run(splice.parse_ir(TIED, seeded_weights(TIED)))
    skipped = r.stats["passes"][0]["stats"]["skipped"]
    assert {(s["layer"], tuple(s["readers"])) for s in skipped} == {
        ("fc", ("%a", "%b")),
        ("emb", ("%c", "%e")),
    }
    assert {s["reason"] for s in skipped} == {"weight shared with other nodes (tied)"}
    reason = r.stats["passes"][0]["stats"]["reason"]
    assert reason == "every Linear layer matching targets='*' was skipped (see skipped)"


@pytest.mark.parametrize(
    "pipeline,got",
    [("lowrank", "got none"), ("lowrank{ratio=0.6,energy=0.9}", "got ['energy', 'ratio']")],
)
def test_exactly_one_rank_rule(pipeline, got):
    with pytest.raises(PipelineError) as e:
        check_pass(pipeline, LINEAR, "")
    assert e.value.message == f"lowrank needs exactly one rank rule, {got}"
