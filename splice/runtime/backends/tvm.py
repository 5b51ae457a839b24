"""The TVM backend: Program -> torch.export -> Relax -> scheduled TIR -> shared library.

Lowering, step by step:

1. **Export.** The Program's GraphModule is exported with ``torch.export`` (non-strict) on
   placeholder inputs built from its input specs. Parameters stay parameters; buffers and
   constants are bound into the module as constants ("linked into the module").
2. **Import.** Views become reshapes (:func:`views_as_reshapes`: torch's decompositions
   can change strides, and reshape copies only where a view is impossible), torch
   decomposes the export into core ATen ops (:func:`decompose`; its errors are shown in
   full), and ``tvm.relax.frontend.torch.from_exported_program`` imports it with
   ``keep_params_as_input=True`` and :func:`convert_map`: the Relax converter of each splice
   dialect op, registered below in :mod:`splice.ir.lowerings` (the kernels are in
   ``splice/runtime/kernels/tvm_*.py``); an op declared to fall back to its reference on
   TVM is inlined as that reference by :func:`decompose` instead.
3. **Optimise.** Relax: ``DecomposeOpsForInference``, ``CanonicalizeBindings``,
   ``FuseTransposeMatmul`` (``x @ Wᵀ`` as one NT-matmul reading W row-major), splice's
   ``FastMath`` (vectorisable GELU/SiLU/sigmoid/exp/tanh/softmax; optional), ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``,
   ``AttachAttrLayoutFreeBuffers``; then every TIR function is scheduled by splice's CPU
   rules (:mod:`splice.runtime.kernels.tvm_schedules`, tile sizes from :mod:`.tvm_tuner`); then
   ``SplitLayoutRewritePreproc`` and ``LiftTransformParams`` move the weight repacking into
   ``main_transform_params``, which the runtime runs once at load time.
4. **Build and export.** ``tvm.compile`` for the target and ``export_library``; for
   ``aarch64-linux`` with Debian's ``aarch64-linux-gnu-gcc`` as the cross compiler.

:class:`TVMPart` is the run-time side: it loads the ``.so``, makes a Relax VM, repacks
the weights once, and calls ``main`` with zero-copy (DLPack) tensors.

TVM is imported lazily; without it, :func:`require_tvm` raises a LoweringError that says
which extra to install.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.errors import LoweringError
from splice.ir import meta as M
from splice.ir.lowerings import lowering_for, register_lowering
from splice.ir.ops import OPS
from splice.ir.program import Program
from splice.runtime.backends.tvm_attention import attention_decompositions, fold_permute_pairs
from splice.runtime.backends.tvm_metaschedule import tune_module
from splice.runtime.backends.tvm_tuner import Tuner
from splice.runtime.kernels.tvm_fastmath import FastMath
from splice.runtime.kernels.tvm_gemm import compile_kernel, rewrite_gemms
from splice.runtime.kernels.tvm_lowrank_linear import convert_lowrank_linear, planning_for
from splice.runtime.kernels.tvm_moe_ffn import convert_moe_ffn
from splice.runtime.kernels.tvm_schedules import CpuShape, schedule_module
from splice.runtime.kernels.tvm_slot_write import rewrite_slot_writes
from splice.target import Target

TVM_EXTRA = "pip install 'splice[tvm]'  (apache-tvm 0.27)"


def require_tvm() -> Any:
    """Import TVM, or raise LoweringError naming the extra to install."""
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise LoweringError(
            f"the TVM backend needs apache-tvm, which is not importable ({e})", hint=TVM_EXTRA
        ) from e
    return tvm


# ---------------------------------------------------------------------------------------
# targets


def tvm_target_dict(target: Target) -> dict[str, Any]:
    """The TVM 0.27 target description (a dict: 0.27 rejects "llvm -mcpu=..." strings)."""
    if target.kind == "cuda":
        return {"kind": "cuda", "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}
    if target.triple.startswith("aarch64"):
        d_arm: dict[str, Any] = {
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+neon"],
            "num-cores": target.cores,
        }
        if target.cpu and target.cpu != "native":
            d_arm["mcpu"] = target.cpu
        return d_arm
    d: dict[str, Any] = {
        "kind": "llvm",
        "mtriple": f"{target.triple.split('-')[0]}-linux-gnu",
        "num-cores": target.cores,
    }
    cpu = target.cpu
    if cpu == "native":
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu()
    if cpu:
        d["mcpu"] = cpu
    return d


def make_tvm_target(target: Target) -> Any:
    tvm = require_tvm()
    if target.kind == "cuda" and not tvm.cuda(0).exist:
        raise LoweringError(
            "target cuda needs a CUDA GPU, and none is visible here",
            hint="compile for 'host' or 'aarch64-linux', or run on a machine with a CUDA GPU",
        )
    return tvm.target.Target(tvm_target_dict(target))


def cross_compiler(target: Target) -> Any | None:
    """The fcompile for export_library: None for the host, Debian's cross gcc for aarch64."""
    host_arch = platform.machine()
    arch = target.triple.split("-")[0]
    if arch in (host_arch, "x86_64" if host_arch == "x86_64" else host_arch):
        return None
    if arch == "aarch64":
        gcc = shutil.which("aarch64-linux-gnu-gcc")
        if gcc is None:
            raise LoweringError(
                "cross-compiling for aarch64 needs aarch64-linux-gnu-gcc, which is not installed",
                hint="apt-get install gcc-aarch64-linux-gnu",
            )
        from tvm.support import cc

        return cc.cross_compiler(gcc)
    raise LoweringError(f"no cross compiler known for {target.triple}")


