"""ONNX lowering of ``splice::moe_ffn``: a call of a ``splice`` function built per variant.

The op's options choose the *structure* of its body (the activation, gated or not, which
biases exist, top-k or top-p routing, the gate scale, weighted gates, the router's input
norm), and an ONNX function cannot branch on a string attribute; so each combination the
model uses becomes one function, named ``moe_ffn_<variant>`` (e.g.
``moe_ffn_silu_gated_k2_renorm_w_raw``), built here with ``onnx.helper``, with the numbers
(``top_k`` / ``top_p``) inside its body. The body is the reference of
:func:`splice.ir.ops._moe_ffn_ref` / :func:`~splice.ir.ops.moe_gates`:

* router: ``logits = x̂ router_wᵀ (+ router_b)`` with ``x̂ = x / max(‖x‖, 1e-12)`` when
  ``router_norm``; ``P = Softmax(logits)``;
* **top-k**: ``TopK(logits, k)`` (ONNX's TopK puts the lower index first on ties, the
  reference's order), then a ``Gather`` of the k selected experts' weights per row: only
  the selected experts are computed; gates: ``P`` at the selected experts (weighted) or 1,
  times ``E / k`` (``e_over_k``) or divided by their sum (``renorm``);
* **top-p**: the reference's rule on all experts (an expert is kept iff the probability
  of the experts ranked before it is ≤ p), as a mask on the dense computation (the number
  kept varies by row, which a Gather of fixed size cannot express);
* ``y = Σ gate_e · act(...) w_outₑ (+ b_out)``, shaped as ``x[..., :-1] + [d_out]``.

Inputs are ``x, router_w, [router_b], w_in, [b_in], [w_gate, [b_gate]], w_out, [b_out]``
(the absent optional tensors are left out of the variant). An option the reference does not
know raises LoweringError naming the node.
"""

from __future__ import annotations

import math
from typing import Any

from splice.errors import LoweringError
from splice.ir.ops import MOE_ACTIVATIONS, MOE_SCALES
from splice.runtime.kernels.onnx_common import SPLICE_DOMAIN, OnnxContext


class _Body:
    """A FunctionProto body under construction (unique value names, constants)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, values: list[int]) -> str:
        from onnx import TensorProto, helper

        t = helper.make_tensor(self.fresh("c"), TensorProto.INT64, [len(values)], values)
        return self.op("Constant", value=t)

    def scalar_like(self, value: float, like: str) -> str:
        """A float scalar constant of ``like``'s element type."""
        from onnx import TensorProto, helper

        t = helper.make_tensor(self.fresh("c"), TensorProto.FLOAT, [], [float(value)])
        return self.op("CastLike", self.op("Constant", value=t), like)


def _activation(b: _Body, act: str, h: str) -> str:
    """``MOE_ACTIVATIONS[act](h)`` in ONNX ops."""
    if act == "relu":
        return b.op("Relu", h)
    if act == "sigmoid":
        return b.op("Sigmoid", h)
    if act == "tanh":
        return b.op("Tanh", h)
    if act == "silu":
        return b.op("Mul", h, b.op("Sigmoid", h))
    if act == "quick_gelu":
        return b.op("Mul", h, b.op("Sigmoid", b.op("Mul", h, b.scalar_like(1.702, h))))
    if act == "relu2":
        r = b.op("Relu", h)
        return b.op("Mul", r, r)
    half = b.op("Mul", h, b.scalar_like(0.5, h))
    one = b.scalar_like(1.0, h)
    if act == "gelu":
        erf = b.op("Erf", b.op("Mul", h, b.scalar_like(1.0 / math.sqrt(2.0), h)))
        return b.op("Mul", half, b.op("Add", one, erf))
    if act == "gelu_tanh":
        cube = b.op("Mul", b.op("Mul", h, h), h)
        inner = b.op("Add", h, b.op("Mul", cube, b.scalar_like(0.044715, h)))
        t = b.op("Tanh", b.op("Mul", inner, b.scalar_like(math.sqrt(2.0 / math.pi), h)))
        return b.op("Mul", half, b.op("Add", one, t))
    raise AssertionError(act)  # checked by the caller


