"""lowrank, experts and hyper reach into sub-graphs: cond branches (capture_dynamic), parts
(branches) — weights read inside a branch through operand chains are the program's weights,
a weight read on several paths is rewritten once, and what a pass leaves is in its stats."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.errors import PassError
from splice.ir import verify
from splice.ir.explore import capture_dynamic
from splice.ir.ops import lowrank_linear, moe_ffn
from splice.ir.program import iter_graphs
from splice.models_dynamic import ZOO
from splice.passes import parse_pipeline
from splice.passes.lowrank import find_linears
from splice.passes.subgraphs import GraphTree

D, H, C = 16, 64, 8


def _ffn(d: int = D, h: int = H) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


def _quiet_channels(block: nn.Sequential, n: int) -> None:
    """The block writes nothing into channels 0..n-1 (so decisions read the input only)."""
    with torch.no_grad():
        block[-1].weight[:n].zero_()
        block[-1].bias[:n].zero_()


class ExitMLP(nn.Module):
    """Early exit over residual FFN blocks with a Linear head per stage: after block i the
    network returns head i when channel i's mean is positive."""

    def __init__(self, stages: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ffn() for _ in range(stages))
        self.heads = nn.ModuleList(nn.Linear(D, C) for _ in range(stages))
        for b in self.blocks:
            _quiet_channels(b, stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.blocks) - 1):
            x = x + self.blocks[i](x)
            if x[..., i].mean() > 0:
                return self.heads[i](x)
        x = x + self.blocks[-1](x)
        return self.heads[-1](x)


class SkipMLP(nn.Module):
    """SkipNet over FFN blocks: block i runs when gate i (a Linear on channel i) fires."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ffn() for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(D, 1) for _ in range(blocks))
        self.fc = nn.Linear(D, C)
        with torch.no_grad():
            for i, (g, b) in enumerate(zip(self.gates, self.blocks)):
                g.weight.zero_()
                g.weight[0, i] = 1.0
                g.bias.zero_()
                _quiet_channels(b, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for gate, block in zip(self.gates, self.blocks):
            if gate(x).mean() > 0:
                x = x + block(x)
        return self.fc(x)


class SharedBranches(nn.Module):
    """One Linear read on both sides of a branch (and, optionally, a tied read)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(D, H)
        self.out = nn.Linear(H, C)
        self.tied = tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            h = self.fc(x)
        else:
            h = self.fc(2 * x) + (self.fc.weight.sum() if self.tied else 0.0)
        return self.out(h)


def _inputs(signs: list[list[int]], seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in signs:
        x = 0.3 * torch.randn(2, D, generator=g)
        for i, v in enumerate(s):
            x[:, i] += 2.0 * v
        out.append((x,))
    return out


SIGNS = [[1, 1, 1], [-1, 1, -1], [-1, -1, 1], [-1, -1, -1], [1, -1, 1], [-1, 1, 1]]


def _model(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def _captured(cls: type[nn.Module]):
    model = _model(cls)
    inputs = _inputs(SIGNS)
    return model, capture_dynamic(model, inputs[0]), inputs


def _stats(r, i: int = 0) -> dict:
    return r.stats["passes"][i]["stats"]


def _count(program, op) -> tuple[int, int]:
    """(nodes of ``op`` in all graphs, of which inside sub-graphs)."""
    total = inside = 0
    for path, gm in iter_graphs(program):
        n = sum(1 for x in gm.graph.nodes if x.target is op.overload)
        total += n
        inside += n if path else 0
    return total, inside


def _with_factors(model: nn.Module, program) -> nn.Module:
    """The eager model with each factored weight W replaced by the program's A·B."""
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    for name in program.weight_kinds:
        if name.endswith(".lowrank_A"):
            layer = name.removesuffix(".lowrank_A")
            A, B = program.get_weight(name), program.get_weight(f"{layer}.lowrank_B")
            sd[f"{layer}.weight"] = (A.double() @ B.double()).float()
    ref.load_state_dict(sd)
    return ref


def _close(program, model, inputs, tol: float = 1e-5) -> float:
    worst = 0.0
    with torch.no_grad():
        for b in inputs:
            got, want = program(*b), model(*b)
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-9)))
    assert worst <= tol, worst
    return worst


