"""capture_dynamic joins paths after each decision: linear traces, one cond per site.

Each model is compared with eager PyTorch on inputs that take different paths; the
branch trace of the joined program (through the ``branches`` pass and the host program)
is compared with eager's decisions.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import assert_same_graphs
from torch import nn

import splice
from splice.errors import CaptureError
from splice.ir import explore, verify
from splice.ir.explore import capture_dynamic, cond_trace, eager_decisions
from splice.ir.program import iter_graphs
from splice.passes.branches import is_cond, split_program
from splice.runtime import host as H


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def n_conds(program) -> int:
    return sum(1 for _, gm in iter_graphs(program) for n in gm.graph.nodes if is_cond(n))


def n_nodes(program) -> int:
    return sum(len(gm.graph.nodes) for _, gm in iter_graphs(program))


class Gates(nn.Module):
    """``n`` sequential gates: ``if x[0, i] > 0: x = x + block_i(x)`` (blocks leave the
    first ``n`` coordinates alone, so each gate is set by one input coordinate)."""

    def __init__(self, n: int, dim: int | None = None):
        super().__init__()
        dim = dim or n + 4
        self.n = n
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))
        self.gates = nn.ModuleList(nn.Linear(dim, 1) for _ in range(n))
        self.head = nn.Linear(dim, 3)
        with torch.no_grad():
            for i, (b, g) in enumerate(zip(self.blocks, self.gates)):
                b.weight[:n].zero_()
                b.bias[:n].zero_()
                g.weight.zero_()
                g.weight[0, i] = 1.0
                g.bias.zero_()

    def forward(self, x):
        for block, gate in zip(self.blocks, self.gates):
            if gate(x) > 0:
                x = x + torch.tanh(block(x))
        return self.head(x)


def gate_inputs(n: int, dim: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        x = torch.randn(1, dim, generator=g)
        signs = torch.tensor([1.0 if (k >> (i % 8)) & 1 else -1.0 for i in range(n)])
        x[0, :n] = signs * (0.5 + torch.rand(n, generator=g))
        out.append((x,))
    return out


def check_eager(program, model, inputs) -> set[tuple[bool, ...]]:
    paths = set()
    for x in inputs:
        with torch.no_grad():
            want = model(*x)
        assert close(program(*x), want)
        paths.add(tuple(cond_trace(eager_decisions(model, x))))
    return paths


@pytest.fixture(scope="module")
def gates_captured():
    out = {}
    for n in (3, 9, 18):
        torch.manual_seed(n)
        m = Gates(n).eval()
        out[n] = (m, capture_dynamic(m, gate_inputs(n, n + 4, 1)[0]))
    return out


@pytest.mark.parametrize("n", [3, 9, 18])
def test_sequential_gates_join_linearly(gates_captured, n):
    m, p = gates_captured[n]
    verify(p)
    assert p.attrs["traces"] == n + 1
    assert p.attrs["conds"] == n_conds(p) == n
    assert p.attrs["paths"] == 2**n
    paths = check_eager(p, m, gate_inputs(n, n + 4, 8, seed=n))
    assert len(paths) >= 5


def test_program_size_grows_linearly_with_the_gates(gates_captured):
    size = {n: n_nodes(p) for n, (_, p) in gates_captured.items()}
    per_gate = (size[9] - size[3]) / 6
    assert per_gate > 0
    assert size[18] - size[9] == per_gate * 9


def test_gates_through_branches_and_the_host_program(tmp_path):
    torch.manual_seed(1)
    m = Gates(3).eval()
    inputs = gate_inputs(3, 7, 8, seed=1)
    p = capture_dynamic(m, inputs[0])
    split, stats = split_program(p)
    assert stats["branches"] == 3
    art = splice.compile(p, "host", output=tmp_path / "g.artifact", samples=[inputs[0]])
    cm = splice.load(art.path)
    traces = set()
    for x in inputs:
        with torch.no_grad():
            want = m(*x)
            assert torch.allclose(split(*x), p(*x))
        assert close(cm(*x), want)
        eager = cond_trace(eager_decisions(m, x))
        assert [t for _, t in cm.last_trace] == eager
        traces.add(tuple(eager))
    assert len(traces) == 8
    # every part was reached (and checked) when the compiler ran the host program
    assert all(part["check_max_abs_diff"] is not None for part in cm.manifest["parts"])


def test_host_explorer_reaches_every_part_of_many_gates():
    """Example inputs for the parts come from forcing the host program's branches: with
    joined gates, one run per branch side reaches every part (not 2**n runs)."""
    torch.manual_seed(2)
    m = Gates(12).eval()
    x = gate_inputs(12, 16, 1)[0]
    split, _ = split_program(capture_dynamic(m, x))
    host, parts = H.build_host(split)
    runner = H.HostProgram(
        host, {n: H.eager_part(i, split.weights) for n, i in parts.items()}, split.weights
    )
    seen = H.explore_part_inputs(runner, x, max_paths=64)
    assert set(seen) == set(parts)


# -- nested ifs, Python state, early exit ------------------------------------------------


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(6, 6)
        self.g = nn.Linear(6, 6)
        self.h = nn.Linear(6, 6)

    def forward(self, x):
        if x[0, 0] > 0:
            x = x + self.f(x)
            if x[0, 1] > 0:
                x = x * self.g(x)
        if x[0, 2] > 0:
            x = x - self.h(x)
        return x.sum(-1), x


def sign_inputs(dim: int, idx: list[int], seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for signs in itertools.product([1.0, -1.0], repeat=len(idx)):
        x = 0.1 * torch.randn(1, dim, generator=g)
        for i, s in zip(idx, signs):
            x[0, i] = 5.0 * s
        out.append((x,))
    return out


def test_nested_ifs_equal_eager_on_every_path():
    torch.manual_seed(3)
    m = Nested().eval()
    with torch.no_grad():
        m.f.weight.mul_(0.01)
        m.g.weight.mul_(0.01)
        m.h.weight.mul_(0.01)
    inputs = sign_inputs(6, [0, 1, 2], 3)
    p = capture_dynamic(m, inputs[0])
    verify(p)
    for x in inputs:
        with torch.no_grad():
            want = m(*x)
        got = p(*x)
        assert all(close(a, b) for a, b in zip(got, want))
    assert len({tuple(cond_trace(eager_decisions(m, x))) for x in inputs}) >= 5
    assert n_conds(p) >= 3


class PythonFlag(nn.Module):
    """A branch sets a Python flag that a later branch reads: joining the first branch
    would run ``+ 5`` where eager runs ``- 3``."""

    def forward(self, x):
        flag = False
        if x[0, 0] > 0:
            x = x * 2
            flag = True
        x = x + 1
        if x[0, 1] > 0:
            if flag:
                x = x - 3
            else:
                x = x + 5
        return x


def test_python_state_set_in_a_branch_keeps_the_capture_exact():
    m = PythonFlag().eval()
    inputs = sign_inputs(3, [0, 1], 4)
    p = capture_dynamic(m, inputs[-1])  # the default path: no flag
    for x in inputs:
        with torch.no_grad():
            assert close(p(*x), m(*x))
    assert len({tuple(cond_trace(eager_decisions(m, x))) for x in inputs}) == 4


class OldAlias(nn.Module):
    """``old`` keeps x from before the first branch; only the second branch's untaken side
    reads it. Reading the latest x there would double the first branch's result."""

    def forward(self, x):
        old = x
        if x[0, 0] > 0:
            x = x * 3
        if x[0, 1] > 0:
            x = x + old
        return x


