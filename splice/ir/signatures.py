"""Programs for several input signatures: control flow that depends on input *shapes*.

A branch on a tensor's *value* is found by :func:`splice.capture_dynamic` and becomes a
``torch.cond``. A branch on an input's *shape* (``if x.shape[-1] > 16: x = pool(x)``) is
different: in a capture every shape is a constant, so the branch is decided while tracing
and one capture holds only the path of its example's shape. DyCL (Chen et al., ISSTA 2023)
treats such models as dynamic too. splice captures the model once per input signature (the
shapes and dtypes of its inputs) and keeps the captures side by side in a
:class:`SignatureSet`; the choice between them is made on the inputs' shapes, by
:meth:`SignatureSet.select` when run eagerly and by the host program's ``signature`` step in
a compiled artifact (:mod:`splice.runtime.host`). Each member is an ordinary Program (which
may have data-dependent branches of its own); weights of the same name are the same tensor
in every member when they come from one model.

An input whose signature is none of the captured ones is an error, never a silent fallback
to the nearest capture: a shape-dependent model can compute something else for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from splice.errors import CaptureError, SpliceError
from splice.ir import meta as M
from splice.ir.program import Program

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def signature_of(specs: Sequence[M.Spec]) -> Signature:
    """The (shape, dtype) of each input spec of a program."""
    out = []
    for s in specs:
        if not isinstance(s, M.TensorSpec):
            raise SpliceError(f"a signature is made of tensor inputs, got {s}")
        out.append((tuple(int(d) for d in s.shape), s.dtype))
    return tuple(out)


def signature_text(sig: Signature, names: Sequence[str] | None = None) -> str:
    parts = [str(M.TensorSpec(shape, dtype)) for shape, dtype in sig]
    if names:
        parts = [f"{n}: {p}" for n, p in zip(names, parts)]
    return "(" + ", ".join(parts) + ")"


def signature_of_values(values: Sequence[Any]) -> Signature:
    out = []
    for v in values:
        t = torch.from_numpy(v) if type(v).__module__ == "numpy" else v
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs must be tensors or numpy arrays, got {type(v).__name__}")
        out.append((tuple(t.shape), t.dtype))
    return tuple(out)


class SignatureSet:
    """One Program per input signature, chosen at run time by the inputs' shapes and dtypes.

    All members take the same named inputs and return the same named outputs (their shapes
    may differ). ``set(*inputs)`` runs the member whose signature the inputs have.
    """

    def __init__(self, programs: Sequence[Program], *, name: str | None = None):
        programs = list(programs)
        if len(programs) < 2:
            raise SpliceError(
                f"a SignatureSet holds at least two programs, got {len(programs)}",
                hint="use the Program itself for a single signature",
            )
        first = programs[0]
        seen: dict[Signature, int] = {}
        for i, p in enumerate(programs):
            if p.input_names != first.input_names or p.output_names != first.output_names:
                raise SpliceError(
                    f"program {i} ({p.name}) takes {p.input_names} and returns "
                    f"{p.output_names}; program 0 takes {first.input_names} and returns "
                    f"{first.output_names}",
                    hint="every signature must be a capture of the same model",
                )
            sig = signature_of(p.input_specs)
            if sig in seen:
                raise SpliceError(
                    f"programs {seen[sig]} and {i} have the same signature "
                    f"{signature_text(sig, p.input_names)}",
                    hint="give one example per distinct input shape",
                )
            seen[sig] = i
        self.programs = programs
        self.name = name or first.name
        self._index = seen

    # -- the signatures ------------------------------------------------------------------
    @property
    def signatures(self) -> list[Signature]:
        return list(self._index)

    @property
    def input_names(self) -> list[str]:
        return self.programs[0].input_names

    @property
    def output_names(self) -> list[str]:
        return self.programs[0].output_names

    def __len__(self) -> int:
        return len(self.programs)

    def __iter__(self) -> Iterator[Program]:
        return iter(self.programs)

    def __getitem__(self, i: int) -> Program:
        return self.programs[i]

    def index(self, sig: Signature) -> int:
        """The member for signature ``sig``; :class:`CaptureError` if none was captured."""
        i = self._index.get(sig)
        if i is None:
            known = "; ".join(signature_text(s, self.input_names) for s in self._index)
            raise CaptureError(
                f"{self.name}: inputs {signature_text(sig, self.input_names)} match none of "
                f"the captured signatures: {known}",
                hint="capture the model with an example of this shape too "
                "(capture_dynamic(..., signatures=[...]))",
            )
        return i

    def select(self, *inputs: Any) -> int:
        """Index of the member whose signature ``inputs`` have."""
        return self.index(signature_of_values(inputs))

    # -- running -------------------------------------------------------------------------
    def run(self, *args: Any) -> list[Any]:
        return self.programs[self.select(*args)].run(*args)

    def __call__(self, *args: Any) -> Any:
        outs = self.run(*args)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def map(self, fn: Callable[[Program], Program]) -> SignatureSet:
        """A new set with ``fn`` applied to every member (e.g. a pass pipeline's run)."""
        return SignatureSet([fn(p) for p in self.programs], name=self.name)

    def copy(self) -> SignatureSet:
        return self.map(Program.copy)

    def __repr__(self) -> str:
        sigs = ", ".join(signature_text(s) for s in self._index)
        return f"SignatureSet({self.name!r}, {len(self.programs)} signatures: {sigs})"


def format_signature_set(sset: SignatureSet, print_one: Callable[[Program], str]) -> str:
    """Every member's text, each under a comment line naming its signature."""
    out = [f"# {len(sset)} signatures of {sset.name}, chosen by the inputs' shapes and dtypes\n"]
    for i, (sig, p) in enumerate(zip(sset.signatures, sset.programs)):
        out.append(f"\n# signature {i}: {signature_text(sig, sset.input_names)}\n")
        out.append(print_one(p))
    return "".join(out)


__all__ = [
    "Signature",
    "SignatureSet",
    "format_signature_set",
    "signature_of",
    "signature_of_values",
    "signature_text",
]
