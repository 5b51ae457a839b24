"""Instruments: observers the PassManager calls around every pass.

===============  ==========================================================================
Timing           wall time per pass; ``report()`` prints a table
PrintIR          prints the IR before / after every pass, or only after passes that changed it
DumpIR           writes ``000_input.ir``, ``001_<pass>.ir``... into a folder
VerifyEach       verifies the input and the result of every pass
NumericCheck     runs the program before and after each pass on sample inputs: an exact pass
                 must match (1e-5 in fp32); an approximate one reports max abs/rel error, cosine
CrashReproducer  on failure writes the pass's input program, the pipeline that reproduces the
                 failure, the sample inputs and the error into a folder
===============  ==========================================================================
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx

from splice.errors import PassError, VerificationError
from splice.ir.printer import format_target, print_ir
from splice.ir.program import Program, iter_graphs
from splice.ir.serialize import save
from splice.ir.verify import verify
from splice.passes.base import Pass, PassContext, PassResult, PassSequence


class Instrument:
    """Base class: every hook is a no-op."""

    def before_pipeline(
        self, pipeline: PassSequence, program: Program, ctx: PassContext
    ) -> None: ...

    def should_run(self, p: Pass, program: Program, ctx: PassContext) -> bool:
        return True

    def before_pass(self, p: Pass, program: Program, ctx: PassContext, index: int) -> None: ...

    def after_pass(
        self, p: Pass, before: Program, result: PassResult, ctx: PassContext, index: int
    ) -> None: ...

    def after_pass_failed(
        self,
        p: Pass,
        before: Program,
        ctx: PassContext,
        index: int,
        error: BaseException,
        pipeline: PassSequence,
    ) -> None: ...

    def after_pipeline(
        self, pipeline: PassSequence, program: Program, ctx: PassContext
    ) -> None: ...


class Timing(Instrument):
    """Wall time of every pass, in order: ``records`` is a list of (pass text, seconds)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before_pass(self, p, program, ctx, index):
        self._t0 = time.perf_counter()

    def after_pass(self, p, before, result, ctx, index):
        self.records.append((str(p), time.perf_counter() - self._t0))

    @property
    def total(self) -> float:
        return sum(s for _, s in self.records)

    def report(self) -> str:
        total = self.total or 1e-12
        width = max([len(n) for n, _ in self.records] + [5])
        lines = [f"{'pass':<{width}}  {'seconds':>9}  {'share':>6}"]
        for name, s in self.records:
            lines.append(f"{name:<{width}}  {s:>9.4f}  {100 * s / total:>5.1f}%")
        lines.append(f"{'total':<{width}}  {self.total:>9.4f}  100.0%")
        return "\n".join(lines)


class PrintIR(Instrument):
    """Print the IR before and/or after passes (``only_changed`` skips passes that changed nothing).

    A pass's ``stats["remarks"]`` (e.g. why an FFN candidate did not match ``experts``) are
    printed as ``// remark:`` comments after it — also when it changed nothing.
    """

    def __init__(
        self,
        *,
        before: bool = False,
        after: bool = True,
        only_changed: bool = False,
        locations: bool = False,
        stream: IO[str] | None = None,
    ):
        self.before, self.after, self.only_changed = before, after, only_changed
        self.locations = locations
        self.stream = stream

    def _out(self) -> IO[str]:
        return self.stream or sys.stdout

    def before_pass(self, p, program, ctx, index):
        if self.before:
            print(f"// ----- IR before {p} -----", file=self._out())
            print(print_ir(program, self.locations), file=self._out())

    def after_pass(self, p, before, result, ctx, index):
        # a pass's ``stats["remarks"]`` (why candidates did not match...) print as comments,
        # also when only changes are printed and the pass changed nothing
        remarks = (result.stats.get("remarks") or []) if self.after else []
        if remarks and not result.changed and self.only_changed:
            print(f"// ----- remarks of {p} (no change) -----", file=self._out())
        for r in remarks:
            print(f"// remark: {r}", file=self._out())
        if self.after and (result.changed or not self.only_changed):
            print(
                f"// ----- IR after {p}{'' if result.changed else ' (no change)'} -----",
                file=self._out(),
            )
            print(print_ir(result.program, self.locations), file=self._out())


DUMP_INPUT = "000_input.ir"  # the first file DumpIR writes: the pipeline's input
DUMP_INDEX = "dump.json"  # the run's index for viewers (splice view, the HTML report)


