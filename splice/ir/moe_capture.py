"""Recognise routed sparse-MoE blocks at capture time and capture them as ``splice::moe_ffn``.

``transformers`` builds Mixtral's and Qwen2-MoE's experts as one module with stacked expert
weights (``gate_up_proj`` [E, 2·I, d], ``down_proj`` [E, d, I]) whose forward is chosen by
``config._experts_implementation``: the default exports as ``grouped_mm`` (an opaque grouped
matmul no backend but eager lowers) and ``"eager"`` loops over ``nonzero()`` /
``torch.where`` results, which ``torch.export`` refuses (a guard on a data-dependent size).

Both are the same computation, and ``splice::moe_ffn`` expresses it: a router, a top-k
selection and a weighted sum of gated experts (Mixtral, Jiang et al. 2024: softmax over the
top-k router logits; the same op the ``experts`` pass emits for a MoEfied dense FFN, Zhang
et al. 2022). So, while a model is exported (:func:`recognise_moe`, entered by
:func:`splice.capture`), the forward of every recognised sparse-MoE block is replaced by one
that calls ``torch.ops.splice.moe_ffn`` on the block's own parameters — whatever the experts
implementation, the graph holds one ``moe_ffn`` per block, its weights are the module's own
named weights (sliced and transposed by view ops in the graph, never copied), and the TVM
backend's sparse kernel computes a decode step from the selected experts only.

Rules (:data:`RULES`), by block class, each checking the structure it relies on:

* ``mixtral`` (``MixtralSparseMoeBlock``): ``logits = x·Rᵀ``, softmax, top-k, the k
  probabilities renormalised to sum 1 → ``moe_ffn(router_norm=False, weighted=True,
  scale="renorm", top_k=k)``, gated experts ``act(x·W_gateᵀ) ⊙ (x·W_upᵀ)``, W_gate / W_up
  the first / second half of ``gate_up_proj``, ``w_out = down_projᵀ``.
* ``qwen2_moe`` (``Qwen2MoeSparseMoeBlock``): the same routing, renormalised only with
  ``norm_topk_prob`` (else ``scale="none"``: the raw softmax probabilities of the top k),
  plus the shared expert ``sigmoid(x·w_sᵀ) · shared_expert(x)``, kept as ordinary ops (the
  block's own ``shared_expert`` and ``shared_expert_gate`` modules) around ``moe_ffn``.
* ``qwen3_moe`` (``Qwen3MoeSparseMoeBlock``) and ``olmoe`` (``OlmoeSparseMoeBlock``, OLMoE,
  Muennighoff et al. 2024): Qwen2-MoE's routing without the shared expert.

A block of a recognised class whose structure differs (biases, transposed or interleaved
weights, an activation ``moe_ffn`` lacks, router logits requested as outputs) raises a
:class:`~splice.errors.CaptureError` naming its module path. A module that holds a
``transformers`` experts module but is of no known class is left as it is and listed in the
program's ``moe.unrecognised`` attribute: with the ``"eager"`` experts implementation its
``nonzero()`` loop is captured densely by :mod:`splice.ir.dd_sizes` (exact, every expert on
every token), otherwise as ``transformers`` exports it.

Computed in the input dtype: ``transformers`` takes the router's softmax in fp32, so fp16 /
bf16 models differ by rounding (fp32 models agree to rounding).

:func:`disabled` turns the rules off (the blocks are then exported as ``transformers``
writes them). This module is part of the IR layer: it imports nothing from passes or runtime.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from splice.errors import CaptureError
from splice.ir.ops import MOE_ACTIVATIONS

ATTR = "moe"
"""Program attribute listing the recognised blocks: ``{module path: MoESite.to_json()}``."""

ATTR_UNRECOGNISED = "moe.unrecognised"
"""Program attribute listing modules holding experts that no rule recognised."""

#: ``config.hidden_act`` -> the ``act`` of ``splice::moe_ffn`` (checked numerically too)
HIDDEN_ACTS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "quick_gelu": "quick_gelu",
}


@dataclass(frozen=True)
class MoESite:
    """One recognised sparse-MoE block: what its ``moe_ffn`` computes."""

    path: str  # module path of the block ("" for the root)
    rule: str  # the rule that recognised it (RULES key)
    block: str  # the block's class name
    experts: int  # E
    top_k: int
    hidden: int  # d
    inter: int  # I, each expert's intermediate size
    act: str  # moe_ffn activation
    renorm: bool  # the top-k probabilities are renormalised to sum 1
    shared_expert: bool  # a sigmoid-gated shared expert is added (Qwen2-MoE)
    experts_implementation: str | None  # transformers' config._experts_implementation

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["path"]
        return out


@dataclass
class MoERecord:
    """What :func:`recognise_moe` found in a model."""

    sites: dict[str, MoESite] = field(default_factory=dict)
    unrecognised: dict[str, str] = field(default_factory=dict)  # path -> class name

    def annotate(self, program: Any) -> None:
        """Record the recognised (and unrecognised) blocks in ``program.attrs``."""
        if self.sites:
            program.attrs[ATTR] = {p: s.to_json() for p, s in self.sites.items()}
        if self.unrecognised:
            program.attrs[ATTR_UNRECOGNISED] = dict(self.unrecognised)


@dataclass(frozen=True)
class MoERule:
    """How to recognise one family of sparse-MoE blocks and what to call instead."""

    name: str
    blocks: tuple[str, ...]  # block class names
    inspect: Callable[[str, nn.Module], MoESite]  # raises CaptureError on a deviation
    forward: Callable[[nn.Module, MoESite], Callable[..., Any]]


# ---------------------------------------------------------------------------------------
# structure checks


def _where(path: str, module: nn.Module) -> str:
    return f"module {path or '<root>'} ({type(module).__name__})"


def _refuse(path: str, module: nn.Module, what: str, hint: str | None = None) -> CaptureError:
    return CaptureError(
        f"sparse-MoE block not recognised: {what}",
        where=_where(path, module),
        hint=hint
        or "splice captures this block as splice::moe_ffn only in the structure transformers "
        "builds (see splice/ir/moe_capture.py); restore that structure, or capture a model "
        "whose experts are plain modules",
    )


def _param(path: str, block: nn.Module, owner: nn.Module, name: str, ndim: int) -> torch.Tensor:
    t = getattr(owner, name, None)
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        got = "missing" if t is None else f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
        raise _refuse(path, block, f"expected a {ndim}-d tensor {name!r}, found {got}")
    return t


def _activation(path: str, block: nn.Module, experts: nn.Module) -> str:
    """The ``moe_ffn`` activation equal to ``experts.act_fn`` (by name, then checked)."""
    cfg = getattr(experts, "config", None)
    hidden_act = getattr(cfg, "hidden_act", None)
    name = HIDDEN_ACTS.get(str(hidden_act))
    act_fn = getattr(experts, "act_fn", None)
    if name is None or not callable(act_fn):
        raise _refuse(
            path,
            block,
            f"activation {hidden_act!r} has no splice::moe_ffn equivalent",
            hint=f"moe_ffn knows {sorted(MOE_ACTIVATIONS)}",
        )
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    with torch.no_grad():
        ok = torch.allclose(act_fn(probe), MOE_ACTIVATIONS[name](probe), atol=1e-6, rtol=1e-6)
    if not ok:
        raise _refuse(
            path,
            block,
            f"the experts' act_fn ({type(act_fn).__name__}) is not moe_ffn's {name!r}",
            hint=f"moe_ffn knows {sorted(MOE_ACTIVATIONS)}",
        )
    return name


def _stacked_experts(path: str, block: nn.Module, rule: str) -> tuple[nn.Module, int, int, int]:
    """(experts module, E, d, I) of transformers' stacked-experts layout, checked."""
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise _refuse(path, block, "no 'experts' submodule")
    gate_up = _param(path, block, experts, "gate_up_proj", 3)
    down = _param(path, block, experts, "down_proj", 3)
    E, two_i, d = (int(v) for v in gate_up.shape)
    inter = two_i // 2
    if two_i % 2 or tuple(down.shape) != (E, d, inter):
        raise _refuse(
            path,
            block,
            f"expert weights gate_up_proj {tuple(gate_up.shape)} and down_proj "
            f"{tuple(down.shape)} are not [E, 2·I, d] and [E, d, I]",
        )
    layout = {
        "has_bias": False,
        "has_gate": True,
        "is_transposed": False,
        "is_concatenated": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    for attr, want in layout.items():
        got = getattr(experts, attr, want)
        if got != want:
            raise _refuse(path, block, f"experts.{attr} is {got!r} (the {rule} rule needs {want})")
    return experts, E, d, inter


def _router(path: str, block: nn.Module, E: int, d: int) -> tuple[nn.Module, int]:
    """(router module, top_k): a bias-free linear router ``weight`` [E, d]."""
    gate = getattr(block, "gate", None)
    if not isinstance(gate, nn.Module):
        raise _refuse(path, block, "no 'gate' (router) submodule")
    w = _param(path, block, gate, "weight", 2)
    if tuple(w.shape) != (E, d):
        raise _refuse(path, block, f"router weight is {tuple(w.shape)}, expected {(E, d)}")
    if getattr(gate, "bias", None) is not None:
        raise _refuse(path, block, "the router has a bias, which the rule does not expect")
    top_k = int(getattr(gate, "top_k", getattr(block, "top_k", 0)) or 0)
    if not 0 < top_k <= E:
        raise _refuse(path, block, f"top_k={top_k} with {E} experts")
    return gate, top_k


def _no_router_outputs(path: str, block: nn.Module, experts: nn.Module) -> None:
    cfg = getattr(experts, "config", None)
    if getattr(cfg, "output_router_logits", False):
        raise _refuse(
            path,
            block,
            "config.output_router_logits is set: the router logits are a model output",
            hint="set config.output_router_logits = False before capture (the logits feed "
            "only the training loss)",
        )


def _impl(experts: nn.Module) -> str | None:
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    return None if impl is None else str(impl)


def _inspector(
    rule: str, routers: tuple[str, ...], *, always_renorm: bool, shared: bool
) -> Callable[[str, nn.Module], MoESite]:
    """The structure check of a softmax-top-k block: a bias-free router of one of the classes
    ``routers`` (whose forward is softmax, top-k, and a renormalisation always or with
    ``norm_topk_prob``), transformers' stacked experts, and with ``shared`` a shared expert
    gated by ``sigmoid(shared_expert_gate(x))``."""

    def inspect(path: str, block: nn.Module) -> MoESite:
        experts, E, d, inter = _stacked_experts(path, block, rule)
        gate, top_k = _router(path, block, E, d)
        if type(gate).__name__ not in routers:
            raise _refuse(
                path, block, f"router class {type(gate).__name__}, not one of {list(routers)}"
            )
        _no_router_outputs(path, block, experts)
        if shared:
            expert = getattr(block, "shared_expert", None)
            sgate = getattr(block, "shared_expert_gate", None)
            if not isinstance(expert, nn.Module) or not isinstance(sgate, nn.Linear):
                raise _refuse(path, block, "no shared_expert module and shared_expert_gate Linear")
            if (sgate.in_features, sgate.out_features) != (d, 1):
                raise _refuse(
                    path,
                    block,
                    f"shared_expert_gate maps {sgate.in_features} -> {sgate.out_features}, "
                    f"not {d} -> 1",
                )
        act = _activation(path, block, experts)
        renorm = always_renorm or bool(getattr(gate, "norm_topk_prob", False))
        return MoESite(
            path, rule, type(block).__name__, E, top_k, d, inter, act, renorm, shared,
            _impl(experts),
        )  # fmt: skip

    return inspect


# ---------------------------------------------------------------------------------------
# the replacement forwards


def routed_experts(block: nn.Module, site: MoESite, x: torch.Tensor) -> torch.Tensor:
    """``splice::moe_ffn`` on ``block``'s own router and stacked expert weights (the routed
    part of the block, without a shared expert); ``x`` [.., d] -> [.., d]."""
    experts = block.experts
    gate_up = experts.gate_up_proj  # [E, 2I, d]: W_gate rows, then W_up rows
    inter = site.inter
    return torch.ops.splice.moe_ffn(
        x,
        block.gate.weight,
        None,
        gate_up[:, inter:],  # w_in: W_up [E, I, d]
        None,
        gate_up[:, :inter],  # w_gate: W_gate [E, I, d]
        None,
        experts.down_proj.transpose(1, 2),  # w_out [E, I, d]
        None,
        site.act,
        top_k=site.top_k,
        scale="renorm" if site.renorm else "none",
        weighted=True,
        router_norm=False,
    )


def _routed_forward(block: nn.Module, site: MoESite) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return routed_experts(block, site, hidden_states)

    return forward


def _qwen2_moe_forward(block: nn.Module, site: MoESite) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        shared = block.shared_expert(hidden_states)
        routed = routed_experts(block, site, hidden_states)
        return routed + torch.sigmoid(block.shared_expert_gate(hidden_states)) * shared

    return forward


def _rule(
    name: str, block: str, router: str, *, always_renorm: bool = False, shared: bool = False
) -> MoERule:
    inspect = _inspector(name, (router,), always_renorm=always_renorm, shared=shared)
    return MoERule(name, (block,), inspect, _qwen2_moe_forward if shared else _routed_forward)


RULES: dict[str, MoERule] = {
    r.name: r
    for r in (
        _rule("mixtral", "MixtralSparseMoeBlock", "MixtralTopKRouter", always_renorm=True),
        _rule("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter", shared=True),
        _rule("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter"),
        _rule("olmoe", "OlmoeSparseMoeBlock", "OlmoeTopKRouter"),
    )
}
"""The rules, by name. A block is recognised by its class name, then its structure checked."""


# ---------------------------------------------------------------------------------------
# recognition


def _rule_for(module: nn.Module) -> MoERule | None:
    name = type(module).__name__
    return next((r for r in RULES.values() if name in r.blocks), None)


def _is_experts(module: nn.Module) -> bool:
    """A transformers experts module (``@use_experts_implementation``: stacked weights,
    forward dispatched by ``config._experts_implementation``)."""
    return all(hasattr(module, a) for a in ("num_experts", "has_gate", "is_concatenated"))


def find_sites(model: nn.Module) -> MoERecord:
    """The sparse-MoE blocks of ``model``: recognised ones (structure checked; a deviation
    raises CaptureError) and modules holding experts that no rule knows."""
    record = MoERecord()
    inside: list[str] = []  # recognised block paths: their submodules are theirs
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") or p == "" for p in inside):
            continue
        rule = _rule_for(module)
        if rule is not None:
            record.sites[path] = rule.inspect(path, module)
            inside.append(path)
            continue
        if any(_is_experts(c) for c in module.children()):
            record.unrecognised[path] = type(module).__name__
    return record


@contextlib.contextmanager
def recognise_moe(model: nn.Module) -> Iterator[MoERecord]:
    """While active, every recognised sparse-MoE block of ``model`` computes its output with
    ``torch.ops.splice.moe_ffn`` on its own weights (enter it around ``torch.export``; the
    forwards are restored on exit). Yields the :class:`MoERecord`; call its ``annotate`` on
    the captured program. Raises CaptureError for a block it cannot capture. Inside
    :func:`disabled` it changes nothing and yields an empty record."""
    if _DISABLED.get():
        yield MoERecord()
        return
    record = find_sites(model)
    modules = dict(model.named_modules())
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for path, site in record.sites.items():
            block = modules[path]
            saved.append((block, block.__dict__.get("forward", _MISSING)))
            block.forward = RULES[site.rule].forward(block, site)  # type: ignore[method-assign]
        yield record
    finally:
        for block, old in reversed(saved):
            if old is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old  # type: ignore[method-assign]


_MISSING = object()
_DISABLED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "splice_moe_disabled", default=False
)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Capture sparse-MoE blocks as ``transformers`` exports them (``grouped_mm``, ...),
    not as ``splice::moe_ffn``: ``with moe_capture.disabled(): splice.capture(...)``."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


__all__ = [
    "ATTR",
    "ATTR_UNRECOGNISED",
    "HIDDEN_ACTS",
    "RULES",
    "MoERecord",
    "MoERule",
    "MoESite",
    "disabled",
    "find_sites",
    "recognise_moe",
    "routed_experts",
]
