"""GEMMs with a weight operand: a BLIS-style kernel in C, its constants derived from the Target.

Why not a TIR schedule: TIR's LLVM code generation reaches about a quarter of a CPU's fp32
peak on 128-row GEMMs (the matmul rule of :mod:`.tvm_schedules`, and MetaSchedule's generic
CPU space alike: issue #14 measured 66–80 GFLOP/s where MKL does 286). What is missing is
a register-tiled micro-kernel with cache blocking. ``cpu_gemm.c`` is one: written once with
GCC's generic vector extension, compiled per target with that target's ISA flags
(``-march=x86-64-v3``, ``-march=x86-64-v4``, ``-mcpu=cortex-a72`` ...), so the same source
gives AVX2, AVX-512 and NEON code, and its tile and blocking constants come from
:func:`gemm_plan`:

* ``L`` — fp32 lanes of a vector register (``Target.vector_bits / 32``);
* ``NR = NV·L`` with ``NV = max(2, 64 / vector bytes)``: at least one 64-byte cache line of
  B per step of k, at least two vectors;
* ``MR ≤ ⌊¾·R / NV⌋`` for R = ``Target.vector_registers``: a quarter of the register
  file is left for the B vectors and the broadcast of A (at most AVX2 6×16, AVX-512 12×32,
  NEON 6×16); the tallest height down to half that bound that pads at most an eighth of
  the rows of A with zeros, else the one that pads fewest (16 rows on AVX-512: 8-row
  tiles, not 12 + 12 with 8 rows of zeros);
* ``KC``: the B micro-panel (KC·NR floats) fills half of L1d;
* ``MC``: the packed A block (MC·KC floats) fills half of L2;
* tasks: ``Target.cores`` (panels split first, then rows).

The Relax rewrite (:func:`rewrite_gemms`) replaces every ``matmul(x, W)`` or
``matmul(x, permute_dims(W))`` whose W depends on weights only, with static fp32 shapes and
at least ``min_rows`` (:data:`MIN_ROWS`) rows, by: W packed to ``[⌈N/NR⌉, K, NR]`` with Relax ops on the
weights (``LiftTransformParams`` runs them once, at load time) and a ``call_tir`` of a
PrimFunc whose parallel loop calls the C kernel (``T.call_extern``). The kernel's object
file is linked into the artifact's library (``export_library(addons=...)``), so the
artifact stays one self-contained ``.so`` and runs on the aarch64 edge runner as it is.
Bias and activation epilogues stay Relax ops and fuse into one element-wise kernel.

Objects are cached by the hash of source, flags and compiler in ``<cache>/gemm/``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splice.errors import LoweringError
from splice.runtime.cache import cache_dir
from splice.target import X86_LEVELS, Target

SOURCE = Path(__file__).with_name("cpu_gemm.c")

GEMM_KERNEL = "gemm"
"""Value of the ``splice.kernel`` attribute of the PrimFuncs that call the C kernel."""

MIN_ROWS = 128
"""Fewest rows a GEMM needs to use the C kernel. Measured on a 2-vCPU AMD EPYC (Zen 4,
AVX-512) with both targets, 768×3072 and 3072×768 weights, default threads (GFLOP/s, TIR
rule / C kernel, medians of 40 calls on a lightly loaded machine): 8 rows 16/9, 32 rows
63/38, 128 rows 52/51 and 79/79, 256 rows 62/73 and 101/137 (x86-64-v3: 89/143, 41/57).
Below about 128 rows the matmul rule's register tiles (which stream each weight byte once
without packing A) are as fast or faster; from 128 rows on the C kernel's cache blocking
wins. docs/lowering.md keeps the table."""


@dataclass(frozen=True)
class GemmPlan:
    """The C kernel's compile-time constants (see the module docstring)."""

    lanes: int
    mr: int
    nr: int
    kc: int
    mc: int
    tasks: int

    @property
    def symbol(self) -> str:
        return f"splice_sgemm_l{self.lanes}_m{self.mr}_n{self.nr}_k{self.kc}_c{self.mc}"

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def gemm_plan(target: Target, m: int, n: int, k: int) -> GemmPlan:
    """The register tile, cache blocking and task count for an ``m×k · k×n`` GEMM on
    ``target``: every number comes from the target's vector width, register count, cache
    sizes and cores (the module docstring gives the rules)."""
    lanes = target.vector_lanes
    regs = target.vector_registers
    vec_bytes = 4 * lanes
    nv = max(2, 64 // vec_bytes)
    most = max(1, (3 * regs // 4) // nv)
    # the tallest tile (of at least half the registers' worth) that pads at most 1/8 of the
    # rows, else the one padding the fewest: 16 rows get 8-row tiles on AVX-512 rather
    # than 12 + 12 with 8 rows of zeros; 128 rows keep 12 (4 rows padded)
    heights = range(most, max(1, (most + 1) // 2) - 1, -1)
    pad = {r: -(-m // r) * r - m for r in heights}
    mr = next((r for r in heights if 8 * pad[r] <= m), min(heights, key=lambda r: (pad[r], -r)))
    nr = nv * lanes
    kc = max(64, (target.l1d_bytes // 2) // (4 * nr) // 16 * 16)
    kc = min(kc, -(-k // 16) * 16)
    mc = max(mr, (target.l2_bytes // 2) // (4 * kc) // mr * mr)
    mc = min(mc, -(-m // mr) * mr)
    return GemmPlan(lanes, mr, nr, kc, mc, max(1, target.cores))


def compiler_for(target: Target) -> tuple[str, list[str]]:
    """The C compiler and ISA flags that turn ``cpu_gemm.c`` into code for ``target``."""
    if target.triple.startswith("aarch64"):
        import platform

        cc = "gcc" if platform.machine() in ("aarch64", "arm64") else "aarch64-linux-gnu-gcc"
        cpu = target.cpu if target.cpu and target.cpu != "native" else "generic"
        return cc, [f"-mcpu={cpu}"]
    feats = set(target.features)
    if target.isa == "avx512":
        v4, _, _ = X86_LEVELS["x86-64-v4"]
        flags = ["-march=x86-64-v4"] if set(v4) <= feats else ["-march=x86-64-v3", "-mavx512f"]
    elif target.isa == "avx2":
        flags = ["-march=x86-64-v3"]
    else:
        flags = ["-march=x86-64-v2"]
    return "gcc", flags


@functools.cache
def _compiler_version(cc: str) -> str:
    """``cc --version`` (part of the object cache key), asked once per process."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


def compile_kernel(plan: GemmPlan, target: Target) -> Path:
    """The object file of the C kernel for ``plan`` on ``target`` (compiled once, cached)."""
    cc, isa = compiler_for(target)
    defines = [
        f"-DSPLICE_FN={plan.symbol}",
        f"-DSPLICE_L={plan.lanes}",
        f"-DSPLICE_MR={plan.mr}",
        f"-DSPLICE_NR={plan.nr}",
        f"-DSPLICE_KC={plan.kc}",
        f"-DSPLICE_MC={plan.mc}",
    ]
    flags = ["-O3", "-fPIC", "-ffp-contract=fast", "-fno-math-errno", *isa, *defines]
    if shutil.which(cc) is None:
        raise LoweringError(
            f"the C compiler {cc!r} that builds splice's GEMM kernel for {target.name} is "
            "not installed",
            hint="install gcc (and gcc-aarch64-linux-gnu for aarch64 targets: see "
            "docs/lowering.md)",
        )
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    key = hashlib.sha256(source + " ".join([cc, version, *flags]).encode()).hexdigest()[:24]
    out = cache_dir() / "gemm" / f"{plan.symbol}-{key}.o"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".o", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, *flags, "-c", str(SOURCE), "-o", tmp], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise LoweringError(
                f"compiling splice's GEMM kernel with {cc} failed: {r.stderr.strip()[:400]}",
                hint="check the compiler supports the flags " + " ".join(isa),
            )
        os.replace(tmp, out)  # atomic: concurrent compiles write the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def gemm_prim_func(plan: GemmPlan, m: int, n: int, k: int) -> Any:
    """The PrimFunc ``c[m, n] = a[m, k] · b`` with b packed ``[⌈n/NR⌉, k, NR]``: a parallel
    loop over the plan's tasks, each calling the C kernel (already scheduled)."""
    from tvm.script import tirx as T

    panels = -(-n // plan.nr)
    nr = plan.nr
    tasks = min(plan.tasks, panels * -(-m // plan.mr))
    work = tasks * plan.mc * plan.kc
    fn = plan.symbol

    @T.prim_func(s_tir=True, private=True)
    def splice_gemm(
        a: T.Buffer((m, k), "float32"),
        b: T.Buffer((panels, k, nr), "float32"),
        c: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "splice.kernel": "gemm"})
        with T.sblock("root"):  # noqa: SIM117 - TVMScript: one block per `with`
            with T.sblock("gemm"):  # opaque: the C kernel does the whole product
                T.reads(a[0:m, 0:k], b[0:panels, 0:k, 0:nr])
                T.writes(c[0:m, 0:n])
                buf = T.alloc_buffer((work,), "float32")
                for t in T.parallel(tasks):
                    T.evaluate(
                        T.call_extern(
                            "int32", fn, a.data, b.data, c.data, buf.data, m, n, k, t, tasks
                        )
                    )

    return splice_gemm


@dataclass
class GemmSite:
    """One GEMM the rewrite replaced: its shape and plan (reported in the manifest)."""

    name: str
    m: int
    n: int
    k: int
    plan: GemmPlan

    def to_json(self) -> dict[str, Any]:
        return {"kernel": GEMM_KERNEL, "m": self.m, "n": self.n, "k": self.k, **self.plan.to_json()}


def _static_shape(expr: Any) -> tuple[list[int], str] | None:
    sinfo = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        dims = [int(d) for d in shape.values]
    except (TypeError, ValueError):
        return None
    return dims, str(sinfo.dtype)


def rewrite_gemms(
    mod: Any, target: Target, *, min_rows: int | None = None
) -> tuple[Any, list[GemmSite]]:
    """Replace the weight GEMMs of ``mod["main"]`` by calls of the C kernel (see the module
    docstring). Returns the module and the sites replaced; the kernels' object files come
    from :func:`compile_kernel` with each site's plan."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    min_rows = MIN_ROWS if min_rows is None else min_rows

    main_gv = mod.get_global_var("main")
    func = mod[main_gv]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else None
    if num_input is None:
        return mod, []
    weights = {p for p in list(func.params)[num_input:]}
    import tvm

    matmul_op = tvm.ir.Op.get("relax.matmul")
    permute_op = tvm.ir.Op.get("relax.permute_dims")
    sites: list[GemmSite] = []
    funcs: dict[str, Any] = {}

    @mutator
    class _Rewrite(PyExprMutator):
        def _weight_only(self, e: Any, depth: int = 0) -> bool:
            if depth > 16:
                return False
            if isinstance(e, relax.Var):
                if e in weights:
                    return True
                bound = self.lookup_binding(e)
                return bound is not None and self._weight_only(bound, depth + 1)
            if isinstance(e, (tvm.ir.Constant, relax.ShapeExpr)):
                return True
            if isinstance(e, relax.Tuple):  # e.g. a strided_slice's axes, begin and end
                return all(self._weight_only(f, depth + 1) for f in e.fields)
            if isinstance(e, relax.Call) and isinstance(e.op, type(matmul_op)):
                return all(self._weight_only(a, depth + 1) for a in e.args)
            return False

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not call.op.same_as(matmul_op) or len(call.args) != 2:
                return call
            x, rhs = call.args
            xs, ws, out = _static_shape(x), _static_shape(rhs), _static_shape(call)
            if xs is None or ws is None or out is None:
                return call
            (xdims, xdt), (wdims, wdt), (_, odt) = xs, ws, out
            if {xdt, wdt, odt} != {"float32"} or len(wdims) != 2 or len(xdims) < 1:
                return call
            m = functools.reduce(lambda a, b: a * b, xdims[:-1], 1)
            k, n = wdims
            if m < min_rows or xdims[-1] != k or not self._weight_only(rhs):
                return call
            bound = self.lookup_binding(rhs) if isinstance(rhs, relax.Var) else None
            transposed = (
                isinstance(bound, relax.Call)
                and bound.op.same_as(permute_op)
                and (bound.attrs.axes is None or [int(a) for a in bound.attrs.axes] == [1, 0])
            )
            plan = gemm_plan(target, m, n, k)
            panels = -(-n // plan.nr)
            op = relax.op
            bb = self.builder_
            if transposed:  # W is [n, k]: pad rows, then [panels, nr, k] -> [panels, k, nr]
                w = bound.args[0]
                if panels * plan.nr != n:
                    w = bb.emit(op.nn.pad(w, [0, panels * plan.nr - n, 0, 0]))
                w = bb.emit(op.reshape(w, (panels, plan.nr, k)))
                packed = bb.emit(op.permute_dims(w, [0, 2, 1]))
            else:  # W is [k, n]: pad columns, then [k, panels, nr] -> [panels, k, nr]
                w = rhs
                if panels * plan.nr != n:
                    w = bb.emit(op.nn.pad(w, [0, 0, 0, panels * plan.nr - n]))
                w = bb.emit(op.reshape(w, (k, panels, plan.nr)))
                packed = bb.emit(op.permute_dims(w, [1, 0, 2]))
            name = f"splice_gemm_{m}x{n}x{k}"
            gv = funcs.get(name)
            if gv is None:
                func_ = gemm_prim_func(plan, m, n, k)
                gv = funcs[name] = bb.add_func(func_, name)
            x2 = bb.emit(op.reshape(x, (m, k))) if len(xdims) != 2 else x
            y = bb.emit(relax.call_tir(gv, [x2, packed], relax.TensorType((m, n), "float32")))
            sites.append(GemmSite(name, m, n, k, plan))
            return op.reshape(y, (*xdims[:-1], n)) if len(xdims) != 2 else y

    rewriter = _Rewrite(mod)
    new_func = rewriter.visit_expr(func)
    rewriter.builder_.update_func(main_gv, new_func)
    out = rewriter.builder_.get()
    if sites:
        out = relax.transform.DeadCodeElimination(["main"])(out)
    return out, sites


__all__ = [
    "GEMM_KERNEL",
    "MIN_ROWS",
    "GemmPlan",
    "GemmSite",
    "compile_kernel",
    "compiler_for",
    "gemm_plan",
    "gemm_prim_func",
    "rewrite_gemms",
]
