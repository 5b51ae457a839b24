"""import_onnx(model) -> Program: an ONNX model read back into splice's IR.

An ONNX model that exists only as a file (a third-party export, or one splice exported)
becomes a Program like :func:`splice.ir.capture.capture` makes: an ATen-level FX graph with
named inputs and outputs, weights as ``get_attr`` nodes, a spec and a Loc on every node. The
passes then work on it as on a captured model (``lowrank`` finds its Gemm/MatMul layers).

How: the ONNX graph is interpreted by a small ``nn.Module`` that runs one torch function per
ONNX node, and that module is exported with ``torch.export`` (the path ``capture`` takes).

* **Weights.** Floating-point initializers with more than one element become parameters
  (BatchNormalization's running statistics become buffers), named after the initializer
  (made usable by :func:`~splice.ir.program.safe_weight_name`: ``transformer.h.0.attn.
  c_attn.weight`` stays as it is). Other initializers are constants.
* **Constant folding.** The graph is first run once eagerly on example inputs. A value that
  depends on no input data and no parameter (a ``Constant``, a small initializer, a
  ``Shape`` and everything computed from those: Gather/Concat/Unsqueeze/Cast/Range...) is
  *static*: its node is folded, and where a traced op needs it as an argument it is a Python
  int list (Reshape targets, Slice bounds, Expand shapes), a Python scalar (``x * 0.5``), or,
  as a tensor operand, a non-persistent buffer ``onnx_const.<value name>``. So an exported
  graph's shape arithmetic disappears and the Program reads as clean ATen.
* **Shapes are static.** Input shapes come from the model's input value_info; a symbolic dim
  (``dim_param``) needs ``shapes={"input_ids": (1, 8)}``, or a CaptureError says so. One
  Program is one input signature, as for ``capture``.
* **Functions.** A model-local function of the ``splice`` domain whose name is a splice op
  (``splice.lowrank_linear``, ``splice.moe_ffn``) becomes that op
  (``torch.ops.splice.<name>``): tensor arguments are the node's inputs in schema order (an
  empty name is a missing optional input), the others its attributes by schema name. Any
  other function is inlined (interpreted from its body).
* **Control flow.** An ``If`` on a folded condition is inlined; on a data-dependent one it
  becomes ``torch.cond``, the values each branch reads from outside passed as operands.
* **Locations.** A node's module path and source line come from the exporter's node
  metadata: ``splice.module`` / ``splice.source`` / ``splice.passes`` (splice's exporter) or
  ``pkg.torch.onnx.name_scopes`` / ``pkg.torch.onnx.stack_trace`` (torch.onnx's), so a pass's
  ``targets=`` globs work on an imported model.
* **Errors.** An op this importer does not know raises :class:`~splice.errors.CaptureError`
  naming the op type, its domain and the node; :func:`supported_ops` lists what is known.

Gather with data-dependent indices on a 2-D floating table along axis 0 is an embedding
lookup (``aten.embedding``), as PyTorch exporters write it; negative ids, which ONNX would
wrap, are out of range there as they are in PyTorch.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import re
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splice.errors import CaptureError, SpliceError
from splice.ir import meta as M
from splice.ir.capture import ident, to_program
from splice.ir.ops import MOE_ACTIVATIONS, OPS
from splice.ir.program import Program, safe_weight_name

_META_KEY = "splice_onnx_node"

# ---------------------------------------------------------------------------------------
# values


@dataclass(eq=False)
class Const:
    """A value known while importing (folded): a real tensor that depends on no input."""

    value: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        # read while nothing traces: under torch.export a real tensor read becomes symbolic
        self.items: list[Any] | None = (
            self.value.reshape(-1).tolist() if self.value.numel() <= 4096 else None
        )

    def flat(self) -> list[Any]:
        if self.items is None:
            self.items = self.value.reshape(-1).tolist()
        return self.items


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_static(v: Any) -> bool:
    if v is None or isinstance(v, Const):
        return True
    if isinstance(v, list):
        return all(_is_static(x) for x in v)
    return False


_ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    4: torch.uint16,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.uint32,
    13: torch.uint64,
    16: torch.bfloat16,
}


def _dtype(elem_type: int, where: str) -> torch.dtype:
    if elem_type not in _ONNX_DTYPES:
        raise CaptureError(
            f"ONNX element type {elem_type} is not supported by splice.import_onnx",
            where=where,
            hint="splice handles float, integer and bool tensors; cast the value in the model",
        )
    return _ONNX_DTYPES[elem_type]


def _tensor_from_proto(t: Any) -> torch.Tensor:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    if t.data_type == 16:  # bfloat16: numpy has no such type; the bits are kept
        return (
            torch.from_numpy(arr.view("uint16").astype("int32"))
            .to(torch.int16)
            .view(torch.bfloat16)
        )
    return torch.from_numpy(arr.copy())


def _attrs(attributes: Any, outer: Mapping[str, Any]) -> dict[str, Any]:
    """AttributeProtos (a node's, or a function's defaults) as Python values;
    ``ref_attr_name`` (inside a function) reads the calling node's attribute from
    ``outer``."""
    from onnx import AttributeProto, helper

    out: dict[str, Any] = {}
    for a in attributes:
        if a.ref_attr_name:
            if a.ref_attr_name in outer:
                out[a.name] = outer[a.ref_attr_name]
            continue
        v = helper.get_attribute_value(a)
        if a.type == AttributeProto.TENSOR:
            v = _tensor_from_proto(v)
        elif a.type == AttributeProto.STRING:
            v = v.decode()
        elif a.type == AttributeProto.STRINGS:
            v = [s.decode() for s in v]
        elif a.type == AttributeProto.INTS or a.type == AttributeProto.FLOATS:
            v = list(v)
        out[a.name] = v
    return out


# ---------------------------------------------------------------------------------------
# the op table


class _Ctx:
    """What an op function sees: its attributes and the importer's conversions of operands.

    ``t(v)`` is a tensor operand (a static value becomes a buffer while tracing), ``ints`` /
    ``num`` read a static value as Python numbers (a CaptureError when it is not static),
    ``opnd(v, other)`` is a Python scalar where that keeps ONNX's result shape and dtype.
    """

    def __init__(self, imp: _Importer, node: Any, attrs: dict[str, Any], where: str, key: str):
        self.imp = imp
        self.key = key
        self.node = node
        self.a = attrs
        self.where = where

    @property
    def opset(self) -> int:
        return self.imp.opset

    def t(self, v: Any) -> torch.Tensor:
        if isinstance(v, Const):
            return self.imp.const_tensor(v)
        if not isinstance(v, torch.Tensor):
            raise self.fail(f"expected a tensor operand, got {type(v).__name__}")
        return v

    def ints(self, v: Any, what: str = "argument") -> list[int]:
        if not isinstance(v, Const):
            raise self.fail(
                f"its {what} depends on the input data; splice programs have static shapes",
                hint="export the model with static shapes, or fold that computation",
            )
        return [int(x) for x in v.flat()]

    def num(self, v: Any, what: str = "argument") -> Any:
        if not isinstance(v, Const):
            raise self.fail(f"its {what} depends on the input data", hint="make it a constant")
        return v.flat()[0]

    def opnd(self, v: Any, other: Any) -> Any:
        """``v`` as a Python scalar when it is a one-element static value no wider than the
        other operand (so broadcasting gives ONNX's shape), else as a tensor."""
        if (
            isinstance(v, Const)
            and v.value.numel() == 1
            and isinstance(other, torch.Tensor)
            and v.value.dim() <= other.dim()
            and v.value.dtype.is_floating_point == other.dtype.is_floating_point
            and (v.value.dtype == torch.bool) == (other.dtype == torch.bool)
        ):
            return v.flat()[0]
        return self.t(v)

    def derived(self, tag: str, make: Callable[[], Const]) -> Const:
        """A static value an op derives from static operands (normalised indices...): made
        once, while folding, and reused while tracing (where tensor reads would trace)."""
        key = (self.key, tag)
        if key not in self.imp.derived:
            self.imp.derived[key] = make()
        return self.imp.derived[key]

    def dtype(self, v: Any) -> torch.dtype:
        return v.value.dtype if isinstance(v, Const) else v.dtype

    def shape(self, v: Any) -> list[int]:
        return list((v.value if isinstance(v, Const) else v).shape)

    def fail(self, message: str, hint: str | None = None) -> CaptureError:
        return CaptureError(
            f"ONNX node {self.node.op_type} cannot be imported: {message}",
            where=self.where,
            hint=hint,
        )


OpFn = Callable[[_Ctx, list[Any]], Any]
_OPS: dict[str, OpFn] = {}


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for n in names:
            _OPS[n] = fn
        return fn

    return deco


def supported_ops() -> list[str]:
    """The ONNX op types (default domain) :func:`import_onnx` converts, sorted."""
    return sorted({*_OPS, "If"})


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# elementwise ---------------------------------------------------------------------------

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
}


