"""compile(program, target) -> Artifact; load(path) -> a callable.

``compile`` verifies the program, runs the exact cleanup pipeline (``cse``,
``fold-constants``, ``dce``) so that backends see constant masks folded, lowers it with a
backend and writes an :mod:`artifact <splice.runtime.artifact>` folder atomically. The
backends (:data:`BACKENDS`): ``"tvm"`` (the CPU and edge path: a tuned ``.so`` per part) and
``"onnxruntime"`` (an ``.onnx`` model per part, run by ONNX Runtime on this machine; its
weights are read from the artifact's ``weights.safetensors``, so they are stored once; see
:mod:`splice.runtime.backends.ort`).

The backend modules (:mod:`splice.runtime.backends`) are imported where a program is
lowered, not at the top: they bring their schedules, tuners and kernels (seconds to
import), and ``import splice`` stays fast and works without TVM.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError, LoweringError
from splice.ir import meta as M
from splice.ir import serialize
from splice.ir.host_steps import has_control_flow, is_split
from splice.ir.output_tree import TREE_ATTR, VARIANTS_ATTR
from splice.ir.printer import print_ir
from splice.ir.program import Program, build_graph_module
from splice.ir.serialize import atomic_dir, check_output_path, sha256_file, weights_for_safetensors
from splice.ir.signatures import SignatureSet
from splice.ir.verify import verify
from splice.passes import parse_pipeline
from splice.passes.branches import split_program
from splice.passes.lowrank import set_rank
from splice.runtime import edge_runner as E
from splice.runtime import host as H
from splice.runtime.artifact import (
    CHECKED_FEATURES,
    FORMAT,
    MANIFEST,
    PROGRAM,
    SAMPLES,
    WEIGHTS,
    Artifact,
    CompiledModel,
    check_pin,
    is_foreign,
    write_samples,
)
from splice.runtime.index_bounds import index_bounds, merged_index_bounds
from splice.target import Target, cpu_flags, get_target
from splice.version import __version__

PREPARE_PIPELINE = "cse,fold-constants,dce"
BACKENDS = ("tvm", "onnxruntime")


def compile(
    program: Program | SignatureSet,
    target: Target | str = "host",
    *,
    tune: int = 0,
    output: str | Path | None = None,
    backend: str = "tvm",
    prepare: bool = True,
    fast_math: bool = True,
    samples: Sequence[Sequence[torch.Tensor]] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    lowrank_rank: float | int | dict[str, int] | None = None,
    overwrite: bool = False,
    rpc: str | None = None,
) -> Artifact:
    """Compile ``program`` for ``target`` into an artifact folder (``output``, or a new temp dir).

    ``output`` must not exist, or be an empty folder or a splice program or artifact;
    ``overwrite=True`` replaces anything else (checked before compiling; see
    :func:`splice.ir.serialize.atomic_dir`).

    ``tune``: 0 never tunes: it uses the on-disk databases' decisions where they have them
    and the hand rules elsewhere; N > 0 also runs N MetaSchedule trials for each matmul
    kernel the database does not have N trials of yet, measures the hand rules the same
    way, and keeps the faster (see docs/lowering.md, "Tuning"). ``rpc``
    (``"HOST:PORT:KEY"``) measures on the devices registered under KEY with that TVM RPC
    tracker instead of in this process (how to tune for ``aarch64-linux``). ``fast_math`` uses TVM's
    polynomial erf/tanh/exp (vectorisable; within a few ULP of float32). ``lowrank_rank``
    lowers the rank of the program's ``lowrank_linear`` layers before lowering (a fraction of
    each stored rank, one rank for all, or ``{layer: rank}``; see
    :func:`splice.passes.lowrank.set_rank`): the stored directions are ordered by importance,
    so this needs no refactoring, and the artifact reads only the kept prefix.

    A program with branches, or a :class:`~splice.ir.signatures.SignatureSet` (one program
    per input shape), compiles into parts and a host program that dispatches between them.

    ``backend="onnxruntime"`` exports each part to ONNX and runs it with ONNX Runtime
    (graph optimisations on); it compiles only for ``"host"`` (ORT picks its CPU kernels
    when the model is loaded), and the TVM options ``tune`` and ``rpc`` do not apply to it
    (``fast_math`` is ignored).
    """

    if backend not in BACKENDS:
        raise LoweringError(f"unknown backend {backend!r}", hint=f"backends: {', '.join(BACKENDS)}")
    if isinstance(target, str):
        target = get_target(target)
    if backend == "onnxruntime":
        _check_ort_options(target, tune, rpc)
    if not isinstance(tune, int) or tune < 0:
        raise LoweringError(f"tune must be a number of trials >= 0, got {tune!r}")
    if rpc is not None:
        from splice.runtime.backends.tvm_metaschedule import RpcSpec

        rpc = str(RpcSpec.parse(rpc))  # a bad address fails before any work
    if output is not None:
        check_output_path(output, overwrite=overwrite)
    members = list(program) if isinstance(program, SignatureSet) else [program]
    for p in members:
        verify(p)
    if isinstance(program, SignatureSet) or has_control_flow(program) or is_split(program):
        if lowrank_rank is not None:
            raise LoweringError("lowrank_rank= is not supported for programs with branches yet")
        return _compile_split(
            program, target, tune=tune, output=output, prepare=prepare, fast_math=fast_math,
            samples=samples, progress=progress, overwrite=overwrite, rpc=rpc, backend=backend,
        )  # fmt: skip
    if lowrank_rank is not None:
        program = set_rank(program, lowrank_rank)
    if prepare:
        program = parse_pipeline(PREPARE_PIPELINE).run(program).program
    if backend == "onnxruntime":
        return _compile_ort(
            program, target, output=output, samples=samples, progress=progress,
            overwrite=overwrite,
            options={"prepare": PREPARE_PIPELINE if prepare else None, "lowrank_rank": lowrank_rank},
        )  # fmt: skip
    from splice.runtime.backends import tvm as tvm_backend

    t0 = time.perf_counter()
    ex, param_names, report = tvm_backend.lower(
        program, target, trials=tune, fast_math=fast_math, progress=progress, rpc=rpc,
        inplace=True,
    )  # fmt: skip
    output = _output_path(output, program)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        tvm_backend.export_library(ex, tmp / "main.so", target, report.objects)
        files = ["main.so", *_write_program_files(tmp, program, samples)]
        bounds = index_bounds(program)
        report.seconds["total"] = time.perf_counter() - t0
        manifest = _manifest(
            program,
            target,
            index_bounds=bounds,
            parts=[
                {
                    "name": "main",
                    "backend": backend,
                    "library": "main.so",
                    "entry": "main",
                    "params": param_names,
                    **({"inplace_inputs": report.inplace_inputs} if report.inplace_inputs else {}),
                }
            ],
            host=None,
            options={
                "tune": tune,
                "prepare": PREPARE_PIPELINE if prepare else None,
                "fast_math": fast_math,
                "lowrank_rank": lowrank_rank,
            },
            lowering=report.to_json(),
        )
        _write_manifest(tmp, manifest, files)
    return Artifact(output)


def _check_ort_options(target: Target, tune: int, rpc: str | None) -> None:
    """LoweringError for what the onnxruntime backend cannot do: another target than the
    host, tuning, an RPC tracker."""
    if target.name != "host":
        raise LoweringError(
            f"backend 'onnxruntime' compiles for the target 'host' only, not {target.name!r}",
            hint="ONNX Runtime picks its CPU kernels on the machine that loads the model: "
            "compile for 'host' (the .onnx runs wherever onnxruntime does), or use "
            f"backend='tvm' for {target.name!r}",
        )
    if tune or rpc is not None:
        raise LoweringError(
            "tune= and rpc= tune TVM kernels; backend 'onnxruntime' has nothing to tune",
            hint="drop tune/rpc, or compile with backend='tvm'",
        )


def _compile_ort(
    program: Program,
    target: Target,
    *,
    output: str | Path | None,
    samples: Sequence[Sequence[torch.Tensor]] | None,
    progress: Callable[[str, int, int], None] | None,
    overwrite: bool,
    options: dict[str, Any],
) -> Artifact:
    """A branch-free (prepared) program as one ONNX Runtime part, ``main.onnx``."""
    from splice.runtime.backends import ort as ort_backend

    say = progress or (lambda message, done, total: None)
    t0 = time.perf_counter()
    say("exporting to ONNX", 0, 1)
    model = ort_backend.lower(program)
    seconds = {"export": time.perf_counter() - t0}
    output = _output_path(output, program)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        files = _write_program_files(tmp, program, samples)
        external = ort_backend.write_model(model, tmp / "main.onnx", tmp / WEIGHTS)
        files.insert(0, "main.onnx")
        seconds["total"] = time.perf_counter() - t0
        manifest = _manifest(
            program,
            target,
            backend="onnxruntime",
            index_bounds=index_bounds(program),
            parts=[{"name": "main", "backend": "onnxruntime", "model": "main.onnx", "params": []}],
            host=None,
            options=options,
            lowering={
                "seconds": seconds,
                "opset": _opset(model),
                "external_initializers": len(external),
            },
        )
        _write_manifest(tmp, manifest, files)
    say("exported to ONNX", 1, 1)
    return Artifact(output)


def _opset(model: Any) -> int | None:
    """The default-domain opset of an ONNX model."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _output_path(output: str | Path | None, program: Program | SignatureSet) -> Path:
    if output is None:
        return Path(tempfile.mkdtemp(prefix="splice-")) / f"{program.name}.artifact"
    return Path(output)


