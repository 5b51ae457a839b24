"""The TVM backend: Program -> torch.export -> Relax -> scheduled TIR -> shared library.

Lowering, step by step:

1. **Export.** The Program's GraphModule is exported with ``torch.export`` (non-strict) on
   placeholder inputs built from its input specs. Parameters stay parameters; buffers and
   constants are bound into the module as constants ("linked into the module").
2. **Import.** Views become reshapes (:func:`views_as_reshapes`: torch's decompositions
   can change strides, and reshape copies only where a view is impossible), torch
   decomposes the export into core ATen ops (:func:`decompose`; its errors are shown in
   full), and ``tvm.relax.frontend.torch.from_exported_program`` imports it with
   ``keep_params_as_input=True`` and :data:`CONVERT_MAP`, which lowers splice dialect ops.
3. **Optimise.** Relax: ``DecomposeOpsForInference``, ``CanonicalizeBindings``,
   ``FuseTransposeMatmul`` (``x @ Wᵀ`` as one NT-matmul reading W row-major), splice's
   ``FastMath`` (vectorisable GELU/SiLU/sigmoid/exp/tanh/softmax; optional), ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``,
   ``AttachAttrLayoutFreeBuffers``; then every TIR function is scheduled by splice's CPU
   rules (:mod:`.tvm_schedules`, tile sizes from :mod:`.tvm_tuner`); then
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
import functools
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
from splice.ir.program import Program
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
# splice dialect ops -> Relax


LOWRANK_FUSED_MAX_ROWS = 4
"""``splice::lowrank_linear`` with at most this many rows (the product of ``x``'s leading
dimensions) lowers to the fused kernel. More rows lower to two ``linear`` ops (two
matmul-rule kernels with 4-row register tiles) when the matmul rule can tile both (rank and
m multiples of 8, or at most 32), and to the fused kernel otherwise.

