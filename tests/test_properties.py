"""Property tests (issue #15): random graphs x every pass, mutated text IR, edited manifests.

Hypothesis runs derandomized (a fixed seed per test, no example database), so CI sees the
same examples every time and never flakes; the example counts keep the whole file near a
minute on two busy cores.

1. Random small models from :mod:`graphgen`'s menu (Linear chains, branches, shared
   weights, convs, norms, attention, FFNs, extra outputs) are captured and given to every
   pass: the result verifies and round-trips through the text form, exact passes match the
   input program to 1e-5 on random inputs, approximate ones give finite outputs of the same
   shapes, and the caller's program (text and weights) is untouched.
2. Mutations of printed IR make :func:`splice.ir.parse_ir` raise a SpliceError or give a
   program that verifies and runs; never another exception.
3. Edits of a saved program's and a compiled artifact's ``manifest.json`` make loading
   raise a SpliceError (ArtifactError for artifacts) or work; never another exception and
   never a crash (artifacts are loaded and run in a worker process, which may die).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import graphgen as G
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

import splice
from splice.errors import ArtifactError, SpliceError
from splice.ir import meta as M
from splice.ir import parse_ir, print_ir, verify
from splice.passes import PassContext, parse_pipeline

# deterministic: fixed seed per test, no database; no deadline (the machine is shared)
PROPS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    # no "explain" phase: it reruns a failing case hundreds of times to annotate it
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# SPLICE_PROPERTY_SCALE=10 runs ten times as many examples (a longer local hunt);
# SPLICE_PROPERTY_RANDOM=1 draws fresh random examples instead of the fixed ones.
SCALE = float(os.environ.get("SPLICE_PROPERTY_SCALE", "1"))
if os.environ.get("SPLICE_PROPERTY_RANDOM"):
    PROPS = settings(PROPS, derandomize=False)


def props(n: int) -> settings:
    """PROPS with ``n`` examples (times SPLICE_PROPERTY_SCALE)."""
    return settings(PROPS, max_examples=max(1, round(n * SCALE)))


# ---------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=64)
def _capture(spec: G.ModelSpec) -> tuple[splice.Program, tuple[torch.Tensor, ...]]:
    model, args = G.build(spec)
    p = splice.capture(model, args, dynamic_shapes=G.dynamic_shapes(spec))
    with torch.no_grad():
        want = _flat(model(*args))
    got = _flat(p(*args))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert G.close(a, b), f"capture of {spec} differs from eager"
    return p, args


def _flat(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(p: splice.Program, *args: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return _flat(p(*args))


def _snapshot(p: splice.Program) -> tuple[str, dict[str, torch.Tensor]]:
    return print_ir(p, locations=True), {n: t.detach().clone() for n, t in p.weights.items()}


def _assert_untouched(p: splice.Program, snap: tuple[str, dict[str, torch.Tensor]], what: str):
    text, weights = snap
    assert print_ir(p, locations=True) == text, f"{what} changed the caller's program text"
    now = p.weights
    assert set(now) == set(weights), f"{what} changed the caller's weight names"
    for n, t in weights.items():
        assert torch.equal(now[n], t), f"{what} wrote into the caller's weight {n}"


def _assert_round_trips(q: splice.Program, what: str) -> None:
    """The pass's result prints, parses back, verifies and prints the same."""
    text = print_ir(q, locations=True)
    r = parse_ir(text, q.weights)
    verify(r)
    assert print_ir(r, locations=True) == text, f"{what}: text form does not round-trip"


def _assert_exact(
    before: Callable[..., Any], after: Callable[..., Any], inputs: list[tuple], what: str
) -> None:
    for args, extra_after in inputs:
        with torch.no_grad():
            want, got = _flat(before(*args)), _flat(after(*args, *extra_after))
        assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            err = (a - b).abs().max().item() if a.shape == b.shape else math.nan
            assert G.close(a, b), f"{what}: output {i} differs (max err {err}, shape {a.shape})"


