"""Compiled artifacts: a folder that ``splice.load`` turns back into a callable.

::

    model.artifact/
      manifest.json         format, versions, target, input/output specs, parts, sha256 of every file
      main.so               one shared library per part (TVM: a Relax VM executable), or
      main.onnx             one ONNX model per part (backend "onnxruntime": its large
                            initializers are external data inside weights.safetensors)
      weights.safetensors   the program's weights by name (parameters are fed to the parts;
                            buffers and constants are also linked into the parts)
      program.ir            the program's text IR: the PyTorch reference for `splice run --check`
                            and `splice bench`
      samples.safetensors   optional sample inputs
      host.json             the host program that dispatches between split parts (programs
                            with branches, and SignatureSets: then program.s1.ir, ... hold
                            the text IR of the other signatures)

A one-part TVM artifact may update some inputs in place (its part's ``inplace_inputs``:
a decode step's KV cache, see :mod:`splice.runtime.kernels.tvm_slot_write`).
:meth:`CompiledModel.run` copies those inputs first, so a call never changes its
arguments; :meth:`CompiledModel.run_donated` hands them over instead (no copy: they are
overwritten and the outputs may share their memory).

The folder is written to a temporary name and renamed into place. Nothing is unpickled:
the parts are native libraries, the weights safetensors, the rest JSON and text.

An artifact is native code, so loading trusts nothing in it that it can check first, and
raises :class:`~splice.errors.ArtifactError` (never a crash, KeyError or TVM error) on:

- a manifest that breaks the schema (:func:`validate_manifest` names the field);
- a file that is not a plain file of the folder itself (absolute paths, ``..``, folders,
  symbolic links), is missing, or does not have its recorded sha256;
- a target this machine cannot run (architecture, CPU features);
- a manifest whose output structure (``output_tree``, ``variants``: see
  :mod:`splice.ir.outputs`) names outputs it lacks or specs they do not have, or whose
  variant index a run returns out of range;
- a manifest that disagrees with ``program.ir`` (inputs, outputs, output structure,
  weights) or an integer
  input that feeds an embedding without an ``index_bound`` at most the table's rows
  (recomputed from ``program.ir``; TVM's ``take`` reads out of bounds otherwise);
- a library that is not a complete ELF shared object for the target (a truncated one would
  fault in the loader), that is not bound to this artifact (``compile`` appends to each
  library the sha256 of the program files it was compiled from: a library copied from
  another artifact names other files), or whose own parameter checks disagree with the
  manifest's inputs and weights (read from the Relax executable before its first call);
- an ONNX model (onnxruntime parts) that does not parse as ONNX, is not bound to this
  artifact (the same sha256 list, in its ``metadata_props``), reads external data from
  anywhere but ``weights.safetensors`` or past its end, or whose inputs and outputs are
  not the manifest's (:func:`splice.runtime.backends.ort.check_model`).

``sha256=`` (:func:`splice.load`, :class:`CompiledModel`) pins a whole artifact: it is the
sha256 of ``manifest.json`` (``Artifact.sha256``, ``sha256sum manifest.json``), which lists
every other file's sha256; a mismatch is refused before anything else is read. None of
this makes a hostile artifact safe: a consistent forgery of every file passes every check,
so load only artifacts you trust, and pin them. The file-level checks are shared with the
edge runner (:mod:`splice.runtime.edge_runner`, which cannot import splice).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError, SpliceError
from splice.ir import meta as M
from splice.ir.output_tree import unflatten
from splice.ir.parser import parse_ir
from splice.ir.signatures import SignatureSet
from splice.runtime import edge_runner as E
from splice.runtime.host import HostProgram, validate_host
from splice.runtime.index_bounds import index_bounds
from splice.target import cpu_flags

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


def _manifest_bytes(root: Path) -> bytes:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"{root} is not a splice artifact (no {MANIFEST})",
            hint="create one with splice.compile(program, target, output=...) or `splice compile`",
        )
    try:
        return mpath.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{mpath} cannot be read: {e.strerror}") from None


def _parse_manifest(root: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # too deep: RecursionError
        raise ArtifactError(f"{root / MANIFEST} is not valid JSON: {e}", hint=E.REBUILD) from None
    if not isinstance(manifest, dict):
        raise ArtifactError(
            f"{MANIFEST} must be a JSON object, got {E.kind_of(manifest)}",
            where=str(root),
            hint=E.REBUILD,
        )
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``path/manifest.json`` as a dict (of an artifact or a saved program; not validated).

    ArtifactError if it is missing, not JSON, or not a JSON object."""
    root = Path(path)
    return _parse_manifest(root, _manifest_bytes(root))


