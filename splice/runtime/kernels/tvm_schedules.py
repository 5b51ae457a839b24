"""CPU schedules for the TIR functions a Relax build produces.

Why splice schedules TIR itself: apache-tvm 0.27's CPU dlight rules cover GEMV and plain
reductions only (and its GEMV rule vectorises across rows, which is slow for row-major
weights), and MetaSchedule (:mod:`.tvm_metaschedule`) needs minutes of search per function,
so it runs only when the user asks for tuning (``tune=N``) and keeps its kernel only where
it measures faster than these rules. These rules are the fast default: every fused TIR
function gets one of four:

``matmul``
    A multiply-accumulate block ``C[.., i, j] += A[.., i, k] * B[.., (j, k) | (k, j)]``
    with element-wise epilogues (bias, GELU...). When B is a weight (a layout-free buffer)
    it is repacked once, at load time, to ``[N/nb, K, nb]``; the kernel keeps an ``mi × nb``
    tile of C in vector registers, streams one packed panel of B per tile, walks tiles
    panel-major (so a panel is reused across all row blocks while it is in cache) and runs
    them in parallel. The same kernel serves decode (``mi = 1``: a GEMV reading each weight
    byte once) and prefill (``mi = 4``). When B is an activation (attention) the panel is
    packed per batch inside the kernel, except for one row against contiguous columns
    (decode attention over the KV cache): B is read where it lies, in panels as wide as
    the accumulator registers allow, so each cache row is one contiguous run.
``row``
    Reductions and normalisations (layer norm, softmax, mean): every block is computed at
    one parallel loop over the rows of the output.
``injective``
    Element-wise and layout ops: loops fused, parallel over chunks, vectorised inside.
``fallback``
    Parallelise the outermost loop only.

One function is recognised by its attribute rather than its shape: the fused
``splice::lowrank_linear`` kernel (``y = (x Bᵀ) Aᵀ + bias`` in one call) that the TVM
converter emits for decode, marked ``splice.kernel = "lowrank_linear"``, gets the
``lowrank`` rule (:func:`schedule_lowrank`): both products tiled like the matmul rule's GEMV
from panels packed at load time, each phase parallel over its output panels, ``x Bᵀ``
kept in a buffer local to the call. Likewise the sparse ``splice::moe_ffn`` kernel
(``tvm_moe_ffn.py``, ``splice.kernel = "moe_ffn"``) is written already scheduled and kept as it
is (rule ``moe_ffn``).

Each rule returns ``None`` when it does not apply, and the next rule is tried; a function
no rule accepts stays unscheduled (correct, slow) and is reported. Matmul tile sizes are a
:class:`MatmulConfig`; :func:`matmul_candidates` lists the ones the tuner tries.

Vector lanes and the register budget are the target's (:class:`CpuShape`, from
``Target.vector_lanes`` / ``Target.vector_registers``), so one code path serves AVX2,
AVX-512 and NEON. GEMMs on a weight with 8 rows or more do not reach these rules: they
are rewritten earlier into calls of splice's C kernel (:mod:`.tvm_gemm`); the matmul rule
keeps decode GEMVs, activation × activation products (attention) and convolutions. The
fused lowrank kernel's panels follow the target's lanes like the decode GEMV's
(:func:`lowrank_plan`); the moe kernel keeps its AVX2-sized plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

VECTOR_LANES = 8  # fp32 lanes of a 256-bit vector: the default when no target is given


@dataclass(frozen=True)
class CpuShape:
    """What the rules read of a CPU target: fp32 lanes per vector register and the number
    of vector registers (AVX2 8/16, AVX-512 16/32, NEON 4/32). A register tile may use
    three quarters of the registers for accumulators; the rest hold operands."""

    lanes: int = VECTOR_LANES
    registers: int = 16

    @property
    def accumulators(self) -> int:
        return 3 * self.registers // 4

    @staticmethod
    def of(target: Any) -> CpuShape:
        if target is None:
            return CpuShape()
        return CpuShape(target.vector_lanes, target.vector_registers)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of the matmul microkernel: ``mi`` rows × ``nb`` columns of C in registers."""

    nb: int
    mi: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# analysis of a PrimFunc


def _tvm():
    import tvm
    from tvm import s_tir, tirx

    return tvm, s_tir, tirx


def _ir():
    # apache-tvm 0.27 moved TIR expression nodes: loads are tvm.ir.expr.TensorLoad, arithmetic
    # is tvm.ir.prim.expr, function parameters are tensor Vars (no buffer_map)
    from tvm.ir import expr as IE
    from tvm.ir.prim import expr as PE

    return IE, PE


