"""The splice dialect: custom ops that structural passes introduce.

Each op is registered with ``torch.library`` under the ``splice`` namespace and has

* a **schema**;
* a **reference implementation** in plain torch ops — the ground truth every backend is
  tested against (registered for ``CompositeExplicitAutograd``, so ``torch.export`` keeps
  the op as one node instead of decomposing it);
* a **fake implementation** for shape propagation;
* an **autograd formula**, so that programs containing the op can be fine-tuned: an explicit
  backward where the op defines one (``lowrank_linear``: closed-form gradients), else the
  vjp of the reference (the backward re-runs the reference forward under autograd);
* a **cost function** (FLOPs, bytes) that the cost model reads.

The schema is the one spelling of an op's signature: the reference's Python signature is
checked against it when the op is defined (:meth:`OpDef.check_signature`), and the fake
and cost functions receive the call's arguments bound to it (:meth:`OpDef.bind`), so
they do not repeat it.

Backends register their own lowering per op in :mod:`splice.ir.lowerings` (from the
backend modules under ``runtime/backends``); they never change what an op means. The
registry :data:`OPS` maps ``"splice::name"`` to its :class:`OpDef`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

NAMESPACE = "splice"

_lib = torch.library.Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class OpCost:
    flops: int
    bytes_read: int
    bytes_written: int


class OpArgs(SimpleNamespace):
    """The arguments of one call of a splice op, bound by name to its schema (one attribute
    per schema argument, defaults filled in): what :meth:`OpDef.bind` returns."""


@dataclass(frozen=True)
class OpParam:
    """One argument of an op's schema: its name and, unless ``required``, its default."""

    name: str
    required: bool
    default: Any = None


@dataclass(frozen=True)
class OpDef:
    """One op of the dialect.

    ``fake`` and ``cost`` take the op's arguments as the op does (positional or by name);
    ``differentiable`` lists the positional arguments that receive gradients; ``backward``
    is the op's explicit backward (:data:`Backward`), None when the gradients are the vjp
    of the reference.
    """

    name: str
    schema: str
    reference: Callable[..., Any]
    fake: Callable[..., Any]
    cost: Callable[..., OpCost] | None
    doc: str
    differentiable: tuple[int, ...] = ()
    backward: Backward | None = None

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    @property
    def params(self) -> tuple[OpParam, ...]:
        """The schema's arguments, in order."""
        return _schema_params(f"{self.name}{self.schema}")

    def signature(self) -> inspect.Signature:
        """The schema as an annotated Python signature (for APIs that infer a schema from a
        function's signature, as ``torch.library.triton_op`` does)."""
        return _schema_signature(f"{self.name}{self.schema}")

    def bind(self, *args: Any, **kwargs: Any) -> OpArgs:
        """The arguments of a call ``op(*args, **kwargs)`` by schema name, defaults filled.

        Raises TypeError, as Python does for a function, on too many arguments, an unknown
        or repeated name, or a missing required argument.
        """
        return _bind(self.qualname, self.params, args, kwargs)

    def check_signature(self, fn: Callable[..., Any]) -> None:
        """Raise TypeError unless ``fn`` takes the schema's arguments: same names in the
        same order, same defaults; ``fn`` may add keyword-only parameters with defaults
        (a kernel launcher's tuning knobs)."""
        _check_signature(self.qualname, self.params, fn)


@functools.cache
def _schema_params(text: str) -> tuple[OpParam, ...]:
    schema = torch._C.parse_schema(text)
    return tuple(
        OpParam(a.name, True)
        if not a.has_default_value()
        else OpParam(a.name, False, a.default_value)
        for a in schema.arguments
    )


_PY_TYPES: dict[str, type] = {
    "Tensor": torch.Tensor,
    "int": int,
    "SymInt": int,
    "float": float,
    "str": str,
    "bool": bool,
}


def _py_type(t: str) -> Any:
    if t.startswith("Optional[") and t.endswith("]"):
        return _py_type(t[len("Optional[") : -1]) | None
    if t not in _PY_TYPES:
        raise TypeError(f"no Python type for schema type {t!r}")
    return _PY_TYPES[t]


