"""The decode step's memory traffic on TVM: the KV cache is written in place and read in
place.

* ``sdpa_decomposition`` (tvm_attention.py) equals torch's attention on masks (float,
  bool, causal), explicit scales, grouped-query heads, batch broadcasting and a fully
  masked row, and its decomposed graph never scales or copies the key cache;
* ``rewrite_slot_writes`` (tvm_slot_write.py) turns the decode program's functional slot
  write into an in-place one: the artifact lists the cache as ``inplace_inputs``,
  ``run`` leaves its inputs untouched and equals the program, ``run_donated`` writes the
  slot into the given cache (outputs share its memory), a position past the end writes
  nothing (as the program), and an input used elsewhere is not rewritten;
* a manifest naming an unknown in-place input is refused.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

import splice
from splice.errors import ArtifactError
from splice.ir.lm import capture_lm
from splice.runtime.backends.tvm_attention import sdpa_decomposition

pytest.importorskip("tvm")

MAX_LEN = 20  # not head_dim (16): the two cache layouts differ


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "case", ["plain", "float_mask", "bool_mask", "causal", "scale", "gqa", "broadcast"]
)
def test_sdpa_decomposition_equals_torch(case: str) -> None:
    q, k, v = _rand(2, 4, 3, 8, seed=1), _rand(2, 4, 5, 8, seed=2), _rand(2, 4, 5, 6, seed=3)
    kwargs: dict = {}
    if case == "float_mask":
        kwargs["attn_mask"] = _rand(1, 1, 3, 5, seed=4)
    elif case == "bool_mask":
        kwargs["attn_mask"] = _rand(2, 1, 3, 5, seed=4) > -0.5
        kwargs["attn_mask"][..., 0] = True  # no fully masked row: torch's CPU kernel differs
    elif case == "causal":
        q = _rand(2, 4, 5, 8, seed=1)
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.7
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    elif case == "broadcast":
        k, v = k[0], v[0]  # [4, 5, 8]: broadcast over the query's batch
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    got = sdpa_decomposition(q, k, v, **kwargs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sdpa_fully_masked_row_gives_zeros() -> None:
    q, k, v = _rand(1, 2, 2, 4, seed=1), _rand(1, 2, 3, 4, seed=2), _rand(1, 2, 3, 4, seed=3)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = sdpa_decomposition(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))
    scores = (q[:, :, :1] / math.sqrt(4)) @ k.transpose(-2, -1)
    probs = scores.masked_fill(~mask[:1], float("-inf")).softmax(-1)
    torch.testing.assert_close(out[:, :, :1], probs @ v)


def _llama() -> nn.Module:
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
        initializer_range=0.3, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg).eval()


@functools.cache
def _decode() -> tuple[splice.Program, list[str]]:
    lm = capture_lm(_llama(), max_len=MAX_LEN, prompt_len=4)
    return lm.decode, lm.decode.input_names[2:]


@pytest.fixture(scope="module")
def decode_artifact(tmp_path_factory):
    program, _ = _decode()
    out = tmp_path_factory.mktemp("inplace") / "decode.artifact"
    return splice.load(splice.compile(program, "host", output=out).path)


def _inputs(position: int) -> list[torch.Tensor]:
    program, _names = _decode()
    shapes = [tuple(int(d) for d in splice.ir.meta.spec(n).shape) for n in program.input_nodes[2:]]
    cache = [_rand(*shape, seed=10 + i) for i, shape in enumerate(shapes)]
    return [torch.tensor([[7]]), torch.tensor([position]), *cache]


def test_decode_graph_reads_key_cache_without_a_scaled_copy() -> None:
    from splice.runtime.backends import tvm as tvm_backend

    program, names = _decode()
    ep = tvm_backend.decompose(tvm_backend.export_program(program)[0], program.name)
    aten = torch.ops.aten
    passthrough = {aten.where.self, aten.view.default, aten.reshape.default,
                   aten.permute.default, aten.transpose.int, aten.expand.default,
                   aten.clone.default, aten._unsafe_view.default}  # fmt: skip
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    cache_nodes = [n for n in placeholders if n.name in {f"cache_{i}" for i in range(8)}]
    cache_nodes = cache_nodes or placeholders[-len(names) :]
    seen, stack, reached = set(), list(cache_nodes), []
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            reached.append(user.target)
            if user.target in passthrough:
                stack.append(user)
    assert aten.bmm.default in reached  # the products read the cache (through views)
    assert aten.mul.Tensor not in reached  # ... and nothing scales it first


def test_cache_inputs_are_written_in_place(decode_artifact) -> None:
    _program, names = _decode()
    assert decode_artifact.inplace_inputs == names
    manifest = decode_artifact.manifest
    assert manifest["parts"][0]["inplace_inputs"] == names
    assert manifest["lowering"]["inplace_inputs"] == names


def test_run_keeps_inputs_and_equals_the_program(decode_artifact) -> None:
    program, _names = _decode()
    inputs = _inputs(5)
    before = [t.clone() for t in inputs]
    outs = decode_artifact.run(*inputs)
    for a, b in zip(inputs, before):
        assert torch.equal(a, b)
    with torch.no_grad():
        want = program(*before)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-4)
    # the new cache differs from the old one in slot 5 only (keys are stored transposed:
    # [1, heads, head_dim, max_len], values [1, heads, max_len, head_dim])
    for i, (o, old) in enumerate(zip(outs[1:], before[2:])):
        dim = 3 if i % 2 == 0 else 2
        rest = [p for p in range(MAX_LEN) if p != 5]
        assert torch.equal(o.index_select(dim, torch.tensor(rest)),
                           old.index_select(dim, torch.tensor(rest)))  # fmt: skip
        assert not torch.equal(o.select(dim, 5), old.select(dim, 5))


def test_run_donated_writes_the_slot_into_the_given_cache(decode_artifact) -> None:
    inputs = _inputs(9)
    want = decode_artifact.run(*[t.clone() for t in inputs])
    outs = decode_artifact.run_donated(*inputs)
    for o, w in zip(outs, want):
        assert torch.equal(o, w)
    for o, cache in zip(outs[1:], inputs[2:]):
        assert torch.equal(cache, o)  # the donated tensor now holds the new cache
        assert o.data_ptr() == cache.data_ptr()  # the output is that same memory


def test_position_past_the_end_writes_nothing_like_the_program(decode_artifact) -> None:
    program, _ = _decode()
    inputs = _inputs(MAX_LEN)
    before = [t.clone() for t in inputs]
    with torch.no_grad():
        want = program(*before)
    outs = decode_artifact.run_donated(*inputs)
    for o, w, old in zip(outs[1:], want[1:], before[2:]):
        assert torch.equal(w, old) and torch.equal(o, old)


class _SlotAndSum(nn.Module):
    """A slot write whose cache is also read elsewhere: must stay a copy."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor):
        slot = torch.arange(cache.shape[2]).view(1, 1, -1, 1) == pos.view(1, 1, 1, 1)
        return torch.where(slot, x, cache), cache.sum()


