"""Random small models for the property tests: a menu of layers that hypothesis composes.

A model is described by a :class:`ModelSpec` (hashable, printable: it is what a failing
property reports) and built by :func:`build`. Every layer maps ``[B, T, d_in]`` to
``[B, T, d_out]``; the menu covers the graph shapes that passes have got wrong before:
Linears feeding Linears directly, one value with two consumers joined again, one module
used twice (shared weights), convolutions, norms, attention, FFNs (plain and gated, for
``experts``) and extra model outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

KINDS = (
    "linear",  # nn.Linear, no activation after it: chains feed Linear into Linear
    "act",  # relu / gelu / silu / tanh
    "branch",  # two Linears read the same value, joined by add / mul / cat
    "shared",  # one nn.Linear used twice
    "conv1d",  # Conv1d over the sequence axis
    "conv2d",  # Conv2d over (T, 1)
    "layernorm",
    "rmsnorm",  # x * rsqrt(mean(x^2) + eps) * weight, as LLaMA writes it
    "attention",  # q/k/v/o Linears around scaled_dot_product_attention
    "ffn",  # Linear -> act -> Linear, residual
    "gated_ffn",  # SwiGLU: down(silu(gate(x)) * up(x)), residual
    "extra_output",  # the value here is also a model output
    "odd_name",  # a weight named like a GraphModule attribute or a value, cast with .to()
    "constant",  # a buffer and a tensor made in forward (fold-constants' food)
)

# weight names that have clashed with GraphModule attributes, export's names or values
ODD_NAMES = ("code", "graph", "meta", "x", "cond", "output", "_tensor_constant0", "mul", "linear")

ACTS = ("relu", "gelu", "silu", "tanh")
JOINS = ("add", "mul", "cat")


@dataclass(frozen=True)
class Layer:
    kind: str
    width: int  # output width (layers that keep the width ignore it)
    variant: str = ""  # act name, join, bias flag ...

    def __str__(self) -> str:
        return f"{self.kind}({self.width}{',' + self.variant if self.variant else ''})"


@dataclass(frozen=True)
class ModelSpec:
    d: int
    layers: tuple[Layer, ...]
    batch: int = 2
    seq: int = 3
    dynamic: bool = False  # captured with a symbolic batch dimension
    embed: bool = False  # the input is token ids [B, T] < VOCAB, embedded first

    def __str__(self) -> str:
        flags = " dynamic" * self.dynamic + " embed" * self.embed
        head = f"d={self.d} b={self.batch} t={self.seq}{flags}: "
        return head + " -> ".join(map(str, self.layers))

    @property
    def has_ffn(self) -> bool:
        return any(x.kind in ("ffn", "gated_ffn") for x in self.layers)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[name](x)


class Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.name, x)


class Branch(nn.Module):
    def __init__(self, d_in: int, d_out: int, join: str):
        super().__init__()
        self.join = join
        half = max(1, d_out // 2) if join == "cat" else d_out
        self.left = nn.Linear(d_in, half)
        self.right = nn.Linear(d_in, d_out - half if join == "cat" else d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.left(x), self.right(x)
        if self.join == "add":
            return a + b
        if self.join == "mul":
            return a * b
        return torch.cat([a, b], dim=-1)


class Shared(nn.Module):
    def __init__(self, d: int, mode: str):
        super().__init__()
        self.mode = mode
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "twice":
            return self.lin(self.lin(x))
        return self.lin(x) + self.lin(torch.relu(x))


class Conv1dLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.conv = nn.Conv1d(d_in, d_out, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class Conv2dLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.conv = nn.Conv2d(d_in, d_out, kernel_size=(3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2).unsqueeze(-1))  # [B, d, T, 1]
        return y.squeeze(-1).transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))


class FFN(nn.Module):
    def __init__(self, d: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(_act(self.act, self.fc1(x)))


class GatedFFN(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OddName(nn.Module):
    def __init__(self, d: int, name: str):
        super().__init__()
        self.pname = name
        self.register_parameter(name, nn.Parameter(torch.randn(d, d) / math.sqrt(d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, self.pname)
        return x @ (w.to(torch.float64) * 0.5).to(torch.float32).t()


class Constant(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(x.shape[-1], dtype=x.dtype) / x.shape[-1]
        return x * (self.scale * 2 - 1) + ramp


class Marker(nn.Module):
    """The value passing through is also returned as an extra output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


VOCAB = 10


