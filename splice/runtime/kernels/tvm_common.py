"""Helpers the TVM kernel converters share (``tvm_lowrank_linear``, ``tvm_moe_ffn``)."""

from __future__ import annotations

from typing import Any


def static_shape(expr: Any) -> list[int] | None:
    """The static shape of a Relax expression (from its type, or its struct info in releases
    that have one), or ``None`` when some dimension is symbolic or the shape is unknown."""
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        return None


__all__ = ["static_shape"]
