"""stitch (SN-Net): block discovery, enumeration, least squares, run-time configurations."""

from __future__ import annotations

import pytest
import torch

import splice
from splice import models
from splice.errors import PassError
from splice.ir import verify
from splice.passes import parse_pipeline
from splice.passes.stitch import (
    find_blocks,
    least_squares,
    paired_stitching,
    select_config,
    stitch_programs,
    unpaired_stitching,
)


def _gpt2(width: int, depth: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(width + depth)
    cfg = GPT2Config(
        n_embd=width, n_layer=depth, n_head=4, vocab_size=64, n_positions=16,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _bert(width: int, depth: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(width + depth)
    cfg = BertConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=4,
        intermediate_size=2 * width, vocab_size=64, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def _vit(width: int, depth: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(width + depth)
    cfg = ViTConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=4,
        intermediate_size=2 * width, image_size=16, patch_size=4, num_labels=5,
    )  # fmt: skip
    return ViTForImageClassification(cfg).eval()


def _inputs(family: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if family in ("gpt2", "bert"):
        return (torch.randint(0, 64, (1, 8), generator=g),)
    return (torch.randn(1, 3, 16, 16, generator=g),)


def _family(family: str, width: int, depth: int = 4) -> splice.Program:
    x = _inputs(family, 0)
    if family == "gpt2":
        return splice.capture(_gpt2(width, depth), x)
    if family == "bert":
        return splice.capture(_bert(width, depth), x)
    if family == "vit":
        return splice.capture(_vit(width, depth), x)
    model, _ = models.conv_family(width, depth, image=16, seed=width)
    return splice.capture(model, x)


FAMILIES = {"gpt2": (32, 64), "bert": (32, 48), "vit": (32, 48), "conv": (8, 16)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def stitched(request):
    family = request.param
    small, large = (_family(family, w) for w in FAMILIES[family])
    calib = [_inputs(family, s) for s in range(1, 17)]
    # SN-Net's cuts=all: the routes that re-run a block are built (and must run) too
    result = stitch_programs([large, small], calib, cuts="all")  # any order: sorted by FLOPs
    return family, small, large, calib, result


def test_configuration_counts_follow_sn_net():
    pairs, layer_of = paired_stitching(12, window=2, stride=1, cuts="all")
    assert len(pairs) == 34 and len(set(layer_of)) == 11
    assert pairs[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    pairs, layer_of = paired_stitching(4, cuts="all")
    assert len(pairs) == 10 and len(set(layer_of)) == 3
    # every pair is new, and a window's new pairs share its layer
    assert len(set(pairs)) == len(pairs)
    pairs, _ = paired_stitching(12, window=3, stride=1, cuts="all")
    assert len(pairs) == 9 + 9 * 5  # first window 9, then 5 new pairs per shift
    assert unpaired_stitching(2, 4) == ([(0, 2)], [0])


def test_forward_cuts_drop_the_pairs_that_rerun_blocks():
    """SN-Netv2 keeps only m > j: no block runs twice."""
    pairs, layer_of = paired_stitching(12, window=2, stride=1, cuts="forward")
    assert pairs == [(j, j + 1) for j in range(11)] and layer_of == list(range(11))
    assert paired_stitching(12) == (pairs, layer_of)  # the default
    assert paired_stitching(4, window=1, cuts="forward") == ([], [])
    pairs, layer_of = paired_stitching(6, window=3, stride=1, cuts="forward")
    # a window of 3 also skips a block: (j, j+2) runs blocks 0..j and j+2..
    assert pairs[:3] == [(0, 1), (0, 2), (1, 2)] and layer_of[:3] == [0, 0, 0]
    assert all(m > j for j, m in pairs) and len(pairs) == 5 + 4
    with pytest.raises(PassError) as e:
        paired_stitching(4, cuts="skip")
    assert e.value.message == "unknown cuts='skip'" and e.value.hint == "cuts: all, forward"


def test_least_squares_between_identical_features_is_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g)
    w, b = least_squares(x, x)
    assert (w - torch.eye(24, dtype=w.dtype)).abs().max() < 1e-6
    assert b.abs().max() < 1e-6
    # normal equations hold, and the fit beats the identity and a random map
    y = torch.randn(400, 24, generator=g) + x @ torch.randn(24, 24, generator=g)
    w, b = least_squares(x, y)
    xt = torch.cat([x.double(), torch.ones(400, 1, dtype=torch.float64)], 1)
    a = torch.cat([w.T, b[None]], 0)
    assert (xt.T @ (xt @ a - y.double())).abs().max() < 1e-8
    res = (x.double() @ w.T + b - y).norm()
    assert res <= (x - y).norm() and res <= (x @ torch.randn(24, 24, generator=g) - y).norm()


def test_blocks_are_found_from_module_paths():
    gpt2 = find_blocks(_family("gpt2", 32))
    assert (gpt2.prefix, gpt2.depth, gpt2.channel_dim) == ("transformer.h", 4, -1)
    bert = find_blocks(_family("bert", 32))
    assert (bert.prefix, bert.depth) == ("bert.encoder.layer", 4)
    assert bert.side  # the extended attention mask is read by every layer
    conv = find_blocks(_family("conv", 8))
    assert (conv.prefix, conv.depth, conv.channel_dim) == ("blocks", 4, 1)
    assert len(conv.boundary) == 5


def test_blocks_with_factored_linears_still_repeat():
    """A lowrank anchor that factored different Linears in different blocks (as
    alloc=sensitivity does) still has repeated blocks: a factored Linear is the Linear."""
    from splice.passes import PassContext

    dense = _family("bert", 32, depth=2)
    small = parse_pipeline("lowrank{ratio=0.5,targets=*.layer.0.*}").run(dense).program
    blocks = find_blocks(small)
    assert (blocks.prefix, blocks.depth) == ("bert.encoder.layer", 2)
    calib = [_inputs("bert", s) for s in range(1, 9)]
    ctx = PassContext(sample_inputs=calib, programs={"small": small})
    out = parse_pipeline("stitch{anchors=small,calib_samples=8}").run(dense, ctx=ctx).program
    with torch.no_grad():
        assert torch.equal(out(*calib[0], torch.tensor(0)), small(*calib[0]))
        assert torch.equal(out(*calib[0], torch.tensor(1)), dense(*calib[0]))


def test_anchor_configurations_equal_their_anchors_exactly(stitched):
    family, small, large, calib, r = stitched
    p = r.program
    verify(p)
    assert r.stats["configs"] == 2 + 10 and r.stats["stitching_layers"] == 3
    for x in calib[:3]:
        with torch.no_grad():
            assert torch.equal(p(*x, torch.tensor(0)), small(*x)), family
            assert torch.equal(p(*x, torch.tensor(1)), large(*x)), family


def test_stitch_configurations_run_and_specialise(stitched):
    family, _small, large, calib, r = stitched
    p = r.program
    x = calib[0]
    with torch.no_grad():
        ref = large(*x)
        for c in r.configs[2:]:
            y = p(*x, torch.tensor(c.index))
            assert y.shape == ref.shape and torch.isfinite(y).all(), (family, c)
        for i in (2, 7, len(r.configs) - 1):
            static = select_config(p, i)
            assert "config" not in static.input_names
            assert torch.equal(static(*x), p(*x, torch.tensor(i)))
        # an anchor's configuration deploys with that anchor's weights only
        alone = select_config(p, 1)
        assert alone.weight_kinds and all(w.startswith("a1.") for w in alone.weight_kinds)
        assert len(alone.weight_kinds) <= len(large.weight_kinds)
        assert torch.isnan(p(*x, torch.tensor(len(r.configs)))).all()


def test_switching_configuration_never_changes_weights(stitched):
    _, _, _, calib, r = stitched
    p = r.program
    before = {w: (t.data_ptr(), t.clone()) for w, t in p.weights.items()}
    with torch.no_grad():
        for c in r.configs:
            p(*calib[0], torch.tensor(c.index))
    for w, t in p.weights.items():
        assert t.data_ptr() == before[w][0] and torch.equal(t, before[w][1]), w


def test_a_window_layer_is_the_mean_of_its_pairs_least_squares_solutions():
    """Self-stitch: the consistent cut (0, 1) alone would give W = I; the window's layer is
    the mean over its pairs (0,0), (0,1), (1,0), (1,1) of [h_F(j+1), 1]·A ≈ h_E(m)."""
    a = _family("conv", 8)
    calib = [_inputs("conv", s) for s in range(1, 9)]
    r = stitch_programs([a, a], calib, cuts="all")
    blocks = find_blocks(a)
    probe = a.copy()
    for i, name in enumerate(blocks.boundary):
        probe.add_output(f"h{i}", probe.node(name))
    with torch.no_grad():
        feats = [probe.run(*x)[1:] for x in calib]
    h = [torch.cat([f[i] for f in feats]).movedim(1, -1).reshape(-1, 8) for i in range(5)]
    sols = [least_squares(h[j + 1], h[m]) for j, m in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert (sols[1][0] - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-6
    w = torch.stack([s[0] for s in sols]).mean(0).float()
    b = torch.stack([s[1] for s in sols]).mean(0).float()
    assert torch.allclose(r.program.get_weight("stitch.0_1.0.weight"), w, atol=1e-5)
    assert torch.allclose(r.program.get_weight("stitch.0_1.0.bias"), b, atol=1e-5)


def test_unequal_depths_stitch_at_the_same_relative_depth():
    shallow, deep = _family("gpt2", 32, depth=2), _family("gpt2", 64, depth=4)
    calib = [_inputs("gpt2", s) for s in range(1, 9)]
    r = stitch_programs([shallow, deep], calib)
    cuts = [c.cut for c in r.configs if c.cut is not None]
    assert cuts == [(0, 2)]


def test_specialize_config_in_a_pipeline():
    calib = [_inputs("conv", s) for s in range(1, 5)]
    r = stitch_programs([_family("conv", 8), _family("conv", 16)], calib)
    out = parse_pipeline("specialize{config=4}").run(r.program).program
    assert out.input_names == r.program.input_names[:-1]
    with torch.no_grad():
        assert torch.equal(out(*calib[0]), r.program(*calib[0], torch.tensor(4)))


def test_stitched_program_compiles_with_shared_parts(tmp_path):
    small, large = _family("conv", 8), _family("conv", 16)
    calib = [_inputs("conv", s) for s in range(1, 9)]
    r = stitch_programs([small, large], calib)
    art = splice.compile(r.program, "host", output=tmp_path / "stitch.artifact")
    parts = art.manifest["parts"]
    # pieces, not routes: 2 x (stem, 4 blocks, head) + 3 stitching layers + a side prologue
    assert len(parts) <= 2 * 6 + 3 + 2 < len(r.configs) * 4
    host = (art.path / "host.json").read_text()
    assert host.count('"op": "eq"') == len(r.configs)  # the host compares config itself
    cm = art.load()
    for c in r.configs:
        for x in calib[:2]:
            with torch.no_grad():
                want = r.program(*x, torch.tensor(c.index))
            got = cm(*x, torch.tensor(c.index))
            assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), c


def test_bad_inputs_are_errors():
    conv = _family("conv", 8)
    calib = [_inputs("conv", 1)]
    with pytest.raises(PassError, match="two or more anchors"):
        stitch_programs([conv], calib)
    with pytest.raises(PassError, match="unknown stitching layer kind 'mlp'"):
        stitch_programs([conv, conv], calib, kind="mlp")
    with pytest.raises(PassError, match="takes"):
        stitch_programs([conv, _family("gpt2", 32)], calib)
    mlp = splice.capture(*models.mlp(d=16, hidden=32))
    with pytest.raises(PassError, match="no repeated blocks"):
        find_blocks(mlp)
    with pytest.raises(PassError, match="configuration 99 does not exist"):
        select_config(stitch_programs([conv, conv], calib * 12).program, 99)


def test_stitch_as_a_pipeline_pass_with_context_anchors():
    from splice.passes import PassContext

    small, large = _family("conv", 8), _family("conv", 16)
    calib = [_inputs("conv", s) for s in range(1, 9)]
    ctx = PassContext(sample_inputs=calib, programs={"large": large})
    result = parse_pipeline("stitch{anchors=large,calib_samples=8}").run(small, ctx=ctx)
    out = result.program
    assert out.input_names == [*small.input_names, "config"]
    with torch.no_grad():
        assert torch.equal(out(*calib[0], torch.tensor(1)), large(*calib[0]))
    with pytest.raises(PassError, match="'nowhere' is neither a program in the pass context"):
        parse_pipeline("stitch{anchors=nowhere}").run(small, ctx=ctx)


def test_stitch_table_cli(tmp_path, capsys):
    from splice.tools.cli import main

    plot = tmp_path / "pareto.png"
    rc = main(
        [
            "stitch-table",
            "splice.models:conv_family?width=8&depth=2",
            "splice.models:conv_family?width=16&depth=2",
            "--no-latency",
            "--calib",
            "4",
            "--eval",
            "2",
            "--plot",
            str(plot),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "route" not in line]
    assert len(rows) == 2 + 1  # two anchors, depth 2 with window 2: the forward cut (0, 1)
    assert "conv_family width=8 depth=2[0..0] → conv_family width=16 depth=2[1..]" in out
    # the largest anchor is the fidelity reference and on the Pareto front
    largest = next(r for r in rows if r.split("|")[2].strip() == "conv_family width=16 depth=2")
    assert "1.0000" in largest and "★" in largest
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # SN-Net's enumeration: every pair of the window, (0,0), (0,1), (1,0), (1,1)
    family = [
        "splice.models:conv_family?width=8&depth=2",
        "splice.models:conv_family?width=16&depth=2",
    ]
    assert main(["stitch-table", *family, "--no-latency", "--calib", "4", "--eval", "2",
                 "--cuts", "all", "--share", "pair"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        len([line for line in out.splitlines() if line.startswith("| ") and "route" not in line])
        == 6
    )
