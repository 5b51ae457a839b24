"""Compiled artifacts: a folder that ``splice.load`` turns back into a callable.

::

    model.artifact/
      manifest.json         format, versions, target, input/output specs, parts, sha256 of every file
      main.so               one shared library per part (TVM: a Relax VM executable)
      weights.safetensors   the program's weights by name (parameters are fed to the parts;
                            buffers and constants are also linked into the parts)
      program.ir            the program's text IR: the PyTorch reference for `splice run --check`
                            and `splice bench`
      samples.safetensors   optional sample inputs
      host.json             the host program that dispatches between split parts (programs
                            with branches, and SignatureSets: then program.s1.ir, ... hold
                            the text IR of the other signatures)

The folder is written to a temporary name and renamed into place. Loading checks every
checksum and that this machine can run the target (architecture and CPU features) and
raises :class:`~splice.errors.ArtifactError` otherwise. Nothing is unpickled: the parts are
native libraries, the weights safetensors, the rest JSON and text.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError
from splice.ir import meta as M
from splice.ir.serialize import check_files as _check_files
from splice.ir.serialize import read_manifest_file

FORMAT = "splice.artifact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.ir"
SAMPLES = "samples.safetensors"

# CPU features a host build may rely on; an artifact records those the build machine has.
CHECKED_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "amx_tile",
)


def spec_json(spec: M.Spec) -> dict[str, Any]:
    if not isinstance(spec, M.TensorSpec):
        raise ArtifactError(f"artifact inputs and outputs must be tensors, got {spec}")
    return {"shape": list(spec.shape), "dtype": M.dtype_name(spec.dtype)}


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    return read_manifest_file(
        root,
        missing=f"{root} is not a splice artifact (no {MANIFEST})",
        hint="create one with splice.compile(program, target, output=...) or `splice compile`",
    )


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    _check_files(root, manifest, hint="rebuild the artifact; never edit its files")


def is_foreign(manifest: dict[str, Any]) -> bool:
    """True if the artifact's CPU architecture is not this machine's (CUDA ones are not)."""
    target = manifest.get("target", {})
    arch = str(target.get("triple", "")).split("-")[0]
    return bool(arch) and arch != platform.machine() and target.get("kind") != "cuda"


def check_target(manifest: dict[str, Any]) -> None:
    """Raise ArtifactError unless this machine can run the artifact's target."""
    target = manifest.get("target", {})
    if target.get("kind") == "cuda":
        try:
            import tvm

            ok = tvm.cuda(0).exist
        except ImportError:
            ok = False
        if not ok:
            raise ArtifactError("this artifact was built for CUDA and no CUDA GPU is visible")
        return
    if is_foreign(manifest):
        raise ArtifactError(
            f"this artifact was built for {target.get('triple')} ({target.get('name')}); "
            f"this machine is {platform.machine()}",
            hint="run it on that machine, or under qemu-user (see docs/lowering.md)",
        )
    from splice.target import _cpu_flags

    have = set(_cpu_flags())
    missing = [f for f in manifest.get("required_features", []) if f not in have]
    if have and missing:
        raise ArtifactError(
            f"this machine lacks CPU features the artifact was compiled for: {', '.join(missing)}",
            hint="recompile on (or for) this machine",
        )


