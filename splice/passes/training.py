"""A Program as a trainable ``nn.Module``: the one training mechanism of splice.

Every splice op has autograd, so a Program's GraphModule trains like any PyTorch module.
:class:`ProgramModule` wraps a *copy* of a program whose weights are cloned (training never
touches the program it came from), lets a chosen set of its parameters require gradients and
freezes the rest, and gives back a Program with the trained values (:meth:`to_program`).

Users: :class:`splice.passes.hyper.HyperModule` (``hyper.to_module``: the hypernetwork's
parameters train) and the ``heal`` pass (:mod:`splice.passes.heal`: the weights a transform
created, or a glob of them, train against the program before the transform).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from splice.ir.program import Program


class ProgramModule(nn.Module):
    """``program`` (copied, weights cloned) as an ``nn.Module``.

    ``trainable`` names the parameters that require gradients (a collection of weight names
    or a predicate on the name); every other weight is frozen. Only floating-point parameters
    can train. ``shared`` binds weights of the copy to given tensors instead of clones (two
    modules over programs that read the same weights, e.g. the static programs of a
    ``stitch`` program's configurations, then train one set of parameters).
    ``forward(*inputs, **named)`` runs the program as ``Program.__call__`` does;
    :meth:`run` returns the flat list of outputs.
    """

    def __init__(
        self,
        program: Program,
        *,
        trainable: Collection[str] | Callable[[str], bool],
        shared: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        prog = program.copy()
        shared = shared or {}
        for name, kind in prog.weight_kinds.items():
            value = shared.get(name)
            prog.add_weight(
                name, value if value is not None else prog.get_weight(name).detach().clone(), kind
            )
        self._program = prog
        self.graph_module = prog.to_module()
        wanted = trainable if callable(trainable) else set(trainable).__contains__
        for name, p in self.named_program_parameters().items():
            p.requires_grad_(p.is_floating_point() and bool(wanted(name)))

    @property
    def program(self) -> Program:
        """The module's own program (its weights are the module's parameters)."""
        return self._program

    def named_program_parameters(self) -> dict[str, nn.Parameter]:
        return self._program.named_parameters()  # type: ignore[return-value]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that require gradients, by weight name (in program order)."""
        return {n: p for n, p in self.named_program_parameters().items() if p.requires_grad}

    def forward(self, *inputs: Any, **named: Any) -> Any:
        return self._program(*inputs, **named)

    def run(self, *inputs: Any, **named: Any) -> list[Any]:
        """The program's outputs as a flat list (``Program.run``)."""
        return self._program.run(*inputs, **named)

    def to_program(self) -> Program:
        """A Program with the current weight values (detached copies)."""
        out = self._program.copy()
        for name, kind in out.weight_kinds.items():
            out.add_weight(name, out.get_weight(name).detach().clone(), kind)
        return out


__all__ = ["ProgramModule"]
