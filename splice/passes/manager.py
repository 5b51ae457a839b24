"""PassManager: runs a pipeline with instruments around every pass.

For each pass the manager

1. asks every instrument whether the pass should run — a skipped pass is *recorded* with
   the instrument that skipped it (TVM's silently skipped passes are the anti-pattern);
2. calls ``before_pass`` on the instruments, copies the program (so the caller's program is
   never changed and a failure leaves nothing half-written) and runs the pass;
3. calls ``after_pass``; an instrument may reject the result (VerifyEach, NumericCheck);
4. on any failure calls ``after_pass_failed`` (CrashReproducer writes its folder) and
   raises :class:`~splice.errors.PassError` (or the SpliceError the pass raised).

The pipeline's :class:`~splice.passes.base.PassResult` carries one record per pass in
``stats["passes"]``: name, changed, seconds, stats, and ``skipped_by`` where it applies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from splice.errors import PassError, SpliceError
from splice.ir.program import Program
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.instruments import Instrument, VerifyEach
from splice.passes.pipeline import Pipeline, parse_pipeline


class PassManager:
    """Runs passes over a Program with instruments (see the module docstring)."""

    def __init__(
        self,
        passes: Pipeline | str | Sequence[Pass],
        instruments: Sequence[Instrument] = (),
        *,
        verify_each: bool = False,
    ):
        if isinstance(passes, str):
            passes = parse_pipeline(passes)
        elif not isinstance(passes, Pipeline):
            passes = Pipeline(list(passes))
        self.pipeline: Pipeline = passes
        self.instruments: list[Instrument] = list(instruments)
        if verify_each and not any(isinstance(i, VerifyEach) for i in self.instruments):
            self.instruments.insert(0, VerifyEach())

    def run(
        self,
        program: Program,
        ctx: PassContext | None = None,
        *,
        sample_inputs: Sequence[Sequence[Any]] | None = None,
    ) -> PassResult:
        if ctx is None:
            ctx = PassContext(sample_inputs)
        elif sample_inputs is not None:
            ctx.sample_inputs = [tuple(s) for s in sample_inputs]
        for inst in self.instruments:
            inst.before_pipeline(self.pipeline, program, ctx)
        current = program
        records: list[dict[str, Any]] = []
        any_changed = False
        for index, entry in enumerate(self.pipeline.entries):
            p = entry.pass_
            skipper = next((i for i in self.instruments if not i.should_run(p, current, ctx)), None)
            if skipper is not None:
                records.append(
                    {
                        "pass": str(entry),
                        "changed": False,
                        "seconds": 0.0,
                        "skipped_by": type(skipper).__name__,
                        "stats": {},
                    }
                )
                continue
            for inst in self.instruments:
                inst.before_pass(p, current, ctx, index)
            t0 = time.perf_counter()
            try:
                work = current.copy()
                result = p.run(work, ctx)
                if not isinstance(result, PassResult):
                    raise PassError(
                        f"pass {p.name!r} returned {type(result).__name__}, not a PassResult",
                        hint="passes must return PassResult(program, changed, stats)",
                    )
                result.stats.setdefault("changed", result.changed)
                seconds = time.perf_counter() - t0
                for inst in self.instruments:
                    inst.after_pass(p, current, result, ctx, index)
            except Exception as e:
                for inst in self.instruments:
                    try:
                        inst.after_pass_failed(p, current, ctx, index, e, self.pipeline)
                    except Exception as inner:  # an instrument must not hide the real failure
                        e.add_note(f"(instrument {type(inst).__name__} also failed: {inner})")
                if isinstance(e, SpliceError):
                    raise
                raise PassError(
                    f"pass {str(entry)!r} failed: {type(e).__name__}: {e}",
                    hint="rerun with a CrashReproducer (`splice opt --crash-dir D`) to get a reproducer",
                ) from e
            records.append(
                {
                    "pass": str(entry),
                    "changed": result.changed,
                    "seconds": seconds,
                    "stats": result.stats,
                }
            )
            any_changed |= result.changed
            current = result.program
        for inst in self.instruments:
            inst.after_pipeline(self.pipeline, current, ctx)
        return PassResult(current, any_changed, {"passes": records})


__all__ = ["PassManager"]