def variant_name(
    act: str,
    gated: bool,
    top_k: int,
    top_p: float,
    scale: str,
    weighted: bool,
    router_norm: bool,
    biases: tuple[bool, bool, bool, bool],
) -> str:
    """The function name of one option combination (readable, and unique per variant)."""
    route = f"k{top_k}" if top_k > 0 else "p" + f"{top_p:.6g}".replace(".", "_").replace("-", "m")
    bias = "".join("1" if b else "0" for b in biases)
    parts = [
        "moe_ffn",
        act,
        "gated" if gated else "plain",
        route,
        scale,
        "w" if weighted else "hard",
        "norm" if router_norm else "raw",
        f"b{bias}",
    ]
    return "_".join(parts)


def moe_function(
    name: str,
    inputs: list[str],
    act: str,
    top_k: int,
    top_p: float,
    scale: str,
    weighted: bool,
    router_norm: bool,
) -> Any:
    """The FunctionProto of one variant (``inputs``: its formal input names)."""
    from onnx import helper

    has = set(inputs)
    b = _Body()
    x = "x"
    d_out_shape = b.op("Shape", "w_out", start=2, end=3)  # [d_out]
    d_in = b.op("Shape", "w_in", start=2, end=3)  # [d]
    n_exp = b.op("Shape", "w_in", start=0, end=1)  # [E]
    x2 = b.op("Reshape", x, b.op("Concat", b.ints([-1]), d_in, axis=0))  # [N, d]
    xr = x2
    if router_norm:
        norm = b.op("ReduceL2", x2, b.ints([-1]), keepdims=1)
        xr = b.op("Div", x2, b.op("Max", norm, b.scalar_like(1e-12, x2)))
    logits = b.op("MatMul", xr, b.op("Transpose", "router_w", perm=[1, 0]))
    if "router_b" in has:
        logits = b.op("Add", logits, "router_b")
    probs = b.op("Softmax", logits, axis=-1)  # [N, E]

    def expert_in(w: str, bias: str | None, idx: str | None) -> str:
        """x·wₑᵀ (+bₑ) per row and expert: [N, k, s] (selected) or [N, E, s] (all)."""
        if idx is None:
            h = b.op("Einsum", x2, w, equation="nd,esd->nes")
            if bias is not None:
                h = b.op("Add", h, bias)
            return h
        wk = b.op("Gather", w, idx, axis=0)  # [N, k, s, d]
        h = b.op("Einsum", x2, wk, equation="nd,nksd->nks")
        if bias is not None:
            h = b.op("Add", h, b.op("Gather", bias, idx, axis=0))
        return h

    if top_k > 0:
        _, idx = b.op("TopK", logits, b.ints([top_k]), axis=-1, largest=1, sorted=1, n_out=2)
        p_sel = b.op("GatherElements", probs, idx, axis=1)  # [N, k]
        gates = p_sel if weighted else b.op("Mul", p_sel, b.scalar_like(0.0, p_sel))
        if not weighted:
            gates = b.op("Add", gates, b.scalar_like(1.0, p_sel))
        if scale == "e_over_k":
            e_f = b.op("CastLike", n_exp, p_sel)
            gates = b.op("Mul", gates, b.op("Div", e_f, b.scalar_like(float(top_k), p_sel)))
        elif scale == "renorm":
            gates = b.op("Div", gates, b.op("ReduceSum", gates, b.ints([-1]), keepdims=1))
    else:
        idx = None
        n_e = b.op("Shape", logits, start=1, end=2)
        li = b.op("Unsqueeze", logits, b.ints([-1]))  # [N, E, 1]
        lj = b.op("Unsqueeze", logits, b.ints([-2]))  # [N, 1, E]
        zero = b.ints([0])
        one = b.ints([1])
        ar = b.op("Range", b.op("Squeeze", zero), b.op("Squeeze", n_e), b.op("Squeeze", one))
        lower = b.op(
            "Less", b.op("Unsqueeze", ar, b.ints([0])), b.op("Unsqueeze", ar, b.ints([1]))
        )  # [e, e']: e' < e
        before = b.op(
            "Or", b.op("Greater", lj, li), b.op("And", b.op("Equal", lj, li), lower)
        )  # [N, e, e']
        if top_p >= 1.0:
            sel = b.op("Equal", logits, logits)  # all true (finite logits)
            sel = b.op("Or", sel, b.op("Not", sel))
        else:
            mass = b.op(
                "ReduceSum",
                b.op(
                    "Mul", b.op("Unsqueeze", probs, b.ints([-2])), b.op("CastLike", before, probs)
                ),
                b.ints([-1]),
                keepdims=0,
            )
            sel = b.op("LessOrEqual", mass, b.scalar_like(top_p, probs))
        ones = b.op("Add", b.op("Mul", probs, b.scalar_like(0.0, probs)), b.scalar_like(1.0, probs))
        zeros = b.op("Mul", probs, b.scalar_like(0.0, probs))
        gates = b.op("Where", sel, probs if weighted else ones, zeros)
        if scale == "e_over_k":
            count = b.op("ReduceSum", b.op("CastLike", sel, probs), b.ints([-1]), keepdims=1)
            gates = b.op("Mul", gates, b.op("Div", b.op("CastLike", n_exp, probs), count))
        elif scale == "renorm":
            gates = b.op("Div", gates, b.op("ReduceSum", gates, b.ints([-1]), keepdims=1))

    h = expert_in("w_in", "b_in" if "b_in" in has else None, idx)
    if "w_gate" in has:
        g = expert_in("w_gate", "b_gate" if "b_gate" in has else None, idx)
        a = b.op("Mul", _activation(b, act, g), h)
    else:
        a = _activation(b, act, h)
    a = b.op("Mul", a, b.op("Unsqueeze", gates, b.ints([-1])))  # [N, k|E, s]
    if idx is None:
        y = b.op("Einsum", a, "w_out", equation="nes,eso->no")
    else:
        y = b.op("Einsum", a, b.op("Gather", "w_out", idx, axis=0), equation="nks,nkso->no")
    if "b_out" in has:
        y = b.op("Add", y, "b_out")
    lead = b.op("Shape", x, start=0, end=-1)
    b.nodes.append(
        helper.make_node("Reshape", [y, b.op("Concat", lead, d_out_shape, axis=0)], ["y"])
    )
    return helper.make_function(
        SPLICE_DOMAIN,
        name,
        inputs,
        ["y"],
        b.nodes,
        [helper.make_opsetid("", 18)],
        doc_string=f"splice::moe_ffn (act={act}, top_k={top_k}, top_p={top_p}, "
        f"scale={scale}, weighted={weighted}, router_norm={router_norm})",
    )


