"""Typed metadata on IR nodes: value specs and source locations.

Every node of a :class:`~splice.ir.program.Program` carries

* a **spec** — what value it produces: a :class:`TensorSpec` (shape, dtype), a
  :class:`ScalarSpec` (an ``int``/``float``/``bool``, possibly symbolic), a
  :class:`TupleSpec` of specs, or :data:`NONE` for ops that return nothing;
* a :class:`Loc` — the nn.Module path it came from, the source line, and the passes that
  created or changed it.

Pass code reads and writes these only through the accessors below (:func:`spec`,
:func:`set_spec`, :func:`loc`, :func:`set_loc`); the raw ``node.meta`` keys are private to
this module. :class:`FakeEnv` turns specs into fake tensors (and back) so that the shape of
any new node can be inferred by running its op under ``FakeTensorMode``.

Symbolic dimensions are strings holding a Python expression over the program's symbols
(``"s"``, ``"2*s"``, ``"s - 1"``); concrete dimensions are ints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from splice.errors import ArtifactError

_SPEC_KEY = "splice.spec"
_LOC_KEY = "splice.loc"

# Short dtype names used in the text form; anything else prints as its torch name.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
    torch.complex128: "c128",
    torch.float8_e4m3fn: "f8e4m3fn",
    torch.float8_e5m2: "f8e5m2",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The short text name of a dtype (``torch.float32`` -> ``"f32"``)."""
    return DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`. Raises ``KeyError`` for unknown names."""
    if name in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[name]
    dt = getattr(torch, name, None)
    if isinstance(dt, torch.dtype):
        return dt
    raise KeyError(name)


Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor value. Symbolic dims are expression strings."""

    shape: tuple[Dim, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{','.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self, hints: Mapping[str, int] | None = None) -> int:
        """Number of elements; symbolic dims are evaluated with ``hints`` (symbol -> value)."""
        n = 1
        for d in self.shape:
            n *= eval_dim(d, hints)
        return n

    def nbytes(self, hints: Mapping[str, int] | None = None) -> int:
        return self.numel(hints) * _itemsize(self.dtype)


@dataclass(frozen=True)
class ScalarSpec:
    """A Python scalar value (``int``, ``float`` or ``bool``); ``expr`` is set when symbolic."""

    kind: str
    expr: str | None = None

    def __str__(self) -> str:
        return self.kind if self.expr is None else f"{self.kind}({self.expr})"


@dataclass(frozen=True)
class TupleSpec:
    """A tuple (or list, when ``is_list``) of values, e.g. the results of ``aten.split``."""

    items: tuple[Spec, ...]
    is_list: bool = False

    def __str__(self) -> str:
        inner = ", ".join(str(s) for s in self.items)
        if self.is_list:
            return f"[{inner}]"
        return f"({inner},)" if len(self.items) == 1 else f"({inner})"


@dataclass(frozen=True)
class NoneSpec:
    """The value of an op that returns nothing."""

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class GraphRefSpec:
    """The value of a ``get_attr`` that names a sub-graph (a branch or a part)."""

    name: str

    def __str__(self) -> str:
        return f"graph(@{self.name})"


NONE = NoneSpec()
Spec = TensorSpec | ScalarSpec | TupleSpec | NoneSpec | GraphRefSpec


def spec_json(s: Spec) -> dict[str, Any]:
    """The JSON form of a tensor spec, as artifact manifests, host programs and variant
    tables hold it: ``{"shape": [...], "dtype": "f32"}`` (symbolic dims stay expression
    strings). Those hold tensors only: any other spec is an ArtifactError."""
    if not isinstance(s, TensorSpec):
        raise ArtifactError(f"artifact inputs and outputs must be tensors, got {s}")
    return {"shape": list(s.shape), "dtype": dtype_name(s.dtype)}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def eval_dim(d: Dim, hints: Mapping[str, int] | None = None) -> int:
    """Evaluate one dimension; symbolic ones need ``hints`` for every symbol they use."""
    if isinstance(d, int):
        return d
    if hints is None:
        raise ValueError(f"symbolic dimension {d!r} needs symbol hints to evaluate")
    # expressions come from sympy's printer: arithmetic, Max and Min over symbol names
    return int(eval(d, {"__builtins__": {}, "Max": max, "Min": min}, dict(hints)))


@dataclass(frozen=True)
class Loc:
    """Where a node came from.

    ``module_path`` is the dotted nn.Module path (``""`` for the root module), ``file`` and
    ``line`` the innermost source line outside torch itself, and ``from_passes`` the passes
    that created or changed the node, oldest first.
    """

    module_path: str = ""
    file: str = ""
    line: int | None = None
    from_passes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source(self) -> str:
        if not self.file:
            return ""
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def with_pass(self, name: str) -> Loc:
        if self.from_passes and self.from_passes[-1] == name:
            return self
        return replace(self, from_passes=(*self.from_passes, name))

    def is_unknown(self) -> bool:
        return not self.module_path and not self.file and not self.from_passes

    def __str__(self) -> str:
        parts = [f"module {self.module_path or '<root>'}"]
        if self.file:
            parts.append(f"source {self.source}")
        if self.from_passes:
            parts.append(f"passes {','.join(self.from_passes)}")
        return ", ".join(parts)


UNKNOWN_LOC = Loc()

# ---------------------------------------------------------------------------------------
# Accessors: the only code that touches node.meta.


def get_spec(node: fx.Node) -> Spec | None:
    """The node's spec, or ``None`` if it has none (a verifier error in a finished program)."""
    return node.meta.get(_SPEC_KEY)


def spec(node: fx.Node) -> Spec:
    """The node's spec; raises ``KeyError`` naming the node if it has none."""
    s = node.meta.get(_SPEC_KEY)
    if s is None:
        raise KeyError(f"node %{node.name} has no spec")
    return s


def tensor_spec(node: fx.Node) -> TensorSpec:
    """The node's spec, which must be a tensor spec."""
    s = spec(node)
    if not isinstance(s, TensorSpec):
        raise TypeError(f"node %{node.name} is not a tensor (spec {s})")
    return s


def set_spec(node: fx.Node, s: Spec) -> None:
    node.meta[_SPEC_KEY] = s


def loc(node: fx.Node) -> Loc:
    return node.meta.get(_LOC_KEY, UNKNOWN_LOC)


def set_loc(node: fx.Node, value: Loc) -> None:
    node.meta[_LOC_KEY] = value


def clear_foreign_meta(node: fx.Node) -> None:
    """Drop every meta key that splice does not own (stale after edits otherwise)."""
    for k in list(node.meta):
        if k not in (_SPEC_KEY, _LOC_KEY):
            del node.meta[k]


# ---------------------------------------------------------------------------------------
# Locations from torch.export metadata.

_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in ')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _normalise_module_path(path: str) -> str:
    # torch.export gives "h.0.mlp" in non-strict mode, "L['self'].h[0].mlp" in strict mode
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def loc_from_export_meta(meta: Mapping[str, Any]) -> Loc:
    """Build a Loc from the ``nn_module_stack`` and ``stack_trace`` torch.export records."""
    module_path = ""
    stack = meta.get("nn_module_stack")
    if stack:
        module_path = _normalise_module_path(list(stack.values())[-1][0])
    file, line = "", None
    trace = meta.get("stack_trace") or ""
    frames = _FRAME_RE.findall(trace)
    for f, ln in reversed(frames):
        if not f.startswith(_TORCH_DIR) and not f.startswith("<"):
            file, line = f, int(ln)
            break
    if not file and frames:
        file, line = frames[-1][0], int(frames[-1][1])
    return Loc(module_path=module_path, file=file, line=line)


# ---------------------------------------------------------------------------------------
# Symbols and fake values.


@dataclass(frozen=True)
class SymbolInfo:
    """A symbolic dimension: an example value (``hint``) and its inclusive range."""

    hint: int
    min: int = 0
    max: int | None = None

    def __str__(self) -> str:
        hi = "inf" if self.max is None else str(self.max)
        return f"hint={self.hint} range=[{self.min},{hi}]"


class FakeEnv:
    """Fake tensors for specs, under one FakeTensorMode and ShapeEnv.

    A program's symbols become ShapeEnv symbols with their hints and ranges, so that fake
    propagation through a new node keeps its dims symbolic; :meth:`spec_of` maps the
    ShapeEnv's own symbol names back to the program's.
    """

    def __init__(self, symbols: Mapping[str, SymbolInfo] | None = None):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.symbols = dict(symbols or {})
        self.shape_env = ShapeEnv() if self.symbols else None
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self._sym: dict[str, Any] = {}
        self._back: dict[str, str] = {}
        if self.shape_env is not None:
            self._make_symbols()

    def _make_symbols(self) -> None:
        import sympy
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic
        from torch.utils._sympy.value_ranges import ValueRanges

        env = self.shape_env
        assert env is not None
        for name, info in self.symbols.items():
            sym = env.create_symbol(
                info.hint, ConstantSource(f"splice_{name}"), dynamic_dim=DimDynamic.DYNAMIC
            )
            hi = sympy.oo if info.max is None else info.max
            env.constrain_symbol_range(sym, compiler_min=info.min, compiler_max=hi)
            # keep the range on the symbol itself as well, for the value-range analysis
            env.var_to_range[sym] = ValueRanges(info.min, hi)
            self._sym[name] = env.create_symintnode(sym, hint=info.hint)
            self._back[str(sym)] = name

    # -- specs -> fakes
    def dim(self, d: Dim) -> Any:
        if isinstance(d, int):
            return d
        if not self._sym:
            raise ValueError(f"symbolic dimension {d!r} but the program declares no symbols")
        return eval(
            d, {"__builtins__": {}, "Max": torch.sym_max, "Min": torch.sym_min}, dict(self._sym)
        )

    def fake(self, s: Spec) -> Any:
        """A fake value with spec ``s`` (contiguous, on the CPU)."""
        if isinstance(s, TensorSpec):
            with self.mode:
                return torch.empty([self.dim(d) for d in s.shape], dtype=s.dtype)
        if isinstance(s, TupleSpec):
            items = [self.fake(i) for i in s.items]
            return items if s.is_list else tuple(items)
        if isinstance(s, ScalarSpec):
            if s.expr is not None:
                return self.dim(s.expr)
            return {"int": 1, "float": 1.0, "bool": True}[s.kind]
        if isinstance(s, NoneSpec):
            return None
        raise TypeError(f"no fake value for spec {s}")

    def from_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return self.mode.from_tensor(t, static_shapes=True)

    # -- fakes -> specs
    def expr_str(self, v: Any) -> str:
        import sympy

        expr = v.node.expr
        subs = {
            s: sympy.Symbol(self._back[str(s)]) for s in expr.free_symbols if str(s) in self._back
        }
        return _compact(str(expr.xreplace(subs)) if subs else str(expr))

    def spec_of(self, v: Any) -> Spec:
        return spec_of_value(v, self.expr_str)


def _compact(expr: str) -> str:
    # one canonical spelling per expression: sympy's, without spaces
    return expr.replace(" ", "")


def _default_expr(v: Any) -> str:
    return _compact(str(v.node.expr))


def spec_of_value(v: Any, expr_str=_default_expr) -> Spec:
    """The spec of a (fake or real) value produced by a node."""
    if isinstance(v, torch.Tensor):
        shape = tuple(
            expr_str(d) if isinstance(d, torch.SymInt) and not _is_const(d) else int(d)
            for d in v.shape
        )
        return TensorSpec(shape, v.dtype)
    if isinstance(v, (tuple, list)):
        return TupleSpec(tuple(spec_of_value(i, expr_str) for i in v), is_list=isinstance(v, list))
    if v is None:
        return NONE
    if isinstance(v, torch.SymInt):
        return ScalarSpec("int", None if _is_const(v) else expr_str(v))
    if isinstance(v, torch.SymFloat):
        return ScalarSpec("float", None if _is_const(v) else expr_str(v))
    if isinstance(v, torch.SymBool):
        return ScalarSpec("bool", None if _is_const(v) else expr_str(v))
    if isinstance(v, bool):
        return ScalarSpec("bool")
    if isinstance(v, int):
        return ScalarSpec("int")
    if isinstance(v, float):
        return ScalarSpec("float")
    if isinstance(v, fx.GraphModule):
        return GraphRefSpec("")
    raise TypeError(f"value of type {type(v).__name__} has no spec")


def _is_const(v: Any) -> bool:
    try:
        return v.node.expr.is_number
    except AttributeError:
        return True


def iter_tensor_specs(s: Spec) -> Iterable[TensorSpec]:
    """Every tensor spec inside ``s`` (flattening tuples)."""
    if isinstance(s, TensorSpec):
        yield s
    elif isinstance(s, TupleSpec):
        for i in s.items:
            yield from iter_tensor_specs(i)


_PART_START = "part_start"


def mark_part_start(node: fx.Node) -> None:
    """Mark ``node`` as the first node of a piece that ``branches`` makes a part of its own
    (``stitch`` marks where each copied block begins). The text form writes the mark as a
    ``part`` line before the node."""
    node.meta[_PART_START] = True


def starts_part(node: fx.Node) -> bool:
    """True if :func:`mark_part_start` marked ``node``."""
    return bool(node.meta.get(_PART_START))


__all__ = [
    "DTYPE_NAMES",
    "NONE",
    "UNKNOWN_LOC",
    "FakeEnv",
    "GraphRefSpec",
    "Loc",
    "NoneSpec",
    "ScalarSpec",
    "Spec",
    "SymbolInfo",
    "TensorSpec",
    "TupleSpec",
    "dtype_from_name",
    "dtype_name",
    "eval_dim",
    "get_spec",
    "iter_tensor_specs",
    "loc",
    "loc_from_export_meta",
    "mark_part_start",
    "set_loc",
    "set_spec",
    "spec",
    "spec_json",
    "spec_of_value",
    "starts_part",
    "tensor_spec",
]
