"""Sparse-MoE blocks captured as ``splice::moe_ffn`` (issue #16 item 2).

Mixtral and Qwen2-MoE (and Qwen3-MoE, OLMoE) as ``transformers`` builds them, with the
default experts implementation (which exports as ``grouped_mm``) and with ``"eager"`` (a
loop over ``nonzero`` that ``torch.export`` refuses): capture gives one ``moe_ffn`` per
layer on the blocks' own weights, the text form round-trips, the TVM build equals eager on
two input sets, and a decode step (one token) runs the sparse kernel — shown by the
lowering report and by poisoning the experts a token does not select (NaN): the compiled
step stays equal to eager, which a dense computation masked afterwards could not
(NaN · 0 = NaN).
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton check runs on the CPU

import pytest
import torch
from conftest import first_output
from torch import nn

import splice
from splice import models
from splice.errors import CaptureError
from splice.ir import meta as M
from splice.ir import moe_capture
from splice.ir.ops import _moe_ffn_ref, moe_ffn, moe_gates
from splice.passes import parse_pipeline

ATOL = 1e-5
FACTORIES = {"mixtral": models.mixtral, "qwen2_moe": models.qwen2_moe}
IMPLS = [None, "eager", "batched_mm"]  # None: transformers' default (grouped_mm)


def build(name: str, impl: str | None = None, **kw):
    model, (ids,) = FACTORIES[name](**kw)
    if impl is not None:
        model.config._experts_implementation = impl
    return model, ids


def ids_like(model: nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, tuple(ids.shape), generator=g)


def moe_nodes(program) -> list:
    return [n for n in program.graph.nodes if n.target is moe_ffn.overload]


def blocks(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if type(m).__name__.endswith("SparseMoeBlock")]


def eager(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(ids))


def options(node) -> dict:
    """A moe_ffn node's arguments by schema name (defaults filled in)."""
    schema = moe_ffn.overload._schema.arguments
    out = {a.name: a.default_value for a in schema}
    out.update({a.name: v for a, v in zip(schema, node.args)})
    out.update(node.kwargs)
    return out


def weight_source(node) -> str:
    """The weight a moe_ffn operand reads, through the view ops (slice, transpose)."""
    while node.op != "get_attr":
        node = node.args[0]
    return str(node.target)


# ---------------------------------------------------------------------------------------
# capture


