"""save / load a Program: text IR + ``weights.safetensors``; nothing is pickled, ever.

A saved program is a folder::

    model.splice/
      program.ir            the text form, with locations
      weights.safetensors   every weight by name
      samples.safetensors   optional: sample inputs (for numeric checks and calibration)
      manifest.json         format, splice version, sha256 of every file

Writing goes to a temporary folder that is renamed into place, so a failure never leaves
a half-written program behind. Loading checks the checksums first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError
from splice.ir.parser import parse_ir
from splice.ir.printer import print_ir
from splice.ir.program import Program

FORMAT = "splice.program/1"
PROGRAM_FILE = "program.ir"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "samples.safetensors"


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_for_safetensors(program: Program) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in program.weights.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()  # safetensors refuses shared storage
        elif ptr != -1:
            seen.add(ptr)
        out[name] = t.cpu()
    return out


def atomic_dir(path: str | os.PathLike[str]):
    """Context manager: yields a temporary folder that replaces ``path`` on success."""
    import contextlib

    @contextlib.contextmanager
    def _cm():
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return _cm()


def save(
    program: Program,
    path: str | os.PathLike[str],
    *,
    samples: Sequence[Sequence[torch.Tensor]] | None = None,
) -> Path:
    """Write ``program`` (and optional sample inputs) to the folder ``path``, atomically."""
    from safetensors.torch import save_file

    from splice import __version__

    text = print_ir(program, locations=True)
    weights = _weights_for_safetensors(program)
    with atomic_dir(path) as tmp:
        (tmp / PROGRAM_FILE).write_text(text)
        save_file(weights, str(tmp / WEIGHTS_FILE))
        files = [PROGRAM_FILE, WEIGHTS_FILE]
        if samples:
            flat = {
                f"{i}.{name}": t.detach().contiguous().cpu()
                for i, s in enumerate(samples)
                for name, t in zip(program.input_names, s)
            }
            save_file(flat, str(tmp / SAMPLES_FILE))
            files.append(SAMPLES_FILE)
        manifest = {
            "format": FORMAT,
            "splice_version": __version__,
            "name": program.name,
            "files": {f: sha256_file(tmp / f) for f in files},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(path)


def load(path: str | os.PathLike[str]) -> Program:
    """Read a program saved by :func:`save`; raises ArtifactError if it is corrupt."""
    from safetensors.torch import load_file

    root = _check(path)
    weights = load_file(str(root / WEIGHTS_FILE))
    return parse_ir((root / PROGRAM_FILE).read_text(), weights)


def load_samples(path: str | os.PathLike[str]) -> list[tuple[torch.Tensor, ...]]:
    """The sample inputs saved with a program (empty if none were saved)."""
    from safetensors.torch import load_file

    root = _check(path)
    if not (root / SAMPLES_FILE).is_file():
        return []
    flat = load_file(str(root / SAMPLES_FILE))
    order = _input_order(root)
    out = []
    while all(f"{len(out)}.{n}" in flat for n in order) and order:
        out.append(tuple(flat[f"{len(out)}.{n}"] for n in order))
    return out


def _input_order(root: Path) -> list[str]:
    import re

    for line in (root / PROGRAM_FILE).read_text().splitlines():
        if line.startswith("program @"):
            return re.findall(r"%([A-Za-z_][A-Za-z0-9_]*) :", line)
    return []


def read_manifest_file(root: Path, *, missing: str, hint: str) -> dict[str, Any]:
    """``root/manifest.json`` parsed; ArtifactError(``missing``, ``hint``) when absent."""
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(missing, hint=hint)
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON: {e}") from e


def check_files(root: Path, manifest: dict[str, Any], *, hint: str | None = None) -> None:
    """Every file the manifest lists exists and has its recorded sha256."""
    for fname, digest in manifest.get("files", {}).items():
        fpath = root / fname
        if not fpath.is_file():
            raise ArtifactError(f"{root}: file {fname} is missing")
        if sha256_file(fpath) != digest:
            raise ArtifactError(
                f"{root}: checksum of {fname} does not match the manifest (file changed or corrupt)",
                hint=hint,
            )


def _check(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    manifest = read_manifest_file(
        root,
        missing=f"{root} is not a saved splice program (no {MANIFEST_FILE})",
        hint="save programs with splice.save(program, path) or `splice capture -o`",
    )
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{root}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    check_files(root, manifest)
    return root


def is_saved_program(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file() and (Path(path) / PROGRAM_FILE).is_file()


__all__ = ["atomic_dir", "is_saved_program", "load", "load_samples", "save", "sha256_file"]