def _int(x: Any) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _root_blocks(sch: Any) -> list[Any]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _iter_kinds(sch: Any, block: Any) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(k != 0 for k in _iter_kinds(sch, block))


def _extent(sch: Any, loop: Any) -> int | None:
    return _int(sch.get(loop).extent)


@dataclass
class MatmulInfo:
    """A contraction ``C[..] += A[..] * B[..]``: a matmul, batched matmul or convolution.

    Every spatial iterator of the block has a role: ``batch`` (indexes A, B and C),
    ``row`` (indexes A and C: tokens, output pixels), or the one ``col`` (indexes B and C:
    output features/channels). B's indices must be plain iterators (batch, col and
    reduction ones) so that B can be repacked to ``[batch.., col/nb, reductions.., nb]``.
    """

    block_name: str
    b_index: int  # position of B among the block's reads
    b_param: int | None  # index of B among the function's parameters, if it is one
    b_vars: list[str]  # B's index iterators in order, by role: "batch", "col", "red<i>"
    out_roles: list[str]  # role of each output index: "batch", "row", "col"
    iter_roles: list[str]  # role of each block iterator: "batch", "row", "col", "red"
    row_extents: list[int]  # extents of the row iterators, in output order
    m: int  # product of row extents
    n: int  # extent of col
    k: int  # product of reduction extents
    batch: int  # product of batch extents
    layout_free: bool


