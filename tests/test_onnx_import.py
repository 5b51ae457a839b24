"""splice.ir.import_onnx: ONNX models read back into Programs.

Round trips: torch.onnx's dynamo exporter (a third-party file) and splice's own exporter
(``to_onnx``) of GPT-2, BERT, ViT and the conv net, imported and run against eager PyTorch;
small single-op models against ONNX Runtime; the splice domain's functions coming back as
splice ops; passes on an imported model; the errors a user can cause.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import splice
from splice import models
from splice.errors import CaptureError
from splice.ir import import_onnx, parse_ir, print_ir, verify
from splice.ir import meta as M
from splice.ir.onnx_import import supported_ops
from splice.passes import parse_pipeline

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

TOL = 1e-5


def _fresh_inputs(name: str) -> tuple[torch.Tensor, ...]:
    """Inputs other than the example the model was exported with (seeded)."""
    g = torch.Generator().manual_seed(1)
    if name == "gpt2":
        return (torch.randint(0, 128, (1, 8), generator=g),)
    if name == "bert":
        ids = torch.randint(0, 128, (1, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # padding: the attention-mask path must be kept, not folded
        return ids, mask
    return (torch.randn(1, 3, 32, 32, generator=g),)


def _eager(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs, **({"use_cache": False} if "GPT2" in type(model).__name__ else {}))
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def torch_onnx_files(tmp_path_factory):
    """name -> (eager model, path of torch.onnx.export(dynamo=True)'s file)."""
    out = {}
    folder = tmp_path_factory.mktemp("torch_onnx")
    for name in ("gpt2", "bert", "vit", "convnet"):
        model, inputs = getattr(models, name)()
        kwargs = {"use_cache": False} if name == "gpt2" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onx = torch.onnx.export(model, inputs, kwargs=kwargs, dynamo=True, verbose=False)
        path = folder / f"{name}.onnx"
        onx.save(str(path))
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "convnet"])
def test_torch_onnx_file_round_trip(torch_onnx_files, name):
    model, path = torch_onnx_files[name]
    program = import_onnx(path)
    verify(program)
    inputs = _fresh_inputs(name)
    assert _max_diff(program.run(*inputs), _eager(model, inputs)) <= TOL
    # the text form round trips
    text = print_ir(program)
    again = parse_ir(text, program.weights)
    assert print_ir(again) == text
    assert _max_diff(again.run(*inputs), program.run(*inputs)) == 0.0
    # shape arithmetic is folded: no shape ops and no symbolic sizes are left
    targets = {str(n.target) for n in program.nodes if n.op == "call_function"}
    assert not any("sym_size" in t or "_local_scalar_dense" in t for t in targets)


def test_torch_onnx_gpt2_names_and_locations(torch_onnx_files):
    _, path = torch_onnx_files["gpt2"]
    program = import_onnx(path)
    assert program.input_names == ["input_ids"]
    weights = set(program.weights)
    assert "transformer.h.0.attn.c_attn.weight" in weights
    mods = {M.loc(n).module_path for n in program.nodes if n.op == "call_function"}
    assert "transformer.h.0.attn.c_attn" in mods and "transformer.h.1.mlp.act" in mods
    files = {M.loc(n).file.rsplit("/", 1)[-1] for n in program.nodes if M.loc(n).file}
    assert "modeling_gpt2.py" in files and "onnx_import.py" not in files


def test_lowrank_on_imported_gpt2_matches_captured(torch_onnx_files):
    """lowrank finds the Gemm layers of an imported GPT-2 and factors them as it does the
    captured model's Conv1D layers: same layers, same outputs."""
    model, path = torch_onnx_files["gpt2"]
    inputs = _fresh_inputs("gpt2")
    pipe = "lowrank{ratio=0.5,targets=transformer.h.*}"
    imported = parse_pipeline(pipe).run(import_onnx(path)).program
    captured = parse_pipeline(pipe).run(splice.capture(model, models.gpt2()[1])).program

    def factored(p):
        return sorted(M.loc(n).module_path for n in p.nodes if "lowrank_linear" in str(n.target))

    assert factored(imported) == factored(captured)
    assert len(factored(imported)) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    assert _max_diff(imported.run(*inputs), captured.run(*inputs)) <= 1e-4
    assert _max_diff(imported.run(*inputs), _eager(model, inputs)) > 1e-3  # really factored


