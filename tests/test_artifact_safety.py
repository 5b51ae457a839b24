"""Artifacts do not trust their manifest (issue #15, item 4 and the artifact part of item 9).

A consistently edited artifact (files changed and their checksums in manifest.json
recomputed) must be refused with one ArtifactError before any library code runs: truncated
libraries, widened or removed index bounds, paths out of the folder, another model's
library, a manifest of the wrong shape. ``sha256=`` pins a whole artifact. The edge runner
(which cannot import splice) makes the same file-level checks.

Three small artifacts are compiled once per module: an MLP, another MLP with the same
input and output shapes (the "other model"), a one-layer GPT-2 (embedding, index_bound) and
a two-part program with a branch (host.json). Tests that change an artifact work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import splice
from splice import models
from splice.errors import ArtifactError
from splice.runtime import edge_runner as E
from splice.runtime.artifact import MANIFEST, validate_manifest
from splice.runtime.host import validate_host

tvm = pytest.importorskip("tvm")

# ---------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """(artifact, example inputs) of a small MLP."""
    model, args = models.mlp(d=8, hidden=16)
    out = tmp_path_factory.mktemp("safety") / "mlp.artifact"
    return splice.compile(splice.capture(model, args), "host", output=out, samples=[args]), args


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another model with the MLP's input and output shapes (other hidden size)."""
    model, args = models.mlp(d=8, hidden=12)
    out = tmp_path_factory.mktemp("safety") / "other.artifact"
    return splice.compile(splice.capture(model, args), "host", output=out)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(artifact, example inputs) of a one-layer GPT-2 with a 64-token vocabulary."""
    model, args = models.gpt2(layers=1, hidden=32, heads=2, vocab=64, seq=4)
    out = tmp_path_factory.mktemp("safety") / "gpt2.artifact"
    return splice.compile(splice.capture(model, args), "host", output=out, samples=[args]), args


class _TokenCond(nn.Module):
    """Token ids that reach an embedding only inside a branch (a part of a split program)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda i: self.emb(i).sum(1), lambda i: i.float(), (ids,))


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    """A program with one branch: parts and a host.json; its token input is bounded."""
    torch.manual_seed(0)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))
    program = splice.capture(_TokenCond().eval(), example)
    out = tmp_path_factory.mktemp("safety") / "cond.artifact"
    return splice.compile(program, "host", output=out)


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids)).sum(1)


@pytest.fixture(scope="module")
def token_signatures(tmp_path_factory):
    """A token model captured for two sequence lengths (a SignatureSet: host + parts)."""
    from splice.ir.explore import capture_dynamic

    torch.manual_seed(0)
    sset = capture_dynamic(
        _Tokens().eval(), (torch.zeros(1, 4, dtype=torch.long),),
        signatures=[(torch.zeros(1, 6, dtype=torch.long),)],
    )  # fmt: skip
    out = tmp_path_factory.mktemp("safety") / "tokens.artifact"
    return splice.compile(sset, "host", output=out)


def copy_of(art: splice.Artifact, tmp_path: Path, name: str = "copy.artifact") -> Path:
    dst = tmp_path / name
    shutil.copytree(art.path, dst)
    return dst


def manifest_of(path: Path) -> Any:
    return json.loads((path / MANIFEST).read_text())


def write_manifest(path: Path, manifest: Any) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    m = manifest_of(path)
    edit(m)
    write_manifest(path, m)


def replace_file(path: Path, name: str, data: bytes) -> None:
    """Replace ``name`` with ``data`` (a new file renamed into place) and recompute its
    checksum in the manifest: the edit a careful forger makes."""
    tmp = path / (name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path / name)
    edit_manifest(path, lambda m: m["files"].__setitem__(name, hashlib.sha256(data).hexdigest()))


def load_error(path: Path) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        splice.load(path)
    return info.value


