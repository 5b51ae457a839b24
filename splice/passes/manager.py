"""Pipeline and PassManager: a list of passes, and what runs it with instruments.

``parse_pipeline(text)`` (the grammar is in :mod:`splice.passes.pipeline`) returns a
:class:`Pipeline`; ``pipeline.run(program, ...)`` runs it through a :class:`PassManager`.

For each pass the manager

1. asks every instrument whether the pass should run — a skipped pass is *recorded* with
   the instrument that skipped it (TVM's silently skipped passes are the anti-pattern);
2. calls ``before_pass`` on the instruments, copies the program (so the caller's program is
   never changed and a failure leaves nothing half-written) and runs the pass;
3. calls ``after_pass``; an instrument may reject the result (VerifyEach, NumericCheck);
4. on any failure calls ``after_pass_failed`` (CrashReproducer writes its folder) and
   raises :class:`~splice.errors.PassError` (or the SpliceError the pass raised).

**The result is verified.** By default (``verify=True``) the pipeline's result goes
through :func:`splice.ir.verify` (and must have distinct output names) before it is
returned: a pass cannot hand back a program that does not run. When it fails, the manager
finds the first pass whose output fails (every intermediate program is kept until the
end) and raises :class:`~splice.errors.PassError` naming that pass and the node; an input
program that already fails raises :class:`~splice.errors.VerificationError`. With a
``VerifyEach`` instrument every result is already verified and the final check is not
repeated. ``verify=False`` turns the check off (for a program you will inspect, not run).
The caller's program is never changed, whatever fails.

**Sample inputs follow the program.** ``ctx.sample_inputs`` (and ``calibration_inputs``)
are tuples of the *current* program's inputs: when a pass adds inputs with sample values
(``PassResult.sample_inputs_for_new_inputs``, as ``hyper`` adds ``cond``) they are inserted
in every tuple, and inputs a pass binds (``bound_inputs``) are removed, so a later
calibrating pass (``lowrank{method=whitened}`` after ``hyper``) runs the program it sees.
The caller's lists are restored when the run ends.

**The original program.** While a pipeline runs, ``ctx.original`` is the program before its
first approximate pass (None before one runs; each run, and each SignatureSet member, starts
afresh and the caller's value is restored afterwards): ``heal`` trains against it.

The pipeline's :class:`~splice.passes.base.PassResult` carries one record per pass in
``stats["passes"]``: name, changed, seconds, stats, and ``skipped_by`` where it applies.

**A SignatureSet runs member by member** (:meth:`SignatureSet.map`): one capture per input
signature (:func:`splice.capture_dynamic` with ``signatures=``) goes through the pipeline
as a whole. Every sample (and calibration) tuple goes to the member whose signature it has
(one that matches none is a :class:`~splice.errors.PassError`), so each member calibrates
on inputs of its own shapes (on its samples when no calibration tuple has its signature);
a member's failure names its signature. The result's program
is a new SignatureSet; ``stats["signatures"]`` holds each member's own pipeline stats, and
each record of ``stats["passes"]`` has ``changed`` (any member), ``seconds`` (the sum) and
``stats = {"signatures": [one stats dict per member]}``. Instruments see each member as a
pipeline run of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from splice.errors import PassError, SpliceError, VerificationError
from splice.ir.program import Program
from splice.ir.signatures import SignatureSet, signature_of_values, signature_text
from splice.ir.verify import verify as verify_program
from splice.passes.base import Pass, PassContext, PassResult, PipelineEntry
from splice.passes.instruments import Instrument, VerifyEach
from splice.passes.pipeline import parse_entries


class Pipeline:
    """An ordered list of passes; ``str()`` gives its pipeline text."""

    def __init__(self, passes: Sequence[Pass | PipelineEntry] = ()):
        self.entries: list[PipelineEntry] = [
            p if isinstance(p, PipelineEntry) else PipelineEntry(p, tuple(p.non_default_options()))
            for p in passes
        ]

    @property
    def passes(self) -> list[Pass]:
        return [e.pass_ for e in self.entries]

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        return ",".join(str(e) for e in self.entries)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def context(self, **kwargs: Any) -> PassContext:
        """A new :class:`PassContext` (``kwargs`` as its constructor takes them) to pass as
        ``run(..., ctx=)`` to several runs that should share their cached work."""
        return PassContext(**kwargs)

    def run(
        self,
        program: Program | SignatureSet,
        *,
        sample_inputs: Sequence[Sequence[Any]] | None = None,
        instruments: Sequence[Instrument] = (),
        ctx: PassContext | None = None,
        verify_each: bool = False,
        verify: bool = True,
    ) -> PassResult:
        """Run the passes through a :class:`PassManager`.

        ``program`` is a Program or a :class:`~splice.ir.signatures.SignatureSet` (every
        member runs the pipeline with the samples of its own signature, and the result's
        program is a SignatureSet; see the module docstring). The result is verified unless
        ``verify=False``; ``verify_each`` verifies after every pass.
        """
        return PassManager(
            self, instruments=instruments, verify_each=verify_each, verify=verify
        ).run(program, ctx=ctx, sample_inputs=sample_inputs)


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text into a :class:`Pipeline` (grammar: :mod:`splice.passes.pipeline`)."""
    return Pipeline(parse_entries(text))


