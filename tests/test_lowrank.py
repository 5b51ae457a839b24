"""The `lowrank` pass: the invariants of SVD / ASVD / SVD-LLM factorization, rank rules,
nested run-time truncation, real transformers architectures, and its errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import splice
from splice.errors import PassError, PipelineError
from splice.ir.ops import lowrank_linear
from splice.passes import NumericCheck, VerifyEach, parse_pipeline
from splice.passes.lowrank import (
    allocate,
    break_even,
    cholesky_with_jitter,
    energy_rank,
    factorize,
    lowrank_nodes,
    set_rank,
)


def _W(m: int = 24, n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, as trained weights have
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    s = torch.logspace(0, -2, r, dtype=torch.float64)
    return U[:, :r] @ torch.diag(s) @ V[:, :r].T


def _X(rows: int = 200, n: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, n, dtype=torch.float64)  # anisotropic activations
    return torch.randn(rows, n, generator=g, dtype=torch.float64) * scales


def _abs_mean(X: torch.Tensor) -> torch.Tensor:
    return X.abs().mean(0)


@pytest.mark.parametrize("method", ["svd", "asvd", "whitened"])
def test_full_rank_reproduces_the_layer(method):
    W, X = _W(), _X()
    f = factorize(W, method, gram=X.T @ X, abs_mean=_abs_mean(X))
    assert f.A.shape == (24, 24) and f.B.shape == (24, 40)
    torch.testing.assert_close(f.A @ f.B, W, atol=1e-10, rtol=0)
    # and through the op, in float32, with a bias
    x, b = X[:7].float(), torch.randn(24)
    y = lowrank_linear.overload(x, f.A.float(), f.B.float(), b)
    torch.testing.assert_close(y, nn.functional.linear(x, W.float(), b), atol=1e-5, rtol=1e-5)


def test_plain_svd_error_is_the_trailing_singular_values():
    W = _W()
    f = factorize(W, "svd")
    sigma = torch.linalg.svdvals(W)
    for k in range(1, 24):
        err2 = float(((W - f.A[:, :k] @ f.B[:k]) ** 2).sum())
        assert err2 == pytest.approx(float((sigma[k:] ** 2).sum()), rel=1e-9, abs=1e-18)
        assert f.tail_loss(k) == pytest.approx(err2, rel=1e-9, abs=1e-18)


@pytest.mark.parametrize("method", ["svd", "asvd", "whitened"])
def test_error_never_rises_as_rank_grows(method):
    W, X = _W(), _X()
    f = factorize(W, method, gram=X.T @ X, abs_mean=_abs_mean(X))
    weight_err, act_err = [], []
    for k in range(0, 25):
        D = W - f.A[:, :k] @ f.B[:k]
        weight_err.append(float(D.norm()))
        act_err.append(float((D @ X.T).norm()))
    tol = 1e-9 * weight_err[0]
    # each method is monotone in the metric it truncates: weights for svd, activations
    # (whitened) and scaled weights (asvd); activations for any x under svd as well
    errs = {"svd": weight_err, "whitened": act_err, "asvd": None}[method]
    if method == "asvd":
        s = _abs_mean(X) ** 0.5
        errs = [float(((W - f.A[:, :k] @ f.B[:k]) * s).norm()) for k in range(0, 25)]
    assert all(b <= a + tol * 10 for a, b in itertools.pairwise(errs))
    assert errs[-1] < 1e-8 * max(errs[0], 1.0)


def test_whitened_error_identity_and_beats_plain_svd():
    W, X = _W(), _X()
    f = factorize(W, "whitened", gram=X.T @ X)
    plain = factorize(W, "svd")
    L = torch.linalg.cholesky(X.T @ X)
    sigma = torch.linalg.svdvals(W @ L)
    for k in range(1, 24):
        err = float(((W - f.A[:, :k] @ f.B[:k]) @ X.T).norm())
        assert err == pytest.approx(math.sqrt(float((sigma[k:] ** 2).sum())), rel=1e-7)
        err_svd = float(((W - plain.A[:, :k] @ plain.B[:k]) @ X.T).norm())
        assert err <= err_svd * (1 + 1e-9)
    # on anisotropic data whitening is strictly better at mid ranks
    k = 8
    err = float(((W - f.A[:, :k] @ f.B[:k]) @ X.T).norm())
    err_svd = float(((W - plain.A[:, :k] @ plain.B[:k]) @ X.T).norm())
    assert err < 0.9 * err_svd


def test_asvd_with_identity_scaling_equals_svd_and_ignores_global_scale():
    W = _W()
    ones = torch.ones(40, dtype=torch.float64)
    a = factorize(W, "asvd", abs_mean=ones)
    s = factorize(W, "svd")
    torch.testing.assert_close(a.A, s.A, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.B, s.B, atol=1e-12, rtol=0)
    X = _X()
    k = 10
    base = factorize(W, "asvd", abs_mean=_abs_mean(X))
    scaled = factorize(W, "asvd", abs_mean=7.5 * _abs_mean(X))
    torch.testing.assert_close(
        base.A[:, :k] @ base.B[:k], scaled.A[:, :k] @ scaled.B[:k], atol=1e-12, rtol=0
    )


def test_cholesky_jitter_for_a_singular_gram():
    X = _X(rows=10)  # 10 rows, 40 features: XᵀX has rank 10
    L, jitter = cholesky_with_jitter(X.T @ X)
    assert jitter > 0
    torch.testing.assert_close(L @ L.T, X.T @ X + jitter * torch.eye(40, dtype=L.dtype))
    _, none = cholesky_with_jitter(_X().T @ _X())
    assert none == 0.0


def test_energy_rule_picks_the_minimal_rank():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # energies 16, 4, 1, 1
    assert energy_rank(sigma, 16 / 22) == 1
    assert energy_rank(sigma, 16 / 22 + 1e-6) == 2
    assert energy_rank(sigma, 20 / 22) == 2
    assert energy_rank(sigma, 1.0) == 4


def test_greedy_allocation_meets_the_budget_and_beats_uniform():
    # layer 0 has a flat spectrum, layer 1 a steep one: the budget should go to layer 0
    flat = torch.ones(16, dtype=torch.float64)
    steep = torch.logspace(0, -4, 16, dtype=torch.float64)
    losses = [
        torch.cat([(s.flip(0) ** 2).cumsum(0).flip(0), s.new_zeros(1)]) for s in (flat, steep)
    ]
    m = n = 32
    costs = [[float(k * (m + n)) for k in range(17)] for _ in range(2)]
    dense = [float(m * n)] * 2
    budget = 0.5 * sum(dense)
    ranks = allocate(losses, costs, dense, budget)
    spent = sum(dense[i] if r is None else costs[i][r] for i, r in enumerate(ranks))
    assert spent <= budget
    uniform = math.floor(0.5 * break_even(m, n))  # 8 each: the same parameter count
    greedy_loss = sum(0.0 if r is None else float(losses[i][r]) for i, r in enumerate(ranks))
    uniform_loss = float(losses[0][uniform] + losses[1][uniform])
    assert greedy_loss < uniform_loss
    params = [dense[i] if r is None else costs[i][r] for i, r in enumerate(ranks)]
    assert params[0] > params[1]  # the flat spectrum gets more (here: stays dense)


# ---------------------------------------------------------------------------------------
# the pass on programs


class TwoLayer(nn.Module):
    def __init__(self, d: int = 32, h: int = 48):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _two_layer():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    xs = [torch.randn(4, 32) for _ in range(3)]
    return model, splice.capture(model, (xs[0],)), xs


def test_skip_rule_keeps_layers_at_or_above_break_even():
    _, p, xs = _two_layer()
    # energy=1.0 asks for full rank: k = min(m, n) >= mn/(m+n) for every layer
    r = parse_pipeline("lowrank{energy=1.0}").run(p, sample_inputs=[(xs[0],)])
    st = r.stats["passes"][0]["stats"]
    assert not r.changed and st["reason"] == "every layer skipped"
    assert {s["layer"] for s in st["skipped"]} == {"up", "down"}
    assert all(">= mn/(m+n) = 19.2" in s["reason"] for s in st["skipped"])
    # ratio=0.5: k = floor(0.5 * 19.2) = 9 < 19.2, and 9·(m+n) <= 0.5·mn
    r = parse_pipeline("lowrank{ratio=0.5}").run(p)
    layers = r.stats["passes"][0]["stats"]["layers"]
    assert [x["rank"] for x in layers] == [9, 9]
    assert all(x["params_after"] <= 0.5 * x["params_before"] for x in layers)


def test_factored_program_runs_verifies_and_round_trips_text():
    _model, p, xs = _two_layer()
    r = parse_pipeline("lowrank{method=whitened,energy=0.99}").run(
        p, sample_inputs=[(x,) for x in xs], instruments=[VerifyEach(), NumericCheck()]
    )
    q = r.program
    assert len(lowrank_nodes(q)) == 2
    assert not any(w in q.weight_kinds for w in ("up.weight", "down.weight"))  # dropped
    assert "up.bias" in q.weight_kinds  # the bias is kept and passed to the op
    text = splice.print_ir(q)
    assert "splice.lowrank_linear(" in text
    back = splice.parse_ir(text, q.weights)
    assert splice.print_ir(back) == text
    torch.testing.assert_close(back(xs[1]), q(xs[1]))
    layers = r.stats["passes"][0]["stats"]["layers"]
    for rec in layers:
        for key in ("rank", "params_before", "params_after", "flops_before", "flops_after",
                    "bytes_before", "bytes_after", "weight_error", "activation_error"):  # fmt: skip
            assert key in rec
        assert rec["bytes_after"] < rec["bytes_before"]
        assert 0 <= rec["activation_error"] < 0.2


def test_set_rank_is_nested_truncation():
    model, p, xs = _two_layer()
    q = parse_pipeline("lowrank{ratio=1.0,targets=up}").run(p).program  # up: k = 19
    (node,) = lowrank_nodes(q)
    assert tuple(splice.ir.meta.spec(node.args[1]).shape) == (48, 19)
    W = model.up.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for r in (19, 12, 6, 2):
        cut = set_rank(q, r)
        lazy = set_rank(q, r, physical=False)
        (n2,) = lowrank_nodes(cut)
        A, B = cut.get_weight(str(n2.args[1].target)), cut.get_weight(str(n2.args[2].target))
        assert A.shape == (48, r) and B.shape == (r, 32)
        # the prefix is the rank-r truncated SVD: no refactoring was needed
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close((A.double() @ B.double()), best, atol=1e-5, rtol=0)
        torch.testing.assert_close(cut(xs[1]), lazy(xs[1]), atol=1e-5, rtol=1e-5)
    assert set_rank(q, 0.5).get_weight("up.lowrank_A").shape == (48, 9)
    with pytest.raises(PassError, match="no lowrank_linear layers"):
        set_rank(p, 0.5)


def test_rank_rule_errors_and_missing_calibration():
    with pytest.raises(PipelineError, match="exactly one rank rule"):
        parse_pipeline("lowrank")
    with pytest.raises(PipelineError, match="exactly one rank rule"):
        parse_pipeline("lowrank{ratio=0.5,energy=0.9}")
    with pytest.raises(PipelineError, match=r"ratio must be in \(0, 1\]"):
        parse_pipeline("lowrank{ratio=1.5}")
    with pytest.raises(PipelineError, match="method"):
        parse_pipeline("lowrank{ratio=0.5,method=qr}")
    _, p, _ = _two_layer()
    with pytest.raises(PassError, match=r"method=whitened\} needs calibration activations"):
        parse_pipeline("lowrank{method=whitened,ratio=0.5}").run(p)
    r = parse_pipeline("lowrank{ratio=0.5,targets=nothing.*}").run(p)
    assert not r.changed
    assert "no Linear layer matches" in r.stats["passes"][0]["stats"]["reason"]


def test_budget_params_on_llama_meets_the_budget(captured, arch_model):
    p = captured("llama")
    _, args = arch_model("llama")
    r = parse_pipeline("lowrank{method=whitened,budget_params=0.6,targets=model.layers.*}").run(
        p, sample_inputs=[args], instruments=[VerifyEach(), NumericCheck()]
    )
    st = r.stats["passes"][0]["stats"]
    assert st["params_kept"] <= 0.6 + 1e-9
    assert st["params_kept"] >= 0.55  # the greedy spends (nearly) all of it
    assert all(layer["layer"].startswith("model.layers.") for layer in st["layers"])
    assert "lm_head.weight" in r.program.weight_kinds


def test_gpt2_conv1d_addmm_is_factored_and_tied_head_skipped(captured, arch_model):
    p = captured("gpt2")
    model, args = arch_model("gpt2")
    r = parse_pipeline("lowrank{ratio=0.75}").run(p, sample_inputs=[args])
    st = r.stats["passes"][0]["stats"]
    assert any(s["reason"].startswith("weight shared") for s in st["skipped"])  # lm_head = wte
    # GPT-2's Conv1D stores Wᵀ ([in, out]) and computes addmm(b, x, W)
    assert any(layer["layer"].endswith("attn.c_attn") for layer in st["layers"])
    with torch.inference_mode():
        ref = model(*args).logits
    out = r.program(*args)
    assert (out - ref).abs().max() < 1.0
    assert not torch.equal(out, ref)


def test_latency_budget_uses_the_target(captured, arch_model):
    from splice.passes import PassContext, PassManager
    from splice.target import AARCH64_LINUX

    p = captured("bert")
    _, args = arch_model("bert")
    pm = PassManager(parse_pipeline("lowrank{budget_latency=0.5}"))
    r = pm.run(p, PassContext([args], target=AARCH64_LINUX))
    st = r.stats["passes"][0]["stats"]
    assert st["factored"] > 0
    # each layer's predicted time on the declared board, before and after
    t = AARCH64_LINUX
    before = sum(t.roofline_seconds(x["flops_before"], x["bytes_before"]) for x in st["layers"])
    after = sum(t.roofline_seconds(x["flops_after"], x["bytes_after"]) for x in st["layers"])
    assert after < before


def test_cli_opt_then_compile_a_factored_llama(tmp_path, capsys):
    import json

    from splice.tools.cli import main

    prog, art = tmp_path / "p.splice", tmp_path / "p.artifact"
    pipe = "lowrank{method=whitened,ratio=0.5}"
    assert main(["opt", "splice.models:llama", "-p", pipe, "-o", str(prog)]) == 0
    assert "splice.lowrank_linear(" in (prog / "program.ir").read_text()
    assert main(["compile", str(prog), "--lowrank-rank", "0.5", "-o", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["options"]["lowrank_rank"] == 0.5
    reference = splice.load(art).reference()  # the program as compiled: ranks halved
    (node, *_) = lowrank_nodes(reference)
    full = splice.load(prog)
    (node_full, *_) = lowrank_nodes(full)
    k_full = splice.ir.meta.spec(node_full.args[1]).shape[1]
    assert splice.ir.meta.spec(node.args[1]).shape[1] == k_full // 2
    capsys.readouterr()
    assert main(["run", str(art), "--check"]) == 0
    assert "ok: within 0.0001" in capsys.readouterr().out


def test_budget_alloc_relative_ignores_a_layers_scale_and_absolute_follows_it():
    """``alloc=relative`` compares each layer's truncation loss relative to its energy, so
    scaling one layer's weight changes nothing; ``alloc=absolute`` gives the scaled layer
    more rank. Both meet the budget."""
    model, _, xs = _two_layer()
    ranks = {}
    for scale in (1.0, 30.0):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled.down.weight.mul_(scale)
        p = splice.capture(scaled, (xs[0],))
        for alloc in ("relative", "absolute"):
            text = f"lowrank{{method=whitened,budget_params=0.5,alloc={alloc}}}"
            st = parse_pipeline(text).run(p, sample_inputs=[(x,) for x in xs]).stats
            layers = st["passes"][0]["stats"]["layers"]
            assert sum(x["params_after"] for x in layers) <= 0.5 * sum(
                x["params_before"] for x in layers
            )
            ranks[alloc, scale] = {x["layer"]: x["rank"] for x in layers}
    assert ranks["relative", 1.0] == ranks["relative", 30.0]
    assert ranks["absolute", 30.0]["down"] > ranks["absolute", 1.0]["down"]
    assert str(parse_pipeline("lowrank{budget_params=0.8,alloc=absolute}")) == (
        "lowrank{budget_params=0.8,alloc=absolute}"
    )


# -- alloc=sensitivity (ASVD's end-to-end sensitivity, a knapsack over grid ranks) -----------


def test_allocate_choices_is_the_exact_knapsack():
    """Against brute force on small random instances: least summed loss within the budget."""
    from splice.passes.lowrank import allocate_choices

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        choices = []
        for _layer in range(4):
            dense = float(torch.randint(50, 100, (1,), generator=g))
            opts = [(dense, 0.0, None)]
            for k in range(1, 4):
                opts.append((dense * k / 4, float(torch.rand(1, generator=g)) / k, k))
            choices.append(opts)
        budget = 0.6 * sum(c[0][0] for c in choices)
        picks = allocate_choices(choices, budget, units=20000)
        best = min(
            (sum(o[1] for o in combo), [o[2] for o in combo])
            for combo in itertools.product(*choices)
            if sum(o[0] for o in combo) <= budget
        )
        got = [next(o for o in c if o[2] == p) for c, p in zip(choices, picks)]
        assert sum(o[0] for o in got) <= budget
        assert sum(o[1] for o in got) == pytest.approx(best[0], abs=1e-9)
    assert allocate_choices([[(10.0, 0.0, None), (5.0, 1.0, 1)]], 4.0) is None


class _Muted(nn.Module):
    """Two parallel Linears with the same weight; the second's output is scaled down 100×,
    so its truncation matters 100× less to the output although its own loss is the same."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(40, 40, bias=False)
        self.quiet = nn.Linear(40, 40, bias=False)
        with torch.no_grad():
            w = _W(40, 40).float()
            self.loud.weight.copy_(w)
            self.quiet.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + 0.01 * self.quiet(x)


