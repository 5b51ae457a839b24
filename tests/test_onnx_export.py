"""ONNX export (issue 19 item 1): splice ops as functions of the ``splice`` domain, names,
metadata, control flow, errors, files and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import splice
from splice.errors import LoweringError
from splice.ir import meta as M
from splice.passes import parse_pipeline

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from splice.runtime.backends.onnx import (  # noqa: E402
    DEFAULT_OPSET,
    export_onnx,
    signature_paths,
    to_onnx,
)
from splice.runtime.kernels.onnx_moe_ffn import translate_moe_ffn  # noqa: E402


def run_ort(model, names, inputs) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})


def assert_matches(proto, program, inputs, tol=1e-5) -> None:
    got = run_ort(proto, program.input_names, inputs)
    with torch.no_grad():
        want = program.run(*inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        assert np.abs(g - w.numpy()).max() <= tol


def check_full(proto) -> None:
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def splice_nodes(proto) -> list:
    return [n for n in proto.graph.node if n.domain == "splice"]


# ---------------------------------------------------------------------------------------
# splice ops


class LowRank(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(6, 4, generator=g))
        self.B = nn.Parameter(torch.randn(4, 5, generator=g))
        self.bias = nn.Parameter(torch.randn(6, generator=g))

    def forward(self, x):
        full = torch.ops.splice.lowrank_linear(x, self.A, self.B, self.bias)
        prefix = torch.ops.splice.lowrank_linear(x, self.A, self.B, None, 2)
        return full, prefix


def test_lowrank_linear_is_a_function_of_the_splice_domain():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    program = splice.capture(LowRank(), (x,))
    proto = to_onnx(program)
    check_full(proto)
    fns = {(f.domain, f.name) for f in proto.functions}
    assert fns == {("splice", "lowrank_linear"), ("splice", "lowrank_linear_bias")}
    calls = splice_nodes(proto)
    assert sorted(n.op_type for n in calls) == ["lowrank_linear", "lowrank_linear_bias"]
    ranks = {n.op_type: n.attribute[0].i for n in calls}
    assert ranks == {"lowrank_linear_bias": 4, "lowrank_linear": 2}  # rank: a prefix
    assert {o.domain: o.version for o in proto.opset_import} == {"": DEFAULT_OPSET, "splice": 1}
    assert [i.name for i in proto.graph.input] == program.input_names
    assert [o.name for o in proto.graph.output] == program.output_names
    assert_matches(proto, program, (x,))
    # the function body is the reference: y = (x B[:2]ᵀ) A[:, :2]ᵀ
    with torch.no_grad():
        ref = (x @ program.get_weight("B")[:2].T) @ program.get_weight("A")[:, :2].T
    got = run_ort(proto, ["x"], (x,))[1]
    assert np.abs(got - ref.numpy()).max() < 1e-5


class MoE(nn.Module):
    """Four moe_ffn nodes covering the routing options of the reference."""

    def __init__(self, d=8, s=4, E=4, d_out=6):
        super().__init__()
        g = torch.Generator().manual_seed(2)

        def p(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) * 0.5)

        self.router_w, self.router_b = p(E, d), p(E)
        self.w_in, self.b_in = p(E, s, d), p(E, s)
        self.w_gate, self.b_gate = p(E, s, d), p(E, s)
        self.w_out, self.b_out = p(E, s, d_out), p(d_out)

    def forward(self, x):
        moe = torch.ops.splice.moe_ffn
        a = moe(
            x, self.router_w, self.router_b, self.w_in, self.b_in, self.w_gate, self.b_gate,
            self.w_out, self.b_out, "silu", top_k=2, scale="renorm", weighted=True,
            router_norm=False,
        )  # fmt: skip
        b = moe(
            x, self.router_w, None, self.w_in, None, None, None, self.w_out, None, "gelu",
            top_k=3, scale="e_over_k",
        )  # fmt: skip
        c = moe(
            x, self.router_w, self.router_b, self.w_in, self.b_in, None, None, self.w_out,
            self.b_out, "gelu_tanh", top_p=0.6, weighted=True, scale="e_over_k",
        )  # fmt: skip
        d = moe(
            x, self.router_w, None, self.w_in, None, self.w_gate, None, self.w_out, self.b_out,
            "relu2", top_p=1.0, scale="renorm",
        )  # fmt: skip
        return a, b, c, d


def test_moe_ffn_variants_equal_the_reference():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    program = splice.capture(MoE(), (x,))
    proto = to_onnx(program)
    check_full(proto)
    names = sorted(f.name for f in proto.functions)
    assert len(names) == 4 and all(n.startswith("moe_ffn_") for n in names), names
    assert {f.domain for f in proto.functions} == {"splice"}
    assert sorted(n.op_type for n in splice_nodes(proto)) == names
    topk = next(f for f in proto.functions if "_k2_" in f.name)
    assert {"TopK", "Gather"} <= {n.op_type for n in topk.node}  # only the selected experts
    assert_matches(proto, program, (x,), tol=1e-5)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "sigmoid", "tanh", "quick_gelu"])
def test_moe_ffn_activations(act):
    class One(MoE):
        def forward(self, x):
            return torch.ops.splice.moe_ffn(
                x, self.router_w, None, self.w_in, self.b_in, None, None, self.w_out,
                self.b_out, act, top_k=1,
            )  # fmt: skip

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    program = splice.capture(One(), (x,))
    assert_matches(to_onnx(program), program, (x,))


def test_moe_ffn_options_onnx_cannot_take_raise_naming_the_node():
    with pytest.raises(LoweringError, match=r"moe_ffn cannot be exported.*activation 'swish'"):
        translate_moe_ffn(None, None, None, None, None, None, None, None, None, None, "swish", 2)
    with pytest.raises(LoweringError, match="exactly one of top_k > 0 and top_p > 0"):
        translate_moe_ffn(None, *([None] * 9), "relu", 2, 0.5)


# ---------------------------------------------------------------------------------------
# metadata, names


def test_nodes_carry_module_paths_source_lines_and_passes():
    model, ex = splice.models.mlp(d=16, hidden=32)
    program = parse_pipeline("lowrank{ratio=0.5}").run(splice.capture(model, ex)).program
    proto = to_onnx(program)
    props = [{p.key: p.value for p in n.metadata_props} for n in proto.graph.node]
    located = [p for p in props if p.get("splice.module")]
    assert len(located) == len(props), props  # every node is mapped back
    modules = {p["splice.module"] for p in located}
    assert {"fc1", "fc2"} <= modules
    assert all(p["splice.source"].startswith(splice.models.__file__) for p in located)
    lowrank = [p for p in props if p["splice.node"].startswith("lowrank_linear")]
    assert lowrank and all(p["splice.passes"] == "lowrank" for p in lowrank)
    model_props = {p.key: p.value for p in proto.metadata_props}
    assert model_props["splice.program"] == program.name
    assert model_props["splice.version"] == splice.__version__
    assert model_props["splice.passes"] == "lowrank"
    assert proto.producer_name == "splice"


# ---------------------------------------------------------------------------------------
# control flow


class Gate(nn.Module):
    """Two nested data-dependent branches (captured with capture_dynamic as conds)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            if h.mean() > 0.5:
                return self.b(h) * 2
            return self.b(h)
        return -h