def _binary_operands(c: _Ctx, ins: list[Any]) -> tuple[Any, Any]:
    a, b = ins
    if isinstance(a, Const) and isinstance(b, Const):
        return a.value, b.value
    return c.opnd(a, b), c.opnd(b, a)


_COMMUTATIVE = {
    torch.add,
    torch.mul,
    torch.eq,
    torch.logical_and,
    torch.logical_or,
    torch.logical_xor,
    torch.bitwise_and,
    torch.bitwise_or,
}
_MIRRORED = {torch.lt: torch.gt, torch.gt: torch.lt, torch.le: torch.ge, torch.ge: torch.le}


@_op(*_BINARY)
def _binary(c: _Ctx, ins: list[Any]) -> Any:
    fn = _BINARY[c.node.op_type]
    base, exponent = ins
    if (
        fn is torch.pow
        and isinstance(base, torch.Tensor)
        and isinstance(exponent, Const)
        and exponent.value.numel() == 1
        and exponent.value.dim() <= base.dim()
    ):
        out = torch.pow(base, exponent.flat()[0])  # x ** 3.0: aten.pow.Tensor_Scalar
        return out if out.dtype == base.dtype else out.to(base.dtype)
    a, b = _binary_operands(c, ins)
    if not isinstance(a, torch.Tensor):  # a Python scalar first: put the tensor first
        if fn in _COMMUTATIVE:
            return fn(b, a)
        if fn in _MIRRORED:
            return _MIRRORED[fn](b, a)
        if fn is torch.sub:
            return torch.rsub(b, a)
        return torch.pow(a, b)
    out = fn(a, b)
    if fn is torch.pow and out.dtype != a.dtype:  # ONNX Pow keeps the base's type
        out = out.to(a.dtype)
    return out


@_op("Div")
def _div(c: _Ctx, ins: list[Any]) -> Any:
    a, b = _binary_operands(c, ins)
    integral = not c.dtype(ins[0]).is_floating_point
    if not isinstance(a, torch.Tensor):
        return torch.div(torch.full_like(b, a), b, rounding_mode="trunc" if integral else None)
    return torch.div(a, b, rounding_mode="trunc" if integral else None)


@_op("Mod")
def _mod(c: _Ctx, ins: list[Any]) -> Any:
    a, b = _binary_operands(c, ins)
    return torch.fmod(a, b) if c.a.get("fmod", 0) else torch.remainder(a, b)


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Not": torch.logical_not,
    "BitwiseNot": torch.bitwise_not,
    "IsNaN": torch.isnan,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
    "Selu": F.selu,
}


@_op(*_UNARY)
def _unary(c: _Ctx, ins: list[Any]) -> Any:
    return _UNARY[c.node.op_type](c.t(ins[0]))


