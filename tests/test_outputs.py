"""Output structure: constants beside tensors (#16 item 5) and structures that depend on the
data-dependent path (#17 item 3): capture, text round trip, unify_outputs, runtime."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import splice
from splice.errors import ArtifactError, CaptureError
from splice.ir import outputs as O
from splice.ir.parser import parse_ir
from splice.ir.printer import print_ir

NT = collections.namedtuple("NT", "a b")


class Mixed(nn.Module):
    """Returns tensors with constants of every kind around them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor):
        y = self.fc(x)
        return {
            "y": y,
            "modality": "text",
            "n": 3,
            "none": None,
            "flag": True,
            "rest": [y.relu(), 1.5, NT(x * 2, "q")],
        }


def _same(a, b) -> bool:
    """Structural equality with tensors compared by value (to 1e-5)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.allclose(a, b, atol=1e-5)
        )
    if type(a) is not type(b) and not (isinstance(a, tuple) and isinstance(b, tuple)):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------
# constants of the output structure


def test_constants_are_kept_as_the_output_structure():
    m = Mixed().eval()
    x = torch.randn(2, 4)
    p = splice.capture(m, (x,))
    assert p.output_names == ["y", "rest_0", "rest_2_a"]
    assert len(p.run(x)) == 3
    tree = p.output_tree
    assert O.check_tree(tree) == ["y", "rest_0", "rest_2_a"]
    got = p(x)
    want = m(x)
    assert _same(got, want)
    assert type(got["rest"][2]).__name__ == "NT" and got["rest"][2]._fields == ("a", "b")
    assert _same(p.unflatten(p.run(x)), want)


def test_tensor_only_outputs_are_unchanged():
    class Two(nn.Module):
        def forward(self, x):
            return {"a": x + 1, "b": x * 2}

    p = splice.capture(Two(), (torch.randn(3),))
    assert p.output_names == ["a", "b"] and p.output_tree is None
    assert "output_tree" not in p.attrs
    out = p(torch.ones(3))
    assert isinstance(out, tuple) and len(out) == 2  # as before: a tuple in output order
    assert p.unflatten(list(out)) == out


def test_output_structure_round_trips_text_and_save(tmp_path: Path):
    m = Mixed().eval()
    x = torch.randn(2, 4)
    p = splice.capture(m, (x,))
    text = print_ir(p)
    assert "attr output_tree = " in text
    q = parse_ir(text, p.weights)
    assert print_ir(q) == text and q.output_tree == p.output_tree
    splice.save(p, tmp_path / "m.splice")
    r = splice.load(tmp_path / "m.splice")
    assert _same(r(x), m(x))


def test_rename_output_renames_the_tree():
    p = splice.capture(Mixed().eval(), (torch.randn(2, 4),))
    p.rename_output("y", "logits")
    assert O.check_tree(p.output_tree)[0] == "logits"
    assert torch.equal(p(torch.ones(2, 4))["y"], p.run(torch.ones(2, 4))[0])


@pytest.mark.parametrize(
    "value", [torch.device("cpu"), b"bytes", object()], ids=["device", "bytes", "object"]
)
def test_an_output_constant_that_is_not_json_is_a_capture_error(value):
    class Bad(nn.Module):
        def forward(self, x):
            return {"y": x + 1, "extra": value}

    with pytest.raises(CaptureError) as e:
        splice.capture(Bad(), (torch.randn(2),))
    assert "extra" in str(e.value)  # which output
    assert e.value.hint  # what to do


def test_a_bad_constant_through_the_tree_builder_names_the_output():
    spec = pytree.tree_flatten({"y": 0, "dt": 1})[1]
    with pytest.raises(CaptureError, match=r"output \['dt'\].*dtype") as e:
        O.tree_from_spec(
            spec,
            ["node", torch.float32],
            lambda i, v, path: {"output": "y"} if i == 0 else O.constant_leaf(v, path, "M"),
        )
    assert "return it as a tensor" in e.value.hint


def test_a_wrong_tree_is_an_error_not_a_wrong_result():
    p = splice.capture(Mixed().eval(), (torch.randn(2, 4),))
    p.attrs["output_tree"] = {"dict": [["y", {"output": "nope"}]]}
    with pytest.raises(O.OutputStructureError, match="nope"):
        p(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------
# sentence-transformers: {'modality': 'text', ...}


@pytest.fixture(scope="module")
def minilm_st():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st_mod = pytest.importorskip("sentence_transformers")
    from splice.models import minilm_path

    st = st_mod.SentenceTransformer(str(minilm_path()), device="cpu").eval()
    return st


def test_sentence_transformer_captures_round_trips_compiles_and_equals_eager(
    minilm_st, tmp_path: Path
):
    st = minilm_st
    feats = dict(st.preprocess(["hello world", "a test"]))
    keys = [k for k, v in feats.items() if isinstance(v, torch.Tensor)]
    p = splice.capture(st, (feats,))
    assert p.output_tree is not None
    assert ["modality", {"const": "text"}] in p.output_tree["dict"]
    with torch.no_grad():
        want = st(dict(feats))
    inputs = [feats[k] for k in keys]
    assert _same(p(*inputs), want)
    splice.save(p, tmp_path / "st.splice")
    q = splice.load(tmp_path / "st.splice")
    assert _same(q(*inputs), want)
    art = splice.compile(q, "host", output=tmp_path / "st.artifact")
    assert art.manifest["output_tree"] == p.output_tree
    got = splice.load(art.path)(*inputs)
    assert list(got) == list(want) and got["modality"] == "text"
    assert _same(got, want)
    # a second input set
    feats2 = dict(st.preprocess(["another sentence", "and one more"]))
    feats2 = {k: v[:, : feats["input_ids"].shape[1]] if isinstance(v, torch.Tensor) else v for k, v in feats2.items()}  # fmt: skip
    with torch.no_grad():
        want2 = st(dict(feats2))
    assert _same(splice.load(art.path)(*[feats2[k] for k in keys]), want2)


# ---------------------------------------------------------------------------------------
# path-dependent structure: unify_outputs


class Exits(nn.Module):
    """Adaptive inference: returns the classifier outputs computed so far."""

    def __init__(self, force: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.b0, self.c0 = nn.Linear(8, 8), nn.Linear(8, 3)
        self.b1, self.c1 = nn.Linear(8, 8), nn.Linear(8, 3)
        self.force = force

    def stops(self, y0: torch.Tensor) -> bool:
        if self.force is not None:
            return self.force == 0
        return bool(y0.softmax(-1).max() > 0.5)

    def forward(self, x):
        h = torch.relu(self.b0(x))
        y0 = self.c0(h)
        if self.stops(y0):
            return [y0]
        return [y0, self.c1(torch.relu(self.b1(h)))]


def _paths(model_cls=Exits, x=None):
    x = torch.randn(1, 8) if x is None else x
    programs, trees, models = [], [], []
    for force in (0, 1):
        m = model_cls(force).eval()
        p = splice.capture(m, (x,))
        programs.append(p)
        trees.append(pytree.tree_flatten(m(x))[1])
        models.append(m)
    return programs, trees, models, x


def test_unify_outputs_gives_one_layout_and_each_path_its_own_structure():
    programs, trees, models, x = _paths()
    unified, table = O.unify_outputs(programs, trees)
    assert table["index"] == "variant" and table["pad"] is None
    assert [v["outputs"] for v in table["variants"]] == [["v0_out0"], ["v1_out0", "v1_out1"]]
    assert [v["slots"] for v in table["variants"]] == [[1], [2, 3]]
    assert table["variants"][1]["specs"] == [{"shape": [1, 3], "dtype": "f32"}] * 2
    json.dumps(table)  # JSON, storable in attrs
    names = unified[0].output_names
    assert names == ["variant", "v0_out0", "v1_out0", "v1_out1"]
    for k, (p, m) in enumerate(zip(unified, models)):
        assert p.output_names == names
        assert p.output_specs == unified[0].output_specs  # cond branches can join them
        flat = p.run(x)
        assert int(flat[0]) == k
        p.attrs["variants"] = table
        got = p.unflatten(flat)
        assert isinstance(got, list) and len(got) == k + 1 and _same(got, m(x))
        other = 2 if k == 0 else 1
        assert not flat[other].any()  # the other variant's slot holds zeros
    splice.ir.verify(unified[1])


def test_paths_with_one_structure_share_a_variant_and_keep_their_names():
    programs, trees, models, x = _paths()
    unified, table = O.unify_outputs([programs[1], programs[1]], [trees[1], trees[1]])
    assert table["index"] is None and len(table["variants"]) == 1
    assert unified[0].output_names == ["out0", "out1"]
    unified[0].attrs["variants"] = table
    assert _same(unified[0](x), models[1](x))


def test_unify_outputs_pads_to_one_fixed_structure():
    programs, trees, models, x = _paths()
    unified, table = O.unify_outputs(programs, trees, pad=-1.0)
    assert table["pad"] == -1.0 and O.format_tree(table["tree"]) == "[%out0, %out1]"
    assert unified[0].output_names == ["variant", "out0", "out1"]
    early = unified[0].run(x)
    assert int(early[0]) == 0 and torch.equal(early[2], torch.full((1, 3), -1.0))
    assert table["variants"][0]["specs"] == [{"shape": [1, 3], "dtype": "f32"}]
    for p in unified:
        p.attrs["variants"] = table
    got = unified[0](x)
    assert isinstance(got, list) and len(got) == 2  # padded: always the longest structure
    assert _same(got[0], models[0](x)[0])
    assert _same(unified[1](x), models[1](x))


class Decoder(nn.Module):
    """Greedy decoding that stops early: a token sequence of path-dependent length."""

    def __init__(self, force: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(4, 4)
        self.steps = force + 1

    def forward(self, x):
        h = self.emb(x)
        toks = [h.argmax(-1) for _ in range(self.steps)]
        return {"tokens": torch.stack(toks, -1), "eos": 2}


def test_pad_aligns_sequences_of_different_lengths_with_an_integer_fill():
    x = torch.randn(1, 4)
    programs, trees, models = [], [], []
    for force in (0, 2):
        m = Decoder(force).eval()
        programs.append(splice.capture(m, (x,)))
        trees.append(pytree.tree_flatten(m(x))[1])
        models.append(m)
    # the constant "eos" leaf comes from the programs' recorded trees
    unified, table = O.unify_outputs(programs, trees, pad=0)
    assert table["variants"][0]["specs"] == [{"shape": [1, 1], "dtype": "i64"}]
    for p in unified:
        p.attrs["variants"] = table
    short = unified[0](x)
    assert short["eos"] == 2 and short["tokens"].shape == (1, 3)
    assert torch.equal(short["tokens"][:, :1], models[0](x)["tokens"])
    assert not short["tokens"][:, 1:].any()
    with pytest.raises(CaptureError, match="integral fill"):
        O.unify_outputs(programs, trees, pad=0.5)
    # without pad: two variants, each its own length
    unified, table = O.unify_outputs(programs, trees)
    assert [v["specs"][0]["shape"] for v in table["variants"]] == [[1, 1], [1, 3]]


def test_unify_outputs_refuses_what_it_cannot_align():
    programs, trees, _, _ = _paths()
    with pytest.raises(CaptureError, match="one tree per program"):
        O.unify_outputs(programs, trees[:1])
    bad = pytree.tree_flatten([1, 2, 3])[1]
    with pytest.raises(CaptureError, match="3 leaves"):
        O.unify_outputs(programs[:1], [bad])
    with pytest.raises(CaptureError, match="pad must be a number"):
        O.unify_outputs(programs, trees, pad="zero")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# the runtime: a joined program (torch.cond, as the explorer builds it) with variants


class ExitsCond(Exits):
    """Exits with its branch written as torch.cond returning the unified layout."""

    def forward(self, x):
        h = torch.relu(self.b0(x))
        y0 = self.c0(h)

        def stop(h, y0):
            zero = torch.zeros((), dtype=torch.int64)
            return zero, y0.clone(), torch.zeros_like(y0), torch.zeros_like(y0)

        def go(h, y0):
            y1 = self.c1(torch.relu(self.b1(h)))
            return torch.ones((), dtype=torch.int64), torch.zeros_like(y0), y0.clone(), y1

        return torch.cond(y0.softmax(-1).max() > 0.5, stop, go, (h, y0))


def _joined():
    programs, trees, _, x = _paths()
    _, table = O.unify_outputs(programs, trees)
    p = splice.capture(ExitsCond().eval(), (x,))
    for old, new in zip(p.output_names, ["variant", "v0_out0", "v1_out0", "v1_out1"]):
        p.rename_output(old, new)
    p.attrs["variants"] = table
    eager = Exits().eval()
    # inputs that take each path
    xs = {}
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        xi = torch.randn(1, 8, generator=g) * 3
        xs.setdefault(len(eager(xi)), xi)
        if len(xs) == 2:
            break
    assert len(xs) == 2
    return p, eager, [xs[1], xs[2]]


@pytest.fixture(scope="module")
def joined_artifact(tmp_path_factory):
    p, eager, xs = _joined()
    out = tmp_path_factory.mktemp("variants") / "exits.artifact"
    return splice.compile(p, "host", output=out), p, eager, xs


def test_program_with_variants_returns_each_paths_structure(tmp_path: Path):
    p, eager, xs = _joined()
    for x in xs:
        assert _same(p(x), eager(x))
    text = print_ir(p)
    q = parse_ir(text, p.weights)
    assert q.variants == p.variants and print_ir(q) == text
    splice.save(p, tmp_path / "j.splice")
    r = splice.load(tmp_path / "j.splice")
    assert [len(r(x)) for x in xs] == [1, 2]


def test_artifact_with_variants_returns_each_paths_structure(joined_artifact):
    art, p, eager, xs = joined_artifact
    assert art.manifest["variants"] == p.variants
    assert art.manifest.get("host")  # split into parts and a host program
    m = splice.load(art.path)
    for x in xs:
        got = m(x)
        assert isinstance(got, list) and _same(got, eager(x))
        assert _same(m.unflatten(m.run(x)), eager(x))
    got = m(xs[0].numpy())  # numpy in, numpy leaves out
    assert len(got) == 1 and type(got[0]).__module__ == "numpy"


def test_edge_runner_writes_the_structure_of_the_run(joined_artifact, tmp_path: Path):
    import numpy as np

    from splice.runtime import edge_runner as E

    art, _, eager, xs = joined_artifact
    for k, x in enumerate(xs):
        ind, outd = tmp_path / f"in{k}", tmp_path / f"out{k}"
        ind.mkdir()
        np.save(ind / "x.npy", x.numpy())
        assert E.main(["edge_runner.py", str(art.path), str(ind), str(outd)]) == 0
        s = json.loads((outd / "structure.json").read_text())
        assert s["variant"] == k
        leaves = O.build_tree(
            s["tree"], lambda n, d=outd: torch.from_numpy(np.load(d / f"{n}.npy"))
        )
        assert _same(leaves, eager(x))


def test_splice_show_prints_the_variant_table(joined_artifact, capsys):
    from splice.tools.cli import main

    art, *_ = joined_artifact
    assert main(["show", str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "output variants: 2, chosen by output %variant" in out
    assert "variant 1: [%v1_out0, %v1_out1]" in out and "f32[1, 3]" in out


def _tampered(art_path: Path, tmp_path: Path, edit) -> Path:
    from splice.ir.serialize import sha256_file

    dst = tmp_path / "t.artifact"
    shutil.copytree(art_path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    assert all(sha256_file(dst / f) == d for f, d in m["files"].items())
    return dst


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["variants"].update(index="nope"), "no output"),
        (lambda m: m["variants"]["variants"][1].update(slots=[1, 2]), "slots"),
        (lambda m: m["variants"]["variants"][0]["specs"][0].update(shape=[9, 9]), "does not fit"),
        (lambda m: m["variants"]["variants"][0].update(tree={"eval": "x"}), "tree"),
        (lambda m: m["variants"]["variants"].pop(), "program it was compiled from"),
        (lambda m: m.update(output_tree={"output": "v0_out0"}), "exclude each other"),
    ],
    ids=["index", "slots", "specs", "tree", "disagrees", "both"],
)
def test_artifact_validation_checks_the_variant_table(joined_artifact, tmp_path: Path, edit, match):
    art, *_ = joined_artifact
    bad = _tampered(art.path, tmp_path, edit)
    with pytest.raises(ArtifactError, match=match):
        splice.load(bad)


def test_unify_outputs_takes_explorer_shaped_paths_with_constants_and_predicates():
    """A path program as the explorer traces it: the leaves, then its predicates, in one
    flat tuple (constants recorded by capture); the tree is the user's TreeSpec."""

    class Path(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def user(self, x):
            return {"outs": [x + k for k in range(self.n)], "kind": "exit"}

        def forward(self, x):
            leaves = pytree.tree_flatten(self.user(x))[0]
            return (*leaves, x.sum() > 0)  # the predicate comes last

    x = torch.randn(2)
    programs = [splice.capture(Path(n), (x,)) for n in (1, 2)]
    trees = [pytree.tree_flatten(Path(n).user(x))[1] for n in (1, 2)]
    unified, table = O.unify_outputs(programs, trees)
    assert O.format_tree(table["variants"][1]["tree"]) == (
        "{'outs': [%v1_outs_0, %v1_outs_1], 'kind': 'exit'}"
    )
    for n, p in zip((1, 2), unified):
        assert "output_tree" not in p.attrs  # the flat path tree is replaced by the table
        p.attrs["variants"] = table
        assert _same(p(x), Path(n).user(x))


def test_splice_show_of_a_program_prints_its_structure_as_comments(tmp_path: Path, capsys):
    from splice.tools.cli import main

    p, _, _ = _joined()
    splice.save(p, tmp_path / "j.splice")
    assert main(["show", str(tmp_path / "j.splice")]) == 0
    out = capsys.readouterr().out
    assert "# output variants: 2, chosen by output %variant" in out
    assert print_ir(parse_ir(out, p.weights)) == print_ir(p)  # still a program text


def test_artifact_with_constants_in_its_output(tmp_path: Path):
    m = Mixed().eval()
    x = torch.randn(2, 4)
    art = splice.compile(splice.capture(m, (x,)), "host", output=tmp_path / "mixed.artifact")
    assert _same(splice.load(art.path)(x), m(x))
    bad = _tampered(
        art.path, tmp_path, lambda mf: mf["output_tree"]["dict"][0][1].update(output="zz")
    )
    with pytest.raises(ArtifactError, match="'zz', which is no output"):
        splice.load(bad)


# ---------------------------------------------------------------------------------------
# end to end: capture_dynamic joins the paths through unify_outputs


class Adaptive(nn.Module):
    """Adaptive inference in its author's style: exits after a confident classifier and
    returns the list of the classifier outputs computed so far."""

    def __init__(self, blocks: int = 3, threshold: float = 0.4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(blocks))
        self.heads = nn.ModuleList(nn.Linear(8, 3) for _ in range(blocks))
        self.threshold = threshold

    def forward(self, x):
        outs = []
        h = x
        for block, head in zip(self.blocks, self.heads):
            h = torch.relu(block(h))
            y = head(h)
            outs.append(y)
            if y.softmax(-1).max() > self.threshold:
                break
        return outs


def _inputs_per_length(
    model: nn.Module, shape: tuple[int, ...], want: int
) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    found: dict[int, torch.Tensor] = {}
    for _ in range(2000):
        x = torch.randn(*shape, generator=g) * 2
        out = model(x)
        found.setdefault(len(out) if isinstance(out, list) else out.shape[-1], x)
        if len(found) == want:
            break
    assert len(found) == want, sorted(found)
    return dict(sorted(found.items()))


def test_capture_dynamic_adaptive_net_returns_the_list_of_the_right_length(tmp_path: Path):
    m = Adaptive().eval()
    xs = _inputs_per_length(m, (1, 8), 3)
    p = splice.capture_dynamic(m, (xs[1],))
    assert len(p.variants["variants"]) == 3
    for n, x in xs.items():
        got = p(x)
        assert isinstance(got, list) and len(got) == n and _same(got, m(x))
    q = parse_ir(print_ir(p), p.weights)
    assert q.variants == p.variants
    art = splice.compile(p, "host", output=tmp_path / "adaptive.artifact")
    assert art.manifest["variants"] == p.variants
    c = splice.load(art.path)
    for n, x in xs.items():
        got = c(x)
        assert len(got) == n and _same(got, m(x))


def test_capture_dynamic_pad_outputs_gives_one_padded_structure():
    m = Adaptive().eval()
    xs = _inputs_per_length(m, (1, 8), 3)
    p = splice.capture_dynamic(m, (xs[1],), pad_outputs=0.0)
    assert p.variants["pad"] == 0.0
    for n, x in xs.items():
        got = p(x)
        assert isinstance(got, list) and len(got) == 3
        assert _same(got[:n], m(x)) and all(not t.any() for t in got[n:])
        k = int(p.run_named(x)[p.variants["index"]])  # which path structure filled it
        assert len(p.variants["variants"][k]["outputs"]) == n


class Greedy(nn.Module):
    """A greedy LSTM decoder with an end token and a maximum length."""

    def __init__(self, vocab: int = 5, hidden: int = 8, max_len: int = 4, end: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, hidden)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.max_len, self.end = max_len, end

    def forward(self, feat):
        h, c = feat, torch.zeros_like(feat)
        tok = torch.ones(1, dtype=torch.long)
        toks = []
        for _ in range(self.max_len):
            h, c = self.cell(self.emb(tok), (h, c))
            tok = self.out(h).argmax(-1)
            toks.append(tok)
            if bool(tok == self.end):
                break
        return torch.stack(toks, 1)


def test_capture_dynamic_greedy_decoder_returns_the_shorter_sequence(tmp_path: Path):
    m = Greedy().eval()
    xs = _inputs_per_length(m, (1, 8), 4)
    p = splice.capture_dynamic(m, (next(iter(xs.values())),))
    assert sorted(v["specs"][0]["shape"][1] for v in p.variants["variants"]) == [1, 2, 3, 4]
    for x in xs.values():
        assert torch.equal(p(x), m(x))
    c = splice.load(splice.compile(p, "host", output=tmp_path / "greedy.artifact").path)
    for x in xs.values():
        assert torch.equal(c(x), m(x))