class DumpIR(Instrument):
    """Write the IR into ``directory``: ``000_input.ir`` then ``NNN_<pass>.ir`` after each pass,
    and ``dump.json``, the index of the run that viewers read (``splice view``).

    ``dump.json`` (rewritten after every pass, so a failed run leaves what ran)::

        {"version": 1, "pipeline": "<pipeline text>", "input": "000_input.ir",
         "input_ops": {"aten.mm": 12, ...},
         "passes": [{"index": 1, "name": "lowrank", "pass": "lowrank{ratio=0.5}",
                     "file": "001_lowrank.ir",   # null when not written (only_changed)
                     "changed": true, "seconds": 0.12,
                     "stats": {...},             # the pass's stats, JSON-safe
                     "numeric": {...} or null,   # NumericCheck's record for that pass
                     "ops": {"splice.lowrank_linear": 14, ...}}],
         "failed": {"index": 2, "name": "...", "error": "..."}}   # only when a pass failed

    ``index`` is the pass's 1-based position in the pipeline (passes an instrument skipped
    have no entry); ``seconds`` is the wall time DumpIR measured around the pass; ``ops``
    counts the result's nodes by op (all graphs, sub-graphs included). ``numeric`` comes
    from a :class:`NumericCheck` in the same run (whatever the instruments' order), else
    null. JSON-safe: tensors become numbers (one element) or ``"tensor f32[4,4]"``,
    non-finite floats the strings ``"inf"``, ``"-inf"``, ``"nan"``, other objects ``str()``.
    """

    FORMAT_VERSION = 1

    def __init__(
        self, directory: str | Path, *, locations: bool = True, only_changed: bool = False
    ):
        self.directory = Path(directory)
        self.locations = locations
        self.only_changed = only_changed
        self.files: list[Path] = []
        self.records: list[dict[str, Any]] = []
        self._pipeline = ""
        self._input_ops: dict[str, int] = {}
        self._failed: dict[str, Any] | None = None
        self._ctx: PassContext | None = None
        self._t0 = 0.0

    def _write(self, name: str, program: Program) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        path.write_text(print_ir(program, self.locations))
        self.files.append(path)

    def index(self) -> dict[str, Any]:
        """The content of ``dump.json`` as it stands (see the class docstring)."""
        check = _NUMERIC_CHECKS.get(self._ctx) if self._ctx is not None else None
        passes = []
        for rec in self.records:
            numeric = check.by_index.get(rec["index"] - 1) if check is not None else None
            passes.append({**rec, "numeric": json_safe(numeric) if numeric else None})
        out: dict[str, Any] = {
            "version": self.FORMAT_VERSION,
            "pipeline": self._pipeline,
            "input": DUMP_INPUT,
            "input_ops": self._input_ops,
            "passes": passes,
        }
        if self._failed is not None:
            out["failed"] = self._failed
        return out

    def _write_index(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.index(), indent=1, allow_nan=False) + "\n"
        tmp = self.directory / f"{DUMP_INDEX}.tmp"
        tmp.write_text(text)
        tmp.replace(self.directory / DUMP_INDEX)

    def before_pipeline(self, pipeline, program, ctx):
        self._pipeline = str(pipeline)
        self._ctx = ctx
        self.records = []
        self._failed = None
        self._input_ops = op_counts(program)
        self._write(DUMP_INPUT, program)
        self._write_index()

    def before_pass(self, p, program, ctx, index):
        self._t0 = time.perf_counter()

    def after_pass(self, p, before, result, ctx, index):
        seconds = time.perf_counter() - self._t0
        file = None
        if result.changed or not self.only_changed:
            file = f"{index + 1:03d}_{_slug(p.name)}.ir"
            self._write(file, result.program)
        self.records.append(
            {
                "index": index + 1,
                "name": p.name,
                "pass": str(p),
                "file": file,
                "changed": bool(result.changed),
                "seconds": seconds,
                "stats": json_safe(result.stats),
                "ops": op_counts(result.program),
            }
        )
        self._write_index()

    def after_pass_failed(self, p, before, ctx, index, error, pipeline):
        self._failed = {
            "index": index + 1,
            "name": p.name,
            "pass": str(p),
            "error": f"{type(error).__name__}: {error}",
        }
        self._write_index()

    def after_pipeline(self, pipeline, program, ctx):
        self._write_index()  # NumericCheck's record of the last pass is in by now


# the NumericCheck of each running pipeline, by its context: how DumpIR finds the numeric
# results of the same run without depending on the order of the instruments
_NUMERIC_CHECKS: weakref.WeakKeyDictionary[PassContext, NumericCheck] = weakref.WeakKeyDictionary()


def op_counts(program: Program) -> dict[str, int]:
    """Nodes of ``program`` by printed op name (``aten.mm``, ``splice.lowrank_linear``), over
    the main graph and every sub-graph, sorted by name."""
    counts: Counter[str] = Counter()
    for _, gm in iter_graphs(program):
        counts.update(
            format_target(n) for n in gm.graph.nodes if n.op in ("call_function", "call_module")
        )
    return dict(sorted(counts.items()))


