"""Full garbage collections deferred during capture_dynamic (splice.ir.explore_gc).

The thresholds are raised while the explorer traces (seen from inside the model's forward)
and restored exactly afterwards: after a capture that returns, one that raises, a nested
one (one capture per input signature), and with unusual thresholds set by the caller.
A capture under the deferral gives the same program as one without it, and repeated
captures in one process leave the collector as they found it.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import assert_same_graphs
from torch import nn

from splice.errors import CaptureError
from splice.ir import explore_gc
from splice.ir.explore import capture_dynamic
from splice.ir.explore_gc import DEFERRED_THRESHOLD2, full_collections_deferred
from splice.models_dynamic import SkipNet

_SEEN: list[tuple[int, ...]] = []  # not an attribute: capture restores the modules'


class _Gated(nn.Module):
    """Two sequential gates; records the collector's thresholds each time forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _SEEN.append(gc.get_threshold())
        if x.sum() > 0:
            x = self.a(x)
        if x.mean() > 0:
            x = x + self.b(x)
        return x


class _FloatDecision(nn.Module):
    """Turns a float tensor into a Python number: capture_dynamic refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum())


@pytest.fixture
def thresholds():
    """Unusual thresholds for the test, the process's own restored afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(777, 13, 17)
    try:
        yield (777, 13, 17)
    finally:
        gc.set_threshold(*before)


def test_thresholds_raised_inside_and_restored_after(thresholds):
    _SEEN.clear()
    p = capture_dynamic(_Gated(), (torch.randn(2, 4),))
    assert p.attrs["conds"] == 2
    assert _SEEN, "forward never ran"
    assert all(s == (777, 13, DEFERRED_THRESHOLD2) for s in _SEEN)
    assert gc.get_threshold() == thresholds
    assert gc.isenabled()


def test_thresholds_restored_after_a_capture_that_raises(thresholds):
    with pytest.raises(CaptureError):
        capture_dynamic(_FloatDecision(), (torch.randn(3),))
    assert gc.get_threshold() == thresholds
    with pytest.raises(ZeroDivisionError), full_collections_deferred():
        assert gc.get_threshold()[2] == DEFERRED_THRESHOLD2
        1 / 0  # noqa: B018
    assert gc.get_threshold() == thresholds


def test_nested_and_signature_captures_restore(thresholds):
    with full_collections_deferred():
        with full_collections_deferred():
            assert gc.get_threshold() == (777, 13, DEFERRED_THRESHOLD2)
        assert gc.get_threshold() == (777, 13, DEFERRED_THRESHOLD2)
    assert gc.get_threshold() == thresholds
    m = _Gated()
    capture_dynamic(m, (torch.randn(2, 4),), signatures=[(torch.randn(3, 4),)])
    assert gc.get_threshold() == thresholds


def test_automatic_collection_off_is_left_off():
    before = gc.get_threshold()
    try:
        gc.set_threshold(0, 10, 10)  # threshold 0: CPython collects only when asked
        with full_collections_deferred():
            assert gc.get_threshold() == (0, 10, 10)
        assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_same_program_with_and_without_the_deferral(monkeypatch):
    torch.manual_seed(0)
    model = SkipNet(channels=8, blocks=4).eval()
    x = torch.randn(1, 8, 8, 8)
    deferred = capture_dynamic(model, (x,))
    monkeypatch.setattr(explore_gc, "DEFERRED_THRESHOLD2", 0)  # max(t2, 0): no change
    plain = capture_dynamic(model, (x,))
    assert deferred.attrs["conds"] == plain.attrs["conds"] == 4
    assert_same_graphs(deferred, plain)


def test_repeated_captures_leave_the_collector_as_found():
    before = gc.get_threshold()
    for _ in range(4):
        m = _Gated()
        capture_dynamic(m, (torch.randn(2, 4),))
        gc.collect()
        assert gc.get_threshold() == before
        assert gc.isenabled()