def test_an_alias_that_outlives_a_branch_keeps_the_capture_exact():
    m = OldAlias().eval()
    inputs = sign_inputs(3, [0, 1], 9)
    p = capture_dynamic(m, inputs[-1])  # default path: neither branch
    for x in inputs:
        with torch.no_grad():
            assert close(p(*x), m(*x))
    assert len({tuple(cond_trace(eager_decisions(m, x))) for x in inputs}) == 4


class EarlyExit(nn.Module):
    def __init__(self, exits: int = 4):
        super().__init__()
        self.stages = nn.ModuleList(nn.Linear(8, 8) for _ in range(exits))
        self.heads = nn.ModuleList(nn.Linear(8, 3) for _ in range(exits))

    def forward(self, x):
        for i, (stage, head) in enumerate(zip(self.stages, self.heads)):
            x = torch.relu(stage(x)) + x
            logits = head(x)
            if i < len(self.stages) - 1 and logits[0, 0] > 3.0:
                return logits
        return logits


def test_early_exit_is_in_tail_form_with_linear_traces():
    torch.manual_seed(5)
    m = EarlyExit(4).eval()
    with torch.no_grad():
        for head in m.heads:
            head.weight.zero_()
            head.weight[0, 0] = 1.0
            head.bias.zero_()
        for st in m.stages:
            st.weight.mul_(0.01)
            st.weight[0].zero_()
            st.bias[0] = 1.0  # x[0, 0] grows by 1 per stage
    inputs = []
    for start in (3.5, 2.5, 1.5, 0.5, -2.0):
        x = torch.zeros(1, 8)
        x[0, 0] = start
        inputs.append((x,))
    p = capture_dynamic(m, inputs[-1])
    assert p.attrs["traces"] == 4
    assert n_conds(p) == 3
    paths = check_eager(p, m, inputs)
    assert len(paths) == 4


