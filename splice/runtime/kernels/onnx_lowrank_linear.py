"""ONNX lowering of ``splice::lowrank_linear``: a call of an onnxscript function.

The functions (domain ``splice``) are the op's reference, ``y = (x Bᵣᵀ) Aᵣᵀ (+ bias)``
with ``Aᵣ = A[:, :rank]`` and ``Bᵣ = B[:rank]`` (the ``rank`` attribute selects a prefix of
the factors; the exporter passes ``min(rank, k)``, or k when the op has no rank):

* ``splice.lowrank_linear(x, A, B; rank)``
* ``splice.lowrank_linear_bias(x, A, B, bias; rank)``

This module imports onnxscript (onnxscript compiles the functions from their source, which
must see its names as module globals); the ONNX backend imports it at its first export.
"""

from typing import Any

import onnxscript
from onnxscript import FLOAT
from onnxscript import opset18 as op

from splice.runtime.kernels.onnx_common import SPLICE_DOMAIN, SPLICE_DOMAIN_VERSION, OnnxContext

_DOMAIN = onnxscript.values.Opset(SPLICE_DOMAIN, SPLICE_DOMAIN_VERSION)


@onnxscript.script(opset=_DOMAIN, default_opset=op)
def lowrank_linear(x: FLOAT, A: FLOAT, B: FLOAT, rank: int) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    r = op.Reshape(op.Constant(value_int=rank), one)
    b_r = op.Slice(B, zero, r, zero)
    a_r = op.Slice(A, zero, r, one)
    h = op.MatMul(x, op.Transpose(b_r, perm=[1, 0]))
    return op.MatMul(h, op.Transpose(a_r, perm=[1, 0]))


@onnxscript.script(opset=_DOMAIN, default_opset=op)
def lowrank_linear_bias(x: FLOAT, A: FLOAT, B: FLOAT, bias: FLOAT, rank: int) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    r = op.Reshape(op.Constant(value_int=rank), one)
    b_r = op.Slice(B, zero, r, zero)
    a_r = op.Slice(A, zero, r, one)
    h = op.MatMul(x, op.Transpose(b_r, perm=[1, 0]))
    return op.Add(op.MatMul(h, op.Transpose(a_r, perm=[1, 0])), bias)


FUNCTIONS = {"lowrank_linear": lowrank_linear, "lowrank_linear_bias": lowrank_linear_bias}
"""The onnxscript functions, by name."""


def translate_lowrank_linear(
    ctx: OnnxContext, x: Any, A: Any, B: Any, bias: Any = None, rank: Any = None
) -> Any:
    """The ONNX translation of one ``splice::lowrank_linear`` node (the ``onnx`` calling
    convention of :mod:`splice.ir.lowerings`)."""
    k = int(A.shape[1])
    r = k if rank is None else max(0, min(int(rank), k))
    inputs = [("x", x), ("A", A), ("B", B)]
    name = "lowrank_linear"
    if bias is not None:
        inputs.append(("bias", bias))
        name = "lowrank_linear_bias"
    fn = FUNCTIONS[name]
    return ctx.call(name, fn.to_function_proto, inputs, [("rank", "INT", r)])


__all__ = ["FUNCTIONS", "lowrank_linear", "lowrank_linear_bias", "translate_lowrank_linear"]
