"""Replay of a region run's prefix from the first trace's recorded op results.

A region run (:mod:`splice.ir.explore`, module docs "Cost") executes ``forward`` again with
the other path's decisions; everything before its decision ``k`` is the first trace's
prefix, untraced. Running those ops on fake tensors costs O(k) fake dispatches per path,
O(n^2) over n sequential decisions. The prefix needs no values, only the Python state at
``k``: which tensors the frames hold, their shapes, and the decisions before ``k``.

So the first (full) trace records, per top-level ``__torch_function__`` call of the model's
code (:class:`OpLog`), the op, a signature of its arguments (tensor shapes and dtypes,
plain literals) and the metadata of its tensor results; a region run's prefix
(:class:`Replay`) answers each call with fresh fake tensors of the recorded metadata (or
the argument the op returned, for in-place ops) instead of running it. Calls whose results
are not plain tensors, that involve tensors the decision mode tracks (constants folded
while tracing, index tensors), that return a tensor that existed before, or whose results
have a storage offset or symbolic sizes are run as before. A call that differs from the
record (another op, other argument signature, an in-place op whose argument's metadata
differs from the recorded result) stops the replay: :attr:`Replay.failed` is set, the call
raises :class:`ReplayDiverged`, and the explorer traces the full path instead.

Contract: where the replay does not fail, every tensor the prefix produces has the shape,
stride, dtype, device and ``requires_grad`` of the same tensor in the first trace, and
tensor identities (which call returned which argument) are the same; the Python code runs
exactly as in a full run. Storage sharing between views is not reproduced: the region
trace refuses writes to its inputs, so no later read can observe it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.overrides import TorchFunctionMode

__all__ = ["OpLog", "OpRecord", "Replay", "ReplayDiverged", "flatten"]

# one tensor result: ("arg", index into the call's flat arguments, meta) or ("new", meta)
# with meta = (shape, stride, dtype, device, requires_grad)
_Out = tuple[str, int, tuple[Any, ...]]


class ReplayDiverged(Exception):
    """The region run's prefix made a call other than the recorded one."""


@dataclass(frozen=True, eq=False)
class OpRecord:
    """One top-level torch function call of the first trace.

    ``outs`` is None where the call must run (not replayable); ``single``: the call
    returned one tensor (else a tuple or list of ``len(outs)``, of type ``seq``)."""

    func: Any
    sig: tuple[Any, ...]
    outs: tuple[_Out, ...] | None
    single: bool = True
    seq: type = tuple


_SEQS = frozenset({tuple, list, immutable_list, torch.Size})
_MAPS = frozenset({dict, immutable_dict})
_LEAF_TYPES = frozenset(
    {bool, int, float, complex, str, type(None), slice, type(Ellipsis), torch.dtype}
    | {torch.device, torch.layout, torch.memory_format, fx.Node}
)


class _Unusual(Exception):
    """A container :func:`flatten`'s fast path does not handle."""


def flatten(tree: Any) -> tuple[Any, list[Any]]:
    """``(structure, leaves)`` of ``tree`` as ``pytree.tree_flatten`` gives them: the same
    leaves in the same order, and two structures are equal exactly where pytree's specs are.
    Tuples, lists, ``torch.Size``, dicts and fx's immutable containers of tensors, nodes
    and plain values are walked here (pytree's per-node registry lookups cost more than
    the walk: the explorer flattens every op's arguments, per path); anything else goes
    through pytree."""
    leaves: list[Any] = []
    try:
        return ("plain", _walk(tree, leaves)), leaves
    except _Unusual:
        leaves, spec = pytree.tree_flatten(tree)
        return ("pytree", spec), leaves


def _walk(x: Any, leaves: list[Any]) -> Any:
    t = type(x)
    if t in _SEQS:
        return (t, tuple([_walk(c, leaves) for c in x]))
    if t in _MAPS:
        return (t, tuple(x), tuple([_walk(c, leaves) for c in x.values()]))
    if t in _LEAF_TYPES or isinstance(x, torch.Tensor) or pytree.tree_is_leaf(x):
        leaves.append(x)
        return None
    raise _Unusual


def _leaves(args: Any, kwargs: Any) -> list[Any]:
    return flatten((args, kwargs))[1]


def _sig(leaves: list[Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for a in leaves:
        if isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.dtype))
        elif isinstance(a, (bool, int, float, str, type(None), torch.dtype, torch.device)):
            out.append((type(a), a))
        else:
            out.append(type(a))
    return tuple(out)