def _error(e: E.Invalid, root: Path) -> ArtifactError:
    return ArtifactError(e.message, where=str(root), hint=e.hint)


def validate_manifest(manifest: Any, root: str | Path = ".") -> dict[str, Any]:
    """``manifest`` if it has the schema of an artifact's manifest; otherwise one
    ArtifactError naming the first bad field (its path, e.g. ``inputs[0].shape``)."""
    try:
        return E.check_manifest(manifest)
    except E.Invalid as e:
        raise _error(e, Path(root)) from None


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is a plain file of ``root`` with its recorded sha256."""
    try:
        E.check_files(root, manifest)
    except E.Invalid as e:
        raise _error(e, root) from None


def check_pin(root: Path, data: bytes, sha256: str | None) -> None:
    """Raise ArtifactError unless ``sha256(data)`` (the manifest's bytes) is ``sha256``."""
    if sha256 is None:
        return
    if not isinstance(sha256, str) or not re.fullmatch(r"(sha256:)?[0-9a-fA-F]{64}", sha256):
        raise ArtifactError(
            f"sha256= must be 64 hex digits, got {sha256!r}",
            hint="take it from Artifact.sha256 or `sha256sum ART/manifest.json`",
        )
    have, want = hashlib.sha256(data).hexdigest(), sha256.lower().removeprefix("sha256:")
    if have != want:
        raise ArtifactError(
            f"the artifact's sha256 is {have}, not the pinned {want}",
            where=str(root),
            hint="the artifact changed since it was pinned: rebuild it or pin the new one "
            "only if you trust it",
        )


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
    have = set(cpu_flags())
    missing = [f for f in manifest.get("required_features", []) if f not in have]
    if have and missing:
        raise ArtifactError(
            f"this machine lacks CPU features the artifact was compiled for: {', '.join(missing)}",
            hint="recompile on (or for) this machine",
        )


class CompiledModel:
    """A loaded artifact: call it with torch tensors or numpy arrays, positionally or by name.

    Returns the same kind it was given (numpy in, numpy out), one value for a one-output
    model and a tuple otherwise. ``sha256``: the artifact's pin (:attr:`Artifact.sha256`);
    loading refuses an artifact whose manifest has another one. Every check of the module
    docstring runs here, before any library is called.
    """

    def __init__(
        self, path: str | Path, *, num_threads: int | None = None, sha256: str | None = None
    ):
        self.path = Path(path)
        data = _manifest_bytes(self.path)
        check_pin(self.path, data, sha256)
        #: the sha256 of manifest.json: what ``sha256=`` pins
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.manifest = validate_manifest(_parse_manifest(self.path, data), self.path)
        check_files(self.path, self.manifest)
        check_target(self.manifest)
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        weights = _load_weights(self.path)
        check_against_program(self.path, self.manifest, weights)
        self.parts = {
            part["name"]: _load_part(self.path, self.manifest, part, weights, num_threads)
            for part in self.manifest["parts"]
        }
        self._main = self.parts[self.manifest["parts"][0]["name"]]
        #: inputs the library writes in place (copied by :meth:`run`, donated by
        #: :meth:`run_donated`)
        self.inplace_inputs = list(self.manifest["parts"][0].get("inplace_inputs", []))
        self._inplace = {self.input_names.index(n) for n in self.inplace_inputs}
        self._host = None
        self.last_trace: list[tuple[str, bool]] = []
        if self.manifest.get("host"):
            host = _read_json(self.path, self.manifest["host"])
            arity = {
                p["name"]: (
                    len(p["inputs"]) if "inputs" in p else None,
                    len(p["outputs"]) if "outputs" in p else None,
                )
                for p in self.manifest["parts"]
            }
            validate_host(host, arity, weights, len(self.input_names), where=str(self.path))
            self._host = HostProgram(host, dict(self.parts), weights)
        self._bounds = {
            i["name"]: int(i["index_bound"]) for i in self.manifest["inputs"] if "index_bound" in i
        }
        #: the input signatures this artifact accepts: one, or one per SignatureSet member
        self.signatures = [
            [(tuple(i["shape"]), M.dtype_from_name(i["dtype"])) for i in sig["inputs"]]
            for sig in self.manifest.get("signatures") or [{"inputs": self.manifest["inputs"]}]
        ]
        self._outputs = [
            [(tuple(o["shape"]), M.dtype_from_name(o["dtype"])) for o in sig["outputs"]]
            for sig in self.manifest.get("signatures") or [{"outputs": self.manifest["outputs"]}]
        ]
        #: the signature the last run took (an index into ``signatures``)
        self.last_signature: int | None = None

    def _inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        """The positional and named inputs in the artifact's order; ArtifactError naming
        what was expected and what came when they do not fit."""
        expected = f"{len(self.input_names)} inputs ({', '.join(self.input_names)})"
        if len(args) > len(self.input_names):
            raise ArtifactError(
                f"expected {expected}, got {len(args)} positional inputs",
                where=str(self.path),
            )
        unknown = sorted(set(kwargs) - set(self.input_names))
        twice = sorted(set(kwargs) & set(self.input_names[: len(args)]))
        missing = [n for n in self.input_names[len(args) :] if n not in kwargs]
        if unknown or twice or missing:
            what = "; ".join(
                text
                for text in (
                    f"unknown inputs {unknown}" if unknown else "",
                    f"inputs given twice {twice}" if twice else "",
                    f"missing inputs {missing}" if missing else "",
                )
                if text
            )
            raise ArtifactError(f"expected {expected}, got {what}", where=str(self.path))
        return list(args) + [kwargs[n] for n in self.input_names[len(args) :]]

    def run(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The flat outputs for the given inputs (positional or by name); the inputs are
        never changed."""
        return self._run(self._inputs(args, kwargs), donate=False)

    def run_donated(self, *args: Any) -> list[Any]:
        """:meth:`run` on positional inputs, donating the ones the artifact updates in
        place (:attr:`inplace_inputs`): they are overwritten, and outputs may share their
        memory, so the caller must not read them afterwards except through the outputs.
        The generation loop's cache takes this path: one KV-cache slot is written per
        step instead of the cache being copied."""
        return self._run(self._inputs(args, {}), donate=True)

    def _run(self, values: list[Any], *, donate: bool) -> list[Any]:
        as_numpy = any(type(v).__module__ == "numpy" for v in values)
        tensors = []
        for name, v in zip(self.input_names, values):
            t = torch.from_numpy(v) if type(v).__module__ == "numpy" else v
            if not isinstance(t, torch.Tensor):
                raise ArtifactError(
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
            if self._inplace and not donate:
                tensors = [t.clone() if i in self._inplace else t for i, t in enumerate(tensors)]
            outs = self._main(*tensors)
        self._check_outputs(outs)
        return [o.numpy() for o in outs] if as_numpy else outs

    def _check_outputs(self, outs: Sequence[torch.Tensor]) -> None:
        want = self._outputs[self.last_signature or 0]
        have = [(tuple(o.shape), o.dtype) for o in outs]
        if have != want:
            text = ", ".join(str(M.TensorSpec(s, d)) for s, d in have)
            wanted = ", ".join(str(M.TensorSpec(s, d)) for s, d in want)
            raise ArtifactError(
                f"the compiled library returned ({text}), the manifest says ({wanted})",
                where=str(self.path),
                hint=E.REBUILD,
            )

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
        """Run the artifact and return what the model returns: its output structure where
        the manifest records one (:meth:`unflatten`), else one value or a tuple."""
        return self.unflatten(self.run(*args, **kwargs))

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        """The model's own output structure from the flat ``outputs`` of :meth:`run`: the
        manifest's ``output_tree`` (constants beside the tensors) or, for a program whose
        structure depends on its path, the ``variants`` entry the run's variant index names
        (the padded structure with ``pad``). Without either: one value or a tuple."""

        def error(message: str, hint: str | None) -> ArtifactError:
            return ArtifactError(message, where=str(self.path), hint=hint or E.REBUILD)

        return unflatten(outputs, self.output_names, self.manifest, error=error)

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


def _read_json(root: Path, name: str) -> Any:
    try:
        return json.loads(E.inside(root, name).read_text())
    except E.Invalid as e:
        raise _error(e, root) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{name} is not valid JSON: {e}", where=str(root)) from None


def _load_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(root / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise ArtifactError(
            f"{WEIGHTS} cannot be read: {type(e).__name__}: {e}", where=str(root), hint=E.REBUILD
        ) from None


def _programs(root: Path, manifest: dict[str, Any], weights: dict[str, torch.Tensor]) -> list:
    """The Programs of ``program.ir`` (and of each further signature), parsed."""
    files = [s["program"] for s in manifest.get("signatures") or []] or [PROGRAM]
    out = []
    for f in files:
        text = (root / f).read_text()
        names = _weight_names(text)
        missing = [w for w in names if w not in weights]
        if missing:
            raise ArtifactError(
                f"{f} uses weights {missing[:5]} that {WEIGHTS} lacks", where=str(root)
            )
        try:
            out.append(parse_ir(text, {w: weights[w] for w in names}))
        except SpliceError as e:
            raise ArtifactError(
                f"{f} is not a valid program: {e.message}", where=str(root), hint=E.REBUILD
            ) from None
    return out


def _specs_of(names: Sequence[str] | None, specs: Sequence[M.Spec]) -> list[dict[str, Any]]:
    out = [M.spec_json(s) for s in specs]
    return [{"name": n, **s} for n, s in zip(names, out)] if names is not None else out


def check_against_program(
    root: Path, manifest: dict[str, Any], weights: dict[str, torch.Tensor]
) -> None:
    """The manifest agrees with the program(s) it was compiled from: inputs, outputs,
    signatures, the weights its parts read, and an ``index_bound`` at most the embedding's
    rows on every integer input that indexes one (recomputed as compile does)."""
    programs = _programs(root, manifest, weights)
    first = programs[0]
    strip = [{k: v for k, v in i.items() if k != "index_bound"} for i in manifest["inputs"]]
    checks = [
        ("inputs", strip, _specs_of(first.input_names, first.input_specs)),
        ("outputs", manifest["outputs"], _specs_of(first.output_names, first.output_specs)),
    ]
    for k, (sig, p) in enumerate(zip(manifest.get("signatures") or [], programs)):
        checks.append((f"signatures[{k}].inputs", sig["inputs"], _specs_of(None, p.input_specs)))
        checks.append((f"signatures[{k}].outputs", sig["outputs"], _specs_of(None, p.output_specs)))
    if manifest.get("signatures") and len(manifest["signatures"]) != len(programs):
        checks.append(("signatures", len(manifest["signatures"]), len(programs)))
    for key in ("output_tree", "variants"):
        checks.append((key, manifest.get(key), first.attrs.get(key)))
    for field, have, want in checks:
        if have != want:
            raise ArtifactError(
                f"manifest.json: field {field!r} says {have}, the program it was compiled from "
                f"({PROGRAM}) has {want}",
                where=str(root),
                hint=E.REBUILD,
            )
    known = {w for p in programs for w in p.weight_kinds}
    for part in manifest["parts"]:
        unknown = [w for w in part["params"] if w not in known]
        if unknown:
            raise ArtifactError(
                f"manifest.json: part {part['name']!r} reads weights {unknown[:5]} that the "
                f"program does not have",
                where=str(root),
                hint=E.REBUILD,
            )
    rows: dict[str, int] = {}
    for p in programs:
        for name, b in index_bounds(p).items():
            rows[name] = min(rows.get(name, b["index_bound"]), b["index_bound"])
    for spec in manifest["inputs"]:
        need, bound = rows.get(spec["name"]), spec.get("index_bound")
        if need is not None and (bound is None or bound > need):
            have = "no index_bound" if bound is None else f"index_bound {bound}"
            raise ArtifactError(
                f"manifest.json: input {spec['name']!r} indexes an embedding of {need} rows "
                f"but has {have} (out-of-range ids would read out of bounds)",
                where=str(root),
                hint=E.REBUILD,
            )


def _load_part(
    root: Path,
    manifest: dict[str, Any],
    part: dict[str, Any],
    weights: dict[str, torch.Tensor],
    num_threads: int | None,
) -> Any:
    """One part's library, loaded after the checks that need no call into it: complete ELF,
    bound to this artifact, and its own parameter checks agree with the manifest (an ONNX
    Runtime part: :func:`_load_ort_part`)."""
    if part.get("backend") == "onnxruntime":
        return _load_ort_part(root, manifest, part, num_threads)
    # the backend is imported when a library is loaded (seconds to import; see compile.py)
    from splice.runtime.backends.tvm import TVMPart, require_tvm

    tvm = require_tvm()
    name, entry = part["library"], part.get("entry", "main")
    missing = [w for w in part["params"] if w not in weights]
    if missing:
        raise ArtifactError(
            f"part {part['name']!r} reads weights {missing[:5]} that {WEIGHTS} lacks",
            where=str(root),
            hint=E.REBUILD,
        )
    params = [weights[w] for w in part["params"]]
    specs = part["inputs"] if "inputs" in part else manifest["inputs"]
    try:
        path = E.check_library(root, manifest, part)
        try:
            lib = tvm.runtime.load_module(str(path))
            stats = str(lib["stats"]()) if lib.implements_function("stats") else ""
        except Exception as e:
            raise E.Invalid(
                f"{name} cannot be loaded: {type(e).__name__}: {_last_line(e)}"
            ) from None
        E.check_signature(
            name,
            stats,
            entry,
            [(list(s["shape"]), s["dtype"]) for s in specs],
            [(list(w.shape), M.dtype_name(w.dtype)) for w in params],
        )
    except E.Invalid as e:
        raise _error(e, root) from None
    try:
        compiled = TVMPart(path, params, entry=entry, num_threads=num_threads)
        arity = compiled.vm._get_function_arity(entry)
    except Exception as e:  # TVM's own checks of the weights' count, shapes and dtypes
        raise ArtifactError(
            f"part {part['name']!r}: {name} does not accept the manifest's weights: "
            f"{type(e).__name__}: {_last_line(e)}",
            where=str(root),
            hint=E.REBUILD,
        ) from None
    if arity != len(specs) + len(compiled.params):
        raise ArtifactError(
            f"part {part['name']!r}: {entry} of {name} takes {arity} arguments, the manifest "
            f"gives {len(specs)} inputs and {len(compiled.params)} weights",
            where=str(root),
            hint=E.REBUILD,
        )
    return compiled


def _load_ort_part(
    root: Path, manifest: dict[str, Any], part: dict[str, Any], num_threads: int | None
) -> Any:
    """One part's ONNX model in an ONNX Runtime session, after the checks of
    :func:`splice.runtime.backends.ort.check_model` (parses as ONNX, bound to this artifact,
    external data only inside ``weights.safetensors``, the manifest's inputs and outputs)."""
    from splice.runtime.backends.ort import ORTPart, check_model, intra_op_threads, require_ort

    require_ort()
    threads = intra_op_threads(num_threads)  # a bad count is the caller's error, not the file's
    name = part["model"]
    if part["params"]:
        raise ArtifactError(
            f"part {part['name']!r}: an onnxruntime part reads its weights from its model, "
            f"but the manifest lists run-time weights {part['params'][:5]}",
            where=str(root),
            hint=E.REBUILD,
        )
    try:
        E.inside(root, name)
    except E.Invalid as e:
        raise _error(e, root) from None
    path = check_model(
        root,
        name,
        part=E.library_owner(manifest, name),
        bound=E.bound_files(manifest),
        weights_file=WEIGHTS,
        inputs=part["inputs"] if "inputs" in part else manifest["inputs"],
        outputs=part["outputs"] if "outputs" in part else manifest["outputs"],
    )
    try:
        return ORTPart(path, num_threads=threads)
    except Exception as e:  # onnxruntime's own checks of the model
        raise ArtifactError(
            f"part {part['name']!r}: onnxruntime cannot load {name}: "
            f"{type(e).__name__}: {_last_line(e)}",
            where=str(root),
            hint=E.REBUILD,
        ) from None


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


class Artifact:
    """A compiled artifact on disk (what :func:`splice.compile` returns).

    The manifest is read and validated against the schema here; files, libraries and the
    program are checked when it is loaded (:meth:`load`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = _manifest_bytes(self.path)
        #: sha256 of manifest.json, which lists every file's sha256: pass it to
        #: ``splice.load(path, sha256=...)`` to load exactly this artifact
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.manifest = validate_manifest(_parse_manifest(self.path, data), self.path)

    def load(self, *, num_threads: int | None = None, sha256: str | None = None) -> CompiledModel:
        return CompiledModel(self.path, num_threads=num_threads, sha256=sha256)

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


__all__ = [
    "FORMAT",
    "Artifact",
    "CompiledModel",
    "check_pin",
    "check_target",
    "is_foreign",
    "read_manifest",
    "validate_manifest",
]