class CompiledModel:
    """A loaded artifact: call it with torch tensors or numpy arrays, positionally or by name.

    Returns the same kind it was given (numpy in, numpy out), one value for a one-output
    model and a tuple otherwise.
    """

    def __init__(self, path: str | Path, *, num_threads: int | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format") != FORMAT:
            raise ArtifactError(
                f"{self.path}: unknown format {self.manifest.get('format')!r}, expected {FORMAT!r}"
            )
        check_files(self.path, self.manifest)
        check_target(self.manifest)
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        from safetensors.torch import load_file

        weights = load_file(str(self.path / WEIGHTS))
        self.parts = {}
        for part in self.manifest["parts"]:
            if part.get("backend", "tvm") != "tvm":
                raise ArtifactError(f"part {part['name']}: unknown backend {part.get('backend')!r}")
            from splice.runtime.backends.tvm import TVMPart

            params = [weights[n] for n in part["params"]]
            self.parts[part["name"]] = TVMPart(
                self.path / part["library"],
                params,
                entry=part.get("entry", "main"),
                num_threads=num_threads,
            )
        self._main = self.parts[self.manifest["parts"][0]["name"]]
        self._host = None
        self.last_trace: list[tuple[str, bool]] = []
        if self.manifest.get("host"):
            import json

            from splice.runtime.host import HostProgram

            host = json.loads((self.path / self.manifest["host"]).read_text())
            self._host = HostProgram(host, dict(self.parts), weights)
        self._bounds = {
            i["name"]: int(i["index_bound"]) for i in self.manifest["inputs"] if "index_bound" in i
        }
        #: the input signatures this artifact accepts: one, or one per SignatureSet member
        self.signatures = [
            [(tuple(i["shape"]), M.dtype_from_name(i["dtype"])) for i in sig["inputs"]]
            for sig in self.manifest.get("signatures") or [{"inputs": self.manifest["inputs"]}]
        ]
        #: the signature the last run took (an index into ``signatures``)
        self.last_signature: int | None = None

    def run(self, *args: Any, **kwargs: Any) -> list[Any]:
        values = list(args)
        for n in self.input_names[len(args) :]:
            if n not in kwargs:
                raise TypeError(f"missing input {n!r} (inputs: {self.input_names})")
            values.append(kwargs.pop(n))
        if kwargs or len(values) != len(self.input_names):
            raise TypeError(
                f"expected inputs {self.input_names}, got {len(values)} and {sorted(kwargs)}"
            )
        as_numpy = any(type(v).__module__ == "numpy" for v in values)
        tensors = []
        for name, v in zip(self.input_names, values):
            t = torch.from_numpy(v) if type(v).__module__ == "numpy" else v
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"input {name!r} must be a tensor or numpy array, got {type(v).__name__}"
                )
            tensors.append(t)
        self.last_signature = self._signature(tensors)
        for name, t in zip(self.input_names, tensors):
            bound = self._bounds.get(name)
            if bound is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
                raise ArtifactError(
                    f"input {name!r} holds indices in [{int(t.min())}, {int(t.max())}], outside "
                    f"[0, {bound}) (the rows of the embedding table it indexes)",
                    hint="token ids must be below the vocabulary size",
                )
        if self._host is not None:
            outs = self._host(*tensors)
            self.last_trace = list(self._host.trace)
        else:
            outs = self._main(*tensors)
        return [o.numpy() for o in outs] if as_numpy else outs

    def _signature(self, tensors: Sequence[torch.Tensor]) -> int:
        have = [(tuple(t.shape), t.dtype) for t in tensors]
        for k, sig in enumerate(self.signatures):
            if have == sig:
                return k
        if len(self.signatures) == 1:
            for name, (shape, dtype), t in zip(self.input_names, self.signatures[0], tensors):
                if (tuple(t.shape), t.dtype) != (shape, dtype):
                    raise ArtifactError(
                        f"input {name!r} is {M.TensorSpec(tuple(t.shape), t.dtype)}, the "
                        f"artifact was compiled for {M.TensorSpec(shape, dtype)}",
                        hint="compile the program for this shape",
                    )
        text = "; ".join(
            "(" + ", ".join(str(M.TensorSpec(s, d)) for s, d in sig) + ")"
            for sig in self.signatures
        )
        got = "(" + ", ".join(str(M.TensorSpec(s, d)) for s, d in have) + ")"
        raise ArtifactError(
            f"inputs {got} match none of the signatures the artifact was compiled for: {text}",
            hint="capture the model with an example of this shape too "
            "(capture_dynamic(..., signatures=[...])) and compile again",
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outs = self.run(*args, **kwargs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run_named(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(zip(self.output_names, self.run(*args, **kwargs)))

    def reference(self):
        """The program this artifact was compiled from, run by PyTorch (the reference)."""
        return read_reference(self.path)

    def samples(self) -> list[tuple[torch.Tensor, ...]]:
        return read_samples(self.path, self.input_names)

    def __repr__(self) -> str:
        t = self.manifest.get("target", {})
        return f"CompiledModel({str(self.path)!r}, target={t.get('name')!r}, inputs={self.input_names})"


class Artifact:
    """A compiled artifact on disk (what :func:`splice.compile` returns)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    def load(self, *, num_threads: int | None = None) -> CompiledModel:
        return CompiledModel(self.path, num_threads=num_threads)

    def reference(self):
        """The program this artifact was compiled from, run by PyTorch (the reference)."""
        return read_reference(self.path)

    def samples(self) -> list[tuple[torch.Tensor, ...]]:
        return read_samples(self.path, [i["name"] for i in self.manifest["inputs"]])

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest.get("files", {}))

    def __repr__(self) -> str:
        return (
            f"Artifact({str(self.path)!r}, target={self.manifest.get('target', {}).get('name')!r})"
        )


def read_reference(path: Path):
    """The program an artifact was compiled from (a SignatureSet for several signatures)."""
    from safetensors.torch import load_file

    from splice.ir.parser import parse_ir
    from splice.ir.signatures import SignatureSet

    weights = load_file(str(path / WEIGHTS))
    sigs = read_manifest(path).get("signatures")
    if not sigs:
        return parse_ir((path / PROGRAM).read_text(), weights)
    members = []
    for sig in sigs:
        text = (path / sig["program"]).read_text()
        members.append(parse_ir(text, {w: weights[w] for w in _weight_names(text)}))
    return SignatureSet(members, name=read_manifest(path).get("program"))


def _weight_names(text: str) -> list[str]:
    return [line.split()[1][1:] for line in text.splitlines() if line.startswith("weight @")]


def read_samples(path: Path, names: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
    from safetensors.torch import load_file

    f = path / SAMPLES
    if not f.is_file():
        return []
    flat = load_file(str(f))
    out: list[tuple[torch.Tensor, ...]] = []
    while all(f"{len(out)}.{n}" in flat for n in names):
        out.append(tuple(flat[f"{len(out)}.{n}"] for n in names))
    return out


def write_samples(
    path: Path, names: Sequence[str], samples: Sequence[Sequence[torch.Tensor]]
) -> None:
    from safetensors.torch import save_file

    flat = {
        f"{i}.{n}": t.detach().contiguous().cpu()
        for i, s in enumerate(samples)
        for n, t in zip(names, s)
    }
    save_file(flat, str(path))


__all__ = ["FORMAT", "Artifact", "CompiledModel", "check_target", "is_foreign", "read_manifest"]
