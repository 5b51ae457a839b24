"""heal: distilling the program before the approximate passes into the transformed one.

Small models (an MLP on anisotropic inputs, a 2-layer BERT, a conv family for stitch), one
thread (tiny ops: a team of threads only adds barriers on a busy machine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import splice
from splice import models
from splice.errors import PassError, PipelineError
from splice.passes import PassContext, parse_pipeline
from splice.passes.heal import Heal, split_holdout
from splice.passes.training import ProgramModule


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mlp() -> tuple[splice.Program, list[tuple[torch.Tensor]]]:
    """An MLP and 12 calibration batches of inputs with a decaying spectrum (so a weight-only
    SVD is not the best rank-k layer on them, and training has something to recover)."""
    model, _ = models.mlp(d=32, hidden=128)
    g = torch.Generator().manual_seed(1)
    scale = torch.logspace(0, -2, 32)
    mix = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]

    def rows() -> torch.Tensor:
        return (torch.randn(32, 32, generator=g) * scale) @ mix * 3

    calib = [(rows(),) for _ in range(12)]
    return splice.capture(model, calib[0]), calib


def _run(program: splice.Program, text: str, calib, **ctx_args) -> splice.passes.PassResult:
    return parse_pipeline(text).run(program, ctx=PassContext(calibration_inputs=calib, **ctx_args))


def _heal_stats(result) -> dict:
    return result.stats["passes"][-1]["stats"]


@pytest.mark.parametrize(
    "text",
    [
        "lowrank{ratio=0.3},heal{steps=60,lr=0.003}",
        "lowrank{ratio=0.3},heal{steps=60,lr=0.003,scope=local}",
        "experts{num_experts=4,top_k=1},heal{steps=60,lr=0.003}",
        "experts{num_experts=4,top_k=1},heal{steps=60,lr=0.003,scope=local,loss=cosine}",
    ],
)
def test_heal_lowers_the_held_out_loss(text):
    p, calib = _mlp()
    st = _heal_stats(_run(p, text, calib))
    assert st["held_out_rows"] == 3 and st["train_rows"] == 9
    assert st["held_out"]["after"] < 0.8 * st["held_out"]["before"]
    assert st["teacher"] == "original"


def test_held_out_loss_is_the_programs_loss_against_the_teacher():
    p, calib = _mlp()
    r = _run(p, "lowrank{ratio=0.3},heal{steps=20,lr=0.003,seed=3}", calib)
    st = _heal_stats(r)
    _, held = split_holdout(calib, 0.25, 3)
    with torch.no_grad():
        mse = [torch.nn.functional.mse_loss(r.program(*h), p(*h)) for h in held]
    assert st["held_out"]["after"] == pytest.approx(float(sum(mse) / len(mse)), rel=1e-5)


def test_train_new_keeps_every_original_weight_bit_identical():
    model, (ids, mask) = models.bert(layers=2, hidden=32, heads=4, inter=64, vocab=64, seq=8)
    p = splice.capture(model, (ids, mask))
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randint(0, 64, (1, 8), generator=g), torch.ones(1, 8, dtype=torch.long))
             for _ in range(6)]  # fmt: skip
    r = _run(p, "lowrank{ratio=0.4,targets=*.intermediate.*},heal{steps=15,lr=0.01}", calib)
    factored = parse_pipeline("lowrank{ratio=0.4,targets=*.intermediate.*}").run(p).program
    out = r.program
    assert set(out.weights) == set(factored.weights)
    new = {n for n in out.weights if n.endswith((".lowrank_A", ".lowrank_B"))}
    assert len(new) == 4 and _heal_stats(r)["trained_weights"] == 4
    for n, t in out.weights.items():
        if n in new:
            assert not torch.equal(t, factored.get_weight(n)), n
        else:
            assert torch.equal(t, factored.get_weight(n)), n
            assert torch.equal(t, p.get_weight(n)), n


def test_same_seed_same_weights_and_another_seed_differs():
    p, calib = _mlp()

    def healed(seed: int) -> dict[str, torch.Tensor]:
        return _run(p, f"lowrank{{ratio=0.3}},heal{{steps=10,lr=0.003,seed={seed}}}", calib)\
            .program.weights  # fmt: skip

    a, b, c = healed(0), healed(0), healed(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_train_glob_and_all():
    p, calib = _mlp()
    r = _run(p, "lowrank{ratio=0.3},heal{steps=5,train=*.lowrank_B}", calib)
    assert _heal_stats(r)["trained_weights"] == 2
    r = _run(p, "lowrank{ratio=0.3},heal{steps=5,train=all}", calib)
    assert _heal_stats(r)["trained_weights"] == 6  # 2 x (A, B, bias)


def test_pipeline_text_round_trips():
    for text in (
        "lowrank{ratio=0.5},heal",
        "lowrank{method=whitened,budget_params=0.8},heal{steps=200,lr=0.0001,batch=8,loss=cosine}",
        'experts{num_experts=8,top_k=2},heal{scope=local,train="*.router_*|*.w_in",seed=3}',
        "heal{loss=kl,holdout=0.0}",
        'lowrank{ratio=0.8},heal{steps=900,schedule=cosine,match="layer_norm*|out*"}',
    ):
        assert str(parse_pipeline(text)) == text
        assert str(parse_pipeline(str(parse_pipeline(text)))) == text
    assert parse_pipeline("heal{loss=kl}").passes[0] == Heal(loss="kl")


def test_manager_records_the_original_program():
    p, calib = _mlp()
    ctx = PassContext(calibration_inputs=calib)
    parse_pipeline("lowrank{ratio=0.3},heal{steps=1}").run(p, ctx=ctx)
    assert ctx.original is None  # restored after the run
    seen = []

    class Spy(Heal):
        def run(self, program, ctx):
            seen.append(ctx.original)
            return super().run(program, ctx)

    from splice.passes import Pipeline

    Pipeline([parse_pipeline("dce").passes[0], parse_pipeline("lowrank{ratio=0.3}").passes[0],
              Spy(steps=1)]).run(p, ctx=ctx)  # fmt: skip
    # the program before lowrank (the first approximate pass), not before dce
    assert seen[0] is not None and "lowrank_linear" not in str(seen[0])
    assert len(seen[0].named_parameters()) == len(p.named_parameters())


def test_given_teacher_heals_an_already_transformed_program():
    p, calib = _mlp()
    factored = parse_pipeline("lowrank{ratio=0.3}").run(p).program
    r = _run(factored, "heal{steps=30,lr=0.003}", calib, programs={"teacher": p})
    st = _heal_stats(r)
    assert st["teacher"] == "programs['teacher']"
    assert st["held_out"]["after"] < st["held_out"]["before"]


def test_errors():
    p, calib = _mlp()
    with pytest.raises(PassError, match="heal: no teacher: no approximate pass changed"):
        _run(p, "heal", calib)
    with pytest.raises(PassError, match="nothing to train .* no float parameter matches 'zz'"):
        _run(p, "lowrank{ratio=0.3},heal{train=zz}", calib)
    with pytest.raises(PassError, match="no weight the transforms created"):
        _run(p, "heal", calib, programs={"teacher": p})
    with pytest.raises(PassError, match=r"heal: 1 calibration input\(s\); it needs at least 2"):
        _run(p, "lowrank{ratio=0.3},heal", calib[:1])
    with pytest.raises(PassError, match=r"heal: 0 calibration input\(s\); it needs at least 1"):
        parse_pipeline("lowrank{ratio=0.3},heal{holdout=0.0}").run(p)
    for bad, msg in [
        ("heal{steps=0}", "steps must be >= 1"),
        ("heal{lr=0.0}", "lr must be > 0"),
        ("heal{holdout=1.0}", r"holdout must be in \[0, 1\)"),
        ("heal{batch=0}", "batch must be >= 1"),
        ('heal{train=""}', "train is empty"),
    ]:
        with pytest.raises(PipelineError, match=msg):
            parse_pipeline(bad)


def _conv_stitch() -> tuple[splice.Program, splice.Program, list[tuple[torch.Tensor]]]:
    def family(width: int) -> splice.Program:
        model, x = models.conv_family(width, 2, image=16, seed=width)
        return splice.capture(model, x)

    g = torch.Generator().manual_seed(5)
    calib = [(torch.randn(1, 3, 16, 16, generator=g),) for _ in range(8)]
    return family(8), family(16), calib


def test_stitch_trains_every_configuration_and_local_refuses_stitching_layers():
    small, large, calib = _conv_stitch()
    text = "stitch{anchors=large,calib_samples=8},heal{steps=24,lr=0.003,batch=2}"
    ctx = PassContext(sample_inputs=calib, programs={"large": large})
    r = parse_pipeline(text).run(small, ctx=ctx)
    st = _heal_stats(r)
    assert st["configs"] == len(r.program.attrs["stitch"]["configs"]) >= 3
    assert st["held_out"]["after"] < st["held_out"]["before"]
    for n, t in r.program.weights.items():  # the anchors' weights are untouched
        if not n.startswith("stitch"):
            assert any(t.shape == w.shape and torch.equal(t, w) for w in
                       [*small.weights.values(), *large.weights.values()]), n  # fmt: skip
    with pytest.raises(PassError, match=r"scope=local\}: \d+ trainable weight\(s\) are read by no"):
        parse_pipeline(text.replace("batch=2", "scope=local")).run(small, ctx=ctx)


def test_healed_program_compiles_and_its_artifact_equals_it(tmp_path):
    p, calib = _mlp()
    healed = _run(p, "lowrank{ratio=0.3},heal{steps=10,lr=0.003}", calib).program
    splice.verify(healed)
    art = splice.compile(healed, "host", output=tmp_path / "a")
    x = calib[0][0]
    with torch.no_grad():
        torch.testing.assert_close(art.load()(x), healed(x), rtol=1e-4, atol=1e-5)


def test_program_module_trains_only_what_it_is_told():
    p, _ = _mlp()
    m = ProgramModule(p, trainable=lambda n: n.endswith("bias"))
    assert set(m.trainable_parameters()) == {n for n in p.named_parameters() if "bias" in n}
    with torch.no_grad():
        next(iter(m.trainable_parameters().values())).add_(1.0)
    assert not torch.equal(m.to_program().weights["fc1.bias"], p.weights["fc1.bias"])
    assert torch.equal(p.weights["fc1.bias"], splice.capture(*models.mlp(d=32, hidden=128))
                       .weights["fc1.bias"])  # fmt: skip


def test_cli_opt_runs_lowrank_then_heal(capsys):
    from splice.tools.cli import main

    pipe = "lowrank{ratio=0.3},heal{steps=5,holdout=0.0}"
    assert main(["opt", "splice.models:mlp", "-a", "d=16", "-a", "hidden=64", "-p", pipe]) == 0
    out = capsys.readouterr()
    assert "splice.lowrank_linear(" in out.out
    assert "heal{steps=5,holdout=0.0}" in out.err


def test_a_non_finite_gradient_stops_heal_naming_the_weight():
    """A finite loss can still give a non-finite gradient (activations past float32's range
    in the backward): heal raises before the optimizer step writes NaN into the weights."""
    from splice.passes.heal import _check_grads

    ok = torch.nn.Parameter(torch.ones(3))
    ok.grad = torch.ones(3)
    _check_grads({"ok": ok}, 0)  # finite: no error
    bad = torch.nn.Parameter(torch.full((2,), 5.0))
    bad.grad = torch.tensor([1.0, float("nan")])
    with pytest.raises(PassError, match=r"non-finite at step 4, e\.g\. @stitch\.0\.weight"):
        _check_grads({"ok": ok, "stitch.0.weight": bad}, 3)


def _small_bert() -> tuple[splice.Program, list[tuple[torch.Tensor, torch.Tensor]]]:
    model, (ids, mask) = models.bert(layers=2, hidden=32, heads=4, inter=64, vocab=64, seq=8)
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randint(0, 64, (1, 8), generator=g), torch.ones(1, 8, dtype=torch.long))
             for _ in range(8)]  # fmt: skip
    return splice.capture(model, (ids, mask)), calib


def test_match_compares_hidden_states_and_trains_on_them():
    """match= adds the teacher's hidden states to the loss: the matched values are the ones
    both programs compute, and the held-out loss (outputs only) still falls."""
    from splice.passes.heal import _matched_values

    p, calib = _small_bert()
    factored = parse_pipeline("lowrank{ratio=0.4}").run(p).program
    got = _matched_values(factored, p, "layer_norm*", calib[0])
    want = [n.name for n in p.graph.nodes if n.name.startswith("layer_norm")]
    assert got == want and len(got) >= 5  # embeddings + 2 per layer
    text = "lowrank{ratio=0.4},heal{steps=30,lr=0.01,match=layer_norm*,schedule=cosine}"
    st = _heal_stats(_run(p, text, calib))
    assert st["matched_values"] == len(want)
    assert st["held_out"]["after"] < 0.8 * st["held_out"]["before"]
    # the hidden-state terms change what is learnt: not the outputs-only result
    plain = _run(p, text.replace(",match=layer_norm*", ""), calib).program.weights
    matched = _run(p, text, calib).program.weights
    assert any(not torch.equal(plain[n], matched[n]) for n in plain)


def test_cosine_schedule_changes_the_result_and_is_deterministic():
    p, calib = _mlp()
    base = "lowrank{ratio=0.3},heal{steps=10,lr=0.003"
    const = _run(p, base + "}", calib).program.weights
    cos = [_run(p, base + ",schedule=cosine}", calib).program.weights for _ in range(2)]
    assert all(torch.equal(cos[0][n], cos[1][n]) for n in const)
    assert any(not torch.equal(const[n], cos[0][n]) for n in const)


def test_teacher_cache_bound_does_not_change_the_weights():
    """cache_mb bounds the teacher values heal keeps; rows past it are recomputed when drawn,
    and the trained weights are the same bits as with every row kept."""
    p, calib = _small_bert()
    text = "lowrank{ratio=0.4},heal{steps=12,lr=0.01,batch=1,match=layer_norm*,cache_mb=%d}"
    runs = {mb: _run(p, text % mb, calib) for mb in (0, 1024)}
    st = {mb: _heal_stats(r)["teacher_cache"] for mb, r in runs.items()}
    train_rows = _heal_stats(runs[0])["train_rows"]
    assert st[0]["rows_kept"] == 0 and st[0]["recomputed"] == 12  # one teacher run per step
    assert st[1024]["rows_kept"] == train_rows and st[1024]["recomputed"] == 0
    a, b = runs[0].program.weights, runs[1024].program.weights
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert str(parse_pipeline("heal{cache_mb=0}")) == "heal{cache_mb=0}"
    with pytest.raises(PipelineError, match="cache_mb must be >= 0 \\(MiB\\), or -1"):
        parse_pipeline("heal{cache_mb=-2}")


def test_match_errors():
    p, calib = _small_bert()
    with pytest.raises(PassError, match=r"match='zz\*' selects no value that program"):
        _run(p, "lowrank{ratio=0.4},heal{steps=1,match=zz*}", calib)
    with pytest.raises(PipelineError, match="match compares intermediate values end to end"):
        parse_pipeline("heal{scope=local,match=layer_norm*}")
    small, large, ccal = _conv_stitch()
    ctx = PassContext(sample_inputs=ccal, programs={"large": large})
    with pytest.raises(PassError, match="match= is not supported on a stitch program"):
        parse_pipeline("stitch{anchors=large,calib_samples=8},heal{steps=1,match=relu*}").run(
            small, ctx=ctx
        )


# ---------------------------------------------------------------------------------------
# scope=sequential: the closed-form refit of every factored Linear, in program order


def _bert_rows(n: int) -> tuple[splice.Program, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A 2-layer BERT and ``n`` calibration rows of 2x8 tokens (more tokens than features,
    so the least squares are determined)."""
    model, (ids, mask) = models.bert(layers=2, hidden=32, heads=4, inter=64, vocab=64, seq=8)
    g = torch.Generator().manual_seed(6)
    calib = [(torch.randint(0, 64, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long))
             for _ in range(n)]  # fmt: skip
    return splice.capture(model, (ids[:1].repeat(2, 1), mask[:1].repeat(2, 1))), calib