@functools.cache
def _schema_signature(text: str) -> inspect.Signature:
    schema = torch._C.parse_schema(text)
    params = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.KEYWORD_ONLY
            if a.kwarg_only
            else inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
            annotation=_py_type(str(a.type)),
        )
        for a in schema.arguments
    ]
    returns = [_py_type(str(r.type)) for r in schema.returns]
    ret = returns[0] if len(returns) == 1 else tuple[tuple(returns)]
    return inspect.Signature(params, return_annotation=ret)


def _bind(qual: str, params: tuple[OpParam, ...], args: tuple, kwargs: dict[str, Any]) -> OpArgs:
    if len(args) > len(params):
        raise TypeError(f"{qual} takes {len(params)} arguments, {len(args)} given")
    values = {p.name: v for p, v in zip(params, args)}
    names = {p.name for p in params}
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{qual} has no argument {k!r} (it takes {[p.name for p in params]})")
        if k in values:
            raise TypeError(f"{qual} got argument {k!r} twice")
        values[k] = v
    for p in params:
        if p.name not in values:
            if p.required:
                raise TypeError(f"{qual} is missing its argument {p.name!r}")
            values[p.name] = p.default
    return OpArgs(**{p.name: values[p.name] for p in params})


def _check_signature(qual: str, params: tuple[OpParam, ...], fn: Callable[..., Any]) -> None:
    got = list(inspect.signature(fn).parameters.values())
    positional = [p for p in got if p.kind is not p.KEYWORD_ONLY]
    extra = [p for p in got if p.kind is p.KEYWORD_ONLY]

    def spell(ps: Any) -> str:
        return ", ".join(str(p) for p in ps)

    want = [
        inspect.Parameter(
            p.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if p.required else p.default,
        )
        for p in params
    ]
    same = len(positional) == len(want) and all(
        g.name == w.name and g.kind is w.kind and _same_default(g.default, w.default)
        for g, w in zip(positional, want)
    )
    if not same or any(p.default is inspect.Parameter.empty for p in extra):
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"{name} does not take the arguments of {qual}: it takes ({spell(got)}), the "
            f"schema says ({spell(want)}) (extra parameters must be keyword-only with defaults)"
        )


