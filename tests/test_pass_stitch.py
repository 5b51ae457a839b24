"""``stitch``: Before/Expected in the text form, on a 2-block toy family.

Pinned (SN-Net): the result takes an extra input ``config`` and is a chain of
``cond(config == k, route_k, ...)``; configurations 0 and 1 are the two anchors alone, the
others run the front (smaller) anchor's stem and blocks 0..j, a stitching layer to the end
anchor's width, and the end anchor's blocks m.. and head (SN-Net's ``cuts=all``, window 2,
stride 1 on depth 2: cuts (0,0), (0,1), (1,0), (1,1) sharing one layer; window 1: cuts (0,0)
and (1,1), one layer each; the default ``cuts=forward`` keeps only (0,1)); ``kind=lora`` adds the rank-r update ``(x Aᵀ) Bᵀ`` with B = 0; a ``config`` outside the
range gives NaN; every copied piece starts with a ``part`` line (a part-start mark, which a save
and load keeps). What the pass refuses, with its message. The pass has no "nothing to do" outcome.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_pass, seeded_weights

import splice
from splice.errors import PassError
from splice.ir.meta import starts_part
from splice.ir.program import iter_graphs
from splice.passes import PassContext
from splice.passes.branches import split_program


def _anchor(width: int, name: str, depth: int = 2) -> str:
    """stem Linear(4→w), ``depth`` blocks Linear(w→w)+relu, head Linear(w→2); module paths
    as location comments (how ``find_blocks`` finds the blocks)."""
    lines = [f"weight @stem.weight : f32[{width},4] param"]
    lines += [f"weight @blocks.{i}.weight : f32[{width},{width}] param" for i in range(depth)]
    lines += [f"weight @head.weight : f32[2,{width}] param", f"program @{name}(%x : f32[1,4]) {{"]
    lines.append(f"  %s : f32[1,{width}] = aten.linear(%x, @stem.weight)  # stem")
    h = "%s"
    for i in range(depth):
        lines.append(
            f"  %a{i} : f32[1,{width}] = aten.linear({h}, @blocks.{i}.weight)  # blocks.{i}"
        )
        lines.append(f"  %r{i} : f32[1,{width}] = aten.relu(%a{i})  # blocks.{i}")
        h = f"%r{i}"
    lines += [f"  %y : f32[1,2] = aten.linear({h}, @head.weight)  # head", "  return out=%y", "}}"]
    return "\n".join(lines)


SMALL, LARGE = _anchor(2, "small"), _anchor(3, "large")


def _family(small: str = SMALL, large: str = LARGE):
    """(small weights, large Program, calibration inputs, the pass context)."""
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(1, 4, generator=g),) for _ in range(8)]
    large_p = splice.parse_ir(large, seeded_weights(large, seed=2))
    ctx = PassContext(sample_inputs=calib, programs={"large": large_p})
    return seeded_weights(small, seed=1), large_p, calib, ctx


def _route(ws, wl, layer, x, cut):
    """Front stem and blocks 0..j, the stitching layer, end blocks m.. and head, by hand."""
    j, m = cut
    h = x @ ws["stem.weight"].T
    for i in range(j + 1):
        h = torch.relu(h @ ws[f"blocks.{i}.weight"].T)
    h = layer(h)
    for i in range(m, 2):
        h = torch.relu(h @ wl[f"blocks.{i}.weight"].T)
    return h @ wl["head.weight"].T


def test_two_anchors_of_two_blocks_window_2(tmp_path):
    ws, large, calib, ctx = _family()
    q = check_pass(
        "stitch{anchors=large,calib_samples=8,cuts=all}",
        SMALL,
        """
        # splice IR v1
        attr stitch = {"anchors": ["small", "large"], "configs": [{"anchor": 0, "index": 0}, {"anchor": 1, "index": 1}, {"cut": [0, 0], "end": 1, "front": 0, "index": 2, "layer": "stitch.0_1.0"}, {"cut": [0, 1], "end": 1, "front": 0, "index": 3, "layer": "stitch.0_1.0"}, {"cut": [1, 0], "end": 1, "front": 0, "index": 4, "layer": "stitch.0_1.0"}, {"cut": [1, 1], "end": 1, "front": 0, "index": 5, "layer": "stitch.0_1.0"}], "depths": [2, 2], "kind": "linear"}
        weight @a0.stem.weight : f32[2,4] param
        weight @a0.blocks.0.weight : f32[2,2] param
        weight @a0.blocks.1.weight : f32[2,2] param
        weight @a0.head.weight : f32[2,2] param
        weight @a1.stem.weight : f32[3,4] param
        weight @a1.blocks.0.weight : f32[3,3] param
        weight @a1.blocks.1.weight : f32[3,3] param
        weight @a1.head.weight : f32[2,3] param
        weight @stitch.0_1.0.weight : f32[3,2] param
        weight @stitch.0_1.0.bias : f32[3] param
        program @stitched_small_large(%x : f32[1,4], %config : i64[]) {
          graph @config_0_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_a0__head__weight : f32[2,2], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3]) {
            part
            %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
            part
            %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
            %r0 : f32[1,2] = aten.relu(%a0)
            part
            %a1 : f32[1,2] = aten.linear(%r0, %w_a0__blocks__1__weight)
            %r1 : f32[1,2] = aten.relu(%a1)
            part
            %y : f32[1,2] = aten.linear(%r1, %w_a0__head__weight)
            return (%y,)
          }
          graph @config_0_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_a0__head__weight : f32[2,2], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3]) {
            graph @config_1_then(%x : f32[1,4], %config : i64[], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a0__blocks__1__weight : f32[2,2]) {
              part
              %s : f32[1,3] = aten.linear(%x, %w_a1__stem__weight)
              part
              %a0 : f32[1,3] = aten.linear(%s, %w_a1__blocks__0__weight)
              %r0 : f32[1,3] = aten.relu(%a0)
              part
              %a1 : f32[1,3] = aten.linear(%r0, %w_a1__blocks__1__weight)
              %r1 : f32[1,3] = aten.relu(%a1)
              part
              %y : f32[1,2] = aten.linear(%r1, %w_a1__head__weight)
              return (%y,)
            }
            graph @config_1_else(%x : f32[1,4], %config : i64[], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a0__blocks__1__weight : f32[2,2]) {
              graph @config_2_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__blocks__1__weight : f32[2,2]) {
                part
                %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
                part
                %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
                %r0 : f32[1,2] = aten.relu(%a0)
                part
                %linear_default : f32[1,3] = aten.linear(%r0, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias)
                part
                %a0_1 : f32[1,3] = aten.linear(%linear_default, %w_a1__blocks__0__weight)
                %r0_1 : f32[1,3] = aten.relu(%a0_1)
                part
                %a1 : f32[1,3] = aten.linear(%r0_1, %w_a1__blocks__1__weight)
                %r1 : f32[1,3] = aten.relu(%a1)
                part
                %y : f32[1,2] = aten.linear(%r1, %w_a1__head__weight)
                return (%y,)
              }
              graph @config_2_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__blocks__1__weight : f32[2,2]) {
                graph @config_3_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__blocks__1__weight : f32[2,2], %w_a1__blocks__0__weight : f32[3,3]) {
                  part
                  %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
                  part
                  %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
                  %r0 : f32[1,2] = aten.relu(%a0)
                  part
                  %linear_default : f32[1,3] = aten.linear(%r0, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias)
                  part
                  %a1 : f32[1,3] = aten.linear(%linear_default, %w_a1__blocks__1__weight)
                  %r1 : f32[1,3] = aten.relu(%a1)
                  part
                  %y : f32[1,2] = aten.linear(%r1, %w_a1__head__weight)
                  return (%y,)
                }
                graph @config_3_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__blocks__1__weight : f32[2,2], %w_a1__blocks__0__weight : f32[3,3]) {
                  graph @config_4_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3]) {
                    part
                    %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
                    part
                    %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
                    %r0 : f32[1,2] = aten.relu(%a0)
                    part
                    %a1 : f32[1,2] = aten.linear(%r0, %w_a0__blocks__1__weight)
                    %r1 : f32[1,2] = aten.relu(%a1)
                    part
                    %linear_default : f32[1,3] = aten.linear(%r1, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias)
                    part
                    %a0_1 : f32[1,3] = aten.linear(%linear_default, %w_a1__blocks__0__weight)
                    %r0_1 : f32[1,3] = aten.relu(%a0_1)
                    part
                    %a1_1 : f32[1,3] = aten.linear(%r0_1, %w_a1__blocks__1__weight)
                    %r1_1 : f32[1,3] = aten.relu(%a1_1)
                    part
                    %y : f32[1,2] = aten.linear(%r1_1, %w_a1__head__weight)
                    return (%y,)
                  }
                  graph @config_4_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3]) {
                    graph @config_5_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3]) {
                      part
                      %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
                      part
                      %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
                      %r0 : f32[1,2] = aten.relu(%a0)
                      part
                      %a1 : f32[1,2] = aten.linear(%r0, %w_a0__blocks__1__weight)
                      %r1 : f32[1,2] = aten.relu(%a1)
                      part
                      %linear_default : f32[1,3] = aten.linear(%r1, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias)
                      part
                      %a1_1 : f32[1,3] = aten.linear(%linear_default, %w_a1__blocks__1__weight)
                      %r1_1 : f32[1,3] = aten.relu(%a1_1)
                      part
                      %y : f32[1,2] = aten.linear(%r1_1, %w_a1__head__weight)
                      return (%y,)
                    }
                    graph @config_5_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3]) {
                      %full_default : f32[1,2] = aten.full([1, 2], nan, dtype=torch.float32)
                      return (%full_default,)
                    }
                    %eq_scalar : bool[] = aten.eq.Scalar(%config, 5)
                    %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_5_then, @config_5_else, (%x, %config, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_a0__blocks__1__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_a1__blocks__1__weight, %w_a1__head__weight))
                    %getitem : f32[1,2] = operator.getitem(%cond, 0)
                    return (%getitem,)
                  }
                  %eq_scalar : bool[] = aten.eq.Scalar(%config, 4)
                  %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_4_then, @config_4_else, (%x, %config, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_a0__blocks__1__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_a1__blocks__0__weight, %w_a1__blocks__1__weight, %w_a1__head__weight))
                  %getitem : f32[1,2] = operator.getitem(%cond, 0)
                  return (%getitem,)
                }
                %eq_scalar : bool[] = aten.eq.Scalar(%config, 3)
                %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_3_then, @config_3_else, (%x, %config, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_a1__blocks__1__weight, %w_a1__head__weight, %w_a0__blocks__1__weight, %w_a1__blocks__0__weight))
                %getitem : f32[1,2] = operator.getitem(%cond, 0)
                return (%getitem,)
              }
              %eq_scalar : bool[] = aten.eq.Scalar(%config, 2)
              %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_2_then, @config_2_else, (%x, %config, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_a1__blocks__0__weight, %w_a1__blocks__1__weight, %w_a1__head__weight, %w_a0__blocks__1__weight))
              %getitem : f32[1,2] = operator.getitem(%cond, 0)
              return (%getitem,)
            }
            %eq_scalar : bool[] = aten.eq.Scalar(%config, 1)
            %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_1_then, @config_1_else, (%x, %config, %w_a1__stem__weight, %w_a1__blocks__0__weight, %w_a1__blocks__1__weight, %w_a1__head__weight, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_a0__blocks__1__weight))
            %getitem : f32[1,2] = operator.getitem(%cond, 0)
            return (%getitem,)
          }
          %eq_scalar : bool[] = aten.eq.Scalar(%config, 0)
          %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_0_then, @config_0_else, (%x, %config, @a0.stem.weight, @a0.blocks.0.weight, @a0.blocks.1.weight, @a0.head.weight, @a1.stem.weight, @a1.blocks.0.weight, @a1.blocks.1.weight, @a1.head.weight, @stitch.0_1.0.weight, @stitch.0_1.0.bias))
          %getitem : f32[1,2] = operator.getitem(%cond, 0)
          return out=%getitem
        }
        """,
        ws,
        ctx=ctx,
    )
    small = splice.parse_ir(SMALL, ws)
    wl = large.weights
    lw, lb = q.get_weight("stitch.0_1.0.weight"), q.get_weight("stitch.0_1.0.bias")
    for (x,) in calib[:1]:  # each eager call of the cond chain takes seconds
        assert torch.equal(q(x, torch.tensor(0)), small(x))
        assert torch.equal(q(x, torch.tensor(1)), large(x))
        for k, cut in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=2):
            want = _route(ws, wl, lambda h: h @ lw.T + lb, x, cut)
            torch.testing.assert_close(q(x, torch.tensor(k)), want, atol=1e-6, rtol=1e-6)
        assert q(x, torch.tensor(6)).isnan().all()
    # the branches pass cuts parts where each copied piece (stem, block, layer, head) starts
    route = q.graph_module.get_submodule("config_0_else.config_1_else.config_2_then")
    starts = [n.name for n in route.graph.nodes if starts_part(n)]
    assert starts == ["s", "a0", "linear_default", "a0_1", "a1", "y"]
    # the marks survive a save and load, so the loaded program splits into the same parts
    path = tmp_path / "stitched"
    splice.save(q, path)
    back = splice.load(path)
    marks = [(p, n.name) for p, gm in iter_graphs(back) for n in gm.graph.nodes if starts_part(n)]
    assert marks == [
        (p, n.name) for p, gm in iter_graphs(q) for n in gm.graph.nodes if starts_part(n)
    ]
    (_, stats), (_, stats_back) = split_program(q), split_program(back)
    assert stats["parts"] == stats_back["parts"] > 0


def test_lora_layers_one_per_window_of_one_block():
    ws, large, calib, ctx = _family()
    q = check_pass(
        "stitch{anchors=large,calib_samples=8,kind=lora,lora_rank=1,window=1,cuts=all}",
        SMALL,
        """
        # splice IR v1
        attr stitch = {"anchors": ["small", "large"], "configs": [{"anchor": 0, "index": 0}, {"anchor": 1, "index": 1}, {"cut": [0, 0], "end": 1, "front": 0, "index": 2, "layer": "stitch.0_1.0"}, {"cut": [1, 1], "end": 1, "front": 0, "index": 3, "layer": "stitch.0_1.1"}], "depths": [2, 2], "kind": "lora"}
        weight @a0.stem.weight : f32[2,4] param
        weight @a0.blocks.0.weight : f32[2,2] param
        weight @a0.blocks.1.weight : f32[2,2] param
        weight @a0.head.weight : f32[2,2] param
        weight @a1.stem.weight : f32[3,4] param
        weight @a1.blocks.0.weight : f32[3,3] param
        weight @a1.blocks.1.weight : f32[3,3] param
        weight @a1.head.weight : f32[2,3] param
        weight @stitch.0_1.0.weight : f32[3,2] param
        weight @stitch.0_1.0.bias : f32[3] param
        weight @stitch.0_1.0.lora_a : f32[1,2] param
        weight @stitch.0_1.0.lora_b : f32[3,1] param
        weight @stitch.0_1.1.weight : f32[3,2] param
        weight @stitch.0_1.1.bias : f32[3] param
        weight @stitch.0_1.1.lora_a : f32[1,2] param
        weight @stitch.0_1.1.lora_b : f32[3,1] param
        program @stitched_small_large(%x : f32[1,4], %config : i64[]) {
          graph @config_0_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_a0__head__weight : f32[2,2], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_stitch__0_1__0__lora_a : f32[1,2], %w_stitch__0_1__0__lora_b : f32[3,1], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1]) {
            part
            %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
            part
            %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
            %r0 : f32[1,2] = aten.relu(%a0)
            part
            %a1 : f32[1,2] = aten.linear(%r0, %w_a0__blocks__1__weight)
            %r1 : f32[1,2] = aten.relu(%a1)
            part
            %y : f32[1,2] = aten.linear(%r1, %w_a0__head__weight)
            return (%y,)
          }
          graph @config_0_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_a0__head__weight : f32[2,2], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_stitch__0_1__0__lora_a : f32[1,2], %w_stitch__0_1__0__lora_b : f32[3,1], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1]) {
            graph @config_1_then(%x : f32[1,4], %config : i64[], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_stitch__0_1__0__lora_a : f32[1,2], %w_stitch__0_1__0__lora_b : f32[3,1], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1]) {
              part
              %s : f32[1,3] = aten.linear(%x, %w_a1__stem__weight)
              part
              %a0 : f32[1,3] = aten.linear(%s, %w_a1__blocks__0__weight)
              %r0 : f32[1,3] = aten.relu(%a0)
              part
              %a1 : f32[1,3] = aten.linear(%r0, %w_a1__blocks__1__weight)
              %r1 : f32[1,3] = aten.relu(%a1)
              part
              %y : f32[1,2] = aten.linear(%r1, %w_a1__head__weight)
              return (%y,)
            }
            graph @config_1_else(%x : f32[1,4], %config : i64[], %w_a1__stem__weight : f32[3,4], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_stitch__0_1__0__lora_a : f32[1,2], %w_stitch__0_1__0__lora_b : f32[3,1], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1]) {
              graph @config_2_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_stitch__0_1__0__lora_a : f32[1,2], %w_stitch__0_1__0__lora_b : f32[3,1], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1]) {
                part
                %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
                part
                %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
                %r0 : f32[1,2] = aten.relu(%a0)
                part
                %linear_default : f32[1,3] = aten.linear(%r0, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias)
                %linear_default_1 : f32[1,1] = aten.linear(%r0, %w_stitch__0_1__0__lora_a)
                %linear_default_2 : f32[1,3] = aten.linear(%linear_default_1, %w_stitch__0_1__0__lora_b)
                %add_tensor : f32[1,3] = aten.add.Tensor(%linear_default, %linear_default_2)
                part
                %a0_1 : f32[1,3] = aten.linear(%add_tensor, %w_a1__blocks__0__weight)
                %r0_1 : f32[1,3] = aten.relu(%a0_1)
                part
                %a1 : f32[1,3] = aten.linear(%r0_1, %w_a1__blocks__1__weight)
                %r1 : f32[1,3] = aten.relu(%a1)
                part
                %y : f32[1,2] = aten.linear(%r1, %w_a1__head__weight)
                return (%y,)
              }
              graph @config_2_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_stitch__0_1__0__weight : f32[3,2], %w_stitch__0_1__0__bias : f32[3], %w_stitch__0_1__0__lora_a : f32[1,2], %w_stitch__0_1__0__lora_b : f32[3,1], %w_a1__blocks__0__weight : f32[3,3], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1]) {
                graph @config_3_then(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3]) {
                  part
                  %s : f32[1,2] = aten.linear(%x, %w_a0__stem__weight)
                  part
                  %a0 : f32[1,2] = aten.linear(%s, %w_a0__blocks__0__weight)
                  %r0 : f32[1,2] = aten.relu(%a0)
                  part
                  %a1 : f32[1,2] = aten.linear(%r0, %w_a0__blocks__1__weight)
                  %r1 : f32[1,2] = aten.relu(%a1)
                  part
                  %linear_default : f32[1,3] = aten.linear(%r1, %w_stitch__0_1__1__weight, %w_stitch__0_1__1__bias)
                  %linear_default_1 : f32[1,1] = aten.linear(%r1, %w_stitch__0_1__1__lora_a)
                  %linear_default_2 : f32[1,3] = aten.linear(%linear_default_1, %w_stitch__0_1__1__lora_b)
                  %add_tensor : f32[1,3] = aten.add.Tensor(%linear_default, %linear_default_2)
                  part
                  %a1_1 : f32[1,3] = aten.linear(%add_tensor, %w_a1__blocks__1__weight)
                  %r1_1 : f32[1,3] = aten.relu(%a1_1)
                  part
                  %y : f32[1,2] = aten.linear(%r1_1, %w_a1__head__weight)
                  return (%y,)
                }
                graph @config_3_else(%x : f32[1,4], %config : i64[], %w_a0__stem__weight : f32[2,4], %w_a0__blocks__0__weight : f32[2,2], %w_a0__blocks__1__weight : f32[2,2], %w_stitch__0_1__1__weight : f32[3,2], %w_stitch__0_1__1__bias : f32[3], %w_stitch__0_1__1__lora_a : f32[1,2], %w_stitch__0_1__1__lora_b : f32[3,1], %w_a1__blocks__1__weight : f32[3,3], %w_a1__head__weight : f32[2,3]) {
                  %full_default : f32[1,2] = aten.full([1, 2], nan, dtype=torch.float32)
                  return (%full_default,)
                }
                %eq_scalar : bool[] = aten.eq.Scalar(%config, 3)
                %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_3_then, @config_3_else, (%x, %config, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_a0__blocks__1__weight, %w_stitch__0_1__1__weight, %w_stitch__0_1__1__bias, %w_stitch__0_1__1__lora_a, %w_stitch__0_1__1__lora_b, %w_a1__blocks__1__weight, %w_a1__head__weight))
                %getitem : f32[1,2] = operator.getitem(%cond, 0)
                return (%getitem,)
              }
              %eq_scalar : bool[] = aten.eq.Scalar(%config, 2)
              %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_2_then, @config_2_else, (%x, %config, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_stitch__0_1__0__lora_a, %w_stitch__0_1__0__lora_b, %w_a1__blocks__0__weight, %w_a1__blocks__1__weight, %w_a1__head__weight, %w_a0__blocks__1__weight, %w_stitch__0_1__1__weight, %w_stitch__0_1__1__bias, %w_stitch__0_1__1__lora_a, %w_stitch__0_1__1__lora_b))
              %getitem : f32[1,2] = operator.getitem(%cond, 0)
              return (%getitem,)
            }
            %eq_scalar : bool[] = aten.eq.Scalar(%config, 1)
            %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_1_then, @config_1_else, (%x, %config, %w_a1__stem__weight, %w_a1__blocks__0__weight, %w_a1__blocks__1__weight, %w_a1__head__weight, %w_a0__stem__weight, %w_a0__blocks__0__weight, %w_stitch__0_1__0__weight, %w_stitch__0_1__0__bias, %w_stitch__0_1__0__lora_a, %w_stitch__0_1__0__lora_b, %w_a0__blocks__1__weight, %w_stitch__0_1__1__weight, %w_stitch__0_1__1__bias, %w_stitch__0_1__1__lora_a, %w_stitch__0_1__1__lora_b))
            %getitem : f32[1,2] = operator.getitem(%cond, 0)
            return (%getitem,)
          }
          %eq_scalar : bool[] = aten.eq.Scalar(%config, 0)
          %cond : (f32[1,2],) = higher_order.cond(%eq_scalar, @config_0_then, @config_0_else, (%x, %config, @a0.stem.weight, @a0.blocks.0.weight, @a0.blocks.1.weight, @a0.head.weight, @a1.stem.weight, @a1.blocks.0.weight, @a1.blocks.1.weight, @a1.head.weight, @stitch.0_1.0.weight, @stitch.0_1.0.bias, @stitch.0_1.0.lora_a, @stitch.0_1.0.lora_b, @stitch.0_1.1.weight, @stitch.0_1.1.bias, @stitch.0_1.1.lora_a, @stitch.0_1.1.lora_b))
          %getitem : f32[1,2] = operator.getitem(%cond, 0)
          return out=%getitem
        }
        """,
        ws,
        ctx=ctx,
    )
    wl = large.weights
    for i, cut in enumerate([(0, 0), (1, 1)]):
        pre = f"stitch.0_1.{i}"
        assert not q.get_weight(f"{pre}.lora_b").any()  # B = 0: starts at least squares
        lw, lb = q.get_weight(f"{pre}.weight"), q.get_weight(f"{pre}.bias")
        x = calib[0][0]
        want = _route(ws, wl, lambda h, lw=lw, lb=lb: h @ lw.T + lb, x, cut)
        torch.testing.assert_close(q(x, torch.tensor(2 + i)), want, atol=1e-6, rtol=1e-6)


def test_anchors_without_repeated_blocks_are_an_error():
    one_block = _anchor(2, "small", depth=1)
    _, _, _, ctx = _family(one_block, _anchor(3, "large", depth=1))
    with pytest.raises(PassError) as e:
        check_pass("stitch{anchors=large}", one_block, "", ctx=ctx)
    assert e.value.message == (
        "program 'small' has no repeated blocks: no module path has integer-indexed children "
        "0, 1, ... that run the same ops"
    )
    assert e.value.hint == "stitch cuts models at repeated blocks (transformer layers, conv stages)"


def test_an_unknown_anchor_is_an_error():
    _, _, _, ctx = _family()
    with pytest.raises(PassError) as e:
        check_pass("stitch{anchors=nowhere}", SMALL, "", ctx=ctx)
    assert e.value.message == (
        "stitch: anchor 'nowhere' is neither a program in the pass context nor a saved program "
        "(loading it: nowhere is not a saved splice program (no manifest.json))"
    )
    assert e.value.hint == "save it with splice.save or pass PassContext(programs={...})"


def test_forward_cuts_keep_only_pairs_that_run_each_block_once():
    """``cuts=forward`` (SN-Netv2): of the window's cuts (0,0), (0,1), (1,0), (1,1) only
    (0, 1) is kept — front block 0, then the end's block 1 — and its route is the one by hand."""
    from splice.passes import parse_pipeline

    ws, large, calib, ctx = _family()
    small = splice.parse_ir(SMALL, ws)
    r = parse_pipeline("stitch{anchors=large,calib_samples=8,cuts=forward}").run(small, ctx=ctx)
    q = r.program
    configs = q.attrs["stitch"]["configs"]
    assert [c.get("cut") for c in configs] == [None, None, [0, 1]]
    assert r.stats["passes"][0]["stats"]["cuts"] == "forward"
    wl = {k: large.get_weight(k) for k in ("blocks.0.weight", "blocks.1.weight", "head.weight")}
    lw, lb = q.get_weight("stitch.0_1.0.weight"), q.get_weight("stitch.0_1.0.bias")
    for (x,) in calib[:3]:
        want = _route(ws, wl, lambda h: h @ lw.T + lb, x, (0, 1))
        torch.testing.assert_close(q(x, torch.tensor(2)), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(q(x, torch.tensor(1)), large(x), atol=1e-6, rtol=1e-6)


def test_an_unknown_cuts_is_an_error():
    from splice.errors import PipelineError
    from splice.passes import parse_pipeline

    with pytest.raises(PipelineError) as e:
        parse_pipeline("stitch{anchors=large,cuts=skip}").passes[0].validate()
    assert e.value.message == "stitch: unknown cuts 'skip'"
    assert e.value.hint == "cuts: all, forward"


def test_forward_cuts_need_a_window_of_two_blocks():
    """``cuts=forward`` (the default) at ``window=1`` has no cut j → m with m > j: refused
    before any work; anchors of one block have none at any window (refused by the fit)."""
    from splice.errors import PipelineError
    from splice.passes import parse_pipeline
    from splice.passes.stitch_fit import fit_layers

    with pytest.raises(PipelineError) as e:
        parse_pipeline("stitch{anchors=large,window=1}").passes[0].validate()
    assert e.value.message.startswith("stitch: cuts=forward with window=1 makes no stitched")
    assert e.value.hint == "use window >= 2, or cuts=all (SN-Net: block j -> block j)"
    parse_pipeline("stitch{anchors=large,window=1,cuts=all}").passes[0].validate()
    feats = [[torch.ones(4, 2), torch.ones(4, 2)], [torch.ones(4, 3), torch.ones(4, 3)]]
    with pytest.raises(PassError) as e2:
        fit_layers(feats, [1, 1], ["small", "large"], window=2, stride=1, share="pair",
                   kind="linear", lora_rank=1, cuts="forward")  # fmt: skip
    assert e2.value.message == (
        "no stitching configuration between small and large: cuts=forward with window=2 keeps "
        "no (front block, end block) pair of depth 1"
    )