class PassManager:
    """Runs passes over a Program with instruments (see the module docstring)."""

    def __init__(
        self,
        passes: Pipeline | str | Sequence[Pass],
        instruments: Sequence[Instrument] = (),
        *,
        verify_each: bool = False,
        verify: bool = True,
    ):
        """``verify_each`` adds a VerifyEach instrument (every pass's result is verified);
        ``verify`` (default True) verifies the pipeline's result (see the module docstring)."""
        if isinstance(passes, str):
            passes = parse_pipeline(passes)
        elif not isinstance(passes, Pipeline):
            passes = Pipeline(list(passes))
        self.pipeline: Pipeline = passes
        self.instruments: list[Instrument] = list(instruments)
        self.verify = verify
        if verify_each and not any(isinstance(i, VerifyEach) for i in self.instruments):
            self.instruments.insert(0, VerifyEach())

    def run(
        self,
        program: Program | SignatureSet,
        ctx: PassContext | None = None,
        *,
        sample_inputs: Sequence[Sequence[Any]] | None = None,
    ) -> PassResult:
        """Run the pipeline on a copy of ``program`` (see the module docstring); a
        :class:`~splice.ir.signatures.SignatureSet` runs member by member."""
        if ctx is None:
            ctx = PassContext(sample_inputs)
        elif sample_inputs is not None:
            ctx.sample_inputs = [tuple(s) for s in sample_inputs]
        saved = (ctx.sample_inputs, ctx.calibration_inputs)
        try:
            if isinstance(program, SignatureSet):
                return self._run_set(program, ctx)
            return self._run(program, ctx)
        finally:
            ctx.sample_inputs, ctx.calibration_inputs = saved

    def _run_set(self, sset: SignatureSet, ctx: PassContext) -> PassResult:
        """Each member through :meth:`_run` with the samples of its own signature."""
        samples = _by_member(sset, ctx.sample_inputs, "sample")
        calib = (
            _by_member(sset, ctx.calibration_inputs, "calibration")
            if ctx.calibration_inputs is not None
            else None
        )
        results: list[PassResult] = []

        def one(member: Program) -> Program:
            i = len(results)
            ctx.sample_inputs = samples[i]
            # a member none of the calibration tuples fits calibrates on its samples
            ctx.calibration_inputs = calib[i] if calib is not None and calib[i] else None
            try:
                result = self._run(member, ctx)
            except SpliceError as e:
                sig = signature_text(sset.signatures[i], sset.input_names)
                _add_where(e, f"member {i} of SignatureSet {sset.name!r}, signature {sig}")
                raise
            results.append(result)
            return result.program

        out = sset.map(one)
        records = []
        for index, entry in enumerate(self.pipeline.entries):
            mine = [r.stats["passes"][index] for r in results]
            rec: dict[str, Any] = {
                "pass": str(entry),
                "changed": any(m["changed"] for m in mine),
                "seconds": sum(m["seconds"] for m in mine),
                "stats": {"signatures": [m["stats"] for m in mine]},
            }
            skipped_by = sorted({m["skipped_by"] for m in mine if "skipped_by" in m})
            if skipped_by:
                rec["skipped_by"] = ", ".join(skipped_by)
            records.append(rec)
        stats = {"passes": records, "signatures": [r.stats for r in results]}
        return PassResult(out, any(r.changed for r in results), stats)

    def _run(self, program: Program, ctx: PassContext) -> PassResult:
        saved_original, ctx.original = ctx.original, None
        try:
            return self._run_passes(program, ctx)
        finally:
            ctx.original = saved_original

    def _run_passes(self, program: Program, ctx: PassContext) -> PassResult:
        for inst in self.instruments:
            inst.before_pipeline(self.pipeline, program, ctx)
        current = program
        records: list[dict[str, Any]] = []
        # kept to blame the right pass (and reproduce it) if the result fails to verify
        history: list[_Step] = []
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
            if p.semantics == "approximate" and ctx.original is None:
                ctx.original = current  # the teacher `heal` distils from
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
                if self.verify and history and _problem(current) is not None:
                    # the pass choked on a broken program an earlier pass returned: blame that
                    e.add_note(f"(pass {str(entry)!r} then failed on it: {type(e).__name__})")
                    self._verify_result(program, history, ctx, cause=e)
                self._failed(p, current, ctx, index, e)
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
            samples_before = (ctx.sample_inputs, ctx.calibration_inputs)
            _follow_samples(ctx, current, result)
            current = result.program
            history.append(_Step(index, entry, current, samples_before))
        if self.verify and not any(isinstance(i, VerifyEach) for i in self.instruments):
            self._verify_result(program, history, ctx)
        for inst in self.instruments:
            inst.after_pipeline(self.pipeline, current, ctx)
        return PassResult(current, any_changed, {"passes": records})

    def _failed(
        self, p: Pass, before: Program, ctx: PassContext, index: int, error: BaseException
    ) -> None:
        """Tell every instrument that ``p`` failed (CrashReproducer writes its folder)."""
        for inst in self.instruments:
            try:
                inst.after_pass_failed(p, before, ctx, index, error, self.pipeline)
            except Exception as inner:  # an instrument must not hide the real failure
                error.add_note(f"(instrument {type(inst).__name__} also failed: {inner})")

    def _verify_result(
        self,
        program: Program,
        history: list[_Step],
        ctx: PassContext,
        *,
        cause: BaseException | None = None,
    ) -> None:
        """Verify the last program of ``history``; on failure blame the first pass whose
        output fails (PassError), or the input (VerificationError) if it already fails.
        ``cause``: a later pass's failure that led here (mentioned in the message)."""
        if not history:
            return
        if cause is None and _problem(history[-1].program) is None:
            return
        input_problem = _problem(program)
        if input_problem is not None:
            raise VerificationError(
                f"the input program is invalid: {input_problem.message}",
                node=input_problem.node,
                loc=input_problem.loc,
                hint="fix the input program (splice.ir.verify says the same), or run the "
                "pipeline with verify=False to skip verification",
            )
        before = program
        for step in history:
            index, entry, after = step.index, step.entry, step.program
            problem = _problem(after)
            if problem is not None:
                later = (
                    f" (the next pass then failed on it: {type(cause).__name__}: {cause})"
                    if cause is not None else ""
                )  # fmt: skip
                err = PassError(
                    f"pass {str(entry)!r} returned a program that does not verify: "
                    f"{problem.message}{later}",
                    where=problem.where,
                    hint="this is a bug in the pass; the program you passed in is unchanged. "
                    "`splice opt --crash-dir D` writes a reproducer; verify=False returns the "
                    "broken program for inspection",
                )
                err.node = problem.node  # type: ignore[attr-defined]
                # instruments see the samples as they were for that pass's input
                ctx.sample_inputs, ctx.calibration_inputs = step.samples_before
                self._failed(entry.pass_, before, ctx, index, err)
                raise err from problem
            before = after