@pytest.mark.parametrize("impl", IMPLS, ids=["grouped_mm", "eager", "batched_mm"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_blocks_capture_as_moe_ffn(name, impl):
    model, ids = build(name, impl)
    if impl == "eager":  # transformers' loop over nonzero(): torch.export alone refuses it
        with pytest.raises(Exception, match="data-dependent|GuardOnDataDependent"):
            torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
    program = splice.capture(model, (ids,))
    layers = model.config.num_hidden_layers
    nodes = moe_nodes(program)
    assert len(nodes) == layers
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "grouped_mm" in t or "nonzero" in t]
    # what was recognised, recorded in the program
    paths = blocks(model)
    assert sorted(program.attrs[moe_capture.ATTR]) == sorted(paths)
    for site in program.attrs[moe_capture.ATTR].values():
        assert site["rule"] == name and site["experts_implementation"] == (impl or "grouped_mm")
        assert site["shared_expert"] == (name == "qwen2_moe")
        assert site["renorm"] == (name == "mixtral")  # Qwen2-MoE: norm_topk_prob=False
    assert moe_capture.ATTR_UNRECOGNISED not in program.attrs
    # each node: located at its block, reading the block's own named weights
    for node, path in zip(nodes, paths):
        assert M.loc(node).module_path == path
        x, router_w, router_b, w_in, b_in, w_gate, b_gate, w_out, b_out, act = node.args[:10]
        assert weight_source(router_w) == f"{path}.gate.weight"
        assert weight_source(w_in) == weight_source(w_gate) == f"{path}.experts.gate_up_proj"
        assert weight_source(w_out) == f"{path}.experts.down_proj"
        assert router_b is b_in is b_gate is b_out is None and act == "silu"
        opts = options(node)
        assert (opts["router_norm"], opts["weighted"], opts["top_k"]) == (False, True, 2)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for w in program.weight_kinds:  # no copies: every weight is one of the module's tensors
        assert torch.equal(program.get_weight(w), state[w])
    # the forwards are the model's again
    assert all("forward" not in m.__dict__ for m in model.modules())
    # equal to eager, on two input sets
    for seed in (0, 1):
        x = ids_like(model, ids, seed)
        torch.testing.assert_close(first_output(program(x)), eager(model, x), atol=ATOL, rtol=0)
    # text round trip (the recognised blocks are program attributes)
    text = splice.print_ir(program, locations=True)
    assert 'attr moe = {"model.layers.0.mlp": {' in text
    parsed = splice.parse_ir(text, program.weights)
    assert splice.print_ir(parsed, locations=True) == text
    assert parsed.attrs == program.attrs
    torch.testing.assert_close(first_output(parsed(ids)), first_output(program(ids)))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_both_implementations_give_one_program(name):
    """The rule replaces the block's forward: the experts implementation no longer matters."""
    texts = []
    for impl in IMPLS:
        model, ids = build(name, impl)
        program = splice.capture(model, (ids,))
        texts.append([ln for ln in splice.print_ir(program).splitlines() if "attr moe" not in ln])
    assert texts[0] == texts[1] == texts[2]


def test_qwen2_moe_renormalised_routing():
    model, ids = build("qwen2_moe", norm_topk_prob=True)
    program = splice.capture(model, (ids,))
    assert all(s["renorm"] for s in program.attrs[moe_capture.ATTR].values())
    assert [options(n)["scale"] for n in moe_nodes(program)] == ["renorm", "renorm"]
    for seed in (0, 1):
        x = ids_like(model, ids, seed)
        torch.testing.assert_close(first_output(program(x)), eager(model, x), atol=ATOL, rtol=0)


def other_family(name: str, impl: str | None = None):
    """Qwen3-MoE and OLMoE at small configs: Qwen2-MoE's routing, no shared expert."""
    import transformers

    torch.manual_seed(0)
    cfg_cls, model_cls, kw = {
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
            norm_topk_prob=True)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(norm_topk_prob=False)),
    }[name]  # fmt: skip
    cfg = getattr(transformers, cfg_cls)(
        num_hidden_layers=2, hidden_size=64, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw,
    )  # fmt: skip
    if impl is not None:
        cfg._experts_implementation = impl
    model = getattr(transformers, model_cls)(cfg).eval()
    return model, torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("impl", IMPLS[:2], ids=["grouped_mm", "eager"])
@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe"])
def test_softmax_top_k_families_capture_as_moe_ffn(name, impl):
    model, ids = other_family(name, impl)
    program = splice.capture(model, (ids,))
    assert len(moe_nodes(program)) == 2
    sites = program.attrs[moe_capture.ATTR]
    assert sorted(sites) == blocks(model)
    assert all(s["rule"] == name and s["renorm"] == (name == "qwen3_moe") for s in sites.values())
    for seed in (0, 1):
        x = ids_like(model, ids, seed)
        torch.testing.assert_close(first_output(program(x)), eager(model, x), atol=ATOL, rtol=0)


def test_qwen3_moe_decode_step_runs_the_sparse_kernel(tmp_path):
    model, ids = other_family("qwen3_moe")
    ids = ids[:, :1]
    run, report = compiled(tmp_path, model, ids, "qwen3-decode")
    assert sparse_kernels(report)
    for seed in (0, 1):
        x = ids_like(model, ids, seed)
        torch.testing.assert_close(first_output(run(x)), eager(model, x), atol=ATOL, rtol=0)


def test_disabled_keeps_transformers_export():
    model, ids = build("mixtral")
    with moe_capture.disabled():
        program = splice.capture(model, (ids,))
    assert not moe_nodes(program) and moe_capture.ATTR not in program.attrs
    assert any("grouped_mm" in str(n.target) for n in program.graph.nodes)


