"""Pass, PassResult, PassContext: the contract every pass follows.

A pass is a frozen dataclass whose fields are its options — and its pipeline syntax:
``lowrank{method=whitened,energy=0.95}`` builds ``LowRank(method="whitened", energy=0.95)``.
It declares

* ``name`` — its registry and pipeline name;
* ``semantics`` — ``"exact"`` (the program computes the same function; NumericCheck holds
  it to 1e-5 in fp32) or ``"approximate"`` (NumericCheck reports its error);
* ``run(program, ctx) -> PassResult(program, changed, stats)``.

The contract:

* ``run`` may edit the program it receives in place and return it: the PassManager always
  hands a pass its own copy, so the caller's program is never touched and a failing pass
  leaves nothing half-written;
* edits go through :class:`splice.ir.rewriter.Rewriter`, which keeps specs and Locs right;
* a pass that changed nothing returns ``changed=False`` and says why in ``stats``;
* the result must verify (``VerifyEach`` checks it).

Analyses (cost model, calibration activations) are requested through
:meth:`PassContext.analysis` and cached by program version.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch

from splice.errors import PipelineError
from splice.ir.program import Program
from splice.target import Target

Semantics = Literal["exact", "approximate"]


@dataclass
class PassResult:
    """What a pass (or a whole pipeline) returns.

    ``sample_inputs_for_new_inputs`` lets a pass that adds program inputs (``hyper`` adds
    ``cond``) give NumericCheck values for them, so the check can still run.
    ``bound_inputs`` names the inputs a pass removed by fixing their value (``specialize``
    folds ``cond``) with that value, so NumericCheck runs the program before it with it.
    """

    program: Program
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    sample_inputs_for_new_inputs: dict[str, Any] = field(default_factory=dict)
    bound_inputs: dict[str, Any] = field(default_factory=dict)


class PassContext:
    """Shared state of one pipeline run.

    * ``sample_inputs`` — tuples of program inputs, for numeric checks and calibration;
    * ``calibration_inputs`` — tuples used by calibrating passes (defaults to samples);
    * ``programs`` — other named programs a pass may read (``stitch`` anchors);
    * ``target`` — the target the budget options and cost model read;
    * ``config`` — free-form settings;
    * ``progress`` — a callback ``(message, done, total)`` for long work;
    * ``original`` — set by the PassManager while a pipeline runs: the program before the
      pipeline's first approximate pass (None until one runs); ``heal`` trains against it.
    """

    def __init__(
        self,
        sample_inputs: Sequence[Sequence[Any]] | None = None,
        *,
        calibration_inputs: Sequence[Sequence[Any]] | None = None,
        programs: Mapping[str, Program] | None = None,
        target: Target | None = None,
        config: Mapping[str, Any] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ):
        self.sample_inputs = [tuple(s) for s in (sample_inputs or [])]
        self.calibration_inputs = (
            [tuple(s) for s in calibration_inputs] if calibration_inputs else None
        )
        self.programs = dict(programs or {})
        self.target = target
        self.config = dict(config or {})
        self.progress = progress or (lambda message, done, total: None)
        self.original: Program | None = None
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._memo: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self.analysis_hits = 0
        self.analysis_misses = 0
        self.memo_hits = 0

    @property
    def calibration(self) -> list[tuple[Any, ...]]:
        return (
            self.calibration_inputs if self.calibration_inputs is not None else self.sample_inputs
        )

    def analysis(self, fn: Callable[..., Any], program: Program, **options: Any) -> Any:
        """``fn(program, ctx, **options)``, cached by (fn, options, program.version).

        Versions are unique across all programs (a copy keeps its version until edited), so
        a result computed for one program is reused for its unedited copies. Results must
        refer to nodes by name, not by ``fx.Node`` object.
        """
        key = (fn, _freeze(options), program.version)
        if key in self._cache:
            self.analysis_hits += 1
            return self._cache[key]
        self.analysis_misses += 1
        result = fn(program, self, **options)
        self._cache[key] = result
        return result

    def memo(self, key: tuple[Any, ...], of: torch.Tensor, fn: Callable[[], Any]) -> Any:
        """``fn()``, a result that depends only on the values of the tensor ``of`` (and on
        ``key``), computed once per context.

        Programs share their (immutable) weight tensors, so the same weight read by two
        programs run in one context, such as an LM's prefill and decode, or the members of a
        SignatureSet, is one tensor object. The memo keys on it (its id and version counter)
        and keeps it alive while the context lives, so an id is never reused for another
        tensor.
        """
        k = (*key, id(of), of._version)
        hit = self._memo.get(k)
        if hit is not None:
            self.memo_hits += 1
            return hit[1]
        result = fn()
        self._memo[k] = (of, result)
        return result


def _freeze(v: Any) -> Any:
    if isinstance(v, Mapping):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, (set, frozenset)):
        return frozenset(_freeze(x) for x in v)
    try:
        hash(v)
        return v
    except TypeError:
        return id(v)


@dataclass(frozen=True)
class Pass(ABC):
    """Base class of all passes; subclasses are frozen dataclasses (fields = options)."""

    name: ClassVar[str] = ""
    semantics: ClassVar[Semantics] = "exact"
    summary: ClassVar[str] = ""

    @abstractmethod
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        """Transform ``program`` (a private copy; edit it in place) and return the result."""

    def __post_init__(self) -> None:
        self._check_finite_floats()
        self.validate()

    def _check_finite_floats(self) -> None:
        """Every float in the options (also inside tuples/lists) must be finite: no pass
        means anything by nan or inf, and nan slips through range checks (``nan < 0`` is
        False). Raises PipelineError naming the option."""
        for f in self.options():
            v = getattr(self, f.name)
            items = v if isinstance(v, (list, tuple)) else (v,)
            for x in items:
                if isinstance(x, float) and not math.isfinite(x):
                    raise PipelineError(
                        f"{self.name}: option {f.name} must be a finite number, got {v!r}",
                        hint=f"give {f.name} a finite value",
                    )

    def validate(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Check option values; raise PipelineError naming the bad option. Override as needed."""

    @classmethod
    def options(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in cls.options()}

    def non_default_options(self) -> list[str]:
        out = []
        for f in self.options():
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (
                    f.default_factory()
                    if f.default_factory is not dataclasses.MISSING
                    else dataclasses.MISSING
                )
            )
            if getattr(self, f.name) != default:
                out.append(f.name)
        return out

    def __str__(self) -> str:
        return format_pass(self, self.non_default_options())


