"""lowrank and experts compose in either order (LLaMA, BERT at small configs): each pass
does what it promises on the other's output, and says in its stats what it left."""

from __future__ import annotations

import pytest
import torch

import splice
from splice import models
from splice.ir import verify
from splice.ir.ops import lowrank_linear, moe_ffn
from splice.ir.program import iter_graphs
from splice.passes import parse_pipeline
from splice.passes.linears import find_linears

# the FFN Linears of each architecture (what experts consumes), as lowrank layer globs
FFN = {
    "llama": "*.mlp.gate_proj|*.mlp.up_proj|*.mlp.down_proj",
    "bert": "*.intermediate.dense|encoder.layer.?.output.dense",
}
LAYERS = 2
EXPERTS = "experts{num_experts=4,top_k=4}"  # every expert selected: exact on its input


@pytest.fixture(scope="module", params=["llama", "bert"])
def arch(request):
    model, inputs = getattr(models, request.param)()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return request.param, splice.capture(model, inputs), args


def _count(program, op) -> int:
    return sum(
        1 for _, gm in iter_graphs(program) for n in gm.graph.nodes if n.target is op.overload
    )


def _run(program, text, args):
    r = parse_pipeline(text).run(program, sample_inputs=[args])
    verify(r.program)
    return r


def _assert_close(a, b, args, tol=1e-5):
    with torch.no_grad():
        for x, y in zip(a.run(*args), b.run(*args)):
            if x.is_floating_point():
                rel = float((x - y).abs().max() / y.abs().max().clamp_min(1e-9))
                assert rel <= tol, rel


def _linears(program) -> int:
    return len({s.weight for s in find_linears(program)})


def test_lowrank_then_experts_splits_the_factored_ffns(arch):
    name, p, args = arch
    n_linear = _linears(p)
    lr = _run(p, "lowrank{ratio=0.8}", args)
    both = _run(p, f"lowrank{{ratio=0.8}},{EXPERTS}", args)
    q = both.program
    st_lr, st_ex = (rec["stats"] for rec in both.stats["passes"])
    assert st_lr["factored"] == n_linear  # every Linear factored first
    assert st_ex["changed"] and st_ex["ffns_split"] == LAYERS  # not a silent no-op
    assert all(f["factored"]["up"] and f["factored"]["down"] for f in st_ex["ffns"])
    ffn_linears = 3 if name == "llama" else 2
    assert _count(q, moe_ffn) == LAYERS
    assert _count(q, lowrank_linear) == n_linear - ffn_linears * LAYERS
    # the FFNs' factors left the program (kept only as the experts' own weights)
    assert not any(
        w.endswith((".lowrank_A", ".lowrank_B")) and ("mlp." in w or "intermediate" in w)
        for w in q.weight_kinds
        if ".experts." not in w
    )
    # with every expert selected, experts equals the factored program it was given
    _assert_close(q, lr.program, args)


def test_experts_then_lowrank_factors_the_rest_and_reports_the_experts(arch):
    name, p, args = arch
    n_linear = _linears(p)
    ex = _run(p, EXPERTS, args)
    _assert_close(ex.program, p, args)  # exact with every expert
    both = _run(p, f"{EXPERTS},lowrank{{ratio=0.8}}", args)
    q = both.program
    st_ex, st_lr = (rec["stats"] for rec in both.stats["passes"])
    ffn_linears = 3 if name == "llama" else 2
    assert st_ex["ffns_split"] == LAYERS
    assert st_lr["changed"] and st_lr["factored"] == n_linear - ffn_linears * LAYERS
    assert _count(q, moe_ffn) == LAYERS
    assert _count(q, lowrank_linear) == n_linear - ffn_linears * LAYERS
    moe_skips = [s for s in st_lr["skipped"] if "moe_ffn" in s["reason"]]
    assert len(moe_skips) == LAYERS  # the experts were not factored, and it says so
    # lowrank on the rest equals lowrank of the same layers on the dense program
    ref = _run(p, f"lowrank{{ratio=0.8,exclude={FFN[name]}}}", args)
    _assert_close(q, ref.program, args)


