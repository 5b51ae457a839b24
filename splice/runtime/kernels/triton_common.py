"""Helpers the Triton kernel launchers share (``triton_lowrank_linear``, ``triton_moe_ffn``)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def is_fake_tensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (torch.compile / export tracing): no data to launch on."""
    return is_fake(t)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``: IEEE fp32 unless
    ``torch.get_float32_matmul_precision()`` allows TF32, as ``F.linear`` does."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


__all__ = ["dot_precision", "is_fake_tensor"]