def _meta(t: torch.Tensor) -> tuple[Any, ...] | None:
    """The metadata a replayed result is built with; None where it cannot be rebuilt."""
    if t.storage_offset() != 0 or not all(isinstance(d, int) for d in t.shape):
        return None
    stride = t.stride()
    if not all(isinstance(s, int) for s in stride):
        return None
    return (tuple(t.shape), tuple(stride), t.dtype, t.device, t.requires_grad)


def _is_fake(t: Any) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


class OpLog(TorchFunctionMode):
    """Records the top-level torch function calls of a full trace (module docs).

    ``special(t)``: is ``t`` a tensor the decision mode tracks (a constant, an index)?
    Calls that involve one are recorded as calls to run."""

    def __init__(self, special: Callable[[torch.Tensor], bool]):
        super().__init__()
        self.records: list[OpRecord] = []
        self._special = special
        self._seen: dict[int, torch.Tensor] = {}  # keeps ids unique while recording

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunction():
            leaves = _leaves(args, kwargs)
            sig = _sig(leaves)
            before = any(isinstance(a, torch.Tensor) and self._special(a) for a in leaves)
        out = func(*args, **kwargs)
        with torch._C.DisableTorchFunction():
            self.records.append(self._record(func, sig, leaves, out, before))
            for a in leaves:
                if isinstance(a, torch.Tensor):
                    self._seen[id(a)] = a
        return out

    def _record(
        self, func: Any, sig: tuple[Any, ...], leaves: list[Any], out: Any, before: bool
    ) -> OpRecord:
        single = isinstance(out, torch.Tensor)
        if single:
            results = [out]
        elif type(out) in (tuple, list) and out and all(isinstance(o, torch.Tensor) for o in out):
            results = list(out)
        else:
            return OpRecord(func, sig, None)
        existed = {id(o) for o in results if self._seen.get(id(o)) is o}
        for o in results:
            self._seen[id(o)] = o
        if before:
            return OpRecord(func, sig, None)
        outs: list[_Out] = []
        taken: set[int] = set()
        for o in results:
            if not _is_fake(o) or self._special(o) or id(o) in taken:
                return OpRecord(func, sig, None)
            taken.add(id(o))
            meta = _meta(o)
            if meta is None:
                return OpRecord(func, sig, None)
            at = next((i for i, a in enumerate(leaves) if a is o), -1)
            if at >= 0:
                outs.append(("arg", at, meta))
            elif id(o) in existed:
                return OpRecord(func, sig, None)  # a tensor made before: keep its identity
            else:
                outs.append(("new", -1, meta))
        return OpRecord(func, sig, tuple(outs), single, tuple if single else type(out))

    def finish(self) -> list[OpRecord]:
        """The records; drops the references that kept ids unique."""
        self._seen.clear()
        return self.records


class Replay(TorchFunctionMode):
    """Answers a region run's prefix calls from ``records`` until ``done()`` (the switch
    into tracing); then every call runs as usual. ``fake_mode``: the export's."""

    def __init__(self, records: list[OpRecord], fake_mode: Any, done: Callable[[], bool]):
        super().__init__()
        self.records = records
        self.fake_mode = fake_mode
        self.done = done
        self.i = 0
        self.replayed = 0
        self.failed: str | None = None
        self.off = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.off or self.done():
            self.off = True
            return func(*args, **kwargs)
        if self.failed is not None:
            raise ReplayDiverged(self.failed)
        i = self.i
        self.i += 1
        with torch._C.DisableTorchFunction():
            rec = self.records[i] if i < len(self.records) else None
            leaves = _leaves(args, kwargs)
            if rec is None or rec.func is not func or rec.sig != _sig(leaves):
                self.failed = f"call {i} ({getattr(func, '__name__', func)}) differs"
                raise ReplayDiverged(self.failed)
            if rec.outs is not None:
                results = [self._result(o, leaves) for o in rec.outs]
                self.replayed += 1
                return results[0] if rec.single else rec.seq(results)
        return func(*args, **kwargs)

    def _result(self, o: _Out, leaves: list[Any]) -> torch.Tensor:
        kind, at, meta = o
        if kind == "arg":
            t = leaves[at]
            if not isinstance(t, torch.Tensor) or _meta(t) != meta:
                self.failed = "an in-place op's argument differs from the record"
                raise ReplayDiverged(self.failed)
            return t
        shape, stride, dtype, device, requires_grad = meta
        # a plain meta tensor: past the Python dispatch key, so no mode (export's fake
        # mode) sees the call; cheaper than popping and re-pushing every mode
        with torch._C._DisableTorchDispatch():
            m = torch.empty_strided(
                shape, stride, dtype=dtype, device="meta", requires_grad=requires_grad
            )
        from torch._subclasses.fake_tensor import FakeTensor

        return FakeTensor(self.fake_mode, m, device)