def _assert_finite_like(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: output {i} is {a.shape}"
        assert torch.isfinite(a).all(), f"{what}: output {i} is not finite"


def _pipeline(p: splice.Program, text: str, args: tuple, **kw: Any) -> splice.Program:
    q = parse_pipeline(text).run(p, sample_inputs=[args], **kw).program
    verify(q)
    _assert_round_trips(q, text)
    return q


# ---------------------------------------------------------------------------------------
# 1. random graphs x every pass

EXACT = ["cse", "dce", "fold-constants{params=true}", "cse,fold-constants{params=true},dce"]
LOWRANK = ["svd", "asvd", "whitened"]


@pytest.mark.parametrize("text", EXACT)
@props(6)
@given(spec=G.model_specs(), seed=st.integers(0, 2**16))
def test_exact_passes_keep_the_function(text: str, spec: G.ModelSpec, seed: int):
    p, args = _capture(spec)
    snap = _snapshot(p)
    q = _pipeline(p, text, args)
    _assert_untouched(p, snap, text)
    assert q.input_names == p.input_names and q.output_names == p.output_names
    _assert_exact(p, q, [(args, ()), (G.inputs(spec, seed), ())], f"{text} on {spec}")


@pytest.mark.parametrize("method", LOWRANK)
@props(5)
@given(spec=G.model_specs(), seed=st.integers(0, 2**16))
def test_lowrank_gives_a_valid_program(method: str, spec: G.ModelSpec, seed: int):
    p, args = _capture(spec)
    snap = _snapshot(p)
    text = f"lowrank{{ratio=0.5,method={method}}}"
    q = _pipeline(p, text, args)
    _assert_untouched(p, snap, text)
    assert q.input_names == p.input_names and q.output_names == p.output_names
    x = G.inputs(spec, seed)
    _assert_finite_like(_run(q, *x), _run(p, *x), f"{text} on {spec}")


@props(4)
@given(
    spec=G.model_specs().filter(lambda s: s.has_ffn),
    experts=st.sampled_from([2, 4]),
    seed=st.integers(0, 2**16),
)
def test_experts_gives_a_valid_program(spec: G.ModelSpec, experts: int, seed: int):
    p, args = _capture(spec)
    snap = _snapshot(p)
    x = G.inputs(spec, seed)
    text = f"experts{{num_experts={experts},top_k=1,split=contiguous}}"
    q = _pipeline(p, text, args)
    _assert_untouched(p, snap, text)
    _assert_finite_like(_run(q, *x), _run(p, *x), f"{text} on {spec}")
    # with every expert active (unit gates) the routed FFN is the dense one
    text = f"experts{{num_experts={experts},top_k={experts}}}"
    q = _pipeline(p, text, args)
    _assert_untouched(p, snap, text)
    _assert_exact(p, q, [(args, ()), (x, ())], f"{text} on {spec}")


def _targets(p: splice.Program, picks: list[int]) -> str:
    names = sorted(p.named_parameters())
    return "|".join(sorted({names[i % len(names)] for i in picks}))


@props(5)
@given(
    spec=G.model_specs(),
    picks=st.lists(st.integers(0, 100), min_size=1, max_size=3),
    cond_dim=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_hyper_then_specialize(spec: G.ModelSpec, picks: list[int], cond_dim: int, seed: int):
    p, args = _capture(spec)
    assume(p.named_parameters())
    snap = _snapshot(p)
    targets = _targets(p, picks)
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(cond_dim, generator=g)
    x = G.inputs(spec, seed)
    # preserve: exact, for every cond
    text = f"hyper{{targets={targets},cond_dim={cond_dim},hidden=[4]}}"
    q = _pipeline(p, text, args)
    _assert_untouched(p, snap, text)
    assert q.input_names == [*p.input_names, "cond"]
    _assert_exact(p, q, [(args, (cond,)), (x, (1 - cond,))], f"{text} on {spec}")
    # fanout changes the function; specialize folds it back for one cond, exactly
    text = f"hyper{{targets={targets},cond_dim={cond_dim},hidden=[4],init=fanout}}"
    h = _pipeline(p, text, args)
    _assert_finite_like(_run(h, *x, cond), _run(p, *x), f"{text} on {spec}")
    hsnap = _snapshot(h)
    values = ",".join(repr(float(v)) for v in cond)
    stext = f"specialize{{cond=[{values}]}}"
    s = _pipeline(h, stext, args)
    _assert_untouched(h, hsnap, stext)
    assert s.input_names == p.input_names
    cond = torch.tensor([float(v) for v in cond])
    _assert_exact(lambda *a: h(*a, cond), s, [(args, ()), (x, ())], f"{text},{stext} on {spec}")


def _pass_menu(p: splice.Program, spec: G.ModelSpec) -> list[str]:
    params = sorted(p.named_parameters())
    menu = ["cse", "dce", "fold-constants", "fold-constants{params=true}", "lowrank{ratio=0.5}",
            "lowrank{ratio=0.5,method=whitened}", "lowrank{energy=0.9,method=asvd}"]  # fmt: skip
    if spec.has_ffn:
        menu += ["experts{num_experts=2,top_k=1}", "experts{num_experts=4,top_p=0.5}"]
    if params:
        menu += [f"hyper{{targets={params[0]},hidden=[4]}}", "hyper{targets=*,hidden=[2]}"]
        menu += ["hyper{targets=*,hidden=[2],init=fanout,per_sample=true}"]
    return menu


def _internal_cause(e: BaseException) -> BaseException | None:
    """A non-SpliceError a SpliceError wraps (an internal failure dressed as a message)."""
    seen = set()
    cause = e.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if not isinstance(cause, SpliceError):
            return cause
        cause = cause.__cause__
    return None


@props(12)
@given(
    spec=G.model_specs(max_layers=4), picks=st.lists(st.integers(0, 100), min_size=2, max_size=3)
)
def test_pipelines_of_passes_give_valid_programs(spec: G.ModelSpec, picks: list[int]):
    """Passes composed: a valid program (verifies, round-trips, finite outputs of the right
    shapes) or one SpliceError that is not a wrapped internal failure."""
    p, args = _capture(spec)
    snap = _snapshot(p)
    menu = _pass_menu(p, spec)
    texts = [menu[i % len(menu)] for i in picks]
    if any(t.startswith("hyper") for t in texts) and picks[0] % 2:
        texts.append("specialize{cond=[0.5]}")
    text = ",".join(texts)
    try:
        q = _pipeline(p, text, args)
    except SpliceError as e:
        cause = _internal_cause(e)
        assert cause is None, f"{text} on {spec}: internal {type(cause).__name__}: {cause}"
        event(f"refused: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return
    finally:
        _assert_untouched(p, snap, text)
    event("valid")
    # and it saves and loads back as the same program
    with _scratch() as d:
        splice.save(q, d / "q.splice", samples=[args])
        back = splice.load(d / "q.splice")
        assert print_ir(back, locations=True) == print_ir(q, locations=True), text
    x = G.inputs(spec, 7)
    b = x[0].shape[0]
    extra = [
        torch.rand(*[d if isinstance(d, int) else b for d in M.tensor_spec(n).shape])
        for n in q.input_nodes[len(p.input_names) :]
    ]
    _assert_finite_like(_run(q, *x, *extra), _run(p, *x), f"{text} on {spec}")


def test_stitch_on_a_family():
    """stitch needs a model family: one deterministic case (two conv_family widths)."""
    from splice import models

    def member(width: int) -> splice.Program:
        model, x = models.conv_family(width, depth=2, image=8, seed=width)
        return splice.capture(model, x)

    small, large = member(4), member(8)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(1, 3, 8, 8, generator=g),) for _ in range(4)]
    snaps = _snapshot(small), _snapshot(large)
    ctx = PassContext(sample_inputs=calib, programs={"large": large})
    q = parse_pipeline("stitch{anchors=large,calib_samples=4}").run(small, ctx=ctx).program
    verify(q)
    _assert_round_trips(q, "stitch")
    _assert_untouched(small, snaps[0], "stitch")
    _assert_untouched(large, snaps[1], "stitch (anchor)")
    n = len(q.attrs["stitch"]["configs"])
    assert n >= 3
    x = calib[0]
    for c in range(n):
        got = _run(q, *x, torch.tensor(c))
        _assert_finite_like(got, _run(small, *x), f"stitch config {c}")
    # the anchors' configurations are the anchors, exactly
    _assert_exact(small, q, [(x, (torch.tensor(0),))], "stitch config 0")
    _assert_exact(large, q, [(x, (torch.tensor(1),))], "stitch config 1")
    # and specialize{config=} keeps one of them
    s = _pipeline(q, "specialize{config=1}", x)
    _assert_exact(large, s, [(x, ())], "specialize{config=1}")


class _CondModel(torch.nn.Module):
    """``prefix -> cond(sum > 0, true layers, false layers) -> suffix``: the branches pass."""

    def __init__(self, spec: G.ModelSpec, t: G.ModelSpec, f: G.ModelSpec):
        super().__init__()
        torch.manual_seed(0)
        self.pre = G.Composed(spec)
        self.t, self.f = G.Composed(t), G.Composed(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _flat(self.pre(x))[0]
        return torch.cond(
            h.sum() > 0, lambda v: _flat(self.t(v))[0], lambda v: _flat(self.f(v))[0], (h,)
        )


_same_width = st.lists(
    G.layers().filter(
        lambda layer: layer.kind in ("act", "shared", "layernorm", "rmsnorm", "ffn", "attention")
    ),
    min_size=1,
    max_size=2,
)


@props(2)
@given(pre=_same_width, t=_same_width, f=_same_width, d=st.sampled_from([4, 8]))
def test_branches_keeps_the_function(pre: list, t: list, f: list, d: int):
    specs = [G.ModelSpec(d, tuple(layers), batch=1, seq=3) for layers in (pre, t, f)]
    model = _CondModel(*specs).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, d, generator=g)
    p = splice.capture(model, (x,))
    snap = _snapshot(p)
    q = _pipeline(p, "branches", (x,))
    _assert_untouched(p, snap, "branches")
    # inputs that take both branches
    xs = [torch.randn(1, 3, d, generator=g) * s for s in (1, 3, 10)]
    xs += [-v for v in xs]
    with torch.no_grad():
        taken = {bool(_flat(model.pre(v))[0].sum() > 0) for v in xs}
        want = [model(v) for v in xs]
    for v, w in zip(xs, want):
        _assert_exact(lambda *_, w=w: w, q, [((v,), ())], f"branches on {specs}")
    assert taken, "no branch taken"


# ---------------------------------------------------------------------------------------
# 2. mutated text IR: a SpliceError or a program that verifies and runs


@functools.lru_cache(maxsize=1)
def _ir_corpus() -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Printed programs to mutate: plain layers, splice ops, a hypernetwork, a cond."""
    out = []
    spec = G.ModelSpec(
        4,
        (
            G.Layer("linear", 4),
            G.Layer("attention", 0, "causal"),
            G.Layer("ffn", 8, "gelu"),
            G.Layer("constant", 0),
            G.Layer("extra_output", 0),
        ),
        batch=1,
        seq=3,
    )
    out.append(_capture(spec)[0])
    chain = G.ModelSpec(4, (G.Layer("linear", 8), G.Layer("linear", 8), G.Layer("rmsnorm", 0)))
    q, qargs = _capture(chain)
    out.append(parse_pipeline("lowrank{ratio=0.5}").run(q, sample_inputs=[qargs]).program)
    out.append(parse_pipeline("hyper{targets=layers.2.*,hidden=[2]}").run(q).program)
    small = G.ModelSpec(4, (G.Layer("act", 0, "relu"),), batch=1, seq=3)
    ffn = G.ModelSpec(4, (G.Layer("ffn", 8, "relu"),), batch=1, seq=3)
    norm = G.ModelSpec(4, (G.Layer("layernorm", 0),), batch=1, seq=3)
    cond = _CondModel(small, ffn, norm).eval()
    out.append(splice.capture(cond, (torch.randn(1, 3, 4),)))
    dynamic = G.ModelSpec(4, spec.layers[1:3], batch=2, seq=3, dynamic=True, embed=True)
    out.append(_capture(dynamic)[0])
    return [(print_ir(x, locations=True), dict(x.weights)) for x in out]


_JUNK = [
    '  %evil : f32[1] = import_module.__self__.load_library("/nonexistent/evil.so")',
    '  %evil : f32[1] = aten.import_module.__self__.load_library("/nonexistent/evil.so")',
    "  %evil : f32[1,3,4] = torch.ops.aten.relu(%x)",
    '  %evil : f32[1] = builtins.eval("1")',
    '  %evil : f32[1] = os.system("true")',
    '  %evil : f32[1] = operator.attrgetter("__globals__")(%x)',
    "  %evil : f32[1] = aten.__class__(%x)",
    "  %evil : f32[1] = aten._ops.__dict__(%x)",
    "  %evil : f32[1] = higher_order.nope(%x)",
    "  %evil : f32[1] = aten.nope(%x)",
    "  %evil : f32[1] = splice.nope(%x)",
    '  %evil : f32[1] = aten.add.Tensor(%x, "\\x")',
    '  %evil : f32[1] = aten.add.Tensor(%x, "\\ud800")',
    "  %evil : f32[1,3,4] = aten.add.Tensor(%x, %x)",
    "  %self : f32[1,3,4] = aten.relu(%x)",
    "  %def : f32[1,3,4] = aten.relu(%x)",
    "  %torch : f32[1,3,4] = aten.relu(%x)",
    "weight @evil : f32[2] param",
    "weight @x : f32[1,3,4] param",
    "weight @forward : f32[2] param",
    "weight @a..b : f32[2] param",
    "graph @g() {",
    "}",
    "{",
    "return",
    "  return out=%nope",
    "  return out=%x, out=%x",
    "program @p() {",
    "# splice IR v2",
    "",
    "\t",
    "  %a : f32[ = ",
    "  %a : f32[1,3,4] = aten.relu(%x)  # module @ file.py:1 [pass]",
    "  %a : f32[1,3,4] = aten.relu(" + "[" * 5000 + "]" * 5000 + ")",
    "  %a : f32[1,3,4] = aten.relu(" + "(" * 5000 + ")" * 5000 + ")",
    "  %a : " + "(" * 3000 + "f32[1]" + ",)" * 3000 + " = aten.relu(%x)",
    "\x00",
    "\u2028",
]
_OPS = [
    "aten.relu",
    "aten.relu.default",
    "aten.add",
    "aten.linear",
    "aten.nope",
    "aten.relu.nope",
    "higher_order.nope",
    "higher_order.cond",
    "splice.lowrank_linear",
    "splice.moe_ffn",
    "operator.getitem",
    "operator.mul",
    "operator.attrgetter",
    "builtins.eval",
    "torch.ops.aten.relu",
    "import_module.__self__.load_library",
    "aten.__class__",
    "aten.__init__.__globals__",
    "prims.add",
    "",
    ".",
    "aten..relu",
]
_NAMES = ["self", "def", "torch", "x", "cond", "relu", "__class__", "1a", "a.b", "import", "_"]
_NAMES += ["é"]
_DIMS = [
    "",
    "0",
    "-1",
    "1",
    "3",
    "2,3",
    "99999999999999999999",
    "s0",
    "1,1,1,1,1,1,1,1",
    "a",
    "1.5",
]
_DTYPES = ["f32", "f16", "bf16", "f64", "i64", "i32", "bool", "u8", "c64", "q8", "float"]
_NUMBERS = ["nan", "inf", "-inf", "-0", "1e400", "99999999999999999999999", "0x10", "-1", "True"]
_CHARS = [*"%@{}()[],:=#\"\\ .0-9azZ_\n\t'`$!", "é", "\u2028", "\x00"]


@st.composite
def _mutation(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(
        st.sampled_from(
            [
                "delete",
                "duplicate",
                "swap",
                "char",
                "shape",
                "dtype",
                "rename",
                "op",
                "insert",
                "number",
                "nest",
            ]
        )
    )
    i, j = draw(st.integers(0, 10_000)), draw(st.integers(0, 10_000))
    value: Any = None
    if kind == "char":
        value = draw(st.sampled_from([*_CHARS, "DEL"]))
    elif kind == "shape":
        value = draw(st.sampled_from(_DIMS))
    elif kind == "dtype":
        value = draw(st.sampled_from(_DTYPES))
    elif kind == "rename":
        value = draw(st.sampled_from([*_NAMES, "EXISTING"]))
    elif kind == "op":
        value = draw(st.sampled_from(_OPS))
    elif kind == "insert":
        value = draw(st.sampled_from(_JUNK))
    elif kind == "number":
        value = draw(st.sampled_from(_NUMBERS))
    elif kind == "nest":
        value = draw(st.sampled_from([3, 100, 5000]))
    return (kind, i, j, value)


_SPEC_RE = re.compile(r"\b(f32|f64|f16|bf16|i64|i32|bool)\[([^\]]*)\]")
_OP_RE = re.compile(r"= ([A-Za-z_][\w.]*)\(")
_NAME_RE = re.compile(r"%([A-Za-z_]\w*)")
_NUMBER_RE = re.compile(r"(?<![\w.%@])-?\d+(\.\d+)?(e-?\d+)?(?![\w\[])")


def _mutate(text: str, m: tuple[Any, ...]) -> str:
    kind, i, j, value = m
    lines = text.split("\n")
    n = len(lines)
    if kind == "delete":
        del lines[i % n]
    elif kind == "duplicate":
        lines.insert(i % n, lines[i % n])
    elif kind == "swap":
        a, b = i % n, j % n
        lines[a], lines[b] = lines[b], lines[a]
    elif kind == "insert":
        lines.insert(i % (n + 1), value)
    elif kind == "char":
        pos = i % max(1, len(text))
        return text[:pos] + ("" if value == "DEL" else value) + text[pos + 1 :]
    elif kind == "nest":
        line = i % n
        open_, close = "[" * value, "]" * value
        lines[line] = re.sub(
            r"\(([^()]*)\)", lambda g: f"({open_}{g.group(1)}{close})", lines[line], count=1
        )
    else:
        pattern = {"shape": _SPEC_RE, "dtype": _SPEC_RE, "op": _OP_RE, "rename": _NAME_RE,
                   "number": _NUMBER_RE}[kind]  # fmt: skip
        found = list(pattern.finditer(text))
        if not found:
            return text
        hit = found[i % len(found)]
        if kind == "shape":
            start, end = hit.span(2)
        elif kind in ("dtype", "op"):
            start, end = hit.span(1)
        elif kind == "rename":
            old = hit.group(1)
            if value == "EXISTING":
                value = found[j % len(found)].group(1)
            if j % 2:  # every use
                return re.sub(rf"%{re.escape(old)}\b", "%" + value, text)
            start, end = hit.span(1)
        else:
            start, end = hit.span(0)
        return text[:start] + value + text[end:]
    return "\n".join(lines)


def _runnable_inputs(p: splice.Program) -> tuple[torch.Tensor, ...] | None:
    """Random inputs for ``p``'s input specs (symbols at their hints); None if a value of
    ``p`` would be huge."""
    hints = {name: info.hint for name, info in p.symbols.items()}

    def size(d: Any) -> int:
        return d if isinstance(d, int) else M.eval_dim(d, hints)

    for node in p.graph.nodes:
        for s in M.iter_tensor_specs(M.get_spec(node) or M.NONE):
            if math.prod(max(1, size(d)) for d in s.shape) > 1_000_000:
                return None
    g = torch.Generator().manual_seed(0)
    out = []
    for s in p.input_specs:
        assert isinstance(s, M.TensorSpec), s
        shape = tuple(size(d) for d in s.shape)
        if s.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(s.dtype))
        elif s.dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        else:
            out.append(torch.zeros(shape, dtype=s.dtype))
    return tuple(out)


def check_parse(text: str, weights: dict[str, torch.Tensor]) -> str:
    """parse_ir + verify + run: the property of part 2. Returns what happened."""
    try:
        p = parse_ir(text, weights)
    except SpliceError:
        return "parse error"
    try:
        verify(p)
    except SpliceError:
        return "verify error"
    x = _runnable_inputs(p)
    if x is None:
        return "verified (too large to run)"
    with torch.no_grad():
        outs = p.run(*x)
    for o, s in zip(outs, p.output_specs):
        if isinstance(o, torch.Tensor) and isinstance(s, M.TensorSpec):
            assert o.dtype == s.dtype and o.dim() == len(s.shape), (o.shape, s)
            assert all(a == b for a, b in zip(o.shape, s.shape) if isinstance(b, int)), (o, s)
    return "runs"


@props(150)
@given(which=st.integers(0, 4), mutations=st.lists(_mutation(), min_size=1, max_size=3))
def test_mutated_ir_is_an_error_or_a_valid_program(which: int, mutations: list):
    text, weights = _ir_corpus()[which]
    for m in mutations:
        text = _mutate(text, m)
    event(check_parse(text, weights))


# ---------------------------------------------------------------------------------------
# 3. edited manifests: a SpliceError (ArtifactError for artifacts) or a working load

_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 3, 2**31, 10**12, -(10**12), 2**64, 1.5, float("nan"), 1e308]),
    st.sampled_from(
        [
            "",
            "x",
            "main.so",
            "../other.so",
            "OTHER_ABS",
            "../../../../etc/passwd",
            "/etc/passwd",
            "/dev/zero",
            ".",
            "..",
            "program.ir",
            "weights.safetensors",
            "manifest.json",
            "samples.safetensors",
            "f32",
            "i64",
            "bool",
            "main",
            "x;rm",
            "splice.program/1",
            "splice.artifact/1",
            "0" * 64,
            "\x00",
            "é",
        ]
    ),
    st.lists(st.sampled_from([0, -1, 3, 4, 10**12]), max_size=3),
    st.just({}),
    st.just([{}]),
    st.just({"name": "x", "shape": [1, 4], "dtype": "i64"}),
)
_JSON_KEYS = ["format", "files", "inputs", "outputs", "parts", "library", "params", "entry",
              "host", "name", "shape", "dtype", "index_bound", "target", "signatures", "program",
              "required_features", "splice_version", "../x", "/abs"]  # fmt: skip


def _json_paths(v: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if prefix[:1] in (("lowering",), ("options",)) or prefix[:2] == ("target", "features"):
        return out  # informational subtrees would take most draws
    if isinstance(v, dict):
        for k, x in v.items():
            out += _json_paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _json_paths(x, (*prefix, i))
    return out


@st.composite
def _manifest_edits(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Edits as data: (op, path index, key, value); applied by :func:`_edit_manifest`."""
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["drop", "set", "add", "root"]),
                st.integers(0, 10_000),
                st.sampled_from(_JSON_KEYS),
                _JSON_VALUES,
            ),
            min_size=1,
            max_size=3,
        )
    )