class Composed(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, spec.d) if spec.embed else None
        layers: list[nn.Module] = []
        d = spec.d
        for layer in spec.layers:
            module, d = _make(layer, d)
            layers.append(module)
        self.layers = nn.ModuleList(layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor):
        if self.embed is not None:
            x = self.embed(x)
        extras = []
        for m in self.layers:
            x = m(x)
            if isinstance(m, Marker):
                extras.append(x * 1.0)
        return (x, *extras) if extras else x


def _make(layer: Layer, d: int) -> tuple[nn.Module, int]:
    k, w, v = layer.kind, layer.width, layer.variant
    if k == "linear":
        return nn.Linear(d, w, bias=v != "nobias"), w
    if k == "act":
        return Act(v), d
    if k == "branch":
        return Branch(d, w, v), w
    if k == "shared":
        return Shared(d, v), d
    if k == "conv1d":
        return Conv1dLayer(d, w), w
    if k == "conv2d":
        return Conv2dLayer(d, w), w
    if k == "layernorm":
        return nn.LayerNorm(d), d
    if k == "rmsnorm":
        return RMSNorm(d), d
    if k == "attention":
        heads = 2 if d % 2 == 0 and v != "1" else 1
        return Attention(d, heads, causal=v == "causal"), d
    if k == "ffn":
        return FFN(d, w, v or "relu"), d
    if k == "gated_ffn":
        return GatedFFN(d, w), d
    if k == "extra_output":
        return Marker(), d
    if k == "odd_name":
        return OddName(d, v), d
    if k == "constant":
        return Constant(d), d
    raise ValueError(k)


def build(spec: ModelSpec, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eager model of ``spec`` (seeded weights, eval mode) and one example input."""
    torch.manual_seed(seed)
    model = Composed(spec).eval()
    return model, _input(spec, seed + 1, spec.batch)


def dynamic_shapes(spec: ModelSpec) -> tuple[dict[int, Any], ...] | None:
    """The ``dynamic_shapes`` to capture ``spec`` with (a symbolic batch, or None)."""
    if not spec.dynamic:
        return None
    from torch.export import Dim

    return ({0: Dim("batch", min=1, max=16)},)


def inputs(spec: ModelSpec, seed: int) -> tuple[torch.Tensor, ...]:
    """Random inputs; for a dynamic spec with another batch size than the example's."""
    batch = spec.batch + 1 + seed % 3 if spec.dynamic else spec.batch
    return _input(spec, seed, batch)


def _input(spec: ModelSpec, seed: int, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if spec.embed:
        return (torch.randint(0, VOCAB, (batch, spec.seq), generator=g),)
    return (torch.randn(batch, spec.seq, spec.d, generator=g),)


# ---------------------------------------------------------------------------------------
# strategies

widths = st.sampled_from([4, 6, 8])
hidden = st.sampled_from([8, 12, 16])  # divisible by 2 and 4: expert counts


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    kind = draw(st.sampled_from(KINDS))
    if kind == "act":
        return Layer(kind, 0, draw(st.sampled_from(ACTS)))
    if kind == "branch":
        return Layer(kind, draw(widths), draw(st.sampled_from(JOINS)))
    if kind == "shared":
        return Layer(kind, 0, draw(st.sampled_from(["twice", "sum"])))
    if kind == "linear":
        return Layer(kind, draw(widths), draw(st.sampled_from(["", "nobias"])))
    if kind in ("conv1d", "conv2d"):
        return Layer(kind, draw(widths))
    if kind == "attention":
        return Layer(kind, 0, draw(st.sampled_from(["", "1", "causal"])))
    if kind == "ffn":
        return Layer(kind, draw(hidden), draw(st.sampled_from(ACTS)))
    if kind == "gated_ffn":
        return Layer(kind, draw(hidden))
    if kind == "odd_name":
        return Layer(kind, 0, draw(st.sampled_from(ODD_NAMES)))
    return Layer(kind, 0)


@st.composite
def model_specs(draw: st.DrawFn, min_layers: int = 1, max_layers: int = 5) -> ModelSpec:
    dynamic = draw(st.booleans())
    return ModelSpec(
        d=draw(widths),
        layers=tuple(draw(st.lists(layers(), min_size=min_layers, max_size=max_layers))),
        batch=2 if dynamic else draw(st.sampled_from([1, 2])),  # export specialises size 1
        seq=draw(st.sampled_from([3, 4])),
        dynamic=dynamic,
        embed=draw(st.booleans()),
    )


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """``|a - b| <= tol + tol * max|b|`` (NumericCheck's rule), shapes and dtypes equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    return math.isfinite(err) and err <= tol + tol * scale


__all__ = [
    "KINDS",
    "Layer",
    "ModelSpec",
    "build",
    "close",
    "dynamic_shapes",
    "inputs",
    "layers",
    "model_specs",
]