def test_alloc_sensitivity_spends_rank_where_the_output_needs_it():
    model = _Muted().eval()
    xs = [_X(16, 40, seed=s).float() for s in range(4)]
    p = splice.capture(model, (xs[0],))
    before = {k: v.clone() for k, v in p.weights.items()}
    samples = [(x,) for x in xs]
    err = {}
    for alloc in ("relative", "sensitivity"):
        text = f"lowrank{{method=whitened,budget_params=0.5,alloc={alloc}}}"
        r = parse_pipeline(text).run(p, sample_inputs=samples)
        st = r.stats["passes"][0]["stats"]
        layers = {x["layer"]: x for x in st["layers"]}
        assert (
            sum(x["params_after"] for x in layers.values())
            + sum(40 * 40 for name in ("loud", "quiet") if name not in layers)
            <= 0.5 * 2 * 40 * 40
        )
        if alloc == "relative":  # same weights, same activations: same rank
            assert layers["loud"]["rank"] == layers["quiet"]["rank"]
        else:
            # the muted layer goes to the smallest grid rank; the loud one keeps more (or stays
            # dense)
            assert layers["quiet"]["rank"] == 2  # 1/8 of break-even 20
            assert layers.get("loud", {"rank": 40})["rank"] > layers["quiet"]["rank"]
            assert st["alloc"] == "sensitivity"
            assert st["predicted_output_error"] == pytest.approx(
                sum(x["output_error"] for x in layers.values())
            )
        with torch.no_grad():
            num = sum(float((r.program(x) - model(x)).pow(2).sum()) for x in xs)
            den = sum(float(model(x).pow(2).sum()) for x in xs)
        err[alloc] = num / den
    assert err["sensitivity"] < 0.5 * err["relative"]
    for k, v in p.weights.items():  # the probe ran on a copy: the input is untouched
        assert torch.equal(v, before[k])