def test_lowrank_on_imported_bert_matmul_layers(torch_onnx_files):
    """BERT's Linears come out of torch.onnx as MatMul by a folded W^T (``val_55``): the
    importer names them after their module, and lowrank factors them as it factors the
    captured model's Linears."""
    model, path = torch_onnx_files["bert"]
    program = import_onnx(path)
    assert "encoder.layer.0.attention.self.query.weight" in program.weights
    inputs = _fresh_inputs("bert")
    pipe = "lowrank{ratio=0.5,targets=encoder.*}"
    imported = parse_pipeline(pipe).run(program).program
    captured = parse_pipeline(pipe).run(splice.capture(model, models.bert()[1])).program
    sites = [n for n in imported.nodes if "lowrank_linear" in str(n.target)]
    assert len(sites) == 12  # q, k, v, attention.output, intermediate, output in 2 layers
    assert _max_diff(imported.run(*inputs), captured.run(*inputs)) <= 1e-4


# ---------------------------------------------------------------------------------------
# splice's own exporter


@pytest.fixture(scope="module")
def to_onnx():
    pytest.importorskip("onnxscript")
    from splice.runtime.backends.onnx import to_onnx

    return to_onnx


def test_splice_export_round_trip_convnet(to_onnx, tmp_path):
    """The exported model saved with its weights as external data, imported from the
    path (the data file is read from beside the model)."""
    model, inputs = models.convnet()
    program = splice.capture(model, inputs)
    path = tmp_path / "convnet.onnx"
    onnx.save_model(
        to_onnx(program), path, save_as_external_data=True, location="w.bin", size_threshold=0
    )
    assert (tmp_path / "w.bin").stat().st_size > 4 * 16 * 3 * 3 * 3
    back = import_onnx(path)
    verify(back)
    assert back.name == "convnet"
    assert back.input_names == program.input_names
    assert back.output_names == program.output_names
    fresh = _fresh_inputs("convnet")
    assert _max_diff(back.run(*fresh), program.run(*fresh)) <= TOL
    # Locs travel: splice.module / splice.source metadata (torch.onnx's optimiser fuses
    # Conv+BatchNorm into new nodes that carry none: those have no module path)
    mods = {M.loc(n).module_path for n in back.nodes if n.op == "call_function"}
    assert mods >= {"stem.2", "stage1", "stage2", "stage2.down", "head"}
    located = [M.loc(n) for n in back.nodes if M.loc(n).module_path]
    assert located and all(loc.file.endswith("models.py") and loc.line for loc in located)


def test_splice_export_round_trip_lowrank_gpt2(to_onnx):
    """A lowrank'd GPT-2 exports with splice.lowrank_linear functions; importing gives the
    splice ops back (same factors, same Locs and pass history) and the same outputs."""
    model, inputs = models.gpt2()
    program = splice.capture(model, inputs)
    program = parse_pipeline("lowrank{ratio=0.5}").run(program).program
    proto = to_onnx(program)
    assert any(f.domain == "splice" for f in proto.functions)
    back = import_onnx(proto)
    verify(back)
    fresh = _fresh_inputs("gpt2")
    assert _max_diff(back.run(*fresh), program.run(*fresh)) <= TOL

    def sites(p):
        return sorted(
            (M.loc(n).module_path, M.loc(n).from_passes, tuple(M.spec(n).shape))
            for n in p.nodes
            if n.target is torch.ops.splice.lowrank_linear.default
        )

    assert sites(back) == sites(program) and len(sites(back)) > 0
    text = print_ir(back)
    assert print_ir(parse_ir(text, back.weights)) == text


# ---------------------------------------------------------------------------------------
# single ops against ONNX Runtime