def test_weights_stay_targets_of_hyper():
    """The experts' weights are the program's named weights (no copies): hyper can generate
    them, and at init the program still equals the model."""
    model, ids = build("mixtral")
    program = splice.capture(model, (ids,))
    r = parse_pipeline(
        "hyper{targets=model.layers.*.mlp.experts.*|model.layers.*.mlp.gate.weight,cond_dim=3}"
    ).run(program, sample_inputs=[(ids,)])
    st = r.stats["passes"][0]["stats"]
    assert len(st["targets"]) == 3 * model.config.num_hidden_layers
    out = first_output(r.program(ids, torch.rand(3, generator=torch.Generator().manual_seed(0))))
    torch.testing.assert_close(out, eager(model, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------
# compile


def compiled(tmp_path, model, ids, tag):
    program = splice.capture(model, (ids,))
    art = splice.compile(program, "host", output=tmp_path / f"{tag}.artifact")
    return art.load(), art.manifest["lowering"]


def sparse_kernels(report) -> list[dict]:
    return [v for v in report["matmuls"].values() if v.get("kernel") == "moe_ffn"]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_prefill_compiles_and_equals_eager(tmp_path, name):
    model, ids = build(name)  # 8 tokens: rows · k > E, the dense path
    run, report = compiled(tmp_path, model, ids, "prefill")
    assert not sparse_kernels(report)
    for seed in (0, 1):
        x = ids_like(model, ids, seed)
        torch.testing.assert_close(first_output(run(x)), eager(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_decode_step_runs_the_sparse_kernel(tmp_path, name):
    model, ids = build(name, seq=1)
    run, report = compiled(tmp_path, model, ids, "decode")
    assert report["schedule_rules"].get("moe_ffn", 0) >= 1, report["schedule_rules"]
    cfg = model.config
    E = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    kernels = sparse_kernels(report)
    assert kernels and all(
        (k["rows"], k["experts"], k["slots"], k["top_k"]) == (1, E, cfg.num_experts_per_tok,
                                                               cfg.num_experts_per_tok)
        for k in kernels
    )  # fmt: skip
    # no dense expert product: no matmul reducing over all the experts' neurons
    s = kernels[0]["s"]
    assert not [v for v in report["matmuls"].values() if v.get("k") == E * s]
    for seed in (0, 1):
        x = ids_like(model, ids, seed)
        torch.testing.assert_close(first_output(run(x)), eager(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_decode_step_reads_only_the_selected_experts(tmp_path, name):
    """Every layer's unselected experts hold NaN: eager (transformers computes only the
    selected experts) and the compiled sparse kernels stay finite and equal."""
    model, ids = build(name, seq=1)
    chosen: dict[str, torch.Tensor] = {}
    hooks = [
        m.gate.register_forward_hook(lambda mod, a, out, p=p: chosen.__setitem__(p, out[2]))
        for p, m in model.named_modules()
        if p in blocks(model)
    ]
    clean = eager(model, ids)
    for h in hooks:
        h.remove()
    assert len(chosen) == model.config.num_hidden_layers
    with torch.no_grad():
        for path, idx in chosen.items():
            experts = model.get_submodule(path).experts
            off = [e for e in range(experts.num_experts) if e not in idx.flatten().tolist()]
            assert off
            experts.gate_up_proj[off] = float("nan")
            experts.down_proj[off] = float("nan")
    torch.testing.assert_close(eager(model, ids), clean, atol=ATOL, rtol=0)
    run, _ = compiled(tmp_path, model, ids, "poisoned")
    out = first_output(run(ids))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------
# the op options the rules use: reference, TVM (sparse and dense) and Triton agree


class Routed(nn.Module):
    """moe_ffn with a plain linear router and renormalised top-k gates (Mixtral's)."""

    def __init__(
        self, E=4, s=24, d=40, *, top_k=2, top_p=0.0, scale="renorm", bias=False,
        router_norm=False, seed=0,
    ):  # fmt: skip
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        P = lambda *sh, sc=1.0: nn.Parameter(torch.randn(*sh, generator=g) * sc)  # noqa: E731
        self.rw, self.rb = P(E, d, sc=0.3), P(E) if bias else None
        self.wi, self.wg = P(E, s, d, sc=d**-0.5), P(E, s, d, sc=d**-0.5)
        self.wo = P(E, s, d, sc=s**-0.5)
        self.opts = dict(
            top_k=top_k, top_p=top_p, scale=scale, weighted=True, router_norm=router_norm
        )

    def forward(self, x):
        return torch.ops.splice.moe_ffn(
            x, self.rw, self.rb, self.wi, None, self.wg, None, self.wo, None, "silu", **self.opts
        )


def test_renorm_and_plain_router_reference():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    m = Routed()
    gates = moe_gates(x, m.rw.detach(), None, 2, 0.0, "renorm", True, False)
    logits = x @ m.rw.detach().T
    top, idx = torch.topk(torch.softmax(logits, -1), 2)
    want = torch.zeros_like(gates).scatter(1, idx, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(gates, want)
    # router_norm=True (the default) is the experts pass's router on x / ‖x‖
    xn = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        moe_gates(x, m.rw.detach(), None, 2, 0.0, "none", True),
        moe_gates(xn, m.rw.detach(), None, 2, 0.0, "none", True, False),
    )


@pytest.mark.parametrize(
    "kw,shape,sparse",
    [
        pytest.param(dict(), (1, 40), True, id="decode-renorm"),
        pytest.param(dict(scale="none", bias=True), (1, 1, 40), True, id="decode-bias-raw"),
        pytest.param(dict(), (3, 40), False, id="dense-renorm"),
        pytest.param(
            dict(top_k=0, top_p=0.6, router_norm=True), (1, 40), True, id="decode-top-p-renorm"
        ),
        pytest.param(
            dict(top_k=0, top_p=0.6, router_norm=True), (2, 40), False, id="dense-top-p-renorm"
        ),
    ],
)
def test_new_options_lower_to_tvm(tmp_path, kw, shape, sparse):
    model = Routed(**kw)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    run, report = compiled(tmp_path, model, x, "routed")
    assert bool(sparse_kernels(report)) == sparse
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), atol=1e-5, rtol=1e-5)


def test_new_options_in_the_triton_kernel():
    pytest.importorskip("triton")
    from splice.runtime.kernels import triton_moe_ffn as kmod

    if not kmod.is_interpreted():
        kmod = importlib.reload(kmod)
    if not kmod.is_interpreted():
        pytest.fail(
            "the Triton kernels must run in the interpreter on the CPU (TRITON_INTERPRET=1)"
        )
    m = Routed(bias=True)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    w = [m.rw, m.rb, m.wi, None, m.wg, None, m.wo, None]
    w = [t.detach() if t is not None else None for t in w]
    for scale in ("renorm", "none"):
        y = kmod.moe_ffn_triton(x, *w, "silu", 2, 0.0, scale, True, False, block_t=4)
        torch.testing.assert_close(y, _moe_ffn_ref(x, *w, "silu", 2, 0.0, scale, True, False))
    # a captured Mixtral decode step with its moe_ffn nodes swapped for the Triton op
    from splice.runtime.backends import triton as tb

    model, ids = build("mixtral", seq=1)
    program = splice.capture(model, (ids,))
    fast = tb.use_triton_kernels(program)
    assert not moe_nodes(fast)
    torch.testing.assert_close(first_output(fast(ids)), eager(model, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------
# errors


def test_a_recognised_block_with_another_structure_is_a_capture_error():
    model, ids = build("mixtral")
    model.model.layers[1].mlp.experts.act_fn = nn.Hardswish()
    with pytest.raises(CaptureError) as info:
        splice.capture(model, (ids,))
    msg = str(info.value)
    assert "sparse-MoE block not recognised" in msg and "Hardswish" in msg
    assert "module model.layers.1.mlp (MixtralSparseMoeBlock)" in msg
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_router_logits_as_outputs_are_a_capture_error():
    model, ids = build("qwen2_moe")
    model.config.output_router_logits = True
    with pytest.raises(CaptureError, match="output_router_logits") as info:
        splice.capture(model, (ids,))
    assert "module model.layers.0.mlp (Qwen2MoeSparseMoeBlock)" in str(info.value)


class OtherMoE(nn.Module):
    """A routed block of a class no rule knows, around transformers' Mixtral experts."""

    def __init__(self, impl: str):
        super().__init__()
        import transformers

        cfg = transformers.MixtralConfig(
            hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=1
        )
        cfg._experts_implementation = impl
        self.router = nn.Linear(16, 4, bias=False)
        self.experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
        nn.init.normal_(self.experts.gate_up_proj)
        nn.init.normal_(self.experts.down_proj)

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.router(x), -1), 1)
        return self.experts(x, idx, w)


class Net(nn.Module):
    def __init__(self, impl: str):
        super().__init__()
        self.block = OtherMoE(impl)

    def forward(self, x):
        return self.block(x)


def test_an_unknown_block_with_eager_experts_is_listed_and_captured_densely():
    net = Net("eager")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    program = splice.capture(net, (x,))
    assert program.attrs[moe_capture.ATTR_UNRECOGNISED] == {"block": "OtherMoE"}
    assert not moe_nodes(program)
    assert not any("nonzero" in str(n.target) for n in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(first_output(program(x)), net(x), atol=ATOL, rtol=0)


def test_an_unknown_block_otherwise_is_kept_and_listed():
    net = Net("batched_mm")
    x = torch.randn(3, 16)
    program = splice.capture(net, (x,))
    assert program.attrs[moe_capture.ATTR_UNRECOGNISED] == {"block": "OtherMoE"}
    assert not moe_nodes(program)
    with torch.no_grad():
        torch.testing.assert_close(first_output(program(x)), net(x), atol=ATOL, rtol=0)
