"""Calibration: activations at chosen values over sample batches.

``calibrate(program, ctx, nodes=("fc1", ...), stats=("gram", "abs_mean"))`` runs the program
on ``ctx.calibration`` batches with the chosen values added as extra outputs (one compiled
run per batch — no interpreter), and reduces each value's activations, flattened to
``[rows, features]`` over its last dimension, into:

* ``raw``      — the activations themselves, one tensor per batch;
* ``gram``     — Σ XᵀX in float64 (SVD-LLM's whitening statistic);
* ``abs_mean`` — mean |x| per feature (ASVD's scaling statistic);
* ``abs_max``  — max |x| per feature;
* ``count``    — number of rows seen (always present).

Results refer to values by node name, so they stay valid for unedited copies of the
program (cache key: program version).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.errors import PassError
from splice.ir.program import Program

STATS = ("raw", "gram", "abs_mean", "abs_max")


@dataclass
class ActivationStats:
    count: int = 0
    raw: list[torch.Tensor] = field(default_factory=list)
    gram: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None

    @property
    def abs_mean(self) -> torch.Tensor | None:
        return None if self.abs_sum is None else self.abs_sum / max(self.count, 1)

    def matrix(self) -> torch.Tensor:
        """All raw activations stacked as [rows, features]."""
        if not self.raw:
            raise ValueError("raw activations were not collected (ask for stats=('raw',))")
        return torch.cat([r.reshape(-1, r.shape[-1]) for r in self.raw])


@dataclass
class CalibrationResult:
    values: dict[str, ActivationStats]
    batches: int

    def __getitem__(self, name: str) -> ActivationStats:
        return self.values[name]


def check_samples(
    program: Program,
    ctx: Any,
    stats: Sequence[str],
    batches: Sequence[Sequence[Any]] | None = None,
) -> list[Sequence[Any]]:
    """The calibration batches (``batches``, else ``ctx.calibration``), after checking the
    statistics' names and that every batch gives one value per program input."""
    bad = [s for s in stats if s not in STATS]
    if bad:
        raise PassError(f"unknown calibration statistics {bad}", hint=f"choose from {STATS}")
    data = list(batches) if batches is not None else list(getattr(ctx, "calibration", []) or [])
    if not data:
        raise PassError(
            "calibration needs sample inputs, and none were given",
            hint="pass sample_inputs=[...] to the pipeline run (or --calib-samples on the CLI)",
        )
    names = program.input_names
    for batch in data:
        if len(batch) != len(names):
            raise PassError(
                f"calibration: a sample gives {len(batch)} values, but program "
                f"{program.name!r} has {len(names)} inputs {names}",
                hint="give one value per program input; an input an earlier pass added "
                "(hyper's `cond`, stitch's `config`) needs a sample value from that pass "
                "(PassResult.sample_inputs_for_new_inputs), or calibrate before adding it",
            )
    return data


def calibrate(
    program: Program,
    ctx: Any,
    *,
    nodes: Sequence[str],
    stats: Sequence[str] = ("raw",),
    batches: Sequence[Sequence[Any]] | None = None,
) -> CalibrationResult:
    """Collect activation statistics at ``nodes`` (see the module docstring)."""
    data = check_samples(program, ctx, stats, batches)
    probe = program.copy()
    by_name = {n.name: n for n in probe.graph.nodes}
    extra = []
    for i, name in enumerate(nodes):
        if name not in by_name:
            raise PassError(f"calibration: no value %{name} in program {program.name!r}")
        out = f"__calib_{i}"
        probe.add_output(out, by_name[name])
        extra.append(out)
    result = {name: ActivationStats() for name in nodes}
    progress = getattr(ctx, "progress", None)
    for b, batch in enumerate(data):
        with torch.no_grad():
            outs = probe.run_named(*batch)
        for name, out in zip(nodes, extra):
            accumulate(result[name], outs[out], stats)
        if progress is not None:
            progress("calibrating", b + 1, len(data))
    return CalibrationResult(result, len(data))


def accumulate(acc: ActivationStats, act: torch.Tensor, stats: Sequence[str]) -> None:
    """Add the activation ``act`` (rows along its last dim) to ``acc``: its row count and the
    ``stats`` asked for (``raw`` copies, the float64 ``gram`` matrix, ``abs_mean`` sums)."""
    x = act.detach()
    flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    acc.count += flat.shape[0]
    if "raw" in stats:
        acc.raw.append(x.clone())
    if "gram" in stats:
        f64 = flat.double()
        g = f64.T @ f64
        acc.gram = g if acc.gram is None else acc.gram + g
    if "abs_mean" in stats:
        s = flat.abs().double().sum(0)
        acc.abs_sum = s if acc.abs_sum is None else acc.abs_sum + s
    if "abs_max" in stats:
        m = flat.abs().amax(0)
        acc.abs_max = m if acc.abs_max is None else torch.maximum(acc.abs_max, m)


__all__ = ["STATS", "ActivationStats", "CalibrationResult", "accumulate", "calibrate"]
