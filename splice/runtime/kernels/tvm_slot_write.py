"""In-place slot writes: a static KV cache updated where it lies instead of copied.

A decode program (:func:`splice.capture_lm`) writes each layer's new key and value into
slot ``position`` of its cache functionally::

    cache' = where(arange(L).reshape(1, 1, L, 1) == position.reshape(1, 1, 1, 1), new, cache)

Compiled as written, that reads the whole cache and writes a whole new one per layer per
token (a copy the size of the cache on every step of a memory-bound loop).
:func:`rewrite_slot_writes` finds this pattern in ``main`` where ``cache`` is one of the
function's inputs used nowhere else, and replaces it with
``R.call_tir_inplace(splice_write_slot, [cache, new, position])``: a kernel that writes
the ``new`` row into slot ``position`` of the input buffer itself (nothing when the
position is outside ``[0, L)``, as the ``where`` would), whose result *is* the input
buffer. The artifact's part records those inputs as ``inplace_inputs``;
:class:`splice.runtime.artifact.CompiledModel` copies them before each call unless the
caller donates them (:meth:`~splice.runtime.artifact.CompiledModel.run_donated`, what
:class:`splice.runtime.Generator` does), so ``run`` keeps functional semantics.

TVM is imported lazily (this module is imported by the TVM backend only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from splice.runtime.kernels.tvm_common import static_shape

SLOT_KERNEL = "write_slot"


def slot_write_prim_func(cache_shape: Sequence[int], axis: int, pos_shape: Sequence[int],
                         dtype: str, pos_dtype: str) -> Any:  # fmt: skip
    """``cache[..., position, ...] = new[..., 0, ...]`` along ``axis``, in place; no write
    when ``position`` is outside ``[0, cache_shape[axis])``."""
    from tvm.script import tirx as T

    cshape = tuple(int(d) for d in cache_shape)
    nshape = tuple(1 if i == axis else d for i, d in enumerate(cshape))
    pshape = tuple(int(d) for d in pos_shape)
    length = cshape[axis]
    outer, inner = math.prod(cshape[:axis]), math.prod(cshape[axis + 1 :])

    # whole-buffer regions for the block's reads/writes (TVMScript takes slices, not buffers)
    c_all = tuple(slice(0, d) for d in cshape)
    n_all = tuple(slice(0, d) for d in nshape)
    p_all = tuple(slice(0, d) for d in pshape)

    @T.prim_func(private=True, s_tir=True)
    def splice_write_slot(
        c: T.Buffer(cshape, dtype), n: T.Buffer(nshape, dtype), p: T.Buffer(pshape, pos_dtype)
    ):
        # op_pattern 8 (opaque): FuseOps must not fuse the producer of `n` into it
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "splice.kernel": "write_slot", "op_pattern": 8})  # fmt: skip
        with T.sblock("root"):  # noqa: SIM117 - TVMScript: one block per `with`
            with T.sblock("write"):  # opaque: the slot index is data
                T.reads(n[n_all], p[p_all])
                T.writes(c[c_all])
                flat_c = T.decl_buffer((outer * length * inner,), dtype, data=c.data)
                flat_n = T.decl_buffer((outer * inner,), dtype, data=n.data)
                flat_p = T.decl_buffer((1,), pos_dtype, data=p.data)
                if flat_p[0] >= 0 and flat_p[0] < length:
                    for o, i in T.grid(outer, inner):
                        at = (o * length + T.Cast("int64", flat_p[0])) * inner + i
                        flat_c[at] = flat_n[o * inner + i]

    return splice_write_slot


def _ramp_axis(expr: Any, lookup: Any, ndim: int) -> tuple[int, int] | None:
    """(axis, length) if ``expr`` is ``arange(0, L, 1)`` (or that constant, folded)
    reshaped to ones but ``L`` at one axis of an ``ndim``-d shape; else None."""
    import tvm
    from tvm import relax

    shape = static_shape(expr)
    if shape is None or len(shape) != ndim or sorted(shape)[:-1] != [1] * (ndim - 1):
        return None
    axis = max(range(ndim), key=lambda i: shape[i])
    base = _through_reshapes(expr, lookup)
    if isinstance(base, tvm.ir.expr.Constant):  # folded before lowering (compile's prepare)
        values = base.value.numpy().ravel().tolist()
        return (axis, len(values)) if values == list(range(shape[axis])) else None
    if not (isinstance(base, relax.Call) and getattr(base.op, "name", None) == "relax.arange"):
        return None
    try:
        start, end, step = (int(a.value) for a in base.args[:3])
    except (AttributeError, TypeError, ValueError):
        return None
    if (start, step) != (0, 1) or end != shape[axis]:
        return None
    return axis, end


def _through_reshapes(expr: Any, lookup: Any) -> Any:
    """The value under a chain of reshape / expand_dims bindings (a Var or a Call)."""
    from tvm import relax

    names = {"relax.reshape", "relax.expand_dims"}
    while isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            return expr
        if isinstance(bound, relax.Call) and getattr(bound.op, "name", None) in names:
            expr = bound.args[0]
            continue
        return bound
    return expr


def rewrite_slot_writes(mod: Any, inputs: int) -> tuple[Any, list[int]]:
    """Rewrite ``main``'s functional slot writes into its first ``inputs`` parameters as
    in-place kernel calls (see the module docstring); returns the module and the indices
    of the parameters now written in place."""
    from tvm import relax
    from tvm.relax.analysis import all_vars
    from tvm.relax.expr_functor import PyExprMutator, mutator

    gv_main = mod.get_global_var("main")
    func = mod[gv_main]
    params = list(func.params)[:inputs]
    index = {p: i for i, p in enumerate(params)}
    uses: dict[Any, int] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for v in all_vars(binding.value):
                uses[v] = uses.get(v, 0) + 1
    for v in all_vars(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    done: list[int] = []
    kernels: dict[tuple[Any, ...], Any] = {}

    @mutator
    class _Rewrite(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.where":
                return call
            cond, new, cache = call.args
            if cache not in index or uses.get(cache, 0) != 1:
                return call
            site = self._site(cond, new, cache)
            if site is None:
                return call
            axis, position = site
            cshape, dtype = static_shape(cache) or [], str(cache.ty.dtype)
            pshape, pdtype = static_shape(position) or [], str(position.ty.dtype)
            key = (tuple(cshape), axis, tuple(pshape), dtype, pdtype)
            gv = kernels.get(key)
            if gv is None:
                prim = slot_write_prim_func(cshape, axis, pshape, dtype, pdtype)
                gv = kernels[key] = self.builder_.add_func(prim, "splice_write_slot")
            done.append(index[cache])
            return relax.call_tir_inplace(gv, [cache, new, position], [0], cache.ty)

        def _site(self, cond: Any, new: Any, cache: Any) -> tuple[int, Any] | None:
            cshape, nshape = static_shape(cache), static_shape(new)
            if cshape is None or nshape is None or len(cshape) != len(nshape):
                return None
            if str(new.ty.dtype) != str(cache.ty.dtype) or static_shape(cond) is None:
                return None
            bound = self.lookup_binding(cond) if isinstance(cond, relax.Var) else None
            if not (
                isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.equal"
            ):
                return None
            ndim = len(cshape)
            for ramp, pos in (bound.args, bound.args[::-1]):
                found = _ramp_axis(ramp, self.lookup_binding, ndim)
                if found is None:
                    continue
                axis, length = found
                base = _through_reshapes(pos, self.lookup_binding)
                pshape = static_shape(base) if base in index else None
                if pshape is None or math.prod(pshape) != 1:
                    continue
                if not str(base.ty.dtype).startswith("int"):
                    continue
                want = [1 if i == axis else d for i, d in enumerate(cshape)]
                if cshape[axis] != length or list(nshape) != want:
                    continue
                return axis, base
            return None

    rewriter = _Rewrite(mod)
    new_func = rewriter.visit_expr(func)
    if not done:
        return mod, []
    rewriter.builder_.update_func(gv_main, new_func)
    out = relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get())
    return out, sorted(done)


__all__ = ["SLOT_KERNEL", "rewrite_slot_writes", "slot_write_prim_func"]