def test_alloc_sensitivity_is_deterministic_and_round_trips():
    model = _Muted().eval()
    xs = [(_X(8, 40, seed=s).float(),) for s in range(2)]
    p = splice.capture(model, xs[0])
    text = "lowrank{method=whitened,budget_params=0.6,alloc=sensitivity,grid=3,sens_samples=1}"
    assert str(parse_pipeline(text)) == text
    a = parse_pipeline(text).run(p, sample_inputs=xs).program
    b = parse_pipeline(text).run(p, sample_inputs=xs).program
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k])


def test_alloc_sensitivity_errors():
    model = _Muted().eval()
    x = _X(8, 40).float()
    p = splice.capture(model, (x,))
    with pytest.raises(PipelineError, match="alloc=sensitivity allocates a budget, and ratio="):
        parse_pipeline("lowrank{ratio=0.5,alloc=sensitivity}")
    with pytest.raises(PipelineError, match="grid must be >= 1"):
        parse_pipeline("lowrank{budget_params=0.5,alloc=sensitivity,grid=0}")
    with pytest.raises(PassError, match="needs calibration samples; none were given"):
        parse_pipeline("lowrank{budget_params=0.5,alloc=sensitivity}").run(p)
    with pytest.raises(PassError, match="no choice of the grid ranks fits the budget"):
        parse_pipeline("lowrank{budget_params=0.05,alloc=sensitivity,grid=3}").run(
            p, sample_inputs=[(x,)]
        )


def test_alloc_sensitivity_with_a_latency_budget():
    """``budget_latency`` with ``alloc=sensitivity``: the knapsack spends predicted time
    instead of parameters, and the muted layer still gets the smaller rank."""
    model = _Muted().eval()
    xs = [(_X(16, 40, seed=s).float(),) for s in range(2)]
    p = splice.capture(model, xs[0])
    text = "lowrank{method=whitened,budget_latency=0.7,alloc=sensitivity}"
    st = parse_pipeline(text).run(p, sample_inputs=xs).stats["passes"][0]["stats"]
    layers = {x["layer"]: x for x in st["layers"]}
    assert "quiet" in layers and st["alloc"] == "sensitivity"
    assert layers.get("loud", {"rank": 40})["rank"] > layers["quiet"]["rank"]
