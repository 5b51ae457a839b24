"""The zoo (splice.zoo): every model a new user brings, through the whole path.

For every case: capture (``capture_dynamic`` for dynamic models), text round trip, compile
for the host and equality with eager on every input set; and each of the five structural
passes where it applies, with the result verified (the pipeline's default) and the pass's
stats accounting for what it did not touch.

Captures, pass results and artifacts are shared between the tests of one case (module
caches); each model is compiled once.
"""

from __future__ import annotations

import fnmatch
import functools

import pytest
import torch
from torch import nn

import splice
from splice import zoo
from splice.ir import parse_ir, print_ir, verify
from splice.ir.signatures import SignatureSet, signature_of, signature_of_values
from splice.passes import PassContext, parse_pipeline
from splice.passes.branches import has_control_flow, is_split

pytest.importorskip("transformers")

ALL = zoo.names()


def members(p) -> list:
    return list(p) if isinstance(p, SignatureSet) else [p]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference over the output's magnitude (at least 1)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got.float() - want.float()).abs().max().item() / max(1.0, want.abs().max().item())


def graphs(program) -> list:
    """Every graph of a program or set: the top-level ones and their sub-graphs."""
    out = []
    for p in members(program):
        out += list(p._all_graph_modules())
    return out


def count_op(program, name: str) -> int:
    return sum(
        1
        for gm in graphs(program)
        for n in gm.graph.nodes
        if n.op == "call_function" and name in str(n.target)
    )


# ---------------------------------------------------------------------------------------
# shared state: one build, one capture and one artifact per case


@functools.cache
def built(name: str) -> zoo.ZooModel:
    return zoo.BY_NAME[name].build()


@functools.cache
def _captured(name: str):
    return zoo.BY_NAME[name].capture(built(name))


def captured(name: str):
    """A copy of the case's capture (Program, or SignatureSet for shape branches)."""
    p = _captured(name)
    return p.copy()


@functools.cache
def want(name: str, i: int) -> list[torch.Tensor]:
    zm = built(name)
    return zm.eager(*zm.inputs[i])


