"""Capture of models with data-dependent control flow, from their own ``forward``.

A plain ``torch.export`` of such a model stops at the first Python branch on a tensor value
(``if p.max() >= t``, ``self.experts[idx]``, ``break`` in a loop); a plain trace silently
bakes in the one path the example input takes. DyCL (Chen et al., ISSTA 2023) rewrites
``forward``'s AST by hand-written variants and unrolls loops. splice explores paths
instead, and joins them again after each decision, as a compiler's CFG does.

**Decisions.** Every conversion of a tensor to a Python value -- ``bool(t)``, ``int(t)``,
``t.item()``, ``modules[t]``, and the numpy conversions below -- reaches ATen as
``_local_scalar_dense``. A dispatch mode pushed *inside* a non-strict ``torch.export`` sees
it before export's fake mode does and answers it with a value chosen by the explorer, so
export never has to guard on data; export leaves an ``aten.item`` node where the decision
happened. The value domain of a decision is ``{False, True}`` for a bool tensor and
``range(n)`` for an index produced by ``argmax``/``argmin`` over ``n`` entries (through
views and selects). A float turned into a Python number is an error (no finite domain); so
is an integer of unknown range. Loops are bounded by their Python form (``for _ in
range(n): ... break``); a path with more than ``max_decisions`` decisions is reported as an
unbounded loop.

**Constants are folded, not explored.** A tensor that depends on no input -- built inside
``forward`` from literals (``is_output = torch.tensor(1)``, ``torch.zeros(1) + 2``) and
ops on such tensors only -- is tracked with its real value beside the traced (fake) one,
and converting it to a Python value returns that value: no decision, no ``cond``.
Parameters and buffers are inputs here (their values are the program's weights).

**numpy.** ``t.numpy()``, ``np.asarray(t)`` and anything else that goes through
``Tensor.__array__`` on a one-element tensor is a conversion like ``.item()`` (a decision
for a bool or index tensor, the folded value for a constant one, an error for float data);
``np.argmax``/``np.argmin`` over a tensor or a list of one-element tensors (``np.argmax([c0,
c1, c2])``) is an index decision over its ``n`` entries. ``np.argmax`` is looked up on the
numpy module while the model runs (``from numpy import argmax`` bound before capture is not
seen); other numpy calls on traced tensors are not supported.

**Exploration is linear in the number of sequential decision sites.** The explorer traces
one path ``P`` (the forced prefix, then the first value of every later decision). For each
decision ``k`` of ``P`` it traces one more path per other value ``v``: ``Q = P's decisions
before k, then v``. ``Q`` is matched with ``P`` structurally *from the outputs backwards*:
two values are equal when they are the same input or weight, the same node of the shared
prefix (export names nodes in creation order, so names agree before decision ``k``), or the
same op on equal arguments; two nodes *correspond* when they are the same op with the same
literals and weights on arguments that are equal, corresponding, or a *merge pair*. The
merge pairs are the values live after the branch that differ between its sides (SSA phis):
they are the results of a ``cond`` whose sides compute them (the unmatched ancestors in
``P`` and in ``Q``); everything after the cond reads them. When a decision changes what is
returned (an early exit), the merge pairs are the outputs themselves: the cond is in tail
form. Later decisions of ``Q`` that match one of ``P`` (same source line, same Python
state, same predicate up to the merge) are *shared*: explored once, from ``P``; decisions
inside one side of the cond are nested and explored within that side. A model of k
sequential gates is captured from k + 1 traces into k conds.

The join assumes that code after the merge depends on the branch only through tensors. To
keep it exact, each decision records a fingerprint of the Python stack (code, line
and plain-value locals -- bools, numbers, strings -- of every frame of the model's code): a
later decision is shared only where both sides reach it in the same Python state, so that
``flag = True`` set in one branch and read by a later ``if flag:`` is never joined. Where a
join is not sound (a Python-state difference, a value read both before and after its
merge, a nested decision whose effect leaves its side), that decision and the ones around
it are built in tail form instead -- exact, and exponential only in such decisions.
Python state kept outside the stack's locals (an attribute set in one branch and read
later) is not seen; such a model must keep that state in a local or a tensor. The side of
a later decision that the default path never runs reads each value in its latest version
(after the merges before it). Where that could be wrong -- a tensor held by a local
before a branch stays held by another local after the other side rebinds the first
(``old = x; if a: x = f(x); if b: x = x + old``) -- the decision is built in tail form;
an alias held outside the frames' locals (an attribute, a global) is not seen.

**Cost: an extra path traces its region, not the model.** A full trace is a non-strict
``torch.export`` of the whole model (proxy tracing and fake tensors per op, every weight
lifted, the unlift and the conversion into a Program): for n sequential gates, n + 1 of
them cost O(n) each, O(n^2) in all. So only the first path (and any path the fast way
below refuses) is traced in full; ``Q`` is assembled from a *region trace* instead. The
region run executes ``forward`` again with ``Q``'s decisions, its prefix untraced (fake
tensors only, no graph) up to decision ``k``; there each tensor held by a local of the
frames of the model's code (and of the torch frames between them; in lists, tuples and
dicts too) becomes an export input that stands for ``P``'s node the same local holds at
``k`` (``P``'s trace returns those locals as extra outputs), tracing starts, and it stops
at the first later decision whose Python state equals the one at a decision ``j`` of ``P``
after which ``P`` takes first values (the *rejoin*: same code position in every frame,
same plain locals, same modules held, same layout of tensor locals, same plain
attributes on the modules), or runs to the end. The weights are plain attributes of their
modules while it runs, so export lifts only the weights the region reads (named back to
their parameter or buffer by storage). ``Q``'s trace is then ``P``'s graph up to decision
``k``, the region, and ``P``'s graph after ``j`` with each read of a value from before
``j`` replaced by what the same local holds at ``Q``'s rejoin: the graph a full trace of
``Q`` gives (tests compare the programs captured both ways node for node). Whatever the
region trace cannot vouch for is traced in full instead: a read after the rejoin of a
value no local holds, locals that alias differently, a traced tensor held by a module
attribute, a local object of unknown state, a region that writes an input, reads an
untraced tensor or a constant that is not a weight, a prefix that does not reach ``P``'s
state, module hooks, dense row selections or MoE blocks (:mod:`splice.ir.dd_sizes`,
:mod:`splice.ir.moe_capture`), paths with different output structures, any error.
Python state outside the frames and the modules' attributes (a global, a closure) the
region trace does not see, as the join above does not. ``program.attrs["region_traces"]``
counts the paths assembled this way (after four refusals in a row the capture stops trying).
A region run does not compute its prefix: each
torch function call before decision ``k`` is answered from ``P``'s recorded call (fresh
fake tensors of the recorded metadata; :mod:`splice.ir.explore_replay`), and any call
that differs from the record sends the path to a full trace (``attrs["replayed_prefixes"]``
counts the replayed ones). What a region export does not need of the model it does not
pay for: the exported root is a stand-in module that calls the region run and holds none
of the model's modules (export's per-call scans of its root's module tree -- attribute
snapshots, constant and script-object gathering -- cost nothing; the model's modules are
named for the nodes' locations as when the model is the root, and their attributes are
restored afterwards as export restores its root's); each module's part of the Python
state is kept while its attributes are the same objects; and the assembled paths share
one tree of weight containers; an assembled path holds only the weights its copied
part reads (export lifts every weight of the model, most of them read only on other
paths). CPython's full garbage collections, which the paths' surviving graphs would
trigger several times and which walk every object the process holds, are deferred until
the capture ends (:mod:`splice.ir.explore_gc`; the young generations are collected as
always). Still O(k) per path, at a small rate: the prefix's Python (module calls,
decisions) runs again, ``Q`` is assembled as a copy of ``P``'s compute graph, the match
walks ``P``'s graph after ``k``, and each region run saves, unregisters and restores every
module's attributes and weights and checks them at its decisions
(benchmarks/explore_scaling.py measures the growth).

The result is an ordinary Program with ``higher_order.cond`` nodes (one per decision site,
an index decision is a chain of ``cond(idx == k, ...)``), which the ``branches`` pass splits
into parts and a host program. Why not TorchDynamo graph breaks: Dynamo's resume
functions are Python bytecode, so the control structure between the subgraphs it hands a
backend would have to be recovered from bytecode, and the host program could not be
serialised without pickling Python. Why not an AST rewrite into ``torch.cond``: early
returns, ``break`` and module indexing by a tensor have no direct ``cond`` form, and
rewriting source breaks on models defined in notebooks or C extensions; the explorer needs
no source.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import operator
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental import proxy_tensor as _proxy
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    _push_mode,
    _unset_infra_mode,
)

from splice.errors import CaptureError
from splice.ir import meta as M
from splice.ir.capture import capture_error, ident, split_inputs, to_program
from splice.ir.dd_sizes import DenseSelections
from splice.ir.explore_fx import copy_node
from splice.ir.explore_gc import full_collections_deferred
from splice.ir.explore_replay import OpLog, OpRecord, Replay, flatten
from splice.ir.moe_capture import ATTR as _MOE_ATTR
from splice.ir.moe_capture import ATTR_UNRECOGNISED as _MOE_ATTR_UNRECOGNISED
from splice.ir.moe_capture import MoERecord, recognise_moe
from splice.ir.output_tree import output_names
from splice.ir.outputs import unify_outputs
from splice.ir.program import (
    Program,
    build_graph_module,
    graph_module_cls,
    set_weight_attr,
)
from splice.ir.signatures import SignatureSet, signature_of_values

_aten = torch.ops.aten
_LSD = _aten._local_scalar_dense.default
_INDEX_PRODUCERS = {_aten.argmax.default, _aten.argmin.default}
_PASS_THROUGH = {
    _aten.select.int,
    _aten.squeeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.unsqueeze.default,
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.reshape.default,
    _aten.clone.default,
    _aten.alias.default,
    _aten.slice.Tensor,
    _aten.detach.default,
    _aten.lift_fresh.default,
}
_LIFT = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}


@dataclass(frozen=True)
class Decision:
    """One conversion of a tensor to a Python value on a path."""

    site: str  # file:line of the model code that converted the tensor
    domain: tuple[Any, ...]  # the values it can take: (False, True) or (0, ..., n-1)
    value: Any  # the value this path took


def _is_fake(t: Any) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


class _DecisionMode(TorchDispatchMode):
    """Answers ``_local_scalar_dense`` with forced or first-in-domain values.

    ``record_only``: run on real tensors and keep the real values (the eager branch trace).
    Tensors that depend on no input are tracked with their real value (``_shadow``) and
    their conversions are folded (module docstring).
    """

    def __init__(
        self,
        forced: Sequence[Any],
        *,
        max_decisions: int,
        record_only: bool = False,
        watch: _Watch | None = None,
    ):
        super().__init__()
        self.forced = list(forced)
        self.watch = watch
        self.max_decisions = max_decisions
        self.record_only = record_only
        self.decisions: list[Decision] = []
        self.keys: list[tuple[str, int]] = []  # (site, Python-state fingerprint) per decision
        self.bindings: list[dict[Any, int]] = []  # tensors held by locals, per decision
        self.preds: list[torch.Tensor] = []
        self.item_kinds: list[bool] = []  # per conversion of a traced tensor: is a decision
        self._domain: dict[int, int] = {}  # id(tensor) -> n for index tensors
        self._shadow: dict[int, torch.Tensor] = {}  # id(tensor) -> real value (constants)
        self._keep: list[torch.Tensor] = []  # keeps ids unique while the mode runs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LSD:
            t = args[0]
            real = self._real(t)
            if real is not None:
                if _is_fake(t):
                    self.item_kinds.append(False)
                with _disable_current_modes():
                    return real.item()
            if _is_fake(t):
                self.item_kinds.append(True)
            return self._decide(t)
        out = func(*args, **kwargs)
        if func in _INDEX_PRODUCERS and isinstance(out, torch.Tensor):
            src = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            n = src.numel() if dim is None else src.shape[dim]
            self._note(out, int(n))
        elif func in _PASS_THROUGH and isinstance(out, torch.Tensor) and args:
            n = self._domain.get(id(args[0]))
            if n is not None:
                self._note(out, n)
        self._track_constants(func, args, kwargs, out)
        return out

    def tracks(self, t: torch.Tensor) -> bool:
        """Is ``t`` a constant (its real value kept) or an index tensor (its domain kept)?"""
        return id(t) in self._shadow or id(t) in self._domain

    def _note(self, t: torch.Tensor, n: int) -> None:
        self._domain[id(t)] = n
        self._keep.append(t)

    # -- constants --------------------------------------------------------------------
    def _real(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of ``t`` if it depends on no input, else None."""
        s = self._shadow.get(id(t))
        if s is not None:
            return s
        if not self.record_only and not _is_fake(t):
            return t  # a constant that export keeps real (a lifted literal)
        return None

    def _track_constants(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if not outs:
            return
        seeded = isinstance(func, torch._ops.OpOverload) and (
            torch.Tag.nondeterministic_seeded in func.tags
        )
        const = func in _LIFT or (
            not seeded and (not tensors or all(self._real(a) is not None for a in tensors))
        )
        if not const:
            if getattr(func, "_schema", None) is not None and func._schema.is_mutable:
                for a in tensors:  # written with input data: no longer a constant
                    self._shadow.pop(id(a), None)
            return
        if self.record_only:
            real_outs = outs
        else:

            def real_of(a: Any) -> Any:
                return self._real(a) if isinstance(a, torch.Tensor) else a

            try:
                with _disable_current_modes():
                    r_args, r_kwargs = pytree.tree_map(real_of, (args, kwargs))
                    real = func(*r_args, **r_kwargs)
            except Exception:
                return  # not evaluable on real tensors: treat as data
            real_outs = [o for o in pytree.tree_leaves(real) if isinstance(o, torch.Tensor)]
            if len(real_outs) != len(outs):
                return
        for o, r in zip(outs, real_outs):
            self._shadow[id(o)] = r
            self._keep.append(o)

    # -- decisions --------------------------------------------------------------------
    def _decide(self, t: torch.Tensor) -> Any:
        bindings: dict[Any, int] = {}
        site, fingerprint = _user_state(
            with_fingerprint=not self.record_only,
            bindings=None if self.record_only else bindings,
        )
        k = len(self.decisions)
        if k >= self.max_decisions:
            raise CaptureError(
                f"a path made more than {self.max_decisions} data-dependent decisions",
                where=site,
                hint="a loop whose trip count depends on tensors has no bound: bound it "
                "(`for _ in range(n): ... break`) or raise max_decisions",
            )
        if t.numel() != 1:
            raise CaptureError(
                f"a tensor of shape {list(t.shape)} was converted to a Python value",
                where=site,
                hint="only one-element tensors can decide a branch",
            )
        if t.dtype == torch.bool:
            domain: tuple[Any, ...] = (False, True)
        elif not t.dtype.is_floating_point and not t.dtype.is_complex:
            n = self._domain.get(id(t))
            if n is None:
                raise CaptureError(
                    f"an integer tensor ({M.dtype_name(t.dtype)}) decides a Python value here, "
                    "and its range is unknown",
                    where=site,
                    hint="splice explores index decisions produced by argmax/argmin; compare "
                    "with a threshold (a bool tensor) or index with an argmax",
                )
            domain = tuple(range(n))
        else:
            raise CaptureError(
                f"a {M.dtype_name(t.dtype)} tensor was turned into a Python number "
                "(.item(), float() or bool() on float data)",
                where=site,
                hint="branch on a bool tensor instead, e.g. `if (p >= 0.5):` rather than "
                "`if p.item() >= 0.5:`",
            )
        if self.record_only:
            value = bool(t.item()) if t.dtype == torch.bool else int(t.item())
        else:
            value = self.forced[k] if k < len(self.forced) else domain[0]
            self.preds.append(t)
        self.decisions.append(Decision(site, domain, value))
        self.keys.append((site, fingerprint))
        self.bindings.append(bindings)
        if self.watch is not None and k >= self.watch.start:
            self.watch.at_decision(k, self)
        return value


_SPLICE_INTERNAL = tuple(f"{__file__.rsplit('/', 2)[0]}/{d}/" for d in ("ir", "passes", "runtime"))


@functools.lru_cache(maxsize=4096)
def _is_user_frame(name: str) -> bool:
    """Is a frame of file ``name`` the model's code (not torch's, not splice's own)?
    Cached: every decision walks the whole stack."""
    return not name.startswith((M._TORCH_DIR, "<")) and not name.startswith(_SPLICE_INTERNAL)


_PLAIN = (bool, int, float, str, type(None))
_PLAIN_EXACT = frozenset(_PLAIN)


def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    return isinstance(v, (tuple, list)) and len(v) <= 64 and all(isinstance(x, _PLAIN) for x in v)


def _user_state(
    *, with_fingerprint: bool, bindings: dict[Any, int] | None = None
) -> tuple[str, int]:
    """(file:line of the innermost frame of the model's code, fingerprint of the Python state
    of every such frame: code, line and plain-value locals). Lines, not instruction
    offsets: CPython's specialising interpreter reports different offsets for one call.

    ``bindings``: filled with ``(frame, local name) -> id(tensor)`` of the tensors those
    frames hold (directly or in a list/tuple), to see aliases that outlive a rebinding."""
    f = sys._getframe(1)
    site = ""
    parts: list[Any] = []
    while f is not None:
        name = f.f_code.co_filename
        if _is_user_frame(name):
            if not site:
                site = f"{name}:{f.f_lineno}"
                if not with_fingerprint:
                    break
            plain: list[tuple[str, str]] = []
            for k, v in f.f_locals.items():  # one snapshot of the frame's locals
                if _plain(v):
                    plain.append((k, repr(v)))
                elif bindings is None:
                    continue
                elif isinstance(v, torch.Tensor):
                    bindings[(id(f), k)] = id(v)
                elif isinstance(v, (list, tuple)) and len(v) <= 256:
                    for i, x in enumerate(v):
                        if isinstance(x, torch.Tensor):
                            bindings[(id(f), k, i)] = id(x)
            plain.sort()
            code = f.f_code
            parts.append((name, code.co_firstlineno, code.co_name, f.f_lineno, tuple(plain)))
        f = f.f_back
    return site, hash(tuple(parts)) if with_fingerprint else 0


def _outlives_rebinding(before: dict[Any, int], after: dict[Any, int]) -> bool:
    """Does a tensor that a rebound name held at ``before`` stay held by another name at
    ``after`` (``old = x; ... x = f(x) ...``)? Then a later branch side could read either
    version, which one trace per decision cannot tell apart."""
    old = {oid for key, oid in before.items() if key in after and after[key] != oid}
    return any(oid in old for oid in after.values())


def _user_site() -> str:
    """file:line of the innermost frame outside torch and splice."""
    return _user_state(with_fingerprint=False)[0]


# ---------------------------------------------------------------------------------------
# region traces: the Python state at a decision, and the switch into tracing

_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward"}
_PROXY = torch._C._TorchDispatchModeKey.PROXY


class _Fallback(Exception):
    """A region trace cannot stand for a full trace here: trace the whole path."""


class _Stop(BaseException):
    """Raised at the rejoin of a region trace (a BaseException: the model's own ``except
    Exception`` must not catch it)."""


@dataclass(eq=False)
class _Scan:
    """The Python state at one decision (module docs, "Cost").

    ``key``: code position, plain and module-valued locals and the layout of the tensor
    locals of every frame from the innermost to the outermost frame of the model's code,
    and the modules' plain attributes; two decisions with equal keys continue alike up to
    tensor identities. ``tids``: tensor local -> identity token (``id`` in a live run).
    ``real``: locals holding real tensors (weights, constants), by id. ``safe``: no state
    the key cannot see (a traced tensor held by a module attribute, an object local)."""

    key: Any
    tids: dict[tuple[Any, ...], Any]
    real: dict[tuple[Any, ...], int]
    frames: list[Any]
    safe: bool
    own: bool = True  # tokens from the run that recorded the trace's bindings
    meta: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # shape, stride, dtype


def _flatten_local(
    v: Any,
    path: tuple[Any, ...],
    items: list[Any],
    tensors: dict[tuple[Any, ...], torch.Tensor],
    user: bool,
) -> bool:
    """Record local ``v`` under ``path``; False where it may hold state the key cannot see."""
    if isinstance(v, torch.Tensor):
        tensors[path] = v
        items.append((path, "T"))
        return True
    if isinstance(v, nn.Module):
        items.append((path, "M", id(v)))
        return True
    if isinstance(v, (tuple, list)) and len(v) <= 256:
        items.append((path, type(v).__name__, len(v)))
        ok = True
        for i, x in enumerate(v):
            ok = _flatten_local(x, (*path, i), items, tensors, user) and ok
        return ok
    if isinstance(v, dict) and len(v) <= 256 and all(isinstance(x, _PLAIN) for x in v):
        items.append((path, "dict", tuple(repr(x) for x in v)))
        ok = True
        for x, y in v.items():
            ok = _flatten_local(y, (*path, repr(x)), items, tensors, user) and ok
        return ok
    if not user:
        return True  # torch's frames between the model's: only their tensors matter
    if isinstance(v, (*_PLAIN, torch.dtype, torch.device)):
        items.append((path, "P", repr(v)))
        return True
    if isinstance(v, type) or hasattr(v, "__code__") or hasattr(v, "__func__"):
        fn = getattr(v, "__func__", v)
        items.append((path, "F", id(fn), id(getattr(v, "__self__", None))))
        return True
    items.append((path, "O", type(v).__name__))
    return False


def _module_state(
    modules: Sequence[nn.Module],
    slots: set[tuple[int, str]],
    memo: dict[int, tuple[Any, ...]] | None = None,
) -> tuple[Any, bool]:
    """(hash of the modules' own attributes, no traced tensor held by one); ``slots``:
    (module id, name) of the weights (a region run holds them as plain attributes).

    ``memo`` (one per capture) keeps each module's encoding while its attributes are the
    same (same names in the same order, the same encoded values by identity; the memo
    holds those values, so their ids stay theirs): a decision then costs a few tuples per
    module, not an encoding of every attribute. A module with a list or dict attribute
    (mutable in place) is encoded anew."""
    parts: list[Any] = []
    ok = True
    for m in modules:
        d = m.__dict__
        if memo is None:
            part, mok, _ = _encode_module(m, slots)
        else:
            keys = tuple(d)
            hit = memo.get(id(m))
            if hit is not None and hit[0] == keys and tuple(map(id, hit[1](d))) == hit[2]:
                part, mok = hit[4], hit[5]
            else:
                part, mok, cacheable = _encode_module(m, slots)
                if cacheable:
                    mid = id(m)
                    names = [k for k in d if k not in _MODULE_INTERNALS and (mid, k) not in slots]
                    get = _getter(names)
                    values = get(d)
                    memo[mid] = (keys, get, tuple(map(id, values)), values, part, mok)
                else:
                    memo.pop(id(m), None)
        parts.append(part)
        ok = ok and mok
    return hash(tuple(parts)), ok


def _getter(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``d -> tuple(d[n] for n in names)``, gathered in C where it can be."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    if names:
        name = names[0]
        return lambda d: (d[name],)
    return lambda d: ()


def _encode_module(m: nn.Module, slots: set[tuple[int, str]]) -> tuple[Any, bool, bool]:
    """(encoding of ``m``'s own attributes, no traced tensor among them, the encoding
    depends only on the attributes' identities: no list or dict attribute)."""
    parts: list[Any] = []
    ok = True
    cacheable = True

    def enc(v: Any) -> Any:
        nonlocal ok
        if isinstance(v, _PLAIN):
            return repr(v)
        if isinstance(v, torch.Tensor):
            ok = ok and not _is_fake(v)
            return ("T", id(v))
        return (type(v).__name__, id(v))

    mid = id(m)
    for name, v in m.__dict__.items():
        if name in _MODULE_INTERNALS or (mid, name) in slots:
            continue  # a slot can hold None (no bias): skipped before the plain values
        if type(v) in _PLAIN_EXACT:  # the common case first
            parts.append((name, repr(v)))
            continue
        if isinstance(v, (list, dict)):
            cacheable = False
        if isinstance(v, (tuple, list)) and len(v) <= 256:
            parts.append((name, type(v).__name__, tuple(enc(x) for x in v)))
        elif isinstance(v, dict) and len(v) <= 256:
            items = tuple((repr(x), enc(y)) for x, y in v.items())
            parts.append((name, "dict", items))
        else:
            parts.append((name, enc(v)))
    return (mid, tuple(parts)), ok, cacheable


def _scan_state(
    modules: Sequence[nn.Module],
    slots: set[tuple[int, str]],
    memo: dict[int, tuple[Any, ...]] | None = None,
) -> tuple[_Scan, dict[tuple[Any, ...], torch.Tensor]]:
    """The :class:`_Scan` of the caller's stack, and its tensor locals."""
    frames = []
    f = sys._getframe(1)
    while f is not None:
        frames.append(f)
        f = f.f_back
    user = [i for i, fr in enumerate(frames) if _is_user_frame(fr.f_code.co_filename)]
    tensors: dict[tuple[Any, ...], torch.Tensor] = {}
    if not user:
        return _Scan(None, {}, {}, [], False), tensors
    # from the innermost frame of the model's code out to the explorer's wrapper
    end = next(
        (i for i in range(user[0], len(frames)) if frames[i].f_code.co_filename == __file__),
        len(frames),
    )
    span = frames[user[0] : end]
    parts: list[Any] = []
    safe = True
    for d, fr in enumerate(span):
        is_user = _is_user_frame(fr.f_code.co_filename)
        items: list[Any] = []
        for name, v in fr.f_locals.items():
            safe = _flatten_local(v, (d, name), items, tensors, is_user) and safe
        parts.append((fr.f_code, fr.f_lineno, tuple(items)))
    mstate, mok = _module_state(modules, slots, memo)
    tids = {k: id(t) for k, t in tensors.items() if _is_fake(t)}
    real = {k: id(t) for k, t in tensors.items() if not _is_fake(t)}
    meta = {k: (tuple(t.shape), t.stride(), t.dtype) for k, t in tensors.items() if _is_fake(t)}
    frame_ids = [id(fr) for fr in span]
    return _Scan((tuple(parts), mstate), tids, real, frame_ids, safe and mok, meta=meta), tensors


@dataclass(eq=False)
class _Watch:
    """Scans the Python state at each decision from ``start`` on (full traces: every one).

    A region run (``switch`` set) runs the path's prefix untraced and starts tracing at
    decision ``switch``, with each tensor local of that decision traced as the export
    input ``inputs[key]``; it stops (``_Stop``) at the first later decision whose scan key
    is in ``stops`` (the base trace's decision index it rejoins)."""

    modules: list[nn.Module]
    slots: set[tuple[int, str]]
    start: int = 0
    switch: int | None = None
    expect: _Scan | None = None  # the base trace's scan at ``switch``
    prefix: tuple[list[Decision], list[Any]] = ([], [])  # base decisions and keys to switch
    inputs: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    stops: dict[Any, int] = field(default_factory=dict)
    proxy: Any = None  # the proxy mode, unset while the prefix runs
    switched: bool = False
    grad: bool = False  # grad mode when the forward started
    stopped: int | None = None  # base decision the run stopped at
    stop_at: int | None = None  # own decision index it stopped at
    scans: dict[int, _Scan] = field(default_factory=dict)
    live: dict[int, dict[tuple[Any, ...], torch.Tensor]] = field(default_factory=dict)
    memo: dict[int, tuple[Any, ...]] | None = None  # module encodings (_module_state)

    def at_decision(self, k: int, mode: _DecisionMode) -> None:
        scan, tensors = _scan_state(self.modules, self.slots, self.memo)
        self.scans[k] = scan
        self.live[k] = tensors
        if self.switch is None:
            return
        if k == self.switch:
            self._start_tracing(scan, tensors, mode)
        elif k > self.switch and scan.safe and scan.key in self.stops:
            self.stopped = self.stops[scan.key]
            self.stop_at = k
            raise _Stop()

    def _start_tracing(
        self, scan: _Scan, tensors: dict[tuple[Any, ...], torch.Tensor], mode: _DecisionMode
    ) -> None:
        proxy = self.proxy
        self.proxy = None
        _push_mode(proxy)
        self.switched = True
        exp = self.expect
        decisions, keys = self.prefix
        if (
            exp is None
            or not scan.safe
            or scan.key != exp.key
            or scan.real != exp.real
            or scan.meta != exp.meta
            or mode.decisions[:-1] != decisions[:-1]
            or mode.decisions[-1].domain != decisions[-1].domain
            or mode.keys != keys
            or torch.is_grad_enabled() != self.grad
        ):
            raise _Fallback("the prefix did not reach the base trace's state")
        tracer = proxy.tracer
        traced = {id(t): _proxy.has_proxy_slot(t, tracer) for t in tensors.values()}
        by_obj: dict[int, torch.Tensor] = {}
        by_input: dict[int, int] = {}
        for key, t in tensors.items():
            if key in exp.real:
                continue
            inp = self.inputs.get(key)
            if inp is None:
                if not traced[id(t)]:
                    raise _Fallback("a live tensor has no traced value")
                continue
            if traced[id(t)] or t.shape != inp.shape or t.dtype != inp.dtype:
                raise _Fallback("a live tensor does not match the base trace")
            if by_obj.setdefault(id(t), inp) is not inp or by_input.setdefault(
                id(inp), id(t)
            ) != id(t):
                raise _Fallback("live tensors alias differently from the base trace")
        for t_id, inp in by_obj.items():
            t = next(x for x in tensors.values() if id(x) == t_id)
            _proxy.set_proxy_slot(t, tracer, _proxy.get_proxy_slot(inp, tracer))


class _NumpyMode(TorchFunctionMode):
    """``Tensor.__array__``/``Tensor.numpy`` on a one-element tensor: a conversion like
    ``.item()`` (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__array__, torch.Tensor.numpy) and args:
            t = args[0]
            if isinstance(t, torch.Tensor) and t.numel() == 1:
                import numpy as np

                value = t.item()
                dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
                arr = np.asarray(value, dtype=_np_dtype(t.dtype) if dtype is None else dtype)
                return arr.reshape(tuple(t.shape))
        return func(*args, **kwargs)


def _np_dtype(dtype: torch.dtype) -> Any:
    import numpy as np

    return np.dtype(str(dtype).removeprefix("torch."))


def _numpy_arg(a: Any) -> torch.Tensor | None:
    """A tensor, or a list/tuple of one-element tensors, as one flat tensor; else None."""
    if isinstance(a, torch.Tensor):
        return a.reshape(-1)
    if (
        isinstance(a, (list, tuple))
        and a
        and all(isinstance(x, torch.Tensor) and x.numel() == 1 for x in a)
    ):
        return torch.stack([x.reshape(()) for x in a])
    return None


@contextlib.contextmanager
def _numpy_hooks() -> Iterator[None]:
    """While the model runs: numpy conversions of tensors are decisions (module docstring)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's wheels
        yield
        return
    saved = {name: getattr(np, name) for name in ("argmax", "argmin")}

    def hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(a: Any, *args: Any, **kwargs: Any) -> Any:
            flat = None if args or kwargs else _numpy_arg(a)
            if flat is None:
                return fn(a, *args, **kwargs)
            return np.int64(getattr(torch, name)(flat).item())

        return call

    for name, fn in saved.items():
        setattr(np, name, hook(name, fn))
    try:
        with _NumpyMode():
            yield
    finally:
        for name, fn in saved.items():
            setattr(np, name, fn)


def eager_decisions(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[Decision]:
    """Run ``model`` eagerly and list the data-dependent decisions it made (its branch trace).

    Conversions of constants (tensors that depend on no input) are not decisions, as in
    :func:`capture_dynamic`."""
    mode = _DecisionMode([], max_decisions=10_000, record_only=True)
    with torch.no_grad(), _numpy_hooks(), mode:
        model(*inputs)
    return mode.decisions


def cond_trace(decisions: Sequence[Decision]) -> list[bool]:
    """A decision list as the conditions of the ``cond`` chain that represents it.

    A bool decision is one condition; index ``v`` of ``n`` is the chain ``idx == 0``,
    ``idx == 1``, ... up to the first true one (``n - 1`` false ones for the last index).
    """
    out: list[bool] = []
    for d in decisions:
        if d.domain == (False, True):
            out.append(bool(d.value))
        else:
            n, v = len(d.domain), int(d.value)
            out += [False] * v + ([True] if v < n - 1 else [])
    return out


# ---------------------------------------------------------------------------------------
# traces

# A value of a trace: a node, ``"in:<name>"`` for a program input, ``"@<weight>"``.
Value = fx.Node | str


@dataclass(eq=False)
class _Trace:
    """One traced path: its Program and an index over it."""

    taken: tuple[Any, ...]
    decisions: list[Decision]
    keys: list[tuple[str, int]]
    program: Program
    n_out: int
    spec: Any  # the output's pytree spec
    pos: dict[fx.Node, int] = field(default_factory=dict)
    bindings: list[dict[Any, int]] = field(default_factory=list)  # per decision
    item_kinds: list[bool] = field(default_factory=list)  # per item node: is a decision
    scans: list[_Scan | None] = field(default_factory=list)  # per decision (region traces)
    lnodes: list[dict[tuple[Any, ...], fx.Node] | None] = field(default_factory=list)
    oplog: list[OpRecord] | None = None  # a full trace's calls (explore_replay)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # read by get_attr nodes
    items: list[fx.Node] = field(default_factory=list)  # the decision items, in order
    preds: list[fx.Node] = field(default_factory=list)  # what each decision converted
    outputs: list[Value] = field(default_factory=list)
    by_name: dict[str, fx.Node] = field(default_factory=dict)
    wkey: dict[fx.Node, str] = field(default_factory=dict)
    nodes_of: dict[str, list[fx.Node]] = field(default_factory=dict)  # str value -> nodes
    compute: list[fx.Node] = field(default_factory=list)  # call_function nodes but items
    flats: dict[fx.Node, tuple[Any, list[Any]]] = field(default_factory=dict)  # see flat()

    def value(self, n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return n
        if n.op == "placeholder":
            return f"in:{n.name}"
        if n.op == "get_attr":
            return self.wkey[n]
        return n

    def flat(self, n: fx.Node) -> tuple[Any, list[Any]]:
        """:func:`_flat` of one of this trace's nodes, kept (a trace's nodes are not
        edited: the match walks them once per decision)."""
        r = self.flats.get(n)
        if r is None:
            r = self.flats[n] = _flat(n)
        return r

    def before(self, v: Value, bound: int) -> bool:
        """Is ``v`` available before position ``bound`` on every path through this prefix?"""
        return isinstance(v, str) or self.pos[v] < bound


def _trace_path(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    forced: list[Any],
    max_decisions: int,
    watch: _Watch | None = None,
) -> tuple[torch.export.ExportedProgram, _DecisionMode, Any, int, MoERecord, dict[str, Any]]:
    """Export ``model`` on the path ``forced`` (then first values), as :func:`splice.capture`
    would: sparse-MoE blocks as ``splice::moe_ffn`` and ``nonzero()``/``where(mask)`` token
    dispatch densely (:mod:`splice.ir.moe_capture`, :mod:`splice.ir.dd_sizes`).

    With ``watch`` the export also returns the traced tensor locals of every decision after
    the outputs and the predicates (``state["locals"]``: decision -> local -> output index)."""
    state: dict[str, Any] = {}
    with recognise_moe(model) as moe:  # entered first: it may replace the root's forward
        original = model.forward

        @functools.wraps(original)
        def forward(*a: Any, **kw: Any) -> tuple[Any, ...]:
            mode = _DecisionMode(forced, max_decisions=max_decisions, watch=watch)
            log = OpLog(mode.tracks) if watch is not None else contextlib.nullcontext()
            with _numpy_hooks(), mode, DenseSelections() as dense, log:
                out = dense.check_outputs(original(*a, **kw))
            if isinstance(log, OpLog):
                state["oplog"] = log.finish()
            leaves, spec = pytree.tree_flatten(out)
            state.update(mode=mode, spec=spec, n=len(leaves), dense=_dense_used(dense))
            extra, state["locals"] = _locals_outputs(watch, range(len(mode.decisions)))
            return (*leaves, *mode.preds, *extra)

        had = "forward" in model.__dict__
        model.forward = forward  # type: ignore[method-assign]
        try:
            ep = torch.export.export(model, args, strict=False)
        finally:
            if had:
                model.forward = original  # type: ignore[method-assign]
            else:
                del model.forward
    return ep, state["mode"], state["spec"], state["n"], moe, state


def _dense_used(dense: DenseSelections) -> bool:
    """Did the path select rows densely (region traces do not model that state)?"""
    return dense.selected


def _locals_outputs(
    watch: _Watch | None, decisions: Sequence[int]
) -> tuple[list[torch.Tensor], dict[int, dict[tuple[Any, ...], int]]]:
    """The traced tensor locals of ``decisions`` as extra export outputs, and their indices."""
    extra: list[torch.Tensor] = []
    where: dict[int, dict[tuple[Any, ...], int]] = {}
    if watch is None:
        return extra, where
    index: dict[int, int] = {}
    for d in decisions:
        live = watch.live.get(d)
        if live is None:
            continue
        where[d] = {}
        for key, t in live.items():
            if not _is_fake(t):
                continue
            if id(t) not in index:
                index[id(t)] = len(extra)
                extra.append(t)
            where[d][key] = index[id(t)]
    return extra, where


def _trace_region(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    forced: list[Any],
    max_decisions: int,
    watch: _Watch,
    inputs: list[tuple[tuple[Any, ...], torch.Tensor]],
    oplog: list[OpRecord] | None = None,
    paths: dict[nn.Module, str] | None = None,
) -> tuple[torch.export.ExportedProgram, _DecisionMode, dict[str, Any]]:
    """Export the region of path ``forced`` that starts at its last decision (module docs,
    "Cost"): the prefix runs untraced (replayed from ``oplog``, the base trace's recorded
    calls, where given: :mod:`splice.ir.explore_replay`), the tensor locals at that
    decision are the export's inputs after ``args`` (one per distinct tensor of the base
    trace, ``inputs``: key -> example), tracing stops at ``watch``'s rejoin (or runs to the
    end). Outputs: the model's outputs (to the end only), the region's predicates, its
    decisions' tensor locals. A prefix that does not replay raises ``_Fallback``.
    ``paths`` (:func:`_module_paths`): export a :class:`_RegionRoot` instead of the model."""
    state: dict[str, Any] = {}
    n = len(args)
    original = model.forward
    examples: list[torch.Tensor] = []
    slot: dict[tuple[Any, ...], int] = {}
    for key, t in inputs:
        slot[key] = next((i for i, e in enumerate(examples) if e is t), -1)
        if slot[key] < 0:
            slot[key] = len(examples)
            examples.append(t)

    def forward(*a: Any) -> tuple[Any, ...]:
        mode = _DecisionMode(forced, max_decisions=max_decisions, watch=watch)
        watch.inputs = {key: a[n + i] for key, i in slot.items()}
        watch.grad = torch.is_grad_enabled()
        watch.proxy = _unset_infra_mode(_PROXY)
        if watch.proxy is None:
            raise _Fallback("export does not trace through a proxy mode here")
        if paths is not None:
            _inject_module_paths(watch.proxy, paths)
        stopped = False
        replay: Any = contextlib.nullcontext()
        fake = next((x.fake_mode for x in a if _is_fake(x)), None)
        if oplog is not None and fake is not None and _REPLAY:
            replay = Replay(oplog, fake, lambda: watch.switched)
        try:
            with _numpy_hooks(), mode, DenseSelections() as dense, replay:
                try:
                    out = dense.check_outputs(original(*a[:n]))
                except _Stop:
                    out, stopped = None, True
        finally:
            if watch.proxy is not None:
                _push_mode(watch.proxy)
                watch.proxy = None
        if isinstance(replay, Replay) and replay.failed is not None:
            raise _Fallback(f"the prefix did not replay: {replay.failed}")
        if not watch.switched or _dense_used(dense):
            raise _Fallback("the region did not start, or it selected rows densely")
        leaves, spec = pytree.tree_flatten(out) if not stopped else ([], None)
        k = watch.switch or 0
        preds = mode.preds[k + 1 :]
        extra, state["locals"] = _locals_outputs(watch, range(k + 1, len(mode.decisions)))
        tracer = _proxy_tracer()
        for t in [*leaves, *preds, *extra]:
            if isinstance(t, torch.Tensor) and _is_fake(t) and not _proxy.has_proxy_slot(t, tracer):
                raise _Fallback("the region returns a tensor it did not trace")
        state.update(mode=mode, spec=spec, n=len(leaves), n_preds=len(preds), stopped=stopped)
        state["replayed"] = isinstance(replay, Replay) and replay.replayed > 0
        return (*leaves, *preds, *extra)

    if paths is not None:  # the model outside export's root (:class:`_RegionRoot`)
        root = _RegionRoot(forward)
        with _weights_unregistered(watch.modules), _attributes_restored(watch.modules):
            ep = torch.export.export(root, (*args, *examples), strict=False)
        return ep, state["mode"], state
    had = "forward" in model.__dict__
    model.forward = forward  # type: ignore[method-assign]
    try:
        with _weights_unregistered(watch.modules):
            ep = torch.export.export(model, (*args, *examples), strict=False)
    finally:
        if had:
            model.forward = original  # type: ignore[method-assign]
        else:
            del model.forward
    return ep, state["mode"], state


class _RegionRoot(nn.Module):
    """The module a region trace exports: it calls the region run and holds none of the
    model's modules, so export's per-call scans of its root's module tree (attribute
    snapshots, constant and script-object gathering, parameter lists) cost nothing.
    :func:`_module_paths` names the model's modules for export's module stacks (the
    ``Loc`` of each node), as they are named when the model itself is the root."""

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self.__dict__["_fn"] = fn

    def forward(self, *a: Any) -> Any:
        return self.__dict__["_fn"](*a)


_EXPORT_ROOT = "_export_root"  # where non-strict export holds the module it exports


def _module_paths(model: nn.Module) -> dict[nn.Module, str] | None:
    """Each module of ``model`` by the path export's module-stack tracer gives it when
    ``model`` is the exported root; None where a module is shared (export then tracks
    access paths, which injected names cannot reproduce)."""
    paths: dict[nn.Module, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if m in paths:
            return None
        paths[m] = f"{_EXPORT_ROOT}.{name}" if name else _EXPORT_ROOT
    return paths


def _inject_module_paths(proxy_mode: Any, paths: dict[nn.Module, str]) -> None:
    """Make export's tracer name the model's modules (module stacks), though the exported
    root (:class:`_RegionRoot`) does not hold them."""
    known = getattr(getattr(proxy_mode, "tracer", None), "submodule_paths", None)
    if not isinstance(known, dict):
        raise _Fallback("export's tracer does not name modules here")
    known.update(paths)


@contextlib.contextmanager
def _attributes_restored(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Restore the modules' own attributes on exit (of a list or dict attribute, its items
    too), as export does for the modules under its root: a region run leaves the model's
    Python state as it found it. Per module a dict of its own attributes (the key set
    difference with the module internals and the restoring ``update`` run in C: a region
    run pays little per module of the model)."""
    saved = []
    for m in modules:
        d = m.__dict__
        saved.append((d, {k: d[k] for k in d.keys() - _MODULE_INTERNALS}))
    items = [(v, v.copy()) for _, own in saved for v in own.values() if type(v) in _CONTAINERS]
    try:
        yield
    finally:
        for v, copy in items:
            v.clear()
            v.update(copy) if isinstance(v, dict) else v.extend(copy)
        for d, own in saved:
            d.update(own)


_CONTAINERS = (list, dict)  # attributes whose items a region run could change in place


@contextlib.contextmanager
def _weights_unregistered(modules: Sequence[nn.Module]) -> Iterator[None]:
    """While active, the modules' parameters and buffers are plain attributes: export lifts
    only the weights a region reads (as constants, on the weights' own storage), not every
    weight of the model. The registrations are restored exactly on exit."""
    saved: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    try:
        for m in modules:
            d, ps, bs = m.__dict__, m._parameters, m._buffers
            if not ps and not bs:
                continue
            saved.append((d, ps, bs))
            d["_parameters"] = {}
            d["_buffers"] = {}
            d.update(ps)
            d.update(bs)
        yield
    finally:
        for d, ps, bs in reversed(saved):
            for name in [*ps, *bs]:
                d.pop(name, None)
            d["_parameters"] = ps
            d["_buffers"] = bs


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.storage_offset())


def _weights_by_storage(model: nn.Module) -> dict[tuple[Any, ...], tuple[str, torch.Tensor, str]]:
    """Each weight of ``model`` by its storage: name, tensor and kind, as capture names them."""
    out: dict[tuple[Any, ...], tuple[str, torch.Tensor, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(_storage_key(p), (name, p, "param"))
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            kind = "buffer" if name in persistent else "constant"
            out.setdefault(_storage_key(b), (name, b, kind))
    return out


def _proxy_tracer() -> Any:
    from torch._ops import _get_dispatch_mode_pre_dispatch

    mode = _get_dispatch_mode_pre_dispatch(_PROXY) or torch._C._get_dispatch_mode(_PROXY)
    if mode is None:
        raise _Fallback("no proxy mode")
    return mode.tracer


@dataclass(eq=False)
class _Raw:
    """One export of the model on a path, before its outputs are unified."""

    program: Program
    spec: Any
    n_out: int
    mode: _DecisionMode | _PathInfo
    outputs: list[Any]
    scans: list[_Scan | None] = field(default_factory=list)  # per decision (region traces)
    lnodes: list[dict[tuple[Any, ...], fx.Node] | None] = field(default_factory=list)
    oplog: list[OpRecord] | None = None  # the full trace's calls (explore_replay)
    replayed: bool = False  # a region trace whose prefix was replayed
    weights: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)  # assembled


@dataclass(eq=False)
class _PathInfo:
    """The decisions of a path assembled from a region trace (as a mode records them)."""

    decisions: list[Decision]
    keys: list[tuple[str, int]]
    bindings: list[dict[Any, Any]]
    item_kinds: list[bool]


class _Restructure(Exception):
    """A path returned a new output structure: rebuild every trace in the new layout."""


class _Retry(Exception):
    """Rebuild with these decisions (keys: their prefix of taken values) in tail form."""

    def __init__(self, keys: set[tuple[Any, ...]]):
        super().__init__(keys)
        self.keys = keys


# ---------------------------------------------------------------------------------------
# matching two traces from the outputs backwards


def _flat(n: fx.Node) -> tuple[Any, list[Any]]:
    """(structure, leaves) of ``n``'s arguments (:func:`explore_replay.flatten`)."""
    return flatten((n.args, n.kwargs))


def _lit_eq(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


class _Walk:
    """The match of trace ``Q`` (other value at decision ``k``) with ``P`` (module docs)."""

    def __init__(self, P: _Trace, Q: _Trace, k: int):
        self.P, self.Q, self.k = P, Q, k
        self.bP = P.pos[P.items[k]]
        self.bQ = Q.pos[Q.items[k]]
        self.memo: dict[tuple[fx.Node, fx.Node], bool] = {}
        self.corr: dict[fx.Node, fx.Node] = {}
        self.rev: dict[fx.Node, fx.Node] = {}
        self.merges: dict[Any, Value] = {}  # P value -> Q value
        self.merge_uses: set[tuple[Any, Any]] = set()  # (use, P value)
        self.pairs: dict[int, int] = {}  # shared decisions: P index -> Q index
        self.eq_q: dict[fx.Node, fx.Node] = {}  # Q node -> equal P node (after the decision)
        self.eq_p: set[fx.Node] = set()

    def same(self, a: Any, b: Any) -> bool:
        an, bn = isinstance(a, fx.Node), isinstance(b, fx.Node)
        if an != bn:
            return False
        if not an:
            return _lit_eq(a, b)
        va, vb = self.P.value(a), self.Q.value(b)
        if isinstance(va, str) or isinstance(vb, str):
            return va == vb
        key = (a, b)
        r = self.memo.get(key)
        if r is not None:
            return r
        pa, qb = self.P.pos[a] < self.bP, self.Q.pos[b] < self.bQ
        if pa and qb:
            r = a.name == b.name
        elif pa or qb:
            r = False
        else:
            r = self._alike(a, b) and all(
                self.same(x, y)
                for x, y in zip(self.P.flat(a)[1], self.Q.flat(b)[1])
                if isinstance(x, fx.Node)
            )
            if r:
                self.eq_q[b] = a
                self.eq_p.add(a)
        self.memo[key] = r
        return r

    def _alike(self, a: fx.Node, b: fx.Node) -> bool:
        """Same op, literals, structure and spec (node arguments not compared)."""
        if a.op != "call_function" or b.op != "call_function" or a.target is not b.target:
            return False
        if a.target is _aten.item.default:
            return False
        if isinstance(a.target, torch._ops.OpOverload) and (
            torch.Tag.nondeterministic_seeded in a.target.tags
        ):
            return False
        if M.get_spec(a) != M.get_spec(b):
            return False
        sa, la = self.P.flat(a)
        sb, lb = self.Q.flat(b)
        if sa != sb or len(la) != len(lb):
            return False
        for x, y in zip(la, lb):
            if isinstance(x, fx.Node) != isinstance(y, fx.Node):
                return False
            if not isinstance(x, fx.Node) and not _lit_eq(x, y):
                return False
        return True

    def _corresponds(self, a: fx.Node, b: fx.Node) -> bool:
        if self.P.pos[a] < self.bP or self.Q.pos[b] < self.bQ:
            return False
        if not self._alike(a, b):
            return False
        for x, y in zip(self.P.flat(a)[1], self.Q.flat(b)[1]):
            if isinstance(x, fx.Node):
                vx, vy = self.P.value(x), self.Q.value(y)
                if (_is_weight(vx) or _is_weight(vy)) and vx != vy:
                    return False  # never merge weights: the op itself is the merge
        return True

    def run(self) -> bool:
        """Match; False where the match is not a join (conflicting correspondences)."""
        P, Q, k = self.P, self.Q, self.k
        pout = P.program.graph.find_nodes(op="output")[0].args[0][: P.n_out]
        qout = Q.program.graph.find_nodes(op="output")[0].args[0][: Q.n_out]
        stack: list[tuple[Any, Any, Any]] = [
            (("out", i), a, b) for i, (a, b) in enumerate(zip(pout, qout))
        ]
        qi = k + 1
        for j in range(k + 1, len(P.decisions)):
            for jq in range(qi, len(Q.decisions)):
                if Q.keys[jq] == P.keys[j] and Q.decisions[jq] == P.decisions[j]:
                    self.pairs[j] = jq
                    qi = jq + 1
                    stack.append((("pred", j), P.preds[j], Q.preds[jq]))
                    break
        while stack:
            use, a, b = stack.pop()
            if self.same(a, b):
                continue
            if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                return False
            va, vb = P.value(a), Q.value(b)
            if not isinstance(va, str) and not isinstance(vb, str) and self._corresponds(a, b):
                known = self.corr.get(a)
                if known is not None:
                    if known is not b:
                        return False
                    continue
                if b in self.rev:
                    return False
                self.corr[a], self.rev[b] = b, a
                xs = [x for x in P.flat(a)[1] if isinstance(x, fx.Node)]
                ys = [y for y in Q.flat(b)[1] if isinstance(y, fx.Node)]
                for i, (x, y) in enumerate(zip(xs, ys)):
                    stack.append(((a, i), x, y))
                continue
            known_q = self.merges.get(va)
            if known_q is not None and known_q is not vb and known_q != vb:
                return False
            self.merges[va] = vb
            self.merge_uses.add((use, va))
        return True


# ---------------------------------------------------------------------------------------
# the join structure: regions and conds


@dataclass(eq=False)
class _Cond:
    key: tuple[Any, ...]  # the values taken before this decision (identifies it)
    k: int  # its index among its base trace's decisions
    base: _Trace
    decision: Decision
    pred: Value
    tail: bool
    values: list[Value]  # base values the cond produces (phis); tail: the region's outputs
    sides: dict[Any, _Region] = field(default_factory=dict)  # decision value -> side
    nested: set[int] = field(default_factory=set)  # base decisions inside the base side

    @property
    def position(self) -> int:
        return self.base.pos[self.base.items[self.k]]


@dataclass(eq=False)
class _Region:
    """A piece of one trace's graph that becomes one graph: the top graph, or a cond side."""

    base: _Trace
    members: set[fx.Node]  # base compute nodes of the region (nested sides included)
    decisions: list[int]  # base decisions inside the region, in order
    outputs: list[Value]
    suffix: bool  # runs to the program's outputs (the top graph, a tail-form side)
    parent: _Region | None = None
    cond: _Cond | None = None  # the cond this region is a side of
    to_outer: dict[Any, Value] | None = None  # other-trace side: base value -> parent's
    use_up: dict[fx.Node, fx.Node] | None = None  # other-trace side: post node -> parent's
    pred_up: dict[int, int] | None = None  # other-trace side: decision -> parent's
    conds: list[_Cond] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)  # own nodes once nested sides are cut

    def has_use(self, use: Any) -> bool:
        if use[0] == "out":
            return self.suffix
        if use[0] == "pred":
            return use[1] in self.decisions
        return use[0] in self.members

    def outer_value(self, v: Value) -> Value | None:
        if self.to_outer is None or isinstance(v, str):
            return v
        return self.to_outer.get(v)


def _in(v: Value, values: Sequence[Value]) -> int:
    for i, w in enumerate(values):
        if w is v or (isinstance(v, str) and v == w):
            return i
    return -1


class _Explorer:
    def __init__(
        self,
        model: nn.Module,
        args: tuple[torch.Tensor, ...],
        max_traces: int,
        max_decisions: int,
        pad: float | int | None = None,
    ):
        self.model = model
        self.args = args
        self.max_traces = max_traces
        self.max_decisions = max_decisions
        self.traces: dict[tuple[Any, ...], _Trace] = {}
        self.tail: set[tuple[Any, ...]] = set()
        self.weights: dict[str, tuple[torch.Tensor, str]] = {}
        self.out_names: list[str] = []
        self.conds = 0
        self.pad = pad
        self.raws: dict[tuple[Any, ...], _Raw] = {}
        self.moe_attrs: dict[str, Any] = {}  # what moe_capture recognised, on any path
        self.structures: dict[Any, _Raw] = {}  # output structure -> first path with it
        self.table: Any = None  # the variant table, where paths return different structures
        self.modules = list(model.modules())
        self.slots = {(id(m), n) for m in self.modules for n in [*m._parameters, *m._buffers]}
        self.weights_by_ptr = _weights_by_storage(model)
        self.module_paths = _module_paths(model)
        self.module_memo: dict[int, tuple[Any, ...]] = {}  # see _module_state
        self.weight_tree = _WeightTree()
        self.fast = _REGION_TRACES and not _has_hooks(self.modules)
        self.region_traces = 0  # paths assembled from a region trace (module docs, "Cost")
        self.replayed = 0  # of those, the paths whose prefix was replayed (explore_replay)
        self.region_misses = 0  # region traces refused since the last one that stood

    # -- tracing ------------------------------------------------------------------------
    def trace(self, forced: tuple[Any, ...], base: tuple[_Trace, int] | None = None) -> _Trace:
        """The path that takes ``forced`` first, then the first value of every decision.
        ``base``: a trace that agrees with ``forced`` before its decision ``k`` (a region
        trace from there may stand for the full one).

        Raises ``_Restructure`` when it returns a structure no earlier path returned (the
        traces indexed so far are then in a stale output layout)."""
        known = self.traces.get(forced)
        if known is not None:
            return known
        raw = self._raw(forced, base)
        skey = (str(raw.spec), tuple(str(M.get_spec(a)) for a in raw.outputs))
        if skey not in self.structures:
            self.structures[skey] = raw
            if len(self.structures) > 1 and self.traces:
                self.traces.clear()
                raise _Restructure()
        program, n_out = raw.program, raw.n_out
        if len(self.structures) > 1:
            # the first path of each structure, in discovery order, fixes the layout
            paths = list(self.structures.values())
            at = next((i for i, r in enumerate(paths) if r is raw), None)
            if at is None:
                paths.append(raw)
                at = len(paths) - 1
            unified, self.table = unify_outputs(
                [r.program for r in paths], [r.spec for r in paths], pad=self.pad
            )
            program = unified[at]
            n_out = len(program.output_names)
            self.out_names = list(program.output_names)
        elif not self.out_names:
            self.out_names = output_names(raw.spec, n_out) if n_out else []
        mode = raw.mode
        t = _Trace(
            tuple(d.value for d in mode.decisions),
            mode.decisions,
            mode.keys,
            program,
            n_out,
            raw.spec,
        )
        t.bindings = mode.bindings
        t.item_kinds = list(mode.item_kinds)
        if program is raw.program:
            t.scans, t.lnodes, t.oplog = raw.scans, raw.lnodes, raw.oplog
            # the tensors build_graph_module registers as they are (no new Parameter wrapper)
            t.weights = {
                w: v
                for w, (v, kind) in raw.weights.items()
                if isinstance(v, nn.Parameter) == (kind == "param")
            }
        self._index(t, mode.item_kinds)
        if len(self.traces) > 0:
            self._check_outputs(t)
        self.traces[forced] = t
        self.traces.setdefault(t.taken, t)
        return t

    def _raw(self, forced: tuple[Any, ...], base: tuple[_Trace, int] | None = None) -> _Raw:
        known = self.raws.get(forced)
        if known is not None:
            return known
        if len({id(r) for r in self.raws.values()}) >= self.max_traces:
            sites = sorted({d.site for r in self.raws.values() for d in r.mode.decisions})
            raise CaptureError(
                f"exploring the model's data-dependent branches needs more than "
                f"{self.max_traces} paths traced",
                where=", ".join(sites[:4]),
                hint="raise max_paths (the bound on traced paths); decisions that rejoin "
                "cost one trace each, decisions in tail form (early exits nested in "
                "branches, Python state set in a branch) multiply",
            )
        raw: _Raw | None = None
        if base is not None and self.fast and len(self.structures) <= 1:
            try:
                raw = self._region_raw(forced, *base)
            except Exception:  # anything unexpected: the full trace decides, as before
                raw = None
                self.region_misses += 1
                if self.region_misses >= 4:
                    self.fast = False  # the model keeps refusing: stop paying for tries
            if raw is not None:
                self.region_traces += 1
                self.replayed += int(getattr(raw, "replayed", False))
                self.region_misses = 0
        if raw is None:
            watch = _Watch(self.modules, self.slots, memo=self.module_memo) if self.fast else None
            try:
                ep, mode, spec, n_out, moe, st = self._export(forced, watch)
            except CaptureError:
                if watch is None:
                    raise
                watch = None  # the full trace without the locals' outputs, as before
                ep, mode, spec, n_out, moe, st = self._export(forced, None)
            program = to_program(ep, self.args, {}, {}, type(self.model).__name__)
            moe.annotate(program)
            self.moe_attrs.update(
                {
                    k: program.attrs[k]
                    for k in (_MOE_ATTR, _MOE_ATTR_UNRECOGNISED)
                    if k in program.attrs
                }
            )
            if moe.sites or st.get("dense", True):
                self.fast = False  # state the region traces do not model
            outputs = list(program.graph.find_nodes(op="output")[0].args[0][:n_out])
            raw = _Raw(program, spec, n_out, mode, outputs)
            if watch is not None:
                raw.oplog = st.get("oplog")
                outs = program.graph.find_nodes(op="output")[0].args[0]
                at = n_out + len(mode.preds)
                raw.scans = [watch.scans.get(d) for d in range(len(mode.decisions))]
                raw.lnodes = [
                    {key: outs[at + i] for key, i in st["locals"][d].items()}
                    if d in st["locals"]
                    else None
                    for d in range(len(mode.decisions))
                ]
        self.raws[forced] = raw
        self.raws.setdefault(tuple(d.value for d in raw.mode.decisions), raw)
        return raw

    def _export(
        self, forced: tuple[Any, ...], watch: _Watch | None
    ) -> tuple[torch.export.ExportedProgram, _DecisionMode, Any, int, MoERecord, dict[str, Any]]:
        """:func:`_trace_path`, its errors as CaptureErrors that name the path."""
        try:
            return _trace_path(self.model, self.args, list(forced), self.max_decisions, watch)
        except CaptureError as e:
            if not forced:
                raise
            # dd_sizes / moe_capture refusals: say on which path the model did it
            on = " ".join(f"{d}" for d in forced)
            raise e.with_message(f"{e.message} (on the path that decides {on})") from e
        except Exception as e:
            where = " ".join(f"{d}" for d in forced)
            err = capture_error(self.model, e, dynamic=True)
            raise err.with_message(
                f"{err.message} (on the path that decides {where or 'nothing yet'})"
            ) from e

    def _region_raw(self, forced: tuple[Any, ...], P: _Trace, k: int) -> _Raw | None:
        """Path ``forced`` (``P``'s decisions before ``k``, then another value) from a region
        trace: ``P``'s graph before decision ``k``, the traced region, and ``P``'s graph
        after the decision where the region rejoins ``P`` (module docs, "Cost"); None
        where ``P`` has no state to start from. Raises where the region trace cannot
        stand for the full trace (the caller then traces the full path)."""
        exp = P.scans[k] if k < len(P.scans) else None
        loc = P.lnodes[k] if k < len(P.lnodes) else None
        if exp is None or loc is None or not exp.safe or tuple(forced[:k]) != P.taken[:k]:
            return None
        if any(w == "constant" for w in P.program.weight_kinds.values()):
            return None  # lifted constants are named in creation order: names would differ
        items = [n for n in P.program.graph.nodes if n.target is _aten.item.default]
        if len(items) != len(P.item_kinds):
            return None  # which conversions are decisions is not known node by node
        inputs: list[tuple[tuple[Any, ...], torch.Tensor]] = []
        example: dict[fx.Node, torch.Tensor] = {}
        for key, node in loc.items():
            if node.op != "call_function":
                continue
            if node not in example:
                spec = M.tensor_spec(node)
                if not all(isinstance(d, int) for d in spec.shape):
                    return None
                example[node] = torch.zeros(tuple(spec.shape), dtype=spec.dtype)
            inputs.append((key, example[node]))
        first = [d.value == d.domain[0] for d in P.decisions]
        stops: dict[Any, int] = {}
        for j in range(k + 1, len(P.decisions)):
            sc = P.scans[j] if j < len(P.scans) else None
            if sc is None or not sc.safe or not sc.own or P.lnodes[j] is None:
                continue
            if all(first[j:]):  # the other path takes first values after its decision
                stops.setdefault(sc.key, j)
        watch = _Watch(
            self.modules,
            self.slots,
            start=k,
            switch=k,
            expect=exp,
            stops=stops,
            memo=self.module_memo,
        )
        watch.prefix = (P.decisions[: k + 1], P.keys[: k + 1])
        ep, mode, st = _trace_region(
            self.model,
            self.args,
            list(forced),
            self.max_decisions,
            watch,
            inputs,
            P.oplog,
            self.module_paths,
        )
        sig = ep.graph_signature
        if sig.user_inputs_to_mutate or sig.buffers_to_mutate:
            raise _Fallback("the region writes a tensor it did not create")
        R = to_program(ep, (*self.args, *example.values()), {}, {}, type(self.model).__name__)
        raw = _synthesize(
            P, k, R, st, mode, watch, list(example), self.weights_by_ptr, self.weight_tree
        )
        raw.replayed = st["replayed"]
        return raw

    def _index(self, t: _Trace, kinds: list[bool]) -> None:
        items: list[fx.Node] = []
        wkinds = t.program.weight_kinds  # a copy per access: once
        for i, n in enumerate(t.program.graph.nodes):
            t.pos[n] = i
            if n.op == "placeholder":
                t.nodes_of.setdefault(f"in:{n.name}", []).append(n)
            elif n.op == "get_attr":
                w = t.weights.get(n.target)
                if w is None:
                    w = t.weights[n.target] = t.program.get_weight(n.target)
                t.wkey[n] = self._weight_key(n.target, w, wkinds[n.target])
                t.nodes_of.setdefault(t.wkey[n], []).append(n)
            elif n.op == "call_function":
                t.by_name[n.name] = n
                if n.target is _aten.item.default:
                    items.append(n)
                else:
                    t.compute.append(n)
        if len(items) == len(kinds):
            items = [n for n, is_decision in zip(items, kinds) if is_decision]
        if len(items) != len(t.decisions):
            raise CaptureError(
                f"export kept {len(items)} of the {len(t.decisions)} decision points of a path",
                hint="this torch version drops aten.item nodes; report it with the model",
            )
        t.items = items
        # drop what only feeds the decision points (``ne(b, 0)`` of ``bool(b)``)
        t.preds = [_strip_bool_test(n.args[0]) for n in items]
        keep = set(t.program.graph.find_nodes(op="output")[0].args[0][: t.n_out]) | set(t.preds)
        t.compute = [
            n
            for n in t.compute
            if n in keep
            or any(u.op != "output" and u.target is not _aten.item.default for u in n.users)
        ]
        t.preds = [_strip_bool_test(n.args[0]) for n in items]
        out = t.program.graph.find_nodes(op="output")[0].args[0][: t.n_out]
        for a in out:
            if not isinstance(a, fx.Node):
                raise CaptureError(
                    f"the model returns a constant ({a!r}) beside its tensors on a path with "
                    "data-dependent branches",
                    hint="return tensors only",
                )
        t.outputs = [t.value(a) for a in out]

    def _weight_key(self, name: str, tensor: torch.Tensor, kind: str) -> str:
        """``@name``, made unique where two traces hold different tensors under one name
        (constants lifted from a literal are named in creation order)."""
        cand, i = name, 0
        while cand in self.weights:
            known = self.weights[cand][0]
            if known is tensor or (
                known.shape == tensor.shape
                and known.dtype == tensor.dtype
                and (known.data_ptr() == tensor.data_ptr() or torch.equal(known, tensor))
            ):
                return f"@{cand}"
            i += 1
            cand = f"{name}_{i}"
        self.weights[cand] = (tensor, kind)
        return f"@{cand}"

    def _check_outputs(self, t: _Trace) -> None:
        """Every path must return the same specs (after :func:`unify_outputs`); the error
        names only the model's outputs, never the explorer's predicates."""
        first = next(iter(self.traces.values()))
        a = [self.spec_of(first, v) for v in first.outputs]
        b = [self.spec_of(t, v) for v in t.outputs]
        if a != b:
            raise CaptureError(
                "two paths of the model return outputs of different shapes or types: "
                f"{', '.join(map(str, a))} vs {', '.join(map(str, b))}",
                where=", ".join(d.site for d in t.decisions[:3]),
                hint="every path of a data-dependent branch must return the same shapes "
                "(pad or project the early outputs)",
            )

    def spec_of(self, t: _Trace, v: Value) -> M.Spec:
        if isinstance(v, fx.Node):
            return M.spec(v)
        if v.startswith("@"):
            w = self.weights[v[1:]][0]
            return M.TensorSpec(tuple(w.shape), w.dtype)
        return M.spec(t.nodes_of[v][0])

    # -- building the structure -----------------------------------------------------------
    def build(self) -> _Region:
        for _ in range(10_000):
            try:
                self.conds = 0
                return self._suffix(self.trace(()), -1, None, None)
            except _Restructure:
                continue  # a new output structure: every path in the new layout
            except _Retry as r:
                new = r.keys - self.tail
                if not new:
                    raise CaptureError(
                        "the explorer could not join the paths of the model's branches",
                        hint="report this model; splice.capture_dynamic should fall back to "
                        "the exact tail form",
                    ) from None
                self.tail |= new
        raise CaptureError("the explorer did not converge")  # pragma: no cover

    def _suffix(self, B: _Trace, s: int, parent: _Region | None, cond: _Cond | None) -> _Region:
        bound = B.pos[B.items[s]] if s >= 0 else -1
        members = {n for n in B.compute if B.pos[n] > bound}
        R = _Region(
            B, members, list(range(s + 1, len(B.decisions))), list(B.outputs), True, parent, cond
        )
        if parent is not None and parent.base is not B:
            R.to_outer = {}
        self._fill(R)
        return R

    def _fill(self, R: _Region) -> None:
        inside: set[int] = set()
        carved: set[fx.Node] = set()
        for k in R.decisions:
            if k in inside:
                continue
            c = self._cond(R, k)
            self.conds += 1
            R.conds.append(c)
            inside |= c.nested
            carved |= c.sides[c.decision.value].members
            if c.tail:
                break
        R.nodes = [n for n in R.base.compute if n in R.members and n not in carved]

    def _enclosing(self, R: _Region) -> set[tuple[Any, ...]]:
        keys: set[tuple[Any, ...]] = set()
        r: _Region | None = R
        while r is not None and r.cond is not None:
            keys.add(r.cond.key)
            r = r.parent
        return keys

    def _cond(self, R: _Region, k: int) -> _Cond:
        B = R.base
        d = B.decisions[k]
        key = B.taken[:k]
        alts = [v for v in d.domain if v != d.value]
        qs = {v: self.trace((*key, v), base=(B, k)) for v in alts}
        pred = B.value(B.preds[k])
        if key in self.tail:
            if not R.suffix:
                raise _Retry(self._enclosing(R))
            c = _Cond(key, k, B, d, pred, True, list(R.outputs))
            c.nested = {j for j in R.decisions if j > k}
            c.sides[d.value] = self._suffix(B, k, R, c)
            for v, Q in qs.items():
                side = self._suffix(Q, k, R, c)
                self._map_prefix(side, Q, B, Q.pos[Q.items[k]])
                c.sides[v] = side
            for side in c.sides.values():
                got = [self.spec_of(side.base, o) for o in side.outputs]
                if got != [self.spec_of(B, o) for o in c.values]:
                    self._check_outputs(side.base)
            return c
        try:
            return self._joined(R, k, key, d, pred, qs)
        except _Retry as r:
            if not r.keys:  # a conflict at k: k in tail form, and every cond around it
                raise _Retry({key} | self._enclosing(R)) from None
            raise

    def _joined(
        self,
        R: _Region,
        k: int,
        key: tuple[Any, ...],
        d: Decision,
        pred: Value,
        qs: dict[Any, _Trace],
    ) -> _Cond:
        """Decision ``k`` of region ``R`` as a cond whose sides rejoin. Raises ``_Retry(set())``
        where the join is not sound at k, ``_Retry(enclosing)`` where k's effect leaves R."""
        B = R.base
        conflict = _Retry(set())
        walks: dict[Any, _Walk] = {}
        for v, Q in qs.items():
            w = _Walk(B, Q, k)
            if not w.run():
                raise conflict
            walks[v] = w
        bP = B.pos[B.items[k]]
        later = range(k + 1, len(B.decisions))
        # a tensor aliased before the branch and rebound in the other side: a later side
        # may read the old alias, which the latest-version rule would miss (module docs)
        for v, w in walks.items():
            for jq in w.pairs.values():
                if _outlives_rebinding(qs[v].bindings[k], qs[v].bindings[jq]):
                    raise conflict
        nested = {j for j in later if any(j not in w.pairs for w in walks.values())}
        if any(j in w.pairs for j in nested for w in walks.values()):
            raise conflict
        escape = _Retry(self._enclosing(R)) if not R.suffix else conflict
        if not nested <= set(R.decisions):
            raise escape
        values: list[Value] = []
        for w in walks.values():
            for pv in w.merges:
                if _in(pv, values) < 0:
                    values.append(pv)
        post = set().union(*(w.corr for w in walks.values()))
        eq = set().union(*(w.eq_p for w in walks.values()))
        seeds = [v for v in values if isinstance(v, fx.Node) and B.pos[v] > bP]
        seeds += [B.preds[j] for j in nested if B.pos[B.preds[j]] > bP]
        side_nodes = self._ancestors(B, seeds, bP, stop=eq, forbidden=post)
        if side_nodes is None:
            raise conflict
        if not side_nodes <= R.members:
            raise escape
        # every merge must reach the outputs through this region (or its results)
        for w in walks.values():
            for use, pv in w.merge_uses:
                if not self._contained(R, use, pv):
                    raise escape
        # a value merged here must not also be read unmerged after the decision
        for w in walks.values():
            for pv in w.merges:
                for use in self._uses(B, pv, bP, side_nodes):
                    user = use[0] if use[0] not in ("out", "pred") else None
                    if user is not None and user not in w.corr and user not in w.eq_p:
                        continue  # not reached from the outputs on this path: dead
                    if (use, pv) not in w.merge_uses:
                        raise conflict
        c = _Cond(key, k, B, d, pred, False, values, nested=nested)
        specs = [self.spec_of(B, v) for v in values]
        bside = _Region(B, side_nodes, sorted(nested), list(values), False, R, c)
        self._fill(bside)
        c.sides[d.value] = bside
        for v, Q in qs.items():
            w = walks[v]
            bQ = Q.pos[Q.items[k]]
            outs: list[Value] = []
            for pv in values:
                qv = w.merges.get(pv)
                if qv is None:
                    qv = self._q_equivalent(w, pv)
                if qv is None:
                    raise conflict
                outs.append(qv)
            if [self.spec_of(Q, q) for q in outs] != specs:
                if any(_in(pv, B.outputs) >= 0 for pv in values):
                    self._check_outputs(Q)
                raise conflict
            q_nested = [j for j in range(k + 1, len(Q.decisions)) if j not in w.pairs.values()]
            q_seeds = [q for q in outs if isinstance(q, fx.Node) and Q.pos[q] > bQ]
            q_seeds += [Q.preds[j] for j in q_nested if Q.pos[Q.preds[j]] > bQ]
            q_nodes = self._ancestors(Q, q_seeds, bQ, stop=set(w.eq_q), forbidden=set(w.rev))
            if q_nodes is None:
                raise conflict
            side = _Region(Q, q_nodes, q_nested, outs, False, R, c)
            side.to_outer = {}
            side.use_up = dict(w.rev)
            side.pred_up = {jq: jp for jp, jq in w.pairs.items()}
            self._map_prefix(side, Q, B, bQ, w)
            self._fill(side)
            c.sides[v] = side
        return c

    def _q_equivalent(self, w: _Walk, pv: Value) -> Value | None:
        """The other trace's value equal to ``pv`` (a prefix node, an input, a weight, or a
        node computed the same way on both sides), or None."""
        if isinstance(pv, str):
            return pv
        if w.P.pos[pv] < w.bP:
            return w.Q.by_name.get(pv.name)
        for q, p in w.eq_q.items():
            if p is pv:
                return q
        return None

    def _map_prefix(
        self, side: _Region, Q: _Trace, B: _Trace, bQ: int, w: _Walk | None = None
    ) -> None:
        """How the side of trace ``Q`` names the values it reads from before its cond."""
        m = side.to_outer if side.to_outer is not None else {}
        for n in Q.compute:
            if Q.pos[n] < bQ and n.name in B.by_name:
                m[n] = B.by_name[n.name]
        if w is not None:
            m.update(w.eq_q)
        side.to_outer = m

    def _ancestors(
        self,
        B: _Trace,
        seeds: list[fx.Node],
        bound: int,
        *,
        stop: set[fx.Node],
        forbidden: set[fx.Node],
    ) -> set[fx.Node] | None:
        """Compute nodes after ``bound`` that ``seeds`` depend on, not through ``stop``;
        None if one of them is ``forbidden`` (computed after the join)."""
        out: set[fx.Node] = set()
        stack = list(seeds)
        while stack:
            n = stack.pop()
            if n in out or n.op != "call_function" or B.pos[n] <= bound or n in stop:
                continue
            if n in forbidden:
                return None
            out.add(n)
            stack.extend(n.all_input_nodes)
        return out

    def _uses(self, B: _Trace, v: Value, bound: int, side: set[fx.Node]) -> list[Any]:
        """The reads of ``v`` after position ``bound`` outside ``side``, as walk uses."""
        nodes = B.nodes_of.get(v, []) if isinstance(v, str) else [v]
        uses: list[Any] = []
        for n in nodes:
            for u in n.users:
                if u.op == "output" or u in side or u.target is _aten.item.default:
                    continue
                if B.pos[u] <= bound:
                    continue
                xs = [x for x in _flat(u)[1] if isinstance(x, fx.Node)]
                uses += [(u, i) for i, x in enumerate(xs) if x is n]
        uses += [("out", i) for i, o in enumerate(B.outputs) if o is v or o == v]
        uses += [
            ("pred", j)
            for j, p in enumerate(B.preds)
            if B.pos[B.items[j]] > bound and B.value(p) == v and B.items[j] not in side
        ]
        return uses

    def _contained(self, R: _Region, use: Any, pv: Value) -> bool:
        r: _Region | None = R
        while r is not None:
            if r.has_use(use):
                return True
            if r.parent is None or r.cond is None:
                return False
            i = _in(pv, r.outputs)
            if i < 0:
                return False
            if r.parent.base is not r.base:
                if use[0] == "pred":
                    j = (r.pred_up or {}).get(use[1])
                    if j is None:
                        return False
                    use = ("pred", j)
                elif use[0] != "out":
                    u = (r.use_up or {}).get(use[0])
                    if u is None:
                        return False
                    use = (u, use[1])
            pv = r.cond.values[i] if not r.cond.tail else r.parent.outputs[i]
            r = r.parent
        return False


def _synthesize(
    P: _Trace,
    k: int,
    R: Program,
    st: dict[str, Any],
    mode: _DecisionMode,
    watch: _Watch,
    ex_nodes: list[fx.Node],
    by_storage: dict[tuple[Any, ...], tuple[str, torch.Tensor, str]],
    tree: _WeightTree,
) -> _Raw:
    """The full trace of a region run's path: ``P``'s nodes up to its decision ``k``, the
    region ``R`` (its inputs after the model's read ``ex_nodes``), then -- where the run
    stopped at ``P``'s decision ``j`` -- ``P``'s nodes after ``j``, each read of a value
    from before ``j`` through the tensor local that holds it there (any other read: the
    region cannot stand for the path)."""
    G = fx.Graph()
    pg = P.program.graph
    env: dict[fx.Node, fx.Node] = {}
    weights: dict[str, tuple[torch.Tensor, str]] = {}
    attrs: dict[str, fx.Node] = {}
    cut = P.pos[P.items[k]]
    pkinds = P.program.weight_kinds  # a copy per access: once
    # the weights the copied part reads (export lifts every weight of the model; most are
    # read only by code the other paths run): a path's graph stays O(what it copies)
    stop_j = watch.stopped if st["stopped"] else None
    cut_after = P.pos[P.items[stop_j]] if stop_j is not None else len(P.pos)
    held = {
        v
        for loc in (*P.lnodes[: k + 1], P.lnodes[stop_j] if stop_j is not None else None)
        if loc
        for v in loc.values()
    }
    for n in pg.nodes:
        if n.op == "output":
            break
        if n.op == "call_function" and P.pos[n] > cut:
            continue
        if n.op not in ("placeholder", "get_attr", "call_function"):
            raise _Fallback("an unexpected node")
        if n.op == "get_attr" and n not in held and not _read_outside(P, n, cut, cut_after):
            continue
        env[n] = copy_node(G, n, env.__getitem__)
        if n.op == "get_attr":
            w = P.weights.get(n.target)
            if w is None:
                w = P.program.get_weight(n.target)
            weights[n.target] = (w, pkinds[n.target])
            attrs.setdefault(n.target, env[n])
    # the region
    pphs = list(pg.find_nodes(op="placeholder"))
    rphs = list(R.graph.find_nodes(op="placeholder"))
    if len(rphs) != len(pphs) + len(ex_nodes):
        raise _Fallback("the region's inputs")
    rmap: dict[fx.Node, fx.Node] = {}
    for rp, pn in zip(rphs, [*pphs, *ex_nodes]):
        if pn not in env:
            raise _Fallback("a region input computed after its decision")
        rmap[rp] = env[pn]
    rout: Sequence[Any] = ()
    for n in R.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            rout = n.args[0]
            break
        if n.op == "get_attr":
            # the region reads the model's weights as constants: name them as capture does
            known = by_storage.get(_storage_key(R.get_weight(n.target)))
            if known is None:
                raise _Fallback("the region lifts a constant that is not a weight")
            name, tensor, kind = known
            if name in weights:
                if weights[name][0] is not tensor:
                    raise _Fallback("two weights under one name")
            else:
                weights[name] = (tensor, kind)
                attrs[name] = G.get_attr(name)
                attrs[name].meta.update(n.meta)
            rmap[n] = attrs[name]
            continue
        if n.op != "call_function" or not (
            isinstance(n.target, torch._ops.OpOverload) or n.target is operator.getitem
        ):
            raise _Fallback("the region calls something other than an ATen op")
        rmap[n] = copy_node(G, n, rmap.__getitem__)
    n_leaves, n_preds = st["n"], st["n_preds"]

    def region_local(d: int) -> dict[tuple[Any, ...], fx.Node]:
        return {key: rmap[rout[n_leaves + n_preds + i]] for key, i in st["locals"][d].items()}

    q = mode.decisions
    scans: list[_Scan | None] = [
        _Scan(sc.key, sc.tids, sc.real, sc.frames, sc.safe, own=False) if sc else None
        for sc in P.scans[: k + 1]
    ]
    lnodes: list[dict[tuple[Any, ...], fx.Node] | None] = []
    for d in range(k + 1):
        loc = P.lnodes[d] if d < len(P.lnodes) else None
        ok = loc is not None and all(v in env for v in loc.values())
        lnodes.append({key: env[v] for key, v in loc.items()} if ok and loc else None)
    last = watch.stop_at if st["stopped"] else len(q) - 1
    for d in range(k + 1, (last or 0) + 1):
        scans.append(watch.scans.get(d))
        lnodes.append(region_local(d) if d in st["locals"] else None)
    kinds = list(mode.item_kinds)
    decisions, keys, bindings = list(q), list(mode.keys), list(mode.bindings)
    if st["stopped"]:
        j, i = watch.stopped, watch.stop_at
        assert j is not None and i is not None
        ps, qs = P.scans[j], watch.scans[i]
        if ps is None or ps.real != qs.real or P.lnodes[j] is None:
            raise _Fallback("the rejoin's state")
        qloc = region_local(i)
        sub: dict[fx.Node, fx.Node] = {}
        for key, pn in (P.lnodes[j] or {}).items():
            qn = qloc.get(key)
            if qn is None or sub.setdefault(pn, qn) is not qn:
                raise _Fallback("the rejoin's tensor locals differ")
        if len({id(v) for v in sub.values()}) != len(sub):
            raise _Fallback("the rejoin's tensor locals alias differently")
        cut_j = P.pos[P.items[j]]
        post: dict[fx.Node, fx.Node] = {}

        def after(a: fx.Node) -> fx.Node:
            if a in post:
                return post[a]
            if a in sub:
                return sub[a]
            if a.op in ("placeholder", "get_attr"):
                return env[a]
            raise _Fallback("the path after the rejoin reads a value no local holds")

        for n in pg.nodes:
            if n.op == "call_function" and P.pos[n] > cut_j:
                post[n] = copy_node(G, n, after)
        outs = [after(a) for a in pg.find_nodes(op="output")[0].args[0][: P.n_out]]
        seen = sum(
            1
            for n in pg.nodes
            if n.op == "call_function" and n.target is _aten.item.default and P.pos[n] <= cut_j
        )
        if len(P.item_kinds) < seen:
            raise _Fallback("the base trace's conversions")
        kinds += P.item_kinds[seen:]
        decisions += P.decisions[j + 1 :]
        keys += P.keys[j + 1 :]
        tag = id(watch)
        fmap = dict(zip(ps.frames, qs.frames)) if len(ps.frames) == len(qs.frames) else {}
        tmap = {ps.tids[key]: qs.tids[key] for key in ps.tids if key in qs.tids}
        for b in P.bindings[j + 1 :]:
            bindings.append(
                {
                    (fmap.get(key[0], (tag, key[0])), *key[1:]): tmap.get(v, (tag, v))
                    for key, v in b.items()
                }
            )
        scans += [None] * (len(decisions) - len(scans))
        lnodes += [None] * (len(decisions) - len(lnodes))
        spec, n_out, names = P.spec, P.n_out, P.program.output_names[: P.n_out]
    else:
        outs = [rmap[a] for a in rout[:n_leaves]]
        spec, n_out, names = st["spec"], n_leaves, R.output_names[:n_leaves]
    items = [n for n in G.nodes if n.op == "call_function" and n.target is _aten.item.default]
    if len(items) != len(kinds) or sum(kinds) != len(decisions):
        raise _Fallback("the assembled path's conversions")
    preds = [n.args[0] for n, kind in zip(items, kinds) if kind]
    out = G.output((*outs, *preds))
    M.set_loc(out, M.UNKNOWN_LOC)
    gm = tree.graph_module(G, weights, type(P.program.graph_module).__name__)
    program = Program(
        gm,
        output_names=[*names, *(f"_pred{i}" for i in range(len(preds)))],
        weight_kinds={w: kind for w, (_, kind) in weights.items()},
        name=P.program.name,
    )
    info = _PathInfo(decisions, keys, bindings, kinds)
    raw = _Raw(program, spec, n_out, info, list(outs), scans[: len(decisions)], lnodes)
    raw.weights = weights
    return raw


def _read_outside(P: _Trace, n: fx.Node, cut: int, cut_after: int) -> bool:
    """Is node ``n`` of ``P`` read at or before position ``cut``, after ``cut_after``, or by
    the output?"""
    for u in n.users:
        if u.op != "call_function":
            return True
        at = P.pos[u]
        if at <= cut or at > cut_after:
            return True
    return False


class _WeightTree:
    """The weights of the paths assembled from region traces, registered once per capture
    in one tree of container modules that every assembled path's GraphModule shares (a
    path's own GraphModule would nest a container per dotted name again: O(model) module
    constructions per path). An assembled path is only read (its graph, its weights by
    name), never run or edited; its GraphModule may reach weights of other paths, which
    its ``weight_kinds`` do not name."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.known: dict[str, torch.Tensor] = {}  # name -> the tensor registered under it

    def graph_module(
        self, graph: fx.Graph, weights: dict[str, tuple[torch.Tensor, str]], class_name: str
    ) -> fx.GraphModule:
        """A GraphModule over ``graph`` whose get_attr targets read ``weights``."""
        for name, (t, kind) in weights.items():
            known = self.known.get(name)
            if known is None and "." in name:
                set_weight_attr(self.root, name, t, kind)
                self.known[name] = t
            elif known is not t:  # a top-level name, or another tensor under a known name
                return build_graph_module(graph, weights, {}, class_name=class_name)
        gm = graph_module_cls()(nn.Module(), fx.Graph(), class_name=class_name)
        for top in dict.fromkeys(name.split(".", 1)[0] for name in weights):
            gm._modules[top] = self.root._modules[top]
        gm.graph = graph
        return gm


def _has_hooks(modules: Sequence[nn.Module]) -> bool:
    """Module hooks run Python the region traces do not model."""
    from torch.nn.modules import module as _module

    hooks = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_state_dict_hooks",
    )
    if any(getattr(_module, f"_global{h}", None) for h in hooks):
        return True
    return any(getattr(m, h, None) for m in modules for h in hooks[:2])


#: region traces on (module docs, "Cost"); tests turn them off to compare with full traces
_REGION_TRACES = True
_REPLAY = True  # region runs replay their prefix from the base trace's calls (explore_replay)


def _paths(R: _Region) -> int:
    """How many paths the region's conds give (the old explorer's path count)."""
    total = 1
    for c in R.conds:
        total *= sum(_paths(s) for s in c.sides.values())
    return total


# ---------------------------------------------------------------------------------------
# the structure -> one program with conds


class _Emitter:
    def __init__(self, ex: _Explorer):
        self.ex = ex
        self._sub = 0

    def region(
        self,
        R: _Region,
        graph: fx.Graph,
        outer: Callable[[Value], fx.Node],
        subgraphs: dict[str, fx.GraphModule],
    ) -> list[fx.Node]:
        """Emit ``R`` into ``graph``; ``outer`` gives the node of a value from outside."""
        B = R.base
        own = set(R.nodes)
        phis: dict[Any, list[tuple[int, _Cond, int]]] = {}
        for c in R.conds:
            for i, v in enumerate(c.values):
                phis.setdefault(_vkey(v), []).append((c.position, c, i))

        def resolve(v: Value, t: int) -> tuple[str, Any]:
            for cp, c, i in reversed(phis.get(_vkey(v), [])):
                if cp < t:
                    return ("phi", (c, i))
            if isinstance(v, fx.Node) and v in own:
                return ("node", v)
            return ("outer", v)

        # sides first: their graphs say what each cond reads from here
        sides: dict[int, tuple[dict[Any, tuple[fx.Graph, dict, dict]], list[Value]]] = {}
        for c in R.conds:
            sides[id(c)] = self._sides(c)
        # schedule: program order, each unit after what it reads
        units: list[Any] = list(R.nodes) + list(R.conds)
        unit_pos = {id(u): (B.pos[u] if isinstance(u, fx.Node) else u.position) for u in units}
        deps: dict[int, set[int]] = {}
        users: dict[int, list[Any]] = {}

        def dep_of(r: tuple[str, Any]) -> Any:
            if r[0] == "node":
                return r[1]
            if r[0] == "phi":
                return r[1][0]
            return None

        prev = None
        for u in units:
            if isinstance(u, fx.Node):
                reads = [resolve(B.value(a), B.pos[u]) for a in u.all_input_nodes]
            else:
                reads = [resolve(u.pred, u.position)]
                reads += [resolve(v, u.position) for v in sides[id(u)][1]]
            ds = {id(x) for x in (dep_of(r) for r in reads) if x is not None}
            if not isinstance(u, fx.Node):
                if prev is not None:
                    ds.add(id(prev))
                prev = u
            ds.discard(id(u))
            deps[id(u)] = ds
        # only what the outputs and the conds need (a node of a trace that nothing reads
        # may read a value that a cond's side now computes)
        inf = len(B.pos) + 1
        stack = [id(c) for c in R.conds]
        stack += [id(x) for x in (dep_of(resolve(v, inf)) for v in R.outputs) if x is not None]
        needed: set[int] = set()
        while stack:
            i = stack.pop()
            if i not in needed:
                needed.add(i)
                stack.extend(deps[i])
        units = [u for u in units if id(u) in needed]
        for u in units:
            for x in deps[id(u)]:
                users.setdefault(x, []).append(u)
        env: dict[int, Any] = {}

        def get(r: tuple[str, Any]) -> fx.Node:
            if r[0] == "node":
                return env[id(r[1])]
            if r[0] == "phi":
                c, i = r[1]
                return env[id(c)][i]
            return outer(r[1])

        waiting = {id(u): len(deps[id(u)]) for u in units}
        heap = [(unit_pos[id(u)], n, u) for n, u in enumerate(units) if not deps[id(u)]]
        order = {id(u): n for n, u in enumerate(units)}
        heapq.heapify(heap)
        done = 0
        while heap:
            _, _, u = heapq.heappop(heap)
            done += 1
            if isinstance(u, fx.Node):
                t = B.pos[u]
                env[id(u)] = copy_node(graph, u, lambda a, t=t: get(resolve(B.value(a), t)))
            else:
                graphs, ops = sides[id(u)]
                env[id(u)] = self._emit_cond(
                    u,
                    graph,
                    subgraphs,
                    graphs,
                    [get(resolve(v, u.position)) for v in ops],
                    get(resolve(u.pred, u.position)),
                )
            for x in users.get(id(u), []):
                waiting[id(x)] -= 1
                if waiting[id(x)] == 0:
                    heapq.heappush(heap, (unit_pos[id(x)], order[id(x)], x))
        if done != len(units):
            raise CaptureError(
                "the joined paths have no order in which every value is computed before use",
                where=", ".join(c.decision.site for c in R.conds[:3]),
                hint="report this model",
            )
        return [get(resolve(v, inf)) for v in R.outputs]

    def _sides(self, c: _Cond) -> tuple[dict[Any, tuple[fx.Graph, dict, dict]], list[Value]]:
        """Each side of ``c`` as a graph with its placeholders, and the cond's operands (values
        of the region around it); every side takes every operand."""
        graphs: dict[Any, tuple[fx.Graph, dict, dict]] = {}
        operands: list[Value] = []
        for v, S in c.sides.items():
            g = fx.Graph()
            phs: dict[Any, fx.Node] = {}
            subs: dict[str, fx.GraphModule] = {}

            def outer(sv: Value, S: _Region = S, g: fx.Graph = g, phs: dict = phs) -> fx.Node:
                ov = S.outer_value(sv)
                if ov is None:
                    raise CaptureError(
                        "a branch side reads a value the explorer cannot name outside it",
                        where=c.decision.site,
                        hint="report this model",
                    )
                kk = _vkey(ov)
                if kk not in phs:
                    phs[kk] = _placeholder(g, _name_of(ov), self.ex.spec_of(c.base, ov))
                    if _in(ov, operands) < 0:
                        operands.append(ov)
                return phs[kk]

            outs = self.region(S, g, outer, subs)
            g.output(tuple(outs))
            graphs[v] = (g, phs, subs)
        for g, phs, _subs in graphs.values():
            for ov in operands:
                kk = _vkey(ov)
                if kk not in phs:
                    phs[kk] = _placeholder(g, _name_of(ov), self.ex.spec_of(c.base, ov))
            first = next(n for n in g.nodes if n.op != "placeholder")
            for ov in operands:
                first.prepend(phs[_vkey(ov)])
        return graphs, operands

    def _emit_cond(
        self,
        c: _Cond,
        graph: fx.Graph,
        subgraphs: dict[str, fx.GraphModule],
        graphs: dict[Any, tuple[fx.Graph, dict, dict]],
        ops: list[fx.Node],
        pred: fx.Node,
    ) -> list[fx.Node]:
        loc = _site_loc(c.decision.site)
        specs = [self.ex.spec_of(c.base, v) for v in c.values]
        gms = {}
        for v, (g, _phs, subs) in graphs.items():
            _dce(g)
            gms[v] = build_graph_module(g, {}, subs, class_name="SubGraph")
        domain = c.decision.domain
        if domain == (False, True):
            return self._cond_node(graph, subgraphs, pred, gms[True], gms[False], ops, loc, specs)
        return self._switch(graph, subgraphs, pred, list(domain), gms, ops, loc, specs)

    def _switch(
        self,
        graph: fx.Graph,
        subgraphs: dict[str, fx.GraphModule],
        idx: fx.Node,
        values: list[Any],
        gms: dict[Any, fx.GraphModule],
        ops: list[fx.Node],
        loc: M.Loc,
        specs: list[M.Spec],
    ) -> list[fx.Node]:
        """``cond(idx == values[0], side, rest)`` where rest is the chain over the others."""
        first, *rest = values
        pred = graph.call_function(_aten.eq.Scalar, (idx, first))
        M.set_spec(pred, M.TensorSpec(M.tensor_spec(idx).shape, torch.bool))
        M.set_loc(pred, loc)
        then_gm = gms[first]
        if len(rest) == 1:
            return self._cond_node(graph, subgraphs, pred, then_gm, gms[rest[0]], ops, loc, specs)
        inner = fx.Graph()
        phs = []
        for o in ops:
            ph = inner.placeholder(o.name)
            M.set_spec(ph, M.spec(o))
            M.set_loc(ph, M.UNKNOWN_LOC)
            phs.append(ph)
        index = inner.placeholder("index")
        M.set_spec(index, M.spec(idx))
        M.set_loc(index, M.UNKNOWN_LOC)
        inner_subs: dict[str, fx.GraphModule] = {}
        res = self._switch(inner, inner_subs, index, rest, gms, phs, loc, specs)
        inner.output(tuple(res))
        else_gm = build_graph_module(inner, {}, inner_subs, class_name="SubGraph")
        _add_placeholder(then_gm, "index", M.spec(idx))
        return self._cond_node(graph, subgraphs, pred, then_gm, else_gm, [*ops, idx], loc, specs)

    def _cond_node(
        self,
        graph: fx.Graph,
        subgraphs: dict[str, fx.GraphModule],
        pred: fx.Node,
        then_gm: fx.GraphModule,
        else_gm: fx.GraphModule,
        ops: list[fx.Node],
        loc: M.Loc,
        specs: list[M.Spec],
    ) -> list[fx.Node]:
        refs = []
        for gm in (then_gm, else_gm):
            name = f"branch_{self._sub}"
            self._sub += 1
            subgraphs[name] = gm
            ref = graph.get_attr(name)
            M.set_spec(ref, M.GraphRefSpec(name))
            M.set_loc(ref, loc)
            refs.append(ref)
        cond = graph.call_function(torch.ops.higher_order.cond, (pred, *refs, tuple(ops)))
        M.set_spec(cond, M.TupleSpec(tuple(specs)))
        M.set_loc(cond, loc)
        results = []
        for i, s in enumerate(specs):
            g = graph.call_function(_getitem, (cond, i))
            M.set_spec(g, s)
            M.set_loc(g, loc)
            results.append(g)
        return results


def _dce(g: fx.Graph) -> None:
    """Dead-code elimination that keeps every cond (a decision with no result still
    decides: the branch trace records it)."""
    cond = torch.ops.higher_order.cond
    g.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or n.target is cond)


def _is_weight(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("@")


def _vkey(v: Value) -> Any:
    return v if isinstance(v, str) else id(v)


def _name_of(v: Value) -> str:
    if isinstance(v, str):
        return _ph_name(v) if v.startswith("@") else v[3:]
    return v.name


def _placeholder(g: fx.Graph, name: str, spec: M.Spec) -> fx.Node:
    phs = list(g.find_nodes(op="placeholder"))
    nodes = list(g.nodes)
    if phs:
        where = g.inserting_after(phs[-1])
    elif nodes:
        where = g.inserting_before(nodes[0])
    else:
        where = contextlib.nullcontext()
    with where:
        ph = g.placeholder(name)
    M.set_spec(ph, spec)
    M.set_loc(ph, M.UNKNOWN_LOC)
    return ph


def _add_placeholder(gm: fx.GraphModule, name: str, spec: M.Spec) -> None:
    """Append an (unused) placeholder: cond passes the same operands to both branches, and
    an index chain's else branch also takes the index."""
    _placeholder(gm.graph, name, spec)
    gm.recompile()


_getitem = operator.getitem


def _strip_bool_test(n: fx.Node) -> fx.Node:
    """``bool(b)`` on a bool tensor traces as ``ne(b, 0)``: the condition is ``b`` itself
    (TVM also miscompiles ``ne`` on bool tensors: an fcmp on i1)."""
    if (
        n.op == "call_function"
        and n.target is _aten.ne.Scalar
        and n.args[1] in (0, False)
        and isinstance(n.args[0], fx.Node)
        and M.tensor_spec(n.args[0]).dtype == torch.bool
    ):
        return n.args[0]
    return n


def _ph_name(name: str) -> str:
    return "w_" + name[1:].replace(".", "_") if name.startswith("@") else name


def _site_loc(site: str) -> M.Loc:
    file, _, line = site.rpartition(":")
    return M.Loc(file=file, line=int(line)) if line.isdigit() else M.UNKNOWN_LOC


@contextlib.contextmanager
def _recursion(limit: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def capture_dynamic(
    model: nn.Module,
    example_inputs: Any,
    *,
    signatures: Sequence[Any] | None = None,
    max_paths: int = 256,
    max_decisions: int = 256,
    pad_outputs: float | int | None = None,
    name: str | None = None,
) -> Program | SignatureSet:
    """Capture ``model`` with every path of its data-dependent control flow (module docs).

    Returns a Program with one ``torch.cond`` per decision site (sides that rejoin; tail
    form where the outputs differ); a model with no data-dependent decision gives the same
    Program as :func:`splice.capture`. ``program.attrs`` records ``paths`` (the paths
    through the conds), ``traces`` (the paths traced to find them), ``region_traces`` (how
    many of those were assembled from a region trace rather than a full export; module
    docs, "Cost") and ``conds``.

    ``max_paths`` bounds the number of traced paths (a CaptureError beyond it): k sequential
    gates need k + 1. ``max_decisions`` bounds the decisions on one path (an unbounded
    loop is an error).

    Paths may return different structures (a list of the exits computed so far, a shorter
    sequence): the outputs are unified by :func:`splice.ir.outputs.unify_outputs` (a
    variant index and every variant's slots; with ``pad_outputs``, one padded structure
    with that fill value) and ``program.attrs["variants"]`` records the variant table;
    calling the program returns the path's own structure.

    ``signatures``: more example inputs, one per other input shape the model must accept.
    Shapes are constants in a capture, so a branch on a shape (``if x.shape[-1] > 16``) is
    decided while tracing; with ``signatures`` the model is captured once per distinct
    signature and the result is a :class:`~splice.ir.signatures.SignatureSet`, which picks
    the capture by the inputs' shapes (in the artifact too: the host program's
    ``signature`` step).
    """
    examples = [example_inputs, *(signatures or [])]
    if len(examples) > 1:
        programs: list[Program] = []
        seen: set[Any] = set()
        for ex in examples:
            args, _ = split_inputs(ex)
            sig = signature_of_values(args)
            if sig in seen:
                continue
            seen.add(sig)
            programs.append(
                capture_dynamic(
                    model,
                    ex,
                    max_paths=max_paths,
                    max_decisions=max_decisions,
                    pad_outputs=pad_outputs,
                    name=name,
                )
            )
        if len(programs) > 1:
            return SignatureSet(programs, name=programs[0].name)
        return programs[0]
    args, kwargs = split_inputs(example_inputs)
    if kwargs:
        raise CaptureError(
            "capture of data-dependent control flow takes positional tensor inputs only",
            hint="wrap the model so that its forward takes tensors positionally",
        )
    was_training = model.training
    model.eval()
    ex = _Explorer(model, tuple(args), max_paths, max_decisions, pad_outputs)
    try:
        with _recursion(20_000), full_collections_deferred():
            root = ex.trace(())
            if not root.decisions:
                p = root.program
                p.name = ident(name or type(model).__name__)
                return p
            region = ex.build()
            root = ex.trace(())
            graph = fx.Graph()
            top: dict[Any, fx.Node] = {}
            for n in root.program.graph.find_nodes(op="placeholder"):
                top[f"in:{n.name}"] = graph.node_copy(n)

            def outer(v: Value) -> fx.Node:
                if isinstance(v, str) and v.startswith("@") and v not in top:
                    top[v] = graph.get_attr(v[1:])
                    M.set_spec(top[v], ex.spec_of(root, v))
                    M.set_loc(top[v], M.UNKNOWN_LOC)
                if not isinstance(v, str) or v not in top:
                    raise CaptureError(
                        f"the joined program reads {v} from outside the model",
                        hint="report this model",
                    )
                return top[v]

            subgraphs: dict[str, fx.GraphModule] = {}
            outs = _Emitter(ex).region(region, graph, outer, subgraphs)
            graph.output(tuple(outs))
    finally:
        model.train(was_training)
    _dce(graph)
    used = {n.target for n in graph.find_nodes(op="get_attr")} - set(subgraphs)
    gm = build_graph_module(
        graph,
        {w: ex.weights[w] for w in used},
        subgraphs,
        class_name=f"Program_{ident(name or type(model).__name__)}",
    )
    program = Program(
        gm,
        output_names=ex.out_names or None,
        weight_kinds={w: ex.weights[w][1] for w in used},
        name=ident(name or type(model).__name__),
    )
    if ex.table is not None:
        program.attrs["variants"] = ex.table
    program.attrs.update(ex.moe_attrs)
    program.attrs["paths"] = _paths(region)
    program.attrs["traces"] = len({id(t) for t in ex.traces.values()})
    program.attrs["conds"] = ex.conds
    program.attrs["region_traces"] = ex.region_traces
    program.attrs["replayed_prefixes"] = ex.replayed
    return program


__all__ = ["Decision", "capture_dynamic", "cond_trace", "eager_decisions"]
