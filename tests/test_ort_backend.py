"""The onnxruntime backend (issue #19 item 2): ``splice.compile(p, "host",
backend="onnxruntime")`` writes an artifact of ``.onnx`` models whose weights are read from
the artifact's ``weights.safetensors``, and ``splice.load`` runs it on ONNX Runtime.

Checked: outputs equal the Program's; the manifest tells the truth (backend, parts, files
with their sha256); the ``.onnx`` is a standard model (full ``onnx.checker``, a plain ORT
session in the folder gives the same numbers) that stores no weight twice; threads are set
as for TVM; a branchy zoo model on every branch input and a SignatureSet run through the
host program with ORT parts; tampered models (truncated, not ONNX, from another artifact,
external data pointing elsewhere) are refused with ArtifactError; the edge runner refuses
ORT parts; bad targets and options raise LoweringError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import splice
from splice import models
from splice import models_dynamic as Z
from splice.errors import ArtifactError, LoweringError
from splice.ir.explore import capture_dynamic, cond_trace, eager_decisions
from splice.ir.signatures import SignatureSet
from splice.runtime import edge_runner as E
from splice.runtime.artifact import MANIFEST, WEIGHTS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL = 1e-5


def max_diff(got: Any, want: Any) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    return max(
        (torch.as_tensor(a).float() - b.float()).abs().max().item() for a, b in zip(got, want)
    )


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """(artifact, program, inputs) of a small MLP compiled for ORT."""
    torch.manual_seed(0)
    model, args = models.mlp(d=16, hidden=64)
    program = splice.capture(model, args)
    out = tmp_path_factory.mktemp("ort") / "mlp.artifact"
    art = splice.compile(program, "host", backend="onnxruntime", output=out, samples=[args])
    return art, program, args


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another MLP with the same input and output shapes (its model must not be accepted)."""
    torch.manual_seed(1)
    model, args = models.mlp(d=16, hidden=32)
    out = tmp_path_factory.mktemp("ort") / "other.artifact"
    return splice.compile(splice.capture(model, args), "host", backend="onnxruntime", output=out)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    model, args = models.gpt2(layers=1, hidden=32, heads=2, vocab=64, seq=4)
    program = splice.capture(model, args)
    out = tmp_path_factory.mktemp("ort") / "gpt2.artifact"
    return splice.compile(program, "host", backend="onnxruntime", output=out), program, args


def copy_of(art: splice.Artifact, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.artifact"
    shutil.copytree(art.path, dst)
    return dst


def replace_file(path: Path, name: str, data: bytes) -> None:
    """Replace ``name`` with ``data`` and record its new sha256 in the manifest (a careful
    forger's edit: the checksums alone do not catch it)."""
    (path / name).write_bytes(data)
    m = json.loads((path / MANIFEST).read_text())
    m["files"][name] = hashlib.sha256(data).hexdigest()
    (path / MANIFEST).write_text(json.dumps(m, indent=1))


# ---------------------------------------------------------------------------------------
# a plain model


def test_outputs_equal_the_program(mlp):
    art, program, args = mlp
    cm = splice.load(art.path)
    assert max_diff(cm(*args), program(*args)) <= ATOL
    x = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3))
    assert max_diff(cm(x), program(x)) <= ATOL
    got = cm(x.numpy())  # numpy in, numpy out
    assert isinstance(got, np.ndarray)
    assert np.abs(got - program(x).detach().numpy()).max() <= ATOL


def test_manifest_and_files_tell_the_truth(mlp):
    art, program, _ = mlp
    m = art.manifest
    assert m["backend"] == "onnxruntime"
    assert m["onnxruntime_version"] == ort.__version__
    assert "tvm_version" not in m and "tvm" not in m["target"]
    assert m["target"]["name"] == "host" and m["required_features"] == []
    assert m["parts"] == [
        {"name": "main", "backend": "onnxruntime", "model": "main.onnx", "params": []}
    ]
    assert set(m["files"]) == {"main.onnx", WEIGHTS, "program.ir", "samples.safetensors"}
    for name, digest in m["files"].items():
        assert hashlib.sha256((art.path / name).read_bytes()).hexdigest() == digest
    assert m["inputs"][0]["shape"] == list(program.input_specs[0].shape)
    assert m["lowering"]["external_initializers"] == 4  # fc1/fc2 weight and bias


def test_onnx_model_is_standard_and_stores_no_weight_twice(mlp):
    art, program, args = mlp
    path = art.path / "main.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    # every weight is read from weights.safetensors; only small constants stay inside
    assert sorted(i.name for i in external) == sorted(program.weights)
    for init in external:
        assert not init.raw_data
        assert {e.key: e.value for e in init.external_data}["location"] == WEIGHTS
    inside = sum(len(i.raw_data) for i in model.graph.initializer if i not in external)
    assert inside < 64 * len(model.graph.initializer)
    # a plain ONNX Runtime session in the artifact folder reads the weights it points at
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: args[0].numpy()})
    assert np.abs(got - program(*args).detach().numpy()).max() <= ATOL