# ---------------------------------------------------------------------------------------
# splice dialect ops -> Relax: the TVM lowerings, a Relax converter ``(node, importer)`` per op

register_lowering("splice::lowrank_linear", "tvm")(convert_lowrank_linear)
register_lowering("splice::moe_ffn", "tvm")(convert_moe_ffn)


def convert_map() -> dict[str, Callable[[Any, Any], Any]]:
    """The ``custom_convert_map`` of TVM's importer (``"<op>.default"`` -> converter): the
    TVM lowering of every splice op (LoweringError, naming the op, for one with none)."""
    out = {}
    for qual, op in OPS.items():
        lowering = lowering_for(qual, "tvm")
        if lowering.fn is not None:
            out[f"{op.name}.default"] = lowering.fn
    return out


def fallback_decompositions() -> dict[Any, Callable[..., Any]]:
    """``{op overload: reference}`` of the splice ops that fall back to their reference on
    TVM: :func:`decompose` inlines them, so TVM imports their plain torch ops."""
    return {
        op.overload: op.reference for q, op in OPS.items() if lowering_for(q, "tvm").is_fallback
    }


# ---------------------------------------------------------------------------------------
# lowering


def example_inputs(program: Program) -> tuple[torch.Tensor, ...]:
    """Placeholder inputs with the program's input specs (values are irrelevant to export)."""
    out = []
    for n in program.input_nodes:
        s = M.spec(n)
        if not isinstance(s, M.TensorSpec) or not s.is_static:
            raise LoweringError(
                f"input %{n.name} has spec {s}; the TVM backend compiles static tensor shapes only",
                hint="capture the model without dynamic_shapes, once per shape you deploy",
            )
        out.append(torch.zeros(tuple(int(d) for d in s.shape), dtype=s.dtype))
    return tuple(out)


def export_program(program: Program) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export of the program; returns it and the parameter names in Relax's order."""
    gm = program.to_module()
    try:
        ep = torch.export.export(gm, example_inputs(program), strict=False)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"torch.export of program {program.name!r} failed: {type(e).__name__}: {e}",
            hint="run splice.verify(program); the program must be exportable",
        ) from e
    kind = torch.export.graph_signature.InputKind
    params = [s.target for s in ep.graph_signature.input_specs if s.kind == kind.PARAMETER]
    return ep, params


@dataclass
class LoweringReport:
    seconds: dict[str, float] = field(default_factory=dict)
    schedules: dict[str, str] = field(default_factory=dict)
    matmuls: dict[str, dict[str, Any]] = field(default_factory=dict)
    unscheduled: dict[str, str] = field(default_factory=dict)
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)
    tvm_warnings: list[str] = field(default_factory=list)
    # object files linked into the library (splice's C GEMM kernels, tvm_gemm.py)
    objects: list[str] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)
    # program inputs the library updates in place (kernels/tvm_slot_write.py)
    inplace_inputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rules: dict[str, int] = {}
        for r in self.schedules.values():
            rules[r] = rules.get(r, 0) + 1
        return {
            "seconds": self.seconds,
            "schedule_rules": rules,
            "matmuls": self.matmuls,
            "unscheduled": self.unscheduled,
            "tuning": self.tuning,
            "tvm_warnings": self.tvm_warnings,
            "target": self.target,
            "inplace_inputs": self.inplace_inputs,
        }