def test_sequential_fit_lowers_the_held_out_loss_of_a_bert():
    # the encoder's Linears (the pooler sees one token a row: too few samples for its 32
    # features to fit by least squares on 36 training rows)
    p, calib = _bert_rows(48)
    r = _run(p, "lowrank{ratio=0.4,targets=encoder*},heal{scope=sequential}", calib)
    st = _heal_stats(r)
    seq = st["sequential"]
    # 6 Linears a layer; q, k and v share their input
    assert seq["sites"] == 12 and seq["inputs"] == 8
    assert seq["error_after"] < seq["error_before"]
    assert st["held_out"]["after"] < 0.5 * st["held_out"]["before"]
    # a gradient heal composes after it, from the refit factors
    r2 = _run(p, "lowrank{ratio=0.4,targets=encoder*},heal{scope=sequential},heal{steps=2}", calib)
    assert _heal_stats(r2)["held_out"]["before"] == pytest.approx(st["held_out"]["after"])


def test_sequential_fit_of_a_first_layer_is_the_whitened_truncation():
    """The first Linear sees the teacher's inputs, so the rank-k least-squares fit to the
    dense layer is exactly lowrank's whitened truncation calibrated on the same rows."""
    p, calib = _mlp()
    fit = _run(p, "lowrank{ratio=0.3},heal{scope=sequential,holdout=0.0}", calib).program
    white = _run(p, "lowrank{ratio=0.3,method=whitened}", calib).program
    svd = parse_pipeline("lowrank{ratio=0.3}").run(p).program

    def w(prog: splice.Program) -> torch.Tensor:
        return prog.get_weight("fc1.lowrank_A").double() @ prog.get_weight("fc1.lowrank_B").double()

    torch.testing.assert_close(w(fit), w(white), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(w(fit), w(svd), rtol=1e-2, atol=1e-3)


def test_sequential_fit_is_deterministic_and_train_new_keeps_the_originals():
    p, calib = _bert_rows(12)
    text = "lowrank{ratio=0.4},heal{scope=sequential}"
    a, b = _run(p, text, calib).program.weights, _run(p, text, calib).program.weights
    assert all(torch.equal(a[n], b[n]) for n in a)
    factored = parse_pipeline("lowrank{ratio=0.4}").run(p).program
    new = {n for n in a if n.endswith((".lowrank_A", ".lowrank_B"))}
    assert len(new) == 26
    for n, t in a.items():
        if n in new:
            assert not torch.equal(t, factored.get_weight(n)), n
        else:
            assert torch.equal(t, p.get_weight(n)), n


def test_sequential_fit_refits_a_trainable_bias():
    p, calib = _mlp()
    kept = _run(p, "lowrank{ratio=0.3},heal{scope=sequential}", calib)
    fitted = _run(p, "lowrank{ratio=0.3},heal{scope=sequential,train=all}", calib)
    assert torch.equal(kept.program.get_weight("fc1.bias"), p.get_weight("fc1.bias"))
    assert not torch.equal(fitted.program.get_weight("fc1.bias"), p.get_weight("fc1.bias"))
    # a free bias can only lower the training error
    s_kept, s_fit = _heal_stats(kept)["sequential"], _heal_stats(fitted)["sequential"]
    assert s_fit["error_after"] <= s_kept["error_after"] + 1e-9


def test_sequential_fit_errors():
    p, calib = _mlp()
    with pytest.raises(PassError, match=r"scope=sequential\}: program 'MLP' has no factored"):
        _run(p, "experts{num_experts=4,top_k=1},heal{scope=sequential}", calib)
    with pytest.raises(PassError, match="has no factored Linear"):
        _run(p, "lowrank{ratio=0.3},heal{scope=sequential,train=fc1.bias}", calib)
    with pytest.raises(PipelineError, match="damp=0.1: a ridge of the sequential fit"):
        parse_pipeline("heal{damp=0.1}")
    text = "lowrank{method=whitened,budget_params=0.8},heal{scope=sequential,damp=0.01},heal{steps=600,lr=3e-05,schedule=cosine}"
    assert str(parse_pipeline(str(parse_pipeline(text)))) == str(parse_pipeline(text))
    assert parse_pipeline(text).passes[1] == Heal(scope="sequential", damp=0.01)


def _factors(program: splice.Program) -> dict[str, torch.Tensor]:
    return {n: w for n, w in program.weights.items() if n.endswith((".lowrank_A", ".lowrank_B"))}


def test_heal_that_raises_the_held_out_loss_keeps_the_program():
    """An lr far too high for the start: training makes the held-out loss worse, so heal
    returns the factored program unchanged (keep=better) unless told keep=last."""
    p, calib = _mlp()
    factored = _run(p, "lowrank{ratio=0.3}", calib).program
    text = "lowrank{ratio=0.3},heal{steps=20,lr=0.3,batch=1}"
    r = _run(p, text, calib)
    st = _heal_stats(r)
    assert st["held_out"]["after"] > st["held_out"]["before"]
    assert st["kept"] == "original" and "the held-out loss rose" in st["reason"]
    assert r.stats["passes"][-1]["changed"] is False
    got, want = _factors(r.program), _factors(factored)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    last = _run(p, text.replace("batch=1", "batch=1,keep=last"), calib)
    assert _heal_stats(last)["kept"] == "trained"
    assert any(not torch.equal(_factors(last.program)[n], want[n]) for n in want)
    assert parse_pipeline("heal{keep=last}").passes[0] == Heal(keep="last")
    with pytest.raises(PipelineError, match="keep"):
        parse_pipeline("heal{keep=best}")
