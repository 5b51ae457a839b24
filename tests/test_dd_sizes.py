"""Data-dependent sizes: nonzero()/where(mask) token dispatch captured densely with a mask
(splice.ir.dd_sizes) -- exact on every routing, compiled by TVM, refused where not row-wise."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import splice
from splice.errors import CaptureError
from splice.ir.dd_sizes import DenseSelections, dense_selections_in
from splice.models_dynamic import SELECT_ZOO, DynamicCase

NAMES = list(SELECT_ZOO)
HERE = __file__


@pytest.fixture(scope="module")
def cases() -> dict[str, DynamicCase]:
    return {name: factory() for name, factory in SELECT_ZOO.items()}


@pytest.fixture(scope="module")
def programs(cases: dict[str, DynamicCase]) -> dict[str, splice.Program]:
    return {name: splice.capture(c.model, c.example) for name, c in cases.items()}


def _eager(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def _line(fn, text: str) -> str:
    """``file:line`` of the line of ``fn``'s source that contains ``text``."""
    lines, first = inspect.getsourcelines(fn)
    (k,) = [i for i, ln in enumerate(lines) if text in ln]
    return f"{HERE}:{first + k}"


# --------------------------------------------------------------------------------------
# the zoo's two models: capture, round trip, compile


def test_branch_inputs_cover_empty_and_full_selections(cases: dict[str, DynamicCase]) -> None:
    """The inputs exercise what the dense capture must get right: experts with no token,
    every expert with tokens, one expert with every token; tokens leaving at every layer,
    the loop breaking before the first layer; tokens dropped at capacity."""
    moe = cases["switch_moe"]
    per_input = []
    for (x,) in moe.branch_inputs:
        with torch.no_grad():
            routes = {d.outcome for d in moe.model.probe(x)[1]}
        per_input.append(routes)
    assert {0, 1, 2, 3} in per_input
    assert any(len(r) == 1 for r in per_input)
    assert any(0 < len(r) < 4 and len(r) != 1 for r in per_input)
    exits = cases["token_early_exit"]
    with torch.no_grad():
        runs = [exits.model.probe(*i)[1] for i in exits.branch_inputs]
    assert any(all(d.outcome for d in r) and len(r) == 6 for r in runs)  # all leave at once
    assert any(not any(d.outcome for d in r) for r in runs)  # none ever leaves
    capacity = cases["capacity_moe"]
    with torch.no_grad():
        kept = [{d.outcome for d in capacity.model.probe(*i)[1]} for i in capacity.branch_inputs]
    assert {0, 1, 2, 3} in kept and any(-1 in k and 3 not in k for k in kept)


