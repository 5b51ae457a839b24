"""The `hyper` pass (MIP hypernetwork injection): its invariants on small programs and on real
architectures (GPT-2, LLaMA, a conv net), per-sample weights, chunking, training through
`to_module`, TVM lowering with `cond` as a run-time input, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import _captured_batch, first_output, ir
from torch import nn
from torch.export import Dim

import splice
from splice import models
from splice.errors import PassError, PipelineError
from splice.ir import parse_ir, print_ir, verify
from splice.passes import NumericCheck, VerifyEach, parse_pipeline
from splice.passes.hyper import (
    encode,
    generated_weights,
    hypernet_module,
    to_module,
)

# attention and MLP weights of the real architectures, and a conv net's convolutions
ARCH_TARGETS = {
    "gpt2": "transformer.h.*.attn.c_attn.*|transformer.h.*.mlp.c_fc.weight|transformer.h.1.ln_2.*"
    "|transformer.wpe.weight|lm_head.weight",  # embeddings; lm_head is tied to the token table
    "llama": "model.layers.*.self_attn.*_proj.weight|model.layers.0.mlp.*|"
    "model.layers.1.input_layernorm.weight",
    "convnet": "stem.0.*|stage*.conv*.weight|stage2.bn1.*|head.*",
}


def hyper(program, options: str, **run):
    return parse_pipeline(f"hyper{{{options}}}").run(program, **run).program


def batched(name: str):
    """A copy of an architecture's program captured at batch 2, and its example inputs."""
    p, args = _captured_batch(name, 2)
    return p.copy(), args


def _mlp(batch: int = 3):
    torch.manual_seed(0)
    model, args = models.mlp(d=16, hidden=32, batch=batch)
    return model, splice.capture(model, args), args


# ---------------------------------------------------------------------------------------
# Before/Expected in the text form

BEFORE = """weight @fc.weight : f32[3,4] param
weight @fc.bias : f32[3] param
weight @g : f32[3] param
program @p(%x : f32[2,4]) {
  %a : f32[2,3] = aten.linear(%x, @fc.weight, @fc.bias)
  %b : f32[2,3] = aten.mul.Tensor(%a, @g)
  return out=%b
}"""


def body(program) -> str:
    return "\n".join(
        line.strip() for line in print_ir(program).splitlines() if line.startswith("  ")
    )


def _before():
    g = torch.Generator().manual_seed(0)
    w = {
        k: torch.randn(*s, generator=g)
        for k, s in (("fc__weight", (3, 4)), ("fc__bias", (3,)), ("g", (3,)))
    }
    return ir(BEFORE, **w)


def test_expected_ir_shared_cond():
    q = hyper(_before(), "targets=fc.*|g,cond_dim=2,hidden=[]")
    assert (
        body(q)
        == """%mul : f32[2] = aten.mul.Tensor(%cond, 1.5707963267948966)
%cos : f32[2] = aten.cos(%mul)
%sin : f32[2] = aten.sin(%mul)
%cat : f32[4] = aten.cat([%cos, %sin], -1)
%hyper_delta : f32[18] = aten.linear(%cat, @hyper.net.0.weight)
%hyper_theta : f32[18] = aten.add.Tensor(%hyper_delta, @hyper.theta0)
%slice_1 : f32[12] = aten.slice.Tensor(%hyper_theta, 0, 0, 12)
%hyper_w : f32[3,4] = aten.view(%slice_1, [3, 4])
%slice_2 : f32[3] = aten.slice.Tensor(%hyper_theta, 0, 12, 15)
%hyper_w_1 : f32[3] = aten.view(%slice_2, [3])
%slice_3 : f32[3] = aten.slice.Tensor(%hyper_theta, 0, 15, 18)
%hyper_w_2 : f32[3] = aten.view(%slice_3, [3])
%a : f32[2,3] = aten.linear(%x, %hyper_w, %hyper_w_1)
%b : f32[2,3] = aten.mul.Tensor(%a, %hyper_w_2)
return out=%b"""
    )
    assert q.input_names == ["x", "cond"]
    assert set(q.weight_kinds) == {"hyper.net.0.weight", "hyper.theta0"}


