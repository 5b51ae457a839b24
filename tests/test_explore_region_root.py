"""Region traces export a stand-in root, not the model (splice.ir.explore, module docs
"Cost"): what that must keep as it was.

The programs equal the ones captured with full traces only, node for node (locations
included: the model's modules keep their names although the exported root does not hold
them); a model that writes plain attributes in ``forward`` finds them as they were after
the capture, as export leaves the modules under its root; a model that shares one module
under two names takes the model-as-root route and still captures the same program.
"""

from __future__ import annotations

import torch
from conftest import assert_same_graphs
from torch import nn

from splice.ir import explore
from splice.ir import meta as M
from splice.ir.explore import capture_dynamic
from splice.ir.program import iter_graphs


def _full_traces(model: nn.Module, x: torch.Tensor):
    saved = explore._REGION_TRACES
    explore._REGION_TRACES = False
    try:
        return capture_dynamic(model, x)
    finally:
        explore._REGION_TRACES = saved


class Counting(nn.Module):
    """Gated blocks whose forward writes plain attributes (a counter, a list of notes)."""

    def __init__(self, n: int, dim: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n))
        self.gates = nn.ModuleList(nn.Linear(dim, 1) for _ in range(n))
        self.calls = 0
        self.notes: list[str] = ["start"]

    def forward(self, x):
        self.calls += 1
        for i, (block, gate) in enumerate(zip(self.blocks, self.gates)):
            if gate(x) > 0:
                self.notes.append(f"ran {i}")
                x = x + block(x)
        return x


def test_region_traces_name_modules_and_restore_attributes():
    torch.manual_seed(11)
    m = Counting(4).eval()
    x = torch.randn(1, 6)
    fast = capture_dynamic(m, x)
    assert fast.attrs["region_traces"] == 4
    assert (m.calls, m.notes) == (0, ["start"])
    full = _full_traces(m, x)
    assert (m.calls, m.notes) == (0, ["start"])
    assert_same_graphs(fast, full)
    # every block runs only on paths that are region traces (the first path skips them
    # all): their nodes still name their modules
    located = {M.loc(n).module_path for _, gm in iter_graphs(fast) for n in gm.graph.nodes}
    assert {f"blocks.{i}.0" for i in range(4)} <= located


class Shared(nn.Module):
    """One gate module under two names: export tracks access paths for shared modules,
    so region traces keep the model as the exported root."""

    def __init__(self, n: int, dim: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))
        self.gate = nn.Linear(dim, 1)
        self.also_gate = self.gate

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            g = self.gate if i % 2 == 0 else self.also_gate
            if g(x) > 0:
                x = x + torch.tanh(block(x))
        return x


def test_shared_modules_keep_the_model_as_root():
    torch.manual_seed(5)
    m = Shared(3).eval()
    x = torch.randn(1, 6)
    assert explore._module_paths(m) is None
    fast = capture_dynamic(m, x)
    assert_same_graphs(fast, _full_traces(m, x))
    g = torch.Generator().manual_seed(5)
    for _ in range(8):
        y = torch.randn(1, 6, generator=g)
        with torch.no_grad():
            assert torch.allclose(fast(y), m(y), atol=1e-6)