@_op("IsInf")
def _isinf(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    neg, pos = c.a.get("detect_negative", 1), c.a.get("detect_positive", 1)
    if neg and pos:
        return torch.isinf(x)
    return (
        torch.isneginf(x)
        if neg
        else torch.isposinf(x)
        if pos
        else torch.zeros_like(x, dtype=torch.bool)
    )


@_op("Gelu")
def _gelu(c: _Ctx, ins: list[Any]) -> Any:
    return F.gelu(c.t(ins[0]), approximate=c.a.get("approximate", "none"))


@_op("LeakyRelu")
def _leaky_relu(c: _Ctx, ins: list[Any]) -> Any:
    return F.leaky_relu(c.t(ins[0]), c.a.get("alpha", 0.01))


@_op("Elu")
def _elu(c: _Ctx, ins: list[Any]) -> Any:
    return F.elu(c.t(ins[0]), c.a.get("alpha", 1.0))


@_op("HardSigmoid")
def _hard_sigmoid(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    return torch.clamp(x * c.a.get("alpha", 0.2) + c.a.get("beta", 0.5), 0.0, 1.0)


@_op("PRelu")
def _prelu(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    return torch.where(x >= 0, x, x * c.t(ins[1]))


@_op("Clip")
def _clip(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    lo = c.a.get("min") if len(ins) < 2 or ins[1] is None else c.opnd(ins[1], x)
    hi = c.a.get("max") if len(ins) < 3 or ins[2] is None else c.opnd(ins[2], x)
    return torch.clamp(x, lo, hi)


@_op("Max", "Min", "Sum", "Mean")
def _variadic(c: _Ctx, ins: list[Any]) -> Any:
    kind = c.node.op_type
    if kind in ("Max", "Min") and len(ins) == 2:
        dyn = [v for v in ins if not isinstance(v, Const)]
        const = [v for v in ins if isinstance(v, Const)]
        if len(dyn) == 1 and len(const) == 1:
            s = c.opnd(const[0], dyn[0])
            if not isinstance(s, torch.Tensor):
                x = dyn[0]
                return torch.clamp(x, min=s) if kind == "Max" else torch.clamp(x, max=s)
    ts = [c.t(v) for v in ins]
    out = ts[0]
    for t in ts[1:]:
        if kind == "Max":
            out = torch.maximum(out, t)
        elif kind == "Min":
            out = torch.minimum(out, t)
        else:
            out = out + t
    return out / len(ts) if kind == "Mean" else out


@_op("Where")
def _where(c: _Ctx, ins: list[Any]) -> Any:
    cond, a, b = ins
    cond_t = c.t(cond)
    if isinstance(a, Const) and isinstance(b, Const):
        return torch.where(cond_t, c.t(a), c.t(b))
    return torch.where(cond_t, c.opnd(a, b), c.opnd(b, a))


@_op("Identity")
def _identity(c: _Ctx, ins: list[Any]) -> Any:
    return ins[0]


@_op("Dropout")
def _dropout(c: _Ctx, ins: list[Any]) -> Any:
    x = ins[0]
    if len(c.node.output) > 1 and c.node.output[1]:
        return x, torch.ones_like(c.t(x), dtype=torch.bool)
    return x


@_op("Cast")
def _cast(c: _Ctx, ins: list[Any]) -> Any:
    return c.t(ins[0]).to(_dtype(c.a["to"], c.where))


@_op("CastLike")
def _cast_like(c: _Ctx, ins: list[Any]) -> Any:
    return c.t(ins[0]).to(c.dtype(ins[1]))


# linear algebra and normalisation --------------------------------------------------------


@_op("MatMul")
def _matmul(c: _Ctx, ins: list[Any]) -> Any:
    return torch.matmul(c.t(ins[0]), c.t(ins[1]))


@_op("Gemm")
def _gemm(c: _Ctx, ins: list[Any]) -> Any:
    a, b = c.t(ins[0]), c.t(ins[1])
    bias = ins[2] if len(ins) > 2 else None
    alpha, beta = c.a.get("alpha", 1.0), c.a.get("beta", 1.0)
    if c.a.get("transA", 0):
        a = a.t()
    n = b.shape[0] if c.a.get("transB", 0) else b.shape[1]
    vec_bias = bias is not None and c.shape(bias) == [n] and beta == 1.0
    if alpha == 1.0 and (bias is None or vec_bias):
        bias_t = None if bias is None else c.t(bias)
        if c.a.get("transB", 0):
            return F.linear(a, b, bias_t)  # y = x Wᵀ + b: nn.Linear's form
        return torch.matmul(a, b) if bias_t is None else torch.addmm(bias_t, a, b)
    y = torch.matmul(a, b.t() if c.a.get("transB", 0) else b)
    if alpha != 1.0:
        y = y * alpha
    if bias is not None:
        bt = c.opnd(bias, y)
        y = y + (bt * beta if beta != 1.0 else bt)
    return y


@_op("Einsum")
def _einsum(c: _Ctx, ins: list[Any]) -> Any:
    return torch.einsum(c.a["equation"], *[c.t(v) for v in ins])


@_op("Attention")
def _attention(c: _Ctx, ins: list[Any]) -> Any:
    """ONNX Attention (opset 23) as ``scaled_dot_product_attention``: 4-D ``[B, heads, S,
    d]`` or 3-D ``[B, S, heads*d]`` inputs, grouped KV heads, a boolean or additive mask,
    causal (top-left aligned, as in PyTorch), past key/value concatenated."""
    if c.a.get("softcap", 0.0) or (len(c.node.output) > 3 and c.node.output[3]):
        raise c.fail("softcap and the qk_matmul_output output are not supported")
    q, k, v = (c.t(x) for x in ins[:3])
    mask = c.t(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    three_d = q.dim() == 3
    if three_d:
        qh, kvh = c.a["q_num_heads"], c.a["kv_num_heads"]
        b, s = q.shape[0], q.shape[1]
        q = q.reshape(b, s, qh, -1).transpose(1, 2)
        k = k.reshape(b, k.shape[1], kvh, -1).transpose(1, 2)
        v = v.reshape(b, v.shape[1], kvh, -1).transpose(1, 2)
    if len(ins) > 5 and ins[4] is not None and ins[5] is not None:
        k = torch.cat([c.t(ins[4]), k], 2)
        v = torch.cat([c.t(ins[5]), v], 2)
    causal = bool(c.a.get("is_causal", 0))
    if causal and mask is not None:
        size = (q.shape[-2], k.shape[-2])
        keep_t = c.t(
            c.derived("causal", lambda: Const(torch.ones(size, dtype=torch.bool).tril(), "causal"))
        )
        if mask.dtype == torch.bool:
            mask = torch.logical_and(mask, keep_t)
        else:
            mask = torch.where(keep_t, mask, -math.inf)
        causal = False
    y = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal,
        scale=c.a.get("scale"),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    extra = [o for o in c.node.output[1:3] if o]
    return (y, k, v) if extra else y


@_op("BatchNormalization")
def _batch_norm(c: _Ctx, ins: list[Any]) -> Any:
    if c.a.get("training_mode", 0):
        raise c.fail("training_mode=1 is not an inference graph", hint="export in eval mode")
    x, scale, bias, mean, var = (c.t(v) for v in ins[:5])
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, c.a.get("epsilon", 1e-5))


@_op("InstanceNormalization")
def _instance_norm(c: _Ctx, ins: list[Any]) -> Any:
    x, scale, bias = (c.t(v) for v in ins[:3])
    return F.instance_norm(x, weight=scale, bias=bias, eps=c.a.get("epsilon", 1e-5))


@_op("LayerNormalization")
def _layer_norm(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.a.get("axis", -1), x.dim())
    eps = c.a.get("epsilon", 1e-5)
    shape = list(x.shape[axis:])
    scale = c.t(ins[1])
    bias = c.t(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    if list(scale.shape) == shape and (bias is None or list(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:
        y = F.layer_norm(x, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    extra = [o for o in c.node.output[1:] if o]
    if not extra:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
    return y, mean, inv


@_op("RMSNormalization")
def _rms_norm(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.a.get("axis", -1), x.dim())
    shape = list(x.shape[axis:])
    scale = c.t(ins[1])
    eps = c.a.get("epsilon", 1e-5)
    if list(scale.shape) == shape:
        return F.rms_norm(x, shape, scale, eps)
    return F.rms_norm(x, shape, None, eps) * scale


def _softmax_like(c: _Ctx, ins: list[Any], fn: Callable[..., torch.Tensor]) -> Any:
    x = c.t(ins[0])
    if c.opset >= 13:
        return fn(x, _axis(c.a.get("axis", -1), x.dim()))
    axis = _axis(c.a.get("axis", 1), x.dim())  # before opset 13: over the flattened tail
    shape = list(x.shape)
    flat = x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))
    return fn(flat, 1).reshape(shape)


@_op("Softmax")
def _softmax(c: _Ctx, ins: list[Any]) -> Any:
    return _softmax_like(c, ins, F.softmax)


@_op("LogSoftmax")
def _log_softmax(c: _Ctx, ins: list[Any]) -> Any:
    return _softmax_like(c, ins, F.log_softmax)


def _reduce_axes(c: _Ctx, ins: list[Any], rank: int) -> list[int] | None:
    if "axes" in c.a:
        axes = list(c.a["axes"])
    elif len(ins) > 1 and ins[1] is not None:
        axes = c.ints(ins[1], "axes")
    else:
        axes = []
    if not axes:
        return None if not c.a.get("noop_with_empty_axes", 0) else []
    return sorted(_axis(a, rank) for a in axes)


@_op(
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSumExp",
)
def _reduce(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axes = _reduce_axes(c, ins, x.dim())
    keep = bool(c.a.get("keepdims", 1))
    if axes == []:
        return x
    dims = list(range(x.dim())) if axes is None else axes
    kind = c.node.op_type
    if kind == "ReduceMean":
        return torch.mean(x, dims, keepdim=keep)
    if kind == "ReduceSum":
        return torch.sum(x, dims, keepdim=keep)
    if kind == "ReduceMax":
        return torch.amax(x, dims, keepdim=keep)
    if kind == "ReduceMin":
        return torch.amin(x, dims, keepdim=keep)
    if kind == "ReduceSumSquare":
        return torch.sum(x * x, dims, keepdim=keep)
    if kind == "ReduceL2":
        return torch.sqrt(torch.sum(x * x, dims, keepdim=keep))
    if kind == "ReduceLogSumExp":
        return torch.logsumexp(x, dims, keepdim=keep)
    for d in sorted(dims, reverse=True):  # ReduceProd
        x = torch.prod(x, d, keepdim=keep)
    return x


@_op("ArgMax", "ArgMin")
def _argmax(c: _Ctx, ins: list[Any]) -> Any:
    if c.a.get("select_last_index", 0):
        raise c.fail("select_last_index=1 is not supported", hint="export with the first index")
    x = c.t(ins[0])
    fn = torch.argmax if c.node.op_type == "ArgMax" else torch.argmin
    return fn(x, _axis(c.a.get("axis", 0), x.dim()), keepdim=bool(c.a.get("keepdims", 1)))


@_op("TopK")
def _topk(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    k = c.a["k"] if "k" in c.a else c.ints(ins[1], "k")[0]
    axis = _axis(c.a.get("axis", -1), x.dim())
    v, i = torch.topk(
        x, k, axis, largest=bool(c.a.get("largest", 1)), sorted=bool(c.a.get("sorted", 1))
    )
    return v, i


@_op("CumSum")
def _cumsum(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.ints(ins[1], "axis")[0], x.dim())
    if c.a.get("reverse", 0):
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, axis)
    if c.a.get("exclusive", 0):
        n = x.shape[axis]
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, n - 1)], axis)
    return torch.flip(y, [axis]) if c.a.get("reverse", 0) else y


# shapes and indexing -------------------------------------------------------------------


@_op("Constant")
def _constant(c: _Ctx, ins: list[Any]) -> Any:
    a = c.a
    if "value" in a:
        return a["value"]
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(a["value_floats"], dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(a["value_ints"], dtype=torch.int64)
    raise c.fail(f"attributes {sorted(a)} are not supported", hint="use a dense tensor value")


@_op("Shape")
def _shape(c: _Ctx, ins: list[Any]) -> Any:
    shape = c.shape(ins[0])
    start, end = c.a.get("start", 0), c.a.get("end", len(shape))
    return torch.tensor(shape[start:end], dtype=torch.int64)


@_op("Size")
def _size(c: _Ctx, ins: list[Any]) -> Any:
    return torch.tensor(math.prod(c.shape(ins[0])), dtype=torch.int64)


@_op("ConstantOfShape")
def _constant_of_shape(c: _Ctx, ins: list[Any]) -> Any:
    shape = c.ints(ins[0], "shape")
    value = c.a.get("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)


@_op("Range")
def _range(c: _Ctx, ins: list[Any]) -> Any:
    start, limit, delta = (c.num(v, "bounds") for v in ins)
    return torch.arange(start, limit, delta, dtype=c.dtype(ins[0]))


@_op("Reshape")
def _reshape(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    shape = c.ints(ins[1], "target shape")
    if not c.a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return torch.reshape(x, shape)


@_op("Flatten")
def _flatten(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.a.get("axis", 1), x.dim())
    shape = list(x.shape)
    return torch.reshape(x, (math.prod(shape[:axis]), math.prod(shape[axis:])))


@_op("Transpose")
def _transpose(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    perm = c.a.get("perm", list(reversed(range(x.dim()))))
    return torch.permute(x, perm)


@_op("Unsqueeze")
def _unsqueeze(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axes = c.a["axes"] if "axes" in c.a else c.ints(ins[1], "axes")
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = torch.unsqueeze(x, a)
    return x


@_op("Squeeze")
def _squeeze(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    if "axes" in c.a:
        axes = c.a["axes"]
    elif len(ins) > 1 and ins[1] is not None:
        axes = c.ints(ins[1], "axes")
    else:
        axes = [i for i, s in enumerate(x.shape) if s == 1]
    return torch.squeeze(x, tuple(_axis(a, x.dim()) for a in axes))


@_op("Concat")
def _concat(c: _Ctx, ins: list[Any]) -> Any:
    ts = [c.t(v) for v in ins]
    return torch.cat(ts, _axis(c.a["axis"], ts[0].dim()))


@_op("Split")
def _split(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.a.get("axis", 0), x.dim())
    n = len(c.node.output)
    if "split" in c.a:
        sizes = list(c.a["split"])
    elif len(ins) > 1 and ins[1] is not None:
        sizes = c.ints(ins[1], "split sizes")
    else:
        size = x.shape[axis]
        chunk = -(-size // n)
        sizes = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
    return tuple(torch.split(x, sizes, axis))


@_op("Slice")
def _slice(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    if c.opset < 10:
        starts, ends = c.a["starts"], c.a["ends"]
        axes = c.a.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = c.ints(ins[1], "starts"), c.ints(ins[2], "ends")
        axes = (
            c.ints(ins[3], "axes")
            if len(ins) > 3 and ins[3] is not None
            else list(range(len(starts)))
        )
        steps = (
            c.ints(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        )
    index: list[Any] = [slice(None)] * x.dim()
    flips: list[int] = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        n = x.shape[a]
        if st > 0:
            s = min(max(s + n if s < 0 else s, 0), n)
            e = min(max(e + n if e < 0 else e, 0), n)
            if s == 0 and e == n and st == 1:
                continue
            index[a] = slice(s, max(e, s), st)
        else:  # a negative step: slice the flipped axis
            s = min(max(s + n if s < 0 else s, -1), n - 1)
            e = min(max(e + n if e < 0 else e, -1), n - 1)
            flips.append(a)
            index[a] = slice(n - 1 - s, max(n - 1 - e, n - 1 - s), -st)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)] if any(i != slice(None) for i in index) else x


@_op("Gather")
def _gather(c: _Ctx, ins: list[Any]) -> Any:
    data, idx = ins
    x = c.t(data)
    axis = _axis(c.a.get("axis", 0), x.dim())
    n = x.shape[axis]
    if isinstance(idx, Const):
        vals = [v + n if v < 0 else v for v in (int(i) for i in idx.flat())]
        if idx.value.dim() == 0:
            return torch.select(x, axis, vals[0])
        out_shape = list(x.shape[:axis]) + list(idx.value.shape) + list(x.shape[axis + 1 :])
        if vals and vals == list(range(vals[0], vals[0] + len(vals))):
            y = torch.narrow(x, axis, vals[0], len(vals))
        else:
            ix = c.derived("index", lambda: Const(torch.tensor(vals), idx.name + "_index"))
            y = torch.index_select(x, axis, c.t(ix))
        return y if list(y.shape) == out_shape else torch.reshape(y, out_shape)
    if axis == 0 and x.dim() == 2 and x.dtype.is_floating_point:
        return F.embedding(idx, x)
    return x[(slice(None),) * axis + (idx,)]


@_op("GatherElements")
def _gather_elements(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.a.get("axis", 0), x.dim())
    idx, n = ins[1], x.shape[axis]
    if isinstance(idx, Const):
        ix = c.derived(
            "index",
            lambda: Const(
                torch.where(idx.value < 0, idx.value + n, idx.value), idx.name + "_index"
            ),
        )
        return torch.gather(x, axis, c.t(ix))
    return torch.gather(x, axis, torch.where(idx < 0, idx + n, idx))


@_op("GatherND")
def _gather_nd(c: _Ctx, ins: list[Any]) -> Any:
    x, idx = c.t(ins[0]), c.t(ins[1])
    b = c.a.get("batch_dims", 0)
    rank = idx.dim() - 1
    index: list[Any] = []
    for j in range(b):
        view = [1] * rank
        view[j] = x.shape[j]
        ar = c.derived(
            f"arange{j}",
            lambda j=j, view=tuple(view): Const(torch.arange(view[j]).reshape(view), f"arange{j}"),
        )
        index.append(c.t(ar))
    index += [idx[..., k] for k in range(idx.shape[-1])]
    return x[tuple(index)]


@_op("Expand")
def _expand(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(c.ints(ins[1], "shape")))
    return x if tuple(x.shape) == tuple(shape) else x.expand(shape)


@_op("Tile")
def _tile(c: _Ctx, ins: list[Any]) -> Any:
    return c.t(ins[0]).repeat(c.ints(ins[1], "repeats"))


@_op("Trilu")
def _trilu(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    k = c.ints(ins[1], "k")[0] if len(ins) > 1 and ins[1] is not None else 0
    return torch.triu(x, k) if c.a.get("upper", 1) else torch.tril(x, k)


@_op("Pad")
def _pad(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    pads = c.a["pads"] if c.opset < 11 else c.ints(ins[1], "pads")
    value = c.a.get("value", 0.0)
    if c.opset >= 11 and len(ins) > 2 and ins[2] is not None:
        value = c.num(ins[2], "constant value")
    axes = list(range(x.dim()))
    if len(ins) > 3 and ins[3] is not None:
        axes = [_axis(a, x.dim()) for a in c.ints(ins[3], "axes")]
    k = len(axes)
    per_axis = dict(zip(axes, zip(pads[:k], pads[k:])))
    torch_pads: list[int] = []
    for d in reversed(range(min(per_axis, default=x.dim()), x.dim())):
        torch_pads += list(per_axis.get(d, (0, 0)))
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    m = mode[c.a.get("mode", "constant")]
    return F.pad(x, torch_pads, m, value if m == "constant" else None)


# convolution and pooling -------------------------------------------------------------------


def _spatial_pads(
    c: _Ctx, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]
) -> list[int]:
    """ONNX pads ([begin..., end...]) for the node, resolving auto_pad from the input shape."""
    k = len(kernel)
    auto = c.a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(k):
            size = x.shape[2 + i]
            total = max(
                (-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0
            )
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * k)
    return list(c.a.get("pads", [0] * (2 * k)))


def _pad_asymmetric(
    x: torch.Tensor, pads: list[int], value: float
) -> tuple[torch.Tensor, list[int]]:
    """Pad unequal begin/end amounts explicitly; returns (x, symmetric pads for the op)."""
    k = len(pads) // 2
    begins, ends = pads[:k], pads[k:]
    if begins == ends:
        return x, begins
    torch_pads: list[int] = []
    for i in reversed(range(k)):
        torch_pads += [begins[i], ends[i]]
    return F.pad(x, torch_pads, value=value), [0] * k


@_op("Conv")
def _conv(c: _Ctx, ins: list[Any]) -> Any:
    x, w = c.t(ins[0]), c.t(ins[1])
    b = c.t(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    k = w.dim() - 2
    kernel = c.a.get("kernel_shape", list(w.shape[2:]))
    strides = c.a.get("strides", [1] * k)
    dil = c.a.get("dilations", [1] * k)
    x, pad = _pad_asymmetric(x, _spatial_pads(c, x, kernel, strides, dil), 0.0)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(k)
    if fn is None:
        raise c.fail(f"{k}-D convolution is not supported", hint="use 1-D, 2-D or 3-D Conv")
    return fn(x, w, b, strides, pad, dil, c.a.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(c: _Ctx, ins: list[Any]) -> Any:
    x, w = c.t(ins[0]), c.t(ins[1])
    b = c.t(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    k = w.dim() - 2
    pads = c.a.get("pads", [0] * (2 * k))
    if pads[:k] != pads[k:] or "output_shape" in c.a or c.a.get("auto_pad", "NOTSET") != "NOTSET":
        raise c.fail("asymmetric pads, auto_pad and output_shape are not supported")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[k]
    return fn(
        x,
        w,
        b,
        c.a.get("strides", [1] * k),
        pads[:k],
        c.a.get("output_padding", [0] * k),
        c.a.get("group", 1),
        c.a.get("dilations", [1] * k),
    )


@_op("MaxPool", "AveragePool")
def _pool(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    kernel = c.a["kernel_shape"]
    k = len(kernel)
    strides = c.a.get("strides", [1] * k)
    dil = c.a.get("dilations", [1] * k)
    ceil = bool(c.a.get("ceil_mode", 0))
    if c.node.op_type == "MaxPool":
        if len(c.node.output) > 1 and c.node.output[1]:
            raise c.fail("the Indices output is not supported", hint="use MaxPool's values only")
        x, pad = _pad_asymmetric(x, _spatial_pads(c, x, kernel, strides, dil), -math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
        return fn(x, kernel, strides, pad, dil, ceil_mode=ceil)
    if dil != [1] * k:
        raise c.fail("dilated AveragePool is not supported")
    count = bool(c.a.get("count_include_pad", 0))
    x, pad = _pad_asymmetric(x, _spatial_pads(c, x, kernel, strides, dil), 0.0)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
    return fn(x, kernel, strides, pad, ceil_mode=ceil, count_include_pad=count)


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    dims = list(range(2, x.dim()))
    if c.node.op_type == "GlobalAveragePool":
        return torch.mean(x, dims, keepdim=True)
    return torch.amax(x, dims, keepdim=True)


# sequences ---------------------------------------------------------------------------------


@_op("SplitToSequence")
def _split_to_sequence(c: _Ctx, ins: list[Any]) -> Any:
    x = c.t(ins[0])
    axis = _axis(c.a.get("axis", 0), x.dim())
    if len(ins) < 2 or ins[1] is None:
        parts = list(torch.split(x, 1, axis))
        return [torch.squeeze(p, axis) for p in parts] if c.a.get("keepdims", 1) == 0 else parts
    split = ins[1]
    sizes = c.ints(split, "split")
    if isinstance(split, Const) and split.value.dim() == 0:
        return list(torch.split(x, sizes[0], axis))
    return list(torch.split(x, sizes, axis))


@_op("SequenceAt")
def _sequence_at(c: _Ctx, ins: list[Any]) -> Any:
    return ins[0][c.ints(ins[1], "position")[0]]


@_op("SequenceConstruct")
def _sequence_construct(c: _Ctx, ins: list[Any]) -> Any:
    return list(ins)


@_op("SequenceLength")
def _sequence_length(c: _Ctx, ins: list[Any]) -> Any:
    return torch.tensor(len(ins[0]), dtype=torch.int64)


@_op("ConcatFromSequence")
def _concat_from_sequence(c: _Ctx, ins: list[Any]) -> Any:
    ts = [c.t(v) for v in ins[0]]
    axis = c.a["axis"]
    if c.a.get("new_axis", 0):
        return torch.stack(ts, _axis(axis, ts[0].dim() + 1))
    return torch.cat(ts, _axis(axis, ts[0].dim()))


# ---------------------------------------------------------------------------------------
# the importer


class _Holder(nn.Module):
    """A module that only holds weights (the interpreter's module tree)."""


class _OnnxModule(nn.Module):
    """The ONNX graph as an nn.Module: forward(**inputs) interprets it (see _Importer)."""

    def __init__(self, importer: _Importer):
        super().__init__()
        object.__setattr__(self, "_importer", importer)  # not a submodule

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._importer.run_top(inputs, tracing=True)


class _Importer:
    """Interprets one ONNX model: an eager run (folding, shapes), then a traced run."""

    def __init__(self, model: Any, name: str):
        self.model = model
        self.graph = model.graph
        self.name = name
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18
        )
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.module = _OnnxModule(self)
        self.statics: dict[str, tuple[Any, ...]] = {}
        self.buffers: dict[int, str] = {}  # id(Const) -> buffer name
        self.const_values: dict[int, Const] = {}
        self.derived: dict[tuple[str, str], Const] = {}
        # dynamic If: the constants each one's branches use as tensors (id -> None, ordered),
        # the Ifs being run (eager run), and the operands standing for constants (tracing)
        self.branch_consts: dict[str, dict[int, None]] = {}
        self.if_stack: list[str] = []
        self.overrides: dict[int, torch.Tensor] = {}
        self.locs: list[M.Loc] = []
        self.tracing = False
        self.folding = False  # running a static node: its operands need no buffers
        self.initializers: dict[str, Any] = {}
        self.input_names: dict[str, str] = {}  # ONNX input name -> program input name

    # weights ---------------------------------------------------------------------------

    def load_initializers(self) -> None:
        stats = {
            n.input[i]
            for n in self.graph.node
            if n.op_type == "BatchNormalization"
            for i in (3, 4)
            if len(n.input) > i
        }
        taken: set[str] = set()
        roles = _weight_roles(self.graph)
        for init in self.graph.initializer:
            t = _tensor_from_proto(init)
            if t.dtype.is_floating_point and t.numel() > 1:
                kind = "buffer" if init.name in stats else "param"
                name = roles.get(init.name, init.name) if "." not in init.name else init.name
                self.initializers[init.name] = self._register(name, t, kind, taken)
            else:
                self.initializers[init.name] = Const(t, init.name)

    def _register(self, onnx_name: str, t: torch.Tensor, kind: str, taken: set[str]) -> str:
        """Put ``t`` on the module at a usable name close to ``onnx_name``; returns the name."""
        name = safe_weight_name(onnx_name)
        if not self._free(name, taken):
            base = safe_weight_name(onnx_name.replace(".", "_"))
            name, i = base, 1
            while not self._free(name, taken):
                name, i = f"{base}_{i}", i + 1
        parent: nn.Module = self.module
        *path, leaf = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = _Holder()
                parent.add_module(part, child)
            parent = child
        if kind == "param":
            parent.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            parent.register_buffer(leaf, t, persistent=kind == "buffer")
        taken.add(name)
        return name

    def _free(self, name: str, taken: set[str]) -> bool:
        if name in taken:
            return False
        prefixes = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        return not (prefixes & taken) and not any(t.startswith(name + ".") for t in taken)

    def weight(self, name: str) -> torch.Tensor:
        obj: Any = self.module
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def const_tensor(self, v: Const) -> torch.Tensor:
        """A static value used as a tensor operand: the real value while folding, a
        non-persistent buffer (registered after the eager run) while tracing."""
        if self.folding:
            return v.value
        if not self.tracing:
            if id(v) not in self.buffers:
                self.buffers[id(v)] = ""
                self.const_values[id(v)] = v
            for key in self.if_stack:  # a cond branch receives it as an operand
                self.branch_consts.setdefault(key, {})[id(v)] = None
            return v.value
        if id(v) in self.overrides:
            return self.overrides[id(v)]
        return self.weight(self.buffers[id(v)])

    def register_constants(self) -> None:
        taken = {n for n, _ in self.module.named_parameters()} | {
            n for n, _ in self.module.named_buffers()
        }
        for key, v in self.const_values.items():
            base = f"onnx_const.{ident(v.name or 'value')}"
            self.buffers[key] = self._register(base, v.value, "constant", taken)

    # running ---------------------------------------------------------------------------

    def run_top(self, inputs: Mapping[str, Any], *, tracing: bool) -> dict[str, Any]:
        self.tracing = tracing
        env: dict[str, Any] = {}
        for name, v in self.initializers.items():
            env[name] = v if isinstance(v, Const) else self.weight(v)
        for onnx_name, prog_name in self.input_names.items():
            env[onnx_name] = inputs[prog_name]
        self.run_graph(self.graph.node, env, "", {}, None)
        out: dict[str, Any] = {}
        for o in self.graph.output:
            if o.name not in env:
                raise CaptureError(
                    f"ONNX output {o.name!r} is computed by no node of the graph",
                    hint="check the model with onnx.checker.check_model",
                )
            v = env[o.name]
            if isinstance(v, list):
                raise CaptureError(
                    f"ONNX output {o.name!r} is a sequence; a Program returns tensors",
                    hint="return the sequence's tensors (ConcatFromSequence) instead",
                )
            out[o.name] = self.const_tensor(v) if isinstance(v, Const) else v
        return out

    def run_graph(
        self,
        nodes: Sequence[Any],
        env: Any,
        scope: str,
        outer_attrs: Mapping[str, Any],
        caller_loc: int | None,
    ) -> None:
        for i, node in enumerate(nodes):
            key = f"{scope}{i}"
            where = self._where(node, key)
            try:
                ins = [env[n] if n else None for n in node.input]
            except KeyError as e:
                raise CaptureError(
                    f"ONNX node {node.op_type} reads {e.args[0]!r}, which no node or input "
                    "defines before it",
                    where=where,
                    hint="check the model with onnx.checker.check_model",
                ) from None
            outs = self.run_node(node, ins, key, where, outer_attrs, caller_loc, env)
            for name, v in zip(node.output, outs):
                if name:
                    env[name] = v

    def run_node(
        self,
        node: Any,
        ins: list[Any],
        key: str,
        where: str,
        outer_attrs: Mapping[str, Any],
        caller_loc: int | None,
        env: Any,
    ) -> tuple[Any, ...]:
        if self.tracing and key in self.statics:
            return self.statics[key]
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        attrs = _attrs(node.attribute, outer_attrs)
        loc = self._loc(node, key, caller_loc)
        fn_proto = self.functions.get((node.domain, node.op_type))
        if domain == "splice":
            call = _splice_call(node, fn_proto, ins, attrs)
            if call is not None:
                return self._splice_op(node, call, attrs, where, loc, key)
        if fn_proto is not None:
            return self._inline(fn_proto, node, ins, attrs, key, loc)
        fn = _OPS.get(node.op_type) if domain == "" else None
        if node.op_type == "If" and domain == "":
            return self._if(node, ins, attrs, key, where, loc, env)
        if fn is None:
            raise CaptureError(
                f"ONNX op {node.op_type!r} (domain {node.domain or 'ai.onnx'!r}) of node "
                f"{node.name or key!r} is not supported by splice.import_onnx",
                where=where,
                hint="splice.ir.onnx_import.supported_ops() lists the ops it converts; "
                "rewrite the node with those (onnxscript's rewriter can), or export the "
                "model again with standard ONNX ops",
            )
        ctx = _Ctx(self, node, attrs, where, key)
        static = node.op_type in ("Shape", "Size") or all(_is_static(v) for v in ins)
        if static and not self.tracing:
            self.folding = True
            try:
                with torch.no_grad():
                    res = self._call(fn, ctx, ins, where)
            finally:
                self.folding = False
            outs = tuple(_as_const(v, node, k) for k, v in enumerate(_tuple(res)))
            self.statics[key] = outs
            return outs
        with torch.fx.traceback.annotate({_META_KEY: loc}) if self.tracing else _null():
            res = self._call(fn, ctx, ins, where)
        return _tuple(res)

    def _call(self, fn: OpFn, ctx: _Ctx, ins: list[Any], where: str) -> Any:
        try:
            return fn(ctx, ins)
        except SpliceError:
            raise
        except Exception as e:
            raise CaptureError(
                f"ONNX node {ctx.node.op_type} failed while importing: {_first_line(e)}",
                where=where,
                hint="check the model with onnx.checker.check_model(model, full_check=True) "
                "and the input shapes given",
            ) from e

    def _inline(
        self, fp: Any, node: Any, ins: list[Any], attrs: dict[str, Any], key: str, loc: int
    ) -> tuple[Any, ...]:
        """Run a model-local function's body with the call's inputs and attributes."""
        env: dict[str, Any] = {}
        for formal, actual in zip(fp.input, ins):
            env[formal] = actual
        for formal in fp.input[len(ins) :]:
            env[formal] = None
        defaults = _attrs(getattr(fp, "attribute_proto", []), {})
        self.run_graph(fp.node, env, f"{key}/", {**defaults, **attrs}, loc)
        return tuple(env.get(o) for o in fp.output)

    def _splice_op(
        self,
        node: Any,
        call: tuple[str, dict[str, Any]],
        attrs: dict[str, Any],
        where: str,
        loc: int,
        key: str,
    ) -> tuple[Any, ...]:
        """A ``splice``-domain node -> the splice op ``call`` names, with its arguments."""
        op = OPS[f"splice::{call[0]}"]
        kwargs = call[1]
        ctx = _Ctx(self, node, attrs, where, key)
        args: list[Any] = []
        for pname, p in op.signature().parameters.items():
            v = kwargs.get(pname, None if p.default is inspect.Parameter.empty else p.default)
            args.append(ctx.t(v) if _is_tensor_param(p.annotation) and v is not None else v)
        if call[0] == "lowrank_linear" and args[4] is not None and args[4] == args[1].shape[1]:
            args[4] = None  # the exporter writes k for "all ranks"
        with torch.fx.traceback.annotate({_META_KEY: loc}) if self.tracing else _null():
            res = self._call(lambda c, _: op.overload(*args), ctx, [], where)
        return _tuple(res)

    def _if(
        self,
        node: Any,
        ins: list[Any],
        attrs: dict[str, Any],
        key: str,
        where: str,
        loc: int,
        outer_env: Any,
    ) -> tuple[Any, ...]:
        """ONNX If. A static condition inlines the branch it takes (its nodes read the
        enclosing graph's values). A data-dependent one becomes ``torch.cond``: each branch
        is a function of the values it reads from outside (inputs, weights, the constants
        it uses as tensors), passed as operands; the eager run runs both branches, so
        both are folded and their constants known."""
        cond = ins[0]
        branches = {"then": attrs["then_branch"], "else": attrs["else_branch"]}
        if isinstance(cond, Const):
            taken = "then" if bool(cond.flat()[0]) else "else"
            env: Any = ChainMap(self._branch_inits(branches[taken], f"{key}/{taken}"), outer_env)
            self.run_graph(branches[taken].node, env, f"{key}/{taken}/", {}, loc)
            return tuple(env[o.name] for o in branches[taken].output)
        free = list(dict.fromkeys(n for g in branches.values() for n in _free_names(g)))
        missing = [n for n in free if n not in outer_env]
        if missing:
            raise CaptureError(
                f"ONNX If reads {missing[0]!r}, which no node or input defines before it",
                where=where,
                hint="check the model with onnx.checker.check_model",
            )
        outer = {n: outer_env[n] for n in free}
        dynamic = [n for n, v in outer.items() if isinstance(v, torch.Tensor)]
        consts = self.branch_consts.setdefault(key, {})

        def branch_fn(tag: str) -> Callable[..., tuple[torch.Tensor, ...]]:
            graph = branches[tag]

            def run(*operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
                values = dict(zip(dynamic, operands[: len(dynamic)]))
                saved = self.overrides
                if self.tracing:
                    self.overrides = {**saved, **dict(zip(consts, operands[len(dynamic) :]))}
                self.if_stack.append(key)
                try:
                    env = ChainMap(
                        self._branch_inits(graph, f"{key}/{tag}"),
                        values,
                        {n: v for n, v in outer.items() if n not in values},
                    )
                    self.run_graph(graph.node, env, f"{key}/{tag}/", {}, loc)
                    ctx = _Ctx(self, node, attrs, where, key)
                    return tuple(ctx.t(env[o.name]) for o in graph.output)
                finally:
                    self.if_stack.pop()
                    self.overrides = saved

            return run

        pred = _Ctx(self, node, attrs, where, key).t(cond)
        pred = pred if pred.dim() == 0 else pred.reshape(())
        operands = [outer[n] for n in dynamic]
        if not self.tracing:
            then_out = branch_fn("then")(*operands)
            else_out = branch_fn("else")(*operands)
            return then_out if bool(pred) else else_out
        operands += [self.const_tensor(self.const_values[i]) for i in consts]
        with torch.fx.traceback.annotate({_META_KEY: loc}):
            try:
                out = torch.ops.higher_order.cond(
                    pred, branch_fn("then"), branch_fn("else"), tuple(operands)
                )
            except SpliceError:
                raise
            except Exception as e:
                raise CaptureError(
                    f"ONNX If cannot become torch.cond: {_first_line(e)}",
                    where=where,
                    hint="both branches must return tensors of the same shapes and dtypes",
                ) from e
        return tuple(out)

    def _branch_inits(self, graph: Any, scope: str) -> dict[str, Any]:
        """A subgraph's own initializers, as static values made once per scope."""
        out: dict[str, Any] = {}
        for init in graph.initializer:
            k = (scope, init.name)
            if k not in self.derived:
                self.derived[k] = Const(_tensor_from_proto(init), init.name)
            out[init.name] = self.derived[k]
        return out

    # locations -------------------------------------------------------------------------

    def _where(self, node: Any, key: str) -> str:
        label = node.name or f"#{key}"
        props = {p.key: p.value for p in node.metadata_props}
        mod = _module_path(props)
        return f"ONNX node {label!r} ({node.op_type})" + (f", module {mod}" if mod else "")

    def _loc(self, node: Any, key: str, caller: int | None) -> int:
        props = {p.key: p.value for p in node.metadata_props}
        if not props and caller is not None:
            return caller
        loc = _loc_of(props)
        self.locs.append(loc)
        return len(self.locs) - 1


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _tuple(res: Any) -> tuple[Any, ...]:
    return tuple(res) if isinstance(res, tuple) else (res,)


def _as_const(v: Any, node: Any, k: int) -> Any:
    if isinstance(v, list):
        return [_as_const(x, node, k) for x in v]
    if isinstance(v, Const) or v is None:
        return v
    name = node.output[k] if k < len(node.output) else f"{node.name}_{k}"
    return Const(v, name)


_MOE_VARIANT = re.compile(
    r"moe_ffn_(?P<act>\w+?)_(?P<gated>gated|plain)_(?P<route>k\d+|p[0-9_em]+)_"
    r"(?P<scale>none|e_over_k|renorm)_(?P<w>w|hard)_(?P<norm>norm|raw)_b[01]{4}"
)


def _splice_call(
    node: Any, fp: Any, ins: list[Any], attrs: Mapping[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    """(splice op name, its arguments by schema name) of a ``splice``-domain node, or None
    when the node is not one of the dialect's ops (then its function body is inlined).

    The exporter (:mod:`splice.runtime.backends.onnx`) names a function after the op and
    the variant (``lowrank_linear_bias``; ``moe_ffn_silu_gated_k2_renorm_w_norm_b0000``)
    and its formal inputs after the schema's tensor arguments; without a function, the
    inputs are the schema's tensor arguments in order and the attributes its other ones.
    """
    name = node.op_type
    if fp is None:
        op = OPS.get(f"splice::{name}")
        if op is None:
            return None
        tensor_names = [
            n for n, p in op.signature().parameters.items() if _is_tensor_param(p.annotation)
        ]
        return name, {**dict(attrs), **dict(zip(tensor_names, ins))}
    by_formal = dict(zip(fp.input, ins))
    if name in ("lowrank_linear", "lowrank_linear_bias"):
        return "lowrank_linear", {**by_formal, "rank": attrs.get("rank")}
    m = _MOE_VARIANT.fullmatch(name)
    if m is None or m["act"] not in MOE_ACTIVATIONS:
        return None
    route = m["route"]
    top_k = int(route[1:]) if route[0] == "k" else 0
    top_p = float(route[1:].replace("_", ".").replace("m", "-")) if route[0] == "p" else 0.0
    return "moe_ffn", {
        **by_formal,
        "act": m["act"],
        "top_k": top_k,
        "top_p": top_p,
        "scale": m["scale"],
        "weighted": m["w"] == "w",
        "router_norm": m["norm"] == "norm",
    }


def _is_tensor_param(annotation: Any) -> bool:
    return annotation is torch.Tensor or annotation == (torch.Tensor | None)


_ROLES = {("MatMul", 1): "weight", ("Gemm", 1): "weight", ("Gemm", 2): "bias"}
_ROLES.update({("Conv", 1): "weight", ("Conv", 2): "bias", ("Gather", 0): "weight"})


def _weight_roles(graph: Any) -> dict[str, str]:
    """Names for initializers an optimiser renamed (torch.onnx folds ``W.T`` into
    ``val_55``): ``<module path>.weight`` / ``.bias`` when every node reading the
    initializer is in one module and reads it as a layer's weight (MatMul/Gemm/Conv operand
    1, Gather's table) or bias (Gemm/Conv operand 2), so that passes see layer names."""
    seen: dict[str, set[str]] = {}
    for node in graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        module = _module_path(props)
        for i, name in enumerate(node.input):
            role = _ROLES.get((node.op_type, i))
            seen.setdefault(name, set()).add(f"{module}.{role}" if module and role else "")
    return {n: next(iter(r)) for n, r in seen.items() if len(r) == 1 and "" not in r}


def _free_names(graph: Any) -> list[str]:
    """Names a (sub)graph reads from enclosing scopes, in first-use order."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    out: list[str] = []
    for node in graph.node:
        reads = list(node.input)
        for a in node.attribute:
            if a.type == a.GRAPH:
                reads += _free_names(a.g)
            elif a.type == a.GRAPHS:
                for g in a.graphs:
                    reads += _free_names(g)
        out += [n for n in reads if n and n not in defined and n not in out]
        defined.update(o for o in node.output if o)
    return out


def _module_path(props: Mapping[str, str]) -> str:
    if "splice.module" in props:
        return props["splice.module"]
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            return ""
        if isinstance(parts, list) and len(parts) >= 2:
            return str(parts[-2])
    return ""


def _loc_of(props: Mapping[str, str]) -> M.Loc:
    module = _module_path(props)
    file, line = "", None
    source = props.get("splice.source", "")
    if source:
        f, _, ln = source.rpartition(":")
        file, line = (f, int(ln)) if ln.isdigit() and f else (source, None)
    elif props.get("pkg.torch.onnx.stack_trace"):
        from_trace = M.loc_from_export_meta({"stack_trace": props["pkg.torch.onnx.stack_trace"]})
        file, line = from_trace.file, from_trace.line
    passes = tuple(p for p in props.get("splice.passes", "").split(",") if p)
    return M.Loc(module_path=module, file=file, line=line, from_passes=passes)


# ---------------------------------------------------------------------------------------
# entry point


def import_onnx(
    model: str | os.PathLike[str] | Any,
    *,
    name: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Program:
    """The Program of an ONNX model (a file path or an ``onnx.ModelProto``).

    ``shapes`` gives input shapes by ONNX input name; it is needed for inputs whose shape has
    a symbolic dim (``dim_param``) and overrides the model's own otherwise. ``name`` names
    the Program (default: the graph's name, else the file's stem).

    Raises :class:`~splice.errors.CaptureError` for a file that is not a readable ONNX model,
    an op or element type the importer does not convert (naming the op, its domain and the
    node), a symbolic input dim without ``shapes``, and a shape that depends on input data.
    """
    proto, default_name = _load(model)
    imp = _Importer(proto, name or default_name)
    imp.load_initializers()
    inputs = _example_inputs(imp, dict(shapes or {}))
    with torch.no_grad():
        imp.run_top(inputs, tracing=False)
    imp.register_constants()
    ep = _export(imp, inputs)
    by_name: dict[tuple[str, str], int] = {}
    for path, gm in ep.graph_module.named_modules():
        if isinstance(gm, torch.fx.GraphModule):
            for n in gm.graph.nodes:
                custom = n.meta.get("custom") or {}
                if _META_KEY in custom:
                    by_name[(path, n.name)] = custom[_META_KEY]
    program = to_program(ep, (), inputs, {}, imp.name)
    for path, gm in _graphs(program):
        for n in gm.graph.nodes:
            idx = by_name.get((path, n.name))
            M.set_loc(n, imp.locs[idx] if idx is not None else M.Loc())
    return program


def _graphs(program: Program) -> list[tuple[str, Any]]:
    from splice.ir.program import iter_graphs

    return list(iter_graphs(program))


def _load(model: Any) -> tuple[Any, str]:
    """(ModelProto with its external data, default program name)."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise CaptureError(
            "splice.import_onnx needs the onnx package", hint="pip install 'splice[dev]' or onnx"
        ) from e
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "onnx_model"
    if not isinstance(model, (str, os.PathLike)):
        raise CaptureError(
            f"import_onnx expects a path or an onnx.ModelProto, got {type(model).__name__}",
            hint="pass the .onnx file's path",
        )
    path = Path(model)
    if not path.is_file():
        raise CaptureError(f"no ONNX file at {str(path)!r}", hint="check the path")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as e:
        raise CaptureError(
            f"{str(path)!r} is not a readable ONNX model: {_first_line(e)}",
            where=str(path),
            hint="check the file (and its external data files beside it) with onnx.checker",
        ) from e
    return proto, path.stem


def _example_inputs(imp: _Importer, shapes: dict[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Example inputs by program input name (seeded normal floats, zero integers)."""
    graph = imp.graph
    known = {i.name for i in graph.input}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise CaptureError(
            f"shapes= names {unknown}, which are not inputs of the ONNX model",
            hint=f"its inputs are {[i.name for i in graph.input if i.name not in imp.initializers]}",
        )
    g = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    for vi in graph.input:
        if vi.name in imp.initializers:
            continue  # IR < 4 lists initializers among the inputs
        where = f"ONNX input {vi.name!r}"
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise CaptureError(
                f"ONNX input {vi.name!r} is not a tensor", hint="splice programs take tensors"
            )
        dtype = _dtype(tt.elem_type, where)
        if vi.name in shapes:
            shape = [int(d) for d in shapes[vi.name]]
        elif not tt.HasField("shape"):
            raise CaptureError(
                f"ONNX input {vi.name!r} has no shape (not even a rank)",
                where=where,
                hint=f"pass shapes={{{vi.name!r}: (...)}} to import_onnx",
            )
        else:
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(int(d.dim_value))
                    continue
                sym = d.dim_param or "?"
                raise CaptureError(
                    f"ONNX input {vi.name!r} has the symbolic dim {sym!r} (dim {k}); a splice "
                    "Program has static shapes",
                    where=where,
                    hint=f"pass shapes={{{vi.name!r}: (...)}} to import_onnx with the shape "
                    "to import it at",
                )
        prog_name = ident(vi.name)
        if prog_name in inputs:
            prog_name = f"{prog_name}_{len(inputs)}"
        imp.input_names[vi.name] = prog_name
        if dtype.is_floating_point:
            inputs[prog_name] = torch.randn(shape, generator=g).to(dtype)
        else:
            inputs[prog_name] = torch.zeros(shape, dtype=dtype)
    return inputs


def _export(imp: _Importer, inputs: dict[str, torch.Tensor]) -> Any:
    import torch.fx.traceback as fxt

    try:
        with fxt.preserve_node_meta():
            return torch.export.export(imp.module, (), kwargs=inputs, strict=False)
    except SpliceError:
        raise
    except Exception as e:
        raise CaptureError(
            f"torch.export could not trace the imported ONNX graph ({type(e).__name__}): {_first_line(e)}",
            where=f"ONNX model {imp.name!r}",
            hint="the graph computes something splice's importer cannot express as static "
            "ATen; report the model and op",
        ) from e


__all__ = ["Const", "import_onnx", "supported_ops"]