def _same_default(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b if a is not inspect.Parameter.empty else a is b


OPS: dict[str, OpDef] = {}

#: An op's explicit backward: ``backward(inputs, grad, needs)`` takes the op's positional
#: inputs (as the op received them), the gradient of its output and, per input, whether
#: that input needs a gradient; it returns one gradient (or None) per input. It must equal
#: the vjp of the op's reference (tests/test_op_backward.py checks this with gradcheck).
Backward = Callable[[tuple, torch.Tensor, tuple[bool, ...]], tuple]

#: explicit backwards by reference function, so that a backend re-registering a splice op
#: (``register_vjp(name, op.reference, ...)``) gets the same backward
_BACKWARDS: dict[Callable[..., Any], Backward] = {}


def define_op(
    name: str,
    schema: str,
    *,
    reference: Callable[..., Any],
    fake: Callable[[OpArgs], Any],
    cost: Callable[[OpArgs], OpCost] | None = None,
    differentiable: tuple[int, ...] = (),
    backward: Backward | None = None,
) -> OpDef:
    """Register ``splice::name`` with its schema, reference, fake and autograd.

    ``reference`` takes the schema's arguments (checked: same names, order and defaults);
    ``fake`` and ``cost`` take one :class:`OpArgs`, the call's arguments bound to the
    schema. ``differentiable`` lists the positional arguments that receive gradients;
    ``backward`` (optional) computes them explicitly instead of the reference's vjp.
    """
    qual = f"{NAMESPACE}::{name}"
    params = _schema_params(f"{name}{schema}")
    _check_signature(qual, params, reference)

    def bound_fake(*args: Any, **kwargs: Any) -> Any:
        return fake(_bind(qual, params, args, kwargs))

    def bound_cost(*args: Any, **kwargs: Any) -> OpCost:
        assert cost is not None
        return cost(_bind(qual, params, args, kwargs))

    if backward is not None:
        _BACKWARDS[reference] = backward
    _lib.define(f"{name}{schema}")
    torch.library.impl(qual, "CompositeExplicitAutograd", lib=_lib)(reference)
    torch.library.register_fake(qual, lib=_lib)(bound_fake)
    if differentiable:
        register_vjp(qual, reference, differentiable)
    op = OpDef(
        name,
        schema,
        reference,
        bound_fake,
        bound_cost if cost is not None else None,
        (reference.__doc__ or "").strip(),
        differentiable,
        backward,
    )
    OPS[qual] = op
    return op


def register_vjp(
    qual: str,
    reference: Callable[..., Any],
    diff: tuple[int, ...],
    backward: Backward | None = None,
) -> None:
    """Register the autograd of op ``qual``: ``backward`` (:data:`Backward`), else the
    explicit backward ``define_op`` recorded for ``reference``, else the vjp of
    ``reference`` (re-run under autograd in the backward) for the positional arguments
    ``diff`` (``define_op`` does this; a backend
    that registers a forward-only copy of a splice op, such as a Triton kernel, gives it the
    same gradients)."""
    explicit = backward if backward is not None else _BACKWARDS.get(reference)

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.inputs = inputs

    def vjp_backward(ctx: Any, grad: torch.Tensor) -> tuple:
        # re-run the reference under autograd on detached copies of the inputs that need a
        # gradient (torch.autograd.grad: cheaper than torch.func.vjp, and only the wanted
        # gradients are computed); create_graph when the backward itself is differentiated
        inputs = ctx.inputs
        idx = [i for i in diff if isinstance(inputs[i], torch.Tensor) and ctx.needs_input_grad[i]]
        out: list[Any] = [None] * len(inputs)
        if not idx:
            return tuple(out)
        higher = torch.is_grad_enabled()
        with torch.enable_grad():
            args = list(inputs)
            for i in idx:
                args[i] = inputs[i] if higher else inputs[i].detach().requires_grad_()
            y = reference(*args)
            grads = torch.autograd.grad(
                y, [args[i] for i in idx], grad, allow_unused=True, create_graph=higher
            )
        for i, g in zip(idx, grads):
            out[i] = g if g is not None else torch.zeros_like(inputs[i])
        return tuple(out)

    def explicit_backward(ctx: Any, grad: torch.Tensor) -> tuple:
        assert explicit is not None
        inputs = ctx.inputs
        needs = tuple(
            bool(i in diff and isinstance(v, torch.Tensor) and ctx.needs_input_grad[i])
            for i, v in enumerate(inputs)
        )
        return tuple(explicit(inputs, grad, needs))

    torch.library.register_autograd(
        qual,
        explicit_backward if explicit is not None else vjp_backward,
        setup_context=setup_context,
        lib=_lib,
    )


def is_splice_op(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE


def op_def(target: Any) -> OpDef | None:
    """The OpDef of a node target, if it is a splice op."""
    if not is_splice_op(target):
        return None
    return OPS.get(f"{NAMESPACE}::{target._schema.name.split('::')[1]}")


# ---------------------------------------------------------------------------------------
# splice::lowrank_linear


def _lowrank_linear_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """y = (x Bᵀ) Aᵀ + bias with A: [out, k], B: [k, in].

    Singular directions are stored by importance, so ``rank`` r < k uses the prefix
    A[:, :r], B[:r] (nested truncation, as in Maestro).
    """
    k = A.shape[1]
    r = k if rank is None else max(0, min(int(rank), k))
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, B[:r]), A[:, :r])
    return y if bias is None else y + bias