def translate_moe_ffn(
    ctx: OnnxContext,
    x: Any,
    router_w: Any,
    router_b: Any,
    w_in: Any,
    b_in: Any,
    w_gate: Any,
    b_gate: Any,
    w_out: Any,
    b_out: Any,
    act: str,
    top_k: int = 0,
    top_p: float = 0.0,
    scale: str = "none",
    weighted: bool = False,
    router_norm: bool = True,
) -> Any:
    """The ONNX translation of one ``splice::moe_ffn`` node (the ``onnx`` calling
    convention of :mod:`splice.ir.lowerings`)."""
    problem = None
    if act not in MOE_ACTIVATIONS:
        problem = f"activation {act!r} is not one of {sorted(MOE_ACTIVATIONS)}"
    elif scale not in MOE_SCALES:
        problem = f"scale {scale!r} is not one of {list(MOE_SCALES)}"
    elif not isinstance(top_k, int) or not isinstance(top_p, (int, float)):
        problem = f"top_k={top_k!r} / top_p={top_p!r} must be numbers known at export"
    elif (top_k > 0) == (top_p > 0):
        problem = f"give exactly one of top_k > 0 and top_p > 0 (got {top_k}, {top_p})"
    elif w_gate is None and b_gate is not None:
        problem = "b_gate without w_gate"
    if problem is not None:
        # torch.onnx re-raises this from the node's translation; the exporter's error
        # then names the node, its module path and source line
        raise LoweringError(
            f"splice::moe_ffn cannot be exported to ONNX: {problem}",
            hint="fix the op's arguments (see splice.ir.ops.moe_ffn)",
        )
    named = [
        ("x", x),
        ("router_w", router_w),
        ("router_b", router_b),
        ("w_in", w_in),
        ("b_in", b_in),
        ("w_gate", w_gate),
        ("b_gate", b_gate),
        ("w_out", w_out),
        ("b_out", b_out),
    ]
    inputs = [(n, v) for n, v in named if v is not None]
    biases = (router_b is not None, b_in is not None, b_gate is not None, b_out is not None)
    name = variant_name(
        act, w_gate is not None, top_k, float(top_p), scale, weighted, router_norm, biases
    )
    formal = [n for n, _ in inputs]

    def build() -> Any:
        return moe_function(
            name, formal, act, int(top_k), float(top_p), scale, bool(weighted), bool(router_norm)
        )

    return ctx.call(name, build, inputs)


__all__ = ["moe_function", "translate_moe_ffn", "variant_name"]
