"""What the ONNX lowerings of splice ops share: the ``splice`` domain and the call context.

A splice op exports as a node of domain :data:`SPLICE_DOMAIN` whose op type names an ONNX
*function* defined in the same model (``ModelProto.functions``): the function's body is
the op's reference semantics in standard ONNX ops, so every runtime can run the node,
and a runtime that knows the domain may replace it with a kernel.

:class:`OnnxContext` is what a lowering writes through: :meth:`OnnxContext.call` records
the node in the graph torch.onnx is building (as an opaque op, so that no pass of
torch.onnx or onnxscript inlines it) and keeps the :class:`onnx.FunctionProto` it calls,
which the exporter appends to the model. onnx and onnxscript are imported inside the
functions (splice imports without them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SPLICE_DOMAIN = "splice"
"""The ONNX domain of splice's ops (version :data:`SPLICE_DOMAIN_VERSION`)."""
SPLICE_DOMAIN_VERSION = 1

#: the element types a splice function accepts (its type constraint ``T``)
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")


def op_schema(name: str, inputs: Sequence[str], attributes: Sequence[tuple[str, str]]) -> Any:
    """An ``onnx.defs.OpSchema`` for the node that calls function ``name``: inputs of one
    float type ``T``, one output ``y`` and ``attributes`` as ``(name, "INT"|"FLOAT")``.

    torch.onnx's graph builder binds a call's arguments by this schema; it is never
    registered with onnx (the function in the model defines the op)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        name,
        SPLICE_DOMAIN,
        SPLICE_DOMAIN_VERSION,
        inputs=[param(n, "T") for n in inputs],
        outputs=[param("y", "T")],
        type_constraints=[("T", list(FLOAT_TYPES), "float tensors")],
        attributes=[
            OpSchema.Attribute(a, getattr(OpSchema.AttrType, kind), "", required=True)
            for a, kind in attributes
        ],
    )


def with_opset(fn: Any, opset: int) -> Any:
    """``fn`` (a FunctionProto) importing the default ONNX domain at ``opset`` (the
    model's; the checker requires a function's imports to match the model's)."""
    import onnx

    out = onnx.FunctionProto()
    out.CopyFrom(fn)
    del out.opset_import[:]
    out.opset_import.append(onnx.helper.make_opsetid("", opset))
    for imp in fn.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            out.opset_import.append(imp)
    return out


@dataclass
class OnnxContext:
    """One export's calls of splice functions: the node builder and the functions used."""

    opset: int
    functions: dict[str, Any] = field(default_factory=dict)  # name -> FunctionProto
    _schemas: dict[str, Any] = field(default_factory=dict)

    def call(
        self,
        name: str,
        function: Callable[[], Any],
        inputs: Sequence[tuple[str, Any]],
        attributes: Sequence[tuple[str, str, Any]] = (),
    ) -> Any:
        """Record the node ``splice.<name>(inputs, attributes)`` in the graph being built;
        ``function()`` gives its FunctionProto (called once per name and export).

        ``inputs`` are ``(formal name, symbolic tensor)``; ``attributes`` are ``(name,
        "INT"|"FLOAT", value)``. Returns the node's output."""
        import onnxscript

        if name not in self.functions:
            self.functions[name] = with_opset(function(), self.opset)
            self._schemas[name] = op_schema(
                name, [n for n, _ in inputs], [(a, k) for a, k, _ in attributes]
            )
        domain = onnxscript.values.Opset(SPLICE_DOMAIN, SPLICE_DOMAIN_VERSION)
        op = onnxscript.values.Op(domain, name, self._schemas[name])
        return op(*(v for _, v in inputs), **{a: v for a, _, v in attributes})


__all__ = [
    "FLOAT_TYPES",
    "SPLICE_DOMAIN",
    "SPLICE_DOMAIN_VERSION",
    "OnnxContext",
    "op_schema",
    "with_opset",
]