def _model(nodes, inputs, outputs, inits=(), opset=18, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)]
        + [helper.make_opsetid(d, 1) for d in sorted({f.domain for f in functions})],
        functions=list(functions),
    )
    m.ir_version = 9
    return m


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _ints(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _check_against_ort(m, feeds):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    program = import_onnx(m)
    verify(program)
    got = program.run(*feeds.values())
    for r, g in zip(ref, got):
        assert tuple(g.shape) == r.shape
        assert g.dtype == torch.from_numpy(r).dtype
        assert (g - torch.from_numpy(r)).abs().max().item() <= TOL if r.size else True
    return program


_G = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 8, 8, generator=_G)


def _conv_case():
    w = onnx.numpy_helper.from_array(torch.randn(4, 3, 3, 3, generator=_G).numpy(), "w")
    b = onnx.numpy_helper.from_array(torch.randn(4, generator=_G).numpy(), "b")
    n = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])
    return [n], [w, b], [_vi("y", None)]


def _pool_cases():
    return [
        helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 0, 1, 1]),
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("GlobalAveragePool", ["x"], ["y"]),
    ]


@pytest.mark.parametrize("i", range(4))
def test_pooling_matches_ort(i):
    m = _model([_pool_cases()[i]], [_vi("x", [2, 3, 8, 8])], [_vi("y", None)])
    _check_against_ort(m, {"x": X})


def test_conv_with_asymmetric_pads_matches_ort():
    nodes, inits, outs = _conv_case()
    m = _model(nodes, [_vi("x", [2, 3, 8, 8])], outs, inits)
    _check_against_ort(m, {"x": X})


