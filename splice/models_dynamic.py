"""Dynamic model zoo: networks whose ``forward`` branches on tensor values.

These are the inputs of the ``branches`` pass, which follows DyCL (Chen et al., "DyCL:
Dynamic Neural Network Compilation Via Program Rewriting and Graph Optimization", ISSTA
2023): data-dependent control flow is split into branch-free parts plus a host program
that decides between them. Each model here is an ordinary ``torch.nn.Module`` written from
its paper's description, with plain Python ``if``/``for``/``break`` and ModuleList indexing
decided by tensor values -- no ``torch.cond`` and no hand-written "compile" variant.

All models are fp32, small (milliseconds per call), seeded, and in eval mode. Their weights
are random except where a decision is made: gates, policies, halting units, routers and
classifier scales are set so that each decision depends mostly on a simple statistic of
the input (a channel mean, a coordinate, the input's amplitude). The factories then build
``branch_inputs`` that together take every outcome of every decision, each at least
:data:`MIN_MARGIN` away from its threshold so float rounding in compiled code cannot flip
a branch.

Every model has a ``probe(*inputs)`` method that repeats ``forward`` step by step and
returns ``(output, decisions)``: the list of :class:`Decision` taken, in order, with the
distance of each compared quantity from its threshold. ``probe`` is for tests and for
checking a compiled program against eager decisions; ``forward`` itself records nothing.

Like :mod:`splice.models`, a model library: above the compiler, below the tools
(``tests/test_imports.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Smallest distance between a compared quantity and its threshold on any branch input.
MIN_MARGIN = 1e-3


@dataclass
class DynamicCase:
    """One model of the zoo with inputs that exercise all of its branches."""

    name: str
    model: nn.Module  # eval mode
    example: tuple[torch.Tensor, ...]  # one example input tuple
    branch_inputs: list[tuple[torch.Tensor, ...]]  # together: every outcome of every decision
    description: str  # one line: the paper's model and what branches


@dataclass(frozen=True)
class Decision:
    """One data-dependent decision taken during a forward pass.

    ``site`` names the decision point (``"exit1"``, ``"gate2"``, ``"halt3"`` ...),
    ``outcome`` is what was decided (a bool for a comparison, an int for an index), and
    ``margin`` is how far the compared quantity lay from the value that would flip it:
    ``|value - threshold|`` for a comparison, top-1 minus top-2 for an argmax.
    """

    site: str
    outcome: bool | int
    margin: float


def _compare(site: str, value: torch.Tensor, threshold: float, *, ge: bool = False) -> Decision:
    v = float(value)
    outcome = v >= threshold if ge else v > threshold
    return Decision(site, outcome, abs(v - threshold))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class _ResidualBranch(nn.Sequential):
    """conv3x3-BN-ReLU-conv3x3-BN: the residual function F(x) of a ResNet basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )


# --------------------------------------------------------------------------------------
# 1. early exit (SDN)