def _write_program_files(
    tmp: Path, program: Program | SignatureSet, samples: Sequence[Sequence[torch.Tensor]] | None
) -> list[str]:
    """Weights, the program's text IR and the samples, into the artifact folder ``tmp``.

    A SignatureSet writes one text IR per member (:func:`_member_file`) and the union of
    their weights (their names are disjoint or name the same tensor)."""
    from safetensors.torch import save_file

    members = list(program) if isinstance(program, SignatureSet) else [program]
    weights: dict[str, torch.Tensor] = {}
    files = [WEIGHTS]
    for i, p in enumerate(members):
        for w, t in weights_for_safetensors(p).items():
            weights.setdefault(w, t)
        (tmp / _member_file(i)).write_text(print_ir(p, locations=True))
        files.append(_member_file(i))
    save_file(weights, str(tmp / WEIGHTS))
    if samples:
        write_samples(tmp / SAMPLES, program.input_names, samples)
        files.append(SAMPLES)
    return files


def _manifest(
    program: Program,
    target: Target,
    *,
    parts: list[dict[str, Any]],
    host: str | None,
    options: dict[str, Any],
    lowering: dict[str, Any],
    index_bounds: dict[str, dict[str, int]] | None = None,
    backend: str = "tvm",
) -> dict[str, Any]:
    """The manifest of an artifact (``files`` is added by :func:`_write_manifest`)."""
    bounds = index_bounds or {}
    required: list[str] = []
    if backend == "onnxruntime":  # ORT chooses its kernels by the CPU it runs on
        from splice.runtime.backends.ort import backend_versions

        versions, target_json = backend_versions(), target.to_json()
    else:
        import tvm

        from splice.runtime.backends.tvm import tvm_target_dict

        versions = {"tvm_version": tvm.__version__}
        target_json = {**target.to_json(), "tvm": tvm_target_dict(target)}
    if backend == "tvm" and target.kind != "cuda" and target.triple.startswith("x86_64"):
        # host: what this CPU has (LLVM may use all of it); a named ISA level: its features
        have = set(cpu_flags()) if target.name == "host" else set(target.features)
        required = [f for f in CHECKED_FEATURES if f in have]
    return {
        "format": FORMAT,
        "splice_version": __version__,
        "backend": backend,
        **versions,
        "program": program.name,
        "target": target_json,
        "required_features": required,
        "inputs": [
            {"name": n, **M.spec_json(s), **bounds.get(n, {})}
            for n, s in zip(program.input_names, program.input_specs)
        ],
        "outputs": [
            {"name": n, **M.spec_json(s)}
            for n, s in zip(program.output_names, program.output_specs)
        ],
        "parts": parts,
        "host": host,
        "options": options,
        "lowering": lowering,
        **_output_structure(program),
    }