class _Slot(nn.Module):
    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor):
        slot = torch.arange(cache.shape[2]).view(1, 1, -1, 1) == pos.view(1, 1, 1, 1)
        return torch.where(slot, x, cache) * 1.0


@pytest.mark.parametrize(("module", "inplace"), [(_SlotAndSum, []), (_Slot, ["cache"])])
def test_only_a_cache_used_once_is_written_in_place(module, inplace, tmp_path) -> None:
    x, pos, cache = _rand(1, 2, 1, 4, seed=1), torch.tensor([3]), _rand(1, 2, 8, 4, seed=2)
    program = splice.capture(module(), (x, pos, cache))
    art = splice.load(splice.compile(program, "host", output=tmp_path / "a.artifact").path)
    assert art.inplace_inputs == ([program.input_names[2]] if inplace else [])
    want = module()(x, pos, cache)
    got = art.run(x, pos, cache)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_manifest_with_unknown_inplace_input_is_refused(decode_artifact, tmp_path) -> None:
    import shutil

    src = decode_artifact.path
    dst = tmp_path / "bad.artifact"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["parts"][0]["inplace_inputs"] = ["no_such_input"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"parts\[0\]\.inplace_inputs"):
        splice.load(dst)


def _attention_gemv(heads: int, d: int, length: int, *, keys: bool):
    """The TIR of one decode attention product over a cache: ``q Kᵀ`` (keys stored
    transposed, [h, d, L]) or ``p V`` (values [h, L, d])."""
    from tvm import te

    red, cols = (d, length) if keys else (length, d)
    a = te.placeholder((1, heads, 1, red), name="a")
    b = te.placeholder((1, heads, red, cols), name="b")
    r = te.reduce_axis((0, red), name="r")
    c = te.compute(
        (1, heads, 1, cols),
        lambda z, h, i, j: te.sum(a[z, h, i, r] * b[z, h, r, j], axis=r),
        name="matmul",
    )
    return te.create_prim_func([a, b, c])


@pytest.mark.parametrize(
    ("lanes", "registers", "keys", "length", "nb"),
    [
        (16, 32, True, 256, 256),  # AVX-512: a key-cache row of 256 positions in one run
        (16, 32, False, 256, 128),  # ... a value row of head_dim 128
        (16, 32, True, 1024, 256),  # 24 accumulators: the widest divisor is 16 vectors
        (8, 16, True, 256, 64),  # AVX2: 12 accumulators, 8 vectors divide 32
        (8, 16, True, 96, 96),
        (4, 32, True, 96, 96),  # NEON: 24 accumulators of 4 lanes
        (4, 32, False, 256, 64),  # ... 16 of a value row's 32 vectors
    ],
)
def test_decode_attention_reads_whole_cache_rows(lanes, registers, keys, length, nb) -> None:
    from splice.runtime.kernels import tvm_schedules as TS

    info = TS.analyse_matmul(_attention_gemv(4, 128, length, keys=keys))
    assert info is not None and TS.reads_b_in_place(info)
    cfg = TS.default_matmul_config(info, TS.CpuShape(lanes, registers))
    assert (cfg.nb, cfg.mi) == (nb, 1)
    assert cfg.nb // lanes <= TS.CpuShape(lanes, registers).accumulators


@pytest.mark.parametrize("keys", [True, False])
def test_wide_attention_panel_kernel_equals_torch(keys: bool, tmp_path) -> None:
    """The kernel the wide panel schedules (the host's lanes) computes the product."""

    class Product(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    red, cols = (32, 192) if keys else (48, 128)  # wider than 4L on AVX2 and AVX-512
    args = (_rand(1, 4, 1, red, seed=1), _rand(1, 4, red, cols, seed=2))
    program = splice.capture(Product(), args)
    model = splice.load(splice.compile(program, "host", output=tmp_path / "a").path)
    torch.testing.assert_close(model(*args), Product()(*args), atol=1e-5, rtol=1e-5)
