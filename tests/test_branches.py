"""Dynamic-branch splitting (DyCL): capture_dynamic, the branches pass, host program, artifact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splice
from splice import models_dynamic as Z
from splice.errors import ArtifactError, CaptureError
from splice.ir import parse_ir, print_ir, verify
from splice.ir.explore import capture_dynamic, cond_trace, eager_decisions
from splice.passes import parse_pipeline
from splice.passes.branches import has_control_flow, is_split, split_program
from splice.runtime import host as H

# shape_branch (control flow on an input's shape) is captured per signature: test_signatures.py
SUPPORTED = [n for n in Z.ZOO if n != "shape_branch"]


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # 1e-5 in fp32, relative to the output's magnitude (early-exit logits reach ~120, where
    # one float32 ulp is 7.6e-6)
    return (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.fixture(scope="module", params=SUPPORTED)
def compiled(request, tmp_path_factory):
    case = Z.ZOO[request.param]()
    program = capture_dynamic(case.model, case.example)
    out = tmp_path_factory.mktemp("branches") / f"{case.name}.artifact"
    art = splice.compile(program, "host", output=out, samples=[case.example])
    return case, program, splice.load(art.path)


def test_artifact_equals_eager_and_takes_the_same_branches(compiled):
    case, _, cm = compiled
    traces = set()
    for x in case.branch_inputs:
        with torch.no_grad():
            want = case.model(*x)
        got = cm(*x)
        assert close(got, want), case.name
        eager = cond_trace(eager_decisions(case.model, x))
        assert [t for _, t in cm.last_trace] == eager
        assert all(site.endswith(".py:" + site.rsplit(":", 1)[1]) for site, _ in cm.last_trace)
        traces.add(tuple(eager))
    assert len(traces) > 1  # the inputs really take different paths


def test_each_compiled_part_was_checked_on_its_predecessors_outputs(compiled):
    _, _, cm = compiled
    for part in cm.manifest["parts"]:
        assert part["check_max_abs_diff"] is not None, part["name"]
        assert part["check_max_abs_diff"] <= 1e-4


def test_parts_export_without_graph_breaks_and_hold_no_control_flow(compiled):
    _case, program, _ = compiled
    split, _ = split_program(program)
    _host, parts = H.build_host(split)
    weights = {w: (split.get_weight(w), k) for w, k in split.weight_kinds.items()}
    for info in parts.values():
        part = info.program(weights)
        assert not has_control_flow(part)
        args = tuple(
            torch.zeros(s.shape, dtype=s.dtype) for s in part.input_specs
        )  # static shapes: values do not matter to export
        explained = torch._dynamo.explain(part.graph_module)(*args)
        assert explained.graph_break_count == 0, info.name
        torch.export.export(part.graph_module, args, strict=True)


def test_part_inputs_and_outputs_are_live_in_and_live_out(compiled):
    _, program, _ = compiled
    split, _ = split_program(program)
    host, parts = H.build_host(split)
    # every placeholder of a part is read inside it
    for info in parts.values():
        for ph in info.graph_module.graph.find_nodes(op="placeholder"):
            assert ph.users, f"{info.name}: unused input {ph.name}"

    # every result of a part call is read after it (by a step, a branch or the block results)
    def reads(block):
        out = list(block["results"])
        for s in block["body"]:
            out += s.get("args", []) + ([s["pred"]] if "pred" in s else [])
            if s["op"] == "branch":
                out += reads(s["then"]) + reads(s["else"])
        return out

    def check(block):
        later = reads(block)
        for s in block["body"]:
            if s["op"] == "call":
                assert all(r in later for r in s["results"]), s
            if s["op"] == "branch":
                check(s["then"])
                check(s["else"])

    check(host["main"])


def test_split_program_equals_the_captured_one_on_every_path(compiled):
    case, program, _ = compiled
    split = parse_pipeline("branches").run(program, sample_inputs=[case.example]).program
    assert is_split(split)
    verify(split)
    for x in case.branch_inputs:
        with torch.no_grad():
            assert torch.equal(split(*x), program(*x))


def test_cond_and_split_forms_print_parse_and_verify(compiled):
    _, program, _ = compiled
    for p in (program, split_program(program)[0]):
        verify(p)
        text = print_ir(p)
        q = parse_ir(text, weights=p.weights)
        assert print_ir(q) == text
        verify(q)


def test_a_plain_trace_bakes_in_one_path():
    # the negative control: a single real-valued trace disagrees on inputs taking another path
    import warnings

    case = Z.early_exit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit's TracerWarning: exactly the problem shown here
        traced = torch.jit.trace(case.model, case.example, check_trace=False)
    wrong = 0
    for x in case.branch_inputs:
        with torch.no_grad():
            if not close(traced(*x), case.model(*x)):
                wrong += 1
    assert wrong > 0


def test_identical_parts_are_shared_between_paths():
    case = Z.dynamic_depth()
    program = capture_dynamic(case.model, case.example)
    _split, stats = split_program(program)
    assert program.attrs["paths"] == 5
    assert stats["parts"] < stats["part_calls"]  # step+halt is one part, called per iteration
    assert stats["branches"] == 4


class _SkipOrKeep(nn.Module):
    """The else branch passes x through (identity) and a constant: both need no part."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x), self.scale * 3
        return x.clone(), self.scale * 3