def test_expected_ir_per_sample():
    p = _before()
    q = hyper(p, "targets=fc.*|g,cond_dim=2,hidden=[5],per_sample=true,encoding=identity")
    assert (
        body(q)
        == """%linear : f32[2,5] = aten.linear(%cond, @hyper.net.0.weight, @hyper.net.0.bias)
%leaky_relu : f32[2,5] = aten.leaky_relu(%linear, 0.01)
%hyper_delta : f32[2,18] = aten.linear(%leaky_relu, @hyper.net.2.weight)
%hyper_theta : f32[2,18] = aten.add.Tensor(%hyper_delta, @hyper.theta0)
%slice_1 : f32[2,12] = aten.slice.Tensor(%hyper_theta, 1, 0, 12)
%hyper_w : f32[2,3,4] = aten.view(%slice_1, [2, 3, 4])
%slice_2 : f32[2,3] = aten.slice.Tensor(%hyper_theta, 1, 12, 15)
%hyper_w_1 : f32[2,3] = aten.view(%slice_2, [2, 3])
%slice_3 : f32[2,3] = aten.slice.Tensor(%hyper_theta, 1, 15, 18)
%hyper_w_2 : f32[2,3] = aten.view(%slice_3, [2, 3])
%reshape : f32[2,1,4] = aten.reshape(%x, [2, 1, 4])
%transpose : f32[2,4,3] = aten.transpose.int(%hyper_w, 1, 2)
%bmm : f32[2,1,3] = aten.bmm(%reshape, %transpose)
%unsqueeze : f32[2,1,3] = aten.unsqueeze(%hyper_w_1, 1)
%add : f32[2,1,3] = aten.add.Tensor(%bmm, %unsqueeze)
%view : f32[2,3] = aten.view(%add, [2, 3])
%mul : f32[2,3] = aten.mul.Tensor(%view, %hyper_w_2)
return out=%mul"""
    )
    x = torch.randn(2, 4)
    torch.testing.assert_close(q(x, torch.rand(2, 2)), p(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# the encoding and the hypernetwork itself


def test_mip_encoding_has_constant_norm():
    g = torch.Generator().manual_seed(0)
    for d in (1, 3, 8):
        gammas = torch.rand(64, d, generator=g, dtype=torch.float64)
        gammas[0] = 0.0
        gammas[1] = 1.0
        e = encode(gammas, "mip")
        assert e.shape == (64, 2 * d)
        torch.testing.assert_close(
            e.norm(dim=-1), torch.full((64,), math.sqrt(d), dtype=torch.float64)
        )
        # the identity encoding is magnitude-proportional: its norm varies with γ
        assert float(encode(gammas, "identity").norm(dim=-1).std()) > 0.05


def test_graph_computes_theta0_plus_the_reference_hypernetwork():
    _, p, _ = _mlp()
    q = hyper(p, "targets=fc*,cond_dim=3,hidden=[8,5],init=fanout,seed=3")
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    net = hypernet_module([8, 5], 6, sum(p.get_weight(n).numel() for n in names))
    net.load_state_dict(
        {k.removeprefix("hyper.net."): v for k, v in q.weights.items() if ".net." in k}
    )
    theta0 = torch.cat([p.get_weight(n).reshape(-1) for n in names])
    cond = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        flat = theta0 + net(encode(cond, "mip"))
        got = generated_weights(q, cond)
    offset = 0
    for n in names:
        w = p.get_weight(n)
        torch.testing.assert_close(got[n], flat[offset : offset + w.numel()].view(w.shape))
        offset += w.numel()
    assert not torch.equal(got["fc1.weight"], p.get_weight("fc1.weight"))  # fanout: Δθ ≠ 0


def test_output_width_is_the_sum_of_target_sizes_and_theta0_holds_them():
    _, p, _ = _mlp()
    q = hyper(p, "targets=fc1.*|fc2.weight,cond_dim=2,hidden=[16,16]")
    names = ["fc1.weight", "fc1.bias", "fc2.weight"]
    total = sum(p.get_weight(n).numel() for n in names)
    assert q.get_weight("hyper.net.4.weight").shape == (total, 16)
    assert q.get_weight("hyper.net.0.weight").shape == (16, 4)  # 2·cond_dim for mip
    theta0 = q.get_weight("hyper.theta0")
    torch.testing.assert_close(theta0, torch.cat([p.get_weight(n).reshape(-1) for n in names]))
    info = q.attrs["hyper"]["hyper"]
    assert [t["name"] for t in info["targets"]] == names
    assert [t["offset"] for t in info["targets"]] == [0, 512, 544]
    q2 = hyper(p, "targets=fc1.*,cond_dim=2,hidden=[16],encoding=identity")
    assert q2.get_weight("hyper.net.0.weight").shape == (16, 2)
    assert q2.get_weight("hyper.net.2.weight").shape == (32 * 16 + 32, 16)


def test_targets_leave_the_parameters_and_the_others_are_untouched():
    p = batched("gpt2")[0]
    before = p.named_parameters()
    q = hyper(p, f"targets={ARCH_TARGETS['gpt2']}")
    after = q.named_parameters()
    targets = {n for n in before if n.startswith("transformer.h.") and (
        ".attn.c_attn." in n or n.endswith("mlp.c_fc.weight") or ".h.1.ln_2." in n)}  # fmt: skip
    targets |= {"transformer.wpe.weight", "lm_head.weight"}
    assert len(targets) == 2 * 2 + 2 + 2 + 2
    hyper_names = {n for n in after if n.startswith("hyper.")}
    assert hyper_names == {
        "hyper.net.0.weight", "hyper.net.0.bias", "hyper.net.2.weight", "hyper.net.2.bias",
        "hyper.net.4.weight", "hyper.theta0",
    }  # fmt: skip
    assert set(after) == (set(before) - targets) | hyper_names
    for n in set(before) - targets:
        assert after[n] is before[n]  # the same tensors, not copies
    assert set(p.weight_kinds) - set(q.weight_kinds) == targets  # unread weights stay too


@pytest.mark.parametrize("encoding", ["mip", "identity"])
def test_preserve_equals_the_original_for_random_conds(encoding):
    model, p, (x,) = _mlp()
    q = hyper(p, f"targets=fc*,cond_dim=4,encoding={encoding}")
    g = torch.Generator().manual_seed(1)
    ref = model(x)
    for _ in range(5):
        cond = torch.rand(4, generator=g) * 3 - 1  # also outside [0, 1]
        torch.testing.assert_close(q(x, cond), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "convnet"])
def test_real_architectures_preserve_and_verify(name, captured, arch_model):
    p = captured(name)
    model, args = arch_model(name)
    check = NumericCheck()
    r = parse_pipeline(f"hyper{{targets={ARCH_TARGETS[name]},cond_dim=3}}").run(
        p, sample_inputs=[args], instruments=[VerifyEach(), check]
    )
    q = r.program
    assert check.reports[0]["ok"] and check.reports[0]["max_abs"] <= 1e-6
    st = r.stats["passes"][0]["stats"]
    assert st["target_params"] == sum(t["numel"] for t in st["targets"])
    assert st["output_width"] == st["target_params"]
    with torch.no_grad():
        ref = first_output(model(*args))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        out = first_output(q(*args, torch.rand(3, generator=g)))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, first_output(p(*args)), atol=1e-6, rtol=0)
    # fanout changes the function and differs between conds
    f = hyper(p, f"targets={ARCH_TARGETS[name]},cond_dim=3,init=fanout")
    y0 = first_output(f(*args, torch.zeros(3)))
    y1 = first_output(f(*args, torch.ones(3)))
    assert (y0 - ref).abs().max() > 1e-3 and (y0 - y1).abs().max() > 1e-3