def test_threads_are_set_like_the_tvm_backend(mlp):
    art, _, _ = mlp
    part = art.load().parts["main"]
    assert part.num_threads == (os.cpu_count() or 1)
    assert part.session.get_session_options().intra_op_num_threads == part.num_threads
    one = art.load(num_threads=1).parts["main"]
    assert one.session.get_session_options().intra_op_num_threads == 1
    opts = one.session.get_session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(LoweringError, match="num_threads must be at least 1"):
        art.load(num_threads=0)


def test_token_model_keeps_its_index_bound(gpt2):
    art, program, args = gpt2
    (ids,) = args
    assert art.manifest["inputs"][0]["index_bound"] == 64
    cm = art.load()
    assert max_diff(cm(ids), program(ids)) <= 1e-4
    with pytest.raises(ArtifactError, match=r"outside \[0, 64\)"):
        cm(torch.full_like(ids, 64))


# ---------------------------------------------------------------------------------------
# options and targets


def test_unknown_backend_lists_both(mlp):
    _, program, _ = mlp
    with pytest.raises(LoweringError, match="unknown backend 'ort'") as e:
        splice.compile(program, "host", backend="ort")
    assert e.value.hint == "backends: tvm, onnxruntime"


@pytest.mark.parametrize("target", ["aarch64-linux", "x86-64-v3", "cuda"])
def test_targets_other_than_host_are_refused(mlp, target, tmp_path):
    _, program, _ = mlp
    with pytest.raises(LoweringError, match=f"compiles for the target 'host' only, not '{target}'"):
        splice.compile(program, target, backend="onnxruntime", output=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_tuning_options_are_refused(mlp):
    _, program, _ = mlp
    with pytest.raises(LoweringError, match="nothing to tune"):
        splice.compile(program, "host", backend="onnxruntime", tune=2)


def test_cli_compile_backend_option(tmp_path, capsys):
    from splice.tools.cli import main

    out = tmp_path / "cli.artifact"
    assert main(["compile", "splice.models:mlp", "--backend", "onnxruntime", "-o", str(out)]) == 0
    assert "onnxruntime" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["parts"][0]["model"] == "main.onnx"
    assert main(["run", str(out), "--check"]) == 0
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    assert "one part, no host program: main.onnx" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# tampering


def test_truncated_model_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    data = (path / "main.onnx").read_bytes()
    replace_file(path, "main.onnx", data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="main.onnx is not an ONNX model"):
        splice.load(path)


def test_non_onnx_file_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    replace_file(path, "main.onnx", b"\x7fELF" + bytes(range(256)) * 8)
    with pytest.raises(ArtifactError, match="main.onnx is not an ONNX model"):
        splice.load(path)


def test_model_from_another_artifact_is_refused(mlp, other, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    replace_file(path, "main.onnx", (other.path / "main.onnx").read_bytes())
    with pytest.raises(ArtifactError, match="compiled for another program.*weights.safetensors"):
        splice.load(path)


def _edit_model(path: Path, edit) -> None:
    model = onnx.load(str(path / "main.onnx"), load_external_data=False)
    edit(model)
    replace_file(path, "main.onnx", model.SerializeToString())


def test_model_without_binding_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    _edit_model(path, lambda m: m.metadata_props.__delitem__(slice(None)))
    with pytest.raises(ArtifactError, match="carries no splice binding"):
        splice.load(path)


@pytest.mark.parametrize(
    "key,value", [("location", "../weights.safetensors"), ("offset", "99999999999")]
)
def test_external_data_outside_the_weights_is_refused(mlp, tmp_path, key, value):
    path = copy_of(mlp[0], tmp_path)

    def edit(model):
        for e in model.graph.initializer[0].external_data:
            if e.key == key:
                e.value = value

    _edit_model(path, edit)
    with pytest.raises(ArtifactError, match="reads external data .* outside weights.safetensors"):
        splice.load(path)


def test_external_data_in_a_constant_node_is_refused(mlp, tmp_path):
    from onnx import helper

    path = copy_of(mlp[0], tmp_path)

    def edit(model):
        t = helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", "/etc/passwd"), ("length", "4")):
            e = t.external_data.add()
            e.key, e.value = k, v
        model.graph.node.insert(0, helper.make_node("Constant", [], ["c_out"], value=t))

    _edit_model(path, edit)
    with pytest.raises(ArtifactError, match="tensor 'c' reads external data"):
        splice.load(path)


def test_manifest_schema_of_onnxruntime_parts(mlp):
    from splice.runtime.artifact import validate_manifest

    m = mlp[0].manifest
    base = m["parts"][0]

    def with_part(part: dict[str, Any]) -> dict[str, Any]:
        return {**m, "parts": [part]}

    validate_manifest(with_part(base))
    with pytest.raises(ArtifactError, match=r"'parts\[0\].model' is missing"):
        validate_manifest(with_part({k: v for k, v in base.items() if k != "model"}))
    with pytest.raises(ArtifactError, match="library' on an onnxruntime part"):
        validate_manifest(with_part({**base, "library": "main.so"}))
    with pytest.raises(ArtifactError, match=r"'parts\[0\].model' must be the name of a file"):
        validate_manifest(with_part({**base, "model": "../x.onnx"}))
    with pytest.raises(ArtifactError, match="must be 'tvm' or 'onnxruntime'"):
        validate_manifest(with_part({**base, "backend": "tensorrt"}))
    with pytest.raises(ArtifactError, match="other.onnx is used but not listed"):
        validate_manifest(with_part({**base, "model": "other.onnx"}))


def test_edge_runner_refuses_onnxruntime_parts(mlp):
    with pytest.raises(E.Invalid, match="runs on ONNX Runtime; the edge runner runs TVM parts"):
        E.check_artifact(mlp[0].path)


# ---------------------------------------------------------------------------------------
# branches and signatures: ORT parts under the host program


@pytest.mark.parametrize(
    "pipeline", ["lowrank{method=svd,ratio=0.5}", "experts{num_experts=4,top_k=2}"]
)
def test_splice_ops_run_on_ort_and_store_no_weight_twice(mlp, pipeline, tmp_path):
    from splice.passes import parse_pipeline

    _, program, args = mlp
    q = parse_pipeline(pipeline).run(program).program
    assert any(str(n.target).startswith("splice.") for n in q.graph.nodes)
    art = splice.compile(q, "host", backend="onnxruntime", output=tmp_path / "t.artifact")
    assert max_diff(art.load()(*args), q(*args)) <= ATOL
    model = onnx.load(str(art.path / "main.onnx"), load_external_data=False)
    big_inside = [
        i.name
        for i in model.graph.initializer
        if i.data_location != onnx.TensorProto.EXTERNAL and len(i.raw_data) >= 64
    ]
    assert big_inside == []


@pytest.mark.parametrize("name", ["early_exit"])
def test_dynamic_zoo_model_every_branch_input(name, tmp_path):
    case = Z.ZOO[name]()
    program = capture_dynamic(case.model, case.example)
    art = splice.compile(program, "host", backend="onnxruntime", output=tmp_path / "z.artifact")
    parts = art.manifest["parts"]
    assert len(parts) > 1 and art.manifest["host"] == "host.json"
    assert all(p["backend"] == "onnxruntime" and p["model"] == f"{p['name']}.onnx" for p in parts)
    assert all(p["check_max_abs_diff"] is None or p["check_max_abs_diff"] <= 1e-4 for p in parts)
    cm = art.load()
    for inputs in case.branch_inputs:
        with torch.no_grad():
            want = case.model(*inputs)
        assert max_diff(cm(*inputs), want) <= 1e-4
        assert [t for _, t in cm.last_trace] == cond_trace(eager_decisions(case.model, inputs))


def test_signature_set(tmp_path):
    case = Z.ZOO["shape_branch"]()
    first, *rest = case.branch_inputs
    sset = capture_dynamic(case.model, first, signatures=rest)
    assert isinstance(sset, SignatureSet)
    art = splice.compile(sset, "host", backend="onnxruntime", output=tmp_path / "s.artifact")
    assert len(art.manifest["signatures"]) == 2
    from splice.runtime.host import format_host

    text = format_host(json.loads((art.path / "host.json").read_text()), art.manifest["parts"])
    assert "[s0_part_0.onnx]" in text and "[s1_part_0.onnx]" in text
    cm = art.load()
    taken = set()
    for inputs in case.branch_inputs:
        with torch.no_grad():
            want = case.model(*inputs)
        assert max_diff(cm(*inputs), want) <= 1e-4
        taken.add(cm.last_signature)
    assert taken == {0, 1}


def test_loading_needs_no_tvm(mlp):
    """An onnxruntime artifact loads and runs where TVM cannot be imported."""
    import subprocess
    import sys

    art, program, args = mlp
    code = (
        "import sys; sys.modules['tvm'] = None\n"
        "import torch, splice\n"
        f"cm = splice.load({str(art.path)!r})\n"
        "x = torch.load(sys.argv[1])\n"
        "torch.save(cm(x), sys.argv[2])\n"
    )
    d = art.path.parent
    torch.save(args[0], d / "x.pt")
    subprocess.run([sys.executable, "-c", code, d / "x.pt", d / "y.pt"], check=True)
    assert max_diff(torch.load(d / "y.pt"), program(*args)) <= ATOL
