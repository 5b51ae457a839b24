"""The dynamic model zoo: every model runs, its ``branch_inputs`` take every outcome of
every data-dependent decision, and no decision sits within ``MIN_MARGIN`` of its threshold.

Which branch ``forward`` took is observed twice: by the model's ``probe`` (which also
reports how far each compared quantity lay from its threshold) and independently by
forward hooks on the submodules that only run on one side of a branch.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from splice import models_dynamic as md
from splice.models_dynamic import MIN_MARGIN, ZOO, Decision, DynamicCase

NAMES = list(ZOO)


@pytest.fixture(scope="module")
def cases() -> dict[str, DynamicCase]:
    return {name: factory() for name, factory in ZOO.items()}


def _probe_all(case: DynamicCase) -> list[list[Decision]]:
    with torch.no_grad():
        return [case.model.probe(*inputs)[1] for inputs in case.branch_inputs]


@contextmanager
def _calls(modules: list[nn.Module]) -> Iterator[list[int]]:
    """Yield a list that collects the index of each module in ``modules`` as it is called."""
    seen: list[int] = []
    handles = [
        m.register_forward_hook(lambda *_, i=i: seen.append(i)) for i, m in enumerate(modules)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _run_observed(case: DynamicCase, modules: list[nn.Module]) -> list[list[int]]:
    """For each branch input: indices of ``modules`` that ``forward`` called, in order."""
    out = []
    with torch.no_grad():
        for inputs in case.branch_inputs:
            with _calls(modules) as seen:
                case.model(*inputs)
            out.append(list(seen))
    return out


# --------------------------------------------------------------------------------------
# every model


def test_zoo_lists_six_models() -> None:
    assert NAMES == [
        "early_exit",
        "skipnet",
        "blockdrop",
        "dynamic_depth",
        "routed_moe",
        "shape_branch",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_case_is_well_formed(cases: dict[str, DynamicCase], name: str) -> None:
    case = cases[name]
    assert case.name == name
    assert case.description and "\n" not in case.description
    assert not any(m.training for m in case.model.modules())
    assert len(case.branch_inputs) >= 2
    for inputs in [case.example, *case.branch_inputs]:
        assert isinstance(inputs, tuple)
        assert all(t.dtype == torch.float32 for t in inputs)
    assert all(p.dtype == torch.float32 for p in case.model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_probe_repeats_forward(cases: dict[str, DynamicCase], name: str) -> None:
    case = cases[name]
    with torch.no_grad():
        for inputs in [case.example, *case.branch_inputs]:
            out, decisions = case.model.probe(*inputs)
            assert decisions
            torch.testing.assert_close(case.model(*inputs), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_decisions_are_off_the_knife_edge(cases: dict[str, DynamicCase], name: str) -> None:
    for decisions in _probe_all(cases[name]):
        for d in decisions:
            assert d.margin >= MIN_MARGIN, d


@pytest.mark.parametrize("name", NAMES)
def test_every_boolean_site_takes_both_outcomes(cases: dict[str, DynamicCase], name: str) -> None:
    outcomes: dict[str, set[bool | int]] = defaultdict(set)
    for decisions in _probe_all(cases[name]):
        for d in decisions:
            outcomes[d.site].add(d.outcome)
    for site, seen in outcomes.items():
        if isinstance(next(iter(seen)), bool):
            assert seen == {True, False}, site


@pytest.mark.parametrize("name", NAMES)
def test_decisions_survive_float64(cases: dict[str, DynamicCase], name: str) -> None:
    """The same branches are taken when the whole model runs in float64."""
    case = cases[name]
    model64 = copy.deepcopy(case.model).double()
    with torch.no_grad():
        for inputs in case.branch_inputs:
            d32 = [(d.site, d.outcome) for d in case.model.probe(*inputs)[1]]
            d64 = [(d.site, d.outcome) for d in model64.probe(*(t.double() for t in inputs))[1]]
            assert d32 == d64


@pytest.mark.parametrize("name", NAMES)
def test_factories_are_deterministic_and_leave_global_rng(name: str) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = ZOO[name]()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = ZOO[name]()
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb), ka
    for xa, xb in zip(a.branch_inputs, b.branch_inputs):
        assert all(torch.equal(s, t) for s, t in zip(xa, xb))


# --------------------------------------------------------------------------------------
# per model


def test_early_exit_takes_three_distinct_exits(cases: dict[str, DynamicCase]) -> None:
    case = cases["early_exit"]
    model = case.model
    assert isinstance(model, md.EarlyExitNet) and isinstance(model.threshold, float)
    exits = []
    for decisions in _probe_all(case):
        taken = [i + 1 for i, d in enumerate(decisions) if d.outcome]
        exits.append(taken[0] if taken else len(model.stages))
    assert set(exits) == {1, 2, 3}
    # the hooks see forward run exactly as many stages as the exit's number
    observed = _run_observed(case, list(model.stages))
    assert [len(s) for s in observed] == exits
    for inputs in case.branch_inputs:
        assert model(*inputs).shape == (1, 10)


def test_skipnet_gates_take_both_outcomes(cases: dict[str, DynamicCase]) -> None:
    case = cases["skipnet"]
    model = case.model
    assert isinstance(model, md.SkipNet) and len(model.blocks) == 3
    combos = [tuple(bool(d.outcome) for d in ds) for ds in _probe_all(case)]
    for i in range(3):
        assert {c[i] for c in combos} == {True, False}, f"gate {i + 1}"
    assert len(set(combos)) >= 4
    observed = _run_observed(case, list(model.blocks))
    assert observed == [[i for i, ran in enumerate(c) if ran] for c in combos]


def test_blockdrop_policy_takes_both_outcomes(cases: dict[str, DynamicCase]) -> None:
    case = cases["blockdrop"]
    model = case.model
    assert isinstance(model, md.BlockDrop) and len(model.blocks) == 4
    policies = [tuple(bool(d.outcome) for d in ds) for ds in _probe_all(case)]
    for i in range(4):
        assert {p[i] for p in policies} == {True, False}, f"block {i + 1}"
    # the policy network runs once per forward, before any block
    observed = _run_observed(case, [model.policy_net, *model.blocks])
    assert observed == [[0] + [i + 1 for i, keep in enumerate(p) if keep] for p in policies]


def test_dynamic_depth_trip_counts(cases: dict[str, DynamicCase]) -> None:
    case = cases["dynamic_depth"]
    model = case.model
    assert isinstance(model, md.DynamicDepth) and model.max_steps == 4
    all_decisions = _probe_all(case)
    trips = [len(ds) for ds in all_decisions]
    assert len(set(trips)) >= 3
    assert model.max_steps in trips
    # the loop runs out without a break on some input
    assert any(len(ds) == model.max_steps and not ds[-1].outcome for ds in all_decisions)
    # every decision but the last of each run said "go on"
    for ds in all_decisions:
        assert not any(d.outcome for d in ds[:-1])
    observed = _run_observed(case, [model.step_fc1])
    assert [len(s) for s in observed] == trips


def test_routed_moe_uses_every_expert(cases: dict[str, DynamicCase]) -> None:
    case = cases["routed_moe"]
    model = case.model
    assert isinstance(model, md.RoutedMoE) and len(model.experts) == 4
    chosen = [ds[0].outcome for ds in _probe_all(case)]
    assert set(chosen) == {0, 1, 2, 3}
    observed = _run_observed(case, list(model.experts))
    assert observed == [[i] for i in chosen]
    with torch.no_grad():
        for (x,) in case.branch_inputs:
            assert int(model.router(model.norm(x)).argmax(-1)) == chosen.pop(0)


def test_shape_branch_both_shapes(cases: dict[str, DynamicCase]) -> None:
    case = cases["shape_branch"]
    model = case.model
    assert isinstance(model, md.ShapeBranch)
    sides = {inputs[0].shape[-1] for inputs in case.branch_inputs}
    assert sides == {16, 32}
    shapes_seen: list[tuple[int, ...]] = []
    handle = model.conv.register_forward_hook(
        lambda _m, args, _out: shapes_seen.append(tuple(args[0].shape))
    )
    try:
        with torch.no_grad():
            for inputs in case.branch_inputs:
                assert model(*inputs).shape == (1, 10)
    finally:
        handle.remove()
    assert all(s == (1, 3, 16, 16) for s in shapes_seen)