def test_cond_exports_as_if_for_every_branch():
    torch.manual_seed(0)
    model = Gate().eval()
    xs = [torch.full((2, 4), v) for v in (-3.0, 0.05, 3.0)]
    program = splice.capture_dynamic(model, (xs[0],))
    proto = to_onnx(program)
    check_full(proto)
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(ifs) == 1
    props = {p.key: p.value for p in ifs[0].metadata_props}
    assert props["splice.node"].startswith("cond")
    sess = ort.InferenceSession(proto.SerializeToString())
    for x in xs:
        with torch.no_grad():
            want = model(x)
        got = sess.run(None, {program.input_names[0]: x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() < 1e-6
    assert not any(o.domain.startswith("splice.export") for o in proto.opset_import)


# ---------------------------------------------------------------------------------------
# errors


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.qr(self.fc(x))[0]


def test_an_op_onnx_cannot_express_names_node_module_and_source(tmp_path):
    x = torch.randn(4, 4)
    program = splice.capture(Unsupported(), (x,))
    node = next(n for n in program.nodes if "linalg_qr" in str(n.target))
    with pytest.raises(LoweringError) as info:
        to_onnx(program)
    err = info.value
    assert f"%{node.name}" in err.message and "linalg_qr" in err.message
    assert err.where is not None
    assert f"source {M.loc(node).source}" in err.where and __file__ in err.where
    # nothing is written when the export fails
    with pytest.raises(LoweringError):
        export_onnx(program, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    model, ex = splice.models.mlp(d=8, hidden=16)
    program = splice.capture(model, ex)
    with pytest.raises(LoweringError, match="opset 13 is below 18"):
        to_onnx(program, opset=13)
    with pytest.raises(LoweringError, match="takes a Program"):
        to_onnx(model)


# ---------------------------------------------------------------------------------------
# files


def test_external_data_and_atomic_files(tmp_path):
    model, ex = splice.models.mlp(d=16, hidden=32)
    program = splice.capture(model, ex)
    out = export_onnx(program, tmp_path / "m.onnx", external_data=True)
    assert out == tmp_path / "m.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").stat().st_size < 10_000  # weights are outside
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out))
    got = sess.run(None, {"x": ex[0].numpy()})[0]
    assert np.abs(got - program.run(*ex)[0].detach().numpy()).max() < 1e-5
    inline = export_onnx(program, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    inits = onnx.load(str(inline)).graph.initializer
    assert set(program.weight_kinds) <= {t.name for t in inits}
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in inits)
    with pytest.raises(LoweringError, match="it is a folder"):
        export_onnx(program, tmp_path)