def run_all(p, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(p.run(*inputs))


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@functools.cache
def _compiled(name: str, root: str):
    case, zm = zoo.BY_NAME[name], built(name)
    program = captured(name)
    out = f"{root}/{name}.artifact"
    if case.kind == "static":
        art = splice.compile(program, "host", output=out)
    else:
        split = parse_pipeline("branches").run(program, sample_inputs=[zm.inputs[0]]).program
        art = splice.compile(split, "host", output=out, samples=[zm.inputs[0]])
    return splice.load(art.path)


# ---------------------------------------------------------------------------------------
# capture, round trip, compile


def test_the_zoo_is_wide():
    groups = {c.group for c in zoo.CASES}
    assert {"decoder", "encoder", "cnn", "sentence", "dynamic"} <= groups
    assert len(zoo.CASES) >= 25
    assert all(len(built(n).inputs) >= 2 for n in ("gpt2", "bert", "early_exit"))


@pytest.mark.parametrize("name", ALL)
def test_capture_round_trip_equals_eager(name):
    program = captured(name)
    zm = built(name)
    for m in members(program):
        text = print_ir(m)
        parsed = parse_ir(text, m.weights)
        assert print_ir(parsed) == text
        verify(parsed)
        # the parsed program computes what the captured one does, bit for bit
        mine = [x for x in zm.inputs if signature_of_values(x) == signature_of(m.input_specs)]
        assert mine, name
        for x in mine:
            for a, b in zip(run_all(parsed, x), run_all(m, x), strict=True):
                assert torch.equal(a, b), name
    for i, x in enumerate(zm.inputs):
        got = run_all(program, x)
        ref = want(name, i)
        assert len(got) == len(ref), (program.output_names, len(ref))
        for g, w in zip(got, ref):
            assert rel_err(g, w) <= 1e-5, (name, i)


@pytest.mark.parametrize("name", ALL)
def test_compiled_equals_eager_on_every_input_set(name, artifact_dir):
    case, zm = zoo.BY_NAME[name], built(name)
    cm = _compiled(name, str(artifact_dir))
    for i, x in enumerate(zm.inputs):
        got = list(cm.run(*x))
        ref = want(name, i)
        assert len(got) == len(ref)
        for g, w in zip(got, ref):
            assert rel_err(g, w) <= case.rtol, (name, i, rel_err(g, w))


# ---------------------------------------------------------------------------------------
# the five passes


def _run(name: str, pipeline: str, **kw):
    zm = built(name)
    kw.setdefault("sample_inputs", zm.inputs[:1])
    return parse_pipeline(pipeline).run(captured(name), **kw)


def _member_stats(result) -> list[dict]:
    """The stats of a one-pass pipeline: one dict, or one per member of a SignatureSet."""
    stats = result.stats["passes"][0]["stats"]
    return stats["signatures"] if isinstance(result.program, SignatureSet) else [stats]


def _stats(result) -> dict:
    return _member_stats(result)[0]


def _linear_layers(model: nn.Module, program) -> set[str]:
    """The model's Linear layers (nn.Linear, GPT-2's Conv1D) whose weight the program holds."""
    weights = set()
    for p in members(program):
        weights |= set(p.weight_kinds)
    out = set()
    for path, m in model.named_modules():
        linear = isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
        if linear and f"{path}.weight" in weights:
            out.add(path)
    return out


@pytest.mark.parametrize("name", zoo.names(passes="lowrank"))
def test_lowrank_factors_or_lists_every_linear(name):
    case = zoo.BY_NAME[name]
    # plain SVD needs no samples; dynamic cases calibrate anyway (activations in branches)
    samples = built(name).inputs[:1] if case.kind != "static" else None
    pipeline = f'lowrank{{ratio=0.5,targets="{case.lowrank_targets}"}}'
    result = _run(name, pipeline, sample_inputs=samples)
    linears = _linear_layers(built(name).model, captured(name))
    assert linears, name
    for stats in _member_stats(result):
        factored = {r["layer"] for r in stats.get("layers", [])}
        skipped = {r["layer"] for r in stats.get("skipped", [])}
        untouched = set(stats.get("not_targeted", []))
        missing = linears - factored - skipped - untouched
        assert not missing, f"{name}: Linears neither factored nor listed as skipped: {missing}"
        assert factored, f"{name}: nothing factored ({stats.get('reason')}; skipped: {skipped})"
        assert count_op(result.program, "lowrank_linear") >= len(factored)
    verify_all(result.program)
    for x in built(name).inputs:
        assert all(torch.isfinite(t).all() for t in run_all(result.program, x))


def verify_all(p) -> None:
    for m in members(p):
        verify(m)


@pytest.mark.parametrize("name", zoo.names(passes="experts"))
def test_experts_splits_every_ffn_or_says_why(name):
    case = zoo.BY_NAME[name]
    before = count_op(captured(name), "moe_ffn")
    # all four experts active with unit gates: the routed FFN equals the dense one
    # (contiguous slices: the k-means split is tested in test_experts.py)
    options = f'num_experts=4,top_k=4,split=contiguous,targets="{case.experts_targets}"'
    result = _run(name, f"experts{{{options}}}")
    stats = _stats(result)
    verify_all(result.program)
    if case.ffns:
        assert result.changed, stats.get("reason")
        assert stats["ffns_split"] == case.ffns, stats
        assert count_op(result.program, "moe_ffn") == before + case.ffns
        for i, x in enumerate(built(name).inputs):
            for g, w in zip(run_all(result.program, x), run_all(captured(name), x)):
                assert rel_err(g, w) <= 1e-5, (name, i)
    else:
        assert not result.changed
        assert stats.get("reason"), stats
        if before:  # routed experts already there (Mixtral, Qwen2-MoE): listed as such
            assert len(stats["existing_experts"]) == before, stats


@pytest.mark.parametrize("name", zoo.names(passes="hyper"))
def test_hyper_conditions_the_chosen_weights_and_preserves_the_program(name):
    case = zoo.BY_NAME[name]
    result = _run(name, f'hyper{{targets="{case.hyper}"}}')
    stats = _stats(result)
    assert result.changed, stats
    verify_all(result.program)
    program = captured(name)
    first = members(result.program)[0]
    added = [n for n in first.input_names if n not in members(program)[0].input_names]
    assert len(added) == 1, first.input_names
    hit = [w for w in members(program)[0].weight_kinds if fnmatch.fnmatch(w, case.hyper)]
    assert all(w not in first.weight_kinds for w in hit), "targets still plain weights"
    # init=preserve: the conditioned program equals the original for every cond
    index = first.input_names.index(added[0])
    g = torch.Generator().manual_seed(7)
    for x in built(name).inputs:
        cond = torch.rand(1, generator=g)
        args = list(x)
        args.insert(index, cond)
        for a, b in zip(run_all(result.program, args), run_all(program, x)):
            assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("name", zoo.names(passes="stitch"))
def test_stitch_joins_two_widths_of_the_family(name):
    case = zoo.BY_NAME[name]
    small_zm = case.family(case.family_width)
    small = splice.capture(small_zm.model, small_zm.example)
    large = captured(name)
    calib = [*built(name).inputs, *built(name).calib]
    ctx = PassContext(sample_inputs=calib, programs={"large": large})
    result = parse_pipeline("stitch{anchors=large,calib_samples=8}").run(small, ctx=ctx)
    out = result.program
    verify(out)
    assert out.input_names == [*small.input_names, "config"]
    stats = _stats(result)
    assert stats, "stitch reports nothing"
    with torch.no_grad():
        for x in built(name).inputs:
            # configurations 0 and 1 are the two anchors (ordered by FLOPs), exactly
            anchors = [anchor.run(*x) for anchor in (small, large)]
            for cfg in (0, 1):
                got = out.run(*x, torch.tensor(cfg))
                assert any(
                    all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)) for ref in anchors
                ), (name, cfg)
            # a stitched route runs and gives finite values of the anchors' shapes
            got = out.run(*x, torch.tensor(2))
            assert [t.shape for t in got] == [t.shape for t in anchors[0]]
            assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("name", zoo.names(passes="branches"))
