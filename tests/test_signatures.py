"""Shape-dependent control flow: one capture per input signature, dispatched by the host."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splice
from splice import models_dynamic as Z
from splice.errors import ArtifactError, CaptureError, SpliceError
from splice.ir import print_ir
from splice.ir.explore import capture_dynamic, cond_trace, eager_decisions
from splice.ir.signatures import SignatureSet
from splice.passes.branches import has_control_flow
from splice.runtime import host as H


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


class ShapeAndGate(nn.Module):
    """A shape branch (pool inputs wider than 8) followed by a data branch (on the mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = F.avg_pool2d(x, 2)
        h = self.conv(x).relu().mean(dim=(2, 3))
        if x.mean() > 0:
            h = h * 2.0 + 1.0
        return self.fc(h)


def _gate_inputs(side: int) -> list[torch.Tensor]:
    """One input per gate outcome at this side, each at least 1e-3 from the threshold."""
    found: dict[bool, torch.Tensor] = {}
    g = torch.Generator().manual_seed(side)
    for _ in range(200):
        x = torch.randn(1, 3, side, side, generator=g) * 2
        with torch.no_grad():
            y = x if side <= 8 else F.avg_pool2d(x, 2)
            v = y.mean().item()
        if abs(v) > 1e-3:
            found.setdefault(v > 0, x)
        if len(found) == 2:
            return [found[False], found[True]]
    raise AssertionError(f"no input takes both gate outcomes at side {side}")


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    torch.manual_seed(5)
    model = ShapeAndGate().eval()
    inputs = [*_gate_inputs(8), *_gate_inputs(16)]
    sset = capture_dynamic(model, (inputs[0],), signatures=[(inputs[2],)])
    out = tmp_path_factory.mktemp("signatures") / "gated.artifact"
    art = splice.compile(sset, "host", output=out, samples=[(x,) for x in inputs])
    return model, inputs, sset, art


@pytest.fixture(scope="module")
def shape_branch(tmp_path_factory):
    case = Z.ZOO["shape_branch"]()
    first, *rest = case.branch_inputs
    sset = capture_dynamic(case.model, first, signatures=rest)
    out = tmp_path_factory.mktemp("signatures") / "shape_branch.artifact"
    return case, sset, splice.compile(sset, "host", output=out)


def test_shape_branch_zoo_model_equals_eager_on_both_shapes(shape_branch):
    case, sset, art = shape_branch
    assert isinstance(sset, SignatureSet) and len(sset) == 2
    cm = art.load()
    for x in case.branch_inputs:
        with torch.no_grad():
            want = case.model(*x)
        assert close(cm(*x), want)
        assert close(sset(*x), want)
        # the host chose the capture that took eager's branch: the pooled one iff eager pooled
        (decision,) = case.model.probe(*x)[1]
        member = sset[cm.last_signature]
        pooled = any("avg_pool2d" in str(n.target) for n in member.graph.nodes)
        assert pooled == decision.outcome
        assert cm.last_trace == [] == cond_trace(eager_decisions(case.model, x))
    assert {sset.select(*x) for x in case.branch_inputs} == {0, 1}


def test_a_single_capture_bakes_in_one_shape_path(shape_branch):
    """The negative control: one capture at 16x16 runs on a 32x32 input without complaint
    and computes something else than the model (it never pools)."""
    case, _, _ = shape_branch
    small, large = case.branch_inputs
    single = splice.capture(case.model, small)
    with torch.no_grad():
        want = case.model(*large)
    assert single(*large).shape == want.shape
    assert not close(single(*large), want)


def test_inputs_of_an_uncaptured_shape_are_refused(shape_branch):
    _, sset, art = shape_branch
    x = torch.randn(1, 3, 24, 24)
    with pytest.raises(CaptureError, match=r"inputs \(x: f32\[1,3,24,24\]\) match none of the "
                       r"captured signatures: \(x: f32\[1,3,16,16\]\); \(x: f32\[1,3,32,32\]\)"):  # fmt: skip
        sset(x)
    with pytest.raises(ArtifactError, match=r"inputs \(f32\[1,3,24,24\]\) match none of the "
                       r"signatures the artifact was compiled for"):  # fmt: skip
        art.load()(x)


def test_shape_and_data_branches_together(gated):
    model, inputs, sset, art = gated
    assert all(has_control_flow(p) for p in sset)
    assert art.manifest["branches"] == 2  # one gate per signature
    cm = art.load()
    seen = set()
    for x in inputs:
        with torch.no_grad():
            want = model(x)
        assert close(cm(x), want)
        eager = cond_trace(eager_decisions(model, (x,)))
        assert [t for _, t in cm.last_trace] == eager
        assert cm.last_signature == (0 if x.shape[-1] == 8 else 1)
        seen.add((cm.last_signature, tuple(eager)))
    assert len(seen) == 4  # both gate outcomes at both shapes
    for part in art.manifest["parts"]:
        assert part["name"].startswith(("s0_", "s1_"))
        assert part["check_max_abs_diff"] is not None and part["check_max_abs_diff"] <= 1e-4


def test_reference_and_text_of_a_signature_set(gated):
    _, inputs, sset, art = gated
    ref = art.reference()
    assert isinstance(ref, SignatureSet) and ref.signatures == sset.signatures
    for x in inputs:
        assert close(ref(x), sset(x))
    text = print_ir(sset)
    assert "# signature 0: (x: f32[1,3,8,8])" in text
    assert "# signature 1: (x: f32[1,3,16,16])" in text
    assert text.count("program @ShapeAndGate(") == 2
    assert len(art.samples()) == 4  # samples of both shapes are kept


def test_splice_show_prints_the_signature_switch(gated, capsys):
    from splice.tools.cli import main

    _, _, _, art = gated
    assert main(["show", str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "r0 = match shapes of (x):" in out
    assert "signature 0 (x: f32[1, 3, 8, 8]):" in out
    assert "signature 1 (x: f32[1, 3, 16, 16]):" in out
    assert "# signature 1: (x: f32[1,3,16,16])" in out  # the reference IR follows


def test_tampered_signature_cases_are_rejected(gated, tmp_path):
    import shutil

    art = gated[3]
    bad = tmp_path / "bad.artifact"
    shutil.copytree(art.path, bad)
    host = json.loads((bad / "host.json").read_text())
    host["main"]["body"][0]["cases"][1]["inputs"][0]["shape"] = [1, 3, 9, 9]
    (bad / "host.json").write_text(json.dumps(host))
    with pytest.raises(ArtifactError, match="checksum"):
        splice.load(bad)


def test_members_that_give_one_name_different_weights_keep_both(tmp_path):
    """After per-signature rewriting two members may hold different tensors under one name;
    the artifact keeps both (the later one renamed)."""
    case = Z.ZOO["shape_branch"]()
    first, *rest = case.branch_inputs
    sset = capture_dynamic(case.model, first, signatures=rest)
    changed = sset[1].copy()
    changed.add_weight("fc.bias", changed.get_weight("fc.bias") + 1.0)
    sset = SignatureSet([sset[0], changed])
    art = splice.compile(sset, "host", output=tmp_path / "clash.artifact")
    cm = art.load()
    for x, member in zip(case.branch_inputs, sset):
        assert close(cm(*x), member(*x))
    from safetensors.torch import load_file

    names = set(load_file(str(art.path / "weights.safetensors")))
    assert {"fc.bias", "s1.fc.bias"} <= names


def test_signature_set_construction_errors():
    case = Z.ZOO["shape_branch"]()
    p = splice.capture(case.model, case.branch_inputs[0])
    with pytest.raises(SpliceError, match="at least two programs"):
        SignatureSet([p])
    with pytest.raises(SpliceError, match=r"programs 0 and 1 have the same signature"):
        SignatureSet([p, p.copy()])
    # one distinct shape among the examples gives a plain Program
    again = capture_dynamic(case.model, case.branch_inputs[0], signatures=[case.branch_inputs[0]])
    assert not isinstance(again, SignatureSet)


def test_host_program_runs_signature_steps_eagerly(gated):
    """The merged host program dispatches in PyTorch too (the reference for compiled parts)."""
    model, inputs, sset, _ = gated
    from splice.passes.branches import split_program

    hosts, members = [], []
    constants: dict[str, torch.Tensor] = {}
    for p in sset:
        split, _ = split_program(p)
        host, parts = H.build_host(split)
        tensors = {w: split.get_weight(w) for w in split.weight_kinds}
        eager = {n: H.eager_part(i, tensors) for n, i in parts.items()}
        hosts.append((split.input_specs, host))
        members.append((parts, eager, {}))
        constants.update(tensors)
    host, parts, eager, _ = H.signature_host(hosts, members)
    runner = H.HostProgram(host, eager, constants)
    for x in inputs:
        with torch.no_grad():
            assert close(runner(x)[0], model(x))
        assert runner.signature == (0 if x.shape[-1] == 8 else 1)
    assert set(parts) == set(eager) and all(n.startswith(("s0_", "s1_")) for n in parts)
