"""The aarch64 edge target runs for real: an artifact cross-compiled for aarch64-linux runs
under qemu-aarch64 and its outputs equal the x86 build's.

Needs qemu-user, gcc-aarch64-linux-gnu and the aarch64 root (``python -m splice.runtime.edge
setup``); ``.ci/run`` prepares all three and sets SPLICE_REQUIRE_QEMU=1, which turns the
skip on a machine without them into a failure.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import splice
from splice import models
from splice.errors import ArtifactError
from splice.runtime import edge


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory, need_edge):
    torch.manual_seed(0)
    model, args = models.gpt2()
    program = splice.capture(model, args)
    out = tmp_path_factory.mktemp("edge")
    arm = splice.compile(program, "aarch64-linux", output=out / "arm.artifact")
    host = splice.compile(program, "host", output=out / "host.artifact")
    return arm, host, model, args


def test_aarch64_artifact_runs_under_qemu_and_matches_x86(gpt2_pair):
    arm, host, model, args = gpt2_pair
    run = edge.run_under_qemu(arm.path, args)
    on_x86 = host.load()(*args)
    with torch.inference_mode():
        eager = model(*args).to_tuple()[0]
    assert len(run.outputs) == 1
    assert run.outputs[0].shape == tuple(on_x86.shape)
    np.testing.assert_allclose(run.outputs[0], on_x86.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(run.outputs[0], eager.numpy(), rtol=0, atol=1e-4)
    assert run.run_s > 0 and run.import_s > 0


def test_qemu_runner_checks_checksums(gpt2_pair, tmp_path):
    arm, _, _, args = gpt2_pair
    copy = tmp_path / "arm.artifact"
    shutil.copytree(arm.path, copy)
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum of weights\.safetensors"):
        edge.run_under_qemu(copy, args)


def test_run_under_qemu_rejects_host_artifacts_and_bad_shapes(gpt2_pair):
    arm, host, _, args = gpt2_pair
    with pytest.raises(ArtifactError, match="not aarch64"):
        edge.run_under_qemu(host.path, args)
    bad = [np.zeros((1, 3), dtype=np.int64)]
    with pytest.raises(ArtifactError, match="has shape"):
        edge.run_under_qemu(arm.path, bad)


def test_missing_root_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_AARCH64_ROOT", str(tmp_path / "nothing"))
    reason = edge.why_unavailable()
    assert reason is not None
    if shutil.which("qemu-aarch64"):
        assert "no aarch64 root" in reason and "splice.runtime.edge setup" in reason
    with pytest.raises(edge.EdgeUnavailable, match="cannot run aarch64 artifacts here"):
        edge.run_under_qemu(tmp_path, [])


def test_cli_runs_aarch64_artifacts_under_qemu(gpt2_pair, capsys):
    from splice.tools.cli import main

    arm, _, _, _ = gpt2_pair
    assert main(["run", str(arm.path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "under qemu" in out and "ok: within 0.0001 of the PyTorch reference" in out
    assert main(["bench", str(arm.path)]) == 1  # timings under emulation are refused
    assert "cannot benchmark a aarch64-linux-gnu artifact" in capsys.readouterr().err


def test_host_programs_run_under_qemu(tmp_path, need_edge):
    """Artifacts with a host program (data branches; one capture per input shape) run on the
    edge runner, which interprets host.json with numpy + the TVM runtime only."""
    from splice import models_dynamic as Z
    from splice.ir.explore import cond_trace, eager_decisions

    case = Z.ZOO["early_exit"]()
    program = splice.capture_dynamic(case.model, case.example)
    arm = splice.compile(program, "aarch64-linux", output=tmp_path / "exit.artifact")
    x = max(case.branch_inputs, key=lambda x: len(eager_decisions(case.model, x)))
    run = edge.run_under_qemu(arm.path, x)
    with torch.no_grad():
        want = case.model(*x).numpy()
    np.testing.assert_allclose(run.outputs[0], want, rtol=0, atol=1e-5 * abs(want).max())
    eager = cond_trace(eager_decisions(case.model, x))
    assert len(eager) == 2 and [t[2] for t in run.trace] == eager
    assert all(t[0] == "branch" and "models_dynamic.py:" in t[1] for t in run.trace)

    case = Z.ZOO["shape_branch"]()
    sset = splice.capture_dynamic(case.model, case.example, signatures=case.branch_inputs[1:])
    arm = splice.compile(sset, "aarch64-linux", output=tmp_path / "shape.artifact")
    x = case.branch_inputs[1]
    run = edge.run_under_qemu(arm.path, x)
    with torch.no_grad():
        want = case.model(*x).numpy()
    np.testing.assert_allclose(run.outputs[0], want, rtol=1e-5, atol=1e-6)
    assert run.trace == [("signature", 1)]
