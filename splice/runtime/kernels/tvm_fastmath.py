"""A Relax pass that replaces transcendental activations by TVM's fast polynomial forms.

LLVM turns ``erf``, ``tanh`` and ``exp`` into scalar libm calls, so a GELU fused into a
matmul epilogue cost as much as the matmul itself here (an MLP layer at 42 instead of 69
GFLOP/s). TVM's ``topi.fast_erf``/``fast_tanh``/``fast_exp`` are polynomials of plain
arithmetic, which vectorise. TVM's own ``FastMathTransform`` misses GELU, GELU-tanh,
sigmoid and SiLU (it only rewrites ``erf``, ``tanh``, ``exp`` and ``softmax`` calls), so
this pass rewrites those too, for float32 only. It also turns ``power`` by a small integer
constant (GPT-2's ``gelu_new`` computes ``pow(x, 3.0)``) into multiplications: LLVM keeps
``powf`` a scalar libm call, and that one element-wise kernel took 4.9 ms of a 21 ms GPT-2
block. The approximations are within a few ULP of
float32 (the backend tests hold compiled models to 1e-4 of eager PyTorch); ``fast_math``
is an option of :func:`splice.compile` and is recorded in the artifact's manifest.
"""

from __future__ import annotations

import math
from typing import Any


def _rules() -> dict[str, Any]:
    import tvm
    from tvm import topi

    def c(x: Any, v: float) -> Any:
        return tvm.tirx.const(v, x.dtype)

    def gelu(x: Any) -> Any:
        return topi.multiply(
            topi.multiply(x, c(x, 0.5)),
            topi.add(c(x, 1.0), topi.fast_erf(topi.multiply(x, c(x, 1 / math.sqrt(2))))),
        )

    def gelu_tanh(x: Any) -> Any:
        cube = topi.multiply(x, topi.multiply(x, x))
        inner = topi.multiply(
            c(x, math.sqrt(2 / math.pi)), topi.add(x, topi.multiply(c(x, 0.044715), cube))
        )
        return topi.multiply(
            topi.multiply(x, c(x, 0.5)), topi.add(c(x, 1.0), topi.fast_tanh(inner))
        )

    def sigmoid(x: Any) -> Any:
        return topi.divide(c(x, 1.0), topi.add(c(x, 1.0), topi.fast_exp(topi.negative(x))))

    def silu(x: Any) -> Any:
        return topi.multiply(x, sigmoid(x))

    return {
        "relax.nn.gelu": gelu,
        "relax.nn.gelu_tanh": gelu_tanh,
        "relax.sigmoid": sigmoid,
        "relax.nn.silu": silu,
        "relax.exp": topi.fast_exp,
        "relax.erf": topi.fast_erf,
        "relax.tanh": topi.fast_tanh,
    }


def _small_int_exponent(e: Any) -> int | None:
    """The exponent as an int when it is a scalar constant 1, 2, 3 or 4, else None."""
    from tvm.ir.expr import Constant  # relax.Constant before 0.27

    if not isinstance(e, Constant) or e.value.numpy().size != 1:
        return None
    v = float(e.value.numpy().reshape(()))
    return int(v) if v in (1.0, 2.0, 3.0, 4.0) else None


def _integer_power(x: Any, n: int) -> Any:
    from tvm import topi

    out = x
    for _ in range(n - 1):
        out = topi.multiply(out, x)
    return out


def FastMath() -> Any:
    """The pass (a tvm.transform.Pass over Relax functions)."""
    import tvm
    from tvm import relax, topi
    from tvm.relax import PyExprMutator, expr_functor

    rules = _rules()

    @expr_functor.mutator
    class _Mutator(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if not call.args or getattr(call.args[0].ty, "dtype", None) != "float32":
                return call
            if name in rules:
                return self.builder_.call_te(rules[name], call.args[0])
            if name == "relax.power":
                n = _small_int_exponent(call.args[1])
                if n is not None:
                    return self.builder_.call_te(_integer_power, call.args[0], n)
            if name == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis)
            return call

    @tvm.transform.module_pass(opt_level=0, name="SpliceFastMath")
    class _Pass:
        def transform_module(self, mod: Any, ctx: Any) -> Any:
            mutator = _Mutator(mod)
            for gv, func in mod.functions_items():
                if isinstance(func, relax.Function):
                    mutator.builder_.update_func(gv, mutator.visit_expr(func))
            return mutator.builder_.get()

    return _Pass()


__all__ = ["FastMath"]