# ---------------------------------------------------------------------------------------
# the manifest's schema (item 9: KeyError / TypeError / TVM errors before)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "manifest.json must be a JSON object, got a list"),
        ("null", "manifest.json must be a JSON object, got null"),
        ('"text"', "manifest.json must be a JSON object, got a string"),
    ],
)
def test_a_manifest_that_is_not_an_object_is_an_artifact_error(mlp, tmp_path, content, message):
    path = copy_of(mlp[0], tmp_path)
    (path / MANIFEST).write_text(content)
    assert load_error(path).message == message
    with pytest.raises(ArtifactError, match="JSON object"):
        splice.Artifact(path)
    with pytest.raises(ArtifactError, match="JSON object"):
        splice.CompiledModel(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("inputs"), "manifest.json: field 'inputs' is missing"),
        (lambda m: m.pop("parts"), "manifest.json: field 'parts' is missing"),
        (lambda m: m.pop("files"), "manifest.json: field 'files' is missing"),
        (lambda m: m.pop("target"), "manifest.json: field 'target' is missing"),
        (
            lambda m: m["inputs"][0].pop("dtype"),
            "manifest.json: field 'inputs[0].dtype' is missing",
        ),
        (
            lambda m: m["inputs"][0].__setitem__("shape", "1x8"),
            "manifest.json: field 'inputs[0].shape' must be a list, got '1x8'",
        ),
        (
            lambda m: m["inputs"][0].__setitem__("shape", [1, -8]),
            "manifest.json: field 'inputs[0].shape' must be a list of non-negative integers, "
            "got a list",
        ),
        (
            lambda m: m["outputs"][0].__setitem__("dtype", "float128"),
            "manifest.json: field 'outputs[0].dtype' must be one of "
            + ", ".join(E.DTYPE_NAMES)
            + ", got 'float128'",
        ),
        (
            lambda m: m.__setitem__("parts", {"main": {}}),
            "manifest.json: field 'parts' must be a list, got an object",
        ),
        (
            lambda m: m.__setitem__("parts", []),
            "manifest.json: field 'parts' must be a non-empty list, got a list",
        ),
        (
            lambda m: m["parts"][0].__setitem__("params", "fc1.weight"),
            "manifest.json: field 'parts[0].params' must be a list, got 'fc1.weight'",
        ),
        (
            lambda m: m["parts"][0].__setitem__("entry", "main; rm"),
            "manifest.json: field 'parts[0].entry' must be a function name, got 'main; rm'",
        ),
        (
            lambda m: m["files"].__setitem__("main.so", 12),
            "manifest.json: field \"files['main.so']\" must be a sha256 (64 lowercase hex "
            "digits), got 12",
        ),
        (
            lambda m: m["files"].pop("main.so"),
            "manifest.json: main.so is used but not listed (with its sha256) in 'files'",
        ),
        (
            lambda m: m.__setitem__("format", "splice.artifact/9"),
            "manifest.json: unknown format 'splice.artifact/9', expected 'splice.artifact/1'",
        ),
        (
            lambda m: m["inputs"][0].__setitem__("index_bound", 4),
            "manifest.json: field 'inputs[0].index_bound' on a non-index input",
        ),
    ],
)
def test_a_damaged_manifest_names_the_bad_field(mlp, tmp_path, edit, message):
    path = copy_of(mlp[0], tmp_path)
    edit_manifest(path, edit)
    err = load_error(path)
    assert err.message == message
    assert err.where == str(path)
    assert "rebuild the artifact" in (err.hint or "")
    with pytest.raises(ArtifactError) as info:  # the CLI reads artifacts through Artifact
        splice.Artifact(path)
    assert info.value.message == message


def test_validate_manifest_accepts_what_compile_writes(mlp, gpt2, branchy):
    for art in (mlp[0], gpt2[0], branchy):
        assert validate_manifest(manifest_of(art.path)) == art.manifest


def test_a_manifest_that_disagrees_with_program_ir_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    edit_manifest(path, lambda m: m["inputs"][0].__setitem__("shape", [2, 8]))
    err = load_error(path)
    assert err.message.startswith(
        "manifest.json: field 'inputs' says [{'name': 'x', 'shape': [2, 8]"
    )
    assert "the program it was compiled from (program.ir) has" in err.message


def test_a_part_reading_weights_the_program_lacks_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    edit_manifest(path, lambda m: m["parts"][0]["params"].append("nope.weight"))
    assert load_error(path).message == (
        "manifest.json: part 'main' reads weights ['nope.weight'] that the program does not have"
    )


# ---------------------------------------------------------------------------------------
# paths stay inside the folder


