"""``dce``, ``cse``, ``fold-constants``: Before/Expected in the text form (moved here from
tests/test_cleanup.py, which keeps the runs on real models).

Pinned: dce erases unused values and unread weights; cse merges repeated pure computations
and keeps random ops, telling literals 2 and 2.0 apart; fold-constants stores values of
buffers and literals as constant weights (parameters only with ``params=true``) and keeps
what exceeds ``max_numel``; each leaves a program with nothing to do alone. The passes
take no user input that can fail but their options.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_pass

import splice
from splice.errors import PipelineError
from splice.passes import parse_pipeline


def _stats(pipeline: str, text: str, **weights) -> dict:
    r = parse_pipeline(pipeline).run(splice.parse_ir(text, weights))
    return r.stats["passes"][0]["stats"]


CSE = """
weight @w : f32[4,4] param
program @p(%x : f32[2,4]) {
  %a : f32[2,4] = aten.linear(%x, @w)
  %b : f32[2,4] = aten.relu(%a)
  %c : f32[2,4] = aten.relu(%a)
  %d : f32[2,4] = aten.add.Tensor(%b, %c)
  %e : f32[2,4] = aten.linear(%x, @w)
  %f : f32[2,4] = aten.add.Tensor(%d, %e)
  return out=%f
}
"""


def test_cse_merges_repeated_computations():
    w = {"w": torch.randn(4, 4)}
    q = check_pass(
        "cse",
        CSE,
        """
        # splice IR v1
        weight @w : f32[4,4] param
        program @p(%x : f32[2,4]) {
          %a : f32[2,4] = aten.linear(%x, @w)
          %b : f32[2,4] = aten.relu(%a)
          %d : f32[2,4] = aten.add.Tensor(%b, %b)
          %f : f32[2,4] = aten.add.Tensor(%d, %a)
          return out=%f
        }
        """,
        w,
    )
    assert _stats("cse", CSE, **w)["merged"] == 2
    x = torch.randn(2, 4)
    assert torch.equal(q(x), splice.parse_ir(CSE, w)(x))


def test_cse_keeps_random_ops_and_distinguishes_literals():
    text = """
    # splice IR v1
    program @p(%x : f32[8]) {
      %a : f32[8] = aten.dropout(%x, 0.5, True)
      %b : f32[8] = aten.dropout(%x, 0.5, True)
      %c : f32[8] = aten.mul.Tensor(%x, 2.0)
      %d : f32[8] = aten.mul.Tensor(%x, 2)
      %e : f32[8] = aten.add.Tensor(%a, %b)
      %f : f32[8] = aten.add.Tensor(%c, %d)
      %g : f32[8] = aten.add.Tensor(%e, %f)
      return out=%g
    }
    """
    check_pass("cse", text, text)


DCE = """
weight @w : f32[4,4] param
weight @unused : f32[3] buffer
program @p(%x : f32[2,4]) {
  %a : f32[2,4] = aten.linear(%x, @w)
  %dead : f32[2,4] = aten.sigmoid(%a)
  %dead2 : f32[2,4] = aten.mul.Tensor(%dead, 3.0)
  %b : f32[2,4] = aten.relu(%a)
  return out=%b
}
"""


def test_dce_removes_unused_values_and_weights():
    w = {"w": torch.randn(4, 4), "unused": torch.zeros(3)}
    check_pass(
        "dce",
        DCE,
        """
        # splice IR v1
        weight @w : f32[4,4] param
        program @p(%x : f32[2,4]) {
          %a : f32[2,4] = aten.linear(%x, @w)
          %b : f32[2,4] = aten.relu(%a)
          return out=%b
        }
        """,
        w,
    )
    assert _stats("dce", DCE, **w) == {"nodes_removed": 2, "weights_removed": 1, "changed": True}


def test_dce_keeps_a_program_without_dead_code():
    text = """
    # splice IR v1
    weight @w : f32[4,4] param
    program @p(%x : f32[2,4]) {
      %a : f32[2,4] = aten.linear(%x, @w)
      %b : f32[2,4] = aten.relu(%a)
      return out=%b
    }
    """
    check_pass("dce", text, text)


FOLD = """
weight @w : f32[4,4] param
weight @scale : f32[4] buffer
program @p(%x : f32[2,4]) {
  %s2 : f32[4] = aten.mul.Tensor(@scale, 2.0)
  %r : f32[4] = aten.rsqrt(%s2)
  %wt : f32[4,4] = aten.t(@w)
  %a : f32[2,4] = aten.mm(%x, %wt)
  %b : f32[2,4] = aten.mul.Tensor(%a, %r)
  return out=%b
}
"""


def test_fold_constants_folds_buffers_not_params_by_default():
    scale = torch.rand(4) + 0.5
    w = {"w": torch.randn(4, 4), "scale": scale}
    q = check_pass(
        "fold-constants",
        FOLD,
        """
        # splice IR v1
        weight @w : f32[4,4] param
        weight @_folded.r : f32[4] constant
        program @p(%x : f32[2,4]) {
          %wt : f32[4,4] = aten.t(@w)
          %a : f32[2,4] = aten.mm(%x, %wt)
          %b : f32[2,4] = aten.mul.Tensor(%a, @_folded.r)
          return out=%b
        }
        """,
        w,
    )
    assert torch.equal(q.get_weight("_folded.r"), torch.rsqrt(scale * 2.0))
    x = torch.randn(2, 4)
    assert torch.equal(q(x), splice.parse_ir(FOLD, w)(x))
    q2 = check_pass(
        "fold-constants{params=true}",
        FOLD,
        """
        # splice IR v1
        weight @_folded.r : f32[4] constant
        weight @_folded.wt : f32[4,4] constant
        program @p(%x : f32[2,4]) {
          %a : f32[2,4] = aten.mm(%x, @_folded.wt)
          %b : f32[2,4] = aten.mul.Tensor(%a, @_folded.r)
          return out=%b
        }
        """,
        w,
    )
    assert torch.equal(q2.get_weight("_folded.wt"), w["w"].t())


MASK = """
# splice IR v1
program @p(%x : f32[64,64]) {
  %m : f32[64,64] = aten.ones([64, 64])
  %t : f32[64,64] = aten.triu(%m)
  %y : f32[64,64] = aten.mul.Tensor(%x, %t)
  return out=%y
}
"""


def test_fold_constants_respects_max_numel():
    check_pass("fold-constants{max_numel=100}", MASK, MASK)
    stats = _stats("fold-constants{max_numel=100}", MASK)
    assert stats["folded"] == 0 and stats["kept_too_large"] == 1
    assert stats["reason"] == "constant values exceed max_numel"
    q = check_pass(
        "fold-constants",
        MASK,
        """
        # splice IR v1
        weight @_folded.t : f32[64,64] constant
        program @p(%x : f32[64,64]) {
          %y : f32[64,64] = aten.mul.Tensor(%x, @_folded.t)
          return out=%y
        }
        """,
    )
    assert torch.equal(q.get_weight("_folded.t"), torch.ones(64, 64).triu())


def test_fold_constants_leaves_a_program_without_constants_alone():
    text = """
    # splice IR v1
    weight @w : f32[4,4] param
    program @p(%x : f32[2,4]) {
      %a : f32[2,4] = aten.linear(%x, @w)
      return out=%a
    }
    """
    check_pass("fold-constants", text, text)


@pytest.mark.parametrize("name", ["dce", "cse"])
def test_options_they_do_not_have_are_errors(name):
    with pytest.raises(PipelineError) as e:
        check_pass(f"{name}{{x=1}}", DCE, "")
    assert e.value.message.startswith(f"pass '{name}' has no option 'x'")
    assert e.value.hint == f"options of {name}: (no options)"


def test_a_negative_max_numel_is_an_error():
    with pytest.raises(PipelineError) as e:
        check_pass("fold-constants{max_numel=-1}", DCE, "")
    assert e.value.message == "fold-constants: max_numel must be >= 0 (elements), got -1"
