"""Lowerings of the splice dialect, registered per op and per backend.

An op's meaning lives in :mod:`splice.ir.ops` (schema, reference, fake, autograd, cost);
how a backend runs it lives here, keyed by ``(op, backend)``:

* a **lowering**, ``@register_lowering("splice::moe_ffn", "tvm")`` on a callable, or
* a declared **fallback to the reference**, ``register_fallback("splice::moe_ffn", "onnx")``:
  the backend runs the op's reference implementation (plain torch ops) in its place.

Every op has one or the other for every backend in :data:`BACKENDS` (a test checks it),
and :func:`lowering_for` names the op and the backend when neither was registered.

The registry only stores callables; it imports no backend. The backend modules register
their lowerings when they are imported (``splice/runtime/backends/<backend>.py``), and
the callable's calling convention is the backend's own, stated there:

* ``"tvm"``: a Relax converter ``(node, importer) -> relax.Expr``, as TVM's
  ``from_exported_program(custom_convert_map=...)`` calls it; a fallback is inlined as
  its reference before the import;
* ``"triton"``: a loader ``() -> launcher`` (the kernel module imports triton, which is
  optional, so it is imported at first use); the launcher takes the op's arguments and
  launches its Triton kernels, and is registered as ``splice_triton::<op>`` with
  ``torch.library.triton_op``; a fallback keeps the ``splice::<op>`` node, which runs its
  reference;
* ``"onnx"``: a translation ``(ctx, *args, **kwargs) -> value`` that torch.onnx's dynamo
  exporter calls (``custom_translation_table``, with ``ctx`` bound first) with the op's
  arguments: symbolic tensors for its tensors, Python values for the rest. It records the
  op as a node of domain ``splice`` calling an ONNX function through
  ``ctx.call(name, function, inputs, attributes)`` (``ctx`` is the export's
  ``splice.runtime.kernels.onnx_common.OnnxContext``, which adds the function to the
  model); a fallback is decomposed into its reference's ATen ops before the export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from splice.errors import LoweringError
from splice.ir.ops import NAMESPACE, OPS, OpDef

BACKENDS: tuple[str, ...] = ("tvm", "triton", "onnx")
"""The backends every splice op must have a lowering or a declared fallback for."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Lowering:
    """How ``backend`` runs ``op``: ``fn``, or its reference when ``fn`` is None."""

    op: str  # qualified name, "splice::moe_ffn"
    backend: str
    fn: Callable[..., Any] | None
    reason: str = ""  # why a fallback falls back

    @property
    def is_fallback(self) -> bool:
        return self.fn is None


class LoweringTable:
    """``(op, backend) -> Lowering`` for the ops of ``ops`` and the backends ``backends``.

    Op names are qualified (``"splice::moe_ffn"``); a bare name (``"moe_ffn"``) is taken
    to be in the ``splice`` namespace. Registering for an unknown op or backend, or twice
    for one pair, raises LoweringError (a typo must not pass silently).
    """

    def __init__(self, ops: Mapping[str, OpDef], backends: tuple[str, ...]):
        self.ops = ops
        self.backends = backends
        self._entries: dict[tuple[str, str], Lowering] = {}

    def _key(self, op: str | OpDef, backend: str) -> tuple[str, str]:
        name = op.qualname if isinstance(op, OpDef) else op
        qual = name if "::" in name else f"{NAMESPACE}::{name}"
        if qual not in self.ops:
            raise LoweringError(
                f"no splice op {qual!r} to register a lowering for",
                hint=f"the ops are {sorted(self.ops)}",
            )
        if backend not in self.backends:
            raise LoweringError(
                f"unknown backend {backend!r} for a lowering of {qual}",
                hint=f"the backends are {list(self.backends)}",
            )
        return qual, backend

    def _add(self, entry: Lowering) -> None:
        key = (entry.op, entry.backend)
        old = self._entries.get(key)
        if old is not None and not _same(old, entry):
            raise LoweringError(
                f"{entry.op} already has a {entry.backend} lowering ({_describe(old)})",
                hint="one lowering per op and backend",
            )
        self._entries[key] = entry

    def register(self, op: str | OpDef, backend: str) -> Callable[[F], F]:
        """Decorator: ``fn`` is how ``backend`` runs ``op``."""
        qual, backend = self._key(op, backend)

        def deco(fn: F) -> F:
            self._add(Lowering(qual, backend, fn))
            return fn

        return deco

    def fallback(self, op: str | OpDef, backend: str, reason: str = "") -> None:
        """Declare that ``backend`` runs ``op`` as its reference implementation."""
        qual, backend = self._key(op, backend)
        self._add(Lowering(qual, backend, None, reason))

    def lookup(self, op: str | OpDef, backend: str) -> Lowering:
        """The lowering of ``op`` on ``backend``; LoweringError naming both when none was
        registered (neither a lowering nor a fallback)."""
        key = self._key(op, backend)
        entry = self._entries.get(key)
        if entry is None:
            raise LoweringError(
                f"no {backend} lowering registered for {key[0]}",
                hint=f"register one with @register_lowering({key[0]!r}, {backend!r}) in the "
                f"{backend} backend module, or declare register_fallback({key[0]!r}, "
                f"{backend!r}) to run the op's reference there (lowerings are registered "
                f"when splice.runtime.backends.{backend} is imported)",
            )
        return entry

    def for_backend(self, backend: str) -> dict[str, Lowering]:
        """``{op: Lowering}`` of every op registered for ``backend``."""
        return {op: e for (op, b), e in self._entries.items() if b == backend}

    def missing(self) -> list[tuple[str, str]]:
        """The ``(op, backend)`` pairs with neither a lowering nor a fallback."""
        return [(op, b) for op in self.ops for b in self.backends if (op, b) not in self._entries]

    def __iter__(self) -> Iterator[Lowering]:
        return iter(list(self._entries.values()))


def _same(a: Lowering, b: Lowering) -> bool:
    """The same registration again (a module imported twice, e.g. reloaded)."""
    if a.fn is None or b.fn is None:
        return a.fn is b.fn and a.reason == b.reason
    return (a.fn.__module__, a.fn.__qualname__) == (b.fn.__module__, b.fn.__qualname__)


def _describe(e: Lowering) -> str:
    if e.fn is None:
        return "a fallback to the reference"
    return f"{e.fn.__module__}.{e.fn.__qualname__}"


LOWERINGS = LoweringTable(OPS, BACKENDS)
"""The registry of splice's lowerings (the dialect's ops, :data:`BACKENDS`)."""


def register_lowering(op: str | OpDef, backend: str) -> Callable[[F], F]:
    """Decorator: register ``fn`` as how ``backend`` runs ``op`` (see the module docstring
    for each backend's calling convention)."""
    return LOWERINGS.register(op, backend)


def register_fallback(op: str | OpDef, backend: str, reason: str = "") -> None:
    """Declare that ``backend`` runs ``op`` as its reference implementation."""
    LOWERINGS.fallback(op, backend, reason)


def lowering_for(op: str | OpDef, backend: str) -> Lowering:
    """The registered lowering of ``op`` on ``backend`` (LoweringError if there is none)."""
    return LOWERINGS.lookup(op, backend)


__all__ = [
    "BACKENDS",
    "LOWERINGS",
    "Lowering",
    "LoweringTable",
    "lowering_for",
    "register_fallback",
    "register_lowering",
]
