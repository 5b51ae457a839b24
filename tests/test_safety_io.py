"""Safety of splice's own reads and writes (issue 15, items 1, 2, 7, 9, 10).

* writes never destroy what splice did not write, and stay atomic under concurrent writers;
* a saved program is data: its op names resolve only from registered namespaces, every
  load verifies, and a program that does not verify is never returned (so never runs);
* every way a damaged program text fails is a ParseError with a line number;
* value names the generated Python code cannot use, and duplicate output names, are
  rejected with the reason.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

import splice
from splice.errors import ArtifactError, ParseError, SpliceError, VerificationError
from splice.ir import serialize
from splice.ir.program import Program
from splice.ir.serialize import load_samples

SMALL = """# splice IR v1
weight @w : f32[4,4] param
program @small(%x : f32[2,4]) {
  %lin : f32[2,4] = aten.linear(%x, @w)
  %r : f32[2,4] = aten.relu(%lin)
  return out=%r
}
"""

REFUSED = (
    "refusing to replace {path}: it {why}; nothing was written\n"
    "  hint: pass --force (CLI) or overwrite=True (Python) to replace it, "
    "or choose another output path"
)
NOT_SPLICE_DIR = "is a folder that splice did not write (it has no manifest.json)"
NOT_A_FOLDER = "exists and is not a folder (splice writes programs and artifacts as folders)"


def small(fill: float | None = None) -> Program:
    w = torch.randn(4, 4) if fill is None else torch.full((4, 4), fill)
    return splice.parse_ir(SMALL, {"w": w})


def rewrite_program(folder: Path, text: str) -> None:
    """Replace program.ir and recompute its checksum, as a hostile editor would."""
    (folder / "program.ir").write_text(text)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["program.ir"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n)


# ---------------------------------------------------------------------------------------
# 1. writes never destroy what splice did not write


def test_save_refuses_a_folder_splice_did_not_write(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("x")
    with pytest.raises(ArtifactError) as info:
        splice.save(small(), victim)
    assert str(info.value) == REFUSED.format(path=victim, why=NOT_SPLICE_DIR)
    assert os.listdir(victim) == ["important.txt"]
    assert (victim / "important.txt").read_text() == "x"
    assert leftovers(tmp_path) == []


def test_save_refuses_a_regular_file_and_a_foreign_manifest(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(ArtifactError) as info:
        splice.save(small(), f)
    assert str(info.value) == REFUSED.format(path=f, why=NOT_A_FOLDER)
    assert f.read_text() == "keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"format": "someone.else/2"}')
    with pytest.raises(
        ArtifactError, match=r"has a manifest.json that is not splice's \(format 'someone.else/2'\)"
    ):
        splice.save(small(), other)
    (other / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON, so splice cannot tell it wrote it"):
        splice.save(small(), other)
    assert os.listdir(other) == ["manifest.json"]
    assert leftovers(tmp_path) == []


def test_overwrite_true_replaces_anything(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("x")
    splice.save(small(), victim, overwrite=True)
    assert sorted(os.listdir(victim)) == ["manifest.json", "program.ir", "weights.safetensors"]
    f = tmp_path / "file"
    f.write_text("x")
    splice.save(small(), f, overwrite=True)
    assert f.is_dir()
    splice.load(f)
    assert leftovers(tmp_path) == []


def test_splice_programs_and_empty_folders_are_replaced_without_force(tmp_path):
    out = tmp_path / "p.splice"
    splice.save(small(1.0), out)
    splice.save(small(2.0), out)
    assert torch.equal(splice.load(out).get_weight("w"), torch.full((4, 4), 2.0))
    empty = tmp_path / "empty"
    empty.mkdir()
    splice.save(small(), empty)
    splice.load(empty)
    assert leftovers(tmp_path) == []


def test_compile_refuses_before_compiling(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("x")
    with pytest.raises(ArtifactError) as info:
        splice.compile(small(), "host", output=victim)
    assert str(info.value) == REFUSED.format(path=victim, why=NOT_SPLICE_DIR)
    assert os.listdir(victim) == ["important.txt"]


def _cli(argv: list[str]) -> int:
    from splice.tools.cli import main

    return main(argv)


def test_cli_output_needs_force(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("x")
    model = ["splice.models:mlp", "-a", "d=4", "-a", "hidden=6"]
    assert _cli(["capture", *model, "-o", str(victim)]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert os.listdir(victim) == ["important.txt"]
    prog = tmp_path / "mlp.splice"
    assert _cli(["capture", *model, "-o", str(prog)]) == 0
    assert _cli(["opt", str(prog), "-p", "dce", "-o", str(victim)]) == 1
    assert _cli(["compile", str(prog), "-o", str(victim)]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert os.listdir(victim) == ["important.txt"]
    assert _cli(["opt", str(prog), "-p", "dce", "-o", str(victim), "--force"]) == 0
    assert not (victim / "important.txt").exists()
    assert _cli(["capture", *model, "-o", str(victim)]) == 0  # now it is splice's
    assert leftovers(tmp_path) == []


def test_bad_output_paths_are_artifact_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ArtifactError, match="cannot write .*file/sub: .*file is a file, not a folder"
    ):
        splice.save(small(), tmp_path / "file" / "sub")
    with pytest.raises(ArtifactError, match="it is not a folder name"):
        splice.save(small(), "/")


def _writer(path: str, fill: float, rounds: int, results, done=None) -> None:
    """Save ``rounds`` times, or until ``done`` is set (then at most 2000 times)."""
    torch.set_num_threads(1)
    try:
        count = 0
        while count < rounds or (done is not None and not done.is_set() and count < 2000):
            splice.save(small(fill), path)
            count += 1
        results.put(("ok", fill))
    except BaseException as e:  # reported to the parent, which asserts on it
        results.put(("error", f"{type(e).__name__}: {e}"))


def _reader(path: str, fills: list[float], loads: int, done, results) -> None:
    """Load ``loads`` times while the writers write, then set ``done``."""
    torch.set_num_threads(1)
    try:
        splice.load(path)  # warm up (the first load initialises fake tensors)
        for _ in range(loads):
            w = splice.load(path).get_weight("w").detach()
            value = float(w[0, 0])
            assert value in fills and torch.equal(w, torch.full((4, 4), value)), value
        results.put(("ok", loads))
    except BaseException as e:
        results.put(("error", f"{type(e).__name__}: {e}"))
    finally:
        done.set()


def _run(procs) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0, p


def test_concurrent_saves_and_loads(tmp_path):
    """3 writers save into one folder (20 times each, and on until a reader has loaded
    it 40 times): every save succeeds, every load sees one complete version, and nothing
    is left behind."""
    ctx = mp.get_context("fork")
    path = str(tmp_path / "shared.splice")
    fills = [1.0, 2.0, 3.0]
    splice.save(small(0.0), path)
    results, done = ctx.Queue(), ctx.Event()
    reader = ctx.Process(target=_reader, args=(path, [0.0, *fills], 40, done, results))
    writers = [ctx.Process(target=_writer, args=(path, f, 20, results, done)) for f in fills]
    _run([reader, *writers])
    outcomes = [results.get(timeout=10) for _ in range(4)]
    assert sorted(outcomes) == [("ok", 1.0), ("ok", 2.0), ("ok", 3.0), ("ok", 40)]
    assert float(splice.load(path).get_weight("w").detach()[0, 0]) in fills
    assert sorted(os.listdir(tmp_path)) == ["shared.splice"]


def test_concurrent_first_saves_into_a_new_folder(tmp_path):
    ctx = mp.get_context("fork")
    path = str(tmp_path / "new.splice")
    results = ctx.Queue()
    _run([ctx.Process(target=_writer, args=(path, f, 3, results)) for f in (1.0, 2.0, 3.0)])
    assert sorted(results.get(timeout=10) for _ in range(3)) == [
        ("ok", 1.0),
        ("ok", 2.0),
        ("ok", 3.0),
    ]
    splice.load(path)
    assert sorted(os.listdir(tmp_path)) == ["new.splice"]


# ---------------------------------------------------------------------------------------
# 2. a saved program cannot run code


@pytest.mark.parametrize(
    "op",
    [
        "import_module.__self__.load_library",
        "higher_order.__class__",
        "aten.__class__",
        "aten._ops.x",
        "aten.linear.__call__",
        "os.system",
        "aten.from_file",
    ],
)
def test_saved_program_cannot_reach_python(tmp_path, monkeypatch, op):
    calls = []
    monkeypatch.setattr(torch.ops, "load_library", lambda *a: calls.append(a))
    folder = splice.save(small(), tmp_path / "p.splice")
    evil = SMALL.replace("aten.relu(%lin)", f'{op}("x.so")')
    rewrite_program(folder, evil)
    with pytest.raises(ParseError) as info:
        splice.load(folder)
    assert info.value.message.startswith(f"{folder / 'program.ir'}: unknown op {op!r}")
    assert info.value.line == 5
    assert calls == []


def test_op_names_resolve_from_registered_namespaces_only():
    from splice.ir.parser import resolve_target

    assert resolve_target("aten.add.Tensor") is torch.ops.aten.add.Tensor
    assert resolve_target("aten.__and__.Tensor") is torch.ops.aten.__and__.Tensor
    assert resolve_target("prims.add") is torch.ops.prims.add.default
    assert resolve_target("higher_order.cond") is torch.ops.higher_order.cond
    assert resolve_target("splice.lowrank_linear") is torch.ops.splice.lowrank_linear.default
    for bad in ("import_module.__self__.load_library", "higher_order.nope", "aten.nope", "a.b.c.d"):
        with pytest.raises(KeyError):
            resolve_target(bad)


def test_user_registered_namespace_parses():
    lib = torch.library.Library("splice_safety_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    text = SMALL.replace("aten.relu(%lin)", "splice_safety_test.twice(%lin)")
    p = splice.parse_ir(text, {"w": torch.eye(4)})
    splice.verify(p)
    x = torch.randn(2, 4)
    assert torch.equal(p(x), x * 2)


def test_load_verifies_and_does_not_return_a_broken_program(tmp_path):
    folder = splice.save(small(), tmp_path / "p.splice")
    rewrite_program(folder, SMALL.replace("%r : f32[2,4] = aten.relu", "%r : f32[2,5] = aten.relu"))
    with pytest.raises(VerificationError) as info:
        splice.load(folder)
    assert info.value.message == (
        f"{folder / 'program.ir'} does not verify, so it was not loaded: "
        "%r is recorded as f32[2,5] but its op computes f32[2,4]"
    )
    assert info.value.node == "r"


def test_diff_of_a_broken_program_fails_cleanly(tmp_path, capsys):
    good = splice.save(small(), tmp_path / "good.splice")
    bad = splice.save(small(), tmp_path / "bad.splice")
    rewrite_program(
        bad, SMALL.replace("aten.relu(%lin)", 'import_module.__self__.load_library("x.so")')
    )
    assert _cli(["diff", str(good), str(bad)]) == 1
    assert "unknown op 'import_module.__self__.load_library'" in capsys.readouterr().err


def test_damaged_manifests_are_artifact_errors(tmp_path):
    folder = splice.save(small(), tmp_path / "p.splice")
    manifest = folder / "manifest.json"
    cases = {
        "[1, 2]": "manifest.json is not a JSON object",
        "null": "manifest.json is not a JSON object",
        '{"format": "splice.program/1"}': "'files' must map program.ir, weights.safetensors",
        '{"format": "splice.program/1", "files": {"program.ir": "0", "../../etc/passwd": "0"}}': (
            "'files' must map program.ir, weights.safetensors"
        ),
    }
    for text, message in cases.items():
        manifest.write_text(text)
        with pytest.raises(ArtifactError, match=message.replace(".", r"\.")):
            serialize.load(folder)
        with pytest.raises(ArtifactError, match=message.replace(".", r"\.")):
            load_samples(folder)


# ---------------------------------------------------------------------------------------
# 9. every parser failure is a ParseError with a line number

LINE5 = "  %r : f32[2,4] = aten.relu(%lin)"


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        ('  %r : f32[2,4] = aten.add.Tensor(%lin, "\\q")', r"bad string literal: Invalid \\escape"),
        ('  %r : f32[2,4] = aten.add.Tensor(%lin, "abc)', "unterminated string literal"),
        (
            "  %r : f32[2,4] = aten.add.Tensor(%lin, " + "[" * 5000 + "]" * 5000 + ")",
            "values nest deeper than 100 levels",
        ),
        ("  %r : " + "(" * 5000 + ")" * 5000 + " = aten.relu(%lin)", "specs nest deeper than 100"),
        ("  %r : f32[2,4] = higher_order.nope(%lin)", "unknown op 'higher_order.nope'"),
        ('  %r : f32[2,4] = aten.relu(%lin, device("nodevice"))', "bad device 'nodevice'"),
        (
            "  %r : f32[2,4] = aten.relu(%lin, slice(1, 2, 3, 4))",
            r"slice\(\.\.\.\) takes start, stop and step",
        ),
        ("  %r : f32[2,4] = aten.relu(%lin, " + "9" * 5000 + ")", "bad number '9999"),
        ("  %r : f32[2,4 = aten.relu(%lin)", r"unbalanced '\['"),
    ],
)
def test_damaged_text_is_a_parse_error_with_its_line(replacement, message):
    with pytest.raises(ParseError, match=message) as info:
        splice.parse_ir(SMALL.replace(LINE5, replacement), {"w": torch.eye(4)})
    assert info.value.line == 5


def test_deep_attr_json_and_deep_subgraphs_are_parse_errors():
    text = SMALL.replace(
        "program @small", "attr a = " + "[" * 5000 + "]" * 5000 + "\nprogram @small"
    )
    with pytest.raises(ParseError, match="attribute value is not JSON") as info:
        splice.parse_ir(text, {"w": torch.eye(4)})
    assert info.value.line == 3
    nested = "".join(f"graph @g{i}(%a : f32[1]) {{\n" for i in range(200))
    text = f"program @p(%x : f32[1]) {{\n{nested}"
    with pytest.raises(ParseError, match="sub-graphs nest deeper than 100 levels") as info:
        splice.parse_ir(text)
    assert info.value.line == 102


def test_weight_names_that_clash_with_module_attributes_are_parse_errors():
    text = SMALL.replace("@w", "@__class__")
    with pytest.raises(ParseError) as info:
        splice.parse_ir(text, {"__class__": torch.eye(4)})
    assert isinstance(info.value, SpliceError)


# ---------------------------------------------------------------------------------------
# 10. value names and output names


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("def", "is a Python keyword"),
        ("class", "is a Python keyword"),
        ("torch", "is a name the generated code uses for 'torch'"),
        ("device", "is a name the generated code uses for 'device'"),
        ("self", "is the name of the module inside the generated forward() code"),
        ("print", "shadows a Python builtin that the generated code may call"),
    ],
)
def test_value_names_the_generated_code_needs_are_rejected(name, why):
    text = SMALL.replace("%r", f"%{name}")
    with pytest.raises(ParseError) as info:
        splice.parse_ir(text, {"w": torch.eye(4)})
    assert str(info.value) == (
        f"value name %{name} cannot be used: it {why} (column 2)\n"
        f"  at: line 5: %{name} : f32[2,4] = aten.relu(%lin)\n"
        f"  hint: rename it, e.g. %{name}_"
    )
    text = SMALL.replace("%x", f"%{name}")
    with pytest.raises(ParseError) as info:
        splice.parse_ir(text, {"w": torch.eye(4)})
    assert info.value.message.startswith(f"input name %{name} cannot be used: it {why} (column")


def test_escaped_names_work_and_verify_rejects_self():
    p = splice.parse_ir(SMALL.replace("%r", "%self_").replace("%lin", "%def_"), {"w": torch.eye(4)})
    splice.verify(p)
    x = torch.randn(2, 4)
    assert torch.equal(p(x), x.relu())
    node = p.node("self_")
    node.name = "self"
    with pytest.raises(VerificationError, match="value name %self is the name of the module"):
        splice.verify(p)


def test_duplicate_output_names_are_rejected():
    text = SMALL.replace("return out=%r", "return out=%r, out=%lin")
    with pytest.raises(ParseError) as info:
        splice.parse_ir(text, {"w": torch.eye(4)})
    assert str(info.value) == (
        "output name 'out' is given twice (column 16)\n"
        "  at: line 6: return out=%r, out=%lin\n"
        "  hint: outputs are looked up by name; give each output its own name"
    )
    p = splice.parse_ir(
        SMALL.replace("return out=%r", "return out=%r, b=%lin"), {"w": torch.eye(4)}
    )
    dup = Program(p.graph_module, output_names=["out", "out"], weight_kinds=p.weight_kinds)
    with pytest.raises(VerificationError, match="output name\\(s\\) 'out' appear more than once"):
        splice.verify(dup)


def test_load_can_pin_the_manifest_and_read_program_and_samples_together(tmp_path):
    x = torch.randn(2, 4)
    folder = splice.save(small(), tmp_path / "p.splice", samples=[(x,)])
    digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    program, samples = serialize.load_with_samples(folder, sha256=f"sha256:{digest}")
    assert torch.equal(samples[0][0], x) and program.input_names == ["x"]
    splice.save(small(), folder, samples=[(x,)])  # new weights: a new manifest
    with pytest.raises(ArtifactError, match=f"not the pinned {digest}"):
        serialize.load(folder, sha256=digest)
    with pytest.raises(ArtifactError, match="sha256= must be 64 hex digits, got 'abc'"):
        serialize.load(folder, sha256="abc")


def test_output_names_must_be_identifiers():
    p = small()
    p.rename_output("out", "a-b")
    with pytest.raises(VerificationError, match="output name 'a-b' is not an identifier"):
        splice.verify(p)


def test_writes_without_renameat2_fall_back_to_rename_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(serialize, "_libc_renameat2", False)
    out = tmp_path / "p.splice"
    splice.save(small(1.0), out)
    splice.save(small(2.0), out)
    assert torch.equal(splice.load(out).get_weight("w"), torch.full((4, 4), 2.0))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("x")
    with pytest.raises(ArtifactError, match="refusing to replace"):
        splice.save(small(), victim)
    assert os.listdir(victim) == ["important.txt"]
    assert sorted(os.listdir(tmp_path)) == ["p.splice", "victim"]
