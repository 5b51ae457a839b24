"""Passes cannot return broken programs (issue #15, items 3, 6 and the pass side of 10).

* lowrank (and experts) on Linears that feed each other directly;
* the PassManager verifies every pipeline's result by default, blames the pass that broke
  it, leaves the caller's program untouched, and can be told not to (``verify=False``);
* every pass on chained / shared / FFN-feeding-FFN shapes returns a verified program;
* weight names splice generates cannot clash with GraphModule / nn.Module attributes
  (fold-constants on GPT-2), and capture rejects models whose own names would;
* pipeline text and option errors point at the right place; non-finite options are errors;
* passes after ``hyper`` see its ``cond`` input in their samples.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import _captured, _model, first_output
from torch import nn

import splice
from splice.errors import CaptureError, PassError, PipelineError, VerificationError
from splice.ir import meta as M
from splice.ir import parse_ir, print_ir, verify
from splice.ir.program import safe_weight_name, weight_name_problem
from splice.ir.rewriter import Rewriter
from splice.passes import NumericCheck, Pass, PassContext, PassManager, VerifyEach, parse_pipeline
from splice.passes.base import PassResult
from splice.passes.instruments import compare_outputs
from splice.passes.pipeline import make_pass

# ---------------------------------------------------------------------------------------
# small models with Linears that feed each other


class _SharedTwice(nn.Module):
    """One Linear applied twice (a shared weight), then another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(x))))