def _output_structure(program: Program) -> dict[str, Any]:
    """The manifest's ``output_tree`` and ``variants`` (the program's recorded output
    structure, see :mod:`splice.ir.output_tree`), where the program has them."""
    return {k: program.attrs[k] for k in (TREE_ATTR, VARIANTS_ATTR) if k in program.attrs}


def _write_manifest(tmp: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """Bind every part's library to the program files (:func:`_bind_libraries`), then write
    the manifest with the sha256 of every file."""
    _bind_libraries(tmp, manifest, files)
    manifest["files"] = {f: sha256_file(tmp / f) for f in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _bind_libraries(tmp: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """Bind each part's library or ONNX model to the sha256 of the files it was compiled
    with (all but libraries, models and samples: program text, weights, host program), so
    that loading can refuse one copied from another artifact (see
    :mod:`splice.runtime.artifact`): appended to a ``.so``, in an ``.onnx``'s metadata."""
    libs = {E.part_file(p) for p in manifest["parts"]}
    models = {p["model"] for p in manifest["parts"] if "model" in p}
    bound = {f: sha256_file(tmp / f) for f in files if f not in libs and f != SAMPLES}
    for lib in sorted(libs):  # a library shared by twin parts is bound once, to its owner
        owner = E.library_owner(manifest, lib)
        if lib in models:
            from splice.runtime.backends.ort import bind_model

            bind_model(tmp / lib, owner, bound)
            continue
        with open(tmp / lib, "ab") as f:
            f.write(E.binding_bytes(owner, bound))


@dataclass
class _OrtReport:
    """What the onnxruntime backend reports per part (the manifest's ``lowering.parts``)."""

    seconds: dict[str, float]
    opset: int | None

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "opset": self.opset}


@dataclass
class _Split:
    """A split program ready for lowering: host program, parts, weights, part examples."""

    program: Program
    host: dict[str, Any]
    parts: dict[str, Any]  # name -> host.PartInfo
    weights: dict[str, tuple[torch.Tensor, str]]
    eager: dict[str, Callable[..., list[torch.Tensor]]]
    examples: dict[str, tuple[torch.Tensor, ...]]


def _first_sample(
    program: Program, samples: Sequence[Sequence[torch.Tensor]] | None
) -> tuple[torch.Tensor, ...]:
    """The first of ``samples`` with ``program``'s input shapes, else a seeded random one."""
    want = [(tuple(s.shape), s.dtype) for s in program.input_specs]
    for sample in samples or ():
        if [(tuple(t.shape), t.dtype) for t in sample] == want:
            return tuple(sample)
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(s.shape, generator=g, dtype=s.dtype)
        if s.dtype.is_floating_point
        else torch.zeros(s.shape, dtype=s.dtype)
        for s in program.input_specs
    )


def _split(program: Program, samples: Sequence[Sequence[torch.Tensor]] | None) -> _Split:
    """Split ``program`` (the ``branches`` pass) and find every part's example inputs: what
    its predecessors produce when the host program runs (in PyTorch) on the first sample,
    every branch forced both ways. A program without branches becomes one part."""
    if not is_split(program):
        program, _ = split_program(program)
    host, parts = H.build_host(program)
    weights = {w: (program.get_weight(w), k) for w, k in program.weight_kinds.items()}
    tensors = {w: t for w, (t, _) in weights.items()}
    eager = {name: H.eager_part(info, tensors) for name, info in parts.items()}
    runner = H.HostProgram(host, eager, tensors)
    examples = H.explore_part_inputs(runner, _first_sample(program, samples))
    return _Split(program, host, parts, weights, eager, examples)


def _structure(program: Program) -> tuple[str, list[str]]:
    """A part's computation without its weights' names: ops, literals, specs, and which
    weight each read is (by first-read order); and the weight names in that order."""
    ids: dict[Any, int] = {}
    names: list[str] = []
    lines = []
    for i, n in enumerate(program.graph.nodes):
        ids[n] = i
        if n.op == "get_attr":
            if n.target not in names:
                names.append(n.target)
            target = f"w{names.index(n.target)}"
        else:
            target = "" if n.op == "placeholder" else str(n.target)
        args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{ids[a]}")
        lines.append(f"{n.op}|{target}|{args}|{M.get_spec(n)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), names


def _prepare_part(part: Program, weights: dict[str, Any]) -> Program:
    """``part`` through :data:`PREPARE_PIPELINE`, unless folding made a weight that the
    artifact's program does not hold (a constant computed inside the part, such as an
    attention mask built from buffers): the artifact's weights file is the program's, so such
    a part is prepared without ``fold-constants`` and computes the value at run time."""
    prepared = parse_pipeline(PREPARE_PIPELINE).run(part).program
    if set(prepared.weight_kinds) <= set(weights):
        return prepared
    return parse_pipeline("cse,dce").run(part).program


def _weights_as_parameters(part: Program) -> Program:
    """``part`` with every weight a parameter (taking no gradient): the lowering keeps
    parameters as the library's run-time inputs, where it would hold buffers inside."""
    ws = {w: (part.get_weight(w), "param") for w in part.weight_kinds}
    g = torch.fx.Graph()
    out = g.graph_copy(part.graph, {})
    g.output(out)
    gm = build_graph_module(g, ws, {}, class_name=f"Part_{part.name}")
    for prm in gm.parameters():
        prm.requires_grad_(False)
    return Program(
        gm,
        output_names=list(part.output_names),
        weight_kinds={w: "param" for w in ws},
        name=part.name,
    )


def _twin_groups(parts: dict[str, Any], weights: dict[str, Any]) -> dict[str, str]:
    """Part name -> structure key, for the parts whose computation another part repeats."""
    keys = {name: _structure(info.program(weights))[0] for name, info in parts.items()}
    count: dict[str, int] = {}
    for k in keys.values():
        count[k] = count.get(k, 0) + 1
    return {name: k for name, k in keys.items() if count[k] > 1}


def _reuse(
    owner: tuple[str, Program, list[str], Any] | None, part: Program
) -> tuple[str, list[str], Any] | None:
    """(library, parameter names, report) of ``owner``'s library for ``part``, if the
    prepared programs are the same computation and every weight the library holds inside
    it (not a run-time parameter) has the same value in both; else None."""
    if owner is None:
        return None
    lib, first, params, report = owner
    key, names = _structure(part)
    first_key, first_names = _structure(first)
    if key != first_key:
        return None
    for a, b in zip(first_names, names, strict=True):
        if a not in params and not torch.equal(first.get_weight(a), part.get_weight(b)):
            return None
    return lib, [names[first_names.index(w)] for w in params], report


def _compile_split(
    program: Program | SignatureSet,
    target: Target,
    *,
    tune: int,
    output: str | Path | None,
    prepare: bool,
    fast_math: bool,
    samples: Sequence[Sequence[torch.Tensor]] | None,
    progress: Callable[[str, int, int], None] | None,
    overwrite: bool = False,
    rpc: str | None = None,
    backend: str = "tvm",
) -> Artifact:
    """A program with data-dependent branches, or one program per input signature: one
    library (TVM) or ONNX model (onnxruntime) per part, and ``host.json``.

    Each part is compiled on its own, with its predecessors' outputs as example inputs
    (:func:`_split`), and each compiled part is checked against PyTorch on them
    (``check_max_abs_diff`` in the manifest). A :class:`SignatureSet` is split member by
    member; its host program starts with a ``signature`` step that picks the member by the
    inputs' shapes, and parts and weights keep one namespace (a member's part names get the
    prefix ``s<k>_``; a weight whose name another member uses for a different tensor is
    renamed ``s<k>.<name>``). With ``backend="onnxruntime"`` each part is its own model
    (no sharing between twin parts: a model's weights are read from ``weights.safetensors``
    anyway, so a twin costs only its graph).
    """
    ort = backend == "onnxruntime"
    if ort:
        from splice.runtime.backends import ort as ort_backend
    else:
        from splice.runtime.backends import tvm as tvm_backend

    say = progress or (lambda message, done, total: None)
    if isinstance(program, SignatureSet):
        members = _disjoint_weights(program)
        structures = {json.dumps(_output_structure(p), sort_keys=True) for p in members}
        if len(structures) > 1:
            raise LoweringError(
                f"the members of SignatureSet {program.name!r} record different output "
                "structures (output_tree / variants), and an artifact holds one",
                hint="capture every signature with the same output structure, or compile "
                "each signature on its own",
            )
        splits = [_split(p, samples) for p in members]
        host, parts, eager, examples = H.signature_host(
            [(p.input_specs, sp.host) for p, sp in zip(members, splits)],
            [(sp.parts, sp.eager, sp.examples) for sp in splits],
        )
        weights = {w: wk for sp in splits for w, wk in sp.weights.items()}
        reference: Program | SignatureSet = SignatureSet(members, name=program.name)
    else:
        sp = _split(program, samples)
        host, parts, eager, examples, weights = sp.host, sp.parts, sp.eager, sp.examples, sp.weights
        reference = sp.program
    t0 = time.perf_counter()
    output = _output_path(output, reference)
    entries: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    runnable = target.kind != "cuda" and not is_foreign({"target": target.to_json()})
    with atomic_dir(output, overwrite=overwrite) as tmp:
        files = []
        models: dict[str, Any] = {}  # onnxruntime: file -> ONNX model, written with the weights
        # parts that are the same computation on different weights (the blocks of a gated
        # ResNet, one per gate) share one library: weights are its run-time parameters
        twins = {} if ort else _twin_groups(parts, weights)
        shared: dict[str, tuple[str, Program, list[str], Any]] = {}
        for i, (name, info) in enumerate(sorted(parts.items())):
            key = twins.get(name)
            part = info.program(weights)
            if prepare:
                part = _prepare_part(part, weights)
            if key is not None:  # every weight a run-time parameter, so that twins can share
                part = _weights_as_parameters(part)
            reuse = _reuse(shared.get(key), part) if key is not None else None
            if ort:
                say(f"exporting {name} to ONNX", i, len(parts))
                t_part = time.perf_counter()
                model = ort_backend.lower(part)
                lib, param_names = f"{name}.onnx", []
                models[lib] = model
                report = _OrtReport({"export": time.perf_counter() - t_part}, _opset(model))
            elif reuse is not None:
                lib, param_names, report = reuse
                say(f"compiling {name} (shares {lib})", i, len(parts))
            else:
                say(f"compiling {name}", i, len(parts))
                ex, param_names, report = tvm_backend.lower(
                    part, target, trials=tune, fast_math=fast_math, rpc=rpc
                )
                lib = f"{name}.so"
                tvm_backend.export_library(ex, tmp / lib, target, report.objects)
                files.append(lib)
                if key is not None and key not in shared:
                    shared[key] = (lib, part, param_names, report)
            diff = None
            if name in examples and runnable:
                if ort:
                    compiled = ort_backend.ORTPart(models[lib].SerializeToString())
                else:
                    compiled = tvm_backend.TVMPart(
                        tmp / lib, [part.get_weight(w) for w in param_names]
                    )
                got = compiled(*examples[name])
                want = eager[name](*examples[name])
                diff = max(
                    ((a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
                    for a, b in zip(got, want)
                )
            entries.append(
                {
                    "name": name,
                    "backend": backend,
                    **({"model": lib} if ort else {"library": lib, "entry": "main"}),
                    "params": param_names,
                    "inputs": [M.spec_json(s) for s in part.input_specs],
                    "outputs": [M.spec_json(s) for s in part.output_specs],
                    "check_max_abs_diff": diff,
                }
            )
            reports[name] = report.to_json()
        say("compiled parts", len(parts), len(parts))
        (tmp / "host.json").write_text(json.dumps(host, indent=1) + "\n")
        files += ["host.json", *_write_program_files(tmp, reference, samples)]
        for lib, model in models.items():  # weights.safetensors exists now: point into it
            external = ort_backend.write_model(model, tmp / lib, tmp / WEIGHTS)
            reports[lib[: -len(".onnx")]]["external_initializers"] = len(external)
            files.append(lib)
        first = reference[0] if isinstance(reference, SignatureSet) else reference
        manifest = _manifest(
            first,
            target,
            backend=backend,
            index_bounds=merged_index_bounds(reference),
            parts=entries,
            host="host.json",
            options=(
                {"prepare": PREPARE_PIPELINE if prepare else None, "lowrank_rank": None}
                if ort
                else {
                    "tune": tune,
                    "prepare": PREPARE_PIPELINE if prepare else None,
                    "fast_math": fast_math,
                    "lowrank_rank": None,
                }
            ),
            lowering={"parts": reports, "seconds": time.perf_counter() - t0},
        )
        manifest["branches"] = H.branch_count(host)
        if isinstance(reference, SignatureSet):
            manifest["program"] = reference.name
            manifest["signatures"] = [
                {
                    "inputs": [M.spec_json(s) for s in p.input_specs],
                    "outputs": [M.spec_json(s) for s in p.output_specs],
                    "program": _member_file(i),
                }
                for i, p in enumerate(reference)
            ]
        _write_manifest(tmp, manifest, files)
    return Artifact(output)


def _member_file(i: int) -> str:
    """The text IR file of signature ``i`` in an artifact (``program.ir`` for the first)."""
    return PROGRAM if i == 0 else f"program.s{i}.ir"


def _disjoint_weights(sset: SignatureSet) -> list[Program]:
    """The members of ``sset``, with weights renamed where two members use one name for
    different tensors (so that the artifact can hold all weights in one namespace)."""
    seen: dict[str, torch.Tensor] = {}
    out = []
    for i, p in enumerate(sset):
        clash = [
            w
            for w in p.weight_kinds
            if w in seen
            and not (
                seen[w] is p.get_weight(w)
                or (
                    seen[w].shape == p.get_weight(w).shape
                    and seen[w].dtype == p.get_weight(w).dtype
                    and torch.equal(seen[w], p.get_weight(w))
                )
            )
        ]
        if clash:
            p = p.copy()
            for w in clash:
                new = p.unique_weight_name(f"s{i}.{w}")
                while new in seen:
                    new = p.unique_weight_name(f"{new}_")
                p.rename_weight(w, new)
        for w in p.weight_kinds:
            seen.setdefault(w, p.get_weight(w))
        out.append(p)
    return out


def load(path: str | Path, *, sha256: str | None = None) -> Any:
    """Load a saved program (a :class:`~splice.ir.program.Program`) or a compiled artifact
    (a :class:`~splice.runtime.artifact.CompiledModel`); both are callables over tensors.

    ``sha256`` pins what is loaded: the sha256 of its ``manifest.json``, which lists every
    file's sha256 (``Artifact.sha256``, ``sha256sum PATH/manifest.json``); a different one
    raises ArtifactError before anything else is read."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise ArtifactError(
            f"{root} is neither a saved program nor a compiled artifact (no {MANIFEST})",
            hint="save programs with splice.save, compile artifacts with splice.compile",
        )
    data = (root / MANIFEST).read_bytes()
    check_pin(root, data, sha256)
    try:
        fmt = json.loads(data).get("format")
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        fmt = None  # not a JSON object (or nested too deep): CompiledModel says what is wrong
    if fmt == serialize.FORMAT:
        return serialize.load(root, sha256=sha256)  # pinned again on the bytes it reads
    return CompiledModel(root, sha256=sha256)  # its schema check names a wrong format


__all__ = ["BACKENDS", "PREPARE_PIPELINE", "compile", "load"]