def test_shape_arithmetic_is_folded_and_indexing_matches_ort():
    """Shape -> Gather -> Concat -> Reshape, Slice with a negative step, Gather with
    negative static indices, Expand, Where, CumSum, Split, Trilu: equal to ORT, and the
    program has no shape ops left (the Reshape target is ints)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n0"], axis=0),
        helper.make_node("Concat", ["n0", "m1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),  # [2, 192]
        helper.make_node("Slice", ["r", "st", "en", "ax", "sp"], ["sl"]),  # reversed columns
        helper.make_node("Gather", ["sl", "neg"], ["g"], axis=1),
        helper.make_node("CumSum", ["g", "ax1"], ["c"], reverse=1, exclusive=1),
        helper.make_node("Split", ["c"], ["a", "b"], axis=1, num_outputs=2),
        helper.make_node("Greater", ["a", "zero"], ["gt"]),
        helper.make_node("Where", ["gt", "a", "b"], ["w"]),
        helper.make_node("Expand", ["w", "eshape"], ["e"]),
        helper.make_node("Trilu", ["e"], ["y"], upper=0),
    ]
    inits = [
        _ints("i0", [0]),
        _ints("m1", [-1]),
        _ints("st", [-2]),
        _ints("en", [-200]),
        _ints("ax", [1]),
        _ints("sp", [-3]),
        _ints("neg", [-1, 0, 5, -7]),
        helper.make_tensor("ax1", TensorProto.INT64, [], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        _ints("eshape", [3, 1, 2]),
    ]
    m = _model(nodes, [_vi("x", [2, 3, 8, 8])], [_vi("y", None)], inits)
    program = _check_against_ort(m, {"x": X})
    targets = [str(n.target) for n in program.nodes if n.op == "call_function"]
    assert "aten.reshape.default" in targets
    reshape = next(n for n in program.nodes if str(n.target) == "aten.reshape.default")
    assert reshape.args[1] == [2, -1]


def test_model_local_function_is_inlined():
    body = [
        helper.make_node("Mul", ["a", "a"], ["sq"]),
        helper.make_node("Constant", [], ["k"], value_float=0.5),
        helper.make_node("Mul", ["sq", "k"], ["o"]),
    ]
    fn = helper.make_function(
        "custom.dom", "half_square", ["a"], ["o"], body, [helper.make_opsetid("", 18)]
    )
    node = helper.make_node("half_square", ["x"], ["y"], domain="custom.dom")
    m = _model([node], [_vi("x", [2, 3, 8, 8])], [_vi("y", None)], functions=[fn])
    program = _check_against_ort(m, {"x": X})
    assert [str(n.target) for n in program.nodes if n.op == "call_function"] == [
        "aten.mul.Tensor",
        "aten.mul.Tensor",
    ]


def test_node_metadata_becomes_locations():
    node = helper.make_node("Relu", ["x"], ["y"], name="r0")
    for k, v in {
        "splice.module": "enc.block.0",
        "splice.source": "/src/net.py:42",
        "splice.passes": "lowrank,experts",
    }.items():
        entry = node.metadata_props.add()
        entry.key, entry.value = k, v
    program = import_onnx(_model([node], [_vi("x", [2, 3])], [_vi("y", None)]))
    relu = next(n for n in program.nodes if n.op == "call_function")
    assert M.loc(relu) == M.Loc("enc.block.0", "/src/net.py", 42, ("lowrank", "experts"))


# ---------------------------------------------------------------------------------------
# errors


def test_unsupported_op_names_op_domain_and_node():
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob0", domain="com.example")
    graph = helper.make_graph([node], "g", [_vi("x", [2])], [_vi("y", None)])
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(CaptureError) as err:
        import_onnx(m)
    assert err.value.message == (
        "ONNX op 'Frobnicate' (domain 'com.example') of node 'frob0' is not supported by "
        "splice.import_onnx"
    )
    assert err.value.where == "ONNX node 'frob0' (Frobnicate)"
    assert "supported_ops()" in err.value.hint


def test_unsupported_default_domain_op():
    node = helper.make_node("NonZero", ["x"], ["y"], name="nz")
    m = _model([node], [_vi("x", [4])], [_vi("y", None, TensorProto.INT64)])
    with pytest.raises(
        CaptureError, match=re.escape("ONNX op 'NonZero' (domain 'ai.onnx') of node 'nz'")
    ):
        import_onnx(m)
    assert "NonZero" not in supported_ops() and "Gemm" in supported_ops()


def test_symbolic_dim_needs_shapes():
    node = helper.make_node("Relu", ["x"], ["y"])
    m = _model([node], [_vi("x", ["batch", 3])], [_vi("y", None)])
    with pytest.raises(CaptureError) as err:
        import_onnx(m)
    assert err.value.message == (
        "ONNX input 'x' has the symbolic dim 'batch' (dim 0); a splice Program has static shapes"
    )
    assert "shapes={'x': (...)}" in err.value.hint
    program = import_onnx(m, shapes={"x": (5, 3)})
    assert M.spec(program.input_nodes[0]).shape == (5, 3)
    with pytest.raises(CaptureError, match=r"shapes= names \['y'\], which are not inputs"):
        import_onnx(m, shapes={"y": (1,)})
    unranked = _model([node], [_vi("x", None)], [_vi("y", None)])
    with pytest.raises(
        CaptureError, match=re.escape("ONNX input 'x' has no shape (not even a rank)")
    ):
        import_onnx(unranked)
    assert import_onnx(unranked, shapes={"x": (4,)}).run(-torch.ones(4))[0].sum().item() == 0.0


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(CaptureError, match="no ONNX file at"):
        import_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(CaptureError, match="is not a readable ONNX model"):
        import_onnx(bad)
    with pytest.raises(CaptureError, match="expects a path or an onnx.ModelProto"):
        import_onnx(42)


def test_splice_export_round_trip_experts_mlp(to_onnx):
    """An experts'd MLP exports splice::moe_ffn as a variant function
    (``moe_ffn_gelu_plain_k2_...``); importing gives the op back with the same options."""
    from splice.ir.ops import OPS

    model, inputs = models.mlp(d=32, hidden=64, batch=2)
    program = splice.capture(model, inputs)
    program = parse_pipeline("experts{num_experts=4,top_k=2}").run(program).program
    back = import_onnx(to_onnx(program))
    verify(back)
    fresh = (torch.randn(2, 32, generator=torch.Generator().manual_seed(1)),)
    assert _max_diff(back.run(*fresh), program.run(*fresh)) <= TOL
    op = OPS["splice::moe_ffn"]

    def options(p):
        (node,) = [n for n in p.nodes if n.target is op.overload]
        bound = vars(op.bind(*node.args, **node.kwargs))
        opts = {k: v for k, v in bound.items() if not isinstance(v, torch.fx.Node)}
        return opts, M.loc(node).module_path, M.loc(node).from_passes

    assert options(back) == options(program)
    assert options(back)[0]["top_k"] == 2 and options(back)[2] == ("experts",)


# ---------------------------------------------------------------------------------------
# control flow


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.cond(
            x.sum() > 0, lambda x, w: (x @ w).relu(), lambda x, w: x * 2.0, (x, self.w)
        )


def test_splice_export_round_trip_cond(to_onnx):
    """A program with a data-dependent cond exports with ONNX If; importing gives a
    torch.cond back whose branches equal the program's on inputs taking each branch."""
    x = torch.rand(2, 4) + 0.1
    program = splice.capture(_Branchy(), (x,))
    back = import_onnx(to_onnx(program))
    verify(back)
    assert any(n.target is torch.ops.higher_order.cond for n in back.nodes)
    for sign in (1.0, -1.0):
        assert _max_diff(back.run(sign * x), program.run(sign * x)) <= TOL
    text = print_ir(back)
    assert print_ir(parse_ir(text, back.weights)) == text