class _Tied(nn.Module):
    """Two Linears whose weight is one tensor (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


SHAPES = {
    "chain3": lambda: nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)),
    "chain2": lambda: nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)),
    "ffn_ffn": lambda: nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)
    ),
    "shared": _SharedTwice,
    "tied": _Tied,
}


def _shape(name: str) -> tuple[nn.Module, splice.Program, torch.Tensor]:
    torch.manual_seed(0)
    model = SHAPES[name]().eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    return model, splice.capture(model, (x,)), x


def _samples() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 8, generator=g),) for _ in range(2)]


def _inputs(program: splice.Program, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for n in program.input_names:
        out[n] = torch.tensor([0.5]) if n == "cond" else x
    return out


# ---------------------------------------------------------------------------------------
# item 3: lowrank on Linears that feed each other


@pytest.mark.parametrize("shape", ["chain3", "chain2"])
def test_lowrank_on_linears_feeding_linears_returns_a_program_that_runs(shape):
    model, p, x = _shape(shape)
    before = print_ir(p)
    r = parse_pipeline("lowrank{ratio=0.5}").run(p)
    q = r.program
    verify(q)
    assert r.stats["passes"][0]["stats"]["factored"] == len(model)
    assert print_ir(p) == before  # the caller's program is untouched
    # the factored program is the model with every W replaced by its factors A·B
    ref = x
    for i, layer in enumerate(model):
        W = q.get_weight(f"{i}.lowrank_A") @ q.get_weight(f"{i}.lowrank_B")
        ref = torch.nn.functional.linear(ref, W, layer.bias)
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
    # and it round-trips through the text form
    verify(parse_ir(print_ir(q), weights=q.weights))


def test_lowrank_whitened_on_a_chain_calibrates_on_the_original_values():
    _, p, x = _shape("chain3")
    r = parse_pipeline("lowrank{method=whitened,ratio=0.5}").run(p, sample_inputs=_samples())
    layers = r.stats["passes"][0]["stats"]["layers"]
    assert [rec["layer"] for rec in layers] == ["0", "1", "2"]
    assert all(0.0 <= rec["activation_error"] < 1.0 for rec in layers)
    assert r.program(x).shape == (4, 8)


def test_experts_on_an_ffn_feeding_an_ffn_reads_the_first_ffns_output():
    model, p, x = _shape("ffn_ffn")
    r = parse_pipeline("experts{num_experts=2,top_k=2}").run(p)
    assert r.stats["passes"][0]["stats"]["ffns_split"] == 2
    # all experts active: each FFN equals the dense one, so the chain equals the model
    torch.testing.assert_close(r.program(x), model(x), atol=1e-5, rtol=1e-5)


PIPELINES = [
    "lowrank{ratio=0.5}",
    "lowrank{method=whitened,ratio=0.5}",
    "lowrank{method=asvd,energy=0.9}",
    "lowrank{budget_params=0.5}",
    "experts{num_experts=2,top_k=1}",
    "experts{num_experts=4,top_p=0.5}",
    "hyper{targets=*}",
    "hyper{targets=*},specialize{cond=[0.5]}",
    "cse,dce",
    "fold-constants{params=true}",
    "hyper{targets=*},lowrank{ratio=0.5}",
    "hyper{targets=*},lowrank{method=whitened,ratio=0.5}",
    "hyper{targets=*},experts{num_experts=2,top_k=1}",
    "hyper{targets=*},fold-constants{params=true},cse,dce",
    "experts{num_experts=2,top_k=1},lowrank{ratio=0.5}",
    "lowrank{ratio=0.5},experts{num_experts=2,top_k=1}",
    "branches",
]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_pass_on_chained_shared_and_stacked_linears_verifies_and_runs(shape):
    _, p, x = _shape(shape)
    before = print_ir(p)
    for text in PIPELINES:
        check = NumericCheck()
        r = parse_pipeline(text).run(p, sample_inputs=_samples(), instruments=[check])
        verify(r.program)  # the manager verified it too; this states the contract
        out = r.program.run_named(**_inputs(r.program, x))
        assert all(torch.isfinite(v).all() for v in out.values()), text
        assert print_ir(p) == before, text
        for rec in check.reports:
            assert "skipped" not in rec, (text, rec)
            if rec["semantics"] == "exact":
                assert rec["ok"], (text, rec)


def test_shared_and_tied_weights_are_skipped_by_lowrank_with_the_reason():
    _, p, _ = _shape("tied")
    r = parse_pipeline("lowrank{ratio=0.5}").run(p)
    stats = r.stats["passes"][0]["stats"]
    assert not r.changed
    assert [rec["reason"] for rec in stats["skipped"]] == [
        "weight shared with other nodes (tied)"
    ] * 2


def test_lowrank_chain_on_a_real_llama_verifies():
    p = _captured("llama").copy()
    r = parse_pipeline("lowrank{ratio=0.5,targets=model.layers.0.*}").run(p)
    assert r.stats["passes"][0]["stats"]["factored"] == 7
    model, args = _model("llama")
    out = first_output(r.program(*args))
    assert out.shape == first_output(model(*args)).shape


# ---------------------------------------------------------------------------------------
# item 3: the PassManager verifies the result by default


@dataclasses.dataclass(frozen=True)
class _UseBeforeDef(Pass):
    """A broken pass: moves the last computed value before everything it uses."""

    name = "use-before-def"
    semantics = "exact"

    def run(self, program, ctx):
        last = [n for n in program.graph.nodes if n.op == "call_function"][-1]
        first = next(n for n in program.graph.nodes if n.op != "placeholder")
        first.prepend(last)
        program.bump_version()
        return PassResult(program, True, {})


@dataclasses.dataclass(frozen=True)
class _DuplicateOutput(Pass):
    """A broken pass: returns a program whose two outputs have one name."""

    name = "duplicate-output"
    semantics = "exact"

    def run(self, program, ctx):
        value = program.output_values[0]
        program.output_node.args = ((value, value),)
        program._output_names = ["out", "out"]
        program.bump_version()
        return PassResult(program, True, {})


def _mlp_program() -> tuple[splice.Program, torch.Tensor]:
    _, p, x = _shape("chain2")
    return p, x


def test_a_pass_returning_a_broken_program_is_a_pass_error_naming_pass_and_node():
    p, _ = _mlp_program()
    before = print_ir(p)
    with pytest.raises(PassError) as e:
        PassManager([_UseBeforeDef()]).run(p)
    assert e.value.message == (
        "pass 'use-before-def' returned a program that does not verify: "
        "%linear_1 uses %linear before it is defined"
    )
    assert e.value.where.startswith("node %linear_1, module 1")
    assert e.value.node == "linear_1"
    assert print_ir(p) == before


def test_the_first_broken_pass_is_blamed_not_a_later_one():
    p, _ = _mlp_program()
    with pytest.raises(PassError, match=r"^pass 'use-before-def' returned a program"):
        PassManager([make_pass("cse"), _UseBeforeDef(), make_pass("dce")]).run(p)


def test_a_later_pass_failing_on_a_broken_program_blames_the_pass_that_broke_it():
    p, _ = _mlp_program()
    with pytest.raises(PassError) as e:
        PassManager([_UseBeforeDef(), make_pass("lowrank", ratio=0.5)]).run(p)
    assert e.value.message.startswith(
        "pass 'use-before-def' returned a program that does not verify: "
        "%linear_1 uses %linear before it is defined (the next pass then failed on it: "
    )


def test_verify_false_returns_the_unverified_program():
    p, _ = _mlp_program()
    r = PassManager([_UseBeforeDef()], verify=False).run(p)
    with pytest.raises(VerificationError, match="uses %linear before it is defined"):
        verify(r.program)
    r2 = parse_pipeline("cse").run(p, verify=False)
    verify(r2.program)


def test_splice_opt_no_verify_prints_the_unverified_program(monkeypatch, capsys):
    from splice.passes import registry
    from splice.tools.cli import main

    registry.available_passes()  # load the built-ins before adding the broken pass
    monkeypatch.setitem(registry._REGISTRY, "use-before-def", _UseBeforeDef)
    model = ["splice.models:mlp", "-a", "d=8", "-a", "hidden=16"]
    assert main(["opt", *model, "-p", "use-before-def"]) == 1
    assert "returned a program that does not verify" in capsys.readouterr().err
    assert main(["opt", *model, "-p", "use-before-def", "--no-verify"]) == 0
    text = capsys.readouterr().out
    # as returned: the last linear moved before the values it reads
    assert text.index("%linear_1 : ") < text.index("%linear : ") < text.index("%gelu : ")
    assert main(["opt", *model, "-p", "cse", "--no-verify", "--verify-each"]) == 1
    assert "not allowed with argument" in capsys.readouterr().err


def test_duplicate_output_names_from_a_pass_are_a_pass_error():
    p, _ = _mlp_program()
    with pytest.raises(PassError) as e:
        PassManager([_DuplicateOutput()]).run(p)
    assert e.value.message == (
        "pass 'duplicate-output' returned a program that does not verify: "
        "output names ['out'] appear more than once"
    )


def test_program_edits_cannot_make_duplicate_output_names():
    p, _ = _mlp_program()
    p.add_output("extra", p.output_values[0])
    with pytest.raises(ValueError, match=r"output names \['out'\] would appear twice"):
        p.rename_output("extra", "out")


def test_an_invalid_input_program_is_a_verification_error_not_a_pass_error():
    p, _ = _mlp_program()
    node = next(n for n in p.graph.nodes if n.op == "call_function")
    M.set_spec(node, M.TensorSpec((4, 99), torch.float32))
    with pytest.raises(VerificationError, match=r"^the input program is invalid: "):
        parse_pipeline("cse").run(p)


def test_verify_each_makes_the_final_check_redundant_and_catches_the_pass():
    p, _ = _mlp_program()
    with pytest.raises(VerificationError, match=r"^after pass 'use-before-def': "):
        PassManager([_UseBeforeDef()], [VerifyEach()]).run(p)


def test_a_crash_reproducer_is_written_for_a_pass_that_breaks_the_program(tmp_path):
    from splice.passes import CrashReproducer

    p, _ = _mlp_program()
    crash = CrashReproducer(tmp_path)
    with pytest.raises(PassError):
        PassManager([make_pass("cse"), _UseBeforeDef()], [crash]).run(p)
    assert [f.name for f in crash.folders] == ["crash_002_use-before-def"]


# ---------------------------------------------------------------------------------------
# item 6: weight names that cannot clash


def test_fold_constants_with_params_on_gpt2():
    model, args = _model("gpt2")
    p = _captured("gpt2").copy()
    r = parse_pipeline("fold-constants{params=true}").run(p)
    q = r.program
    assert r.stats["passes"][0]["stats"]["folded"] >= 1
    assert all(weight_name_problem(w) is None for w in q.weight_kinds)
    torch.testing.assert_close(first_output(q(*args)), first_output(model(*args)))
    verify(parse_ir(print_ir(q), weights=q.weights))


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("_folded.to", "_folded.to_"),
        ("forward", "forward_"),
        ("graph.weight", "graph_.weight"),
        ("code", "code_"),
        ("meta", "meta_"),
        ("a..b", "a.b"),
        (".lead.trail.", "lead.trail"),
        ("x.def", "x.def_"),
        ("h.0.c-attn", "h.0.c_attn"),
        ("stitch.0_1.0", "stitch.0_1.0"),
        ("", "w"),
    ],
)
def test_safe_weight_name(base, expected):
    assert safe_weight_name(base) == expected
    assert weight_name_problem(expected) is None


def test_weight_name_problems_are_explained():
    assert weight_name_problem("to") == "part 'to' is an attribute of torch.fx.GraphModule"
    assert weight_name_problem("a.to") == "part 'to' is an attribute of torch.nn.Module"
    assert weight_name_problem("graph.weight") == (
        "part 'graph' is an attribute of torch.fx.GraphModule"
    )
    assert weight_name_problem("a..b") == (
        "it has an empty part (`..`, or a leading or trailing dot)"
    )
    assert weight_name_problem("a.class") == "part 'class' is a Python keyword"
    assert weight_name_problem("h.0.attn.c_attn.weight") is None


@pytest.mark.parametrize("base", ["forward", "graph.x", "code", "a..b", "to", "x.def", "training"])
def test_rewriter_add_weight_unique_always_gives_a_usable_fresh_name(base):
    p, x = _mlp_program()
    rw = Rewriter(p, "test")
    first = next(n for n in p.graph.nodes if n.op == "call_function")
    with rw.at(first):
        a = rw.add_weight(base, torch.ones(8), unique=True)
        b = rw.add_weight(base, torch.ones(8), unique=True)
        y = rw.call(torch.ops.aten.add.Tensor, (a, b))
    assert a.target != b.target
    assert weight_name_problem(a.target) is None and weight_name_problem(b.target) is None
    p.add_output("extra", y)
    verify(p)
    assert torch.equal(p.run_named(x)["extra"], torch.full((8,), 2.0))
    verify(parse_ir(print_ir(p), weights=p.weights))


def test_program_add_weight_rejects_a_clashing_name():
    p, _ = _mlp_program()
    with pytest.raises(ValueError, match=r"'forward' cannot name a weight: part 'forward' is an"):
        p.add_weight("forward", torch.ones(2))


class _Named(nn.Module):
    def __init__(self, attr: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self._parameters[attr] = nn.Parameter(torch.ones(4))  # bypasses nn.Module's check
        self.attr = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self._parameters[self.attr]


class _GraphChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.graph = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


@pytest.mark.parametrize(
    ("make", "name", "problem", "where"),
    [
        (lambda: _Named("forward"), "forward", "part 'forward' is an attribute of torch.fx.GraphModule", "the model itself"),
        (lambda: _Named("code"), "code", "part 'code' is an attribute of torch.fx.GraphModule", "the model itself"),
        (lambda: _Named("a..b"), "a..b", "it has an empty part", None),
        (_GraphChild, "graph.weight", "part 'graph' is an attribute of torch.fx.GraphModule", "module 'graph'"),
    ],
)  # fmt: skip
def test_capture_rejects_weight_names_a_program_cannot_hold(make, name, problem, where):
    model = make()
    with pytest.raises(CaptureError) as e:
        splice.capture(model, (torch.randn(2, 4),))
    msg = e.value.message
    assert msg.startswith(f"cannot capture {type(model).__name__}: parameter {name!r} has a name")
    assert problem in msg
    if where is not None:
        assert e.value.where == where
    assert e.value.hint.startswith("rename that attribute or submodule in the model")


def test_hyper_prefix_that_cannot_name_weights_is_a_pipeline_error():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("hyper{targets=*,prefix=graph}")
    assert e.value.message == (
        "hyper: prefix 'graph' cannot name weights: part 'graph' is an attribute of "
        "torch.fx.GraphModule"
    )


# ---------------------------------------------------------------------------------------
# item 10: pipeline text and options


def test_a_stray_brace_is_reported_where_it_is():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("lowrank}ratio=0.5")
    assert e.value.message == (
        "unexpected '}' after pass 'lowrank' at column 8\n    lowrank}ratio=0.5\n           ^"
    )
    assert e.value.hint == "options go in braces right after the pass name: lowrank{key=value,...}"


def test_text_after_a_pass_is_reported_where_it_is():
    with pytest.raises(PipelineError, match=r"^unexpected 'x' after pass 'cse' at column 5"):
        parse_pipeline("cse x")
    with pytest.raises(PipelineError, match=r"^unexpected '}' after pass 'lowrank' at column 19"):
        parse_pipeline("lowrank{ratio=0.5}}")


def test_a_bad_pass_points_at_that_pass():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("cse,lowrank")
    assert e.value.message == "lowrank needs exactly one rank rule, got none"
    assert e.value.where == "pass 'lowrank' at column 5 of 'cse,lowrank'"


@pytest.mark.parametrize(
    ("text", "column", "option", "value"),
    [
        ("specialize{cond=[nan]}", 12, "cond", "nan"),
        ("specialize{cond=[0.5,inf]}", 12, "cond", "inf"),
        ("lowrank{ratio=0.5,alpha=nan}", 19, "alpha", "nan"),
        ("lowrank{ratio=nan}", 9, "ratio", "nan"),
        ("lowrank{energy=-inf}", 9, "energy", "-inf"),
        ("experts{num_experts=4,top_k=2,lr=nan}", 31, "lr", "nan"),
        ("experts{num_experts=4,top_p=nan}", 23, "top_p", "nan"),
    ],
)
def test_non_finite_options_are_rejected_where_they_are(text, column, option, value):
    name = text.split("{")[0]
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    first_line = e.value.message.splitlines()[0]
    optional = "" if option in ("cond", "alpha", "lr") else " (or none)"
    assert first_line == (
        f"{name}: option {option}: {value!r} is not a finite number{optional} at column {column}"
    )


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("specialize", {"cond": (float("nan"),)}),
        ("lowrank", {"ratio": 0.5, "alpha": float("nan")}),
        ("lowrank", {"budget_params": float("inf")}),
        ("experts", {"num_experts": 4, "top_k": 2, "lr": float("nan")}),
    ],
)
def test_non_finite_options_are_rejected_from_python_too(name, options):
    bad = next(k for k, v in options.items() if k not in ("ratio", "num_experts", "top_k"))
    with pytest.raises(PipelineError, match=rf"^{name}: option {bad} must be a finite number"):
        make_pass(name, **options)


def test_specialize_python_api_rejects_nan():
    from splice.passes.specialize import specialize

    _, p, _ = _shape("chain2")
    q = parse_pipeline("hyper{targets=*}").run(p).program
    with pytest.raises(PipelineError, match=r"^specialize: option cond must be a finite number"):
        specialize(q, torch.tensor([float("nan")]))


def test_numeric_check_reports_nan_outputs_as_an_error_not_zero():
    ref = [torch.tensor([1.0, 2.0])]
    assert compare_outputs(ref, [torch.tensor([1.0, float("nan")])]) == {
        "max_abs": float("inf"), "max_rel": float("inf"), "cosine": -1.0, "nonfinite": 1,
    }  # fmt: skip
    both = compare_outputs([torch.tensor([1.0, float("nan")])], [torch.tensor([1.5, float("nan")])])
    assert both["max_abs"] == 0.5 and both["nonfinite"] == 1


# ---------------------------------------------------------------------------------------
# item 10: passes after hyper see its input


@pytest.mark.parametrize(
    "text",
    [
        "hyper{targets=*},lowrank{ratio=0.5}",
        "hyper{targets=*},lowrank{method=whitened,ratio=0.5}",
        "hyper{targets=0.weight},experts{num_experts=2,top_k=1,router=trained}",
    ],
)
def test_passes_after_hyper_calibrate_with_its_cond_input(text):
    _, p, x = _shape("ffn_ffn")
    ctx = PassContext(_samples())
    samples_before = list(ctx.sample_inputs)
    check = NumericCheck()
    r = PassManager(parse_pipeline(text), [check]).run(p, ctx)
    assert [rec["changed"] for rec in r.stats["passes"]] == [True, True]
    assert r.program.input_names == ["input_1", "cond"]
    assert r.program(x, torch.tensor([0.5])).shape == (4, 8)
    assert all("skipped" not in rec for rec in check.reports)
    assert ctx.sample_inputs == samples_before  # the caller's context is restored


def test_an_added_input_without_samples_is_a_clear_calibration_error():
    @dataclasses.dataclass(frozen=True)
    class _AddsInput(Pass):
        name = "adds-input"

        def run(self, program, ctx):
            node = Rewriter(program, self.name).add_input(
                "extra", M.TensorSpec((1,), torch.float32)
            )
            del node
            return PassResult(program, True, {})

    _, p, _ = _shape("chain2")
    with pytest.raises(PassError) as e:
        PassManager([_AddsInput(), make_pass("lowrank", ratio=0.5, method="whitened")]).run(
            p, sample_inputs=_samples()
        )
    assert e.value.message == (
        "calibration: a sample gives 1 values, but program 'Sequential' has 2 inputs "
        "['input_1', 'extra']"
    )


class _LinearBlocks(nn.Module):
    """Blocks that are single Linears feeding each other directly (stitch's block shape)."""

    def __init__(self, width: int, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_stitch_of_linear_blocks_then_specialize_and_lowrank_verify():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g)
    small = splice.capture(_LinearBlocks(16).eval(), (x,))
    large = splice.capture(_LinearBlocks(32).eval(), (x,))
    ctx = PassContext(
        [(torch.randn(4, 8, generator=g),) for _ in range(2)], programs={"large": large}
    )
    r = PassManager(parse_pipeline("stitch{anchors=large,calib_samples=2}")).run(small, ctx)
    n_configs = r.stats["passes"][0]["stats"]["configs"]
    assert n_configs > 2
    for c in (0, 1, n_configs - 1):
        assert r.program(x, torch.tensor(c)).shape == (4, 8)
    q = parse_pipeline("specialize{config=1},lowrank{ratio=0.5}").run(r.program)
    assert [rec["changed"] for rec in q.stats["passes"]] == [True, True]
    torch.testing.assert_close(
        parse_pipeline("specialize{config=1}").run(r.program).program(x),
        r.program(x, torch.tensor(1)),
    )
