"""`splice compile`, `splice run` and `splice bench`, run in-process, and the runtime's
guards around TVM's unchecked kernels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import splice
from splice import models
from splice.errors import ArtifactError
from splice.tools.cli import main


@pytest.fixture(scope="module")
def gpt2_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "gpt2.artifact"
    assert main(["compile", "splice.models:gpt2", "-o", str(out)]) == 0
    return out


def test_compile_writes_an_artifact_and_reports_the_lowering(gpt2_artifact, capsys):
    manifest = json.loads((gpt2_artifact / "manifest.json").read_text())
    assert manifest["program"] == "GPT2LMHeadModel"
    assert "samples.safetensors" in manifest["files"]  # the factory's inputs travel along
    low = manifest["lowering"]
    assert low["schedule_rules"].get("matmul", 0) > 0
    assert not low["unscheduled"]
    # TVM's C++ warnings land in the report, deduplicated, not on the terminal
    assert len(low["tvm_warnings"]) == len(set(low["tvm_warnings"]))


def test_run_check_agrees_with_pytorch(gpt2_artifact, capsys, tmp_path):
    saved = tmp_path / "out.safetensors"
    assert main(["run", str(gpt2_artifact), "--check", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "inputs: the artifact's sample" in out
    assert "logits: f32[1, 8, 128]" in out
    assert "ok: within 0.0001 of the PyTorch reference" in out
    from safetensors.torch import load_file

    logits = load_file(str(saved))["logits"]
    model, (ids,) = models.gpt2()
    with torch.inference_mode():
        eager = model(ids).logits
    assert (logits - eager).abs().max().item() <= 1e-4


def test_run_with_inputs_file_and_missing_names(gpt2_artifact, capsys, tmp_path):
    ids = np.arange(8, dtype=np.int64).reshape(1, 8)
    good, bad = tmp_path / "in.npz", tmp_path / "bad.npz"
    np.savez(good, input_ids=ids)
    np.savez(bad, tokens=ids)
    assert main(["run", str(gpt2_artifact), "--inputs", str(good), "--check"]) == 0
    assert f"inputs: {good}" in capsys.readouterr().out
    assert main(["run", str(gpt2_artifact), "--inputs", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "lacks inputs ['input_ids']" in err and "hint:" in err


def test_bench_prints_splice_and_eager(gpt2_artifact, capsys):
    assert main(["bench", str(gpt2_artifact), "--repeats", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "splice (TVM)" in out and "eager PyTorch" in out and "median ms" in out


def test_out_of_range_token_ids_raise_instead_of_reading_out_of_bounds(gpt2_artifact):
    # TVM's `take` has no bounds check; the manifest records the embedding's rows per input
    manifest = json.loads((gpt2_artifact / "manifest.json").read_text())
    assert manifest["inputs"][0]["index_bound"] == 128
    model = splice.load(gpt2_artifact)
    with pytest.raises(ArtifactError, match=r"'input_ids' holds indices in \[0, 128\]"):
        model(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 128]]))
    with pytest.raises(ArtifactError, match="outside"):
        model(np.full((1, 8), -1, dtype=np.int64))
    model(torch.full((1, 8), 127))  # the last row is fine


def test_compile_errors_are_one_message(capsys, tmp_path):
    assert main(["compile", "splice.models:mlp", "-t", "riscv", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "LoweringError" in err
    assert not (tmp_path / "x").exists()
    assert main(["run", str(tmp_path / "nothing")]) == 1
    assert "is not a splice artifact" in capsys.readouterr().err