def enum_values(tp: Any) -> list[str] | None:
    """The allowed values of a Literal or Enum option type, if it is one."""
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    return None


# ---------------------------------------------------------------------------------------
# the text of a pass: `lowrank{method=whitened,ratio=0.5}`

_SAFE = re.compile(r"[A-Za-z0-9_.*/:+\-@?]+")


def format_value(v: Any) -> str:
    """An option value in pipeline syntax: ``none``, ``true``, numbers, ``[a,b]``, and
    strings bare where the grammar allows, JSON-quoted otherwise."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    s = str(getattr(v, "value", v))
    return s if _SAFE.fullmatch(s) else json.dumps(s)


def format_pass(p: Pass, keys: Sequence[str]) -> str:
    """``p`` in pipeline syntax with the options ``keys`` (its name alone when none)."""
    if not keys:
        return p.name
    return p.name + "{" + ",".join(f"{k}={format_value(getattr(p, k))}" for k in keys) + "}"


@dataclass(frozen=True)
class PipelineEntry:
    """One pass of a pipeline and the options that were given explicitly (``str()`` prints
    those, so parse -> print -> parse is stable)."""

    pass_: Pass
    explicit: tuple[str, ...]

    def __str__(self) -> str:
        return format_pass(self.pass_, list(self.explicit))


class PassSequence(Protocol):
    """What instruments see of the pipeline they run in: its entries; ``str()`` gives its
    pipeline text. :class:`splice.passes.manager.Pipeline` is one."""

    entries: list[PipelineEntry]


__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "PassSequence",
    "PipelineEntry",
    "Semantics",
    "enum_values",
    "format_pass",
    "format_value",
]