# -- index decisions ----------------------------------------------------------------------


class TwoRoutedLayers(nn.Module):
    def __init__(self, dim: int = 8, experts: int = 3):
        super().__init__()
        self.routers = nn.ModuleList(nn.Linear(dim, experts) for _ in range(2))
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts)) for _ in range(2)
        )

    def forward(self, x):
        for router, experts in zip(self.routers, self.experts):
            idx = router(x).argmax(-1)
            x = x + experts[idx](x)
        return x


def test_sequential_index_decisions_join():
    torch.manual_seed(6)
    m = TwoRoutedLayers().eval()
    with torch.no_grad():
        for layer, r in enumerate(m.routers):
            r.weight.zero_()
            r.bias.zero_()
            for e in range(3):
                r.weight[e, 3 * layer + e] = 1.0
        for layer in m.experts:
            for e in layer:
                e.weight.mul_(0.01)
                e.weight[:6].zero_()
                e.bias[:6].zero_()
    inputs = []
    for a, b in itertools.product(range(3), range(3)):
        x = 0.1 * torch.randn(1, 8)
        x[0, a] = 2.0
        x[0, 3 + b] = 2.0
        inputs.append((x,))
    p = capture_dynamic(m, inputs[0])
    assert p.attrs["traces"] == 1 + 2 + 2
    assert p.attrs["paths"] == 9
    paths = check_eager(p, m, inputs)
    assert len(paths) == 9


# -- constants, numpy ----------------------------------------------------------------------


class ConstantFlags(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        is_output = torch.tensor(1)
        limit = torch.zeros(1) + 2
        if is_output:
            x = self.lin(x)
        if limit.sum() > 5:
            x = x * 100
        if x.sum() > 0:  # the one data-dependent decision
            x = x - 1
        return x


def test_constant_tensors_are_folded_not_explored():
    torch.manual_seed(7)
    m = ConstantFlags().eval()
    x = torch.randn(1, 4)
    p = capture_dynamic(m, (x,))
    assert n_conds(p) == 1
    assert p.attrs["traces"] == 2
    for v in (x, -x, 3 * x, -3 * x):
        with torch.no_grad():
            assert close(p(v), m(v))
        assert len(eager_decisions(m, (v,))) == 1


class NoDecisions(nn.Module):
    def forward(self, x):
        if torch.tensor(0):
            return x * 2
        return x + 1


def test_a_model_whose_only_decisions_are_constant_is_plain():
    p = capture_dynamic(NoDecisions(), (torch.ones(2),))
    assert n_conds(p) == 0
    assert torch.equal(p(torch.ones(2)), torch.full((2,), 2.0))


class NumpyChoice(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, 2) for _ in range(3))

    def forward(self, x):
        scores = [x[0, 0], x[0, 1], x[0, 2]]
        k = np.argmax(scores)
        y = self.heads[k](x)
        if (y.sum() > 0).numpy():
            y = y * 2
        return y