@pytest.mark.parametrize("name", NAMES)
def test_capture_is_static_and_equals_eager(
    name: str, cases: dict[str, DynamicCase], programs: dict[str, splice.Program]
) -> None:
    case, program = cases[name], programs[name]
    text = splice.print_ir(program)
    assert "nonzero" not in text and "u0" not in text  # static shapes, no unbacked size
    splice.verify(program)
    for inputs in case.branch_inputs:
        ref = _eager(case.model, *inputs)
        with torch.no_grad():
            got = program(*inputs)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_text_round_trip(
    name: str, cases: dict[str, DynamicCase], programs: dict[str, splice.Program]
) -> None:
    program = programs[name]
    text = splice.print_ir(program)
    parsed = splice.parse_ir(text, program.weights)
    assert splice.print_ir(parsed) == text
    splice.verify(parsed)
    for inputs in cases[name].branch_inputs:
        with torch.no_grad():
            torch.testing.assert_close(parsed(*inputs), program(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_equals_eager(
    name: str,
    cases: dict[str, DynamicCase],
    programs: dict[str, splice.Program],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    case = cases[name]
    out = tmp_path_factory.mktemp(f"dd-{name}") / f"{name}.artifact"
    compiled = splice.compile(programs[name].copy(), "host", output=out).load()
    for inputs in case.branch_inputs:
        ref = _eager(case.model, *inputs)
        torch.testing.assert_close(compiled(*inputs), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_token_count(name: str, cases: dict[str, DynamicCase]) -> None:
    """With a dynamic number of tokens the selection's length stays symbolic (no
    specialisation): one capture serves every token count."""
    case = cases[name]
    dims = {"x": {0: Dim("T", min=2, max=64)}}
    program = splice.capture(case.model, case.example, dynamic_shapes=dims)
    g = torch.Generator().manual_seed(5)
    for t in (3, 11, 40):
        x = 3 * torch.randn(t, case.example[0].shape[1], generator=g)
        with torch.no_grad():
            torch.testing.assert_close(program(x), case.model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# other dispatch forms


class _MaskRows(nn.Module):
    """``out[mask] = f(x[mask])`` with a bool mask, skipped by an early return when
    ``x[mask].shape[0] == 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.RMSNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, 0] > 0
        out = x.clone()
        rows = x[mask]
        if rows.shape[0] == 0:
            return out
        out[mask] = torch.tanh(self.fc(self.norm(rows)))
        return out


class _Top2Loop(nn.Module):
    """Mixtral's eager expert loop: top-2 routing, ``torch.where`` on a ``[k, T]`` mask
    (coordinates with repeats), ``routing_weights[top_x, idx, None]``, ``index_add_``."""

    def __init__(self, dim: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.gate(x), dim=-1)
        weights, selected = torch.topk(weights, 2, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx, top_x = torch.where(mask[e])
            current = x[None, top_x].reshape(-1, x.shape[-1])
            y = F.silu(expert(current)) * weights[top_x, idx, None]
            out.index_add_(0, top_x, y)
        return out


class _ScatterAdd(nn.Module):
    """``nonzero`` + ``index_put_`` (accumulate) and ``scatter_add_`` along dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.sum(-1) > 0).nonzero().flatten()
        y = self.fc(x[idx])
        a = torch.zeros_like(x).index_put_((idx,), y, accumulate=True)
        b = torch.zeros_like(x)
        b.scatter_add_(0, idx.unsqueeze(-1).expand(-1, x.shape[-1]), 2 * y)
        return a + b


class _SizesFromCount(nn.Module):
    """The selected count passed back to torch as a size: new_zeros, view, reshape, len."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        n = idx.numel()
        rows = x[idx] * (x.new_zeros(n, x.shape[1]) + 1.0)
        y = rows.view(idx.shape[0], 2, 2).flip(-1).reshape(len(idx), 4)
        out = torch.zeros_like(x)
        out[idx] = torch.zeros(n, x.shape[1]) + y
        return out


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (_SizesFromCount(), [torch.randn(6, 4), -torch.rand(6, 4)]),
        (_MaskRows(), [torch.randn(7, 8), -torch.rand(7, 8), torch.rand(7, 8)]),
        (_Top2Loop(), [torch.randn(5, 8), torch.randn(9, 8) * 3]),
        (_ScatterAdd(), [torch.randn(5, 6), -torch.rand(5, 6)]),
    ],
    ids=["sizes_from_count", "mask_rows", "top2_loop", "scatter_add"],
)
def test_other_dispatch_forms_equal_eager(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    model.eval()
    for x in inputs:
        program = splice.capture(model, (x,))
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
        text = splice.print_ir(program)
        assert splice.print_ir(splice.parse_ir(text, program.weights)) == text
    # one capture serves every input of its shape (the routing is data, not structure)
    program = splice.capture(model, (inputs[0],))
    for x in inputs:
        if x.shape == inputs[0].shape:
            with torch.no_grad():
                torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def test_mixtral_style_loop_compiles(tmp_path: Path) -> None:
    """The non-identity path (coordinates of a 2-D mask, repeated) keeps a masked
    index_add_, which TVM compiles."""
    model = _Top2Loop().eval()
    x = torch.randn(6, 8)
    program = splice.capture(model, (x,))
    compiled = splice.compile(program, "host", output=tmp_path / "top2.artifact").load()
    for x2 in (x, torch.randn(6, 8) * 4):
        torch.testing.assert_close(compiled(x2), _eager(model, x2), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# loops over a nonzero() result: transformers' eager experts


class _EagerExperts(nn.Module):
    """transformers' ``MixtralExperts.forward`` (the ``"eager"`` experts implementation of
    transformers 5), as written there: a loop over ``expert_hit = (...).nonzero()`` with a
    ``continue`` on a static value, ``torch.where`` on a ``[k, T]`` mask, stacked expert
    weights indexed by the loop's row, ``index_add_`` back."""

    def __init__(self, experts: int = 4, d: int = 8, inner: int = 12) -> None:
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, d) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(experts, d, inner) * 0.2)
        self.act_fn = nn.SiLU()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = self.act_fn(gate) * up
            current = F.linear(current, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


class _EagerMoE(nn.Module):
    """Router + top-2 + renormalisation around :class:`_EagerExperts`."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = _EagerExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(F.softmax(self.router(x), -1), 2, dim=-1)
        return x + self.experts(x, idx, w / w.sum(-1, keepdim=True))


class _SomeHits(nn.Module):
    """Only experts with two tokens or more run: an iteration whose row is not selected
    can still have tokens, so its write back must be gated by the loop, not only by its
    own selection."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = x[:, :3].argmax(-1)
        hit = F.one_hot(route, 3).sum(0).gt(1).nonzero()
        out = torch.zeros_like(x)
        for e in hit:
            idx = torch.where(route == e)[0]
            out.index_add_(0, idx, self.experts[e](x[idx]))
        return out


def test_transformers_eager_experts_loop_is_exact(tmp_path: Path) -> None:
    model = _EagerMoE().eval()
    idle = _EagerMoE().eval()
    with torch.no_grad():
        idle.router.weight[2:] = -5.0  # experts 2 and 3 never get a token
    x = torch.randn(6, 8)
    for m in (model, idle):
        program = splice.capture(m, (x,))
        for xi in (x, torch.randn(6, 8), 5 * torch.randn(6, 8)):
            with torch.no_grad():
                torch.testing.assert_close(program(xi), m(xi), rtol=1e-5, atol=1e-5)
    compiled = splice.compile(program, "host", output=tmp_path / "eager.artifact").load()
    for xi in (x, 5 * torch.randn(6, 8)):
        torch.testing.assert_close(compiled(xi), _eager(idle, xi), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_transformers_moe_with_eager_experts(name: str, tmp_path: Path) -> None:
    """transformers' own Mixtral / Qwen2-MoE with ``_experts_implementation="eager"`` (the
    loop over ``nonzero()``), captured as transformers writes it (MoE recognition off):
    dense, static, exact; Mixtral also compiles."""
    from splice import models
    from splice.ir import moe_capture

    model, args = getattr(models, name)()
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            m.config._experts_implementation = "eager"
    with moe_capture.disabled():
        program = splice.capture(model, args)
    text = splice.print_ir(program)
    assert "grouped_mm" not in text and "nonzero" not in text
    other = (torch.randint(0, 128, args[0].shape, generator=torch.Generator().manual_seed(1)),)
    for inputs in (args, other):
        with torch.no_grad():
            ref = model(*inputs).logits
            got = program(*inputs)
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if name == "mixtral":
        compiled = splice.compile(program, "host", output=tmp_path / "m.artifact").load()
        for inputs in (args, other):
            got = compiled(*inputs)
            got = got[0] if isinstance(got, tuple) else got
            ref = _eager(model, *inputs).logits
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_loop_writes_are_gated_by_their_row() -> None:
    model = _SomeHits().eval()
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(5, 4, generator=g) for _ in range(8)]
    program = splice.capture(model, (inputs[0],))
    counts = set()
    for x in inputs:
        counts |= set(F.one_hot(x[:, :3].argmax(-1), 3).sum(0).tolist())
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
    assert 1 in counts  # some expert had exactly one token: its iteration was gated off


# --------------------------------------------------------------------------------------
# refused: never silently wrong


class _SumRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        return x[idx].sum(0)


class _ReturnRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        return torch.relu(x[idx])


class _RowsAsReduction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x[:, 0].gt(0).nonzero().squeeze(-1)
        g = x[idx]
        return torch.matmul(g.t(), g)


class _CountAsNumber(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        return x / idx.numel()


class _CumsumRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        out = torch.zeros_like(x)
        out[idx] = torch.cumsum(x[idx], dim=0)
        return out


class _MixesFullSize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        out = torch.zeros_like(x)
        out[idx] = x[idx] + x
        return out


class _LoopOverRows(nn.Module):
    """Iterates over the gathered rows themselves (not over a selection's coordinates)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        out = torch.zeros_like(x)
        for row in x[idx]:
            out = out + row
        return out


class _LoopValueEscapes(nn.Module):
    """A value made in one iteration of a loop over hits is used in the next."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = x[:, :3].argmax(-1)
        hit = F.one_hot(route, 3).sum(0).gt(0).nonzero()
        out = torch.zeros_like(x)
        for e in hit:
            out = out + self.experts[e](x)
        return out


class _CountCompared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.where(x[:, 0] > 0)[0]
        if idx.numel() > 3:
            return x
        return -x


_WHY = "cannot capture `{op}` on the rows a data-dependent selection (nonzero/where(mask)) picked: {why}"


@pytest.mark.parametrize(
    ("model", "message", "line"),
    [
        (
            _SumRows,
            _WHY.format(op="sum", why="it reduces over the selected rows (dim 0)"),
            "x[idx].sum(0)",
        ),
        (
            _ReturnRows,
            "the model returns rows that nonzero()/where(mask) selected (output 0): their "
            "number is data-dependent",
            "torch.relu(x[idx])",
        ),
        (
            _RowsAsReduction,
            _WHY.format(
                op="matmul",
                why="it uses the selected rows as the reduction operand of a matrix product",
            ),
            "torch.matmul(g.t(), g)",
        ),
        (
            _CountAsNumber,
            "the number of rows that nonzero()/where(mask) selected is data-dependent and is "
            "used as a number here (passed to div)",
            "x / idx.numel()",
        ),
        (
            _CumsumRows,
            _WHY.format(op="cumsum", why="it works along the selected rows (dim 0)"),
            "torch.cumsum(x[idx], dim=0)",
        ),
        (
            _MixesFullSize,
            _WHY.format(
                op="add",
                why="it pairs the selected rows with the rows of a full-size tensor position "
                "by position",
            ),
            "x[idx] + x",
        ),
        (
            _LoopOverRows,
            _WHY.format(op="unbind", why="it iterates over the selected rows one by one (dim 0)"),
            "for row in x[idx]:",
        ),
        (
            _LoopValueEscapes,
            "a value computed inside a loop over a nonzero() result is used by add after its "
            "iteration: splice runs that loop once per candidate row, so only what each "
            "iteration writes back through a selection (index_add_, out[idx] = v) is exact",
            "out = out + self.experts[e](x)",
        ),
        (
            _CountCompared,
            "the number of rows that nonzero()/where(mask) selected is data-dependent and is "
            "used as a number here (> 3)",
            "if idx.numel() > 3:",
        ),
    ],
    ids=[
        "sum_rows",
        "return_rows",
        "rows_as_reduction",
        "count",
        "cumsum",
        "full_size",
        "loop_over_rows",
        "loop_value_escapes",
        "count_compared",
    ],
)
def test_not_row_wise_is_refused(model: type[nn.Module], message: str, line: str) -> None:
    with pytest.raises(CaptureError) as info:
        splice.capture(model(), (torch.randn(6, 4),))
    err = info.value
    assert err.message == message
    assert err.where == _line(model.forward, line)
    assert err.hint


def test_returning_the_gathered_rows_names_the_gather() -> None:
    """The outputs check names where the returned rows were last made."""
    with pytest.raises(CaptureError, match=r"\(output 0\)") as info:
        splice.capture(_ReturnRows(), (torch.randn(6, 4),))
    assert "scatter them back" in (info.value.hint or "")


# --------------------------------------------------------------------------------------
# capture_dynamic: the mode entered the way explore's traced forward enters it


@contextlib.contextmanager
def _explore_with_dense_selections(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Wrap every export explore makes in :func:`dense_selections_in` (what its
    ``_trace_path`` does once it enters the mode itself)."""
    import splice.ir.explore as explore

    original = torch.export.export

    @functools.wraps(original)
    def export(model, *args, **kwargs):
        with dense_selections_in(model):
            return original(model, *args, **kwargs)

    monkeypatch.setattr(explore.torch.export, "export", export)
    yield


class _GatedSwitch(nn.Module):
    """A Python branch on a tensor (explored by capture_dynamic) around a Switch layer."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = SELECT_ZOO["switch_moe"]().model
        self.skip = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.moe(x)
        return self.skip(x)


def test_capture_dynamic_with_dense_selections(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _GatedSwitch().eval()
    case = SELECT_ZOO["switch_moe"]()
    with _explore_with_dense_selections(monkeypatch):
        program = splice.capture_dynamic(model, (case.example[0] + 1.0,))
    assert program.attrs.get("paths") == 2
    for (x,) in case.branch_inputs:
        for shift in (1.0, -1.0):
            xi = x + shift
            with torch.no_grad():
                torch.testing.assert_close(program(xi), model(xi), rtol=1e-5, atol=1e-5)


def test_mode_outside_export_is_exact_eagerly() -> None:
    """The dense rewrite run eagerly (no export) gives the model's own results."""
    case = SELECT_ZOO["token_early_exit"]()
    for inputs in case.branch_inputs:
        with torch.no_grad(), DenseSelections() as dense:
            got = dense.check_outputs(case.model(*inputs))
        torch.testing.assert_close(got, _eager(case.model, *inputs), rtol=1e-6, atol=1e-6)