# ---------------------------------------------------------------------------------------
# lowrank


@pytest.mark.parametrize("cls", [ExitMLP, SkipMLP])
def test_lowrank_factors_linears_inside_cond_branches(cls):
    model, p, inputs = _captured(cls)
    sites = find_linears(p)
    inside = {s.weight for s in sites if s.path}
    assert inside, "the test model must have Linears inside branches"
    r = parse_pipeline("lowrank{ratio=0.5}").run(p, sample_inputs=inputs)
    st = _stats(r)
    q = r.program
    verify(q)
    factored = {rec["layer"] for rec in st["layers"]}
    # every Linear of the model is factored or listed with a reason
    linears = {
        n.removesuffix(".weight") for n, m in model.named_parameters() if n.endswith("weight")
    }
    assert factored | {s["layer"] for s in st["skipped"]} | set(st["not_targeted"]) == linears
    assert {w.removesuffix(".weight") for w in inside} <= factored | {
        s["layer"] for s in st["skipped"]
    }
    assert st["sites_in_subgraphs"] > 0
    total, in_sub = _count(q, lowrank_linear)
    assert total == st["sites_factored"] and in_sub == st["sites_in_subgraphs"]
    # the dense weights left the program; the result is the model with W := A·B
    assert not any(f"{layer}.weight" in q.weight_kinds for layer in factored)
    _close(q, _with_factors(model, q), inputs)


@pytest.mark.parametrize("name", ["early_exit", "skipnet", "blockdrop", "routed_moe"])
def test_lowrank_on_the_dynamic_zoo_reaches_every_branch(name):
    case = ZOO[name]()
    p = capture_dynamic(case.model, case.example)
    sites = find_linears(p)
    r = parse_pipeline("lowrank{ratio=0.5}").run(p, sample_inputs=case.branch_inputs)
    st = _stats(r)
    verify(r.program)
    weights = {s.weight.removesuffix(".weight") for s in sites}
    done = {rec["layer"] for rec in st.get("layers", [])}
    assert done | {s["layer"] for s in st["skipped"]} == weights  # nothing silently left
    in_branches = {s.weight.removesuffix(".weight") for s in sites if s.path}
    assert in_branches & done or all(
        s["reason"].startswith("rank") for s in st["skipped"] if s["layer"] in in_branches
    )
    if done:
        _close(r.program, _with_factors(case.model, r.program), case.branch_inputs, 1e-4)


def test_a_weight_read_in_several_branches_is_factored_once():
    model, p, inputs = _captured(SharedBranches)
    sites = [s for s in find_linears(p) if s.weight == "fc.weight"]
    assert len(sites) == 2 and all(s.path for s in sites)  # one read per branch
    r = parse_pipeline("lowrank{ratio=0.5}").run(p, sample_inputs=inputs)
    q = r.program
    verify(q)
    (rec,) = [x for x in _stats(r)["layers"] if x["layer"] == "fc"]
    assert len(rec["sites"]) == 2
    assert {w for w in q.weight_kinds if w.startswith("fc.")} == {
        "fc.bias",
        "fc.lowrank_A",
        "fc.lowrank_B",
    }
    tree = GraphTree(q)
    readers = tree.readers("fc.lowrank_A")
    assert len(readers) == 2 and all(not tree.is_top(n) for n in readers)
    _close(q, _with_factors(model, q), inputs)