def test_identity_and_constant_outputs_are_hoisted_into_the_host():
    m = _SkipOrKeep().eval()
    program = capture_dynamic(m, (torch.ones(1, 4),))
    split, stats = split_program(program)
    assert stats["hoisted_identity"] >= 1
    assert stats["hoisted_constant"] >= 1
    assert stats["segments_without_part"] >= 1
    for x in (torch.ones(1, 4), -torch.ones(1, 4)):
        got, want = split(x), m(x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_tampered_host_program_is_rejected(compiled, tmp_path):
    import shutil

    _, _, cm = compiled
    copy = tmp_path / "a.artifact"
    shutil.copytree(cm.path, copy)
    host = json.loads((copy / "host.json").read_text())
    host["main"]["body"].reverse()
    (copy / "host.json").write_text(json.dumps(host))
    with pytest.raises(ArtifactError, match="host.json"):
        splice.load(copy)


# -- errors ----------------------------------------------------------------------------------


class _FloatItem(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:
            return x + 1
        return x - 1


class _IntSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])

    def forward(self, x):
        return self.blocks[(x > 0).sum()](x)


class _Unbounded(nn.Module):
    def forward(self, x):
        while x.sum() < 1e9:
            x = x * 2
        return x


def test_float_decision_is_an_error_that_says_how_to_fix_it():
    with pytest.raises(CaptureError, match="turned into a Python number") as e:
        capture_dynamic(_FloatItem(), (torch.ones(3),))
    assert "test_branches.py" in str(e.value) and "bool tensor" in str(e.value)


def test_integer_of_unknown_range_is_an_error():
    with pytest.raises(CaptureError, match="range is unknown"):
        capture_dynamic(_IntSum(), (torch.ones(1),))


def test_unbounded_loop_is_an_error():
    with pytest.raises(CaptureError, match="more than 8 data-dependent decisions") as e:
        capture_dynamic(_Unbounded(), (torch.ones(3),), max_decisions=8)
    assert "bound it" in str(e.value)


def test_too_many_paths_is_an_error():
    case = Z.blockdrop()
    with pytest.raises(CaptureError, match="more than 4 paths"):
        capture_dynamic(case.model, case.example, max_paths=4)


def test_a_model_without_decisions_gives_a_plain_program():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    p = capture_dynamic(m, (torch.ones(2, 4),))
    assert not has_control_flow(p)
    assert torch.equal(p(torch.ones(2, 4)), m(torch.ones(2, 4)))


def test_user_torch_cond_is_split_too(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = torch.cond(x.sum() > 0, lambda v: F.relu(self.lin(v)), lambda v: v * 2, (x,))
            return y + 1

    m = M().eval()
    p = splice.capture(m, (torch.ones(2, 4),))
    art = splice.compile(p, "host", output=tmp_path / "c.artifact")
    cm = splice.load(art.path)
    for x in (torch.ones(2, 4), -torch.ones(2, 4)):
        with torch.no_grad():
            assert close(cm(x), m(x))
    assert len(cm.last_trace) == 1


def test_splice_show_prints_the_host_program_and_parts(compiled, capsys):
    from splice.tools.cli import main

    _, _, cm = compiled
    assert main(["show", str(cm.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host program (splice-host/1)")
    for part in cm.manifest["parts"]:
        assert f"part {part['name']}:" in out
    assert "if " in out and "then(" in out and "else(" in out
    assert "models_dynamic.py:" in out  # each branch names the model line it decides
    assert "program @" in out  # then the split program's text IR


def test_switch_chain_compares_run_in_the_host():
    """``modules[argmax]`` becomes a chain of cond(idx == k); the compares are host steps,
    so each path calls three parts (router, chosen expert, the residual add after the
    chain rejoins), not one more part per level."""
    case = Z.routed_moe()
    split, stats = split_program(capture_dynamic(case.model, case.example))
    host, parts = H.build_host(split)
    text = json.dumps(host)
    assert text.count('"op": "eq"') == 2  # levels 1 and 2 (level 0 compares inside part_0)
    # router (+ first compare), 4 experts, and `x + expert(h)` once after the join
    assert stats["parts"] == len(parts) == 6
    calls: list[str] = []

    def counted(name: str):
        run = H.eager_part(parts[name], split.weights)

        def call(*args):
            calls.append(name)
            return run(*args)

        return call

    runner = H.HostProgram(host, {n: counted(n) for n in parts}, split.weights)
    for x in case.branch_inputs:
        calls.clear()
        with torch.no_grad():
            assert close(runner(*x)[0], case.model(*x))
        assert len(calls) == 3