def _arange(r: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(r, device=like.device)


def _lowrank_linear_backward(
    inputs: tuple, grad: torch.Tensor, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, ...]:
    """Closed-form gradients of ``lowrank_linear`` (y = (x B_rᵀ) A_rᵀ + bias, r = rank):
    with g = ∂L/∂y and h = x B_rᵀ, ∂x = (g A_r) B_r, ∂A[:, :r] = gᵀ h, ∂B[:r] = (g A_r)ᵀ x,
    ∂bias = Σ g over the leading dimensions; the columns of A and rows of B past r get 0."""
    x, A, B = inputs[0], inputs[1], inputs[2]
    bias = inputs[3] if len(inputs) > 3 else None
    rank = inputs[4] if len(inputs) > 4 else None
    k = A.shape[1]
    r = k if rank is None else max(0, min(int(rank), k))
    Ar, Br = A[:, :r], B[:r]
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    gx = gA = gB = gb = None
    gh = g2 @ Ar if (needs[0] or needs[2]) else None  # [N, r]
    if needs[0]:
        assert gh is not None
        gx = (gh @ Br).reshape(x.shape)
    if needs[1]:
        gAr = g2.T @ (x2 @ Br.T)
        gA = gAr if r == k else torch.zeros_like(A).index_copy_(1, _arange(r, A), gAr)
    if needs[2]:
        assert gh is not None
        gBr = gh.T @ x2
        gB = gBr if r == k else torch.cat([gBr, B.new_zeros((k - r, B.shape[1]))])
    if len(needs) > 3 and needs[3] and bias is not None:
        gb = g2.sum(0).reshape(bias.shape).to(bias.dtype)
    out: list[torch.Tensor | None] = [gx, gA, gB, gb, None]
    return tuple(out[: len(inputs)])


def _lowrank_linear_fake(a: OpArgs) -> torch.Tensor:
    x, A, B = a.x, a.A, a.B
    torch._check(A.dim() == 2 and B.dim() == 2, lambda: "lowrank_linear: A and B must be matrices")
    torch._check(
        A.shape[1] == B.shape[0],
        lambda: f"lowrank_linear: A is {tuple(A.shape)}, B is {tuple(B.shape)}",
    )
    torch._check(
        x.shape[-1] == B.shape[1],
        lambda: f"lowrank_linear: x has {x.shape[-1]} features, B takes {B.shape[1]}",
    )
    return x.new_empty((*x.shape[:-1], A.shape[0]))


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _lowrank_linear_cost(a: OpArgs) -> OpCost:
    x, A, B, bias, rank = a.x, a.A, a.B, a.bias, a.rank
    rows = _numel(x.shape[:-1])
    m, k = int(A.shape[0]), int(A.shape[1])
    n = int(B.shape[1])
    r = k if rank is None else min(int(rank), k)
    item = x.element_size() if hasattr(x, "element_size") else 4
    flops = 2 * rows * r * (m + n) + (rows * m if bias is not None else 0)
    read = item * (rows * n + r * (m + n) + (m if bias is not None else 0))
    return OpCost(flops, read, item * rows * m)


lowrank_linear = define_op(
    "lowrank_linear",
    "(Tensor x, Tensor A, Tensor B, Tensor? bias=None, SymInt? rank=None) -> Tensor",
    reference=_lowrank_linear_ref,
    fake=_lowrank_linear_fake,
    cost=_lowrank_linear_cost,
    differentiable=(0, 1, 2, 3),
    backward=_lowrank_linear_backward,
)


# ---------------------------------------------------------------------------------------
# splice::moe_ffn

#: activations ``splice::moe_ffn`` knows, by the name its ``act`` argument takes
MOE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    "relu2": lambda h: torch.relu(h).square(),
}
MOE_SCALES = ("none", "e_over_k", "renorm")


def moe_gates(
    x2: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    top_k: int,
    top_p: float,
    scale: str,
    weighted: bool,
    router_norm: bool = True,
) -> torch.Tensor:
    """The routing of ``splice::moe_ffn`` for rows ``x2`` [N, d]: gates [N, E], 0 where an
    expert is not selected (every backend computes exactly this rule).

    * logits = (x / max(‖x‖, 1e-12)) · router_wᵀ + router_b (``router_norm=True``: the
      MoEfication-style router on normalised x that the ``experts`` pass builds) or
      x · router_wᵀ + router_b (``router_norm=False``: a plain linear router, as Mixtral's
      and Qwen2-MoE's); P = softmax(logits);
    * rank(e) = #experts with a larger logit, or an equal logit and a lower index (ties go to
      the lower index, so the order is total and the same on every backend);
    * ``top_k > 0``: e is selected iff rank(e) < top_k;
    * else top-p: e is selected iff the probability of the experts ranked before it is
      ≤ ``top_p`` (i.e. keep experts through the first whose cumulative probability exceeds
      p; at least one; all when p ≥ 1);
    * gate = 1 (``weighted=False``: a hard mask, MoEfication/FactorLLM) or P(e)
      (``weighted=True``: the raw softmax probability, not renormalised, as in top-p
      routing); ``scale="e_over_k"`` multiplies it by E / (experts selected in that row);
      ``scale="renorm"`` divides it by the sum of the row's gates, so the selected gates sum
      to 1 (with ``weighted=True``: P(e) / Σ_selected P, i.e. the softmax over the selected
      logits — Mixtral's top-k routing, Qwen2-MoE's ``norm_topk_prob``).
    """
    E = router_w.shape[0]
    xn = (
        x2 / torch.linalg.vector_norm(x2, dim=-1, keepdim=True).clamp_min(1e-12)
        if router_norm
        else x2
    )
    logits = torch.nn.functional.linear(xn, router_w, router_b)
    sel, probs = moe_select(logits, top_k, top_p)
    gates = torch.where(sel, probs if weighted else torch.ones_like(probs), 0.0)
    if scale == "e_over_k":
        gates = gates * (E / sel.sum(-1, keepdim=True).to(gates.dtype))
    elif scale == "renorm":
        gates = gates / gates.sum(-1, keepdim=True)
    return gates.to(x2.dtype)


