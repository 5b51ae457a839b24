"""The lowering registry: every splice op runs on every backend, by a lowering or its reference."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import splice.runtime.backends
import splice.runtime.backends.triton as triton_backend
import splice.runtime.backends.tvm as tvm_backend
from splice.errors import LoweringError
from splice.ir.lowerings import (
    BACKENDS,
    LOWERINGS,
    Lowering,
    LoweringTable,
    lowering_for,
    register_fallback,
    register_lowering,
)
from splice.ir.ops import OPS, lowrank_linear, moe_ffn


def test_every_op_has_a_lowering_or_a_fallback_on_every_backend():
    for mod in pkgutil.iter_modules(splice.runtime.backends.__path__):
        importlib.import_module(f"splice.runtime.backends.{mod.name}")  # registers lowerings
    assert set(BACKENDS) >= {"tvm", "triton"}
    assert set(OPS) >= {"splice::lowrank_linear", "splice::moe_ffn"}
    assert LOWERINGS.missing() == []
    for qual in OPS:
        for backend in BACKENDS:
            entry = lowering_for(qual, backend)
            assert entry.op == qual and entry.backend == backend
            assert entry.is_fallback or callable(entry.fn), (qual, backend)


def test_the_backends_read_the_registry():
    tvm_ops = {q for q, e in LOWERINGS.for_backend("tvm").items() if not e.is_fallback}
    assert set(tvm_backend.convert_map()) == {f"{OPS[q].name}.default" for q in tvm_ops}
    assert tvm_backend.fallback_decompositions() == {}  # no op falls back on TVM today
    assert lowering_for("moe_ffn", "triton").fn is triton_backend._moe_ffn_launcher


def test_reference_signatures_follow_the_schema():
    for op in OPS.values():
        op.check_signature(op.reference)
        assert [p.name for p in op.params] == list(op.signature().parameters)
    with pytest.raises(TypeError, match=r"splice::moe_ffn.*router_w"):
        moe_ffn.check_signature(lambda x, w_in, act: x)
    args = moe_ffn.bind(*range(9), "relu", top_p=0.5)
    assert (args.x, args.b_out, args.act, args.top_k, args.top_p) == (0, 8, "relu", 0, 0.5)
    with pytest.raises(TypeError, match="no argument 'rnak'"):
        lowrank_linear.bind(1, 2, 3, rnak=4)
    with pytest.raises(TypeError, match="missing its argument 'B'"):
        lowrank_linear.bind(1, 2)


def test_a_missing_lowering_names_the_op_and_the_backend():
    table = LoweringTable(OPS, (*BACKENDS, "onnx"))
    with pytest.raises(LoweringError) as info:
        table.lookup("splice::moe_ffn", "onnx")
    text = str(info.value)
    assert "splice::moe_ffn" in text and "onnx" in text and "register_lowering" in text
    assert ("splice::moe_ffn", "onnx") in table.missing()
    with pytest.raises(LoweringError, match="no onnx lowering registered for splice::moe_ffn"):
        table.lookup("moe_ffn", "onnx")  # a bare name is in the splice namespace


def test_register_and_declare_a_fallback():
    table = LoweringTable(OPS, ("tvm", "onnx"))

    @table.register("splice::lowrank_linear", "onnx")
    def lower_lowrank(*args):
        return args

    table.fallback(moe_ffn, "onnx", reason="no kernel yet")
    assert table.lookup("lowrank_linear", "onnx").fn is lower_lowrank
    fb = table.lookup("splice::moe_ffn", "onnx")
    assert fb.is_fallback and fb.reason == "no kernel yet"
    assert set(table.missing()) == {("splice::lowrank_linear", "tvm"), ("splice::moe_ffn", "tvm")}
    table.register("splice::lowrank_linear", "onnx")(lower_lowrank)  # the same again: fine
    with pytest.raises(LoweringError, match="already has a onnx lowering"):
        table.register("splice::lowrank_linear", "onnx")(lambda *a: a)
    with pytest.raises(LoweringError, match="already has a onnx lowering"):
        table.fallback("splice::lowrank_linear", "onnx")
    with pytest.raises(LoweringError, match="no splice op 'splice::lowrank'"):
        table.register("lowrank", "onnx")
    with pytest.raises(LoweringError, match="unknown backend 'trition'"):
        table.fallback("moe_ffn", "trition")
    # the module-level functions act on the registry of the dialect
    with pytest.raises(LoweringError, match="already has a tvm lowering"):
        register_fallback("splice::moe_ffn", "tvm")
    with pytest.raises(LoweringError, match="already has a triton lowering"):
        register_lowering("splice::moe_ffn", "triton")(lambda: None)


class _LowRank(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(6, 3, generator=g))
        self.B = torch.nn.Parameter(torch.randn(3, 5, generator=g))

    def forward(self, x):
        return torch.ops.splice.lowrank_linear(x, self.A, self.B, None, 2)


def test_a_tvm_fallback_is_inlined_as_the_reference(monkeypatch):
    """An op that falls back on TVM reaches TVM's import as its reference's ATen ops."""
    key = ("splice::lowrank_linear", "tvm")
    monkeypatch.setitem(LOWERINGS._entries, key, Lowering(*key, None, "test"))
    assert "lowrank_linear.default" not in tvm_backend.convert_map()
    assert tvm_backend.fallback_decompositions() == {
        lowrank_linear.overload: lowrank_linear.reference
    }
    x = torch.randn(4, 5)
    ep = torch.export.export(_LowRank(), (x,), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "splice.lowrank_linear.default" in targets
    out = tvm_backend.decompose(ep, "p")
    targets = {str(n.target) for n in out.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("splice.") for t in targets)
    torch.testing.assert_close(out.module()(x), _LowRank()(x))
