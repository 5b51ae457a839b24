"""Dynamic networks at their papers' sizes (issue 17): the models of ``ZOO_LARGE``.

SDN on ResNet-56 (27 blocks with ``is_output`` flag tensors, 6 internal classifiers),
SkipNet on ResNet-38 (18 hard gates), BlockDrop on ResNet-110 (a policy over 54 blocks), an
MSDNet-style anytime net returning the list of outputs computed so far, and a Show-and-Tell
greedy caption decoder that stops at ``<end>``. Each model's branch inputs take at least
five different paths, every decision at least ``MIN_MARGIN`` from its threshold; which
blocks ``forward`` ran is also observed with forward hooks, independently of ``probe``.

The second half captures each model from its own ``forward`` with ``capture_dynamic``,
splits it with the ``branches`` pass and compiles it for the host (``splice.compile(program,
"host")``): the loaded artifact must equal eager on those inputs and report the branches it
took (``last_trace``) equal to eager's (``cond_trace(eager_decisions(...))``, as in
tests/test_branches.py). That half is most of this file's time: one capture and one TVM
compile per model (tens of parts for the gated ResNets).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import splice
from splice import models_dynamic as md
from splice.ir.explore import capture_dynamic, cond_trace, eager_decisions
from splice.ir.program import iter_graphs
from splice.models_dynamic import MIN_MARGIN, ZOO_LARGE, Decision, DynamicCase

NAMES = list(ZOO_LARGE)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Batch-1 models this small run fastest on one thread, and a busy machine does not
    stall them at OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(_one_thread: None) -> dict[str, DynamicCase]:
    return {name: factory() for name, factory in ZOO_LARGE.items()}


_PROBED: dict[int, list[list[Decision]]] = {}


def _probe_all(case: DynamicCase) -> list[list[Decision]]:
    """Each branch input's decisions (computed once per case)."""
    if id(case) not in _PROBED:
        with torch.no_grad():
            _PROBED[id(case)] = [case.model.probe(*inputs)[1] for inputs in case.branch_inputs]
    return _PROBED[id(case)]


def _paths(case: DynamicCase) -> list[tuple[bool | int, ...]]:
    return [tuple(d.outcome for d in ds) for ds in _probe_all(case)]


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


def _same(a: object, b: object) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


# --------------------------------------------------------------------------------------
# every model


def test_large_zoo_lists_five_models() -> None:
    assert NAMES == ["sdn_resnet56", "skipnet38", "blockdrop110", "msdnet_anytime", "show_tell"]
    assert not set(NAMES) & set(md.ZOO)


@pytest.mark.parametrize("name", NAMES)
def test_case_is_well_formed(cases: dict[str, DynamicCase], name: str) -> None:
    case = cases[name]
    assert case.name == name
    assert case.description and "\n" not in case.description
    assert not any(m.training for m in case.model.modules())
    for inputs in [case.example, *case.branch_inputs]:
        assert isinstance(inputs, tuple)
        assert [tuple(t.shape) for t in inputs] == [(1, 3, 32, 32)]  # CIFAR-sized
        assert all(t.dtype == torch.float32 for t in inputs)
    assert all(p.dtype == torch.float32 for p in case.model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_probe_repeats_forward(cases: dict[str, DynamicCase], name: str) -> None:
    case = cases[name]
    with torch.no_grad():
        for inputs in case.branch_inputs:
            out, decisions = case.model.probe(*inputs)
            assert decisions
            assert _same(case.model(*inputs), out)


@pytest.mark.parametrize("name", NAMES)
def test_branch_inputs_take_at_least_five_paths(cases: dict[str, DynamicCase], name: str) -> None:
    assert len(set(_paths(cases[name]))) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_decisions_are_off_the_knife_edge(cases: dict[str, DynamicCase], name: str) -> None:
    for decisions in _probe_all(cases[name]):
        for d in decisions:
            assert d.margin >= MIN_MARGIN, d


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
def test_factories_are_deterministic_and_leave_global_state(
    cases: dict[str, DynamicCase], name: str
) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    b = ZOO_LARGE[name]()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    a = cases[name]
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb), ka
    for xa, xb in zip(a.branch_inputs, b.branch_inputs, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(xa, xb))


# --------------------------------------------------------------------------------------
# per model


def test_sdn_resnet56_flags_and_exits(cases: dict[str, DynamicCase]) -> None:
    case = cases["sdn_resnet56"]
    model = case.model
    assert isinstance(model, md.SDNResNet56) and len(model.layers) == 27
    with_output = [i for i, layer in enumerate(model.layers) if layer.output is not None]
    assert with_output == list(model.OUTPUT_BLOCKS) and len(with_output) == 6
    # every block returns its flag as a tensor built from a constant
    with torch.no_grad():
        fwd = model.init_conv(case.example[0])
        for i, layer in enumerate(model.layers):
            fwd, is_output, output = layer(fwd)
            assert isinstance(is_output, torch.Tensor) and is_output.dim() == 0
            assert int(is_output) == (i in with_output)
            assert (output is not None) == (i in with_output)
    exits = [next((k for k, d in enumerate(ds) if d.outcome), 6) for ds in _probe_all(case)]
    assert set(exits) == set(range(7))  # each of the 6 internal classifiers, and the end
    # the hooks see forward run the blocks up to the exit's block (all 27 at the end)
    observed = _run_observed(case, list(model.layers))
    ran = [len(s) for s in observed]
    assert ran == [model.OUTPUT_BLOCKS[k] + 1 if k < 6 else 27 for k in exits]
    for inputs in case.branch_inputs:
        with torch.no_grad():
            assert model(*inputs).shape == (1, 10)