def test_both_orders_with_top_k_routing_change_the_program(arch):
    _, p, args = arch
    for text in (
        "lowrank{ratio=0.5},experts{num_experts=4,top_k=1}",
        "experts{num_experts=4,top_k=1},lowrank{ratio=0.5}",
    ):
        r = _run(p, text, args)
        assert all(rec["changed"] for rec in r.stats["passes"]), text
        assert _count(r.program, moe_ffn) == LAYERS
        assert _count(r.program, lowrank_linear) > 0


def test_a_gated_ffn_with_small_factors_feeds_the_experts_one_projection():
    model, inputs = models.llama()
    p = splice.capture(model, inputs)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    lr = _run(p, "lowrank{ratio=0.3}", args)
    both = _run(p, f"lowrank{{ratio=0.3}},{EXPERTS}", args)
    st = both.stats["passes"][1]["stats"]
    for f in st["ffns"]:  # rank 12 per projection: x·[B_g; B_u]ᵀ is 24 wide (< d_model 64)
        assert f["factored"]["expert_input_width"] == 24
        assert f["params_after"] < 2 * f["d_ff"] * f["d_model"] + f["d_ff"] * f["d_out"]
    _assert_close(both.program, lr.program, args)


def test_lowrank_twice_leaves_factors_alone_and_says_so():
    model, inputs = models.llama()
    p = splice.capture(model, inputs)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    r = _run(p, "lowrank{ratio=0.5},lowrank{ratio=0.5}", args)
    second = r.stats["passes"][1]["stats"]
    assert not second["changed"]
    assert len(second["skipped"]) == second_expected(r.program)
    assert all(s["reason"].startswith("already factored") for s in second["skipped"])


def second_expected(program) -> int:
    return _count(program, lowrank_linear)


def test_orders_that_leave_layers_say_so():
    model, inputs = models.mlp(d=16, hidden=64)
    p = splice.capture(model, inputs)
    # lowrank after hyper: the generated weights are not parameters; named with the reason
    r = parse_pipeline("hyper{targets=fc*.weight},lowrank{ratio=0.5}").run(p)
    st = r.stats["passes"][1]["stats"]
    left = {s["layer"]: s["reason"] for s in st["skipped"]}
    assert set(left) == {"fc1", "fc2"}
    assert all(v.startswith("its weight is computed") for v in left.values())
    # experts after experts: the routed experts are listed, not silently passed over
    r = parse_pipeline("experts{num_experts=4,top_k=2},experts{num_experts=4,top_k=2}").run(p)
    st = r.stats["passes"][1]["stats"]
    assert not st["changed"]
    assert [e["op"] for e in st["existing_experts"]] == ["splice.moe_ffn"]
    # hyper after lowrank on the factored names: the old names are gone, an error at once
    from splice.errors import PassError

    with pytest.raises(PassError, match="no parameter of program"):
        parse_pipeline("lowrank{ratio=0.5},hyper{targets=fc1.weight}").run(p)


def test_a_gated_ffn_with_one_factored_projection_keeps_exact_dense_slices():
    model, inputs = models.llama()
    p = splice.capture(model, inputs)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    first = "lowrank{ratio=0.5,targets=*.up_proj|*.down_proj}"
    lr = _run(p, first, args)
    both = _run(p, f"{first},{EXPERTS}", args)
    for f in both.stats["passes"][1]["stats"]["ffns"]:
        assert f["factored"]["up"] and not f["factored"]["gate"] and f["factored"]["down"]
        assert "only one of gate/up" in f["factored"]["note"]
        assert f["factored"]["expert_input_width"] == f["d_model"]
    _assert_close(both.program, lr.program, args)
