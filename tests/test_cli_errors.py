"""Every bad input on the command line ends in one line on stderr and exit status 1.

One case per bad input (issue 15, item 8): bad factory arguments and factories, output
paths, damaged manifests, bad ``--inputs`` files and numeric options. Each must exit 1
with exactly one non-empty line on stderr, no traceback, and name the bad thing. The cases
where torch's fake-tensor logger used to print a traceback before splice's message run in
a subprocess (that logger writes to the process's stderr, which capfd cannot see in-process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splice._quiet import quiet_torch_logs
from splice.tools.cli import build_parser, main

USER_MODULE = """
import functools

from os import system as build_system  # a builtin, re-exported
from shutil import rmtree  # a standard-library function, re-exported

import torch


def boom(**kw):
    raise ValueError("factory exploded")


def notuple():
    return 3


def tiny(d: int = 4):
    return torch.nn.Linear(d, d).eval(), (torch.randn(1, d),)


@functools.wraps(tiny)
def wrapped(*args, **kwargs):
    return tiny(*args, **kwargs)


@functools.lru_cache
def cached():
    return tiny()


Model = torch.nn.Linear
"""


def _rehash(folder: Path) -> None:
    """Record program.ir's new sha256 in the manifest (a consistent edit)."""
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["program.ir"] = hashlib.sha256((folder / "program.ir").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a saved program, damaged copies, an artifact, bad input files."""
    ws = tmp_path_factory.mktemp("cli_errors")
    prog = ws / "prog"
    assert (
        main(["capture", "splice.models:mlp", "-a", "d=4", "-a", "hidden=6", "-o", str(prog)]) == 0
    )
    for name, text in (
        ("m_list", "[1, 2]"),
        ("m_null", "null"),
        ("m_nokeys", '{"format": "splice.program/1"}'),
        ("m_badjson", "{"),
    ):
        shutil.copytree(prog, ws / name)
        (ws / name / "manifest.json").write_text(text)
    bad = ws / "badshape"  # program.ir whose first linear reads a weight of the wrong shape
    shutil.copytree(prog, bad)
    ir = (bad / "program.ir").read_text()
    (bad / "program.ir").write_text(ir.replace("(%x, @fc1.weight", "(%x, @fc2.weight", 1))
    _rehash(bad)

    import splice

    art = ws / "art"
    splice.compile(splice.load(prog), "host", output=art)
    for name, text in (("a_list", "[1]"), ("a_null", "null"), ("a_nokeys", "{}")):
        shutil.copytree(art, ws / name)
        (ws / name / "manifest.json").write_text(text)
    m = json.loads((art / "manifest.json").read_text())
    m.pop("target")
    shutil.copytree(art, ws / "a_notarget")
    (ws / "a_notarget" / "manifest.json").write_text(json.dumps(m))

    (ws / "garbage.safetensors").write_text("garbage")
    (ws / "garbage.npz").write_text("garbage")
    (ws / "empty.safetensors").write_bytes(b"")
    np.savez(ws / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(ws / "wrongname.npz", tokens=np.zeros((1, 4), dtype=np.float32))
    (ws / "afile").write_text("x")
    (ws / "pkg").mkdir()
    (ws / "pkg" / "userfac.py").write_text(USER_MODULE)
    return ws


@pytest.fixture
def in_ws(ws, monkeypatch) -> Path:
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(ws / "pkg"))
    monkeypatch.delenv("SPLICE_DEBUG", raising=False)
    return ws


MLP = ["splice.models:mlp", "-a", "d=4", "-a", "hidden=6"]

# (id, argv, what the one line must name)
CASES = [
    # factory arguments and factories
    ("arg-not-int", ["capture", "splice.models:gpt2", "-a", "layers=abc", "-o", "o"], "layers=abc"),
    ("arg-unknown", ["capture", "splice.models:mlp", "-a", "layers=abc", "-o", "o"], "'layers'"),
    ("arg-bogus", ["capture", "splice.models:mlp", "-a", "bogus=1", "-o", "o"], "'bogus'"),
    ("arg-negative", ["capture", "splice.models:mlp", "-a", "d=-4", "-o", "o"], "d must be"),
    ("arg-zero", ["capture", "splice.models:mlp", "-a", "hidden=0", "-o", "o"], "hidden must"),
    ("arg-heads", ["capture", "splice.models:gpt2", "-a", "heads=3", "-o", "o"], "heads=3"),
    ("arg-no-equals", ["capture", "splice.models:mlp", "-a", "d", "-o", "o"], "'d'"),
    ("arg-empty-key", ["capture", "splice.models:mlp", "-a", "=5", "-o", "o"], "'=5'"),
    ("arg-float-for-int", ["capture", "splice.models:mlp", "-a", "d=4.5", "-o", "o"], "d=4.5"),
    ("factory-raises", ["capture", "userfac:boom", "-o", "o"], "factory exploded"),
    ("factory-not-tuple", ["capture", "userfac:notuple", "-o", "o"], "(model, example_inputs)"),
    ("stdlib-module", ["capture", "os:system", "-a", "command=touch ran", "-o", "o"], "os"),
    ("stdlib-function", ["capture", "userfac:rmtree", "-a", "path=pkg", "-o", "o"], "rmtree"),
    (
        "builtin",
        ["capture", "userfac:build_system", "-a", "command=touch ran", "-o", "o"],
        "system",
    ),
    ("class", ["show", "userfac:Model"], "a class"),
    ("no-such-factory", ["show", "splice.models:nosuch"], "nosuch"),
    ("no-such-module", ["show", "nosuchpkg.models:build"], "nosuchpkg"),
    # output paths
    ("out-proc", ["capture", *MLP, "-o", "/proc/x"], "/proc/x"),
    ("out-cwd", ["capture", *MLP, "-o", "."], "-o ."),
    ("out-parent", ["capture", *MLP, "-o", ".."], "-o .."),
    ("out-under-file", ["capture", *MLP, "-o", "afile/x"], "afile"),
    ("opt-out-proc", ["opt", "prog", "-p", "cse", "-o", "/proc/x"], "/proc/x"),
    ("opt-dump-dir-file", ["opt", "prog", "-p", "cse", "--dump-dir", "afile"], "--dump-dir afile"),
    ("opt-crash-dir-file", ["opt", "prog", "-p", "cse", "--crash-dir", "afile"], "--crash-dir"),
    ("compile-out-proc", ["compile", "prog", "-o", "/proc/x"], "/proc/x"),
    ("run-save-nodir", ["run", "art", "--save", "nodir/f"], "nodir"),
    ("run-save-folder", ["run", "art", "--save", "pkg"], "--save pkg"),
    ("stitch-out-nodir", ["stitch-table", MLP[0], MLP[0], "-o", "nodir/t.md"], "nodir"),
    ("stitch-plot-nodir", ["stitch-table", MLP[0], MLP[0], "--plot", "nodir/p.png"], "nodir"),
    # damaged manifests: saved programs
    ("prog-manifest-list", ["show", "m_list"], "list"),
    ("prog-manifest-null", ["show", "m_null"], "null"),
    ("prog-manifest-nokeys", ["show", "m_nokeys"], "files"),
    ("prog-manifest-json", ["opt", "m_badjson", "-p", "cse"], "JSON"),
    ("diff-manifest-list", ["diff", "prog", "m_list"], "list"),
    # damaged manifests: artifacts
    ("art-manifest-list", ["run", "a_list"], "list"),
    ("art-manifest-null", ["bench", "a_null"], "null"),
    ("art-manifest-empty", ["run", "a_nokeys"], "manifest"),
    ("art-manifest-notarget", ["run", "a_notarget"], "target"),
    ("show-art-manifest-null", ["show", "a_null"], "null"),
    # bad --inputs files
    ("inputs-garbage", ["run", "art", "--inputs", "garbage.safetensors"], "garbage.safetensors"),
    ("inputs-garbage-npz", ["run", "art", "--inputs", "garbage.npz"], "garbage.npz"),
    ("inputs-empty", ["run", "art", "--inputs", "empty.safetensors"], "empty.safetensors"),
    ("inputs-objects", ["run", "art", "--inputs", "objects.npz"], "objects.npz"),
    ("inputs-missing", ["run", "art", "--inputs", "nothere.npz"], "nothere.npz"),
    ("inputs-folder", ["bench", "art", "--inputs", "pkg"], "pkg"),
    ("inputs-names", ["run", "art", "--inputs", "wrongname.npz"], "lacks inputs ['x']"),
    # numeric options
    ("bench-repeats-0", ["bench", "art", "--repeats", "0"], "--repeats"),
    ("bench-repeats-abc", ["bench", "art", "--repeats", "abc"], "--repeats"),
    ("bench-warmup", ["bench", "art", "--warmup", "-1"], "--warmup"),
    ("bench-threads", ["bench", "art", "--threads", "0"], "--threads"),
    ("run-atol", ["run", "art", "--check", "--atol", "-1"], "--atol"),
    ("run-atol-nan", ["run", "art", "--check", "--atol", "nan"], "--atol"),
    ("compile-tune", ["compile", "prog", "--tune", "-1", "-o", "o"], "--tune"),
    ("stats-depth", ["stats", "prog", "--depth", "-1"], "--depth"),
    ("demo-sentences", ["demo", "--sentences", "0"], "--sentences"),
    ("stitch-window", ["stitch-table", MLP[0], MLP[0], "--window", "0"], "--window"),
    ("stitch-calib", ["stitch-table", MLP[0], MLP[0], "--calib", "0"], "--calib"),
    ("stitch-stride", ["stitch-table", MLP[0], MLP[0], "--stride", "-2"], "--stride"),
    # usage
    ("missing-output", ["capture", *MLP], "-o/--output"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_1(in_ws, capfd, argv, names):
    assert main(list(argv)) == 1
    err = capfd.readouterr().err
    line = _one_line(err)
    assert line.startswith("error: ")
    assert names in line
    assert not (in_ws / "ran").exists()  # no refused factory ran
    assert not (in_ws / "o").exists()  # nothing half-written


@pytest.mark.parametrize("command", ["opt", "show", "stats"])
def test_torch_logs_do_not_precede_the_message(ws, command):
    """A program that does not verify: torch's fake-tensor logger stays quiet."""
    argv = [command, "badshape"] + (["-p", "cse"] if command == "opt" else [])
    env = {k: v for k, v in os.environ.items() if k != "SPLICE_DEBUG"}
    r = subprocess.run(
        [sys.executable, "-m", "splice.tools.cli", *argv],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    line = _one_line(r.stderr)
    assert "VerificationError" in line and "%linear" in line
    assert "fake_tensor" not in r.stderr


def test_a_stdlib_module_is_refused_before_it_is_imported(in_ws, capfd):
    sys.modules.pop("antigravity", None)
    assert main(["show", "antigravity:fly"]) == 1  # importing it would open a web browser
    assert "antigravity" not in sys.modules
    assert "standard library" in _one_line(capfd.readouterr().err)


def test_splice_debug_shows_the_traceback(in_ws, capfd, monkeypatch):
    monkeypatch.setenv("SPLICE_DEBUG", "1")
    assert main(["capture", "userfac:boom", "-o", "o"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and 'raise ValueError("factory exploded")' in err
    assert err.strip().splitlines()[-1].startswith("error: CaptureError: userfac:boom raised")


def test_an_internal_error_is_one_line_that_says_how_to_see_it(in_ws, capfd, monkeypatch):
    import splice.tools.cli as cli

    def broken(a):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_passes", broken)
    assert main(["passes"]) == 1
    line = _one_line(capfd.readouterr().err)
    assert "KeyError" in line and "a bug" in line and "SPLICE_DEBUG=1" in line
    monkeypatch.setenv("SPLICE_DEBUG", "1")
    assert main(["passes"]) == 1
    assert "Traceback" in capfd.readouterr().err


def test_an_os_error_names_the_file(in_ws, capfd, monkeypatch):
    import splice.tools.cli as cli

    def unreadable(a):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(cli, "cmd_passes", unreadable)
    assert main(["passes"]) == 1
    line = _one_line(capfd.readouterr().err)
    assert "Permission denied" in line and "/some/file" in line


def test_help_and_version_still_exit_0(capsys):
    assert main(["--version"]) == 0
    assert main(["capture", "--help"]) == 0
    assert "MODEL specs import and call your code" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["capture", "opt", "show", "stats", "compile", "stitch-table"])
def test_help_of_every_model_command_says_model_specs_run_code(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices[command].format_help().split())
    assert "MODEL specs import and call your code" in text


def test_real_factories_still_load(in_ws, capfd):
    from splice.tools.common import load_model_spec

    for spec in ("userfac:tiny", "userfac:wrapped", "userfac:cached"):
        _, (x,) = load_model_spec(spec)
        assert x.shape == (1, 4)
    _, (x,) = load_model_spec("userfac:tiny", {"d": 3})
    assert x.shape == (1, 3)
    # a user's module whose name shadows a stdlib module (test.py) is still the user's
    (in_ws / "pkg" / "test.py").write_text(USER_MODULE)
    sys.modules.pop("test", None)
    try:
        _, (x,) = load_model_spec("test:tiny")
    finally:
        sys.modules.pop("test", None)
    assert x.shape == (1, 4)
    assert main(["show", "userfac:tiny", "-a", "d=2"]) == 0
    assert "f32[1,2]" in capfd.readouterr().out


def test_quiet_torch_logs_silences_and_restores():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("torch._subclasses.fake_tensor")
    child = logging.getLogger("torch._export.made.later")
    keep = Keep()
    log.addHandler(keep)
    child.addHandler(keep)
    try:
        with quiet_torch_logs():
            log.error("hidden")
            child.error("hidden too")
        log.error("shown")
        with quiet_torch_logs(enabled=False):
            log.error("shown when debugging")
    finally:
        log.removeHandler(keep)
        child.removeHandler(keep)
    assert [r.getMessage() for r in records] == ["shown", "shown when debugging"]