class EarlyExitNet(nn.Module):
    """Shallow-Deep Network (Kaya et al., "Shallow-Deep Networks: Understanding and
    Mitigating Network Overthinking", ICML 2019).

    Three conv3x3+BN+ReLU stages, each followed by an internal classifier (global average
    pool + Linear). After stage ``i < 3`` the network returns that classifier's logits when
    its softmax confidence ``max(softmax(logits))`` reaches ``threshold``; otherwise the
    final classifier's logits are returned.

    The network is positively homogeneous (bias-free convs and heads, BatchNorm with zero
    mean and shift, ReLU), so scaling the input by ``a`` scales every head's logits by ``a``
    and raises its confidence: small inputs run to the end, larger ones exit at stage 2,
    the largest at stage 1. Head 2 is scaled up so that it grows confident first.
    """

    def __init__(self, threshold: float = 0.9, classes: int = 10) -> None:
        super().__init__()
        self.threshold = threshold
        widths = [3, 8, 16, 32]
        self.stages = nn.ModuleList(
            _ConvBNReLU(widths[i], widths[i + 1], stride=1 if i == 0 else 2) for i in range(3)
        )
        self.heads = nn.ModuleList(nn.Linear(w, classes, bias=False) for w in widths[1:])

    def head(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Internal classifier ``i``: global average pool, then Linear."""
        return self.heads[i](x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.stages) - 1):
            x = self.stages[i](x)
            logits = self.head(i, x)
            if torch.softmax(logits, -1).max() >= self.threshold:
                return logits
        x = self.stages[-1](x)
        return self.head(len(self.stages) - 1, x)

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``exit1``, ``exit2`` (True: exited there)."""
        decisions: list[Decision] = []
        for i in range(len(self.stages) - 1):
            x = self.stages[i](x)
            logits = self.head(i, x)
            conf = torch.softmax(logits, -1).max()
            decisions.append(_compare(f"exit{i + 1}", conf, self.threshold, ge=True))
            if decisions[-1].outcome:
                return logits, decisions
        x = self.stages[-1](x)
        return self.head(len(self.stages) - 1, x), decisions


def early_exit() -> DynamicCase:
    """SDN early exit: 3 stages with an internal classifier each; exits at 1, 2 or 3."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(101)
        model = EarlyExitNet(threshold=0.9)
        with torch.no_grad():
            # deeper features are smaller; a sharper head 2 grows confident before head 1
            model.heads[1].weight.mul_(40.0)
    model.eval()
    g = _seeded(1001)
    shape = (1, 3, 16, 16)
    scales = [1.0, 4.0, 24.0, 40.0, 100.0, 200.0]
    branch_inputs = [(a * torch.randn(shape, generator=g),) for a in scales]
    return DynamicCase(
        name="early_exit",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="SDN (ICML 2019): conv net with 3 internal classifiers, "
        "returns at the first whose softmax confidence >= threshold",
    )


# --------------------------------------------------------------------------------------
# 2. SkipNet


class SkipNet(nn.Module):
    """SkipNet (Wang et al., "SkipNet: Learning Dynamic Routing in Convolutional Networks",
    ECCV 2018), with the feed-forward gate design.

    Three residual blocks; before block ``i`` a gate (global average pool + Linear -> 1 +
    sigmoid) decides whether to run it: ``x = x + block(x)`` when the gate exceeds 0.5,
    otherwise ``x`` passes unchanged. A pooled Linear head follows.

    Gate ``i`` reads mostly the mean of channel ``i``, and the blocks write nothing into
    channels 0..2, so each gate is controlled by the sign of one input channel's mean
    regardless of which earlier blocks ran.
    """

    def __init__(self, channels: int = 16, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ResidualBranch(channels) for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(channels, 1) for _ in range(blocks))
        self.fc = nn.Linear(channels, classes)

    def gate(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Probability of running block ``i`` on ``x``, shape ``[1, 1]``."""
        return torch.sigmoid(self.gates[i](x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.gate(i, x) > 0.5:
                x = x + block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``gate1`` .. ``gate3`` (True: block ran)."""
        decisions: list[Decision] = []
        for i, block in enumerate(self.blocks):
            decisions.append(_compare(f"gate{i + 1}", self.gate(i, x), 0.5))
            if decisions[-1].outcome:
                x = x + block(x)
        return self.fc(x.mean(dim=(2, 3))), decisions


def _sign_pattern_input(
    g: torch.Generator, shape: tuple[int, ...], signs: list[int], shift: float
) -> torch.Tensor:
    """Noise whose channel ``i`` is shifted by ``signs[i] * shift`` (0 where no sign)."""
    x = torch.randn(shape, generator=g)
    for i, s in enumerate(signs):
        x[:, i] += s * shift
    return x


def skipnet() -> DynamicCase:
    """SkipNet gated residual blocks; each of the 3 gates runs or skips its block."""
    channels = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(202)
        model = SkipNet(channels=channels)
        with torch.no_grad():
            for i, (gate, block) in enumerate(zip(model.gates, model.blocks)):
                gate.weight.mul_(0.05)
                gate.weight[0, i] = 8.0
                gate.bias.zero_()
                block[-1].weight[:3].zero_()  # last BN: nothing written to channels 0..2
                block[-1].bias[:3].zero_()
    model.eval()
    g = _seeded(2002)
    shape = (1, channels, 8, 8)
    patterns = [
        [1, 1, 1],
        [-1, -1, -1],
        [1, -1, 1],
        [-1, 1, -1],
        [1, 1, -1],
        [-1, -1, 1],
        [1, -1, -1],
        [-1, 1, 1],
    ]
    branch_inputs = [(_sign_pattern_input(g, shape, p, 1.0),) for p in patterns]
    return DynamicCase(
        name="skipnet",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="SkipNet (ECCV 2018): 3 residual blocks, each run only when its "
        "feed-forward gate's sigmoid > 0.5",
    )


# --------------------------------------------------------------------------------------
# 3. BlockDrop


class BlockDrop(nn.Module):
    """BlockDrop (Wu et al., "BlockDrop: Dynamic Inference Paths in Residual Networks",
    CVPR 2018).

    A policy network (global average pool + Linear + sigmoid) looks at the input once and
    outputs one keep-probability per residual block; ``policy = probs > 0.5``. Then each
    block runs (``x = x + block(x)``) only when its policy bit is set. A pooled Linear
    head follows. Policy unit ``i`` reads mostly the mean of input channel ``i``.
    """

    def __init__(self, channels: int = 16, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.policy_net = nn.Linear(channels, blocks)
        self.blocks = nn.ModuleList(_ResidualBranch(channels) for _ in range(blocks))
        self.fc = nn.Linear(channels, classes)

    def policy_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Keep-probability of each block, shape ``[1, blocks]``."""
        return torch.sigmoid(self.policy_net(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        policy = self.policy_probs(x) > 0.5
        for i, block in enumerate(self.blocks):
            if policy[0, i]:
                x = x + block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``block1`` .. ``block4`` (True: block ran)."""
        probs = self.policy_probs(x)
        decisions = [_compare(f"block{i + 1}", probs[0, i], 0.5) for i in range(len(self.blocks))]
        for d, block in zip(decisions, self.blocks):
            if d.outcome:
                x = x + block(x)
        return self.fc(x.mean(dim=(2, 3))), decisions


def blockdrop() -> DynamicCase:
    """BlockDrop: a policy net picks, once, which of 4 residual blocks run."""
    channels = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(303)
        model = BlockDrop(channels=channels)
        with torch.no_grad():
            model.policy_net.weight.mul_(0.05)
            for i in range(len(model.blocks)):
                model.policy_net.weight[i, i] = 8.0
            model.policy_net.bias.zero_()
    model.eval()
    g = _seeded(3003)
    shape = (1, channels, 8, 8)
    patterns = [
        [1, 1, 1, 1],
        [-1, -1, -1, -1],
        [1, -1, 1, -1],
        [-1, 1, -1, 1],
        [1, 1, -1, -1],
        [-1, -1, 1, 1],
    ]
    branch_inputs = [(_sign_pattern_input(g, shape, p, 1.0),) for p in patterns]
    return DynamicCase(
        name="blockdrop",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="BlockDrop (CVPR 2018): a policy net decides once which of 4 residual "
        "blocks run (probs > 0.5)",
    )


# --------------------------------------------------------------------------------------
# 4. dynamic depth


class DynamicDepth(nn.Module):
    """Bounded dynamic-depth loop with a halting unit, the loop pattern of the dynamic
    models compiled by DyCL (Chen et al., ISSTA 2023).

    ``for step in range(max_steps): x = step(x); if halt(x) > 0.5: break`` where ``step``
    is a residual MLP and ``halt`` is Linear -> 1 -> sigmoid; then a Linear head. The trip
    count depends on tensor values; the bound is the Python ``range``.

    Coordinate 0 acts as a counter: each step adds exactly 1 to it, and the halting unit
    reads mostly that coordinate, firing once it exceeds ``halt_at``. So the input's
    coordinate 0 sets the trip count.
    """

    def __init__(self, dim: int = 32, max_steps: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.step_fc1 = nn.Linear(dim, dim)
        self.step_fc2 = nn.Linear(dim, dim)
        self.halt_fc = nn.Linear(dim, 1)
        self.fc = nn.Linear(dim, classes)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One loop body: ``x + fc2(tanh(fc1(x)))``."""
        return x + self.step_fc2(torch.tanh(self.step_fc1(x)))

    def halt(self, x: torch.Tensor) -> torch.Tensor:
        """Halting probability, shape ``[1, 1]``."""
        return torch.sigmoid(self.halt_fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.max_steps):
            x = self.step(x)
            if self.halt(x) > 0.5:
                break
        return self.fc(x)

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``halt1`` .. (True: broke out after that step)."""
        decisions: list[Decision] = []
        for s in range(self.max_steps):
            x = self.step(x)
            decisions.append(_compare(f"halt{s + 1}", self.halt(x), 0.5))
            if decisions[-1].outcome:
                break
        return self.fc(x), decisions


def dynamic_depth() -> DynamicCase:
    """Dynamic-depth loop: 1 to 4 steps, stopping when a halting unit fires."""
    dim = 32
    halt_at = 2.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(404)
        model = DynamicDepth(dim=dim, max_steps=4)
        with torch.no_grad():
            model.step_fc2.weight[0].zero_()  # the counter gains exactly 1 per step
            model.step_fc2.bias[0] = 1.0
            model.halt_fc.weight.mul_(0.05)
            model.halt_fc.weight[0, 0] = 4.0
            model.halt_fc.bias.fill_(-4.0 * halt_at)
    model.eval()
    g = _seeded(4004)
    # counter start -> steps: 2 -> 1, 1 -> 2, 0 -> 3, -1 -> 4 (halts at the last step),
    # -2 -> 4 (never halts: the loop runs out)
    starts = [2.0, 1.0, 0.0, -1.0, -2.0]
    branch_inputs = []
    for c in starts:
        x = 0.5 * torch.randn(1, dim, generator=g)
        x[0, 0] = c
        branch_inputs.append((x,))
    return DynamicCase(
        name="dynamic_depth",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="dynamic-depth loop (DyCL, ISSTA 2023): up to 4 residual-MLP steps, "
        "break when the halting unit's sigmoid > 0.5",
    )


# --------------------------------------------------------------------------------------
# 5. routed mixture of experts


class RoutedMoE(nn.Module):
    """Top-1 routed mixture of experts at the Python level (batch 1), the switch-style
    dispatch that DyCL (Chen et al., ISSTA 2023) turns into a host-side choice.

    ``h = norm(x)``, ``idx = router(h).argmax(-1)``, ``return x + experts[idx](h)``: the
    ModuleList is indexed by the router's tensor. Router row ``i`` reads mostly
    coordinate ``i`` of the input, so the largest of coordinates 0..3 picks the expert.
    """

    def __init__(self, dim: int = 16, experts: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        idx = self.router(h).argmax(-1)
        return x + self.experts[idx](h)

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decision ``expert`` (the index; margin: top-1 - top-2)."""
        h = self.norm(x)
        logits = self.router(h)
        top = logits[0].topk(2).values
        idx = int(logits.argmax(-1))
        decision = Decision("expert", idx, float(top[0] - top[1]))
        return x + self.experts[idx](h), [decision]


def routed_moe() -> DynamicCase:
    """Top-1 routed MoE: ``experts[router(x).argmax(-1)]`` over 4 MLP experts."""
    dim, n = 16, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(505)
        model = RoutedMoE(dim=dim, experts=n)
        with torch.no_grad():
            model.router.weight.mul_(0.05)
            for i in range(n):
                model.router.weight[i, i] = 4.0
            model.router.bias.zero_()
    model.eval()
    g = _seeded(5005)
    branch_inputs = []
    for i in [0, 1, 2, 3, 2, 0]:
        x = torch.randn(1, dim, generator=g)
        x[0, i] = 4.0
        branch_inputs.append((x,))
    return DynamicCase(
        name="routed_moe",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="top-1 routed MoE (DyCL, ISSTA 2023): self.experts[router(x).argmax(-1)] "
        "picks one of 4 MLP experts",
    )


# --------------------------------------------------------------------------------------
# 6. input-shape branch


class ShapeBranch(nn.Module):
    """Input-shape-dependent branch, the shape-driven control flow of DyCL (Chen et al.,
    ISSTA 2023): inputs wider than ``max_side`` are average-pooled by 2 first, so 16x16
    and 32x32 images both give ``[1, classes]`` logits via conv + global pool + Linear.
    """

    def __init__(self, max_side: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.max_side = max_side
        self.conv = _ConvBNReLU(3, 8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > self.max_side:
            x = F.avg_pool2d(x, 2)
        return self.fc(self.conv(x).mean(dim=(2, 3)))

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decision ``downsample`` (True: input was pooled)."""
        side = x.shape[-1]
        # integer comparison: the margin is how far the side is from the nearest side that
        # would flip it (max_side vs max_side + 1)
        margin = side - self.max_side if side > self.max_side else self.max_side + 1 - side
        d = Decision("downsample", side > self.max_side, float(margin))
        if d.outcome:
            x = F.avg_pool2d(x, 2)
        return self.fc(self.conv(x).mean(dim=(2, 3))), [d]


def shape_branch() -> DynamicCase:
    """Shape branch: 32x32 inputs are pooled to 16x16; both give ``[1, 10]``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(606)
        model = ShapeBranch()
    model.eval()
    g = _seeded(6006)
    branch_inputs = [
        (torch.randn(1, 3, 16, 16, generator=g),),
        (torch.randn(1, 3, 32, 32, generator=g),),
    ]
    return DynamicCase(
        name="shape_branch",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="shape branch (DyCL, ISSTA 2023): avg-pool by 2 when the input is wider "
        "than 16, then conv + global pool + Linear",
    )


ZOO: dict[str, Callable[[], DynamicCase]] = {
    "early_exit": early_exit,
    "skipnet": skipnet,
    "blockdrop": blockdrop,
    "dynamic_depth": dynamic_depth,
    "routed_moe": routed_moe,
    "shape_branch": shape_branch,
}


# --------------------------------------------------------------------------------------
# models that dispatch tokens with nonzero() / torch.where(mask): data-dependent sizes


class SwitchMoE(nn.Module):
    """Switch Transformer FFN layer (Fedus et al., "Switch Transformers: Scaling to Trillion
    Parameter Models with Simple and Efficient Sparsity", JMLR 2022): top-1 routing of a
    batch of tokens ``[T, dim]``.

    The router's softmax picks one expert per token; each expert runs on the tokens routed
    to it, gathered with ``torch.where(route == i)[0]`` (a data-dependent number of rows),
    skipped when it got none, and its output, scaled by the router probability, is added
    back with ``index_add_`` -- the dispatch loop of transformers' eager MoE layers. Router
    row ``i`` reads mostly coordinate ``i`` of the token, so the largest of coordinates
    ``0..experts-1`` picks the expert.
    """

    def __init__(self, dim: int = 16, experts: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        probs = torch.softmax(self.router(h), dim=-1)
        gate, route = probs.max(dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            idx = torch.where(route == i)[0]
            if idx.numel() == 0:
                continue
            out.index_add_(0, idx, expert(h[idx]) * gate[idx, None])
        return x + out

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decision ``token{t}`` per token (its expert; margin: top-1
        minus top-2 router logit)."""
        h = self.norm(x)
        logits = self.router(h)
        top = logits.topk(2, dim=-1).values
        route = logits.argmax(-1)
        decisions = [
            Decision(f"token{t}", int(route[t]), float(top[t, 0] - top[t, 1]))
            for t in range(x.shape[0])
        ]
        return self(x), decisions


def switch_moe() -> DynamicCase:
    """Switch top-1 MoE over 8 tokens and 4 experts; some inputs leave experts without
    tokens (the ``numel() == 0`` skip), one sends every token to one expert."""
    dim, n, tokens = 16, 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(707)
        model = SwitchMoE(dim=dim, experts=n)
        with torch.no_grad():
            model.router.weight.mul_(0.05)
            for i in range(n):
                model.router.weight[i, i] = 4.0
    model.eval()
    g = _seeded(7007)
    routes = [
        [0, 1, 2, 3, 3, 2, 1, 0],  # every expert gets tokens
        [0, 0, 2, 2, 0, 2, 2, 0],  # experts 1 and 3 get none
        [3] * tokens,  # one expert takes every token
        [1, 0, 1, 1, 0, 0, 1, 3],  # expert 2 gets none
    ]
    branch_inputs = []
    for r in routes:
        x = torch.randn(tokens, dim, generator=g)
        x[torch.arange(tokens), torch.tensor(r)] = 4.0
        branch_inputs.append((x,))
    return DynamicCase(
        name="switch_moe",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="Switch Transformer (JMLR 2022) top-1 MoE: torch.where(route == i) "
        "dispatch, numel() == 0 skip, index_add_ back",
    )


class TokenEarlyExit(nn.Module):
    """Token-level early exit (the per-token halting of depth-adaptive transformers:
    Elbayad et al., "Depth-Adaptive Transformer", ICLR 2020; Schuster et al., "Confident
    Adaptive Language Modeling", NeurIPS 2022), over a batch of tokens ``[T, dim]``.

    Before each of ``layers`` residual MLP layers, a halting unit (Linear -> 1 -> sigmoid)
    marks the tokens that are done; a token once done stays done. The layer runs only on
    the tokens still alive, gathered with ``alive.nonzero().squeeze(-1)`` and written back
    with ``h[idx] = layer(h[idx])``; the loop stops when no token is alive. A Linear head
    reads every token.

    Coordinate 0 of a token is a counter: every layer adds exactly 1 to it, and the
    halting unit reads mostly that coordinate, firing once it exceeds ``halt_at``, so a
    token's coordinate 0 sets how many layers it takes.
    """

    def __init__(self, dim: int = 16, layers: int = 3, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(layers))
        self.halt = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, classes)

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i``: ``h + fc2(relu(fc1(norm(h))))``."""
        return h + self.fc2[i](torch.relu(self.fc1[i](self.norms[i](h))))

    def halting(self, h: torch.Tensor) -> torch.Tensor:
        """Halting probability per token, shape ``[T]``."""
        return torch.sigmoid(self.halt(h)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.clone()
        alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for i in range(len(self.fc1)):
            alive = alive & (self.halting(h) <= 0.5)
            idx = alive.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            h[idx] = self.layer(i, h[idx])
        return self.head(h)

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decision ``halt{i}_tok{t}`` (True: token ``t`` is done before
        layer ``i``) for every token alive before layer ``i``."""
        decisions: list[Decision] = []
        h = x.clone()
        alive = [True] * x.shape[0]
        for i in range(len(self.fc1)):
            p = self.halting(h)
            for t in range(x.shape[0]):
                if alive[t]:
                    decisions.append(_compare(f"halt{i}_tok{t}", p[t], 0.5))
                    alive[t] = not decisions[-1].outcome
            idx = [t for t in range(x.shape[0]) if alive[t]]
            if not idx:
                break
            rows = torch.tensor(idx)
            h[rows] = self.layer(i, h[rows])
        return self.head(h), decisions


def token_early_exit() -> DynamicCase:
    """Token early exit over 6 tokens and 3 layers; inputs where every token runs every
    layer, where tokens leave after 0..3 layers, and where all leave at once."""
    dim, layers, tokens, halt_at = 16, 3, 6, 2.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(808)
        model = TokenEarlyExit(dim=dim, layers=layers)
        with torch.no_grad():
            for fc2 in model.fc2:
                fc2.weight[0].zero_()  # the counter gains exactly 1 per layer
                fc2.bias[0] = 1.0
            model.halt.weight.mul_(0.05)
            model.halt.weight[0, 0] = 4.0
            model.halt.bias.fill_(-4.0 * halt_at)
    model.eval()
    g = _seeded(8008)
    # counter start -> layers run: 3 -> 0, 2 -> 1, 1 -> 2, 0 -> 3, -2 -> 3
    starts = [
        [-2.0, -2.0, 0.0, 0.0, -2.0, 0.0],  # every token runs every layer
        [3.0, 2.0, 1.0, 0.0, -2.0, 1.0],  # tokens leave after 0, 1, 2, 3 layers
        [3.0] * tokens,  # every token is done before the first layer
        [2.0, 2.0, 3.0, 2.0, 3.0, 2.0],  # all leave after one layer: the loop breaks
    ]
    branch_inputs = []
    for c in starts:
        x = 0.5 * torch.randn(tokens, dim, generator=g)
        x[:, 0] = torch.tensor(c)
        branch_inputs.append((x,))
    return DynamicCase(
        name="token_early_exit",
        model=model,
        example=branch_inputs[1],
        branch_inputs=branch_inputs,
        description="token early exit (Depth-Adaptive Transformer, ICLR 2020; CALM, NeurIPS "
        "2022): alive.nonzero() gathers the live tokens, h[idx] = layer(h[idx])",
    )


#: Models whose ``forward`` dispatches rows through ``nonzero()``/``torch.where(mask)``
#: (data-dependent sizes, captured densely by :mod:`splice.ir.dd_sizes`). Kept apart from
#: :data:`ZOO`, whose models branch in Python and go through the ``branches`` pass.
SELECT_ZOO: dict[str, Callable[[], DynamicCase]] = {
    "switch_moe": switch_moe,
    "token_early_exit": token_early_exit,
}
# --------------------------------------------------------------------------------------
# Paper-size dynamic networks (issue 17), in their authors' code style
#
# The models below have the depth their papers use (ResNet-38/56/110 on CIFAR, 3 stages of
# 16/32/64 channels, 32x32 inputs) and a ``forward`` shaped like the authors' own
# inference code. Their weights are random and seeded; only what a decision reads is set:
# exit heads are scaled (the early-exit nets are positively homogeneous, so the input's
# amplitude picks the exit), gate and policy biases are set to the median of their logit
# over a seeded calibration set (so each gate splits inputs about evenly), and one LSTM
# unit of the caption decoder counts steps. The factories pick branch inputs whose
# decisions all lie at least MIN_MARGIN from their thresholds and that take at least five
# different paths. They are registered in ZOO_LARGE, not ZOO: each has tens of decision
# sites, which the small-zoo tests and benchmark rows do not expect.


def _cifar_image(g: torch.Generator, amplitude: float = 1.0) -> torch.Tensor:
    """A 1x3x32x32 'image': a smooth random field (a 4x4 grid upsampled), per-channel
    offsets and pixel noise, so that pooled statistics differ from image to image."""
    coarse = torch.randn(1, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    offset = 0.5 * torch.randn(1, 3, 1, 1, generator=g)
    noise = 0.5 * torch.randn(1, 3, 32, 32, generator=g)
    return amplitude * (smooth + offset + noise)


class _DownsampleB(nn.Module):
    """SkipNet's and BlockDrop's ``DownsampleB``: average-pool by ``stride``, then pad the
    channels with zeros up to ``cout`` (a parameter-free shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.avg = nn.AvgPool2d(stride)
        self.expand_ratio = cout // cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(x)
        return torch.cat([x] + [x.mul(0)] * (self.expand_ratio - 1), 1)


class _BasicBlock(nn.Module):
    """The CIFAR ResNet basic block (He et al., 2016): conv3x3-BN-ReLU-conv3x3-BN, plus the
    shortcut, then ReLU. ``residual_only`` leaves out the shortcut and the last ReLU (how
    BlockDrop's and SkipNet's code call a block: the caller adds the shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, *, residual_only: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual_only = residual_only
        self.downsample = _DownsampleB(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual_only:
            return out
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class _OneThread:
    """Run torch single-threaded inside: the factories calibrate with many small batch-1
    forwards, which on a busy machine stall at OpenMP barriers with more threads (and one
    thread makes their float rounding, hence the chosen inputs, the same everywhere)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


_CIFAR_WIDTHS = (16, 32, 64)


def _max_softmax_crossing(logits: torch.Tensor, threshold: float) -> float:
    """Smallest ``a > 0`` with ``max(softmax(a * logits)) >= threshold`` (bisection on a
    log scale; ``max softmax(a * l)`` grows with ``a``), ``inf`` if none."""
    logits = logits.double().flatten()
    if threshold <= 1.0 / logits.numel():
        return 0.0
    if logits.max() - logits.min() == 0:
        return float("inf")

    def conf(a: float) -> float:
        return float(torch.softmax(a * logits, 0).max())

    lo, hi = 1e-6, 1.0
    while conf(hi) < threshold:
        hi *= 2.0
        if hi > 1e12:
            return float("inf")
    for _ in range(80):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if conf(mid) >= threshold else (mid, hi)
    return hi


def _exit_inputs(
    head_logits: Callable[[torch.Tensor], list[torch.Tensor]],
    thresholds: list[float],
    targets: list[int],
    g: torch.Generator,
) -> list[tuple[torch.Tensor, ...]]:
    """Inputs of a positively homogeneous early-exit net that exit at each of ``targets``.

    ``head_logits(x)`` gives every head's logits on ``x`` (all heads run); scaling ``x`` by
    ``a`` scales them by ``a``, so head ``j`` is confident from amplitude ``c_j`` on, and
    the net exits at the first ``j`` with ``a >= c_j``. Target ``k`` (0-based head index;
    ``len(thresholds)``: no exit) takes the geometric middle of the
    amplitudes that exit there, on the first fresh image that has such amplitudes.
    """
    out: dict[int, tuple[torch.Tensor, ...]] = {}
    for _ in range(20 * len(targets)):
        if len(out) == len(targets):
            break
        x = _cifar_image(g)
        with torch.no_grad():
            logits = head_logits(x)
        c = [_max_softmax_crossing(lg, t) for lg, t in zip(logits, thresholds)]
        for i, k in enumerate(targets):
            if i in out:
                continue
            if k < len(c):
                hi = min(c[:k], default=4.0 * c[k])
                lo = c[k] if c[k] > 0 else hi / 4.0
            else:  # no head confident: the net runs to its end
                hi = min(c)
                lo = hi / 4.0
            if 0 < lo < hi < float("inf") and hi / lo > 1.2:
                out[i] = (x * (lo * hi) ** 0.5,)
                break
    if len(out) < len(targets):  # pragma: no cover - the factories' seeds are fixed
        missing = [k for i, k in enumerate(targets) if i not in out]
        raise RuntimeError(f"no input exits at heads {missing}")
    return [out[i] for i in range(len(targets))]


def _scale_heads(
    heads: list[nn.Linear],
    head_logits: Callable[[torch.Tensor], list[torch.Tensor]],
    thresholds: list[float],
    reference: torch.Tensor,
    top: float,
    ratio: float,
) -> None:
    """Scale head ``j``'s weight so that on ``reference`` it grows confident from amplitude
    ``top / ratio**j`` on: deeper heads are confident at smaller amplitudes, so larger
    inputs exit earlier and every exit is reachable."""
    with torch.no_grad():
        logits = head_logits(reference)
        for j, (head, lg, t) in enumerate(zip(heads, logits, thresholds)):
            c = _max_softmax_crossing(lg, t)
            head.weight.mul_(c / (top / ratio**j))


# --------------------------------------------------------------------------------------
# 7. SDN ResNet-56: early exit with `is_output` flags


class _InternalClassifier(nn.Module):
    """SDN's internal classifier (``af.InternalClassifier``): mixed max/average pooling down
    to 4x4 (``alpha`` a learned mix), then Linear."""

    def __init__(self, input_size: int, channels: int, classes: int) -> None:
        super().__init__()
        kernel = input_size // 4
        self.max_pool = nn.MaxPool2d(kernel_size=kernel)
        self.avg_pool = nn.AvgPool2d(kernel_size=kernel)
        self.alpha = nn.Parameter(torch.rand(1))
        self.linear = nn.Linear(channels * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maxp = self.alpha * self.max_pool(x)
        avgp = (1 - self.alpha) * self.avg_pool(x)
        mixed = maxp + avgp
        return self.linear(mixed.view(mixed.size(0), -1))


class _BlockWOutput(nn.Module):
    """SDN's ``BasicBlockWOutput``: a ResNet basic block that returns ``(features,
    is_output, output)``; ``is_output`` is a flag tensor built from a constant here, and
    ``output`` the internal classifier's logits (``None`` without one)."""

    def __init__(
        self, cin: int, cout: int, stride: int, input_size: int, add_output: bool, classes: int
    ) -> None:
        super().__init__()
        conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.layers = nn.ModuleList([conv, shortcut, nn.ReLU()])
        self.output = (
            _InternalClassifier(input_size // stride, cout, classes) if add_output else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        fwd = self.layers[0](x)  # conv layers
        fwd = fwd + self.layers[1](x)  # shortcut
        fwd = self.layers[2](fwd)
        if self.output is None:
            is_output = torch.tensor(0)
            return fwd, is_output, None
        is_output = torch.tensor(1)
        return fwd, is_output, self.output(fwd)


class SDNResNet56(nn.Module):
    """Shallow-Deep Network on ResNet-56 (Kaya et al., "Shallow-Deep Networks:
    Understanding and Mitigating Network Overthinking", ICML 2019), forward = SDN's
    ``early_exit`` inference.

    27 basic blocks (3 stages x 9, 16/32/64 channels, 32x32 input); the blocks after
    15%, 30%, ..., 90% of the depth (4, 8, 12, 16, 20, 24) carry an internal classifier.
    Every block returns ``is_output`` as ``torch.tensor(1)`` or ``torch.tensor(0)`` and
    the loop branches on it, as SDN's code does; a block with a classifier returns its
    logits when their softmax confidence reaches ``threshold``, else the end classifier's
    logits are returned. SDN's bookkeeping that is not returned here (the list of
    confidences, ``np.argmax`` over them) is left out.

    The net is positively homogeneous (bias-free convs and heads, BatchNorm with zero mean
    and shift, ReLU, max/avg pooling), so an input's amplitude sets every head's confidence;
    heads are scaled so that deeper ones grow confident first and every exit is reachable.
    """

    OUTPUT_BLOCKS = (3, 7, 11, 15, 19, 23)  # 0-based: blocks 4, 8, ..., 24 of 27

    def __init__(self, threshold: float = 0.8, classes: int = 10, blocks_per_stage: int = 9):
        super().__init__()
        self.confidence_threshold = threshold
        self.init_conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers = []
        cin, size = 16, 32
        for s, width in enumerate(_CIFAR_WIDTHS):
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                index = len(layers)
                add = index in self.OUTPUT_BLOCKS
                layers.append(_BlockWOutput(cin, width, stride, size, add, classes))
                cin, size = width, size // stride
        self.layers = nn.ModuleList(layers)
        self.end_layers = nn.Sequential(
            nn.AvgPool2d(kernel_size=8), nn.Flatten(), nn.Linear(64, classes, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd = self.init_conv(x)
        for layer in self.layers:
            fwd, is_output, output = layer(fwd)
            if is_output:
                softmax = F.softmax(output[0], dim=0)
                confidence = torch.max(softmax)
                if confidence >= self.confidence_threshold:
                    return output
        output = self.end_layers(fwd)
        return output

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every internal classifier's logits, then the end classifier's (no exit taken)."""
        fwd = self.init_conv(x)
        out = []
        for layer in self.layers:
            fwd, _, output = layer(fwd)
            if output is not None:
                out.append(output)
        return [*out, self.end_layers(fwd)]

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``exit1`` .. ``exit6`` (True: returned there).
        The ``is_output`` flags are constants, not decisions."""
        decisions: list[Decision] = []
        fwd = self.init_conv(x)
        for layer in self.layers:
            fwd, _, output = layer(fwd)
            if output is not None:
                confidence = torch.max(F.softmax(output[0], dim=0))
                d = _compare(
                    f"exit{len(decisions) + 1}", confidence, self.confidence_threshold, ge=True
                )
                decisions.append(d)
                if d.outcome:
                    return output, decisions
        return self.end_layers(fwd), decisions


def sdn_resnet56() -> DynamicCase:
    """SDN ResNet-56: 27 blocks with `is_output` flags, 6 internal classifiers; exits at
    any of them or runs to the end (7 paths)."""
    with _OneThread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(707)
            model = SDNResNet56()
            model.eval()
            ics = [layer.output for layer in model.layers if layer.output is not None]
            with torch.no_grad():
                for ic in ics:
                    ic.linear.bias.zero_()
        g = _seeded(7007)
        thresholds = [model.confidence_threshold] * len(ics)
        heads = [ic.linear for ic in ics]

        def ic_logits(x: torch.Tensor) -> list[torch.Tensor]:
            return model.head_logits(x)[:-1]

        _scale_heads(heads, ic_logits, thresholds, _cifar_image(g), top=8.0, ratio=3.0)
        # exits 1..6, then none (runs to the end), then exits 2 and 5 again on other images
        targets = [0, 1, 2, 3, 4, 5, 6, 1, 4]
        branch_inputs = _exit_inputs(ic_logits, thresholds, targets, g)
    return DynamicCase(
        name="sdn_resnet56",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="SDN (ICML 2019) on ResNet-56: 27 blocks with is_output flag tensors, "
        "returns at the first of 6 internal classifiers whose confidence >= 0.8",
    )


def _calibrate_logit(
    weight: torch.Tensor, bias: torch.Tensor, logit: torch.Tensor, spread: float = 2.0
) -> None:
    """Rescale a linear gate (in place: ``weight`` rows and ``bias`` entries that make
    ``logit``, shape ``[calibration inputs, units]``) so that each unit's logit has standard
    deviation ``spread`` over the calibration inputs and median 0: each unit then sends
    about half of the inputs each way, most of them far from its threshold."""
    scale = spread / logit.std(dim=0).clamp_min(1e-12)
    logit = logit * scale
    weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)))
    bias.mul_(scale).sub_(torch.quantile(logit, 0.5, dim=0))


def _distinct_path_inputs(
    decide: Callable[[torch.Tensor], list[Decision]], g: torch.Generator, count: int, tries: int
) -> list[tuple[torch.Tensor, ...]]:
    """The first ``count`` fresh images whose decisions (``decide(image)``) all lie ten
    times ``MIN_MARGIN`` or more from their thresholds and whose paths differ."""
    out: list[tuple[torch.Tensor, ...]] = []
    seen: set[tuple[bool | int, ...]] = set()
    for _ in range(tries):
        x = _cifar_image(g)
        with torch.no_grad():
            decisions = decide(x)
        path = tuple(d.outcome for d in decisions)
        if path in seen or min(d.margin for d in decisions) < 10 * MIN_MARGIN:
            continue
        seen.add(path)
        out.append((x,))
        if len(out) == count:
            return out
    raise RuntimeError(f"found {len(out)} of {count} inputs on distinct paths")  # pragma: no cover


# --------------------------------------------------------------------------------------
# 8. SkipNet-38: 18 hard gates


class _FeedforwardGateII(nn.Module):
    """SkipNet's ``FeedforwardGateII``: conv3x3 (stride 2)-BN-ReLU, global average pool,
    a 1x1 conv to two logits, softmax; returns the probability of running the block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.avg_layer = nn.AdaptiveAvgPool2d(1)
        self.linear_layer = nn.Conv2d(channels, 2, kernel_size=1)
        self.prob_layer = nn.Softmax(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.linear_layer(self.avg_layer(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        softmax = self.prob_layer(self.logits(x))
        return softmax[:, 1]


class SkipNet38(nn.Module):
    """SkipNet on ResNet-38 (Wang et al., "SkipNet: Learning Dynamic Routing in
    Convolutional Networks", ECCV 2018): 18 basic blocks (3 stages x 6, 16/32/64 channels,
    32x32 input), each behind a hard feed-forward gate (``FeedforwardGateII``).

    ``if gate(x) > 0.5: x = block(x)``; a skipped block that changes the shape passes its
    input through SkipNet's ``DownsampleB`` shortcut instead. A pooled Linear head follows.
    Each gate's bias puts its decision threshold at the median over a seeded calibration
    set (earlier gates calibrated first), so every gate sends inputs both ways.
    """

    def __init__(self, classes: int = 10, blocks_per_stage: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, gates, cin = [], [], 16
        for s, width in enumerate(_CIFAR_WIDTHS):
            for b in range(blocks_per_stage):
                gates.append(_FeedforwardGateII(cin))
                blocks.append(_BasicBlock(cin, width, 2 if s > 0 and b == 0 else 1))
                cin = width
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.ModuleList(gates)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for gate, block in zip(self.gates, self.blocks):
            if gate(x) > 0.5:
                x = block(x)
            elif block.downsample is not None:
                x = block.downsample(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``gate1`` .. ``gate18`` (True: block ran)."""
        decisions: list[Decision] = []
        x = F.relu(self.bn1(self.conv1(x)))
        for i, (gate, block) in enumerate(zip(self.gates, self.blocks)):
            decisions.append(_compare(f"gate{i + 1}", gate(x), 0.5))
            if decisions[-1].outcome:
                x = block(x)
            elif block.downsample is not None:
                x = block.downsample(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), decisions


def skipnet38() -> DynamicCase:
    """SkipNet-38: 18 gated basic blocks; 8 images on 8 different paths."""
    with _OneThread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(808)
            model = SkipNet38()
        model.eval()
        g = _seeded(8008)
        calibration = torch.cat([_cifar_image(g) for _ in range(32)])
        with torch.no_grad():
            x = F.relu(model.bn1(model.conv1(calibration)))
            for gate, block in zip(model.gates, model.blocks):
                # the decision is logit 1 > logit 0: calibrate their difference on row 1
                lin = gate.linear_layer
                lin.weight[1] -= lin.weight[0]
                lin.bias[1] -= lin.bias[0]
                lin.weight[0].zero_()
                lin.bias[0].zero_()
                _calibrate_logit(lin.weight[1:], lin.bias[1:], gate.logits(x)[:, 1:])
                run = (gate(x) > 0.5).view(-1, 1, 1, 1)
                skipped = x if block.downsample is None else block.downsample(x)
                x = torch.where(run, block(x), skipped)
        branch_inputs = _distinct_path_inputs(lambda x: model.probe(x)[1], g, count=8, tries=64)
    return DynamicCase(
        name="skipnet38",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="SkipNet (ECCV 2018) on ResNet-38: 18 basic blocks, each run only when "
        "its feed-forward gate's probability > 0.5",
    )


# --------------------------------------------------------------------------------------
# 9. BlockDrop on ResNet-110: a policy over 54 blocks


class _FlatResNet(nn.Module):
    """BlockDrop's ``FlatResNet32``: a 3x3 conv seed, then ``layer_config[s]`` basic blocks
    per stage (16/32/64 channels) called as residual functions, with a ``DownsampleB``
    shortcut (``ds``) into each stage."""

    def __init__(self, layer_config: list[int], classes: int = 10) -> None:
        super().__init__()
        self.layer_config = layer_config
        self.seed = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.blocks = nn.ModuleList()
        self.ds = nn.ModuleList()
        cin = 16
        for s, (width, n) in enumerate(zip(_CIFAR_WIDTHS, layer_config)):
            stride = 1 if s == 0 else 2
            self.ds.append(_DownsampleB(cin, width, stride) if stride != 1 else nn.Sequential())
            self.blocks.append(
                nn.ModuleList(
                    _BasicBlock(
                        cin if b == 0 else width, width, stride if b == 0 else 1, residual_only=True
                    )
                    for b in range(n)
                )
            )
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Every block runs; the pooled features (BlockDrop's agent uses this)."""
        x = self.seed(x)
        for segment, num_blocks in enumerate(self.layer_config):
            for b in range(num_blocks):
                residual = self.ds[segment](x) if b == 0 else x
                x = F.relu(residual + self.blocks[segment][b](x))
        return self.avgpool(x).view(x.size(0), -1)


class BlockDrop110(nn.Module):
    """BlockDrop on ResNet-110 (Wu et al., "BlockDrop: Dynamic Inference Paths in Residual
    Networks", CVPR 2018), forward = BlockDrop's test-time path (``agent`` then
    ``rnet.forward_single``).

    The agent (BlockDrop's ``Policy32``: a ResNet with one block per stage on the image
    pooled to 16x16, then Linear to 54 logits and sigmoid) looks at the image once;
    ``policy = probs >= 0.5`` (BlockDrop thresholds ``policy[policy<0.5] = 0``,
    ``policy[policy>=0.5] = 1``). Then the 54 blocks (3 stages x 18, 16/32/64 channels)
    run in order, each only where its policy bit is 1: ``x = relu(residual + block(x))``,
    else ``x = residual`` (the ``DownsampleB`` shortcut into a stage). The policy logits
    are calibrated to median 0 over a seeded calibration set, so each bit is set for
    about half of the images.
    """

    def __init__(self, classes: int = 10, blocks_per_stage: int = 18) -> None:
        super().__init__()
        self.agent = _FlatResNet([1, 1, 1])
        n = 3 * blocks_per_stage
        self.logit = nn.Linear(64, n)
        self.rnet = _FlatResNet([blocks_per_stage] * 3, classes)

    def policy_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The agent's keep-probability of each block, shape ``[1, 54]``."""
        x = F.avg_pool2d(x, 2)
        return torch.sigmoid(self.logit(self.agent.forward_full(x)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        probs = self.policy_probs(inputs)
        policy = (probs >= 0.5).float().squeeze(0)
        rnet = self.rnet
        x = rnet.seed(inputs)
        t = 0
        for segment, num_blocks in enumerate(rnet.layer_config):
            for b in range(num_blocks):
                residual = rnet.ds[segment](x) if b == 0 else x
                if policy[t] == 1:
                    x = residual + rnet.blocks[segment][b](x)
                    x = F.relu(x)
                else:
                    x = residual
                t += 1
        x = rnet.avgpool(x)
        x = x.view(x.size(0), -1)
        return rnet.fc(x)

    def policy_decisions(self, inputs: torch.Tensor) -> list[Decision]:
        """Decisions ``block1`` .. ``block54`` (True: the block runs), from the agent alone."""
        probs = self.policy_probs(inputs)[0]
        return [_compare(f"block{t + 1}", p, 0.5, ge=True) for t, p in enumerate(probs)]

    def probe(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``block1`` .. ``block54`` (True: block ran)."""
        decisions = self.policy_decisions(inputs)
        rnet, x, t = self.rnet, self.rnet.seed(inputs), 0
        for segment, num_blocks in enumerate(rnet.layer_config):
            for b in range(num_blocks):
                residual = rnet.ds[segment](x) if b == 0 else x
                x = (
                    F.relu(residual + rnet.blocks[segment][b](x))
                    if decisions[t].outcome
                    else residual
                )
                t += 1
        return rnet.fc(rnet.avgpool(x).flatten(1)), decisions


def blockdrop110() -> DynamicCase:
    """BlockDrop on ResNet-110: the agent keeps or drops each of 54 blocks; 8 images on 8
    different paths."""
    with _OneThread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(909)
            model = BlockDrop110()
        model.eval()
        g = _seeded(9009)
        calibration = torch.cat([_cifar_image(g) for _ in range(32)])
        with torch.no_grad():
            features = model.agent.forward_full(F.avg_pool2d(calibration, 2))
            _calibrate_logit(model.logit.weight, model.logit.bias, model.logit(features))
        branch_inputs = _distinct_path_inputs(model.policy_decisions, g, count=8, tries=64)
    return DynamicCase(
        name="blockdrop110",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="BlockDrop (CVPR 2018) on ResNet-110: an agent net decides once which "
        "of 54 basic blocks run (probs >= 0.5)",
    )


# --------------------------------------------------------------------------------------
# 10. MSDNet-style anytime prediction: returns the list of outputs computed so far


class _MSDLayer(nn.Module):
    """One layer of a multi-scale block: at every scale, a conv of that scale plus a
    strided conv of the next finer scale, added to the scale's features."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.same = nn.ModuleList(_ConvBNReLU(w, w) for w in widths)
        self.down = nn.ModuleList(
            _ConvBNReLU(widths[s - 1], widths[s], stride=2) for s in range(1, len(widths))
        )

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [x[0] + self.same[0](x[0])]
        for s in range(1, len(x)):
            out.append(x[s] + self.same[s](x[s]) + self.down[s - 1](x[s - 1]))
        return out


class _MSDClassifier(nn.Module):
    """MSDNet's ``ClassifierModule`` on the coarsest scale: two strided conv3x3-BN-ReLU,
    average pool, Linear."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.m = nn.Sequential(
            _ConvBNReLU(channels, channels, stride=2),
            _ConvBNReLU(channels, channels, stride=2),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Linear(channels, classes, bias=False)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        res = self.m(x[-1])
        return self.linear(res.view(res.size(0), -1))


class MSDNetAnytime(nn.Module):
    """Anytime prediction in the style of MSDNet (Huang et al., "Multi-Scale Dense
    Networks for Resource Efficient Image Classification", ICLR 2018).

    Three scales (32x32x16, 16x16x32, 8x8x64) from MSDNet's first layer, then ``n_blocks``
    multi-scale blocks of two layers each, every block followed by a classifier on the
    coarsest scale. Inference runs block after block and stops after the first classifier
    whose softmax confidence reaches its threshold ``T[i]`` (MSDNet's dynamic evaluation;
    the last threshold is -1e8, so the last classifier always stops it), and returns the
    list of the classifier outputs computed so far: its length is where it stopped.

    Positively homogeneous (bias-free convs and heads, BatchNorm with zero mean and shift,
    ReLU), so the input's amplitude picks the exit; heads are scaled so that deeper ones
    grow confident first.
    """

    def __init__(self, n_blocks: int = 6, classes: int = 10, threshold: float = 0.8) -> None:
        super().__init__()
        self.nBlocks = n_blocks
        self.T = [threshold] * (n_blocks - 1) + [-1e8]
        self.first = nn.ModuleList(
            [_ConvBNReLU(3, 16), _ConvBNReLU(16, 32, stride=2), _ConvBNReLU(32, 64, stride=2)]
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(_MSDLayer(_CIFAR_WIDTHS), _MSDLayer(_CIFAR_WIDTHS))
            for _ in range(n_blocks)
        )
        self.classifier = nn.ModuleList(_MSDClassifier(64, classes) for _ in range(n_blocks))

    def first_layer(self, x: torch.Tensor) -> list[torch.Tensor]:
        """MSDNet's first layer: the input at three scales."""
        out = []
        for layer in self.first:
            x = layer(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.first_layer(x)
        res = []
        for i in range(self.nBlocks):
            x = self.blocks[i](x)
            res.append(self.classifier[i](x))
            if F.softmax(res[-1], dim=1).max() >= self.T[i]:
                break
        return res

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every classifier's logits (no early stop)."""
        x = self.first_layer(x)
        out = []
        for block, classifier in zip(self.blocks, self.classifier):
            x = block(x)
            out.append(classifier(x))
        return out

    def probe(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[Decision]]:
        """Repeat ``forward``; decisions ``exit1`` .. ``exit6`` (True: stopped there)."""
        decisions: list[Decision] = []
        x = self.first_layer(x)
        res = []
        for i in range(self.nBlocks):
            x = self.blocks[i](x)
            res.append(self.classifier[i](x))
            conf = F.softmax(res[-1], dim=1).max()
            decisions.append(_compare(f"exit{i + 1}", conf, self.T[i], ge=True))
            if decisions[-1].outcome:
                break
        return res, decisions


def msdnet_anytime() -> DynamicCase:
    """MSDNet-style anytime net: 6 blocks with a classifier each; returns the 1 to 6
    outputs computed before it stopped."""
    with _OneThread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1010)
            model = MSDNetAnytime()
        model.eval()
        g = _seeded(10010)
        heads = [c.linear for c in model.classifier]
        thresholds = model.T[:-1]

        def early_logits(x: torch.Tensor) -> list[torch.Tensor]:
            return model.head_logits(x)[:-1]

        _scale_heads(heads[:-1], early_logits, thresholds, _cifar_image(g), top=8.0, ratio=3.0)
        # stops after classifier 1..5, after the last one, then after 2 and 4 on other images
        targets = [0, 1, 2, 3, 4, 5, 1, 3]
        branch_inputs = _exit_inputs(early_logits, thresholds, targets, g)
    return DynamicCase(
        name="msdnet_anytime",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="MSDNet-style anytime net (ICLR 2018): 6 multi-scale blocks with a "
        "classifier each, stops at the first confident one and returns the list of "
        "outputs so far",
    )


# --------------------------------------------------------------------------------------
# 11. Show-and-tell greedy caption decoder: stops at <end> or at the maximum length


class _CaptionEncoder(nn.Module):
    """The image encoder of the caption model: a small CNN (16/32/64 channels), global
    average pool, then Linear and BatchNorm1d to the word embedding size, as in the
    PyTorch tutorial's ``EncoderCNN`` (there on a pretrained ResNet-152)."""

    def __init__(self, embed_size: int) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            _ConvBNReLU(3, 16), _ConvBNReLU(16, 32, stride=2), _ConvBNReLU(32, 64, stride=2)
        )
        self.linear = nn.Linear(64, embed_size)
        self.bn = nn.BatchNorm1d(embed_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(self.cnn(images), 1).flatten(1)
        return self.bn(self.linear(features))


class ShowTellCaptioner(nn.Module):
    """Greedy caption decoding in the style of Show and Tell (Vinyals et al., "Show and
    Tell: A Neural Image Caption Generator", CVPR 2015), as the PyTorch tutorial's
    ``DecoderRNN.sample`` writes it, with an LSTMCell and a stop at the end token.

    The image feature is the LSTM's first input; then each step feeds the embedding of
    the previous argmax word. Decoding stops after the step that produces ``<end>``
    (``end_id``) or after ``max_seq_length`` steps; the result is the ``[1, length]``
    tensor of word ids (``torch.stack(sampled_ids, 1)``), shorter when it stopped early.

    LSTM unit 0 counts: its input and forget gates are saturated open and its cell input
    is ``tanh(x[0] - 1)``, which every word embedding makes 0.2 per step, so its cell state
    starts at ``tanh(feature[0] - 1)`` and grows by 0.2 per word; ``<end>``'s logit is
    ``20 * (h[0] - tanh(1))``. The encoder passes input channel 0's (ReLU'd) mean to
    feature 0, so the image's channel 0 level sets the caption's length.
    """

    def __init__(
        self, vocab_size: int = 100, embed_size: int = 64, hidden_size: int = 64,
        max_seq_length: int = 8, end_id: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.encoder = _CaptionEncoder(embed_size)
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTMCell(embed_size, hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seq_length = max_seq_length
        self.end_id = end_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        sampled_ids = []
        inputs = features
        states = None
        for _ in range(self.max_seq_length):
            hiddens, cells = self.lstm(inputs, states)
            states = (hiddens, cells)
            outputs = self.linear(hiddens)
            _, predicted = outputs.max(1)
            sampled_ids.append(predicted)
            if predicted == self.end_id:
                break
            inputs = self.embed(predicted)
        return torch.stack(sampled_ids, 1)

    def probe(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decisions ``end1`` .. (True: the step's word was ``<end>``;
        margin: the gap between ``<end>``'s logit and the best other word's)."""
        decisions: list[Decision] = []
        features = self.encoder(images)
        sampled_ids, inputs, states = [], features, None
        for step in range(self.max_seq_length):
            hiddens, cells = self.lstm(inputs, states)
            states = (hiddens, cells)
            outputs = self.linear(hiddens)
            _, predicted = outputs.max(1)
            sampled_ids.append(predicted)
            others = torch.cat([outputs[0, : self.end_id], outputs[0, self.end_id + 1 :]])
            gap = float(outputs[0, self.end_id] - others.max())
            decisions.append(Decision(f"end{step + 1}", bool(predicted == self.end_id), abs(gap)))
            if decisions[-1].outcome:
                break
            inputs = self.embed(predicted)
        return torch.stack(sampled_ids, 1), decisions


def show_tell() -> DynamicCase:
    """Greedy LSTM caption decoder: stops at <end> after 2 to 8 words, or runs to the
    maximum length of 8 without it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1111)
        model = ShowTellCaptioner()
    model.eval()
    import math

    h, step, saturate = model.lstm.hidden_size, 0.2, 20.0
    with torch.no_grad():
        # encoder: input channel 0 -> (ReLU'd) feature 0, through the centre taps
        for layer in model.encoder.cnn:
            conv = layer[0]
            conv.weight[0].zero_()
            conv.weight[0, 0, 1, 1] = 1.0
        model.encoder.linear.weight[0].zero_()
        model.encoder.linear.weight[0, 0] = 1.0
        model.encoder.linear.bias[0] = 0.0
        # LSTM unit 0 (gate rows i, f, g, o): i, f, o saturated open; g = tanh(x[0] - 1)
        for gate in range(4):
            row = gate * h
            model.lstm.weight_ih[row].zero_()
            model.lstm.weight_hh[row].zero_()
            model.lstm.bias_hh[row] = 0.0
            model.lstm.bias_ih[row] = saturate
        model.lstm.weight_ih[2 * h, 0] = 1.0
        model.lstm.bias_ih[2 * h] = -1.0
        # every word's embedding adds `step` to unit 0's cell
        model.embed.weight[:, 0] = 1.0 + math.atanh(step)
        # <end> wins once h[0] = tanh(c[0]) > tanh(1); other words' logits stay small
        model.linear.weight.mul_(0.1)
        model.linear.bias.mul_(0.1)
        model.linear.weight[model.end_id].zero_()
        model.linear.weight[model.end_id, 0] = saturate
        model.linear.bias[model.end_id] = -saturate * math.tanh(1.0)
    g = _seeded(11011)
    branch_inputs = []
    # stop at step k (0-based) when c_k = c_0 + 0.2 k first exceeds 1: c_0 = 1.1 - 0.2 k;
    # k = 8: never within max_seq_length
    for k in [1, 2, 3, 4, 5, 6, 7, 8, 3]:
        feature0 = 1.0 + math.atanh(1.1 - step * k)
        x = torch.randn(1, 3, 32, 32, generator=g)
        x[:, 0] = feature0 + 0.05 * x[:, 0]
        branch_inputs.append((x,))
    return DynamicCase(
        name="show_tell",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="Show and Tell (CVPR 2015) greedy decoder: LSTMCell steps, argmax word, "
        "stops at <end> or after 8 words; returns the word ids",
    )


#: the paper-size models (issue 17): tens of decision sites each, heavier than ZOO's
ZOO_LARGE: dict[str, Callable[[], DynamicCase]] = {
    "sdn_resnet56": sdn_resnet56,
    "skipnet38": skipnet38,
    "blockdrop110": blockdrop110,
    "msdnet_anytime": msdnet_anytime,
    "show_tell": show_tell,
}


class CapacityMoE(nn.Module):
    """Switch top-1 MoE with an expert capacity (Fedus et al., JMLR 2022; GShard, Lepikhin
    et al., ICLR 2021): each expert takes at most ``capacity`` tokens, in token order;
    tokens routed to a full expert are dropped (they pass through the residual only).

    A token's place in its expert's queue is a cumulative sum over the one-hot routes;
    ``keep = place <= capacity``; expert ``i`` runs on ``keep[:, i].nonzero()`` and its
    result is written back with ``out[idx] = ...``. Router row ``i`` reads mostly
    coordinate ``i`` of the token.
    """

    def __init__(self, dim: int = 16, experts: int = 4, hidden: int = 32, capacity: int = 2):
        super().__init__()
        self.capacity = capacity
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
            for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        probs = torch.softmax(self.router(h), dim=-1)
        gate, route = probs.max(dim=-1)
        onehot = F.one_hot(route, num_classes=len(self.experts))
        place = torch.cumsum(onehot, dim=0) * onehot  # 1-based place in the expert's queue
        keep = (place > 0) & (place <= self.capacity)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            idx = keep[:, i].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            out[idx] = expert(h[idx]) * gate[idx].unsqueeze(-1)
        return x + out

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Decision]]:
        """Repeat ``forward``; decision ``token{t}`` per token: its expert, or -1 when the
        expert was full (margin: top-1 minus top-2 router logit)."""
        logits = self.router(self.norm(x))
        top = logits.topk(2, dim=-1).values
        route = logits.argmax(-1).tolist()
        taken = [0] * len(self.experts)
        decisions = []
        for t, e in enumerate(route):
            taken[e] += 1
            outcome = e if taken[e] <= self.capacity else -1
            decisions.append(Decision(f"token{t}", outcome, float(top[t, 0] - top[t, 1])))
        return self(x), decisions


def capacity_moe() -> DynamicCase:
    """Capacity-limited Switch MoE over 8 tokens, 4 experts of capacity 2: inputs with no
    drop, with dropped tokens and idle experts, and with every token sent to one expert."""
    dim, n, tokens = 16, 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(909)
        model = CapacityMoE(dim=dim, experts=n, capacity=2)
        with torch.no_grad():
            model.router.weight.mul_(0.05)
            for i in range(n):
                model.router.weight[i, i] = 4.0
    model.eval()
    g = _seeded(9009)
    routes = [
        [0, 1, 2, 3, 3, 2, 1, 0],  # two tokens per expert: nothing dropped
        [0, 0, 0, 2, 2, 2, 0, 1],  # experts 0 and 2 overflow, expert 3 idle
        [3] * tokens,  # two tokens kept, six dropped
    ]
    branch_inputs = []
    for r in routes:
        x = torch.randn(tokens, dim, generator=g)
        x[torch.arange(tokens), torch.tensor(r)] = 4.0
        branch_inputs.append((x,))
    return DynamicCase(
        name="capacity_moe",
        model=model,
        example=branch_inputs[0],
        branch_inputs=branch_inputs,
        description="capacity-limited Switch MoE (JMLR 2022, GShard): cumsum queue places, "
        "keep[:, i].nonzero() dispatch, out[idx] = ..., overflow tokens dropped",
    )


SELECT_ZOO["capacity_moe"] = capacity_moe
