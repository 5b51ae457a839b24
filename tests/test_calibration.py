"""Calibration statistics equal the ones computed by hand."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.errors import PassError
from splice.passes import PassContext
from splice.passes.analysis import calibrate


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_gram_abs_mean_abs_max_and_raw():
    model = _Two()
    p = splice.capture(model, (torch.randn(5, 4),))
    relu = next(n.name for n in p.graph.nodes if "relu" in str(n.target))
    batches = [(torch.randn(5, 4),), (torch.randn(5, 4),)]
    ctx = PassContext(batches)
    res = ctx.analysis(calibrate, p, nodes=(relu,), stats=("raw", "gram", "abs_mean", "abs_max"))
    acts = torch.cat([torch.relu(model.a(b[0])) for b in batches]).detach()
    s = res[relu]
    assert s.count == 10 and res.batches == 2
    assert torch.allclose(s.matrix(), acts)
    assert torch.allclose(s.gram, acts.double().T @ acts.double())
    assert torch.allclose(s.abs_mean, acts.abs().double().mean(0))
    assert torch.equal(s.abs_max, acts.abs().amax(0))
    assert (
        ctx.analysis(calibrate, p, nodes=(relu,), stats=("raw", "gram", "abs_mean", "abs_max"))
        is res
    )
    # the program itself is not changed by calibrating
    assert p.output_names == ["out"]


def test_calibration_errors():
    p = splice.capture(_Two(), (torch.randn(5, 4),))
    with pytest.raises(PassError, match="needs sample inputs"):
        calibrate(p, PassContext(), nodes=("relu",))
    with pytest.raises(PassError, match="no value %nope"):
        calibrate(p, PassContext([(torch.randn(5, 4),)]), nodes=("nope",))
    with pytest.raises(PassError, match="unknown calibration statistics"):
        calibrate(p, PassContext([(torch.randn(5, 4),)]), nodes=("relu",), stats=("median",))