@dataclass
class _Step:
    """One pass that ran: its index and entry, the program it returned, and the context's
    (sample_inputs, calibration_inputs) as they were for its input."""

    index: int
    entry: PipelineEntry
    program: Program
    samples_before: tuple[Any, Any]


def _problem(program: Program) -> VerificationError | None:
    """Why ``program`` is not a valid result (verify, distinct output names), or None."""
    names = program.output_names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        return VerificationError(
            f"output names {dup} appear more than once", hint="give every output its own name"
        )
    try:
        verify_program(program)
    except VerificationError as e:
        return e
    return None


def _add_where(e: SpliceError, place: str) -> None:
    """Append ``place`` to the error's ``where`` (its text and ``one_line`` follow)."""
    e.where = f"{e.where}; {place}" if e.where else place
    parts = [e.message, f"  at: {e.where}"] + ([f"  hint: {e.hint}"] if e.hint else [])
    e.args = ("\n".join(parts), *e.args[1:])


def _by_member(
    sset: SignatureSet, batches: Sequence[Sequence[Any]] | None, what: str
) -> list[list[tuple[Any, ...]]]:
    """``batches`` grouped by the member of ``sset`` whose signature each one has."""
    out: list[list[tuple[Any, ...]]] = [[] for _ in sset.programs]
    known = set(sset.signatures)
    for j, b in enumerate(batches or []):
        sig = signature_of_values(b)
        if sig not in known:
            listing = "; ".join(signature_text(s, sset.input_names) for s in sset.signatures)
            raise PassError(
                f"{what} input {j} has signature {signature_text(sig, sset.input_names)}, "
                f"which is none of SignatureSet {sset.name!r}'s: {listing}",
                hint="give samples of the captured shapes (each goes to the member of its "
                "signature)",
            )
        out[sset.index(sig)].append(tuple(b))
    return out


def _follow_samples(ctx: PassContext, before: Program, result: PassResult) -> None:
    """Make ctx's sample and calibration tuples fit ``result.program``'s inputs.

    Values are matched by input name; inputs the pass added take the values it gave in
    ``sample_inputs_for_new_inputs``, inputs it bound (``bound_inputs``) are dropped. An
    added input without a value leaves the tuples as they are: a calibrating pass then
    reports which input has no sample (``calibrate`` checks the arity).
    """
    after = result.program
    if after.input_names == before.input_names:
        return

    def follow(batches: list[tuple[Any, ...]] | None) -> list[tuple[Any, ...]] | None:
        if not batches:
            return batches
        out = []
        for b in batches:
            named = {**dict(zip(before.input_names, b)), **result.sample_inputs_for_new_inputs}
            if len(b) != len(before.input_names) or any(n not in named for n in after.input_names):
                return batches
            out.append(tuple(named[n] for n in after.input_names))
        return out

    ctx.sample_inputs = follow(ctx.sample_inputs) or []
    ctx.calibration_inputs = follow(ctx.calibration_inputs)


__all__ = ["PassManager", "Pipeline", "parse_pipeline"]
