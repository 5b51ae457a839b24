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
