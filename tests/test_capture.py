"""capture -> print -> parse -> run equals eager PyTorch, on real architectures."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, first_output
from torch.export import Dim

import splice
from splice.errors import CaptureError
from splice.ir import meta as M


@pytest.mark.parametrize("name", ARCHS)
def test_capture_print_parse_run_equals_eager(name, arch_model):
    model, args = arch_model(name)
    program = splice.capture(model, args)
    text = splice.print_ir(program)
    parsed = splice.parse_ir(text, program.weights)
    assert splice.print_ir(parsed) == text
    splice.verify(parsed)
    with torch.no_grad():
        ref = first_output(model(*args))
        got = parsed(*args)
        got = got[0] if isinstance(got, tuple) else got
    assert ref.shape == got.shape
    assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama", "mixtral"])
def test_decoders_capture_without_use_cache_argument(name, arch_model):
    # transformers decoders return a DynamicCache by default, which torch.export cannot flatten
    model, args = arch_model(name)
    with pytest.raises(Exception, match="DynamicCache"):
        torch.export.export(model, args, strict=False)
    program = splice.capture(model, args)
    assert program.input_names == ["input_ids"]
    assert program.output_names == ["logits"]


def test_parameters_are_get_attr_with_state_dict_names(captured, arch_model):
    program = captured("gpt2")
    model, _ = arch_model("gpt2")
    state = dict(model.state_dict())
    getters = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    assert getters == set(program.weight_kinds)
    for name in program.weight_kinds:
        assert name in state
        assert torch.equal(program.get_weight(name), state[name])
    assert all(k == "param" for w, k in program.weight_kinds.items() if w.endswith(".weight"))


def test_every_node_has_spec_and_loc(captured):
    program = captured("bert")
    linears = [
        n for n in program.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
    ]
    assert linears
    for n in program.graph.nodes:
        if n.op == "output":
            continue
        assert M.get_spec(n) is not None, n.name
    q = linears[0]
    loc = M.loc(q)
    assert loc.module_path == "encoder.layer.0.attention.self.query"
    assert loc.file.endswith("modeling_bert.py") and loc.line > 0
    assert M.tensor_spec(q) == M.TensorSpec((1, 8, 64), torch.float32)
    # export's own meta keys are gone: passes read specs and locs through the accessors only
    assert set(q.meta) <= {"splice.spec", "splice.loc"}


def test_keyword_inputs_and_output_names(arch_model):
    model, (ids, mask) = arch_model("bert")
    program = splice.capture(model, {"input_ids": ids, "attention_mask": mask})
    assert program.input_names == ["input_ids", "attention_mask"]
    assert program.output_names == ["last_hidden_state", "pooler_output"]
    out = program.run_named(input_ids=ids, attention_mask=mask)
    assert torch.allclose(out["pooler_output"], model(ids, mask).pooler_output, atol=1e-6)


def test_dynamic_shapes_named_after_user_dims(arch_model):
    model, args = arch_model("gpt2")
    program = splice.capture(model, args, dynamic_shapes=({1: Dim("seq", min=2, max=32)},))
    assert set(program.symbols) == {"seq"}
    assert (
        program.symbols["seq"].hint == 8
        and program.symbols["seq"].min == 2
        and program.symbols["seq"].max == 32
    )
    assert M.spec(program.input_nodes[0]) == M.TensorSpec((1, "seq"), torch.int64)
    text = splice.print_ir(program)
    assert "symbol seq : hint=8 range=[2,32]" in text
    parsed = splice.parse_ir(text, program.weights)
    splice.verify(parsed)
    ids = torch.randint(0, 128, (1, 13))
    with torch.no_grad():
        assert (parsed(ids) - model(ids).logits).abs().max() <= 1e-5


class _Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow
            return self.b(h)
        return h


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Gate()

    def forward(self, x):
        return self.block(x) * 2


def test_data_dependent_branch_is_a_capture_error_pointing_at_branches():
    with pytest.raises(CaptureError) as info:
        splice.capture(_Outer(), (torch.randn(2, 4),))
    e = info.value
    assert "data-dependent control flow" in e.message
    assert "module block" in e.where
    assert f"test_capture.py:{_Gate.forward.__code__.co_firstlineno + 2}" in e.where
    assert "branches" in e.hint


def test_capture_rejects_non_modules():
    with pytest.raises(CaptureError, match="expects an nn.Module"):
        splice.capture(lambda x: x, (torch.randn(2),))


def test_bad_dynamic_shapes_are_capture_errors(arch_model):
    model, args = arch_model("gpt2")
    with pytest.raises(CaptureError):
        splice.capture(model, args, dynamic_shapes=({5: Dim("x")},))


class _Cond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.lin(x).sin(), lambda x: x.cos(), (x,))


def test_torch_cond_is_captured_with_subgraphs_and_round_trips():
    model = _Cond()
    program = splice.capture(model, (torch.randn(4),))
    assert set(program.subgraphs) == {"true_graph_0", "false_graph_0"}
    text = splice.print_ir(program, locations=True)
    assert "graph @true_graph_0(" in text and "higher_order.cond(" in text
    parsed = splice.parse_ir(text, program.weights)
    assert splice.print_ir(parsed, locations=True) == text
    splice.verify(parsed)
    for x in (torch.ones(4), -torch.ones(4)):
        assert torch.allclose(parsed(x), model(x))


def test_capture_restores_training_mode(arch_model):
    model, args = arch_model("convnet")
    model.train()
    try:
        program = splice.capture(model, args)
        assert model.training
        norms = [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
        assert norms and all(n.args[5] is False for n in norms)  # captured in eval mode
    finally:
        model.eval()


def test_the_capture_core_explore_uses_is_public():
    """capture_dynamic builds on these public names (the old underscore aliases are gone)."""
    import importlib

    C = importlib.import_module("splice.ir.capture")  # splice.ir.capture is the function

    x = torch.zeros(2)
    assert C.split_inputs(x) == ((x,), {})
    assert C.split_inputs({"a": x}) == ((), {"a": x})
    assert C.split_inputs(((x,), {"b": x})) == ((x,), {"b": x})
    with pytest.raises(CaptureError, match="example_inputs must be"):
        C.split_inputs(3)
    assert C.ident("0.layer-1") == "p_0_layer_1"
    for name in ("capture_error", "ident", "output_names", "split_inputs", "to_program"):
        assert callable(getattr(C, name)) and not hasattr(C, f"_{name}")