def test_branches_splits_and_equals_the_capture_on_every_path(name):
    zm = built(name)
    program = captured(name)
    result = parse_pipeline("branches").run(program, sample_inputs=[zm.inputs[0]])
    split = result.program
    verify_all(split)
    for before, after in zip(members(program), members(split), strict=True):
        # a member with data-dependent branches is split into parts; one without (the
        # shape branch's members) is left as it is, and the stats say so
        assert is_split(after) == has_control_flow(before), name
    for stats in _member_stats(result):
        assert stats.get("branches") or stats.get("reason"), stats
    for x in zm.inputs:
        for a, b in zip(run_all(split, x), run_all(program, x), strict=True):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------
# what the zoo found (issue #16 items 3, 4, 9), as focused regression tests


def test_gpt2_at_batch_2_lowers_with_its_views_as_reshapes():
    from splice.runtime.backends import tvm as tvm_backend

    program = captured("gpt2_b2")
    ep, _ = tvm_backend.export_program(program)
    views = sum(
        1
        for n in ep.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.view.default
    )
    assert views and tvm_backend.views_as_reshapes(ep) == views
    assert not ep.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default)
    # torch decomposes it now (the views after SDPA meet strides a view cannot take)
    tvm_backend.decompose(ep, program.name)


def test_torch_decomposition_errors_are_shown_whole_without_a_converter_hint(monkeypatch):
    from splice.errors import LoweringError
    from splice.runtime.backends import tvm as tvm_backend

    ep, _ = tvm_backend.export_program(captured("mlp"))
    message = "Cannot view a tensor with shape [2, 8, 64]!\n\nWhile executing %view_6\nmore"

    def fail(self, *a, **k):
        raise ValueError(message)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", fail)
    with pytest.raises(LoweringError) as info:
        tvm_backend.decompose(ep, "p")
    text = str(info.value)
    assert message in text and "converter" not in text
    # only an op TVM has no converter for gets the converter hint
    missing = tvm_backend.import_error("p", AssertionError("Unsupported function types ['foo']"))
    assert "register_lowering" in str(missing)
    other = tvm_backend.import_error("p", ValueError("line one\nline two"))
    assert "line one\nline two" in str(other) and "register_lowering" not in str(other)


