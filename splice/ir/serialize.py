"""save / load a Program: text IR + ``weights.safetensors``; nothing is pickled, ever.

A saved program is a folder::

    model.splice/
      program.ir            the text form, with locations
      weights.safetensors   every weight by name
      samples.safetensors   optional: sample inputs (for numeric checks and calibration)
      manifest.json         format, splice version, sha256 of every file

**Writing** (:func:`atomic_dir`, used by :func:`save`, ``splice.compile`` and the CLI's
``-o``) never destroys what splice did not write: an existing path is replaced only when it
is a splice program or artifact (a folder whose ``manifest.json`` has a ``splice.*``
format) or an empty folder, unless the caller passes ``overwrite=True`` (``--force``).
The new folder is written under a unique temporary name beside the target and then
swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere the old folder
is renamed aside first), so concurrent writers all succeed (the last one wins), a failure
leaves nothing behind, and a reader sees either the old folder or the new one.

**Loading** (:func:`load`) reads every file through one open handle on the folder, checks
each against the manifest's sha256 from the bytes it then uses (so a folder swapped or
edited while it is read is retried or rejected, never mixed), parses the text (which
resolves ops only from registered namespaces, see :mod:`splice.ir.parser`) and
:func:`verifies <splice.ir.verify.verify>` the result: a program that does not verify is
not returned, so it cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError, ParseError, VerificationError
from splice.ir.parser import parse_ir
from splice.ir.printer import print_ir
from splice.ir.program import Program
from splice.ir.verify import verify
from splice.version import __version__

FORMAT = "splice.program/1"
PROGRAM_FILE = "program.ir"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "samples.safetensors"

# A manifest whose format starts with this was written by splice (programs, artifacts).
SPLICE_FORMAT_PREFIX = "splice."
# How often a commit or a load retries when another process swaps the folder meanwhile.
_RETRIES = 50


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_for_safetensors(program: Program) -> dict[str, torch.Tensor]:
    """The program's weights as safetensors writes them: detached, contiguous, and no two
    sharing storage (a shared or strided tensor is copied)."""
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


def atomic_dir(
    path: str | os.PathLike[str], *, overwrite: bool = False
) -> contextlib.AbstractContextManager[Path]:
    """Context manager: yields a new temporary folder that replaces ``path`` on success.

    ``path`` may exist only as a splice program or artifact or as an empty folder; anything
    else raises :class:`ArtifactError` before any work is done (and again at the commit),
    unless ``overwrite`` is true. On an exception inside the block the temporary folder is
    removed and ``path`` is untouched. See the module docstring for the concurrency rules.
    """
    return _atomic_dir(path, overwrite)


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    target = check_output_path(path, overwrite=overwrite)
    blocker = next((a for a in target.parents if os.path.lexists(a)), None)
    if blocker is not None and not blocker.is_dir():
        raise ArtifactError(
            f"cannot write {target}: {blocker} is a file, not a folder",
            hint="choose an output path in a folder you can write to",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise _write_error(target, e) from e
    try:
        yield tmp
        _commit(tmp, target, overwrite)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(target, e) from e
        raise


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """The absolute output path, if splice may write it; :class:`ArtifactError` if not.

    Writing is allowed where nothing exists, over an empty folder, over a splice program
    or artifact, and over anything at all with ``overwrite=True``."""
    target = Path(os.path.abspath(os.fspath(path)))
    if not target.name:
        raise ArtifactError(
            f"cannot write to {os.fspath(path)!r}: it is not a folder name",
            hint="give a new folder path such as out.splice",
        )
    reason = None if overwrite else _foreign_reason(target)
    if reason is not None:
        raise ArtifactError(
            f"refusing to replace {target}: it {reason}; nothing was written",
            hint="pass --force (CLI) or overwrite=True (Python) to replace it, "
            "or choose another output path",
        )
    return target


def _foreign_reason(target: Path) -> str | None:
    """Why ``target`` is not splice's to replace (None: missing, empty, or splice's)."""
    if not os.path.lexists(target):
        return None
    if not target.is_dir():
        return "exists and is not a folder (splice writes programs and artifacts as folders)"
    try:
        entries = os.listdir(target)
    except OSError as e:
        return f"is a folder splice cannot read ({e.strerror})"
    if not entries:
        return None
    if MANIFEST_FILE not in entries:
        return f"is a folder that splice did not write (it has no {MANIFEST_FILE})"
    try:
        manifest = json.loads((target / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"has a {MANIFEST_FILE} that is not valid JSON, so splice cannot tell it wrote it"
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(SPLICE_FORMAT_PREFIX)):
        return f"has a {MANIFEST_FILE} that is not splice's (format {fmt!r})"
    return None


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target``: created if missing, swapped in if not."""
    for _ in range(_RETRIES):
        check_output_path(target, overwrite=overwrite)  # it may have changed meanwhile
        try:
            if not os.path.lexists(target):
                _rename_noreplace(tmp, target)
                return
            _exchange(tmp, target)
        except (FileExistsError, FileNotFoundError):
            continue  # another writer created or replaced it meanwhile: look again
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                continue
            raise
        _remove(tmp)  # the old content, now under the temporary name
        return
    raise ArtifactError(
        f"could not write {target}: other processes kept replacing it",
        hint="write to another path, or retry when the other writers have finished",
    )