def test_a_tied_weight_in_a_branch_is_skipped_with_the_reader_named():
    _, p, inputs = _captured(lambda: SharedBranches(tied=True))
    r = parse_pipeline("lowrank{ratio=0.5}").run(p, sample_inputs=inputs)
    skips = [s for s in _stats(r)["skipped"] if s["layer"] == "fc"]
    assert len(skips) == 2  # one per site, in each branch
    for skip in skips:
        assert skip["reason"] == "weight shared with other nodes (tied)"
        assert len(skip["readers"]) == 3  # two Linears and the sum, named by graph path
        assert all(":%" in r for r in skip["readers"])
    assert "fc.weight" in r.program.weight_kinds


def test_whitened_lowrank_calibrates_inside_branches_and_skips_unreached_sites():
    model, p, _ = _captured(ExitMLP)
    # every sample exits at stage 1: the blocks after it never run
    calib = _inputs([[1, 1, 1], [1, -1, 1], [1, 1, -1]], seed=3)
    r = parse_pipeline("lowrank{method=whitened,ratio=0.5}").run(p, sample_inputs=calib)
    st = _stats(r)
    verify(r.program)
    unreached = {s["layer"] for s in st["skipped"] if "never taken" in s["reason"]}
    assert {"blocks.1.0", "blocks.1.2", "heads.1", "blocks.2.0", "heads.2"} <= unreached
    assert "heads.0" in {rec["layer"] for rec in st["layers"]}  # in a branch, calibrated
    (h0,) = [rec for rec in st["layers"] if rec["layer"] == "heads.0"]
    assert "activation_error" in h0
    _close(r.program, _with_factors(model, r.program), calib)


def test_lowrank_reaches_into_parts_after_branches():
    model, p, inputs = _captured(ExitMLP)
    r = parse_pipeline("branches,lowrank{ratio=0.5}").run(p, sample_inputs=inputs)
    q = r.program
    verify(q)
    st = _stats(r, 1)
    assert st["sites_in_subgraphs"] == st["sites_factored"] > 0  # all inside parts
    parts = [path for path, gm in iter_graphs(q) if path.split(".")[-1].startswith("part_")]
    assert any(
        n.target is lowrank_linear.overload
        for path, gm in iter_graphs(q)
        if path in parts
        for n in gm.graph.nodes
    )
    _close(q, _with_factors(model, q), inputs)


# ---------------------------------------------------------------------------------------
# experts


@pytest.mark.parametrize("cls", [ExitMLP, SkipMLP])
def test_experts_split_ffns_inside_branches_exactly_with_every_expert(cls):
    model, p, inputs = _captured(cls)
    r = parse_pipeline("experts{num_experts=4,top_k=4}").run(p, sample_inputs=inputs)
    st = _stats(r)
    q = r.program
    verify(q)
    assert st["ffns_split"] == 3 and st["ffn_sites_in_subgraphs"] >= 2
    total, inside = _count(q, moe_ffn)
    assert total == st["ffn_sites"] and inside == st["ffn_sites_in_subgraphs"]
    assert not any(w.startswith("blocks.") and w.endswith(".weight") for w in q.weight_kinds)
    _close(q, model, inputs)
    r2 = parse_pipeline("experts{num_experts=4,top_k=1}").run(p, sample_inputs=inputs)
    verify(r2.program)
    assert _count(r2.program, moe_ffn) == (total, inside)


def test_experts_on_the_routed_moe_zoo_model():
    case = ZOO["routed_moe"]()
    p = capture_dynamic(case.model, case.example)
    r = parse_pipeline("experts{num_experts=4,top_k=4}").run(p, sample_inputs=case.branch_inputs)
    st = _stats(r)
    verify(r.program)
    assert st["ffns_split"] == 4 and st["ffn_sites_in_subgraphs"] == 4
    _close(r.program, case.model, case.branch_inputs)


def test_experts_then_lowrank_inside_branches():
    _, p, inputs = _captured(SkipMLP)
    r = parse_pipeline("lowrank{ratio=0.5},experts{num_experts=4,top_k=4}").run(
        p, sample_inputs=inputs
    )
    verify(r.program)
    lr, ex = _stats(r, 0), _stats(r, 1)
    assert ex["ffns_split"] == 3 and all(f.get("factored") for f in ex["ffns"])
    # with every expert selected, experts equals its (factored) input
    after_lowrank = parse_pipeline("lowrank{ratio=0.5}").run(p, sample_inputs=inputs).program
    _close(r.program, after_lowrank, inputs)
    assert lr["sites_in_subgraphs"] > 0