def test_numpy_argmax_and_numpy_conversions_are_decisions():
    torch.manual_seed(8)
    m = NumpyChoice().eval()
    inputs = []
    for k in range(3):
        for s in (1.0, -1.0):
            x = torch.zeros(1, 4)
            x[0, k] = 3.0
            x[0, 3] = s
            inputs.append((x,))
    p = capture_dynamic(m, inputs[0])
    assert p.attrs["traces"] == 1 + 2 + 1
    decisions = eager_decisions(m, inputs[0])
    assert [d.domain for d in decisions] == [(0, 1, 2), (False, True)]
    paths = check_eager(p, m, inputs)
    assert len(paths) >= 4


# -- errors -------------------------------------------------------------------------------


class DifferentShapes(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x[:, :2]
        return x


class Anytime(nn.Module):
    """Returns the list of the outputs computed before it stops: its length is the path's."""

    def forward(self, x):
        outs = []
        for _ in range(4):
            x = x + 1
            outs.append(x * 2)
            if x.sum() > 8:
                return outs
        return outs


def test_paths_may_return_different_shapes_and_structures():
    p = capture_dynamic(DifferentShapes(), (torch.ones(1, 4),))
    assert p.variants is not None and len(p.variants["variants"]) == 2
    assert "bool" not in " ".join(p.output_names)  # no predicate leaks into the outputs
    for x in (torch.ones(1, 4), -torch.ones(1, 4)):
        assert torch.equal(p(x), DifferentShapes()(x))
    m = Anytime()
    p = capture_dynamic(m, (torch.ones(1, 2),))
    assert p.attrs["traces"] == 5
    lengths = set()
    for v in (5.0, 3.0, 2.0, 1.0, -3.0):
        x = torch.full((1, 2), v)
        got, want = p(x), m(x)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        lengths.add(len(want))
    assert lengths == {1, 2, 3, 4}


class ShapeFromData(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            y = x[x > 0]
            if y.shape[0] > 2:
                return y[:2].sum() + x
        return x


def test_a_capture_error_inside_a_path_names_the_path_and_not_capture_dynamic():
    with pytest.raises(CaptureError) as e:
        capture_dynamic(ShapeFromData(), (-torch.ones(4),))
    text = str(e.value)
    assert "on the path that decides True" in text
    assert "capture_dynamic(model" not in text


def test_too_many_traces_is_an_error():
    m = Gates(6).eval()
    with pytest.raises(CaptureError, match="more than 4 paths"):
        capture_dynamic(m, gate_inputs(6, 10, 1)[0], max_paths=4)


# -- region traces: an extra path costs its region, not the model -------------------------


def capture_both(model, x):
    """(capture with region traces, capture with full traces only)."""
    fast = capture_dynamic(model, x)
    saved = explore._REGION_TRACES
    explore._REGION_TRACES = False
    try:
        full = capture_dynamic(model, x)
    finally:
        explore._REGION_TRACES = saved
    return fast, full


def assert_same_program(a, b):
    """The same graphs, node for node, with the same locations and specs; ``b`` traced
    every path in full."""
    assert_same_graphs(a, b)
    assert b.attrs["region_traces"] == 0


class SkipGates(nn.Module):
    """SkipNet's form (a gate method, the block indexed from a ModuleList, ``x = x +
    block(x)`` in the loop) with the gates set by input coordinates as in Gates."""

    def __init__(self, n: int):
        super().__init__()
        self.inner = Gates(n)

    def gate(self, i, x):
        return torch.sigmoid(self.inner.gates[i](x))

    def forward(self, x):
        for i, block in enumerate(self.inner.blocks):
            if self.gate(i, x) > 0.5:
                x = x + torch.tanh(block(x))
        return self.inner.head(x)


class BlockDropPolicy(nn.Module):
    """BlockDrop's form: a policy decides every block at once, the loop reads its rows."""

    def __init__(self, n: int):
        super().__init__()
        self.inner = Gates(n)
        self.n = n

    def forward(self, x):
        policy = (x[0, : self.n] > 0).float()
        for i, block in enumerate(self.inner.blocks):
            if policy[i] > 0.5:
                x = x + torch.tanh(block(x))
        return self.inner.head(x)


@pytest.mark.parametrize("cls", [Gates, SkipGates, BlockDropPolicy])
def test_region_traces_stand_for_full_traces(cls):
    """Every extra path is a region trace, and the program is the full traces' one."""
    n = 6
    torch.manual_seed(3)
    m = cls(n).eval()
    inputs = gate_inputs(n, n + 4, 12, seed=3)
    fast, full = capture_both(m, inputs[0])
    assert fast.attrs["traces"] == n + 1
    assert fast.attrs["region_traces"] == n
    assert_same_program(fast, full)
    assert len(check_eager(fast, m, inputs)) >= 5


def test_region_traces_through_the_host_program_equal_eager(tmp_path):
    torch.manual_seed(4)
    m = SkipGates(4).eval()
    inputs = gate_inputs(4, 8, 10, seed=4)
    p = capture_dynamic(m, inputs[0])
    assert p.attrs["region_traces"] == 4
    art = splice.compile(p, "host", output=tmp_path / "s.artifact", samples=[inputs[0]])
    cm = splice.load(art.path)
    traces = set()
    for x in inputs:
        with torch.no_grad():
            want = m(*x)
        assert close(cm(*x), want)
        eager = cond_trace(eager_decisions(m, x))
        assert [t for _, t in cm.last_trace] == eager
        traces.add(tuple(eager))
    assert len(traces) >= 5


class AttributeAcross(nn.Module):
    """A tensor kept in a module attribute across the gates and read after them: after a
    gate, the attribute and ``h`` hold different tensors on one side only."""

    def __init__(self, n: int):
        super().__init__()
        self.inner = Gates(n)

    def forward(self, x):
        h = x * 2
        self.saved = h
        for block, gate in zip(self.inner.blocks, self.inner.gates):
            if gate(h) > 0:
                h = h + torch.tanh(block(h))
        return self.inner.head(h + self.saved)


class ListAcross(nn.Module):
    """A tensor kept in a list across the gates (aliases ``h`` where no gate fired)."""

    def __init__(self, n: int):
        super().__init__()
        self.inner = Gates(n)

    def forward(self, x):
        h = x * 2
        kept = [h]
        for block, gate in zip(self.inner.blocks, self.inner.gates):
            if gate(h) > 0:
                h = h + torch.tanh(block(h))
        return self.inner.head(h - kept[0])


class FlagInBranch(nn.Module):
    """A Python flag set in a branch changes what the later gates do."""

    def __init__(self, n: int):
        super().__init__()
        self.inner = Gates(n)

    def forward(self, x):
        boost = False
        for block, gate in zip(self.inner.blocks, self.inner.gates):
            if gate(x) > 0:
                x = x + torch.tanh(block(x)) * (2.0 if boost else 1.0)
                boost = True
        return self.inner.head(x)


class AttributeFlag(nn.Module):
    """A Python flag kept in a module attribute, set in a branch: the join does not see
    it (module docs), so the capture is only compared with the full traces' one."""

    def __init__(self, n: int):
        super().__init__()
        self.inner = Gates(n)

    def forward(self, x):
        self.boost = False
        for block, gate in zip(self.inner.blocks, self.inner.gates):
            if gate(x) > 0:
                x = x + torch.tanh(block(x)) * (2.0 if self.boost else 1.0)
                self.boost = True
        return self.inner.head(x)


@pytest.mark.parametrize("cls", [AttributeAcross, ListAcross, FlagInBranch, AttributeFlag])
def test_an_unsound_region_join_falls_back_to_the_full_trace(cls):
    n = 4
    torch.manual_seed(5)
    m = cls(n).eval()
    inputs = gate_inputs(n, n + 4, 12, seed=5)
    fast, full = capture_both(m, inputs[0])
    assert_same_program(fast, full)
    if cls is not AttributeFlag:
        assert len(check_eager(fast, m, inputs)) >= 5