def analyse_matmul(func: Any) -> MatmulInfo | None:
    """Recognise a single multiply-accumulate block (matmul or convolution) in ``func``."""
    _, s_tir, _ = _tvm()
    IE, PE = _ir()
    sch = s_tir.Schedule(func)
    reductions = [b for b in _root_blocks(sch) if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    stmt = sch.get(reductions[0])
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if any(k not in (0, 2) for k in kinds):
        return None
    body = stmt.body
    if not hasattr(body, "value") or not isinstance(body.value, PE.Add):
        return None
    mul = body.value.b
    if isinstance(mul, PE.Cast):
        mul = mul.value
    if not isinstance(mul, PE.Mul):
        return None
    loads = [x.value if isinstance(x, PE.Cast) else x for x in (mul.a, mul.b)]
    if not all(isinstance(x, IE.TensorLoad) for x in loads):
        return None
    ivs = list(stmt.iter_vars)
    extents = [_int(iv.dom.extent) for iv in ivs]
    if any(e is None for e in extents):
        return None  # symbolic shapes: not handled by this rule

    def uses(expr: Any) -> set[int]:
        return {i for i, iv in enumerate(ivs) if _mentions(expr, iv.var)}

    def plain(load: Any) -> list[int] | None:
        out = []
        for idx in load.indices:
            hit = [i for i, iv in enumerate(ivs) if idx.same_as(iv.var)]
            if len(hit) != 1:
                return None
            out.append(hit[0])
        return out

    store = [
        next((i for i, iv in enumerate(ivs) if idx.same_as(iv.var)), None) for idx in body.indices
    ]
    if any(x is None or kinds[x] != 0 for x in store):
        return None
    free = [int(x) for x in (func.attrs.get("layout_free_buffers", []) if func.attrs else [])]
    params = list(func.params)

    def param_index(load: Any) -> int | None:
        return next((i for i, p in enumerate(params) if p.same_as(load.source)), None)

    def _roles(t: int) -> MatmulInfo | None:
        b_load, a_load = loads[t], loads[1 - t]
        b_iters = plain(b_load)
        if b_iters is None:
            return None
        a_used = set().union(*(uses(ix) for ix in a_load.indices)) if a_load.indices else set()
        b_used = set(b_iters)
        spatial = {i for i, kd in enumerate(kinds) if kd == 0}
        cols = [i for i in spatial if i in b_used and i not in a_used]
        if len(cols) != 1:
            return None
        col = cols[0]
        roles: dict[int, str] = {}
        for i in spatial:
            if i == col:
                roles[i] = "col"
            elif i in a_used and i in b_used:
                roles[i] = "batch"
            elif i in a_used:
                roles[i] = "row"
            else:
                roles[i] = "other"
        if "other" in roles.values():
            return None
        b_roles = []
        for i in b_iters:
            if kinds[i] == 2:
                b_roles.append(f"red{i}")
            elif roles[i] in ("batch", "col"):
                b_roles.append(roles[i])
            else:
                b_roles = None
                break
        if b_roles is None or b_roles.count("col") != 1:
            return None
        # batch dims must lead B (as they lead A and C), so packing keeps them outermost
        nb_batch = b_roles.count("batch")
        if b_roles[:nb_batch] != ["batch"] * nb_batch:
            return None
        out_roles = [roles[i] for i in store]
        reads = [r.source for r in stmt.reads]
        b_index = next((ri for ri, buf in enumerate(reads) if buf.same_as(b_load.source)), None)
        if b_index is None:
            return None
        bp = param_index(b_load)
        row_ext = [extents[i] for i in store if roles[i] == "row"]
        prod = lambda xs: __import__("math").prod(xs)  # noqa: E731
        iter_roles = [roles[i] if kinds[i] == 0 else "red" for i in range(len(ivs))]
        return MatmulInfo(
            stmt.name_hint,
            b_index,
            bp,
            b_roles,
            out_roles,
            iter_roles,
            row_ext,
            prod(row_ext),
            extents[col],
            prod(extents[i] for i, kd in enumerate(kinds) if kd == 2),
            prod(extents[i] for i in spatial if roles[i] == "batch"),
            bp is not None and bp in free,
        )

    order = sorted(range(2), key=lambda t: 0 if param_index(loads[t]) in free else 1)
    found = [info for t in order if (info := _roles(t)) is not None]
    # a product of two activations (attention) may fit either way round; a column of
    # extent 1 (a one-row operand taken as B) would vectorise nothing: prefer the other
    wide = [info for info in found if info.n > 1]
    return (wide or found or [None])[0]


def _mentions(expr: Any, var: Any) -> bool:
    from tvm.tirx.analysis import undefined_vars

    return expr.same_as(var) or any(v.same_as(var) for v in undefined_vars(expr))


def default_matmul_config(info: MatmulInfo, cpu: CpuShape | None = None) -> MatmulConfig | None:
    """The tile sizes used without tuning: wide panels for decode, 4 rows × two vectors
    otherwise (4×16 on AVX2, 4×32 on AVX-512, 4×8 on NEON)."""
    cpu = cpu or CpuShape()
    cands = matmul_candidates(info, cpu)
    if not cands:
        return None
    if info.m <= 2:
        wide = [c for c in cands if c.mi == info.m]
        return max(wide, key=lambda c: c.nb) if wide else cands[0]
    if not info.layout_free:
        # B is an activation packed per batch inside the kernel (attention): one cache line
        # (16 fp32) of B per step of k. Measured on a GPT-2 block's QKᵀ / PV (Zen 4,
        # AVX-512): 4×16 0.24 ms, 4×32 2.3 ms, 8×32 2.9 ms, 4×64 3.1 ms; AVX2's 4×16 0.41 ms
        line = [c for c in cands if c.nb == 16 and c.mi == 4] or [c for c in cands if c.nb == 16]
        if line:
            return line[0]
    two = 2 * cpu.lanes
    pref = (
        [c for c in cands if c.nb == two and c.mi == 4]
        or [c for c in cands if c.nb == two]
        or cands
    )
    return pref[0]


def reads_b_in_place(info: MatmulInfo) -> bool:
    """One row against an activation whose columns are contiguous (decode attention: ``q Kᵀ``
    over a key cache stored transposed, ``p V`` over the value cache): the kernel reads B
    where it lies rather than packing it (packing would copy every byte of B for one use)."""
    return not info.layout_free and info.m == 1 and info.b_vars[-1] == "col"


def matmul_candidates(info: MatmulInfo, cpu: CpuShape | None = None) -> list[MatmulConfig]:
    """Tile sizes the tuner tries: ``nb`` of 4, 2 or 1 vectors dividing N, ``mi`` dividing
    the innermost row extent, with ``mi × nb / lanes`` accumulators fitting the registers.

    When B is read in place (:func:`reads_b_in_place`) the widest panel that divides N with
    one accumulator per vector comes first: a row of B is then read as one contiguous run
    (up to ``accumulators × lanes`` columns: 384 on AVX-512, 96 on AVX2) instead of 4L-wide
    pieces a stride apart."""
    cpu = cpu or CpuShape()
    lanes = cpu.lanes
    nbs = [nb for nb in (4 * lanes, 2 * lanes, lanes) if info.n % nb == 0]
    if reads_b_in_place(info):
        wide = [v * lanes for v in range(cpu.accumulators, 4, -1) if info.n % (v * lanes) == 0]
        nbs = wide[:1] + nbs
    if not nbs and info.n <= 4 * lanes:
        nbs = [info.n]
    if not nbs:
        return []
    inner = info.row_extents[-1] if info.row_extents else 1
    if inner <= 4:
        mis = [inner]
    else:
        mis = [mi for mi in (4, 6, 3, 2, 8, 7, 5) if inner % mi == 0] or [4]
    out = []
    for nb in nbs:
        for mi in mis:
            if mi * -(-nb // lanes) <= cpu.accumulators:
                out.append(MatmulConfig(nb, mi))
    return out


def schedule_matmul(func: Any, info: MatmulInfo, cfg: MatmulConfig, *, prepack: bool = True) -> Any:
    """The contraction rule (see the module docstring). ``prepack=False`` expects B already
    packed (the tuner measures kernels that way)."""
    _, s_tir, _ = _tvm()
    sch = s_tir.Schedule(func)

    def block_pos() -> int:
        return next(
            i for i, b in enumerate(_root_blocks(sch)) if sch.get(b).name_hint == info.block_name
        )

    for b in _root_blocks(sch)[: block_pos()]:  # producers (reshapes, casts): inline
        # padding stays its own loop nest: inlined, it puts a branch into the inner loop
        if "if_then_else" in sch.get(b).script():
            _parallel_injective(sch, b)
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # not inlinable: computed on its own, in parallel
            _parallel_injective(sch, b)
    mm = sch.get_sblock(info.block_name)
    # block iterators in the order the tile loops need: batch, rows, the column, reductions
    rank = {"batch": 0, "row": 1, "col": 2, "red": 3}
    order = sorted(range(len(info.iter_roles)), key=lambda i: (rank[info.iter_roles[i]], i))
    if order != list(range(len(order))):
        sch.reorder_block_iter_var(mm, order)
    epilogue = _root_blocks(sch)[block_pos() + 1 :]
    for b in epilogue[:-1]:
        sch.compute_inline(b)
    nb, mi = cfg.nb, cfg.mi
    roles = info.b_vars

    def packed(*idx: Any) -> tuple[Any, ...]:
        by_role = dict(zip(roles, idx))
        batch = [x for r, x in zip(roles, idx) if r == "batch"]
        red = [x for r, x in zip(roles, idx) if r.startswith("red")]
        j = by_role["col"]
        return (*batch, j // nb, *red, j % nb)

    pack_block = None
    in_place = reads_b_in_place(info)
    if info.layout_free and not prepack:
        sch.transform_layout(mm, ("read", info.b_index), index_map=packed)
    elif not in_place:
        pack_block = sch.cache_read(mm, info.b_index, "global")
        sch.transform_layout(mm, ("read", info.b_index), index_map=packed)
        if info.layout_free:
            # a weight: the repacking runs once, at load time (SplitLayoutRewritePreproc and
            # LiftTransformParams move the annotated copy into transform_params)
            sch.annotate(pack_block, "meta_schedule.layout_rewrite_preproc", 1)

    out = _root_blocks(sch)[-1] if epilogue else sch.cache_write(mm, 0, "global")
    loops = sch.get_loops(out)
    if len(loops) != len(info.out_roles):
        raise ValueError("epilogue loops do not match the contraction's output")
    by_role: dict[str, list[Any]] = {"batch": [], "row": [], "col": []}
    for lp, role in zip(loops, info.out_roles):
        by_role[role].append(lp)
    rows = by_role["row"]
    col = by_role["col"][0]
    jo, ji = sch.split(col, [None, nb])
    if rows:
        io, ii = sch.split(rows[-1], [None, min(mi, info.row_extents[-1])])
        outer_rows = [*rows[:-1], io]
        inner_rows = [ii]
    else:
        outer_rows, inner_rows = [], []
    batch_loops = by_role["batch"]
    sch.reorder(*batch_loops, jo, *outer_rows, *inner_rows, ji)
    sch.vectorize(ji)
    if info.layout_free or not batch_loops:
        tile = sch.fuse(*batch_loops, jo, *outer_rows)  # panel-major, all tiles in parallel
        sch.parallel(tile)
        batch = None
    else:
        # activation operand with batch dims: one batch per parallel task, packed inside it
        batch = sch.fuse(*batch_loops) if len(batch_loops) > 1 else batch_loops[0]
        sch.parallel(batch)
        tile = outer_rows[-1] if outer_rows else jo
    sch.compute_at(mm, tile)
    sch.set_scope(mm, 0, "local")
    mm_loops = sch.get_loops(mm)
    depth = next(i for i, lp in enumerate(mm_loops) if sch.get(lp).same_as(sch.get(tile)))
    inner = mm_loops[depth + 1 :]
    # compute_at drops unit loops: the reductions left are those with extent > 1
    n_red = sum(
        1 for iv in sch.get(mm).iter_vars if int(iv.iter_type) == 2 and _int(iv.dom.extent) != 1
    )
    spatial, red = inner[: len(inner) - n_red], inner[len(inner) - n_red :]
    sch.reorder(*red, *spatial)
    sch.vectorize(spatial[-1])
    for lp in spatial[:-1]:
        sch.unroll(lp)
    if red:
        sch.decompose_reduction(mm, red[0])
    if pack_block is not None and not info.layout_free:
        if batch is not None:
            sch.compute_at(pack_block, batch)
        else:
            _parallel_injective(sch, pack_block)
    return sch.mod["main"]


def _parallel_injective(sch: Any, block: Any) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    if _extent(sch, loops[0]) not in (None, 1) and sch.get(loops[0]).kind == 0:
        with contextlib.suppress(Exception):  # already inside a parallel loop
            sch.parallel(loops[0])


def schedule_rows(func: Any, lanes: int = VECTOR_LANES) -> Any | None:
    """Reductions and normalisations: all blocks computed per row of the output, in parallel."""
    _, s_tir, _ = _tvm()
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    if not any(_is_reduction(sch, b) for b in blocks):
        return None
    for b in blocks[:-1]:
        if not _is_reduction(sch, b):
            with contextlib.suppress(Exception):  # not inlinable (read twice with other layouts)
                sch.compute_inline(b)
    blocks = _root_blocks(sch)
    last = blocks[-1]
    loops = sch.get_loops(last)
    kinds = _iter_kinds(sch, last)
    spatial = [lp for lp, kd in zip(loops, kinds) if kd == 0]
    if len(spatial) != len(loops) and kinds[: len(spatial)] != [0] * len(spatial):
        return None
    if not spatial:
        return None
    if _is_reduction(sch, last):
        outer = spatial
    else:
        outer = spatial[:-1] if len(spatial) > 1 else spatial
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    ext = _extent(sch, fused)
    if ext is None or ext < 2:
        return None
    sch.parallel(fused)
    for b in reversed(blocks[:-1]):
        sch.compute_at(b, fused)
    if not _is_reduction(sch, last) and len(spatial) > 1:
        inner = sch.get_loops(last)[-1]
        e = _extent(sch, inner)
        if e is not None and e % lanes == 0:
            _, vi = sch.split(inner, [None, lanes])
            sch.vectorize(vi)
    return sch.mod["main"]


def schedule_injective(func: Any, chunk: int = 1024, lanes: int = VECTOR_LANES) -> Any | None:
    """Element-wise/layout blocks: each root block fused, parallel over chunks, vectorised."""
    _, s_tir, _ = _tvm()
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    if any(_is_reduction(sch, b) for b in blocks):
        return None
    for b in blocks[:-1]:
        with contextlib.suppress(Exception):  # blocks that cannot be inlined are scheduled below
            sch.compute_inline(b)
    for b in _root_blocks(sch):
        loops = sch.get_loops(b)
        if not loops:
            continue
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        ext = _extent(sch, fused)
        if ext is None:
            continue
        if ext >= 2 * chunk:
            outer, inner = sch.split(fused, [None, chunk])
            sch.parallel(outer)
            _, vec = sch.split(inner, [None, lanes])
            sch.vectorize(vec)
        elif ext % lanes == 0 and ext >= lanes:
            _, vec = sch.split(fused, [None, lanes])
            sch.vectorize(vec)
    return sch.mod["main"]


def schedule_fallback(func: Any) -> Any | None:
    _, s_tir, _ = _tvm()
    sch = s_tir.Schedule(func)
    done = False
    for b in _root_blocks(sch):
        loops = sch.get_loops(b)
        if loops and _extent(sch, loops[0]) not in (None, 0, 1) and _iter_kinds(sch, b)[0] == 0:
            sch.parallel(loops[0])
            done = True
    return sch.mod["main"] if done else None


# ---------------------------------------------------------------------------------------
# the fused low-rank kernel

LOWRANK_KERNEL = "lowrank_linear"
"""Value of the ``splice.kernel`` attribute of the fused lowrank_linear PrimFunc."""


@dataclass(frozen=True)
class LowRankPlan:
    """Layout and tiling of the fused ``lowrank_linear`` kernel (both phases).

    ``kp``/``mp``: k and m padded (to multiples of the vector lanes); ``nb1``/``nb2``: panel
    widths of the packed B and A; ``mi``: rows per tile; ``s1``/``s2``: segments the n-long
    and the kp-long reductions are cut into, each with its own accumulators.
    """

    kp: int
    mp: int
    nb1: int
    nb2: int
    mi: int
    s1: int
    s2: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


LOWRANK_ACCUMULATORS = 4
"""Vector registers a tile of the fused kernel accumulates in (``mi × s × nb / L``): as many
as the dense decode GEMV's tile (one 4L-wide panel at ``mi = 1``), which streams its weights
at the memory's rate with one stream per core."""


def lowrank_plan(rows: int, m: int, n: int, k: int, cpu: CpuShape | None = None) -> LowRankPlan:
    """The fused kernel's plan for ``rows`` rows of x [.., n], A [m, k], B [k, n] on a CPU
    of ``cpu``'s vector lanes L and registers (AVX2's when None).

    Each phase is tiled like the matmul rule's decode GEMV: ``mi`` (rows per tile) is the
    largest divisor of ``rows`` up to 4; k and m are padded to multiples of L (``kp``,
    ``mp``); a panel is the widest of 4L, 2L and L columns that divides the padded extent
    with ``mi × nb / L`` accumulators within :data:`LOWRANK_ACCUMULATORS` (4L at ``mi = 1``:
    64 columns on AVX-512, 32 on AVX2, 16 on NEON, as the dense decode GEMV); only a panel
    narrower than that cuts the reduction into ``s`` segments (4, 2 or 1, dividing its
    length), each with its own accumulators and its own stream through the panel, so every
    tile keeps the same number of independent accumulation chains. At M = 1 on AVX-512 the
    LLaMA 50% shapes (k = 512, and k = 751 padded to 752) get 64-wide panels in one segment
    and 16-wide panels in 4.

    With more rows than one tile (``rows > mi``: a prefill the matmul rule cannot tile) the
    panels are reused by every row tile from cache and the kernel is compute-bound: a tile
    then takes the matmul rule's budget (``CpuShape.accumulators``, 24 on AVX-512, 12 on
    AVX2), the widest panel (4L or 2L) that fits it, and no segments. Measured on a 2-core
    AVX-512 Xeon, one-op programs at 8, 32 and 64 rows, against the decode budget: 0.69–0.81×
    the time on MiniLM's shapes at ``ratio=0.8`` (384×384 at rank 153, 1536×384 and
    384×1536 at rank 245; faster than the dense layer in each case: 137.6 against 162.0 µs
    for 1536×384 at 32 rows) and 0.91–0.95× on 2048×2048 at rank 750.

    Segments were once used to fill twice as many accumulators (8). Measured on the 2-core
    AVX-512 EPYC, a chain of the 12 lowrank_linear weights of LLaMA's 50% decode shapes
    (185 MB, from DRAM; programs alternating in one process, paired ratios against the dense
    chain): one segment per 4L panel took 3–5% less time than two, in three runs with the
    machine's memory bandwidth between 21 and 27 GB/s; the whole decode step 2% less (dense /
    lowrank 1.84 against 1.81). More streams per core than the dense GEMV's one only add
    open DRAM pages.
    """
    cpu = cpu or CpuShape()
    lanes = cpu.lanes
    mi = next(d for d in (4, 3, 2, 1) if rows % d == 0)
    kp = -(-k // lanes) * lanes
    mp = -(-m // lanes) * lanes
    several = rows > mi  # several row tiles: compute-bound (see the docstring)
    budget = cpu.accumulators if several else max(LOWRANK_ACCUMULATORS, mi)

    def width(extent: int) -> int:
        fits = [
            nb
            for nb in (4 * lanes, 2 * lanes, lanes)
            if extent % nb == 0 and mi * (nb // lanes) <= budget
        ]
        return fits[0] if fits else lanes

    def segments(length: int, nb: int) -> int:
        if several:
            return 1
        return next(s for s in (4, 2, 1) if length % s == 0 and mi * s * (nb // lanes) <= budget)

    nb1, nb2 = width(kp), width(mp)
    return LowRankPlan(kp, mp, nb1, nb2, mi, segments(n, nb1), segments(kp, nb2))


def schedule_lowrank(func: Any) -> Any | None:
    """The fused ``out = (x Bᵀ) Aᵀ + bias`` kernel (``_lowrank_te`` in ``tvm.py``).

    Each phase is tiled like the matmul rule's GEMV: a tile of ``mi`` rows × one packed
    panel (``nb`` columns) of the result accumulates in vector registers while the panel
    streams past (each weight byte is read once per call), its reduction cut into ``s``
    segments with their own accumulators (independent FMA chains and memory streams);
    tiles run in parallel, panel-major. Phase 1 writes ``h = x Bᵀ`` (M × kp floats, a
    buffer local to the call); phase 2 reads it and stores ``y + bias``. Returns ``None``
    for functions not marked ``splice.kernel = "lowrank_linear"``.
    """
    attrs = func.attrs
    if attrs is None or attrs.get("splice.kernel", None) != LOWRANK_KERNEL:
        return None
    _, s_tir, _ = _tvm()
    plan = LowRankPlan(**{key: int(attrs[f"splice.{key}"]) for key in LowRankPlan.__annotations__})
    n = int(attrs["splice.n"])
    sch = s_tir.Schedule(func)
    mi = plan.mi
    # phase 1: h[i, c] = Σ_g hs[i, g, c]; hs accumulates per tile in registers
    h = sch.get_sblock("lowrank_h")
    hs = sch.get_sblock("lowrank_hs")
    i, c, g = sch.get_loops(h)
    tile = _tile_loops(sch, i, c, mi, plan.nb1, reduction=g)
    sch.compute_at(hs, tile)
    sch.set_scope(hs, 0, "local")
    _accumulate(sch, hs, tile, [mi, plan.s1, plan.nb1, n // plan.s1])
    sch.decompose_reduction(h, g)  # h's own loops: rows (unrolled), segments, columns
    # phase 2: out[.., j] = Σ_g ys[i, g, j] + bias[j], tiled over out
    out = sch.get_sblock("lowrank_out")
    y = sch.get_sblock("lowrank_y")
    ys = sch.get_sblock("lowrank_ys")
    loops = sch.get_loops(out)
    lead, j = loops[:-1], loops[-1]
    i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    tile = _tile_loops(sch, i, j, mi, plan.nb2)
    sch.compute_at(y, tile)
    sch.set_scope(y, 0, "local")
    sch.compute_at(ys, tile)
    sch.set_scope(ys, 0, "local")
    _accumulate(sch, ys, tile, [mi, plan.s2, plan.nb2, plan.kp // plan.s2])
    _sum_segments(sch, y, tile, [mi, plan.nb2, plan.s2])
    return sch.mod["main"]


def _tile_loops(sch: Any, i: Any, j: Any, mi: int, nb: int, *, reduction: Any | None = None) -> Any:
    """Split the row loop ``i`` by ``mi`` and the column loop ``j`` by ``nb``; the tile loop
    (column panels outer, row blocks inner) is fused, parallel; columns inside vectorised."""
    jo, ji = sch.split(j, [None, nb])
    io, ii = sch.split(i, [None, mi])
    inner = [ii, reduction, ji] if reduction is not None else [ii, ji]
    sch.reorder(jo, io, *inner)
    tile = sch.fuse(jo, io)
    sch.parallel(tile)
    sch.vectorize(ji)
    if mi > 1:
        sch.unroll(ii)
    return tile


def _loops_under(sch: Any, block: Any, tile: Any, extents: list[int]) -> list[Any | None]:
    """``block``'s loops under ``tile``, one per iterator (``None`` where compute_at dropped
    a loop of extent 1); ``extents`` are the iterators' extents within one tile, in order."""
    loops = sch.get_loops(block)
    depth = next(d for d, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(tile)))
    loops = loops[depth + 1 :]
    if len(loops) != sum(1 for e in extents if e > 1):
        raise ValueError(f"lowrank: {len(loops)} loops under the tile, extents {extents}")
    it = iter(loops)
    return [next(it) if e > 1 else None for e in extents]


def _accumulate(sch: Any, block: Any, tile: Any, extents: list[int]) -> None:
    """A segmented accumulation (iterators rows, segment, columns, reduction) under ``tile``:
    the reduction outermost, rows and segments unrolled, columns vectorised, the
    initialisation hoisted out of the reduction."""
    ii, g, c, r = _loops_under(sch, block, tile, extents)
    spatial = [lp for lp in (ii, g, c) if lp is not None]
    if r is not None:
        sch.reorder(r, *spatial)
    sch.vectorize(c)
    for lp in spatial[:-1]:
        sch.unroll(lp)
    if r is not None:
        sch.decompose_reduction(block, r)


def _sum_segments(sch: Any, block: Any, tile: Any, extents: list[int]) -> None:
    """The sum over segments (iterators rows, columns, segment) under ``tile``: rows
    unrolled, segments serial, columns vectorised inside."""
    ii, c, g = _loops_under(sch, block, tile, extents)
    if g is not None:
        sch.reorder(g, c)
    sch.vectorize(c)
    if ii is not None:
        sch.unroll(ii)
    if g is not None:
        sch.decompose_reduction(block, g)


# ---------------------------------------------------------------------------------------
# the module-level driver


@dataclass
class ScheduleReport:
    """Which rule scheduled each function (and why some were left unscheduled)."""

    rules: dict[str, str]
    matmuls: dict[str, dict[str, Any]]
    failures: dict[str, str]

    def count(self, rule: str) -> int:
        return sum(1 for r in self.rules.values() if r == rule)


def schedule_module(
    mod: Any,
    choose: Callable[[str, Any, MatmulInfo], MatmulConfig | None] | None = None,
    target: Any = None,
) -> tuple[Any, ScheduleReport]:
    """Schedule every unscheduled PrimFunc of ``mod`` for ``target`` (a
    :class:`splice.target.Target`: its vector lanes and registers shape the tiles; AVX2's
    when None).

    ``choose(name, func, info)`` picks the matmul tile sizes (the tuner); by default
    :func:`default_matmul_config`.
    """
    _, _, tirx = _tvm()
    cpu = CpuShape.of(target)
    rules: dict[str, str] = {}
    matmuls: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            continue
        name = gv.name_hint
        new, rule = None, "unscheduled"
        errors: list[str] = []
        if func.attrs is not None and func.attrs.get("splice.kernel", None) == LOWRANK_KERNEL:
            try:
                new, rule = schedule_lowrank(func), "lowrank"
                matmuls[name] = {
                    "kernel": LOWRANK_KERNEL,
                    **{
                        key: int(func.attrs[f"splice.{key}"])
                        for key in ("rows", "m", "n", "k", "groups", *LowRankPlan.__annotations__)
                    },
                }
            except Exception as e:  # left to the generic rules (correct, slow)
                errors.append(f"lowrank: {_first_line(e)}")
        if func.attrs is not None and func.attrs.get("splice.kernel", None) == "moe_ffn":
            # the sparse moe_ffn kernel (tvm_moe_ffn.py) is written scheduled: kept as it is
            new, rule = func, "moe_ffn"
            matmuls[name] = {
                "kernel": "moe_ffn",
                **{
                    key: int(func.attrs[f"splice.{key}"])
                    for key in ("rows", "d", "experts", "s", "d_out", "slots", "top_k")
                },
            }
        info = analyse_matmul(func) if new is None else None
        if info is not None:
            cfg = (
                choose(name, func, info) if choose is not None else default_matmul_config(info, cpu)
            )
            if cfg is not None:
                try:
                    new, rule = schedule_matmul(func, info, cfg), "matmul"
                    matmuls[name] = {
                        **cfg.to_json(),
                        "m": info.m,
                        "n": info.n,
                        "k": info.k,
                        "batch": info.batch,
                        "weight": info.layout_free,
                    }
                except Exception as e:  # fall through to the generic rules
                    errors.append(f"matmul: {_first_line(e)}")
        for rule_name, fn in (
            ("row", lambda f: schedule_rows(f, cpu.lanes)),
            ("injective", lambda f: schedule_injective(f, lanes=cpu.lanes)),
            ("fallback", schedule_fallback),
        ):
            if new is not None:
                break
            try:
                new = fn(func)
                if new is not None:
                    rule = rule_name
            except Exception as e:
                errors.append(f"{rule_name}: {_first_line(e)}")
        if new is not None:
            mod[gv] = new.with_attr("tirx.is_scheduled", True)
        if errors:  # rules that did not apply, kept so that a slow kernel can be explained
            failures[name] = "; ".join(errors)
        rules[name] = rule
    return mod, ScheduleReport(rules, matmuls, failures)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = next((ln for ln in text if "Error" in ln or "error" in ln), text[0] if text else "")
    return f"{type(e).__name__}: {msg[:200]}"


def iter_prim_funcs(mod: Any) -> Iterable[tuple[str, Any]]:
    _, _, tirx = _tvm()
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc):
            yield gv.name_hint, f


__all__ = [
    "LOWRANK_KERNEL",
    "CpuShape",
    "LowRankPlan",
    "MatmulConfig",
    "MatmulInfo",
    "ScheduleReport",
    "analyse_matmul",
    "default_matmul_config",
    "lowrank_plan",
    "matmul_candidates",
    "schedule_injective",
    "schedule_lowrank",
    "schedule_matmul",
    "schedule_module",
    "schedule_rows",
]