def test_if_with_branch_constants_matches_ort():
    """Each branch reads outer values and a tensor constant of its own (a subgraph
    initializer): both become cond operands."""
    c = onnx.numpy_helper.from_array(torch.arange(4.0).numpy(), "c")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"])], "then", [], [_vi("t", [2, 4])], [c]
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["e"])], "else", [], [_vi("e", [2, 4])]
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["p"]),
        helper.make_node("If", ["p"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    m = _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 4])], [zero])
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(2)) + 0.1
    _check_against_ort(m, {"x": x})
    program = _check_against_ort(m, {"x": -x})
    assert any(n.target is torch.ops.higher_order.cond for n in program.nodes)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scalar(name, value, t=TensorProto.FLOAT):
    return helper.make_tensor(name, t, [], [value])


def test_scalar_operands_in_either_place_match_ort():
    """Static one-element operands become Python scalars (first or second operand), an
    integer exponent included; results keep ONNX's dtypes."""
    nodes = [
        helper.make_node("Sub", ["one", "x"], ["a"]),
        helper.make_node("Div", ["two", "a"], ["b"]),
        helper.make_node("Pow", ["b", "ipow"], ["c"]),
        helper.make_node("Less", ["half", "c"], ["d"]),
        helper.make_node("Where", ["d", "c", "half"], ["e"]),
        helper.make_node("Max", ["e", "one"], ["y"]),
    ]
    inits = [
        _scalar("one", 1.0),
        _scalar("two", 2.0),
        _scalar("half", 0.5),
        _scalar("ipow", 2, TensorProto.INT64),
    ]
    m = _model(nodes, [_vi("x", [3, 4])], [_vi("y", [3, 4])], inits)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    program = _check_against_ort(m, {"x": x})
    assert not program.weights  # every constant became a Python scalar