def moe_select(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected [.., E] bool, softmax probabilities) for router ``logits`` [.., E]: the
    top-k / top-p rule of :func:`moe_gates` (ties to the lower index)."""
    E = logits.shape[-1]
    li = logits.unsqueeze(-1)  # [.., E, 1]: expert e
    lj = logits.unsqueeze(-2)  # [.., 1, E]: expert e'
    idx = torch.arange(E, device=logits.device)
    before = (lj > li) | ((lj == li) & (idx[None, :] < idx[:, None]))  # [.., e, e']
    probs = torch.softmax(logits, dim=-1)
    if top_k > 0:
        sel = before.sum(-1) < top_k
    elif top_p >= 1.0:
        sel = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    else:
        mass_before = (probs.unsqueeze(-2) * before.to(probs.dtype)).sum(-1)
        sel = mass_before <= top_p
    return sel, probs


def _moe_ffn_ref(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    act: str,
    top_k: int = 0,
    top_p: float = 0.0,
    scale: str = "none",
    weighted: bool = False,
    router_norm: bool = True,
) -> torch.Tensor:
    """A routed FFN whose E experts are disjoint neuron slices of one dense FFN.

    Shapes: x [.., d]; router_w [E, d], router_b [E]; w_in, w_gate [E, s, d] (expert e's
    rows of W_in / W_gate), b_in, b_gate [E, s]; w_out [E, s, d_out] (expert e's columns of
    W_out, transposed); b_out [d_out]. Expert e computes
    ``a_e = act(x w_inₑᵀ + b_inₑ)`` (plain) or ``a_e = act(x w_gateₑᵀ + b_gateₑ) ⊙
    (x w_inₑᵀ + b_inₑ)`` (gated: SwiGLU/GeGLU), and the op returns
    ``y = Σ_e gate_e(x) · a_e w_outₑ + b_out`` with the gates of :func:`moe_gates` (exactly
    one of ``top_k > 0`` / ``0 < top_p``; ``router_norm`` chooses the router's input, see
    there). The output bias is added once, outside the experts. With every expert selected
    and unit gates this is the dense FFN (MoEfication); with ``router_norm=False``,
    ``weighted=True`` and ``scale="renorm"`` it is Mixtral's sparse-MoE block (Jiang et al.
    2024, softmax over the top-k router logits) on stacked expert weights.

    This reference evaluates every expert and weights it by its gate (0 when unselected):
    the ground truth, not a fast path; the backends compute only the selected experts.
    """
    d = x.shape[-1]
    E, s, d_out = w_out.shape
    x2 = x.reshape(-1, d)
    gates = moe_gates(x2, router_w, router_b, top_k, top_p, scale, weighted, router_norm)  # [N, E]
    h = torch.nn.functional.linear(
        x2, w_in.reshape(E * s, d), None if b_in is None else b_in.reshape(E * s)
    )
    if w_gate is not None:
        g = torch.nn.functional.linear(
            x2, w_gate.reshape(E * s, d), None if b_gate is None else b_gate.reshape(E * s)
        )
        a = MOE_ACTIVATIONS[act](g) * h
    else:
        a = MOE_ACTIVATIONS[act](h)
    a = (a.view(-1, E, s) * gates.unsqueeze(-1)).reshape(-1, E * s)
    y = a @ w_out.reshape(E * s, d_out)
    if b_out is not None:
        y = y + b_out
    return y.reshape(*x.shape[:-1], d_out)


def _moe_ffn_fake(a: OpArgs) -> torch.Tensor:
    x, router_w, w_in, w_gate, w_out = a.x, a.router_w, a.w_in, a.w_gate, a.w_out
    act, top_k, top_p, scale = a.act, a.top_k, a.top_p, a.scale
    torch._check(
        w_in.dim() == 3 and w_out.dim() == 3, lambda: "moe_ffn: w_in and w_out are [E, s, .]"
    )
    E, s, d = w_in.shape
    torch._check(
        tuple(w_out.shape[:2]) == (E, s),
        lambda: f"moe_ffn: w_in is {tuple(w_in.shape)}, w_out is {tuple(w_out.shape)}",
    )
    torch._check(
        tuple(router_w.shape) == (E, d),
        lambda: f"moe_ffn: router_w is {tuple(router_w.shape)}, expected {(E, d)}",
    )
    torch._check(
        x.shape[-1] == d, lambda: f"moe_ffn: x has {x.shape[-1]} features, the experts take {d}"
    )
    torch._check(
        w_gate is None or tuple(w_gate.shape) == (E, s, d),
        lambda: f"moe_ffn: w_gate must be {(E, s, d)}",
    )
    torch._check(act in MOE_ACTIVATIONS, lambda: f"moe_ffn: unknown activation {act!r}")
    torch._check(
        (top_k > 0) != (top_p > 0), lambda: "moe_ffn: give exactly one of top_k > 0, top_p > 0"
    )
    torch._check(top_k <= E, lambda: f"moe_ffn: top_k={top_k} > {E} experts")
    torch._check(scale in MOE_SCALES, lambda: f"moe_ffn: scale must be one of {MOE_SCALES}")
    return x.new_empty((*x.shape[:-1], w_out.shape[2]))


def _moe_ffn_cost(a: OpArgs) -> OpCost:
    """Per row: the router (2·E·d) and k experts (2·s·(d·(1 + gated) + d_out)); top-p
    counts all E experts (its upper bound). Bytes: the router and the weights of at most
    min(E, rows·k) experts (a decode step reads only its k experts)."""
    x, w_in, w_gate, w_out, b_in, b_out, top_k = (
        a.x, a.w_in, a.w_gate, a.w_out, a.b_in, a.b_out, a.top_k
    )  # fmt: skip
    rows = _numel(x.shape[:-1])
    E, s, d = (int(v) for v in w_in.shape)
    d_out = int(w_out.shape[2])
    k = int(top_k) if top_k and int(top_k) > 0 else E
    n_in = 2 if w_gate is not None else 1
    item = x.element_size() if hasattr(x, "element_size") else 4
    per_expert = s * (n_in * d + d_out) + (s * n_in if b_in is not None else 0)
    flops = rows * (2 * E * d + k * 2 * per_expert)
    read = item * (
        rows * d + E * d + min(E, rows * k) * per_expert + (d_out if b_out is not None else 0)
    )
    return OpCost(flops, read, item * rows * d_out)


moe_ffn = define_op(
    "moe_ffn",
    "(Tensor x, Tensor router_w, Tensor? router_b, Tensor w_in, Tensor? b_in, Tensor? w_gate, "
    "Tensor? b_gate, Tensor w_out, Tensor? b_out, str act, int top_k=0, float top_p=0., "
    'str scale="none", bool weighted=False, bool router_norm=True) -> Tensor',
    reference=_moe_ffn_ref,
    fake=_moe_ffn_fake,
    cost=_moe_ffn_cost,
    differentiable=(0, 1, 2, 3, 4, 5, 6, 7, 8),
)


__all__ = [
    "MOE_ACTIVATIONS",
    "MOE_SCALES",
    "NAMESPACE",
    "OPS",
    "Backward",
    "OpArgs",
    "OpCost",
    "OpDef",
    "OpParam",
    "define_op",
    "is_splice_op",
    "lowrank_linear",
    "moe_ffn",
    "moe_gates",
    "moe_select",
    "op_def",
    "register_vjp",
]