def _edit_manifest(m: Any, edits: list[tuple[Any, ...]], other_abs: str) -> Any:
    m = json.loads(json.dumps(m))
    for op, i, key, shared in edits:
        value = copy.deepcopy(shared)  # st.just({}) hands out one object every time
        if value == "OTHER_ABS":
            value = other_abs
        if op == "root":
            if i % 5 == 0:  # rarely: the whole manifest
                m = value
            continue
        paths = [p for p in _json_paths(m) if p]
        if not paths:
            continue
        path = paths[i % len(paths)]
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if op == "drop":
            parent.pop(path[-1])
        elif op == "set":
            parent[path[-1]] = value
        elif isinstance(parent, dict):
            parent[key] = value
        elif isinstance(parent, list):
            parent.append(value)
    return m


def _write_manifest(root: Path, manifest: Any, recompute: bool, raw: str | None) -> None:
    """Write ``manifest`` (or ``raw`` text); with ``recompute``, its ``files`` sha256s are
    set to what the named files hold, so that checksums do not hide the other checks."""
    if recompute and isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        from splice.ir.serialize import sha256_file

        for name in list(manifest["files"]):
            f = root / str(name)
            try:
                if f.is_file():
                    manifest["files"][name] = sha256_file(f)
            except (OSError, ValueError):
                pass
    text = raw if raw is not None else json.dumps(manifest, indent=2)
    if text == "DEEP":  # nesting deeper than the JSON decoder's recursion limit
        text = "[" * 100_000 + "]" * 100_000
    (root / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")


@functools.lru_cache(maxsize=1)
def _saved_program_dir() -> tuple[Path, tuple[torch.Tensor, ...], list[torch.Tensor]]:
    spec = G.ModelSpec(4, (G.Layer("linear", 8), G.Layer("act", 0, "gelu"), G.Layer("linear", 4)))
    p, args = _capture(spec)
    root = Path(tempfile.mkdtemp(prefix="splice-props-")) / "saved.splice"
    splice.save(p, root, samples=[args])
    return root, args, _run(p, *args)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="splice-props-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@props(100)
@given(
    edits=_manifest_edits(),
    recompute=st.booleans(),
    ir_mutations=st.lists(_mutation(), max_size=2),
    raw=st.sampled_from([None, None, None, None, "", "{", "[]", "null", '"\\x"', "DEEP"]),
)
def test_edited_saved_program_loads_or_raises(
    edits: list, recompute: bool, ir_mutations: list, raw: str | None
):
    from splice.ir import serialize

    src, args, want = _saved_program_dir()
    with _scratch() as d:
        root = d / "p.splice"
        shutil.copytree(src, root)
        shutil.copy(root / "program.ir", d / "other.ir")
        text = (root / "program.ir").read_text()
        for m in ir_mutations:
            text = _mutate(text, m)
        (root / "program.ir").write_text(text, encoding="utf-8", errors="surrogatepass")
        manifest = json.loads((root / "manifest.json").read_text())
        manifest = _edit_manifest(manifest, edits, str(d / "other.ir"))
        _write_manifest(root, manifest, recompute, raw)
        for load in (splice.load, serialize.load, serialize.load_samples):
            try:
                got = load(root)
            except SpliceError:
                event(f"{load.__module__}.{load.__name__}: refused")
                continue
            event(f"{load.__module__}.{load.__name__}: loaded")
            if isinstance(got, splice.Program):
                verify(got)  # every load verifies: what loads, verifies
                x = _runnable_inputs(got)
                if x is not None:
                    got.run(*x)
                if not ir_mutations and got.input_names == ["x"]:
                    _assert_finite_like(_run(got, *args), want, "loaded program")


class _Embed(torch.nn.Module):
    """Token ids -> embedding -> Linear: an artifact with an ``index_bound`` input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.emb(ids)))


# Loads and runs artifacts in a process of its own, so that a crash (SIGSEGV, SIGBUS) is
# seen as the worker dying instead of taking pytest down. One request per line: a path.
_WORKER = textwrap.dedent(
    """
    import json, logging, sys
    logging.disable(logging.CRITICAL)
    import torch
    from safetensors.torch import load_file
    import tvm  # noqa: F401  (imported while the test compiles)
    import splice
    from splice.errors import ArtifactError, SpliceError

    t = None
    print("ready", flush=True)
    for line in sys.stdin:
        t = t or load_file(sys.argv[1])
        res = {}
        try:
            m = splice.load(line.strip())
            res["load"] = "ok"
            got = m(t["ids"])
            res["diff"] = float((got - t["want"]).abs().max())
            try:
                m(t["bad"])
                res["bad"] = "ran"
            except ArtifactError:
                res["bad"] = "refused"
        except ArtifactError as e:
            res["error"] = "ArtifactError: " + str(e).splitlines()[0]
        except SpliceError as e:
            res["other"] = type(e).__name__ + ": " + str(e).splitlines()[0]
        except BaseException as e:
            res["other"] = type(e).__name__ + ": " + str(e)[:300]
        print(json.dumps(res), flush=True)
    """
)


class _Worker:
    def __init__(self, tensors: Path):
        self.tensors = tensors
        self.proc: subprocess.Popen[str] | None = None
        self.ready = False

    def start(self) -> None:
        env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(self.tensors)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.ready = False

    def load(self, path: Path) -> dict[str, Any]:
        """What loading and running ``path`` did; ``{"crash": returncode}`` if it died."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        if not self.ready:
            assert self.proc.stdout.readline().strip() == "ready", "the worker did not start"
            self.ready = True
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        if not ready:  # hung: a load must end, one way or the other
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None
            return {"crash": "no answer in 300 s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            self.proc = None
            return {"crash": code}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, _Worker]]:
    pytest.importorskip("tvm")
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("artifact")
    worker = _Worker(d / "io.safetensors")
    worker.start()  # imports while we compile

    torch.manual_seed(0)
    model = _Embed().eval()
    ids = torch.tensor([[1, 5, 9, 15]])
    p = splice.capture(model, (ids,))
    art = splice.compile(p, "host", output=d / "model.artifact", samples=[(ids,)])
    with torch.no_grad():
        want = model(ids)
    save_file(
        {"ids": ids, "want": want, "bad": torch.tensor([[1, 5, 9, 40000]])}, d / "io.safetensors"
    )
    yield art.path, worker
    worker.close()