@pytest.mark.parametrize("library", ["/tmp/main.so", "../../main.so", "sub/main.so", ".main.so"])
def test_a_library_path_out_of_the_folder_is_refused(mlp, tmp_path, library):
    path = copy_of(mlp[0], tmp_path)
    (path / "sub").mkdir()
    shutil.copy(path / "main.so", path / "sub" / "main.so")
    shutil.copy(path / "main.so", tmp_path / "main.so")
    digest = mlp[0].manifest["files"]["main.so"]

    def edit(m: dict[str, Any]) -> None:
        m["parts"][0]["library"] = library
        m["files"][library] = digest

    edit_manifest(path, edit)
    err = load_error(path)
    assert err.message == (
        "manifest.json: field 'parts[0].library' must be the name of a file in the artifact "
        f"folder (no folders, no '..'), got {library!r}"
    )


def test_a_symbolic_link_out_of_the_folder_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    outside = tmp_path / "elsewhere.so"
    shutil.copy(path / "main.so", outside)  # same bytes: the checksum matches
    (path / "main.so").unlink()
    (path / "main.so").symlink_to(outside)
    assert load_error(path).message == (
        "main.so is a symbolic link; an artifact holds only plain files"
    )


def test_a_host_program_path_out_of_the_folder_is_refused(branchy, tmp_path):
    path = copy_of(branchy, tmp_path)
    edit_manifest(path, lambda m: m.__setitem__("host", "../host.json"))
    assert "field 'host' must be the name of a file" in load_error(path).message


# ---------------------------------------------------------------------------------------
# libraries: complete, bound to this artifact, taking what the manifest gives