Measured with one-op programs on the 2-core EPYC VM (m = n = 2048, k = 512, weights
L3-resident, median of 10 alternating rounds): fused vs two matmuls 153 vs 157 µs at M = 1,
147 vs 144 at M = 2, 136 vs 137 at M = 4, then 2–7% slower fused at M = 8, 16, 32 (486 vs
475, 634 vs 590, 1364 vs 1305 µs). From DRAM at M = 1 the two are within 3% (403 vs 411
µs). When the rank is not a multiple of 8 (k = 750 for 5632×2048 at 50%) the matmul rule
cannot tile ``x Bᵀ`` and the two-linear path is 2–10× slower than the fused kernel at
every M measured (1–128)."""


def _matmul_tileable(n_out: int) -> bool:
    """The matmul rule has a panel width for ``n_out`` output columns (matmul_candidates)."""
    return n_out % 8 == 0 or n_out <= 32


def _static_shape(expr: Any) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        return None


def _lowrank_te(x: Any, Ap: Any, Bp: Any, bias: Any, *, m: int, plan: Any) -> Any:
    """TE of the fused kernel, for ``x`` with M rows (its leading dimensions) and n columns:

    * ``lowrank_hs[M, s1, kp]``: ``x Bᵀ`` with the n-long reduction cut into ``s1`` segments,
      each accumulated on its own (``s1`` independent streams through the weight panel);
    * ``lowrank_h[M, kp]``: the sum of the segments;
    * ``lowrank_ys[M, s2, mp]`` and ``lowrank_y[M, mp]``: the same for ``h Aᵀ`` (kp long);
    * ``lowrank_out``: ``y[:, :m] + bias`` in ``x``'s leading shape.

    ``Bp[kp/nb1, n, nb1]`` and ``Ap[mp/nb2, kp, nb2]`` are B and A packed into column
    panels, zero-padded to ``kp`` (k rounded up to a multiple of 16) and ``mp`` (m rounded
    up to a multiple of 8); ``plan`` is the :class:`~.tvm_schedules.LowRankPlan`.
    ``tvm_schedules.schedule_lowrank`` schedules the blocks by name.
    """
    import math

    from tvm import te

    lead = [int(d) for d in x.shape[:-1]]
    n = int(x.shape[-1])
    rows = math.prod(lead)
    kp, mp, nb1, nb2, s1, s2 = plan.kp, plan.mp, plan.nb1, plan.nb2, plan.s1, plan.s2
    len1, len2 = n // s1, kp // s2

    def unravel(i: Any) -> list[Any]:  # a row of h -> x's leading indices
        idx = []
        for d in reversed(lead):
            idx.append(i % d)
            i = i // d
        return idx[::-1]

    def ravel(idx: Sequence[Any]) -> Any:  # x's leading indices -> a row of h
        out: Any = 0
        for d, v in zip(lead, idx):
            out = out * d + v
        return out

    r = te.reduce_axis((0, len1), name="r")
    hs = te.compute(
        (rows, s1, kp),
        lambda i, g, c: te.sum(
            x[(*unravel(i), g * len1 + r)] * Bp[c // nb1, g * len1 + r, c % nb1], axis=r
        ),
        name="lowrank_hs",
    )
    g1 = te.reduce_axis((0, s1), name="g1")
    h = te.compute((rows, kp), lambda i, c: te.sum(hs[i, g1, c], axis=g1), name="lowrank_h")
    t = te.reduce_axis((0, len2), name="t")
    ys = te.compute(
        (rows, s2, mp),
        lambda i, g, j: te.sum(h[i, g * len2 + t] * Ap[j // nb2, g * len2 + t, j % nb2], axis=t),
        name="lowrank_ys",
    )
    g2 = te.reduce_axis((0, s2), name="g2")
    y = te.compute((rows, mp), lambda i, j: te.sum(ys[i, g2, j], axis=g2), name="lowrank_y")
    if bias is None:
        return te.compute((*lead, m), lambda *idx: y[ravel(idx[:-1]), idx[-1]], name="lowrank_out")
    return te.compute(
        (*lead, m), lambda *idx: y[ravel(idx[:-1]), idx[-1]] + bias[idx[-1]], name="lowrank_out"
    )


def _convert_lowrank_linear(node: Any, importer: Any) -> Any:
    """``y = (x Bᵀ) Aᵀ + bias``, A ``[m, k]``, B ``[k, n]``, ``rank`` r: the prefix A[:, :r], B[:r].

    Few rows (decode, at most :data:`LOWRANK_FUSED_MAX_ROWS`) or shapes the matmul rule
    cannot tile, fp32 and static shapes: one fused kernel (``_lowrank_te``, scheduled by
    the ``lowrank`` rule). A and B are sliced to the rank, zero-padded and packed into
    column panels by Relax ops that depend on the parameters only, so
    ``LiftTransformParams`` moves that work into ``main_transform_params`` (run once at load
    time); the kernel streams each weight byte once, and ``h = x Bᵀ`` never leaves the
    call. Otherwise: two ``relax.op.linear``.
    """
    from tvm import relax

    from splice.runtime.backends.tvm_schedules import LOWRANK_KERNEL, lowrank_plan

    args = importer.retrieve_args(node)
    x, A, B = args[0], args[1], args[2]
    bias = args[3] if len(args) > 3 else node.kwargs.get("bias")
    rank = args[4] if len(args) > 4 else node.kwargs.get("rank")
    bb = importer.block_builder
    xs, As, Bs = _static_shape(x), _static_shape(A), _static_shape(B)
    k = As[1] if As is not None else None
    r = k if rank is None or k is None else max(0, min(int(rank), k))
    if rank is not None and r != k:
        A = bb.emit(relax.op.strided_slice(A, axes=[1], begin=[0], end=[int(r)]))
        B = bb.emit(relax.op.strided_slice(B, axes=[0], begin=[0], end=[int(r)]))

    def fp32(e: Any) -> bool:
        return str(getattr(getattr(e, "ty", None), "dtype", "")) == "float32"

    fused = (
        xs is not None
        and As is not None
        and Bs is not None
        and r is not None
        and r > 0
        and all(fp32(t) for t in (x, A, B))
        and (bias is None or fp32(bias))
        and _numel(xs[:-1]) >= 1
        and (
            _numel(xs[:-1]) <= LOWRANK_FUSED_MAX_ROWS
            or not (_matmul_tileable(r) and _matmul_tileable(As[0]))
        )
    )
    if not fused:
        h = bb.emit(relax.op.linear(x, B, None, "float32"))
        return bb.emit(relax.op.linear(h, A, bias, "float32"))
    m, n = As[0], Bs[1]
    rows = _numel(xs[:-1])
    plan = lowrank_plan(rows, m, n, r)
    kp, mp, nb1, nb2 = plan.kp, plan.mp, plan.nb1, plan.nb2
    # zero padding: B's rows and A's columns to kp (h's padded entries are 0), A's rows to
    # mp (the padded outputs are computed, not stored)
    if kp != r:
        B = bb.emit(relax.op.nn.pad(B, [0, kp - r, 0, 0]))
    if kp != r or mp != m:
        A = bb.emit(relax.op.nn.pad(A, [0, mp - m, 0, kp - r]))
    Bp = bb.emit(
        relax.op.permute_dims(relax.op.reshape(B, (kp // nb1, nb1, n)), [0, 2, 1])
    )  # [kp/nb1, n, nb1]
    Ap = bb.emit(
        relax.op.permute_dims(relax.op.reshape(A, (mp // nb2, nb2, kp)), [0, 2, 1])
    )  # [mp/nb2, kp, nb2]
    attrs = {
        "op_pattern": 8,  # kOpaque: FuseOps leaves the call (and its packed operands) alone
        "splice.kernel": LOWRANK_KERNEL,
        "splice.rows": rows,
        "splice.m": m,
        "splice.n": n,
        "splice.k": r,
        **{f"splice.{key}": value for key, value in plan.to_json().items()},
    }
    return bb.emit(
        bb.call_te(
            functools.partial(_lowrank_te, m=m, plan=plan),  # call_te takes Relax/TE kwargs only
            x,
            Ap,
            Bp,
            bias,
            primfunc_name_hint="lowrank_linear",
            primfunc_attrs=attrs,
        )
    )


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _convert_moe_ffn(node: Any, importer: Any) -> Any:
    """``splice::moe_ffn``: the sparse kernel of :mod:`.tvm_moe` (only the selected experts'
    weights are read) when rows·k ≤ E — a decode step always —, else the dense formula."""
    from splice.runtime.backends.tvm_moe import convert_moe_ffn

    return convert_moe_ffn(node, importer)


CONVERT_MAP: dict[str, Callable[[Any, Any], Any]] = {
    "lowrank_linear.default": _convert_lowrank_linear,
    "moe_ffn.default": _convert_moe_ffn,
}
"""splice dialect op (``op.overload``) -> Relax converter. Each op's issue adds its own."""


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
    into the core ATen ops TVM imports (what ``from_exported_program`` would run itself).
    A failure here is torch's, and its message is given in full."""
    views_as_reshapes(ep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return ep.run_decompositions()
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
        hint="an op without a Relax converter: add one to CONVERT_MAP in "
        "splice/runtime/backends/tvm.py, or rewrite the op in the program"
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
) -> tuple[Any, list[str], LoweringReport]:
    """Program -> built TVM executable (not yet exported), parameter order, report.

    ``trials`` > 0 tunes every matmul function with MetaSchedule against the hand rules
    (:mod:`.tvm_metaschedule`), measuring on devices of the TVM RPC tracker ``rpc``
    (``HOST:PORT:KEY``) when given, else in this process."""
    tvm = require_tvm()
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from splice.runtime.backends.tvm_schedules import CpuShape, schedule_module
    from splice.runtime.backends.tvm_tuner import Tuner

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
        with warnings.catch_warnings():
            # torch's pytree deprecation, raised while TVM walks the exported program
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            mod = from_exported_program(
                ep,
                keep_params_as_input=True,
                custom_convert_map=CONVERT_MAP,
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
    if target.kind != "cuda":
        from splice.runtime.backends.tvm_gemm import compile_kernel, rewrite_gemms

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
        from splice.runtime.backends.tvm_fastmath import FastMath

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
            from splice.runtime.backends.tvm_metaschedule import tune_module

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
    "CONVERT_MAP",
    "TVMPart",
    "check_no_opaque_experts",
    "export_library",
    "export_program",
    "lower",
    "make_tvm_target",
    "require_tvm",
    "tvm_target_dict",
]
