"""Run aarch64 artifacts on an x86 machine under ``qemu-aarch64`` (Debian ``qemu-user``).

TVM 0.27 has no cross-built runtime to install, but its aarch64 manylinux wheel *is* one:
an aarch64 CPython (Debian's ``python3.11-minimal:arm64`` and the libraries it links,
unpacked with ``dpkg -x``, no installation) plus ``pip install --target --platform
manylinux2014_aarch64 apache-tvm numpy`` gives a userland in which qemu's user-mode
emulation runs :mod:`splice.runtime.edge_runner` -- the same program that runs on a real
board -- against the artifact's ``main.so``. The root folder looks like::

    ROOT/sysroot/   the unpacked arm64 .debs (libc, libstdc++, python3.11, ...)
    ROOT/site/      numpy and apache-tvm for aarch64 (PYTHONPATH)

``prepare_root`` builds it (needs ``dpkg --add-architecture arm64 && apt-get update`` done
once by root; ``.ci/run`` does that), ``run_under_qemu`` runs an artifact. The root lives in
``$SPLICE_AARCH64_ROOT`` or ``~/.cache/splice/aarch64-root``. Also::

    python -m splice.runtime.edge setup [ROOT]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splice.errors import ArtifactError
from splice.runtime.artifact import read_manifest

PYTHON = "3.11"
TVM_REQUIREMENT = "apache-tvm==0.27.0"
# arm64 Debian packages the aarch64 CPython and TVM's runtime library need at run time.
PACKAGES = (
    "gcc-12-base",
    "libbz2-1.0",
    "libc6",
    "libcom-err2",
    "libcrypt1",
    "libdb5.3",
    "libexpat1",
    "libffi8",
    "libgcc-s1",
    "libgssapi-krb5-2",
    "libk5crypto3",
    "libkeyutils1",
    "libkrb5-3",
    "libkrb5support0",
    "liblzma5",
    "libmd0",
    "libncursesw6",
    "libnsl2",
    f"libpython{PYTHON}-minimal",
    f"libpython{PYTHON}-stdlib",
    "libreadline8",
    "libsqlite3-0",
    "libssl3",
    "libstdc++6",
    "libtinfo6",
    "libtirpc3",
    "libuuid1",
    "libzstd1",
    f"python{PYTHON}-minimal",
    "zlib1g",
)
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


class EdgeUnavailable(ArtifactError):
    """qemu-aarch64 or the aarch64 root is missing: the edge run cannot happen here."""


def default_root() -> Path:
    env = os.environ.get("SPLICE_AARCH64_ROOT")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "splice" / "aarch64-root"


def _python(root: Path) -> Path:
    return root / "sysroot" / "usr" / "bin" / f"python{PYTHON}"


def root_ready(root: Path | None = None) -> bool:
    root = root or default_root()
    return _python(root).is_file() and (root / "site" / "tvm").is_dir()


def why_unavailable(root: Path | None = None) -> str | None:
    """None when aarch64 artifacts can run here, else the reason (for skips and errors)."""
    root = root or default_root()
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (apt-get install qemu-user)"
    if not root_ready(root):
        return f"no aarch64 root at {root} (python -m splice.runtime.edge setup)"
    return None


def _run(cmd: Sequence[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise EdgeUnavailable(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
        )
    return proc


def prepare_root(
    root: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> Path:
    """Download and unpack the aarch64 userland into ``root`` (idempotent; atomic per part)."""
    root = root or default_root()
    say = progress or (lambda message: None)
    if root_ready(root):
        say(f"aarch64 root ready at {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    sysroot = root / "sysroot"
    if not _python(root).is_file():
        arches = _run(["dpkg", "--print-foreign-architectures"], "dpkg").stdout.split()
        if "arm64" not in arches:
            raise EdgeUnavailable(
                "dpkg does not know the arm64 architecture, so its packages cannot be downloaded",
                hint="as root, once: dpkg --add-architecture arm64 && apt-get update",
            )
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            say(f"downloading {len(PACKAGES)} arm64 packages")
            _run(
                ["apt-get", "download", *(f"{p}:arm64" for p in PACKAGES)],
                "apt-get download",
                cwd=tmp,
            )
            staging = Path(tmp) / "sysroot"
            for deb in sorted(Path(tmp).glob("*.deb")):
                _run(["dpkg", "-x", str(deb), str(staging)], f"unpacking {deb.name}")
            if sysroot.exists():
                shutil.rmtree(sysroot)
            staging.rename(sysroot)
    site = root / "site"
    if not (site / "tvm").is_dir():
        say(f"installing {TVM_REQUIREMENT} and numpy for aarch64 (about 400 MB unpacked)")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--target",
                    tmp,
                    *platforms,
                    "--only-binary=:all:",
                    "--python-version",
                    PYTHON,
                    "--implementation",
                    "cp",
                    TVM_REQUIREMENT,
                    "numpy",
                ],
                "pip install for aarch64",
            )
            if site.exists():
                shutil.rmtree(site)
            Path(tmp).rename(site)
            Path(tmp).mkdir()  # so that TemporaryDirectory's clean-up finds its folder
    say(f"aarch64 root ready at {root}")
    return root


@dataclass
class EdgeRun:
    outputs: list[np.ndarray]
    import_s: float  # importing TVM under emulation
    run_s: float  # one call of the model under emulation
    wall_s: float
    #: host-program decisions: ("branch", site, taken) and ("signature", index) entries
    trace: list[tuple] = field(default_factory=list)


def run_under_qemu(
    artifact: str | Path,
    inputs: Sequence[Any],
    *,
    root: Path | None = None,
    timeout: float = 900.0,
) -> EdgeRun:
    """Run an aarch64 artifact under qemu-aarch64 with ``inputs`` (numpy arrays or tensors)."""
    import time

    root = root or default_root()
    reason = why_unavailable(root)
    if reason:
        raise EdgeUnavailable(f"cannot run aarch64 artifacts here: {reason}")
    art = Path(artifact).resolve()
    manifest = read_manifest(art)
    triple = manifest.get("target", {}).get("triple", "")
    if not str(triple).startswith("aarch64"):
        raise ArtifactError(f"{art} was built for {triple}, not aarch64; run it with splice.load")
    specs = manifest["inputs"]
    if len(inputs) != len(specs):
        raise ArtifactError(f"{art} takes {len(specs)} inputs, got {len(inputs)}")
    shapes = [[i["shape"] for i in s["inputs"]] for s in manifest.get("signatures") or []]
    runner = Path(__file__).with_name("edge_runner.py")
    with tempfile.TemporaryDirectory(prefix="splice-edge-") as tmp:
        in_dir, out_dir = Path(tmp) / "in", Path(tmp) / "out"
        in_dir.mkdir()
        for spec, value in zip(specs, inputs):
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            if list(arr.shape) != list(spec["shape"]) and not shapes:
                raise ArtifactError(
                    f"input {spec['name']!r} has shape {list(arr.shape)}, the artifact expects "
                    f"{spec['shape']}"
                )
            np.save(in_dir / f"{spec['name']}.npy", arr)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(root / "site"),
            "PYTHONNOUSERSITE": "1",
            "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "1"),
        }
        cmd = [
            "qemu-aarch64",
            "-L",
            str(root / "sysroot"),
            str(_python(root)),
            str(runner),
            str(art),
            str(in_dir),
            str(out_dir),
        ]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ArtifactError(f"the aarch64 run of {art} took over {timeout:.0f} s") from e
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise ArtifactError(
                f"the aarch64 run of {art} under qemu failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-3000:]}"
            )
        outs = [np.load(out_dir / f"{o['name']}.npy") for o in manifest["outputs"]]
        timing = json.loads((out_dir / "timing.json").read_text())
        trace = json.loads((out_dir / "trace.json").read_text())
    return EdgeRun(outs, timing["import_s"], timing["run_s"], wall, [tuple(t) for t in trace])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m splice.runtime.edge")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="build the aarch64 root that runs artifacts under qemu")
    s.add_argument("root", nargs="?", type=Path, default=None)
    sub.add_parser("check", help="say whether aarch64 artifacts can run here")
    args = ap.parse_args(argv)
    if args.cmd == "setup":
        try:
            root = prepare_root(args.root, progress=lambda m: print(m, file=sys.stderr))
        except ArtifactError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(root)
        return 0
    reason = why_unavailable()
    print(reason or f"ready: qemu-aarch64 and {default_root()}")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EdgeRun", "EdgeUnavailable", "default_root", "prepare_root", "run_under_qemu"]