@props(25)
@given(
    edits=_manifest_edits(),
    recompute=st.booleans(),
    # truncated or padded libraries (checksums recomputed) must be refused before dlopen;
    # bytes changed *inside* a library are not a manifest edit: native code that was
    # rewritten is outside what loading can check (the README's trust model)
    library=st.sampled_from([None, None, None, "truncate", "append"]),
    cut=st.integers(0, 10_000_000),
    raw=st.sampled_from([None] * 8 + ["", "{", "[]", "null", '"\\x"', "DEEP"]),
)
def test_edited_artifact_loads_or_raises_artifact_error(
    artifact: tuple[Path, _Worker],
    edits: list,
    recompute: bool,
    library: str | None,
    cut: int,
    raw: str | None,
):
    src, worker = artifact
    with _scratch() as d:
        root = d / "a.artifact"
        shutil.copytree(src, root)
        shutil.copy(root / "main.so", d / "other.so")  # a library outside the folder
        lib = root / "main.so"
        if library == "truncate":
            data = lib.read_bytes()
            lib.write_bytes(data[: cut % len(data)])
        elif library == "append":
            with open(lib, "ab") as f:
                f.write(b"\0" * (cut % 4096 + 1))
        manifest = json.loads((root / "manifest.json").read_text())
        manifest = _edit_manifest(manifest, edits, str(d / "other.so"))
        _write_manifest(root, manifest, recompute or library is not None, raw)
        res = worker.load(root)
    event("loaded" if res.get("load") == "ok" else "refused" if "error" in res else "bad")
    assert "crash" not in res, f"loading or running the artifact killed the process: {res}"
    assert "other" not in res, f"not an ArtifactError: {res['other']}"
    if res.get("load") == "ok":
        assert res["diff"] <= 1e-4, f"loaded, but computes something else ({res['diff']})"
        assert res["bad"] == "refused", "a token id past the embedding's rows was not refused"