def test_skipnet38_gates_decide_which_blocks_run(cases: dict[str, DynamicCase]) -> None:
    case = cases["skipnet38"]
    model = case.model
    assert isinstance(model, md.SkipNet38)
    assert len(model.blocks) == len(model.gates) == 18
    combos = [tuple(bool(o) for o in p) for p in _paths(case)]
    assert all(len(c) == 18 for c in combos)
    assert len(set(combos)) == len(combos) >= 5
    assert sum(len({c[i] for c in combos}) == 2 for i in range(18)) >= 12  # most gates vary
    observed = _run_observed(case, list(model.blocks))
    assert observed == [[i for i, ran in enumerate(c) if ran] for c in combos]


def test_blockdrop110_policy_decides_once_which_blocks_run(
    cases: dict[str, DynamicCase],
) -> None:
    case = cases["blockdrop110"]
    model = case.model
    assert isinstance(model, md.BlockDrop110) and model.rnet.layer_config == [18, 18, 18]
    blocks = [b for stage in model.rnet.blocks for b in stage]
    assert len(blocks) == 54
    policies = [tuple(bool(o) for o in p) for p in _paths(case)]
    assert all(len(p) == 54 for p in policies)
    assert len(set(policies)) == len(policies) >= 5
    assert sum(len({p[i] for p in policies}) == 2 for i in range(54)) >= 40  # most bits vary
    # the agent runs once per forward, before any block of the ResNet-110
    observed = _run_observed(case, [model.logit, *blocks])
    assert observed == [[0] + [i + 1 for i, keep in enumerate(p) if keep] for p in policies]


def test_msdnet_returns_the_outputs_computed_so_far(cases: dict[str, DynamicCase]) -> None:
    case = cases["msdnet_anytime"]
    model = case.model
    assert isinstance(model, md.MSDNetAnytime) and model.nBlocks == 6
    lengths = []
    with torch.no_grad():
        for (x,), ds in zip(case.branch_inputs, _probe_all(case)):
            out = model(x)
            assert isinstance(out, list) and all(o.shape == (1, 10) for o in out)
            assert len(out) == len(ds) and ds[-1].outcome and not any(d.outcome for d in ds[:-1])
            # the outputs are the classifiers' outputs on the way (no early stop)
            for got, want in zip(out, model.head_logits(x)):
                torch.testing.assert_close(got, want)
            lengths.append(len(out))
    assert set(lengths) == set(range(1, 7))
    observed = _run_observed(case, list(model.classifier))
    assert observed == [list(range(n)) for n in lengths]


def test_show_tell_stops_at_end_or_at_the_maximum_length(
    cases: dict[str, DynamicCase],
) -> None:
    case = cases["show_tell"]
    model = case.model
    assert isinstance(model, md.ShowTellCaptioner)
    lengths = []
    with torch.no_grad():
        for (x,) in case.branch_inputs:
            ids = model(x)
            assert ids.dtype == torch.int64 and ids.dim() == 2 and ids.shape[0] == 1
            n = ids.shape[1]
            ended = ids[0, -1].item() == model.end_id
            assert (ids[0, :-1] != model.end_id).all()
            assert ended or n == model.max_seq_length
            lengths.append((n, ended))
    assert len({n for n, _ in lengths}) >= 5
    assert (model.max_seq_length, False) in lengths  # ran out without <end>
    assert (model.max_seq_length, True) in lengths  # <end> as the last possible word
    observed = _run_observed(case, [model.lstm])
    assert [len(s) for s in observed] == [n for n, _ in lengths]


# --------------------------------------------------------------------------------------
# capture_dynamic -> branches -> host compile, against eager


def _diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the output's magnitude (exact for integers)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if not want.dtype.is_floating_point:
        return 0.0 if torch.equal(got, want) else float("inf")
    scale = max(1.0, want.abs().max().item())
    return (got - want).abs().max().item() / scale


@pytest.fixture(scope="module", params=NAMES)
def compiled(request, cases, tmp_path_factory):
    case = cases[request.param]
    program = capture_dynamic(case.model, case.example)
    out = tmp_path_factory.mktemp("large") / f"{case.name}.artifact"
    art = splice.compile(program, "host", output=out, samples=[case.example])
    return case, program, splice.load(art.path)


def test_compiled_equals_eager_and_takes_the_same_branches(compiled) -> None:
    case, _, cm = compiled
    traces = set()
    for x in case.branch_inputs:
        with torch.no_grad():
            want = pytree.tree_leaves(case.model(*x))
        got = pytree.tree_leaves(cm(*x))
        assert len(got) == len(want), case.name  # path-dependent: list length, sequence
        for g, w in zip(got, want):
            assert _diff(g, w) <= 1e-4, case.name
        eager = cond_trace(eager_decisions(case.model, x))
        assert [t for _, t in cm.last_trace] == eager
        traces.add(tuple(eager))
    assert len(traces) >= 5


def test_program_grows_with_the_decision_sites_not_the_paths(compiled) -> None:
    """One cond per decision site: the captured program holds a few graphs per site, not
    one per path (2**18 for SkipNet-38, 2**54 for BlockDrop-110)."""
    case, program, cm = compiled
    sites = max(len(eager_decisions(case.model, x)) for x in case.branch_inputs)
    graphs = sum(1 for _ in iter_graphs(program))
    assert graphs <= 4 * sites + 4, (case.name, graphs, sites)
    assert len(cm.manifest["parts"]) <= 4 * sites + 4