NORM_CASES = {
    "layer_norm_axis": (
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-2, epsilon=1e-3)],
        lambda: [
            onnx.numpy_helper.from_array(torch.rand(3, 4, generator=_gen(5)).numpy() + 0.5, "s"),
            onnx.numpy_helper.from_array(torch.rand(3, 4, generator=_gen(6)).numpy(), "b"),
        ],
        18,
    ),
    "softmax_opset11": ([helper.make_node("Softmax", ["x"], ["y"], axis=1)], list, 11),
    "reduce_mean_attr": (
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, -1], keepdims=0)],
        list,
        13,
    ),
    "gelu_tanh_clip": (
        [
            helper.make_node("Gelu", ["x"], ["g"], approximate="tanh"),
            helper.make_node("Clip", ["g", "lo", "hi"], ["y"]),
        ],
        lambda: [_scalar("lo", -0.1), _scalar("hi", 0.4)],
        20,
    ),
    "topk_flatten": (
        [
            helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1),
            helper.make_node("Flatten", ["v"], ["y"], axis=2),
        ],
        lambda: [_ints("k", [2])],
        18,
    ),
}


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_normalisation_and_reduction_ops_match_ort(case):
    nodes, inits, opset = NORM_CASES[case]
    m = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", None)], inits(), opset=opset)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    _check_against_ort(m, {"x": x})


def test_function_attribute_references_and_defaults():
    """A function attribute read by ``ref_attr_name`` takes the call's value, or the
    function's default when the call leaves it out."""
    k = helper.make_node("Constant", [], ["k"])
    ref = onnx.AttributeProto(
        name="value_float", ref_attr_name="alpha", type=onnx.AttributeProto.FLOAT
    )
    k.attribute.append(ref)
    fn = helper.make_function(
        "custom.dom",
        "scale_by",
        ["a"],
        ["o"],
        [k, helper.make_node("Mul", ["a", "k"], ["o"])],
        [helper.make_opsetid("", 18)],
        attribute_protos=[helper.make_attribute("alpha", 2.0)],
    )
    nodes = [
        helper.make_node("scale_by", ["x"], ["t"], domain="custom.dom", alpha=3.0),
        helper.make_node("scale_by", ["t"], ["y"], domain="custom.dom"),
    ]
    m = _model(nodes, [_vi("x", [2, 3])], [_vi("y", None)], functions=[fn])
    x = torch.randn(2, 3, generator=_gen(7))
    program = _check_against_ort(m, {"x": x})
    assert torch.equal(program.run(x)[0], x * 3.0 * 2.0)


def test_shape_from_input_data_is_an_error():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")]
    m = _model(nodes, [_vi("x", [2, 3]), _vi("shape", [2], TensorProto.INT64)], [_vi("y", None)])
    with pytest.raises(CaptureError) as err:
        import_onnx(m)
    assert err.value.message == (
        "ONNX node Reshape cannot be imported: its target shape depends on the input data; "
        "splice programs have static shapes"
    )
    assert err.value.where == "ONNX node 'r' (Reshape)"


@pytest.mark.parametrize("layout", ["4d_gqa_causal_mask", "3d_float_mask"])
def test_attention_matches_ort(layout):
    """ONNX Attention (opset 23, what torch.onnx writes for SDPA there) as PyTorch's
    scaled_dot_product_attention."""
    g = _gen(8)
    if layout == "4d_gqa_causal_mask":
        shapes = {"q": [1, 4, 5, 8], "k": [1, 2, 5, 8], "v": [1, 2, 5, 8]}
        mask = torch.rand(1, 1, 5, 5, generator=g) > 0.2
        mask[..., 0] = True  # every row attends somewhere
        attrs = {"is_causal": 1}
        mtype = TensorProto.BOOL
    else:
        shapes = {"q": [2, 5, 16], "k": [2, 6, 16], "v": [2, 6, 16]}
        mask = torch.randn(5, 6, generator=g)
        attrs = {"q_num_heads": 2, "kv_num_heads": 2, "scale": 0.3}
        mtype = TensorProto.FLOAT
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], **attrs)
    inputs = [_vi(n, s) for n, s in shapes.items()] + [_vi("mask", list(mask.shape), mtype)]
    m = _model([node], inputs, [_vi("y", None)], opset=23)
    feeds = {n: torch.randn(s, generator=g) for n, s in shapes.items()} | {"mask": mask}
    program = _check_against_ort(m, feeds)
    targets = [str(n.target) for n in program.nodes if n.op == "call_function"]
    assert "aten.scaled_dot_product_attention.default" in targets