def json_safe(value: Any) -> Any:
    """``value`` as something :func:`json.dumps` writes as strict JSON (see :class:`DumpIR`)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return json_safe(value.item())
        dims = ",".join(str(d) for d in value.shape)
        return f"tensor {str(value.dtype).removeprefix('torch.')}[{dims}]"
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return json_safe(item())
    return str(value)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


class VerifyEach(Instrument):
    """Verify the input program and the result of every pass."""

    def __init__(self, *, propagate: bool = True):
        self.propagate = propagate
        self.verified = 0

    def before_pipeline(self, pipeline, program, ctx):
        try:
            verify(program, propagate=self.propagate)
        except VerificationError as e:
            raise VerificationError(
                f"the input program is invalid: {e.message}", node=e.node, loc=e.loc, hint=e.hint
            ) from e
        self.verified += 1

    def after_pass(self, p, before, result, ctx, index):
        try:
            verify(result.program, propagate=self.propagate)
        except VerificationError as e:
            raise VerificationError(
                f"after pass {p.name!r}: {e.message}", node=e.node, loc=e.loc, hint=e.hint
            ) from e
        self.verified += 1


def compare_outputs(ref: Sequence[Any], out: Sequence[Any]) -> dict[str, float]:
    """Max abs error, max relative error (to the reference's max magnitude), min cosine.

    A NaN or infinity in ``out`` that the reference does not have at the same place is an
    infinite error (``max`` would otherwise skip NaN and report 0); values that are the
    same NaN/inf in both are left out of the comparison. ``nonfinite`` counts the NaN/inf
    values of ``out``, so an output that is NaN in both programs is still reported.
    """
    max_abs, max_rel, cos = 0.0, 0.0, 1.0
    nonfinite = 0
    for a, b in zip(ref, out):
        if not isinstance(a, torch.Tensor):
            if a != b:
                max_abs = max_rel = math.inf
            continue
        a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
        if a64.numel() == 0:
            continue
        if a64.shape != b64.shape:
            return {"max_abs": math.inf, "max_rel": math.inf, "cosine": -1.0,
                    "nonfinite": nonfinite}  # fmt: skip
        fa, fb = torch.isfinite(a64), torch.isfinite(b64)
        nonfinite += int((~fb).sum())
        if not bool(fa.all() and fb.all()):
            same = ~fa & ~fb & ((a64 == b64) | (torch.isnan(a64) & torch.isnan(b64)))
            if bool(((~fa | ~fb) & ~same).any()):
                max_abs = max_rel = math.inf
                cos = -1.0
                continue
            a64, b64 = a64[fa], b64[fa]
            if a64.numel() == 0:
                continue
        diff = (a64 - b64).abs()
        ma = float(diff.max())
        scale = float(a64.abs().max())
        max_abs = max(max_abs, ma)
        max_rel = max(max_rel, ma / scale if scale > 0 else (0.0 if ma == 0 else math.inf))
        na, nb = float(a64.norm()), float(b64.norm())
        c = float(a64 @ b64) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        cos = min(cos, c)
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos, "nonfinite": nonfinite}


class NumericCheck(Instrument):
    """Run the program before and after each pass on sample inputs and compare outputs.

    An ``exact`` pass must agree within ``atol + rtol·max|ref|`` (1e-5 each by default) or
    the check raises :class:`PassError`; an ``approximate`` pass has its error reported in
    ``reports``. Inputs and outputs are matched by name, so passes that add inputs (with
    sample values in ``PassResult.sample_inputs_for_new_inputs``, kept for the later passes)
    or outputs are checked too; a pass that binds an input (``PassResult.bound_inputs``) is
    checked against the program before it run with the bound value.
    """

    def __init__(
        self,
        sample_inputs: Sequence[Sequence[Any]] | None = None,
        *,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        max_samples: int = 4,
    ):
        self.sample_inputs = (
            [tuple(s) for s in sample_inputs] if sample_inputs is not None else None
        )
        self.atol, self.rtol = atol, rtol
        self.max_samples = max_samples
        self.reports: list[dict[str, Any]] = []
        self._ref_cache: dict[int, list[dict[str, Any]]] = {}
        self._added: dict[str, Any] = {}  # values of inputs that earlier passes added
        # this run's records by 0-based pass index (DumpIR writes them into dump.json)
        self.by_index: dict[int, dict[str, Any]] = {}

    def before_pipeline(self, pipeline, program, ctx):
        self._added = {}
        self.by_index = {}
        _NUMERIC_CHECKS[ctx] = self

    def _samples(self, ctx: PassContext) -> list[tuple[Any, ...]]:
        s = self.sample_inputs if self.sample_inputs is not None else ctx.sample_inputs
        return list(s)[: self.max_samples]

    def _run(self, program: Program, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with torch.no_grad():
            return [program.run_named(**{n: s[n] for n in program.input_names}) for s in samples]

    def after_pass(self, p, before, result, ctx, index):
        samples = self._samples(ctx)
        record: dict[str, Any] = {"pass": str(p), "semantics": p.semantics}
        self.by_index[index] = record
        if not samples:
            record["skipped"] = "no sample inputs"
            self.reports.append(record)
            return
        named = [{**self._added, **dict(zip(before.input_names, s))} for s in samples]
        after = result.program
        missing = [
            n
            for n in after.input_names
            if n not in before.input_names and n not in result.sample_inputs_for_new_inputs
        ]
        if missing:
            record["skipped"] = f"the pass added inputs {missing} without sample values"
            self.reports.append(record)
            return
        if result.bound_inputs:
            ref = self._run(before, [{**s, **result.bound_inputs} for s in named])
        else:
            if before.version not in self._ref_cache:
                self._ref_cache = {before.version: self._run(before, named)}
            ref = self._ref_cache[before.version]
        extended = [{**s, **result.sample_inputs_for_new_inputs} for s in named]
        try:
            out = self._run(after, extended)
        except Exception as e:
            raise PassError(
                f"after pass {p.name!r} the program no longer runs: {type(e).__name__}: {e}"
            ) from e
        common = [n for n in before.output_names if n in after.output_names]
        record["outputs"] = common
        if not common:
            record["skipped"] = "no output names in common"
            self.reports.append(record)
            return
        metrics = compare_outputs(
            [r[n] for r in ref for n in common], [o[n] for o in out for n in common]
        )
        record.update(metrics)
        scale = max(
            (
                float(r[n].detach().abs().max())
                for r in ref
                for n in common
                if isinstance(r[n], torch.Tensor) and r[n].numel()
            ),
            default=0.0,
        )
        record["ok"] = metrics["max_abs"] <= self.atol + self.rtol * scale
        self._ref_cache = {after.version: out}
        self._added.update(result.sample_inputs_for_new_inputs)
        for n in result.bound_inputs:
            self._added.pop(n, None)
        self.reports.append(record)
        if p.semantics == "exact" and not record["ok"]:
            raise PassError(
                f"exact pass {p.name!r} changed the program's outputs: max abs error {metrics['max_abs']:.3g} "
                f"(tolerance {self.atol:g} + {self.rtol:g}·{scale:.3g}), cosine {metrics['cosine']:.6f}",
                hint="the pass is wrong, or it should declare semantics='approximate'",
            )

    def report(self) -> str:
        lines = []
        for r in self.reports:
            if "skipped" in r:
                lines.append(f"{r['pass']}: not checked ({r['skipped']})")
            else:
                nan = f", {r['nonfinite']} NaN/inf outputs" if r.get("nonfinite") else ""
                lines.append(
                    f"{r['pass']} [{r['semantics']}]: max abs {r['max_abs']:.3g}, max rel {r['max_rel']:.3g}, "
                    f"cosine {r['cosine']:.6f}{nan} {'ok' if r['ok'] else 'DIFFERS'}"
                )
        return "\n".join(lines)


class CrashReproducer(Instrument):
    """On failure, write a folder that reproduces it with ``splice opt``.

    ``<directory>/crash_<NNN>_<pass>/`` holds ``input.splice`` (the failing pass's input
    program), ``pipeline.txt`` (the failing pass and those after it), ``full_pipeline.txt``,
    ``samples.safetensors`` (sample inputs, if any), ``error.txt`` and ``reproduce.sh``.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.folders: list[Path] = []

    def after_pass_failed(self, p, before, ctx, index, error, pipeline):
        folder = self.directory / f"crash_{index + 1:03d}_{_slug(p.name)}"
        folder.mkdir(parents=True, exist_ok=True)
        save(before, folder / "input.splice")
        rest = ",".join(str(e) for e in pipeline.entries[index:])
        (folder / "pipeline.txt").write_text(rest + "\n")
        (folder / "full_pipeline.txt").write_text(str(pipeline) + "\n")
        if ctx.sample_inputs:
            from safetensors.torch import save_file

            flat = {
                f"sample{i}.{name}": v.contiguous()
                for i, s in enumerate(ctx.sample_inputs)
                for name, v in zip(before.input_names, s)
                if isinstance(v, torch.Tensor)
            }
            save_file(flat, str(folder / "samples.safetensors"))
        (folder / "error.txt").write_text("".join(traceback.format_exception(error)))
        (folder / "reproduce.sh").write_text(
            "#!/bin/sh\n# re-runs the failing pass on its input program\n"
            f'splice opt "$(dirname "$0")/input.splice" -p \'{rest}\' --verify-each\n'
        )
        self.folders.append(folder)


__all__ = [
    "CrashReproducer",
    "DumpIR",
    "Instrument",
    "NumericCheck",
    "PrintIR",
    "Timing",
    "VerifyEach",
    "compare_outputs",
    "json_safe",
    "op_counts",
]
