"""Pipeline text, the registry, options and their errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from splice.errors import PipelineError
from splice.passes import (
    Pass,
    PassResult,
    available_passes,
    make_pass,
    parse_pipeline,
    register_pass,
)
from splice.passes import registry as reg


@register_pass
@dataclass(frozen=True)
class _Opts(Pass):
    name = "test-opts"
    summary = "a pass with one option of each kind (tests only)"
    method: Literal["svd", "asvd", "whitened"] = "svd"
    ratio: float = 0.5
    rank: int | None = None
    targets: str = "*"
    hidden: tuple[int, ...] = (64, 64)
    flag: bool = False

    def validate(self) -> None:
        if not 0 < self.ratio <= 1:
            raise PipelineError(f"test-opts: ratio must be in (0, 1], got {self.ratio}")

    def run(self, program, ctx):
        return PassResult(program, False, {"reason": "test pass"})


@pytest.mark.parametrize(
    "text",
    [
        "cse",
        "cse,dce,fold-constants",
        "test-opts{method=whitened,ratio=0.25}",
        "test-opts{hidden=[1,2,3],targets=h.*.mlp.*,flag=true},dce",
        "test-opts{rank=none}",
        "test-opts{rank=8,method=svd}",
        'test-opts{targets="a,b"}',
        "fold-constants{params=true,max_numel=10}",
    ],
)
def test_pipeline_text_round_trips(text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert str(parse_pipeline(str(p))) == text


def test_options_are_typed():
    p = parse_pipeline("test-opts{hidden=[8],ratio=1,rank=3,flag=yes}").passes[0]
    assert p.hidden == (8,) and p.ratio == 1.0 and p.rank == 3 and p.flag is True
    assert isinstance(p.ratio, float)


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("cse,lowrnk{ratio=0.5}")
    e = info.value
    assert "unknown pass 'lowrnk' at column 5" in e.message
    assert "available passes:" in e.hint and "cse" in e.hint and "fold-constants" in e.hint


def test_bad_options_list_what_is_allowed():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("test-opts{methd=svd}")
    assert "has no option 'methd'" in info.value.message
    assert "method: svd|asvd|whitened" in info.value.hint and "ratio: float" in info.value.hint
    with pytest.raises(PipelineError, match="'qr' is not one of svd, asvd, whitened"):
        parse_pipeline("test-opts{method=qr}")
    with pytest.raises(PipelineError, match="'half' is not a float"):
        parse_pipeline("test-opts{ratio=half}")
    with pytest.raises(PipelineError, match="ratio must be in"):
        parse_pipeline("test-opts{ratio=2}")
    with pytest.raises(PipelineError, match="given twice"):
        parse_pipeline("test-opts{ratio=0.1,ratio=0.2}")
    with pytest.raises(PipelineError, match="expected"):
        parse_pipeline("cse{")


def test_make_pass_and_str_of_a_pass():
    p = make_pass("test-opts", method="asvd")
    assert str(p) == "test-opts{method=asvd}"
    with pytest.raises(PipelineError, match="has no option 'bogus'"):
        make_pass("test-opts", bogus=1)


def test_third_party_passes_load_from_entry_points(monkeypatch):
    @dataclass(frozen=True)
    class Plugin(Pass):
        name = "plugin-pass"

        def run(self, program, ctx):
            return PassResult(program, False)

    class EP:
        name = "plugin-pass"
        value = "thirdparty:Plugin"

        def load(self):
            return Plugin

    class Broken(EP):
        name = "broken-pass"

        def load(self):
            raise ImportError("no module named thirdparty")

    monkeypatch.setattr(reg, "_loaded", False)
    monkeypatch.setattr(
        reg, "entry_points", lambda group: [EP(), Broken()] if group == "splice.passes" else []
    )
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    monkeypatch.setattr(reg, "_entry_point_errors", {})
    assert "plugin-pass" in available_passes()
    assert str(parse_pipeline("plugin-pass,cse")) == "plugin-pass,cse"
    with pytest.raises(PipelineError, match="plug-in failed to load: ImportError"):
        parse_pipeline("broken-pass")
