"""save/load: text IR + safetensors, atomic, checked, never unpickled."""

from __future__ import annotations

import pathlib

import pytest
import torch

import splice
from splice.errors import ArtifactError
from splice.ir.serialize import load_samples


def test_save_load_round_trip_with_samples(tmp_path, captured, arch_model):
    p = captured("gpt2")
    _, args = arch_model("gpt2")
    path = splice.save(p, tmp_path / "g.splice", samples=[args])
    assert sorted(f.name for f in path.iterdir()) == [
        "manifest.json",
        "program.ir",
        "samples.safetensors",
        "weights.safetensors",
    ]
    q = splice.load(path)
    assert splice.print_ir(q, locations=True) == splice.print_ir(p, locations=True)
    assert torch.equal(q(*args), p(*args))
    (s,) = load_samples(path)
    assert torch.equal(s[0], args[0])


def test_tampered_files_are_rejected(tmp_path, captured):
    p = captured("convnet")
    path = splice.save(p, tmp_path / "c.splice")
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum of weights.safetensors does not match"):
        splice.load(path)
    with pytest.raises(ArtifactError, match="neither a saved program nor a compiled artifact"):
        splice.load(tmp_path)


def test_failed_save_leaves_nothing_and_keeps_the_old_version(tmp_path, captured, monkeypatch):
    p = captured("convnet")
    target = tmp_path / "c.splice"
    splice.save(p, target)
    before = (target / "program.ir").read_text()
    import splice.ir.serialize as ser

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ser, "print_ir", lambda *a, **k: "changed")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        splice.save(p, target)
    assert (target / "program.ir").read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["c.splice"]


def test_no_pickle_anywhere_in_the_package():
    root = pathlib.Path(splice.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, f