_libc_renameat2: Any = None
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the platform or file system does not provide it."""
    global _libc_renameat2
    if _libc_renameat2 is None:
        try:
            _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _libc_renameat2 = False
    if _libc_renameat2 is False:
        return False
    rc = _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst))
        os.rename(src, dst)  # a non-empty folder created meanwhile makes this fail


def _exchange(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` and ``target`` atomically (or, where that is not possible, rename the
    old one aside first); afterwards ``tmp`` holds the old content."""
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(aside, target)
        raise
    os.rename(aside, tmp)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree; never follows a link."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _write_error(target: Path, e: OSError) -> ArtifactError:
    return ArtifactError(
        f"cannot write {target}: {e.strerror or e}",
        hint="choose an output path in a folder you can write to",
    )


def save(
    program: Program,
    path: str | os.PathLike[str],
    *,
    samples: Sequence[Sequence[torch.Tensor]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``program`` (and optional sample inputs) to the folder ``path``, atomically.

    ``path`` must not exist, or be an empty folder or a splice program or artifact; pass
    ``overwrite=True`` to replace anything else (see :func:`atomic_dir`)."""
    from safetensors.torch import save_file

    check_output_path(path, overwrite=overwrite)  # before printing a large program
    text = print_ir(program, locations=True)
    weights = weights_for_safetensors(program)
    with atomic_dir(path, overwrite=overwrite) as tmp:
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


def load(path: str | os.PathLike[str], *, sha256: str | None = None) -> Program:
    """Read and verify a program saved by :func:`save`.

    Raises :class:`ArtifactError` if the folder is missing, damaged or changed,
    :class:`ParseError` if its text is not a program, and :class:`VerificationError` if the
    program breaks an IR invariant; in each case nothing is returned, so nothing runs.
    ``sha256`` pins the program: the sha256 of its ``manifest.json`` (which lists the
    sha256 of every file), checked on the bytes that are then used."""
    root, files = _read_files(path, sha256)
    return _program(root, files)


def load_with_samples(
    path: str | os.PathLike[str], *, sha256: str | None = None
) -> tuple[Program, list[tuple[torch.Tensor, ...]]]:
    """:func:`load` and :func:`load_samples` from one read of the folder, so both come from
    the same version even while another process replaces it."""
    root, files = _read_files(path, sha256)
    return _program(root, files), _samples(root, files)


def _program(root: Path, files: dict[str, bytes]) -> Program:
    return _parse_and_verify(root, _text(root, files), _tensors(root, files, WEIGHTS_FILE))


def _tensors(root: Path, files: dict[str, bytes], name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(files[name])
    except SafetensorError as e:
        raise ArtifactError(f"{root / name} is not a safetensors file: {e}") from e


def _text(root: Path, files: dict[str, bytes]) -> str:
    try:
        return files[PROGRAM_FILE].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{root / PROGRAM_FILE} is not UTF-8 text: {e}") from e


def _parse_and_verify(root: Path, text: str, weights: dict[str, torch.Tensor]) -> Program:
    """``parse_ir`` then ``verify``, with errors that name the file."""
    where = root / PROGRAM_FILE
    try:
        program = parse_ir(text, weights)
    except ParseError as e:
        lines = text.splitlines()
        line = lines[e.line - 1] if e.line and e.line <= len(lines) else None
        raise ParseError(
            f"{where}: {e.message}", line=e.line, text=line and line[:200], hint=e.hint
        ) from e
    try:
        verify(program)
    except VerificationError as e:
        raise VerificationError(
            f"{where} does not verify, so it was not loaded: {e.message}",
            node=e.node,
            loc=e.loc,
            hint=e.hint,
        ) from e
    return program


def load_samples(path: str | os.PathLike[str]) -> list[tuple[torch.Tensor, ...]]:
    """The sample inputs saved with a program (empty if none were saved)."""
    root, files = _read_files(path)
    return _samples(root, files)


def _samples(root: Path, files: dict[str, bytes]) -> list[tuple[torch.Tensor, ...]]:
    if SAMPLES_FILE not in files:
        return []
    flat = _tensors(root, files, SAMPLES_FILE)
    order = _input_order(_text(root, files))
    out: list[tuple[torch.Tensor, ...]] = []
    while order and all(f"{len(out)}.{n}" in flat for n in order):
        out.append(tuple(flat[f"{len(out)}.{n}"] for n in order))
    return out


def _read_files(
    path: str | os.PathLike[str], sha256: str | None = None
) -> tuple[Path, dict[str, bytes]]:
    """Every file of a saved program, read through one handle on its folder and checked
    against the manifest (and the manifest against ``sha256``, if given); retried when a
    writer swaps the folder while it is read."""
    root = Path(path)
    pin = _pin(sha256)
    for _ in range(_RETRIES):
        try:
            dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            _program_manifest(root, None)  # raises: not a saved program
            raise
        except OSError as e:
            raise ArtifactError(f"cannot read {root}: {e.strerror}") from e
        try:
            return root, _read_snapshot(root, dir_fd, pin)
        except _Swapped:
            continue
        finally:
            os.close(dir_fd)
    raise ArtifactError(
        f"could not read {root}: other processes kept replacing it",
        hint="retry when the writers have finished",
    )


class _Swapped(Exception):
    """A file vanished because a writer replaced the folder while it was read."""


def _pin(sha256: str | None) -> str | None:
    """The pinned manifest digest in lower-case hex (``sha256:`` prefix allowed)."""
    if sha256 is None:
        return None
    digest = sha256.lower().removeprefix("sha256:") if isinstance(sha256, str) else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ArtifactError(
            f"sha256= must be 64 hex digits, got {sha256!r}",
            hint="take it from `sha256sum PATH/manifest.json`",
        )
    return digest


def _read_snapshot(root: Path, dir_fd: int, pin: str | None) -> dict[str, bytes]:
    def read(name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            if _replaced(root, dir_fd):
                raise _Swapped() from None
            return None
        except OSError as e:
            raise ArtifactError(f"cannot read {root / name}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            return f.read()

    raw = read(MANIFEST_FILE)
    if pin is not None and raw is not None and hashlib.sha256(raw).hexdigest() != pin:
        raise ArtifactError(
            f"the program's sha256 is {hashlib.sha256(raw).hexdigest()}, not the pinned {pin}",
            where=str(root),
            hint="the program changed since it was pinned: save it again or pin the new one "
            "only if you trust it",
        )
    manifest = _program_manifest(root, raw)
    out: dict[str, bytes] = {}
    for fname, digest in manifest["files"].items():
        data = read(fname)
        if data is None:
            raise ArtifactError(f"{root}: file {fname} is missing")
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(
                f"{root}: checksum of {fname} does not match the manifest (file changed or corrupt)",
                hint="save the program again (splice.save or `splice capture -o`)",
            )
        out[fname] = data
    return out


def _replaced(root: Path, dir_fd: int) -> bool:
    """Whether ``root`` no longer names the folder ``dir_fd`` has open."""
    try:
        now = os.stat(root)
    except OSError:
        return True
    then = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def _program_manifest(root: Path, raw: bytes | None) -> dict[str, Any]:
    """The manifest of a saved program, checked: format, and a file table that names
    program.ir and weights.safetensors and only plain file names inside the folder."""
    if raw is None:
        raise ArtifactError(
            f"{root} is not a saved splice program (no {MANIFEST_FILE})",
            hint="save programs with splice.save(program, path) or `splice capture -o`",
        )
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{root / MANIFEST_FILE} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{root / MANIFEST_FILE} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{root}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    files = manifest.get("files")
    allowed = {PROGRAM_FILE, WEIGHTS_FILE, SAMPLES_FILE}
    if not (
        isinstance(files, dict)
        and {PROGRAM_FILE, WEIGHTS_FILE} <= set(files)
        and set(files) <= allowed
        and all(isinstance(d, str) for d in files.values())
    ):
        raise ArtifactError(
            f"{root / MANIFEST_FILE}: 'files' must map {PROGRAM_FILE}, {WEIGHTS_FILE} "
            f"(and optionally {SAMPLES_FILE}) to their sha256",
            hint="save the program again (splice.save or `splice capture -o`)",
        )
    return manifest


def _input_order(text: str) -> list[str]:
    import re

    for line in text.splitlines():
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


def is_saved_program(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a saved program (a folder with a manifest and program)."""
    return (Path(path) / MANIFEST_FILE).is_file() and (Path(path) / PROGRAM_FILE).is_file()


__all__ = [
    "atomic_dir",
    "check_output_path",
    "is_saved_program",
    "load",
    "load_samples",
    "load_with_samples",
    "save",
    "sha256_file",
    "weights_for_safetensors",
]