def test_folded_constants_never_take_a_module_attribute_name():
    from splice.ir.program import weight_name_problem

    # Gemma2's folded constants include a value computed by a node named `to`
    result = parse_pipeline("cse,fold-constants,dce").run(captured("gemma2"))
    folded = [w for w in result.program.weight_kinds if w.startswith("_folded.")]
    assert folded and all(weight_name_problem(w) is None for w in folded), folded
    assert "_folded.to_" in folded
    text = """weight @c : f32[3] buffer
program @p(%x : f32[3]) {
  %to : f32[3] = aten.mul.Tensor(@c, 2.0)
  %forward : f32[3] = aten.add.Tensor(%to, @c)
  %graph : f32[3] = aten.neg(%forward)
  %state_dict : f32[3] = aten.mul.Tensor(%graph, %x)
  return out=%state_dict, a=%to, b=%forward
}"""
    p = parse_ir(text, {"c": torch.ones(3)})
    out = parse_pipeline("fold-constants").run(p).program
    names = sorted(w for w in out.weight_kinds if w.startswith("_folded."))
    assert names == ["_folded.forward_", "_folded.graph", "_folded.to_"], names
    x = torch.tensor([1.0, 2.0, 3.0])
    assert [t.tolist() for t in out.run(x)] == [[-3.0, -6.0, -9.0], [2.0] * 3, [3.0] * 3]


def test_a_pipeline_runs_on_a_signature_set_member_by_member():
    from splice.errors import PassError
    from splice.passes import PassManager

    sset = captured("shape_branch")
    assert isinstance(sset, SignatureSet)
    zm = built("shape_branch")
    small, large = zm.inputs[0], zm.inputs[1]
    samples = [small, large, small]
    result = parse_pipeline("lowrank{method=whitened,ratio=0.5}").run(sset, sample_inputs=samples)
    out = result.program
    assert isinstance(out, SignatureSet) and len(out) == len(sset)
    assert out.signatures == sset.signatures
    assert result.changed
    per_member = result.stats["passes"][0]["stats"]["signatures"]
    assert len(per_member) == 2 and all(s["factored"] == 1 for s in per_member)
    assert len(result.stats["signatures"]) == 2
    for m in out:
        assert count_op(m, "lowrank_linear") == 1
    for x in (small, large):
        got, ref = out(*x), sset(*x)
        assert got.shape == ref.shape and rel_err(got, ref) < 1.0
    # the caller's set is unchanged, and PassManager takes a set too
    assert count_op(sset, "lowrank_linear") == 0
    again = PassManager("dce").run(sset)
    assert isinstance(again.program, SignatureSet)
    # a sample of a shape the set does not hold is an error naming the signatures
    odd = (torch.randn(1, 3, 24, 24),)
    with pytest.raises(PassError, match="none of SignatureSet"):
        parse_pipeline("dce").run(sset, sample_inputs=[odd])
    # a member's failure names its signature
    with pytest.raises(PassError, match=r"signature \(x: f32\[1,3,32,32\]\)"):
        parse_pipeline("lowrank{method=whitened,ratio=0.5}").run(sset, sample_inputs=[small])