def test_text_form_round_trips_with_the_hypernetwork_record():
    _, p, (x,) = _mlp()
    q = hyper(p, "targets=fc2.*,cond_dim=2,hidden=[4],init=fanout,chunk_size=100")
    text = print_ir(q)
    back = parse_ir(text, q.weights)
    assert print_ir(back) == text
    assert back.attrs["hyper"] == q.attrs["hyper"]
    cond = torch.tensor([0.3, 0.6])
    torch.testing.assert_close(back(x, cond), q(x, cond), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# init


def test_fanout_init_follows_mip_and_preserve_zeroes_the_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))
    p = splice.capture(model, (torch.randn(2, 64),))
    q = hyper(p, "targets=*,cond_dim=2,hidden=[64,64],init=fanout")
    head = q.get_weight("hyper.net.4.weight")
    gain = math.sqrt(2.0)  # kaiming_normal_(nonlinearity="leaky_relu", a=0)
    offset = 0
    for t in q.attrs["hyper"]["hyper"]["targets"]:
        n = math.prod(t["shape"])
        block = head[offset : offset + n]
        if t["name"].endswith(".bias"):
            assert torch.count_nonzero(block) == 0
        else:  # one fan-out block per target: std = gain / sqrt(rows of the block)
            assert float(block.detach().std()) == pytest.approx(gain / math.sqrt(n), rel=0.05)
        offset += n
    hidden = q.get_weight("hyper.net.2.weight")
    assert float(hidden.detach().std()) == pytest.approx(gain / math.sqrt(64), rel=0.1)
    assert torch.count_nonzero(q.get_weight("hyper.net.0.bias")) == 0
    pre = hyper(p, "targets=*,cond_dim=2,hidden=[64,64]")
    assert torch.count_nonzero(pre.get_weight("hyper.net.4.weight")) == 0
    torch.testing.assert_close(pre.get_weight("hyper.net.2.weight"), hidden)  # same seed
    other = hyper(p, "targets=*,cond_dim=2,hidden=[64,64],seed=1")
    assert not torch.equal(other.get_weight("hyper.net.2.weight"), hidden)