def test_a_signature_set_writes_one_model_per_signature(tmp_path):
    class Shape(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.shape[0] > 2 else -self.fc(x)

    model = Shape().eval()
    small, large = torch.randn(2, 4), torch.randn(5, 4)
    sset = splice.capture_dynamic(model, (small,), signatures=[(large,)])
    assert isinstance(sset, splice.SignatureSet)
    paths = export_onnx(sset, tmp_path / "model.onnx")
    assert paths == signature_paths(tmp_path / "model.onnx", 2)
    assert [p.name for p in paths] == ["model.s0.onnx", "model.s1.onnx"]
    for path, member in zip(paths, sset, strict=True):
        proto = onnx.load(str(path))
        sig = {p.key: p.value for p in proto.metadata_props}["splice.signature"]
        x = small if tuple(member.input_specs[0].shape) == (2, 4) else large
        assert f"[{x.shape[0]},4]" in sig.replace(" ", "")
        assert_matches(proto, member, (x,))


def test_cli_export_onnx(tmp_path, capsys):
    from splice.tools.cli import main

    model, ex = splice.models.mlp(d=8, hidden=16)
    program = splice.capture(model, ex)
    splice.save(program, tmp_path / "p.splice")
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(tmp_path / "p.splice"), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_matches(onnx.load(str(out)), program, ex)
    assert main(["export-onnx", str(tmp_path / "p.splice"), "-o", str(out), "--opset", "9"]) != 0
    assert "must be at least 18" in capsys.readouterr().err


def test_cli_takes_an_onnx_file_as_model(tmp_path, capsys):
    """Every subcommand that takes a MODEL takes a .onnx file: it is imported, and the
    imported program runs the exported one's function (capture -> opt -> export-onnx)."""
    from splice.tools.cli import main

    model, ex = splice.models.mlp(d=8, hidden=16)
    program = splice.capture(model, ex)
    export_onnx(program, tmp_path / "m.onnx")
    assert main(["capture", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.splice")]) == 0
    imported = splice.load(tmp_path / "p.splice")
    torch.testing.assert_close(imported(*ex), program(*ex), rtol=0, atol=1e-6)
    assert main(["opt", str(tmp_path / "m.onnx"), "-p", "lowrank{ratio=0.5}",
                 "-o", str(tmp_path / "low.splice")]) == 0  # fmt: skip
    low = splice.load(tmp_path / "low.splice")
    assert "splice.lowrank_linear" in splice.print_ir(low)
    assert (
        main(["export-onnx", str(tmp_path / "low.splice"), "-o", str(tmp_path / "low.onnx")]) == 0
    )
    assert_matches(onnx.load(str(tmp_path / "low.onnx")), low, ex)
    capsys.readouterr()