def test_a_truncated_library_is_an_artifact_error_not_sigbus(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    data = (path / "main.so").read_bytes()
    replace_file(path, "main.so", data[: len(data) // 2])
    err = load_error(path)
    assert err.message.startswith("main.so is truncated")
    assert "rebuild the artifact" in (err.hint or "")


def test_a_file_that_is_not_elf_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    replace_file(path, "main.so", b"#!/bin/sh\necho hi\n" * 8)
    assert load_error(path).message == "main.so is not an ELF shared library"


def test_another_models_library_is_refused_before_it_runs(mlp, other, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    replace_file(path, "main.so", (other.path / "main.so").read_bytes())
    err = load_error(path)
    assert err.message.startswith("main.so was compiled for another program")
    assert "program.ir, weights.safetensors differ" in err.message
    assert "cannot be reused" in (err.hint or "")


def test_a_library_without_binding_is_refused(mlp, tmp_path):
    path = copy_of(mlp[0], tmp_path)
    elf, binding = E.split_binding((path / "main.so").read_bytes())
    assert binding is not None and binding["part"] == "main"
    replace_file(path, "main.so", elf)
    assert load_error(path).message.startswith("main.so carries no splice binding")


def test_a_library_given_other_weights_is_refused_by_its_own_signature(mlp, tmp_path):
    # binding intact (program.ir and weights unchanged); the manifest drops one weight
    path = copy_of(mlp[0], tmp_path)
    edit_manifest(path, lambda m: m["parts"][0]["params"].pop())
    assert load_error(path).message == (
        "main.so was compiled for other weights than the manifest's part lists: "
        "it expects 4 weights, the manifest lists 3"
    )
    path2 = copy_of(mlp[0], tmp_path, "swapped.artifact")
    edit_manifest(path2, lambda m: m["parts"][0]["params"].reverse())
    assert load_error(path2).message.startswith(
        "main.so was compiled for other weights than the manifest's part lists: weight 0 is"
    )


def test_library_signature_reads_the_executables_parameter_checks(gpt2):
    lib = tvm.runtime.load_module(str(gpt2[0].path / "main.so"))
    inputs, weights = E.library_signature(lib["stats"](), "main")
    assert inputs == {0: ([1, 4], "i64")}
    assert weights is not None and len(weights) == len(gpt2[0].manifest["parts"][0]["params"])
    assert weights[0] == ([64, 32], "f32")  # transformer.wpe.weight
    with pytest.raises(E.Invalid, match="input 0 of main is i64\\[1,4\\], the manifest says"):
        E.check_signature("main.so", lib["stats"](), "main", [([1, 5], "i64")], weights)


# ---------------------------------------------------------------------------------------
# index bounds cannot be removed or widened


def test_index_bound_widened_past_the_embedding_is_refused(gpt2, tmp_path):
    art, _ = gpt2
    assert art.manifest["inputs"][0]["index_bound"] == 64
    path = copy_of(art, tmp_path)
    edit_manifest(path, lambda m: m["inputs"][0].__setitem__("index_bound", 10**12))
    assert load_error(path).message == (
        "manifest.json: input 'input_ids' indexes an embedding of 64 rows but has index_bound "
        "1000000000000 (out-of-range ids would read out of bounds)"
    )


def test_index_bound_removed_is_refused(gpt2, tmp_path):
    path = copy_of(gpt2[0], tmp_path)
    edit_manifest(path, lambda m: m["inputs"][0].pop("index_bound"))
    assert load_error(path).message == (
        "manifest.json: input 'input_ids' indexes an embedding of 64 rows but has no "
        "index_bound (out-of-range ids would read out of bounds)"
    )


def test_a_narrower_index_bound_is_allowed_and_enforced(gpt2, tmp_path):
    art, (ids,) = gpt2
    path = copy_of(art, tmp_path)
    edit_manifest(path, lambda m: m["inputs"][0].__setitem__("index_bound", 32))
    cm = splice.load(path)
    with pytest.raises(ArtifactError, match=r"outside \[0, 32\)"):
        cm(torch.full_like(ids, 40))
    assert cm(ids.clamp(max=31)).shape == (1, 4, 64)


def test_signature_sets_record_and_enforce_index_bounds(token_signatures, tmp_path):
    art = token_signatures
    assert art.manifest["inputs"][0]["index_bound"] == 16
    cm = splice.load(art.path)
    with pytest.raises(ArtifactError, match=r"outside \[0, 16\)"):
        cm(torch.full((1, 6), 16, dtype=torch.long))
    assert cm(torch.full((1, 6), 15, dtype=torch.long)).shape == (1, 4)
    path = copy_of(art, tmp_path)
    edit_manifest(path, lambda m: m["inputs"][0].pop("index_bound"))
    assert "indexes an embedding of 16 rows but has no index_bound" in load_error(path).message


def test_split_programs_record_and_enforce_index_bounds_inside_parts(branchy, tmp_path):
    assert branchy.manifest["inputs"][0] == {
        "name": "ids", "shape": [1, 4], "dtype": "i64", "index_bound": 16
    }  # fmt: skip
    cm = splice.load(branchy.path)
    ids, x = torch.full((1, 4), 15, dtype=torch.long), torch.ones(1, 4)
    assert cm(ids, x).shape == (1, 4)
    with pytest.raises(ArtifactError, match=r"outside \[0, 16\)"):
        cm(ids + 1, x)
    path = copy_of(branchy, tmp_path)
    edit_manifest(path, lambda m: m["inputs"][0].__setitem__("index_bound", 17))
    assert "indexes an embedding of 16 rows but has index_bound 17" in load_error(path).message


def test_the_edge_scanner_finds_the_bounds_compile_records(gpt2):
    from conftest import _captured

    from splice.ir import print_ir
    from splice.runtime.index_bounds import index_bounds

    text = (gpt2[0].path / "program.ir").read_text()
    assert E.embedding_rows(text, ["input_ids"]) == {"input_ids": 64}
    bert = _captured("bert")
    want = {k: v["index_bound"] for k, v in index_bounds(bert).items()}
    assert want and E.embedding_rows(print_ir(bert, locations=True), bert.input_names) == want


# ---------------------------------------------------------------------------------------
# inputs and outputs of a CompiledModel (item 9: TypeError before)


def test_wrong_number_of_inputs_names_expected_and_got(mlp):
    art, (x,) = mlp
    cm = splice.load(art.path)
    with pytest.raises(ArtifactError) as info:
        cm(x, x)
    assert info.value.message == "expected 1 inputs (x), got 2 positional inputs"
    with pytest.raises(ArtifactError) as info:
        cm()
    assert info.value.message == "expected 1 inputs (x), got missing inputs ['x']"
    with pytest.raises(ArtifactError) as info:
        cm(x, y=x)
    assert info.value.message == "expected 1 inputs (x), got unknown inputs ['y']"
    with pytest.raises(ArtifactError) as info:
        cm(x, x=x)
    assert info.value.message == "expected 1 inputs (x), got inputs given twice ['x']"
    with pytest.raises(ArtifactError, match="input 'x' must be a tensor or numpy array, got list"):
        cm([[0.0] * 8])
    assert torch.equal(cm(x=x), cm(x))


def test_outputs_that_differ_from_the_manifest_are_refused(mlp):
    art, (x,) = mlp
    cm = splice.load(art.path)
    cm._main = lambda *a: [torch.zeros(3)]
    with pytest.raises(ArtifactError, match=r"the compiled library returned \(f32\[3\]\)"):
        cm(x)


# ---------------------------------------------------------------------------------------
# the host program (host.json) of a split artifact


def test_a_consistently_edited_host_program_is_refused(branchy, tmp_path):
    path = copy_of(branchy, tmp_path)
    host = json.loads((path / "host.json").read_text())
    host["main"]["body"].reverse()
    replace_file(path, "host.json", json.dumps(host).encode())
    err = load_error(path)  # the libraries' binding names host.json too
    assert err.message.startswith("part_0.so was compiled for another program")
    assert "host.json differ" in err.message


def _host(body: list[dict[str, Any]], results: list[str]) -> dict[str, Any]:
    return {"format": "splice-host/1", "main": {"params": ["x"], "body": body, "results": results}}


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ([], "host.json: format must be 'splice-host/1', got 'list'"),
        (_host([], ["y"]), "host.json: main.results uses 'y' before it is defined"),
        (
            _host([{"op": "call", "part": "p9", "args": ["x"], "results": ["y"]}], ["y"]),
            "host.json: main.body[0].part names no part of the artifact: 'p9'",
        ),
        (
            _host([{"op": "call", "part": "p", "args": ["x", "x"], "results": ["y"]}], ["y"]),
            "host.json: main.body[0].args passes 2 values, part p takes 1",
        ),
        (
            _host([{"op": "const", "weight": ["w"], "result": "c"}], ["c"]),
            "host.json: main.body[0].weight names no weight of the artifact: ['w']",
        ),
        (
            _host([{"op": "eq", "arg": "x", "value": "3", "result": "c"}], ["c"]),
            "host.json: main.body[0].value must be an integer",
        ),
        (
            _host(
                [
                    {
                        "op": "branch",
                        "pred": "x",
                        "args": ["x"],
                        "then": None,
                        "else": None,
                        "results": ["y"],
                    }
                ],
                ["y"],
            ),
            "host.json: main.body[0].then must be an object with params, body and results",
        ),
        (
            _host([{"op": "exec"}], []),
            "host.json: main.body[0].op is unknown: 'exec' (call, const, eq, branch, signature)",
        ),
    ],
)
def test_validate_host_names_the_bad_step(host, message):
    with pytest.raises(ArtifactError) as info:
        validate_host(host, {"p": (1, 1)}, {"w"}, 1)
    assert info.value.message == message


def test_validate_host_accepts_what_compile_writes(branchy):
    host = json.loads((branchy.path / "host.json").read_text())
    parts = {p["name"]: (len(p["inputs"]), len(p["outputs"])) for p in branchy.manifest["parts"]}
    validate_host(host, parts, set(), 2)


# ---------------------------------------------------------------------------------------
# sha256= pins a whole artifact


def test_sha256_pins_the_artifact(mlp, tmp_path):
    art, (x,) = mlp
    want = hashlib.sha256((art.path / MANIFEST).read_bytes()).hexdigest()
    assert art.sha256 == want  # `sha256sum ART/manifest.json` gives the same
    cm = splice.load(art.path, sha256=want)
    assert cm.sha256 == want and cm(x).shape == (1, 8)
    assert art.load(sha256=want.upper()).sha256 == want
    path = copy_of(art, tmp_path)
    edit_manifest(path, lambda m: m["options"].__setitem__("tune", 1))  # any change
    (path / "main.so").unlink()  # refused before anything else is read
    with pytest.raises(ArtifactError) as info:
        splice.load(path, sha256=want)
    assert info.value.message.startswith("the artifact's sha256 is ")
    assert info.value.message.endswith(f", not the pinned {want}")
    with pytest.raises(ArtifactError, match="sha256= must be 64 hex digits, got 'abc'"):
        splice.load(art.path, sha256="abc")


def test_sha256_pins_a_saved_program_too(tmp_path):
    model, args = models.mlp(d=8, hidden=16)
    path = splice.save(splice.capture(model, args), tmp_path / "p.splice")
    digest = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    assert isinstance(splice.load(path, sha256=digest), splice.Program)
    with pytest.raises(ArtifactError, match="not the pinned"):
        splice.load(path, sha256="0" * 64)


# ---------------------------------------------------------------------------------------
# the edge runner makes the same checks (run here on x86 with the host TVM)


def _edge(path: Path, tmp_path: Path, ids: np.ndarray) -> tuple[int, str]:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir(exist_ok=True)
    np.save(in_dir / "input_ids.npy", ids)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = E.main(["edge_runner.py", str(path), str(in_dir), str(out_dir)])
    return rc, err.getvalue()


def test_edge_runner_runs_a_good_artifact_like_the_host(gpt2, tmp_path):
    art, (ids,) = gpt2
    rc, err = _edge(art.path, tmp_path, ids.numpy())
    assert (rc, err) == (0, "")
    got = np.load(tmp_path / "out" / "logits.npy")
    np.testing.assert_allclose(got, splice.load(art.path)(ids.numpy()), atol=1e-6)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bound_removed", "error: manifest.json: input 'input_ids' indexes an embedding of 64 "
         "rows but has no 'index_bound'"),
        ("bound_widened", "error: manifest.json: input 'input_ids' has index_bound 1000000000000, "
         "more than the 64 rows of the embedding it indexes"),
        ("absolute_library", "error: manifest.json: field 'parts[0].library' must be the name of "
         "a file in the artifact folder"),
        ("truncated", "error: main.so is truncated"),
        ("list", "error: manifest.json must be a JSON object, got a list"),
        ("token", "error: input 'input_ids' holds indices outside [0, 64)"),
    ],
)  # fmt: skip
def test_edge_runner_refuses_what_load_refuses(gpt2, tmp_path, case, message):
    art, (ids,) = gpt2
    path = copy_of(art, tmp_path)
    if case == "bound_removed":
        edit_manifest(path, lambda m: m["inputs"][0].pop("index_bound"))
    elif case == "bound_widened":
        edit_manifest(path, lambda m: m["inputs"][0].__setitem__("index_bound", 10**12))
    elif case == "absolute_library":
        edit_manifest(path, lambda m: m["parts"][0].__setitem__("library", str(path / "main.so")))
    elif case == "truncated":
        data = (path / "main.so").read_bytes()
        replace_file(path, "main.so", data[: len(data) // 2])
    elif case == "list":
        (path / MANIFEST).write_text("[]")
    elif case == "token":
        ids = torch.full_like(ids, 40000)
    rc, err = _edge(path, tmp_path, ids.numpy())
    assert rc == 2
    assert err.startswith(message)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# property: random manifest edits load or raise ArtifactError, nothing else

_KEYS = ["format", "target", "inputs", "outputs", "parts", "host", "files", "signatures",
         "required_features", "program", "options", "lowering", "library", "params", "entry",
         "shape", "dtype", "name", "index_bound", "triple", "main.so", "weights.safetensors"]  # fmt: skip
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "",
            "main.so",
            "../main.so",
            "/etc/passwd",
            "weights.safetensors",
            "program.ir",
            "f32",
            "i64",
            "main",
            "splice.artifact/1",
            "0" * 64,
        ]
    ),
    st.lists(st.integers(-3, 10), max_size=3),
    st.just({}),
    st.just([{}]),
)