@contextlib.contextmanager
def native_stderr_into(sink: list[str]) -> Iterator[None]:
    """Collect what TVM's C++ code logs to file descriptor 2 (deduplicated) into ``sink``.

    TVM logs one warning per kernel (e.g. about ``pow`` in its fast tanh), dozens per model;
    they go into the lowering report instead of flooding the user's terminal.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            for line in f.read().decode(errors="replace").splitlines():
                msg = line.split("] ", 1)[-1].strip()
                if msg and msg not in sink:
                    sink.append(msg)


def views_as_reshapes(ep: torch.export.ExportedProgram) -> int:
    """Rewrite every ``aten.view`` of ``ep`` (sub-graphs included) as ``aten.reshape``, in
    place; returns how many.

    Strides are not part of a Program's specs, and torch's decompositions (which run before
    TVM's import) can give a value other strides than the capture saw: after GPT-2's SDPA at
    batch 2 the attention output is [2, 8, 64] with strides (64, 128, 1) once SDPA is
    decomposed, and GPT-2's ``view(-1, 64)`` of it fails ("Cannot view a tensor with shape
    ...") although it ran eagerly. ``reshape`` is ``view`` wherever the strides allow a view
    and a copy where they do not, decided by torch on the strides the decomposed graph really
    has; on any input the eager program accepts it returns what ``view`` returns. TVM
    imports both as ``R.reshape``, so the rewrite changes nothing else.
    """
    view, reshape = torch.ops.aten.view.default, torch.ops.aten.reshape.default
    count = 0
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        hits = gm.graph.find_nodes(op="call_function", target=view)
        for node in hits:
            node.target = reshape
        if hits:
            gm.recompile()
            count += len(hits)
    return count


def decompose(ep: torch.export.ExportedProgram, name: str) -> torch.export.ExportedProgram:
    """``ep`` with its views as reshapes (:func:`views_as_reshapes`), decomposed by torch
    into the core ATen ops TVM imports (what ``from_exported_program`` would run itself),
    splice ops that fall back to their reference on TVM inlined as it, and SDPA as
    :func:`~splice.runtime.backends.tvm_attention.sdpa_decomposition` (query-side scaling,
    so ``q @ kᵀ`` reads the key cache in place). A failure here is torch's, and its message is given in full."""
    views_as_reshapes(ep)
    table = torch.export.default_decompositions()
    table.update(attention_decompositions())
    table.update(fallback_decompositions())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return ep.run_decompositions(table)
    except Exception as e:
        raise LoweringError(
            f"torch could not decompose program {name!r} into core ATen ops (the step before "
            f"TVM's import): {type(e).__name__}: {str(e).strip()}",
            hint="this is torch's own error (ExportedProgram.run_decompositions) on the "
            "program's export; splice.verify(program) and running it eagerly show whether the "
            "program itself is at fault",
        ) from e


def import_error(name: str, e: BaseException) -> LoweringError:
    """The LoweringError for a failed Relax import: TVM's whole message, and the missing-
    converter hint only when TVM says an op has no converter."""
    text = str(e).strip() or type(e).__name__
    missing = "Unsupported function type" in text or "Unsupported function target" in text
    return LoweringError(
        f"TVM could not import program {name!r}: {type(e).__name__}: {text}",
        hint="an op without a Relax converter: a splice op gets one with "
        "@register_lowering(op, 'tvm') (splice.ir.lowerings); any other op needs an entry in "
        "TVM's importer (custom_convert_map, which convert_map() builds) or a "
        "rewrite in the program"
        if missing
        else "TVM's Relax importer failed on an op it knows; the message above is TVM's",
    )


def check_no_opaque_experts(program: Program) -> None:
    """Raise a LoweringError naming the first opaque grouped-matmul node (the routed experts
    of transformers' Mixtral/Qwen2-MoE, ``transformers::grouped_mm_fallback``, or
    ``aten._grouped_mm``): TVM has no lowering for it, and the generic import error would
    not say where it is or what to do."""
    for n in program.graph.nodes:
        name = str(n.target) if n.op == "call_function" else ""
        if "grouped_mm" in name:
            raise LoweringError(
                f"program {program.name!r} computes routed experts with an opaque grouped "
                f"matmul, %{n.name} ({name.removesuffix('.default')}), which the TVM backend "
                "cannot lower",
                where=str(M.loc(n)) or None,
                hint="capture the model with its experts in plain ATen ops (gather + bmm): "
                "set model.config._experts_implementation = 'batched_mm' before "
                "splice.capture (transformers 5); or run the program eagerly",
            )


def lower(
    program: Program,
    target: Target,
    *,
    trials: int = 0,
    fast_math: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    rpc: str | None = None,
    inplace: bool = False,
) -> tuple[Any, list[str], LoweringReport]:
    """Program -> built TVM executable (not yet exported), parameter order, report.

    ``inplace``: write static-cache slot updates into the program's input buffers
    (:mod:`~splice.runtime.kernels.tvm_slot_write`); the inputs so written are listed in
    ``report.inplace_inputs``, and the caller must copy them before a call unless it
    donates them. ``trials`` > 0 tunes every matmul function with MetaSchedule against the hand rules
    (:mod:`.tvm_metaschedule`), measuring on devices of the TVM RPC tracker ``rpc``
    (``HOST:PORT:KEY``) when given, else in this process."""
    tvm = require_tvm()
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    report = LoweringReport()
    say = progress or (lambda message, done, total: None)
    check_no_opaque_experts(program)
    t0 = time.perf_counter()
    say("exporting", 0, 4)
    ep, param_names = export_program(program)
    report.seconds["export"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("importing into Relax", 1, 4)
    ep = decompose(ep, program.name)
    try:
        with warnings.catch_warnings(), planning_for(target):  # lowrank plans for target
            # torch's pytree deprecation, raised while TVM walks the exported program
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            mod = from_exported_program(
                ep,
                keep_params_as_input=True,
                custom_convert_map=convert_map(),
                run_ep_decomposition=False,  # done above by decompose()
            )
    except Exception as e:
        raise import_error(program.name, e) from e
    mod, _ = relax.frontend.detach_params(mod)
    report.seconds["import"] = time.perf_counter() - t0
    report.target = {
        "isa": target.isa,
        "vector_lanes": target.vector_lanes,
        "vector_registers": target.vector_registers,
        "l1d_bytes": target.l1d_bytes,
        "l2_bytes": target.l2_bytes,
        "cores": target.cores,
    }
    mod = fold_permute_pairs(mod)
    if inplace and target.kind != "cuda":
        n_inputs = len(program.input_names)
        if int(mod["main"].attrs.get("num_input", -1)) == n_inputs:
            mod, written = rewrite_slot_writes(mod, n_inputs)
            report.inplace_inputs = [program.input_names[i] for i in written]
    if target.kind != "cuda":
        mod, sites = rewrite_gemms(mod, target)
        for site in sites:
            report.matmuls[site.name] = site.to_json()
            obj = str(compile_kernel(site.plan, target))
            if obj not in report.objects:
                report.objects.append(obj)

    t0 = time.perf_counter()
    say("optimising", 2, 4)
    ttarget = make_tvm_target(target)
    foreign = target.kind != "cuda" and cross_compiler(target) is not None
    # the hand rules' own search measures in this process: not for another architecture
    tuner = Tuner(
        ttarget,
        0 if foreign or rpc is not None else trials,
        progress=progress,
        cpu=CpuShape.of(target),
    )
    ms_log: dict[str, dict[str, Any]] = {}
    with ttarget:
        with native_stderr_into(report.tvm_warnings):
            mod = tvm.transform.Sequential(
                [
                    relax.transform.DecomposeOpsForInference(),
                    relax.transform.CanonicalizeBindings(),
                    relax.transform.FuseTransposeMatmul(),
                    *([FastMath()] if fast_math else []),
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    relax.transform.AttachAttrLayoutFreeBuffers(),
                ]
            )(mod)
        if target.kind != "cuda":
            mod, ms_log = tune_module(
                mod, target, ttarget, trials, choose=tuner, rpc=rpc,
                fcompile=cross_compiler(target), foreign=foreign, progress=progress,
            )  # fmt: skip
            mod, sched = schedule_module(mod, tuner, target=target)
            report.schedules, report.unscheduled = sched.rules, sched.failures
            report.matmuls.update(sched.matmuls)
            for name, entry in ms_log.items():
                if entry.get("winner") == "metaschedule":
                    report.schedules[name] = "metaschedule"
                    report.matmuls[name] = {
                        "schedule": "metaschedule",
                        **{k: entry[k] for k in ("m", "n", "k", "batch") if k in entry},
                    }
        mod = tvm.transform.Sequential(
            [
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.LiftTransformParams(),
                relax.transform.FoldConstant(),
            ]
        )(mod)
        if target.kind == "cuda":
            from tvm.s_tir import dlight as dl

            mod = dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(),
                dl.gpu.GEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )(mod)
    tuner.save()
    report.tuning = {name: dict(rec) for name, rec in tuner.log.items()}
    for name, entry in ms_log.items():  # MetaSchedule's side of each tuned function
        rec = report.tuning.setdefault(name, {"source": entry.get("source", "database")})
        rec["metaschedule"] = entry
    report.seconds["optimise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("building", 3, 4)
    try:
        with native_stderr_into(report.tvm_warnings):
            ex = tvm.compile(mod, target=ttarget)
    except Exception as e:
        raise LoweringError(
            f"TVM build failed for {program.name!r}: {type(e).__name__}: {_first(e)}"
        ) from e
    report.seconds["build"] = time.perf_counter() - t0
    say("built", 4, 4)
    return ex, param_names, report


def export_library(ex: Any, path: Path, target: Target, objects: Sequence[str] = ()) -> None:
    """Link the built module (and ``objects``: splice's C kernels) into one shared library."""
    fcompile = cross_compiler(target)
    addons = [str(o) for o in objects] or None
    try:
        if fcompile is None:
            ex.export_library(str(path), addons=addons)
        else:
            ex.export_library(str(path), fcompile=fcompile, addons=addons)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"linking {path.name} for {target.triple} failed: {type(e).__name__}: {_first(e)}"
        ) from e


def _first(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------
# run time


_pool_threads: list[int] = []  # the thread count TVM's pool was last configured with


def _prepare_thread_pool(num_threads: int | None) -> int:
    """The threads a loaded part runs on: ``num_threads``, else every core of this machine.

    TVM sizes its thread pool once per process, when it is first used, from
    ``TVM_NUM_THREADS`` — and without it assumes hyper-threading on x86 and takes half of the
    logical CPUs (one thread on a 2-vCPU machine, where it halves GEMM throughput). So,
    unless the user set ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) themselves, the pool is
    created with every core; each part then runs with its own count (:func:`_use_threads`),
    within that pool, so two models loaded with different counts do not change each other.
    """
    cores = os.cpu_count() or 1
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(max(cores, num_threads or 0))
    if num_threads is not None and num_threads < 1:
        raise LoweringError(f"num_threads must be at least 1, got {num_threads}")
    return num_threads or cores


def _use_threads(n: int) -> None:
    """Configure TVM's pool for ``n`` threads, if it is not already (cheap when unchanged)."""
    if _pool_threads and _pool_threads[0] == n:
        return
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)  # 1: kBig, all equal cores here
    _pool_threads[:] = [n]


class TVMPart:
    """A compiled part loaded from its ``.so``: weights repacked once, then callable."""

    def __init__(
        self,
        library: str | os.PathLike[str],
        weights: Sequence[torch.Tensor],
        *,
        entry: str = "main",
        num_threads: int | None = None,
    ):
        self.num_threads = _prepare_thread_pool(num_threads)
        tvm = require_tvm()
        from tvm import relax

        self._tvm = tvm
        self.device = tvm.cpu(0)
        lib = tvm.runtime.load_module(str(library))
        self.vm = relax.VirtualMachine(lib, self.device)
        self.entry = entry
        self._main = self.vm[entry]
        raw = [self._to_tvm(w.detach().contiguous()) for w in weights]
        transform = f"{entry}_transform_params"
        if raw and self.vm.module.implements_function(transform):
            self.params = list(self.vm[transform](raw))
        else:
            self.params = raw

    def _to_tvm(self, t: torch.Tensor) -> Any:
        if t.data_ptr() % 64:  # TVM needs 64-byte aligned data; torch's allocator gives that
            t = t.clone()
        return self._tvm.runtime.from_dlpack(t)

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        args = [self._to_tvm(x.contiguous()) for x in inputs]
        _use_threads(self.num_threads)
        out = self._main(*args, *self.params)
        outs = list(out) if isinstance(out, (tuple, list)) or hasattr(out, "__len__") else [out]
        return [torch.from_dlpack(o) for o in outs]


__all__ = [
    "TVMPart",
    "check_no_opaque_experts",
    "convert_map",
    "decompose",
    "export_library",
    "export_program",
    "fallback_decompositions",
    "lower",
    "make_tvm_target",
    "require_tvm",
    "tvm_target_dict",
]
