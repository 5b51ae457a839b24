"""Parts that are the same computation on different weights share one compiled library."""

from __future__ import annotations

import json

import torch
from torch import nn

import splice
from splice.ir.explore import cond_trace, eager_decisions


class GatedBlocks(nn.Module):
    """Four gated conv + batch-norm blocks of one shape: four twins per side of a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            for _ in range(4)
        )
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in self.blocks:
                b[1].running_mean.copy_(torch.randn(4, generator=g))
                b[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            if x[0, i, 0, 0] > 0:
                x = x + block(x)
        return x


def test_twin_parts_share_a_library_with_their_own_weights(tmp_path):
    model = GatedBlocks().eval()
    g = torch.Generator().manual_seed(1)
    inputs = []
    for k in range(5):
        x = torch.randn(1, 4, 6, 6, generator=g)
        x[0, :, 0, 0] = torch.tensor([1.0 if (k >> i) & 1 else -1.0 for i in range(4)]) * 50
        inputs.append((x,))
    program = splice.capture_dynamic(model, inputs[0])
    art = splice.compile(program, "host", samples=[inputs[0]], output=tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    parts = manifest["parts"]
    libs = {p["library"] for p in parts}
    assert len(libs) < len(parts)
    by_lib: dict[str, list[dict]] = {}
    for p in parts:
        by_lib.setdefault(p["library"], []).append(p)
    twins = [ps for ps in by_lib.values() if len(ps) > 1]
    assert twins
    # each twin passes its own block's weights (buffers included) to the shared library
    for ps in twins:
        assert len({tuple(p["params"]) for p in ps}) == len(ps)
    assert all(p["check_max_abs_diff"] is None or p["check_max_abs_diff"] < 1e-4 for p in parts)
    m = splice.load(art.path)
    seen = set()
    for x in inputs:
        with torch.no_grad():
            want = model(*x)
        torch.testing.assert_close(m(*x), want, atol=1e-5, rtol=1e-5)
        trace = [t[-1] for t in m.last_trace]
        assert trace == cond_trace(eager_decisions(model, x))
        seen.add(tuple(trace))
    assert len(seen) == 5