# ---------------------------------------------------------------------------------------
# regressions: the properties' findings, shrunk


@pytest.mark.parametrize("kind", ["program", "artifact"])
def test_regression_deeply_nested_manifest_is_an_artifact_error(tmp_path: Path, kind: str):
    """A manifest.json nested deeper than the JSON decoder's recursion limit raised
    RecursionError from splice.load and CompiledModel (json.loads outside any except)."""
    from splice.runtime.artifact import CompiledModel

    root = tmp_path / "deep"
    if kind == "program":
        src, _, _ = _saved_program_dir()
        shutil.copytree(src, root)
    else:
        root.mkdir()
    (root / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    loads: list[Callable[[Path], Any]] = [splice.load, CompiledModel]
    if kind == "program":
        from splice.ir import serialize

        loads += [serialize.load, serialize.load_samples]
    for load in loads:
        with pytest.raises(ArtifactError):
            load(root)


def test_regression_specialize_after_lowrank_of_the_hypernetwork():
    """hyper, then lowrank (which factors the hypernetwork's own Linears), then specialize
    raised KeyError('hyper.net.0.weight'): specialize removed the hypernetwork's weights
    by the names hyper recorded, which lowrank had replaced."""
    spec = G.ModelSpec(4, (G.Layer("linear", 4),), batch=1, seq=3)
    p, args = _capture(spec)
    h = _pipeline(
        p, "hyper{targets=layers.0.weight,hidden=[4],init=fanout},lowrank{ratio=0.5}", args
    )
    s = _pipeline(h, "specialize{cond=[0.5]}", args)
    assert s.input_names == p.input_names
    assert not [w for w in s.weight_kinds if w.startswith("hyper.")]
    cond = torch.tensor([0.5])
    _assert_exact(lambda *a: h(*a, cond), s, [(args, ())], "specialize after lowrank")


@pytest.mark.parametrize("dtype", ["i64", "i32", "u8", "bool"])
def test_regression_linear_of_an_integer_input_does_not_verify(dtype: str):
    """``aten.linear(int input, f32 weight, f32 bias)`` verified (the fake addmm promotes
    with the bias and never compares mat1's and mat2's dtypes) and then failed when run
    with RuntimeError 'mat1 and mat2 must have the same dtype'."""
    text = textwrap.dedent(
        f"""\
        # splice IR v1
        weight @w : f32[8,4] param
        weight @b : f32[8] param
        program @p(%x : {dtype}[2,4]) {{
          %y : f32[2,8] = aten.linear(%x, @w, @b)
          return out=%y
        }}
        """
    )
    weights = {"w": torch.randn(8, 4), "b": torch.randn(8)}
    assert check_parse(text, weights) in ("parse error", "verify error")
