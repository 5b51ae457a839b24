"""Shared fixtures: seeded RNG, captured real architectures (once per session), IR helpers."""

from __future__ import annotations

import difflib
import functools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPLICE_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))

import splice
from splice import models
from splice.ir import Program, verify
from splice.ir.meta import dtype_from_name
from splice.passes import VerifyEach, parse_pipeline

ARCHS = ["gpt2", "llama", "bert", "vit", "mixtral", "convnet"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@functools.cache
def _model(name: str):
    return models.FACTORIES[name]()


@functools.cache
def _captured(name: str):
    model, args = _model(name)
    return splice.capture(model, args)


@functools.cache
def _captured_batch(name: str, batch: int):
    """(Program, example inputs) of an architecture captured at batch size ``batch``."""
    model, args = models.FACTORIES[name](batch=batch)
    return splice.capture(model, args), args


@pytest.fixture
def arch_model():
    """(name) -> (eager model, example inputs); cached per session."""
    return _model


@pytest.fixture
def captured():
    """(name) -> a *copy* of the captured Program of a small real architecture."""
    return lambda name: _captured(name).copy()


def first_output(out):
    """The first tensor of a model's output (ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out[0]


def ir(text: str, **weights: torch.Tensor):
    """Parse a program written in the text form; weights by name (dots written as __)."""
    return splice.parse_ir(text, {k.replace("__", "."): v for k, v in weights.items()})


@pytest.fixture(scope="session")
def need_edge() -> None:
    """The aarch64 edge target: qemu-user, the aarch64 root and the cross compiler. Skips
    without them, or fails when SPLICE_REQUIRE_QEMU=1 (``.ci/run`` sets it)."""
    from splice.runtime import edge

    reason = edge.why_unavailable()
    if reason is None and shutil.which("aarch64-linux-gnu-gcc") is None:
        reason = "aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu)"
    if reason is None:
        return
    if os.environ.get("SPLICE_REQUIRE_QEMU") == "1":
        pytest.fail(f"SPLICE_REQUIRE_QEMU=1 but {reason}")
    pytest.skip(reason)


class SmallMLP(torch.nn.Module):
    """4 rows: the weight matmul stays a TIR function (the C GEMM takes MIN_ROWS or more)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l(x))


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A captured SmallMLP with its own tuning cache: (program, model, x, tmp_path)."""
    monkeypatch.setenv("SPLICE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = SmallMLP().eval()
    x = torch.randn(4, 64)
    return splice.capture(model, (x,)), model, x, tmp_path


def seeded_weights(text: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic values for every weight a text program declares (``weight @n : spec``),
    in declaration order from one ``torch.Generator`` seeded with ``seed``: standard normal
    floats, zeros for other dtypes."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("weight @"):
            continue
        name, spec = line.removeprefix("weight @").split(" : ", 1)
        dtype_name, dims = spec.split("[", 1)
        shape = [int(d) for d in dims.split("]", 1)[0].split(",") if d.strip()]
        dtype = dtype_from_name(dtype_name)
        out[name] = (
            torch.randn(shape, generator=g).to(dtype)
            if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype)
        )
    return out


def _normalised(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def check_pass(
    pipeline: str,
    before_text: str,
    expected_text: str,
    weights: Mapping[str, torch.Tensor] | None = None,
    **run: Any,
) -> Program:
    """Run ``pipeline`` on the program ``before_text`` and pin its printed result.

    ``before_text`` is splice's text IR; ``weights`` maps weight names (dotted) to tensors
    (default: :func:`seeded_weights` of the text). The pipeline string is parsed as
    ``splice opt`` does and run with :class:`VerifyEach` (``run`` goes to
    :meth:`Pipeline.run`: ``ctx``, ``sample_inputs``). The result must verify, print as
    ``expected_text`` (leading/trailing whitespace and indentation of each line are not
    compared; a mismatch fails with a unified diff) and read back from its own text to the
    same text. Returns the resulting Program, for numeric checks.
    """
    if weights is None:
        weights = seeded_weights(before_text)
    program = splice.parse_ir(before_text, dict(weights))
    result = parse_pipeline(pipeline).run(program, instruments=[VerifyEach()], **run).program
    verify(result)
    got = splice.print_ir(result)
    if _normalised(got) != _normalised(expected_text):
        diff = difflib.unified_diff(
            _normalised(expected_text), _normalised(got), "expected", "got", lineterm=""
        )
        pytest.fail(f"{pipeline} printed an unexpected program:\n" + "\n".join(diff))
    again = splice.print_ir(splice.parse_ir(got, result.weights))
    assert again == got, "the result does not read back from its own text"
    return result


def assert_same_graphs(a: Program, b: Program) -> None:
    """Two captures of one dynamic model are the same program: the same graphs, node for
    node, with the same locations and specs, and the same path, trace and cond counts."""
    from splice.ir import meta as M
    from splice.ir.program import iter_graphs

    ga, gb = list(iter_graphs(a)), list(iter_graphs(b))
    assert [n for n, _ in ga] == [n for n, _ in gb]
    for (_, x), (_, y) in zip(ga, gb):
        assert x.code == y.code
        for u, v in zip(x.graph.nodes, y.graph.nodes):
            assert (M.loc(u), M.get_spec(u)) == (M.loc(v), M.get_spec(v))
    for key in ("paths", "traces", "conds"):
        assert a.attrs[key] == b.attrs[key]
