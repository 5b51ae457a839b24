"""Text form: print/parse round trips, the grammar's corners, parse errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, ir

import splice
from splice.errors import ParseError
from splice.ir import meta as M
from splice.ir.parser import parse_spec
from splice.ir.printer import format_arg

SMALL = """# splice IR v1
weight @w : f32[4,4] param
weight @b : f32[4] buffer
program @small(%x : f32[2,4]) {
  %lin : f32[2,4] = aten.linear(%x, @w, @b)  # fc @ model.py:12
  %t : f32[2,4] = aten.mul.Tensor(%lin, 0.5)  # <root> @ model.py:13 [cse,fold-constants]
  %s : (f32[2,2], f32[2,2]) = aten.split.Tensor(%t, 2, 1)  # head
  %g : f32[2,2] = operator.getitem(%s, 0)
  %c : f32[2,2] = aten.clamp(%g, min=-inf, max=1e-05)
  %e : f32[2,2] = aten.to.dtype(%c, torch.float32)
  return out=%e, half=%t
}
"""


def small():
    return ir(SMALL, w=torch.randn(4, 4), b=torch.randn(4))


def test_round_trip_with_and_without_locations():
    p = small()
    assert splice.print_ir(p, locations=True) == SMALL
    without = splice.print_ir(p)
    assert "#" not in without.replace("# splice IR v1", "")
    assert splice.print_ir(splice.parse_ir(without, p.weights)) == without


def test_parsed_locations_and_specs():
    p = small()
    lin = p.node("lin")
    assert M.loc(lin) == M.Loc("fc", "model.py", 12, ())
    assert M.loc(p.node("t")).from_passes == ("cse", "fold-constants")
    assert M.spec(p.node("s")) == M.TupleSpec((M.TensorSpec((2, 2), torch.float32),) * 2)
    assert p.node("c").kwargs == {"min": float("-inf"), "max": 1e-05}
    splice.verify(p)
    x = torch.randn(2, 4)
    out, half = p(x)
    ref = (x @ p.get_weight("w").T + p.get_weight("b")) * 0.5
    assert torch.allclose(half, ref)
    assert torch.allclose(out, ref[:, :2].clamp(max=1e-5))


@pytest.mark.parametrize("name", ARCHS)
def test_real_models_round_trip_with_locations(name, captured):
    p = captured(name)
    text = splice.print_ir(p, locations=True)
    q = splice.parse_ir(text, p.weights)
    assert splice.print_ir(q, locations=True) == text


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -3,
        1.5,
        float("inf"),
        float("-inf"),
        1e-12,
        'a b"c',
        [1, 2],
        (3,),
        (1, [2, None]),
        torch.float16,
        torch.device("cpu"),
        torch.contiguous_format,
        torch.strided,
    ],
)
def test_literal_arguments_round_trip(value):
    text = """program @p(%x : f32[2]) {
  %y : f32[2] = aten.alias(%x)
  return out=%y
}"""
    # the parser only builds the node; the literal need not fit the op's schema here
    printed = format_arg(value)
    q = splice.parse_ir(text.replace("aten.alias(%x)", f"aten.alias(%x, {printed})"))
    got = q.node("y").args[1]
    assert got == value and isinstance(got, type(value))
    assert format_arg(got) == printed


def test_nan_literal_round_trips():
    text = """program @p(%x : f32[2]) {
  %y : f32[2] = aten.nan_to_num(%x, nan)
  return out=%y
}"""
    p = splice.parse_ir(text)
    assert p.node("y").args[1] != p.node("y").args[1]  # nan
    assert "aten.nan_to_num(%x, nan)" in splice.print_ir(p)


@pytest.mark.parametrize(
    "text",
    [
        "f32[1,2,3]",
        "i64[]",
        "bool[b,2*t,t-1]",
        "(f32[2], i64[2])",
        "(f32[2],)",
        "[f32[1], f32[2]]",
        "none",
        "int",
        "int(2*s)",
        "float",
        "f32[Max(1,s),4]",
    ],
)
def test_spec_grammar(text):
    from splice.ir.parser import _Line

    assert str(parse_spec(_Line(text, 1))) == text


def test_parse_error_unknown_op_names_the_line():
    bad = SMALL.replace("aten.mul.Tensor", "aten.mull.Tensor")
    with pytest.raises(ParseError, match="unknown op 'aten.mull.Tensor'") as info:
        ir(bad, w=torch.randn(4, 4), b=torch.randn(4))
    assert info.value.line == 6


def test_parse_error_use_before_definition():
    bad = SMALL.replace("aten.relu", "").replace("aten.mul.Tensor(%lin", "aten.mul.Tensor(%later")
    with pytest.raises(ParseError, match="%later is used before it is defined"):
        ir(bad, w=torch.randn(4, 4), b=torch.randn(4))


def test_parse_error_weight_mismatch_and_missing_weight():
    with pytest.raises(
        ParseError, match=r"weight @w is declared f32\[4,4\] but the value given is f32\[3,4\]"
    ):
        ir(SMALL, w=torch.randn(3, 4), b=torch.randn(4))
    with pytest.raises(ParseError, match="no value given for weight @b"):
        ir(SMALL, w=torch.randn(4, 4))


def test_parse_error_undeclared_weight_and_duplicate_value():
    with pytest.raises(ParseError, match="@nope is neither a declared weight"):
        ir(SMALL.replace("@b)", "@nope)"), w=torch.randn(4, 4), b=torch.randn(4))
    dup = SMALL.replace("%t : f32[2,4] = aten.mul", "%lin : f32[2,4] = aten.mul").replace(
        "(%t, 2, 1)", "(%lin, 2, 1)"
    )
    with pytest.raises(ParseError, match="defined twice"):
        ir(dup.replace("half=%t", "half=%lin"), w=torch.randn(4, 4), b=torch.randn(4))


def test_parse_error_missing_program_and_unbalanced_block():
    with pytest.raises(ParseError, match="no `program"):
        splice.parse_ir("weight @w : f32[1] param\n", {"w": torch.zeros(1)})
    with pytest.raises(ParseError, match="missing `}`"):
        splice.parse_ir("program @p(%x : f32[1]) {\n  %y : f32[1] = aten.neg(%x)\n")


def test_parser_never_evaluates_python():
    evil = """program @p(%x : f32[1]) {
  %y : f32[1] = os.system(%x)
  return out=%y
}"""
    with pytest.raises(ParseError, match="unknown op 'os.system'"):
        splice.parse_ir(evil)
    evil2 = evil.replace("os.system(%x)", '__import__("os").system(%x)')
    with pytest.raises(ParseError):
        splice.parse_ir(evil2)


def test_symbols_and_attrs_round_trip():
    text = """# splice IR v1
symbol s : hint=4 range=[1,inf]
attr note = {"a": [1, 2]}
program @p(%x : f32[s,3]) {
  %y : f32[s,3] = aten.relu(%x)
  %n : int(s) = aten.sym_size.int(%x, 0)
  %z : f32[2*s,3] = aten.cat([%y, %y])
  return out=%z, n=%n
}
"""
    p = splice.parse_ir(text)
    assert splice.print_ir(p) == text
    assert p.symbols["s"] == M.SymbolInfo(4, 1, None)
    assert p.attrs == {"note": {"a": [1, 2]}}
    splice.verify(p)
    z, n = p(torch.randn(5, 3))
    assert z.shape == (10, 3) and n == 5
