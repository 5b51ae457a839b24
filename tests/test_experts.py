"""The `experts` pass and `splice::moe_ffn`: the invariants of expert factorization
(MoEfication), top-k / top-p routing, FFN recognition on real architectures (GPT-2's Conv1D,
LLaMA's SwiGLU, BERT, ViT), near misses with reasons, existing routed experts (Mixtral,
Qwen2-MoE), and the errors of bad options."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from conftest import ir
from torch import nn

import splice
from splice.errors import PassError, PipelineError
from splice.ir import moe_capture
from splice.ir.ops import OPS, _moe_ffn_ref, moe_ffn, moe_gates, moe_select, op_def
from splice.passes import (
    NumericCheck,
    PassContext,
    PassManager,
    PrintIR,
    VerifyEach,
    parse_pipeline,
)
from splice.passes.experts_partition import (
    balanced_assign,
    balanced_kmeans,
    coactivation_partition,
    inside_weight,
    parts_of,
    train_router,
)
from splice.passes.ffns import recognise

ACTS = ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "quick_gelu", "relu2"]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _experts(E=4, s=6, d=10, d_out=7, *, gated=False, bias=True, seed=0):
    g = _g(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        router_w=r(E, d),
        router_b=r(E) if bias else None,
        w_in=r(E, s, d),
        b_in=r(E, s) if bias else None,
        w_gate=r(E, s, d) if gated else None,
        b_gate=r(E, s) if gated and bias else None,
        w_out=r(E, s, d_out),
        b_out=r(d_out) if bias else None,
    )


def _dense(x, w, act):
    """The dense FFN the experts were cut from (all experts, unit gates)."""
    E, s, d = w["w_in"].shape
    W_in = w["w_in"].reshape(E * s, d)
    b_in = None if w["b_in"] is None else w["b_in"].reshape(-1)
    h = nn.functional.linear(x, W_in, b_in)
    f = splice.ir.ops.MOE_ACTIVATIONS[act]
    if w["w_gate"] is not None:
        b_g = None if w["b_gate"] is None else w["b_gate"].reshape(-1)
        a = f(nn.functional.linear(x, w["w_gate"].reshape(E * s, d), b_g)) * h
    else:
        a = f(h)
    y = a @ w["w_out"].reshape(E * s, -1)
    return y if w["b_out"] is None else y + w["b_out"]


def _call(x, w, act, **kw):
    return torch.ops.splice.moe_ffn(
        x, w["router_w"], w["router_b"], w["w_in"], w["b_in"], w["w_gate"], w["b_gate"],
        w["w_out"], w["b_out"], act, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# the op


def test_op_is_registered_with_schema_reference_fake_and_cost():
    assert "splice::moe_ffn" in OPS
    op = torch.ops.splice.moe_ffn.default
    assert op_def(op) is moe_ffn
    assert str(op._schema).startswith(
        "splice::moe_ffn(Tensor x, Tensor router_w, Tensor? router_b, Tensor w_in"
    )
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _experts(gated=True)
    with FakeTensorMode() as mode:
        fw = {k: (mode.from_tensor(v) if v is not None else None) for k, v in w.items()}
        out = _call(mode.from_tensor(torch.randn(2, 3, 10)), fw, "silu", top_k=2)
    assert out.shape == (2, 3, 7)
    cost = moe_ffn.cost(torch.randn(1, 10), *w.values(), "silu", 2)
    dense = moe_ffn.cost(torch.randn(1, 10), *w.values(), "silu", 4)
    # a decode step reads the router and k of E experts' weights
    assert cost.bytes_read < dense.bytes_read and cost.flops < dense.flops


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated,bias", [(False, True), (False, False), (True, True), (True, False)])
def test_all_experts_with_unit_gates_is_the_dense_ffn(act, gated, bias):
    w = _experts(gated=gated, bias=bias)
    x = torch.randn(2, 5, 10, generator=_g(1))
    ref = _dense(x, w, act)
    torch.testing.assert_close(_call(x, w, act, top_k=4), ref, atol=1e-5, rtol=1e-5)
    # top-p with p >= 1 selects all; E/k scaling with k = E is 1
    torch.testing.assert_close(_call(x, w, act, top_p=1.0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        _call(x, w, act, top_k=4, scale="e_over_k"), ref, atol=1e-5, rtol=1e-5
    )


def test_top_k_keeps_only_the_selected_experts():
    w = _experts(E=6, s=4, gated=True)
    x = torch.randn(9, 10, generator=_g(2))
    y = _call(x, w, "silu", top_k=2, scale="e_over_k", weighted=True)
    gates = moe_gates(x, w["router_w"], w["router_b"], 2, 0.0, "e_over_k", True)
    assert ((gates > 0).sum(1) == 2).all()
    # by hand: each expert's slice of the dense FFN, times its gate
    by_hand = torch.zeros(9, 7)
    for e in range(6):
        a = nn.functional.silu(x @ w["w_gate"][e].T + w["b_gate"][e]) * (
            x @ w["w_in"][e].T + w["b_in"][e]
        )
        by_hand += gates[:, e : e + 1] * (a @ w["w_out"][e])
    torch.testing.assert_close(y, by_hand + w["b_out"], atol=1e-5, rtol=1e-5)
    # the gates: softmax probabilities of the selected experts, times E/k = 3
    xn = x / x.norm(dim=1, keepdim=True)
    probs = torch.softmax(xn @ w["router_w"].T + w["router_b"], -1)
    top = probs.topk(2, dim=1).indices
    expect = torch.zeros_like(probs).scatter(1, top, probs.gather(1, top) * 3)
    torch.testing.assert_close(gates, expect)


def test_top_p_example_from_the_paper():
    P = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert moe_select(P.log(), 0, 0.4)[0].tolist() == [True, False, False, False]
    assert moe_select(P.log(), 0, 0.6)[0].tolist() == [True, True, False, False]
    # through the op's routing: a router whose logits are log P for x = e_0
    x = torch.zeros(1, 3)
    x[0, 0] = 1.0
    R = torch.zeros(4, 3)
    R[:, 0] = P.log()
    for p, n in ((0.4, 1), (0.6, 2), (0.9, 3), (0.99, 4)):
        assert int((moe_gates(x, R, None, 0, p, "none", False) > 0).sum()) == n


def test_top_p_count_is_at_least_one_and_monotone_in_p():
    logits = torch.randn(200, 8, generator=_g(3)) * 2.0
    ps = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.999, 1.0]
    counts = [moe_select(logits, 0, p)[0].sum(1) for p in ps]
    assert all((c >= 1).all() for c in counts)
    assert all((b >= a).all() for a, b in itertools.pairwise(counts))
    assert (counts[-1] == 8).all()
    # selection is a prefix of the probability order (keep through the first crossing p)
    sel, probs = moe_select(logits, 0, 0.5)
    for row_sel, row_p in zip(sel, probs):
        order = row_p.argsort(descending=True)
        kept = row_sel[order]
        n = int(kept.sum())
        assert kept[:n].all() and not kept[n:].any()
        assert float(row_p[order][: n - 1].sum()) <= 0.5 < float(row_p[order][:n].sum()) + 1e-6


def test_ties_go_to_the_lower_index():
    sel, _ = moe_select(torch.zeros(1, 5), 2, 0.0)
    assert sel.tolist() == [[True, True, False, False, False]]


def test_gradients_flow_through_the_op():
    w = {k: (v.requires_grad_() if v is not None else None) for k, v in _experts().items()}
    x = torch.randn(3, 10, requires_grad=True)
    _call(x, w, "gelu", top_k=4).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    _dense(x, w, "gelu").square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# partitions


def _check_partition(assign: torch.Tensor, n: int, E: int) -> None:
    parts = parts_of(assign, E)
    flat = torch.cat(parts)
    assert flat.numel() == n and torch.equal(flat.sort().values, torch.arange(n))  # cover
    assert len(set(flat.tolist())) == n  # disjoint
    assert all(p.numel() == n // E for p in parts)  # balanced


def test_balanced_assignment_respects_capacity():
    cost = torch.rand(60, 4, generator=_g(4))
    cost[:, 0] -= 5  # every point prefers cluster 0
    a = balanced_assign(cost, 15)
    assert torch.bincount(a, minlength=4).tolist() == [15, 15, 15, 15]
    # the 15 points cluster 0 keeps are the cheapest for it among those that proposed
    kept = (a == 0).nonzero().flatten()
    assert cost[kept, 0].max() <= cost[a != 0, 0].min()


@pytest.mark.parametrize("E", [2, 4, 8])
def test_balanced_kmeans_partition_is_disjoint_covering_balanced(E):
    V = torch.randn(96, 12, generator=_g(E))
    _check_partition(balanced_kmeans(V, E), 96, E)
    assert torch.equal(balanced_kmeans(V, E, seed=3), balanced_kmeans(V, E, seed=3))


def test_balanced_kmeans_recovers_planted_clusters():
    centers = torch.randn(4, 16, generator=_g(5)) * 4
    V = centers.repeat_interleave(20, 0) + 0.1 * torch.randn(80, 16, generator=_g(6))
    a = balanced_kmeans(V, 4)
    for c in range(4):
        assert len(set(a[c * 20 : (c + 1) * 20].tolist())) == 1


def test_coactivation_partition_groups_neurons_that_fire_together():
    # 4 groups of 8 neurons; each token activates one group (and noise)
    g = _g(7)
    group = torch.randint(0, 4, (300,), generator=g)
    acts = 0.05 * torch.rand(300, 32, generator=g)
    perm = torch.randperm(32, generator=g)  # groups are interleaved in neuron order
    for t in range(300):
        acts[t, perm[group[t] * 8 : group[t] * 8 + 8]] += 1.0
    a = coactivation_partition(acts, 4)
    _check_partition(a, 32, 4)
    for c in range(4):
        assert len(set(a[perm[c * 8 : c * 8 + 8]].tolist())) == 1
    Mx = acts / acts.norm(dim=1, keepdim=True)
    A = (Mx.T @ Mx).double()
    contiguous = torch.arange(32) // 8
    assert inside_weight(A, a) > inside_weight(A, contiguous)


def test_router_training_lowers_its_loss():
    g = _g(8)
    X = torch.randn(512, 16, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    T = torch.sigmoid(X @ torch.randn(16, 4, generator=g) * 4)  # learnable targets
    W0 = torch.zeros(4, 16)
    _, _, first = train_router(X, T, W0, epochs=1, lr=0.01, seed=0)
    W, b, last = train_router(X, T, W0, epochs=30, lr=0.01, seed=0)
    assert last < first
    W2, b2, _ = train_router(X, T, W0, epochs=30, lr=0.01, seed=0)
    assert torch.equal(W, W2) and torch.equal(b, b2)  # seeded


# ---------------------------------------------------------------------------------------
# Before / Expected in the text form

BEFORE = """
weight @up.weight : f32[8,4] param
weight @up.bias : f32[8] param
weight @down.weight : f32[4,8] param
program @F(%x : f32[2,4]) {
  %linear : f32[2,8] = aten.linear(%x, @up.weight, @up.bias)
  %relu : f32[2,8] = aten.relu(%linear)
  %linear_1 : f32[2,4] = aten.linear(%relu, @down.weight)
  return out=%linear_1
}
"""

EXPECTED = """# splice IR v1
weight @up.experts.router_w : f32[2,4] param
weight @up.experts.w_in : f32[2,4,4] param
weight @up.experts.b_in : f32[2,4] param
weight @up.experts.w_out : f32[2,4,4] param
program @F(%x : f32[2,4]) {
  %moe_ffn : f32[2,4] = splice.moe_ffn(%x, @up.experts.router_w, None, @up.experts.w_in, \
@up.experts.b_in, None, None, @up.experts.w_out, None, "relu", 1, 0.0, "none", False)
  return out=%moe_ffn
}
"""  # (a backslash at the end of a line joins it with the next: one line of IR)


def test_before_expected_text_form():
    g = _g(11)
    W1, b1, W2 = (
        torch.randn(8, 4, generator=g),
        torch.randn(8, generator=g),
        torch.randn(4, 8, generator=g),
    )
    p = ir(BEFORE, up__weight=W1, up__bias=b1, down__weight=W2)
    q = parse_pipeline("experts{num_experts=2,top_k=1,split=contiguous}").run(p).program
    assert splice.print_ir(q) == EXPECTED
    torch.testing.assert_close(q.get_weight("up.experts.w_in"), W1.reshape(2, 4, 4))
    torch.testing.assert_close(q.get_weight("up.experts.b_in"), b1.reshape(2, 4))
    torch.testing.assert_close(q.get_weight("up.experts.w_out"), W2.T.reshape(2, 4, 4))
    # the centroid router: γ·(mean of the normalised rows of each expert), γ = √d without data
    rows = W1 / W1.norm(dim=1, keepdim=True)
    expect = 2.0 * torch.stack([rows[:4].mean(0), rows[4:].mean(0)])
    torch.testing.assert_close(q.get_weight("up.experts.router_w"), expect)


# ---------------------------------------------------------------------------------------
# the pass on real architectures


def _run(program, pipeline, args, **kw):
    return parse_pipeline(pipeline).run(program, sample_inputs=[args], **kw)


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize(
    "arch,form,act,n",
    [
        ("gpt2", "plain", "gelu_tanh", 2),  # Conv1D: addmm with the weight stored [in, out]
        ("llama", "gated", "silu", 2),  # SwiGLU
        ("bert", "plain", "gelu", 2),
        ("vit", "plain", "gelu", 2),
    ],
)
def test_all_experts_equal_the_dense_model(captured, arch_model, arch, form, act, n):
    p = captured(arch)
    _, args = arch_model(arch)
    check = NumericCheck()
    r = _run(p, "experts{num_experts=4,top_k=4}", args, instruments=[VerifyEach(), check])
    st = r.stats["passes"][0]["stats"]
    assert st["ffns_split"] == n and st["experts"] == 4
    assert {f["form"] for f in st["ffns"]} == {form} and {f["act"] for f in st["ffns"]} == {act}
    ops = [x for x in r.program.graph.nodes if x.target is moe_ffn.overload]
    assert len(ops) == n
    with torch.no_grad():
        ref, out = _first(p(*args)), _first(r.program(*args))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert check.reports[0]["max_abs"] <= 1e-5
    # the dense weights are gone; parameters grew by the router only
    before = sum(w.numel() for w in p.named_parameters().values())
    after = sum(w.numel() for w in r.program.named_parameters().values())
    assert after - before == sum(4 * f["d_model"] for f in st["ffns"])


def test_partition_uses_one_index_set_for_gate_up_and_down(captured, arch_model):
    p = captured("llama")
    _, args = arch_model("llama")
    r = _run(p, "experts{num_experts=4,top_k=2}", args)
    q = r.program
    pre = "model.layers.0.mlp"
    W_g = p.get_weight(f"{pre}.gate_proj.weight")
    W_u = p.get_weight(f"{pre}.up_proj.weight")
    W_d = p.get_weight(f"{pre}.down_proj.weight")
    w_gate = q.get_weight(f"{pre}.experts.w_gate")
    w_in = q.get_weight(f"{pre}.experts.w_in")
    w_out = q.get_weight(f"{pre}.experts.w_out")
    E, s, _ = w_in.shape
    assert (E, s) == (4, 32)
    rows = {tuple(r.tolist()): i for i, r in enumerate(W_g)}
    seen = []
    for e in range(E):
        idx = torch.tensor([rows[tuple(r.tolist())] for r in w_gate[e]])
        seen += idx.tolist()
        assert torch.equal(w_in[e], W_u[idx])  # the same rows of W_up ...
        assert torch.equal(w_out[e], W_d[:, idx].T)  # ... and columns of W_down
    assert sorted(seen) == list(range(128))  # disjoint and covering


def test_stats_name_experts_size_router_and_covered_mass(captured, arch_model):
    p = captured("bert")
    _, args = arch_model("bert")
    ctx = PassContext([args], calibration_inputs=[args])
    r = PassManager(parse_pipeline("experts{num_experts=4,top_k=2,router=trained}")).run(p, ctx)
    st = r.stats["passes"][0]["stats"]
    assert st["experts"] == 4 and st["expert_size"] == 32 and st["router"] == "trained"
    assert 0.5 <= st["mass_covered"] <= st["mass_covered_oracle"] + 1e-9 <= 1.0 + 1e-9
    assert st["experts_selected_mean"] == 2.0
    f = st["ffns"][0]
    assert f["ffn"] == "encoder.layer.0" and f["bias"] is True
    assert f["linears"] == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    assert "router_bce" in f and f["calibration_rows"] == 8
    # no calibration data: centroid router, no coverage
    r2 = parse_pipeline("experts{num_experts=4,top_k=2}").run(p)
    assert r2.stats["passes"][0]["stats"]["mass_covered"] == "no calibration data"


def test_coverage_grows_with_k_and_top_p_selects_a_variable_number(captured, arch_model):
    p = captured("gpt2")
    _, args = arch_model("gpt2")
    covered = []
    for k in (1, 2, 3, 4):
        pipe = f"experts{{num_experts=4,top_k={k},split=contiguous}}"
        st = _run(p, pipe, args).stats["passes"][0]["stats"]
        covered.append(st["mass_covered_oracle"])
    assert all(b >= a for a, b in itertools.pairwise(covered)) and covered[-1] == 1.0
    pipe = "experts{num_experts=4,top_p=0.6,gates=prob,split=contiguous}"
    st = _run(p, pipe, args).stats["passes"][0]["stats"]
    assert 1.0 <= st["experts_selected_mean"] <= 4.0
    assert st["selection"] == "top_p=0.6"


@pytest.mark.parametrize("split", ["balanced_kmeans", "coactivation", "contiguous"])
def test_every_split_and_router_runs_and_verifies(captured, arch_model, split):
    p = captured("llama")
    _, args = arch_model("llama")
    r = _run(p, f"experts{{num_experts=4,top_k=2,split={split},router=trained,epochs=3}}", args,
             instruments=[VerifyEach()])  # fmt: skip
    q = r.program
    for e_w in (w for n, w in q.weights.items() if n.endswith("experts.w_in")):
        assert e_w.shape == (4, 32, 64)
    assert q(*args).shape == p(*args).shape
    if split == "contiguous":
        torch.testing.assert_close(
            q.get_weight("model.layers.1.mlp.experts.w_in").reshape(128, 64),
            p.get_weight("model.layers.1.mlp.up_proj.weight"),
        )


def test_text_form_round_trips_and_saved_program_runs(captured, arch_model, tmp_path):
    p = captured("gpt2")
    _, args = arch_model("gpt2")
    q = _run(p, "experts{num_experts=4,top_p=0.5,scale=e_over_k}", args).program
    text = splice.print_ir(q)
    assert "splice.moe_ffn(" in text and '"gelu_tanh", 0, 0.5, "e_over_k", False)' in text
    back = splice.parse_ir(text, q.weights)
    assert splice.print_ir(back) == text
    splice.save(q, tmp_path / "q.splice")
    loaded = splice.load(tmp_path / "q.splice")
    torch.testing.assert_close(loaded(*args), q(*args))


def test_targets_and_exclude_choose_ffns(captured, arch_model):
    p = captured("llama")
    _, args = arch_model("llama")
    st = _run(p, "experts{num_experts=4,top_k=2,targets=model.layers.1.*}", args).stats
    assert [f["ffn"] for f in st["passes"][0]["stats"]["ffns"]] == ["model.layers.1.mlp"]
    r = _run(p, "experts{num_experts=4,top_k=2,exclude=*}", args)
    assert not r.changed
    assert "no FFN matches targets='*'" in r.stats["passes"][0]["stats"]["reason"]


# ---------------------------------------------------------------------------------------
# near misses say why


class _FFN(nn.Module):
    """Linear → f → Linear, with ways to break the pattern."""

    def __init__(self, d=16, h=64, f="relu", share=False, leak=False, fused=False):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * h if fused else h)
        self.fc2 = nn.Linear(h, d)
        self.f, self.share, self.leak, self.fused = f, share, leak, fused

    def forward(self, x):
        h = self.fc1(x)
        if self.fused:  # one Linear for gate and up, split in two (Phi-3 style)
            g, u = h.chunk(2, dim=-1)
            a = nn.functional.silu(g) * u
        elif self.f == "sin":
            a = torch.sin(h) * h
        else:
            a = torch.relu(h)
        y = self.fc2(a)
        if self.share:
            y = y + nn.functional.linear(x, self.fc1.weight).sum(-1, keepdim=True)
        if self.leak:
            return y, a
        return y


@pytest.mark.parametrize(
    "kw,E,reason",
    [
        (dict(f="sin"), 4, "is not act(h) for a known activation"),
        (dict(share=True), 4, "weight shared with other nodes (tied): fc1"),
        (dict(leak=True), 4, "is also used outside the FFN (by %output)"),
        (dict(fused=True), 4, "(aten.chunk), which is not element-wise: a fused projection"),
        (dict(), 5, "d_ff = 64 is not a multiple of num_experts = 5"),
        (dict(h=16), 4, "d_ff = 16 is not larger than the input width 16"),
    ],
)
def test_near_misses_say_why_in_stats_and_remarks(kw, E, reason):
    torch.manual_seed(0)
    model = _FFN(**kw).eval()
    x = torch.randn(3, 16)
    p = splice.capture(model, (x,))
    out = io.StringIO()
    r = PassManager(
        parse_pipeline(f"experts{{num_experts={E},top_k=2}}"),
        [PrintIR(only_changed=True, stream=out)],
    ).run(p, PassContext([(x,)]))
    st = r.stats["passes"][0]["stats"]
    assert not r.changed
    (miss,) = st["not_matched"]
    assert reason in miss["reason"], miss
    assert miss["candidate"] in ("fc1", "fc2", "")
    printed = out.getvalue()  # --print-ir-after-change prints the remarks of an unchanged pass
    assert "remarks of experts" in printed and reason in printed


def test_unrelated_linears_are_not_reported(captured):
    p = captured("llama")
    rec = recognise(p, 4)
    assert len(rec.matches) == 2 and rec.misses == []  # attention projections, lm_head: silent


def test_existing_routed_experts_are_left_and_reported(arch_model):
    model, args = arch_model("mixtral")
    with moe_capture.disabled():  # the grouped matmuls transformers exports, not moe_ffn
        p = splice.capture(model, args)
    out = io.StringIO()
    r = PassManager(
        parse_pipeline("experts{num_experts=4,top_k=2}"), [PrintIR(only_changed=True, stream=out)]
    ).run(p, PassContext([args]))
    st = r.stats["passes"][0]["stats"]
    assert not r.changed and "no FFN" in st["reason"]
    assert {e["op"] for e in st["existing_experts"]} == {"transformers.grouped_mm_fallback"}
    assert st["existing_experts"][0]["module"] == "model.layers.0.mlp.experts"
    assert "already routed experts" in out.getvalue()


def test_qwen2_moe_shared_expert_is_split_and_routed_experts_kept():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        num_hidden_layers=1, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 8), generator=_g(9))
    with moe_capture.disabled():  # the grouped matmuls transformers exports, not moe_ffn
        p = splice.capture(model, (ids,))
    r = _run(p, "experts{num_experts=4,top_k=4}", (ids,))
    st = r.stats["passes"][0]["stats"]
    assert [f["ffn"] for f in st["ffns"]] == ["model.layers.0.mlp.shared_expert"]
    assert len(st["existing_experts"]) == 2  # the grouped matmuls of the routed experts
    torch.testing.assert_close(r.program(ids), p(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "text,message",
    [
        ("experts", r"experts needs exactly one of top_k, top_p, got neither"),
        ("experts{top_k=2,top_p=0.5}", r"exactly one of top_k, top_p, got \['top_k', 'top_p'\]"),
        ("experts{num_experts=1,top_k=1}", r"num_experts must be at least 2, got 1"),
        ("experts{num_experts=8,top_k=9}", r"top_k must be in \[1, num_experts=8\], got 9"),
        ("experts{top_k=0}", r"top_k must be in \[1, num_experts=8\], got 0"),
        ("experts{top_p=1.5}", r"top_p must be in \(0, 1\], got 1.5"),
        ("experts{top_p=0.0}", r"top_p must be in \(0, 1\], got 0.0"),
        ("experts{top_k=2,calib_samples=0}", r"calib_samples must be at least 1, got 0"),
        ("experts{top_k=2,lr=0}", r"epochs must be >= 0 and lr > 0, got epochs=30, lr=0"),
        (
            "experts{top_k=2,split=metis}",
            r"'metis' is not one of balanced_kmeans, coactivation, contiguous",
        ),
        ("experts{top_k=2,router=mlp}", r"'mlp' is not one of centroid, trained"),
        ("experts{top_k=2,scale=sqrt}", r"'sqrt' is not one of none, e_over_k"),
    ],
)
def test_bad_options_are_pipeline_errors(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_pipeline_text_round_trips():
    text = "experts{num_experts=8,top_k=2,split=coactivation,router=trained,scale=e_over_k}"
    assert str(parse_pipeline(text)) == text


@pytest.mark.parametrize("option", ["router=trained", "split=coactivation"])
def test_calibrating_options_need_sample_inputs(captured, option):
    p = captured("bert")
    with pytest.raises(PassError, match=rf"experts\{{{option}\}} needs calibration activations"):
        parse_pipeline(f"experts{{num_experts=4,top_k=2,{option}}}").run(p)


def test_reference_is_the_ground_truth_of_the_pass(captured, arch_model):
    """The op in the program computes what its reference computes on those weights."""
    p = captured("llama")
    _, args = arch_model("llama")
    q = _run(p, "experts{num_experts=4,top_k=1}", args).program
    node = next(n for n in q.graph.nodes if n.target is moe_ffn.overload)
    x = torch.randn(5, 64, generator=_g(10))
    vals = [q.get_weight(str(a.target)) if hasattr(a, "target") and a.op == "get_attr" else a
            for a in node.args[1:]]  # fmt: skip
    y = _moe_ffn_ref(x, *vals)
    torch.testing.assert_close(y, torch.ops.splice.moe_ffn(x, *vals))


def test_experts_keeps_its_public_names_where_they_were():
    """recognition and partition live in their own modules; experts re-exports them."""
    from splice.passes import experts, experts_partition, ffns

    assert experts.recognise is ffns.recognise and experts.FFNMatch is ffns.FFNMatch
    assert experts.balanced_kmeans is experts_partition.balanced_kmeans
    assert experts.train_router is experts_partition.train_router
