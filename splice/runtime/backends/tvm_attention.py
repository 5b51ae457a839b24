"""How ``aten.scaled_dot_product_attention`` reaches TVM: a decomposition that reads the
key cache in its own layout.

torch's own decomposition of SDPA (its math path) scales *both* operands by
``sqrt(scale)``: ``q * s`` and ``kᵀ * s`` — the second is a transposed, scaled copy of the
whole key tensor, which for a decode step over a static KV cache is a full copy of every
layer's key cache per generated token (``fused_transpose_multiply_broadcast_to_reshape``
in a decode profile, at half the memory bandwidth), and it keeps TVM's
``FuseTransposeMatmul`` from seeing ``q @ kᵀ``.

:func:`sdpa_decomposition` computes the same attention as ``(q * scale) @ kᵀ``: the
scale goes on the query (one row per head when decoding), and ``q @ kᵀ`` stays a
``matmul(x, permute_dims(k))`` that ``FuseTransposeMatmul`` turns into one NT-matmul
reading the key rows where they are. Grouped-query attention (``enable_gqa``) folds the
query heads of a group into the rows of the product instead of repeating keys and values.
Masks, ``is_causal``, the fully-masked-row rule (``_safe_softmax``: a row masked
everywhere gives zeros) and dropout are torch's semantics. Results equal torch's up to
float rounding (one multiplication by ``scale`` in place of two by ``sqrt(scale)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

aten = torch.ops.aten


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril()


def sdpa_decomposition(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` in core ATen ops, query-side scaling."""
    *batch, h, tq, d = query.shape
    hk, tk, dv = key.shape[-3], key.shape[-2], value.shape[-1]
    if list(key.shape[:-3]) != batch:  # broadcast batch dimensions
        key = key.expand(*batch, hk, tk, d)
        value = value.expand(*batch, hk, tk, dv)
    factor = 1.0 / math.sqrt(d) if scale is None else scale
    groups = h // hk if enable_gqa and hk != h else 1
    # 3-D products: bmm(q, kᵀ) imports as matmul(q, permute_dims(k)), one NT-matmul; query
    # heads g*groups .. g*groups+groups-1 share kv head g, so they become rows of group g
    q3 = (query * factor).reshape(-1, groups * tq, d)
    key_t = key.transpose(-2, -1)
    if key_t.is_contiguous():  # keys stored transposed (capture_lm's cache): q · Kᵀ is NN
        scores = torch.bmm(q3, key_t.reshape(-1, d, tk))
    else:
        scores = torch.bmm(q3, key.reshape(-1, tk, d).transpose(1, 2))
    scores = scores.reshape(*batch, h, tq, tk)
    if is_causal:
        scores = scores.masked_fill(~_causal_mask(tq, tk, query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = aten._safe_softmax(scores, -1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
    out = torch.bmm(probs.reshape(-1, groups * tq, tk), value.reshape(-1, tk, dv))
    return out.reshape(*batch, h, tq, dv)


def fold_permute_pairs(mod: Any) -> Any:
    """``mod`` with ``permute_dims(permute_dims(x, a), b)`` in ``main`` replaced by one
    permutation of ``x`` (or ``x`` itself where they cancel).

    The transposed key cache is shown to the model as a transposed view and transposed back
    by :func:`sdpa_decomposition`; TVM would otherwise fuse the pair into a copy kernel."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def axes_of(call: Any, ndim: int) -> list[int]:
        axes = call.attrs.axes
        return list(range(ndim))[::-1] if axes is None else [int(a) for a in axes]

    @mutator
    class _Fold(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.permute_dims":
                return call
            arg = call.args[0]
            inner = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
            if getattr(getattr(inner, "op", None), "name", None) != "relax.permute_dims":
                return call
            ndim = int(call.ty.ndim)
            if ndim < 0:
                return call
            a, b = axes_of(inner, ndim), axes_of(call, ndim)
            composed = [a[i] for i in b]
            if composed == list(range(ndim)):
                return inner.args[0]
            return relax.op.permute_dims(inner.args[0], composed)

    gv = mod.get_global_var("main")
    folder = _Fold(mod)
    folder.builder_.update_func(gv, folder.visit_expr(mod[gv]))
    return relax.transform.DeadCodeElimination(["main"])(folder.builder_.get())


def attention_decompositions() -> dict[object, object]:
    """``{aten.scaled_dot_product_attention.default: sdpa_decomposition}`` for
    ``ExportedProgram.run_decompositions``."""
    return {aten.scaled_dot_product_attention.default: sdpa_decomposition}


__all__ = ["attention_decompositions", "fold_permute_pairs", "sdpa_decomposition"]