def _paths(v: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into ``v``, except inside the informational subtrees (lowering report,
    CPU feature list, options), which would otherwise take most of the draws."""
    out = [prefix]
    if prefix[:1] in (("lowering",), ("options",)) or prefix[:2] == ("target", "features"):
        return out
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*prefix, i))
    return out


@st.composite
def _edits(draw: Any, manifest: dict[str, Any]) -> Any:
    m = json.loads(json.dumps(manifest))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(m)
        path = draw(st.sampled_from(paths))
        if not path:
            m = draw(_VALUES)
            continue
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        kind = draw(st.sampled_from(["drop", "set", "add"]))
        if kind == "drop":
            parent.pop(path[-1])
        elif kind == "set":
            parent[path[-1]] = draw(_VALUES)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(_KEYS))] = draw(_VALUES)
        if not isinstance(m, (dict, list)):
            break
    return m


def test_random_manifest_edits_load_or_raise_artifact_error(gpt2, tmp_path_factory):
    art, (ids,) = gpt2
    path = copy_of(art, tmp_path_factory.mktemp("fuzz"))
    original = manifest_of(path)
    outcomes: dict[str, int] = {}

    @settings(
        max_examples=200,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_edits(original))
    def check(manifest: Any) -> None:
        write_manifest(path, manifest)
        try:
            cm = splice.load(path)
            cm(ids)
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        except ArtifactError:
            outcomes["refused"] = outcomes.get("refused", 0) + 1

    check()
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10  # both sides are exercised