# ---------------------------------------------------------------------------------------
# hyper


def test_hyper_on_a_captured_dynamic_program():
    model, p, inputs = _captured(ExitMLP)
    assert any(n.name == "cond" for n in p.graph.nodes)  # capture_dynamic's cond node
    r = parse_pipeline("hyper{targets=*.weight,cond_dim=2}").run(p, sample_inputs=inputs)
    q = r.program
    verify(q)
    st = _stats(r)
    assert q.input_names == ["x", "cond_1"] and st["input"].startswith("cond_1:")
    assert st["reads_in_subgraphs"] > 0
    g = torch.Generator().manual_seed(1)
    for b in inputs:  # init=preserve: the original function for every γ (exact)
        gamma = torch.rand(2, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(q(*b, gamma), model(*b), rtol=0, atol=1e-6)
    with pytest.raises(PassError, match="already has a value named %cond"):
        parse_pipeline("hyper{targets=*.weight,input=cond}").run(p)
    with pytest.raises(PassError, match="into a sub-graph"):
        parse_pipeline("hyper{targets=*.weight,per_sample=true}").run(p)


# ---------------------------------------------------------------------------------------
# stitch routes


def _bert_anchor(width: int) -> object:
    from transformers import BertConfig, BertForSequenceClassification

    import splice

    torch.manual_seed(width)
    cfg = BertConfig(
        hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * width, vocab_size=64, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    return splice.capture(model, (torch.randint(0, 64, (1, 8)),))


def test_lowrank_and_experts_reach_into_stitch_routes():
    from splice.passes.stitch import stitch_programs

    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 64, (1, 8), generator=g),) for _ in range(4)]
    p = stitch_programs([_bert_anchor(16), _bert_anchor(32)], calib).program
    configs = len(p.attrs["stitch"]["configs"])
    samples = [(c[0], torch.tensor(k)) for c in calib[:2] for k in range(configs)]
    sites = find_linears(p)
    assert sites and all(s.path for s in sites)  # every Linear is inside a route
    lr = parse_pipeline("lowrank{ratio=0.5}").run(p, sample_inputs=samples)
    both = parse_pipeline("lowrank{ratio=0.5},experts{num_experts=4,top_k=4}").run(
        p, sample_inputs=samples
    )
    verify(both.program)
    st_lr, st_ex = _stats(both, 0), _stats(both, 1)
    assert st_lr["sites_factored"] == st_lr["sites_in_subgraphs"] == len(sites)
    assert st_lr["factored"] == len({s.weight for s in sites})  # each weight once
    assert st_ex["ffns_split"] == 4 and st_ex["ffn_sites_in_subgraphs"] == st_ex["ffn_sites"]
    _close(both.program, lr.program, samples)


def test_set_rank_lowers_ranks_inside_branches_once_per_layer():
    from splice.passes.lowrank import lowrank_nodes, set_rank

    model, p, inputs = _captured(SharedBranches)
    q = parse_pipeline("lowrank{ratio=0.9}").run(p, sample_inputs=inputs).program
    k = q.get_weight("fc.lowrank_A").shape[1]
    inside = [n for n in lowrank_nodes(q) if n.graph is not q.graph]
    assert len(inside) == 2  # fc, read in both branches
    cut = set_rank(q, 0.5)
    verify(cut)
    assert cut.get_weight("fc.lowrank_A").shape[1] == max(1, int(0.5 * k))
    lazy = set_rank(q, 0.5, physical=False)
    verify(lazy)
    with torch.no_grad():
        for b in inputs:
            torch.testing.assert_close(cut(*b), lazy(*b), rtol=1e-5, atol=1e-6)
    _close(cut, _with_factors(model, cut), inputs)