def test_zero_head_gets_the_first_gradient_alone():
    _, p, (x,) = _mlp()
    m = to_module(hyper(p, "targets=fc1.*,cond_dim=2,hidden=[8,8]"))
    m(x, torch.tensor([0.2, 0.7])).pow(2).sum().backward()
    grads = {n: t.grad for n, t in m.program.named_parameters().items()}
    assert float(grads["hyper.net.4.weight"].abs().sum()) > 0
    for n in ("hyper.net.0.weight", "hyper.net.0.bias", "hyper.net.2.weight"):
        assert float(grads[n].abs().sum()) == 0.0
    for n in ("hyper.theta0", "fc2.weight", "fc2.bias"):
        assert grads[n] is None  # frozen


# ---------------------------------------------------------------------------------------
# chunking (hypnettorch)


def test_chunked_hypernetwork():
    model, p, (x,) = _mlp()
    total = 32 * 16 + 32 + 16 * 32 + 16  # 1072
    q = hyper(p, "targets=fc*,cond_dim=2,hidden=[8],chunk_size=100,chunk_emb=5,init=fanout")
    info = q.attrs["hyper"]["hyper"]
    assert info["num_chunks"] == math.ceil(total / 100) == 11
    assert q.get_weight("hyper.chunk_emb").shape == (11, 5)
    assert q.get_weight("hyper.net.0.weight").shape == (8, 4 + 5)
    assert q.get_weight("hyper.net.2.weight").shape == (100, 8)  # one chunk, shared
    # the reference: each chunk's row is MLP([E(γ), emb_j]); the last chunk's surplus is dropped
    net = hypernet_module([8], 9, 100)
    net.load_state_dict(
        {k.removeprefix("hyper.net."): v for k, v in q.weights.items() if ".net." in k}
    )
    cond = torch.tensor([0.25, 0.75])
    emb = q.get_weight("hyper.chunk_emb")
    with torch.no_grad():
        inp = torch.cat([encode(cond, "mip").expand(11, 4), emb], dim=-1)
        flat = net(inp).reshape(-1)[:total] + q.get_weight("hyper.theta0")
        got = generated_weights(q, cond)
    torch.testing.assert_close(got["fc1.weight"], flat[:512].view(32, 16))
    torch.testing.assert_close(got["fc2.bias"], flat[-16:])
    pre = hyper(p, "targets=fc*,cond_dim=2,chunk_size=100")
    torch.testing.assert_close(pre(x, cond), model(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# per-sample weights


@pytest.mark.parametrize("name", ["gpt2", "llama", "convnet"])
@pytest.mark.parametrize("chunk", ["", ",chunk_size=999"])
def test_batched_cond_equals_a_per_sample_loop(name, chunk):
    p, args = batched(name)
    opts = f"targets={ARCH_TARGETS[name]},cond_dim=3,hidden=[16],init=fanout{chunk}"
    per = hyper(p, opts + ",per_sample=true")
    shared = hyper(p, opts)  # same seed: the same hypernetwork, one cond for the batch
    assert per.input_specs[-1].shape == (2, 3) and shared.input_specs[-1].shape == (3,)
    verify(per)
    cond = torch.tensor([[0.1, 0.9, 0.4], [0.8, 0.2, 0.6]])
    with torch.no_grad():
        out = first_output(per(*args, cond))
        for i in range(2):
            ref = first_output(shared(*args, cond[i]))
            torch.testing.assert_close(out[i], ref[i], atol=1e-5, rtol=1e-5)
        # the two samples really get different weights
        other = first_output(shared(*args, cond[1]))
        assert (out[0] - other[0]).abs().max() > 1e-3
        # and the hypernetwork's batched output is the per-sample loop of its outputs
        gb = generated_weights(per, cond)
        for i in range(2):
            gi = generated_weights(shared, cond[i])
            for k in gi:
                torch.testing.assert_close(gb[k][i], gi[k], atol=1e-6, rtol=1e-6)


def test_per_sample_preserve_equals_the_original():
    p, args = batched("convnet")
    q = hyper(p, f"targets={ARCH_TARGETS['convnet']},cond_dim=2,per_sample=true")
    out = q(*args, torch.rand(2, 2))
    torch.testing.assert_close(out, p(*args), atol=1e-5, rtol=0)


class _Reduced(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return self.scale(x) * self.w.sum(0)  # a reduction over a weight


def test_per_sample_unsupported_use_names_the_node():
    p = splice.capture(_Reduced(), (torch.randn(2, 8),))
    with pytest.raises(PassError) as e:
        hyper(p, "targets=w|scale.weight,per_sample=true")
    msg = str(e.value)
    assert msg.startswith(
        "hyper{per_sample=true}: %sum_1 (aten.sum.dim_IntList) reads a target weight and has "
        "no per-sample form"
    ), msg
    assert "at: module <root>, source " in msg and "per_sample=false" in msg
    # the same weight is fine with one cond for the batch
    hyper(p, "targets=w|scale.weight")


def test_per_sample_needs_a_static_batch():
    model, args = models.mlp(d=8, hidden=16, batch=2)
    p = splice.capture(model, args, dynamic_shapes=({0: Dim("b", min=2, max=16)},))
    with pytest.raises(PassError, match=r"the batch dimension of input %x is symbolic \(b\)"):
        hyper(p, "targets=fc1.*,per_sample=true")
    q = hyper(p, "targets=fc1.*,cond_dim=2")  # a shared cond works with a dynamic batch
    x = torch.randn(5, 8)
    torch.testing.assert_close(q(x, torch.rand(2)), model(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# training


def test_to_module_trains_the_hypernetwork_and_freezes_the_rest():
    _, p, (x,) = _mlp(batch=8)
    q = hyper(p, "targets=fc*,cond_dim=1,hidden=[16,16]")
    kept = {n: t.clone() for n, t in q.weights.items()}
    m = to_module(q, freeze_original=True)
    trainable = {n for n, t in m.program.named_parameters().items() if t.requires_grad}
    assert trainable == {"hyper.net.0.weight", "hyper.net.0.bias", "hyper.net.2.weight",
                         "hyper.net.2.bias", "hyper.net.4.weight"}  # fmt: skip
    assert {id(t) for t in m.hypernet_parameters()} == {
        id(t) for n, t in m.program.named_parameters().items() if n in trainable
    }
    assert len(list(m.parameters())) == len(m.program.named_parameters())
    opt = torch.optim.Adam(m.hypernet_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    targets = {0.0: torch.randn(8, 16, generator=g), 1.0: torch.randn(8, 16, generator=g)}

    def loss(gamma: float) -> torch.Tensor:
        return nn.functional.mse_loss(m(x, torch.tensor([gamma])), targets[gamma])

    start = {k: float(loss(k).detach()) for k in targets}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy machine
    try:
        for _ in range(100):
            opt.zero_grad()
            sum(loss(k) for k in targets).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    for k in targets:
        assert float(loss(k).detach()) < 0.5 * start[k]
    # the original program and its weights are not touched by training
    for n, t in q.weights.items():
        assert torch.equal(t, kept[n])
    trained = m.to_program()
    with torch.no_grad():
        torch.testing.assert_close(trained(x, torch.tensor([1.0])), m(x, torch.tensor([1.0])))
    assert not torch.equal(trained.get_weight("hyper.net.4.weight"), kept["hyper.net.4.weight"])
    unfrozen = to_module(q, freeze_original=False)
    assert all(t.requires_grad for t in unfrozen.program.named_parameters().values())


# ---------------------------------------------------------------------------------------
# pipeline text and errors


def test_pipeline_text_round_trips():
    for text in (
        "hyper{targets=fc*,cond_dim=2,hidden=[64,64]}",
        'hyper{targets="*.mlp.*|*.attn.*",hidden=[],encoding=identity,init=fanout,chunk_size=4096}',
        "hyper{targets=h.*,per_sample=true,input=task,prefix=hn}",
    ):
        assert str(parse_pipeline(text)) == text
        assert str(parse_pipeline(str(parse_pipeline(text)))) == text
    p = parse_pipeline("hyper{targets=a,hidden=[32]}").passes[0]
    assert p.hidden == (32,) and p.semantics == "exact"
    assert parse_pipeline("hyper{targets=a,init=fanout}").passes[0].semantics == "approximate"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hyper", "hyper needs targets=GLOB (parameter names, `|`-separated)"),
        ("hyper{targets=a,cond_dim=0}", "hyper: cond_dim must be >= 1, got 0"),
        ("hyper{targets=a,hidden=[64,0]}", "hyper: hidden widths must be >= 1, got [64, 0]"),
        ("hyper{targets=a,chunk_size=0}", "hyper: chunk_size must be >= 1, got 0"),
        ("hyper{targets=a,chunk_emb=0}", "hyper: chunk_emb must be >= 1, got 0"),
        ("hyper{targets=a,input=1x}", "hyper: input must be an identifier, got '1x'"),
        (
            "hyper{targets=a,encoding=sin}",
            "hyper: option encoding: 'sin' is not one of mip, identity",
        ),
        ("hyper{targets=a,hidden=[a]}", "hyper: option hidden: 'a' is not an int"),
        ("hyper{targets=a,bogus=1}", "pass 'hyper' has no option 'bogus'"),
    ],
)
def test_bad_options(text, message):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert e.value.message.startswith(message), e.value.message


def test_errors_on_the_program():
    _, p, _ = _mlp()
    with pytest.raises(PassError) as e:
        hyper(p, "targets=nothing*")
    assert e.value.message == "hyper: no parameter of program 'MLP' matches targets='nothing*'"
    assert "fc1.weight" in e.value.hint
    with pytest.raises(PassError) as e:
        hyper(p, "targets=fc*,exclude=fc*")
    assert e.value.message == (
        "hyper: no parameter of program 'MLP' matches targets='fc*' exclude='fc*'"
    )
    q = hyper(p, "targets=fc1.*")
    with pytest.raises(PassError, match="already has a hypernetwork 'hyper'"):
        hyper(q, "targets=fc2.*")
    with pytest.raises(PassError, match="already has a value named %cond"):
        hyper(q, "targets=fc2.*,prefix=h2,input=cond")  # an explicit name that collides
    fresh = hyper(q, "targets=fc2.*,prefix=h2")  # no input=: the pass picks a fresh name
    assert fresh.input_names == ["x", "cond", "cond_1"]
    both = hyper(q, "targets=fc2.*,prefix=h2,input=task")  # a second, named hypernetwork
    assert both.input_names == ["x", "cond", "task"]
    assert set(both.attrs["hyper"]) == {"hyper", "h2"}


def test_buffers_are_not_targets():
    p = batched("convnet")[0]
    r = parse_pipeline("hyper{targets=stem.1.*}").run(p)
    st = r.stats["passes"][0]["stats"]
    assert [t["name"] for t in st["targets"]] == ["stem.1.weight", "stem.1.bias"]
    assert {s["weight"] for s in st["skipped"]} == {
        "stem.1.running_mean", "stem.1.running_var", "stem.1.num_batches_tracked"
    }  # fmt: skip
    assert all(s["reason"] == "a buffer, not a parameter" for s in st["skipped"])


# ---------------------------------------------------------------------------------------
# TVM: cond is a run-time input of the compiled artifact


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", "targets=fc*,cond_dim=2,hidden=[8,8],init=fanout,chunk_size=300"),
        ("gpt2", "targets=*.attn.c_attn.*|*.mlp.c_fc.weight,cond_dim=2,hidden=[8],init=fanout"),
        ("convnet", "targets=stem.0.*|stage2.conv1.weight|head.*,cond_dim=2,hidden=[8],"
         "init=fanout,per_sample=true"),
    ],
)  # fmt: skip
def test_tvm_conditioned_program_equals_eager(name, options, tmp_path):
    pytest.importorskip("tvm")
    kwargs = {
        "mlp": {"d": 16, "hidden": 32, "batch": 2},
        "gpt2": {"layers": 1, "hidden": 32, "seq": 4, "batch": 1},
        "convnet": {"width": 4, "image": 8, "batch": 2},
    }[name]
    model, args = models.FACTORIES[name](**kwargs)
    q = hyper(splice.capture(model, args), options)
    cm = splice.compile(q, "llvm", output=tmp_path / "hyper.artifact").load()
    assert cm.input_names[-1] == "cond"
    g = torch.Generator().manual_seed(0)
    lead = [2] if "per_sample=true" in options else []
    outs = []
    for _ in range(2):
        cond = torch.rand(*lead, 2, generator=g)
        got = first_output(cm(*args, cond))
        ref = first_output(q(*args, cond)).detach()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # cond really changes the compiled result
