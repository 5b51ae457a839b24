"""Data-dependent sizes: token dispatch through ``nonzero()`` captured densely, with a mask.

A Switch-style top-1 router, transformers' eager MoE loop and token-dropping routers
dispatch rows with a selection whose size depends on the data::

    idx = torch.where(route == i)[0]          # or mask.nonzero().squeeze(-1), x[mask]
    if idx.numel() == 0:
        continue
    out.index_add_(0, idx, expert(x[idx]))    # or out[idx] = f(x[idx]), out[mask] = ...

``torch.export`` gives ``idx`` an unbacked size ``u0`` and stops at the first guard on it
(``GuardOnDataDependentSymNode: Eq(u0, 0)``); a static-shape backend such as TVM could not
compile ``u0`` anyway. :class:`DenseSelections` captures the pattern *exactly* into a
static-shape program by computing it densely:

* ``nonzero(mask)`` / ``torch.where(mask)`` / ``argwhere(mask)`` / ``x[mask]`` select *every*
  row: the index is ``arange(N)`` (the coordinates of every position of ``mask``), *tagged*
  with the selection (the flattened mask);
* gathering rows with a tagged index (``x[idx]``, ``index_select``, ``gather``,
  ``embedding``) keeps all ``N`` rows, tagged; where the index is the identity (a 1-D mask
  over the gathered dim) no gather is emitted at all;
* row-wise ops propagate the tag: elementwise ops, ``linear``/``matmul``/``mm``/``addmm``
  with the tagged rows as the row operand, softmax/layer_norm/rms_norm and reductions over
  other dims, views and permutations that keep the tagged dim whole;
* the scatter back (``index_add_``, ``index_put_``, ``index_copy_``, ``out[idx] = v``,
  ``out[mask] = v``, ``scatter_add_``/``scatter_`` along the tagged dim) becomes a masked
  update: ``out + where(mask, v, 0)`` or ``where(mask, v, out)``, so unselected rows
  change nothing. Accumulating scatters through an index that is not the identity (the
  coordinates of a multi-dimensional mask, with repeats) keep their scatter, with the
  masked-out values zeroed.

**Sizes read in Python.** ``numel()``, ``size(d)``, ``shape[d]`` and ``len()`` of the
tagged dim return a :class:`SelectedCount`: an ``int`` equal to the static ``N`` that can
be passed back to torch as a size (``y.view(n, -1)``, ``torch.zeros(n, d)`` -- a tensor
whose rows are the selected rows) and answers emptiness tests (``n == 0``, ``n > 0``,
``bool(n)``) as "not empty". Any other use -- arithmetic, ``range(n)``, a comparison with
another number, a value passed to torch -- raises :class:`~splice.errors.CaptureError`.
Answering "not empty" is exact for the guard ``if idx.numel() == 0: continue`` (or
``return``) when what the guard skips reaches the outputs only through the masked scatter
back, as in every dispatch loop above: with an empty selection the masked update adds
nothing and writes nothing, which is what skipping does. Code that the guard skips and
that changes outputs in another way (``out = out * 2`` inside the guarded body) would run
unconditionally: that is the one assumption the mode makes.

**Loops over a selection** (transformers' eager experts: ``for e in hit.nonzero(): ...``)
run once per *candidate* row: iterating a ``nonzero()``/``where`` result yields every
position, each with its static value (so ``self.experts[e]``, ``W[e]`` and ``if e == E:
continue`` are decided while tracing). Every value made inside an iteration is conditioned
on that iteration's row being selected, and the iteration's write-backs through a
selection are masked by that condition too; so a row that is not selected changes
nothing, whatever the body computes. A value made in an iteration and used after it (``out
= out + f(e)``), returned, or written into an outer tensor other than through a selection
is refused. A loop over the gathered rows themselves (``for row in x[idx]``) is refused.

**Everything else is refused**, never silently wrong: an op on a tagged tensor that is not
known to work row by row -- a reduction over the selected rows, a matrix product with the
selected rows as its reduction operand, ``sort``/``cumsum`` along them, iterating over
them, mixing them with a full-size tensor or with another selection, converting them to
Python values, returning them as outputs -- raises a :class:`~splice.errors.CaptureError`
naming the op and the model's source line.

**Cost**: dense compute. Every expert runs on every token (an ``E``-expert top-1 layer
costs ``E`` times its sparse FLOPs); the result is exact and has static shapes. Recognising
a whole MoE block and emitting the sparse ``splice::moe_ffn`` op is a separate rewrite.

Why a :class:`~torch.overrides.TorchFunctionMode` and not a ``TorchDispatchMode``: export
records the graph at the pre-dispatch level, above Python dispatch modes, so a dispatch
mode could change fake values but not the recorded ops. A function mode sees the Python
calls before export records them, so the dense ops it issues are what the graph holds.

Enter it *inside* the exported ``forward``: :func:`dense_selections_in` patches a model's
``forward`` for the duration of an export; :meth:`DenseSelections.check_outputs` refuses
outputs that still hold selected rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from splice.errors import CaptureError

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0] + "/"
_SPLICE_DIR = __file__.rsplit("/", 2)[0]
_INTERNAL = tuple(f"{_SPLICE_DIR}/{d}/" for d in ("ir", "passes", "runtime"))

_HINT = (
    "splice captures a nonzero()/where(mask) selection densely: every row is computed and "
    "the mask is applied where rows are scattered back (index_add_, index_put_, "
    "out[idx] = v); only row-by-row work fits between the gather and the scatter. Write "
    "this step as a masked whole-tensor op instead, e.g. (x * mask[:, None]).sum(0)"
)

# ---------------------------------------------------------------------------------------
# op tables (names as torch functions and Tensor methods report them)

_POINTWISE = frozenset(
    """abs absolute neg negative positive exp exp2 expm1 log log2 log10 log1p sqrt rsqrt
    sin cos tan asin acos atan sinh cosh tanh asinh acosh atanh sigmoid logit relu relu6
    gelu silu mish elu selu celu leaky_relu hardtanh hardswish hardsigmoid softplus
    softsign tanhshrink hardshrink softshrink threshold erf erfc erfinv sign sgn floor
    ceil round trunc frac reciprocal square logical_not bitwise_not isnan isinf isfinite
    isneginf isposinf nan_to_num clamp clip clamp_min clamp_max add sub subtract rsub
    mul multiply div divide true_divide floor_divide remainder fmod pow float_power
    maximum minimum fmax fmin atan2 arctan2 eq ne lt le gt ge greater less greater_equal
    less_equal not_equal equal_ logical_and logical_or logical_xor bitwise_and
    bitwise_or bitwise_xor and or xor invert lshift rshift where masked_fill lerp
    addcmul addcdiv copysign hypot xlogy dropout alpha_dropout feature_alpha_dropout
    dropout1d dropout2d dropout3d zeros_like ones_like empty_like full_like rand_like
    randn_like fill zero""".split()  # noqa: SIM905
)
#: value-preserving: an identity index stays one
_KEEPS_VALUES = frozenset(
    """to type long int short char byte float double half bfloat16 bool contiguous clone
    detach cpu cuda requires_grad_ data""".split()  # noqa: SIM905
)
#: only ``self`` decides the result's rows; the other tensor argument gives dtype or device
_SELF_ONLY = frozenset({"to", "type", "type_as"})
_REFLECTED = {
    f"__r{n}__": n
    for n in ["add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor"]
}
_DUNDER = {
    "__add__": "add",
    "__sub__": "sub",
    "__mul__": "mul",
    "__truediv__": "div",
    "__floordiv__": "floor_divide",
    "__mod__": "remainder",
    "__pow__": "pow",
    "__neg__": "neg",
    "__pos__": "positive",
    "__abs__": "abs",
    "__invert__": "invert",
    "__and__": "and",
    "__or__": "or",
    "__xor__": "xor",
    "__lshift__": "lshift",
    "__rshift__": "rshift",
    "__eq__": "eq",
    "__ne__": "ne",
    "__lt__": "lt",
    "__le__": "le",
    "__gt__": "gt",
    "__ge__": "ge",
    "__matmul__": "matmul",
    "__rmatmul__": "rmatmul",
    "__rtruediv__": "div",
    "__rdiv__": "div",
}

#: ops with a ``dim`` argument: name -> (position, default, keeps the dim)
#: default ``None`` means "every dim" (a reduction over the selected rows too).
_DIM_OPS: dict[str, tuple[int, Any, bool]] = {
    **dict.fromkeys(
        """sum mean amax amin prod std var logsumexp all any argmax argmin count_nonzero nansum
        nanmean median nanmedian mode std_mean var_mean max min aminmax""".split(),  # noqa: SIM905
        (1, None, False),
    ),
    "norm": (2, None, False),
    "kthvalue": (2, -1, False),
    **{n: (1, None, True) for n in ["softmax", "log_softmax", "softmin"]},
    **{n: (1, None, True) for n in ["cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"]},
    "sort": (1, -1, True),
    "argsort": (1, -1, True),
    "msort": (1, 0, True),
    "topk": (2, -1, True),
    "glu": (1, -1, True),
    "normalize": (2, 1, True),
}
_DIM_KW = ("dim", "axis")

#: non-tensor queries that reveal nothing data-dependent
_QUERIES = frozenset(
    """dim ndimension is_contiguous stride storage_offset element_size get_device
    is_floating_point is_complex is_signed is_inference __repr__ __format__ __str__
    __hash__ data_ptr untyped_storage has_names""".split()  # noqa: SIM905
)
_SAFE_ATTRS = frozenset(
    """dtype device ndim is_cuda is_cpu is_meta is_sparse is_quantized is_mkldnn is_nested
    layout requires_grad names itemsize nbytes is_leaf grad_fn output_nr _version _base""".split()  # noqa: SIM905
)
#: ops that turn tensor data into Python values
_TO_PYTHON = frozenset(
    """item tolist __bool__ __int__ __float__ __complex__ __index__ numpy equal allclose
    __array__ __iter__ __reversed__ __contains__""".split()  # noqa: SIM905
)
_SIZE_ARG_OPS = frozenset(
    """view reshape expand broadcast_to unflatten new_zeros new_ones new_empty new_full
    zeros ones empty full randn rand""".split()  # noqa: SIM905
)
_FACTORIES = frozenset(
    """zeros ones empty full randn rand new_zeros new_ones new_empty new_full""".split()  # noqa: SIM905
)
_MATMUL = frozenset(["linear", "matmul", "rmatmul", "mm", "bmm", "addmm", "baddbmm", "mv", "addmv"])
_SOURCES = frozenset({"nonzero", "argwhere"})
_SCATTERS = frozenset(
    """index_add index_add_ index_copy index_copy_ index_put index_put_ scatter scatter_
    scatter_add scatter_add_ scatter_reduce scatter_reduce_ __setitem__""".split()  # noqa: SIM905
)
_GATHERS = frozenset({"__getitem__", "index_select", "gather", "embedding"})


# ---------------------------------------------------------------------------------------
# selections, tags and counts


@dataclass(eq=False)
class _Selection:
    """One data-dependent selection: ``mask`` (bool, ``[N]``) over ``N`` positions."""

    mask: torch.Tensor
    shape: tuple[int, ...]  # the shape of the mask before flattening
    site: str

    @property
    def n(self) -> Any:
        """``N``: an int, or a SymInt when the mask's length is a dynamic dim."""
        return self.mask.shape[0]


@dataclass(frozen=True)
class _Tag:
    """A tensor whose dim ``dim`` enumerates the positions of ``sel`` (rows outside the
    selection hold values nothing may read). ``ident``: every value equals its position
    along ``dim`` (an identity index)."""

    sel: _Selection
    dim: int
    ident: bool
    site: str
    rows: Callable[[int], Any] | None = None  # static value of the row at a position


@dataclass(eq=False)
class _Loop:
    """A Python ``for`` loop over the rows of a selection: ``pos`` is the row the body is
    running for (-1 once the loop ended)."""

    sel: _Selection
    site: str
    pos: int = -1
    done: bool = False


@dataclass(frozen=True)
class _Cond:
    """ "Row ``i`` of ``loop`` was selected": what a value made in that iteration needs."""

    loop: _Loop
    i: int

    @property
    def active(self) -> bool:
        return not self.loop.done and self.loop.pos == self.i


class _Rows(tuple):
    """The rows ``unbind(0)`` gives for a loop over a selection; iterating them moves the
    loop's position (a ``for`` loop over a tensor iterates ``unbind(0)``)."""

    loop: _Loop

    def __iter__(self) -> Iterator[Any]:
        return _RowIter(self)


class _RowIter:
    def __init__(self, rows: _Rows) -> None:
        self.rows = rows
        self.loop = rows.loop
        self.i = 0

    def __iter__(self) -> _RowIter:
        return self

    def __next__(self) -> Any:
        if self.i >= len(self.rows):
            self._end()
            raise StopIteration
        self.loop.pos = self.i
        self.i += 1
        return tuple.__getitem__(self.rows, self.loop.pos)

    def _end(self) -> None:
        self.loop.done = True
        self.loop.pos = -1

    def __del__(self) -> None:  # `break` drops the iterator: the loop has ended
        self._end()


class SelectedCount(int):
    """The number of rows a data-dependent selection picked, as the static ``N``.

    It may be passed to torch as a size and answers emptiness tests as "not empty" (see
    the module docs); every other use is refused with a :class:`CaptureError`.
    """

    sel: _Selection
    site: str

    def __new__(cls, n: int, sel: _Selection, site: str) -> SelectedCount:
        obj = super().__new__(cls, n)
        obj.sel = sel
        obj.site = site
        return obj

    def _refuse(self, what: str) -> NoReturn:
        raise CaptureError(
            f"the number of rows that nonzero()/where(mask) selected is data-dependent and "
            f"is used as a number here ({what})",
            where=_user_site(),
            hint="splice captures a selection densely, with every row; only emptiness tests "
            "(`if idx.numel() == 0`) and sizes passed back to torch are supported. Use the "
            "mask instead, e.g. mask.sum() for the count",
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is int and other == 0:
            return False
        self._refuse(f"== {other!r}")

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __gt__(self, other: object) -> bool:
        if type(other) is int and other == 0:
            return True
        self._refuse(f"> {other!r}")

    def __ge__(self, other: object) -> bool:
        if type(other) is int and other == 1:
            return True
        self._refuse(f">= {other!r}")

    def __lt__(self, other: object) -> bool:
        if type(other) is int and other == 1:
            return False
        self._refuse(f"< {other!r}")

    def __le__(self, other: object) -> bool:
        if type(other) is int and other == 0:
            return False
        self._refuse(f"<= {other!r}")

    def __bool__(self) -> bool:
        return True

    __hash__ = int.__hash__

    def __index__(self) -> int:
        self._refuse("as an index or a range bound")

    def __int__(self) -> int:
        self._refuse("int()")

    def __float__(self) -> float:
        self._refuse("float()")

    def __repr__(self) -> str:
        return f"SelectedCount({int.__repr__(self)})"


def _arith(name: str) -> Callable[..., NoReturn]:
    def refuse(self: SelectedCount, *_: Any) -> NoReturn:
        self._refuse(f"operator {name}")

    refuse.__name__ = name
    return refuse


for _op in [
    "add",
    "radd",
    "sub",
    "rsub",
    "mul",
    "rmul",
    "truediv",
    "rtruediv",
    "floordiv",
    "rfloordiv",
    "mod",
    "rmod",
    "pow",
    "rpow",
    "neg",
    "pos",
    "abs",
    "and",
    "rand",
    "or",
    "ror",
    "xor",
    "rxor",
    "lshift",
    "rlshift",
    "rshift",
    "rrshift",
    "invert",
    "divmod",
    "rdivmod",
]:
    setattr(SelectedCount, f"__{_op}__", _arith(f"__{_op}__"))


def _count(n: Any, tag: _Tag) -> Any:
    """A SelectedCount for a static ``n``; a dynamic dim's SymInt stays one (torch guards
    the comparisons made on it, and its arithmetic stays symbolic)."""
    return SelectedCount(n, tag.sel, tag.site) if isinstance(n, int) else n


class _Shape(tuple):
    """``tensor.shape`` of a tagged tensor: a tuple holding a :class:`SelectedCount`."""

    def numel(self) -> int:
        return math.prod(self)


# ---------------------------------------------------------------------------------------
# the mode


class DenseSelections(TorchFunctionMode):
    """Captures ``nonzero``/``where(mask)`` dispatch densely with a mask (module docs).

    Enter it inside the traced ``forward`` and pass the forward's result through
    :meth:`check_outputs`::

        with DenseSelections() as dense:
            out = dense.check_outputs(original_forward(*args, **kwargs))

    Until a selection is made the mode only forwards calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tags: dict[int, _Tag] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids unique while the mode lives
        self._by_mask: dict[int, _Selection] = {}
        self._loops: list[_Loop] = []
        self._conds: dict[int, frozenset[_Cond]] = {}  # tensor id -> iterations it needs
        self._elems: dict[int, Any] = {}  # tensor id -> static value of a loop's row
        self._gate: frozenset[_Cond] = frozenset()  # conditions of the op being run
        self._gate_masks: dict[_Cond, torch.Tensor] = {}

    @property
    def selected(self) -> bool:
        """Whether the forward made a data-dependent selection (so this mode holds state
        about the rows it selected)."""
        return bool(self._tags or self._loops)

    # -- bookkeeping ---------------------------------------------------------------------

    def _tag(
        self,
        t: torch.Tensor,
        sel: _Selection,
        dim: int,
        ident: bool,
        site: str,
        rows: Callable[[int], Any] | None = None,
    ) -> None:
        dim = dim % max(t.ndim, 1)
        if t.ndim == 0 or t.shape[dim] != sel.n:
            raise CaptureError(
                f"internal: selected rows landed on dim {dim} of a {list(t.shape)} tensor",
                where=site,
                hint="report this with the model",
            )
        self._tags[id(t)] = _Tag(sel, dim, ident, site, rows)
        self._keep.append(t)

    def _tag_of(self, x: Any) -> _Tag | None:
        if isinstance(x, torch.Tensor):
            return self._tags.get(id(x))
        return None

    def _selection(self, mask: torch.Tensor, site: str) -> _Selection:
        sel = self._by_mask.get(id(mask))
        if sel is None:
            flat = mask if mask.dtype == torch.bool else mask != 0
            flat = flat.reshape(-1)
            sel = _Selection(flat, tuple(mask.shape), site)
            self._by_mask[id(mask)] = sel
            self._keep.append(mask)
        return sel

    def check_outputs(self, out: Any) -> Any:
        """Return ``out`` unchanged; raise CaptureError if it holds selected rows."""
        for k, leaf in enumerate(_leaves(out) if not _is_pytree(out) else pytree.tree_leaves(out)):
            tag = self._tag_of(leaf)
            if tag is not None:
                raise CaptureError(
                    f"the model returns rows that nonzero()/where(mask) selected (output "
                    f"{k}): their number is data-dependent",
                    where=tag.site,
                    hint="scatter them back into a full-size tensor (out.index_add_(0, idx, "
                    "y) or out[idx] = y) before returning",
                )
            if isinstance(leaf, SelectedCount):
                leaf._refuse(f"returned as output {k}")
            conds = self._conds.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if conds:
                _refuse_loop_value(next(iter(conds)), f"returned as output {k}")
        return out

    # -- dispatch ------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if not self._loops:
            return self._dispatch(func, name, args, kwargs)
        return self._in_loops(func, name, args, kwargs)

    def _dispatch(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        if name in _SOURCES or (name == "where" and len(args) + len(kwargs) == 1):
            return self._source(name, args, kwargs)
        if not self._tags and (
            name not in ("__getitem__", "__setitem__")
            or not any(_is_bool_tensor(i) for i in _index_tuple(args[1]))
        ):
            return func(*args, **kwargs)
        leaves = _leaves((args, kwargs))
        tags = [self._tags[id(x)] for x in leaves if id(x) in self._tags]
        counts = [x for x in leaves if isinstance(x, SelectedCount)]
        if name in _GATHERS or name in _SCATTERS:
            return self._indexing(name, func, args, kwargs, counts)
        if not tags and not counts:
            return func(*args, **kwargs)
        site = _user_site()
        if counts:
            return self._with_counts(name, func, args, kwargs, counts, tags, site)
        return self._tagged_op(name, func, args, kwargs, tags, site)

    # -- loops over a selection's rows ---------------------------------------------------

    def _loop_rows(self, func: Callable, args: tuple, kwargs: dict, tag: _Tag, site: str) -> _Rows:
        """``unbind(0)`` of a selection's coordinates: the rows of a ``for`` loop. Every
        position is visited; what an iteration computes is conditioned on its row being
        selected, and its writes back (index_add_, out[idx] = v) are masked by that."""
        assert tag.rows is not None
        loop = _Loop(tag.sel, site)
        rows = _Rows(func(*args, **kwargs))
        rows.loop = loop
        for i, row in enumerate(tuple.__iter__(rows)):
            self._elems[id(row)] = tag.rows(i)
            self._conds[id(row)] = frozenset({_Cond(loop, i)})
            self._keep.append(row)
        self._loops.append(loop)
        return rows

    def _active(self) -> frozenset[_Cond]:
        return frozenset(_Cond(lp, lp.pos) for lp in self._loops if not lp.done and lp.pos >= 0)

    def _in_loops(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        """Dispatch while loops over selections exist: check and propagate conditions."""
        leaves = _leaves((args, kwargs))
        ins: frozenset[_Cond] = frozenset()
        for x in leaves:
            if isinstance(x, torch.Tensor) and id(x) in self._conds:
                ins |= self._conds[id(x)]
        for c in ins:
            if not c.active:
                _refuse_loop_value(c, f"used by {name} after its iteration")
        conds = ins | self._active()
        elems = [x for x in leaves if isinstance(x, torch.Tensor) and id(x) in self._elems]
        if elems:
            done, out = self._elem_op(func, name, args, kwargs)
            if done:
                self._mark(out, conds)
                return out
        target = args[0] if args else None
        if conds and isinstance(target, torch.Tensor) and _mutates(name):
            mine = self._conds.get(id(target), frozenset())
            if not conds <= mine and not self._selection_write(name, args, kwargs):
                _refuse(
                    name,
                    "inside a loop over a nonzero() result it changes a tensor made outside "
                    "the loop, other than by writing selected rows back",
                    _user_site(),
                    hint="write back with index_add_(0, idx, y) or out[idx] = y, which splice "
                    "masks by each iteration's row",
                )
        self._gate = conds
        try:
            out = self._dispatch(func, name, args, kwargs)
        finally:
            self._gate = frozenset()
        if conds:
            if isinstance(target, torch.Tensor) and out is target and _mutates(name):
                mine = self._conds.get(id(target), frozenset())
                if mine:
                    self._conds[id(target)] = mine | conds
                return out
            if name != "__setitem__":
                self._mark(out, conds)
        return out

    def _mark(self, out: Any, conds: frozenset[_Cond]) -> None:
        if not conds:
            return
        for leaf in _leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._conds[id(leaf)] = self._conds.get(id(leaf), frozenset()) | conds
                self._keep.append(leaf)

    def _selection_write(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Is this a write-back through a selection (masked, and gated by the loop)?"""
        if name not in _SCATTERS:
            return False
        rest = _leaves((args[1:], kwargs)) if name != "__setitem__" else _leaves(args[1])
        return any(self._tag_of(x) is not None or _is_bool_tensor(x) for x in rest)

    def _elem_op(self, func: Callable, name: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """Ops on a loop's row whose value is static: answered in Python."""
        base = _base_name(name)
        x = args[0] if args else None
        value = self._elems.get(id(x)) if isinstance(x, torch.Tensor) else None
        if value is not None:
            one = value[0] if isinstance(value, list) and len(value) == 1 else value
            if base in ("__index__", "__int__", "item") and isinstance(one, int):
                return True, one
            if base == "__bool__" and isinstance(one, (int, bool)):
                return True, bool(one)
            if base == "tolist":
                return True, value
            if name == "__getitem__" and isinstance(args[1], int) and isinstance(value, list):
                out = func(*args, **kwargs)
                self._elems[id(out)] = value[args[1]]
                return True, out
            other = args[1] if len(args) > 1 else None
            if isinstance(other, torch.Tensor) and id(other) in self._elems:
                other = self._elems[id(other)]
            py = _PY_OPS.get(base)
            if py is not None and isinstance(other, (int, bool)) and isinstance(one, int):
                out = func(*args, **kwargs)
                self._elems[id(out)] = py(one, other)
                return True, out
        if name == "__getitem__" and isinstance(x, torch.Tensor):
            index = _index_tuple(args[1])
            if any(isinstance(i, torch.Tensor) and id(i) in self._elems for i in index):
                static = tuple(
                    self._elems[id(i)]
                    if isinstance(i, torch.Tensor) and id(i) in self._elems
                    else i
                    for i in index
                )
                return True, self._dispatch(func, name, (x, static), kwargs)
        return False, None

    def _gated(self, m: torch.Tensor) -> torch.Tensor:
        """``m`` and'ed with "this iteration's row is selected" for every enclosing loop."""
        for c in self._gate:
            g = self._gate_masks.get(c)
            if g is None:
                g = c.loop.sel.mask[c.i]
                self._gate_masks[c] = g
                self._keep.append(g)
            m = m & g
        return m

    # -- sources -------------------------------------------------------------------------

    def _source(self, name: str, args: tuple, kwargs: dict) -> Any:
        site = _user_site()
        mask = args[0] if args else kwargs.get("input", kwargs.get("condition"))
        if self._tag_of(mask) is not None:
            _refuse(name, "it selects among rows that another selection picked", site)
        if not isinstance(mask, torch.Tensor) or mask.ndim == 0:
            _refuse(name, "a selection needs a mask with at least one dim", site)
        sel = self._selection(mask, site)
        coords = self._coords(sel, site)
        as_tuple = name == "where" or bool(kwargs.get("as_tuple", False))
        shape = sel.shape
        for a, c in enumerate(coords):
            self._tag(c, sel, 0, len(coords) == 1, site, _coord_of(shape, a))
        if as_tuple:
            return tuple(coords)
        if len(coords) == 1:
            out = coords[0].unsqueeze(1)
            self._tag(out, sel, 0, True, site, lambda i: [i])
            return out
        out = torch.stack(coords, 1)
        self._tag(out, sel, 0, False, site, lambda i: list(_unravel(i, shape)))
        return out

    def _coords(self, sel: _Selection, site: str) -> list[torch.Tensor]:
        """The coordinates of every position of the mask, each ``[N]`` and tagged."""
        ar = torch.arange(sel.n, device=sel.mask.device)
        if len(sel.shape) == 1:
            self._tag(ar, sel, 0, True, site)
            return [ar]
        out = []
        stride = sel.n
        for size in sel.shape:
            stride //= size
            c = torch.remainder(torch.div(ar, stride, rounding_mode="floor"), size)
            self._tag(c, sel, 0, False, site)
            out.append(c)
        return out

    # -- sizes read in Python ------------------------------------------------------------

    def _with_counts(
        self,
        name: str,
        func: Callable,
        args: tuple,
        kwargs: dict,
        counts: list[SelectedCount],
        tags: list[_Tag],
        site: str,
    ) -> Any:
        sels = {id(c.sel): c.sel for c in counts}
        if name not in _SIZE_ARG_OPS or len(sels) != 1:
            counts[0]._refuse(f"passed to {name}")
        (sel,) = sels.values()
        if name in _FACTORIES:
            sizes = _size_args(name, args, kwargs)
            pos = [i for i, s in enumerate(sizes) if isinstance(s, SelectedCount)]
            if len(pos) != 1 or len(counts) != 1 or any(t.sel is not sel for t in tags):
                counts[0]._refuse(f"passed to {name}")
            out = func(*args, **kwargs)
            self._tag(out, sel, pos[0], False, site)
            return out
        if len(tags) != 1 or tags[0].sel is not sel:
            counts[0]._refuse(f"passed to {name} of a tensor without those rows")
        out = self._tagged_op(name, func, args, kwargs, tags, site)
        sizes = _size_args(name, args, kwargs)
        pos = [i for i, s in enumerate(sizes) if isinstance(s, SelectedCount)]
        if name == "unflatten":
            pos = [p + (args[1] % args[0].ndim) for p in pos]
        tag = self._tag_of(out)
        if tag is None or pos != [tag.dim]:
            counts[0]._refuse(f"passed to {name} for a dim other than the selected rows")
        return out

    def _size_query(self, name: str, func: Callable, args: tuple, kwargs: dict, tag: _Tag) -> Any:
        t = args[0]
        n = _count(tag.sel.n, tag)
        if name == "numel" or name == "nelement":
            return _count(t.numel(), tag)
        if name == "__len__":
            return n if tag.dim == 0 else len(t)
        shape = _Shape(n if i == tag.dim else s for i, s in enumerate(t.shape))
        if name == "size":
            d = args[1] if len(args) > 1 else kwargs.get("dim")
            return shape if d is None else shape[d]
        return shape

    # -- tagged ops ----------------------------------------------------------------------

    def _tagged_op(
        self, name: str, func: Callable, args: tuple, kwargs: dict, tags: list[_Tag], site: str
    ) -> Any:
        base = _base_name(name)
        t0 = self._tag_of(args[0]) if args else None
        if name == "__get__":
            return self._attr(func, args, t0, site)
        if base in ("numel", "nelement", "size", "__len__"):
            assert t0 is not None
            return self._size_query(base, func, args, kwargs, t0)
        if base in _QUERIES:
            return func(*args, **kwargs)
        if base in _TO_PYTHON or name in _TO_PYTHON:
            _refuse(name, "it turns the selected rows into Python values", site)
        if base in _SELF_ONLY and t0 is not None:
            out = func(*args, **kwargs)
            self._tag(out, t0.sel, t0.dim, t0.ident, site)
            return out
        if base in _SELF_ONLY:
            _refuse(name, "it takes the selected rows' dtype for a full-size tensor", site)
        if base in _POINTWISE or base in _KEEPS_VALUES or (base == "where" and len(args) == 3):
            return self._pointwise(name, base, func, args, kwargs, site)
        if base in _DIM_OPS:
            return self._dim_op(name, base, func, args, kwargs, site)
        if base in ("layer_norm", "rms_norm"):
            return self._last_dims_op(name, func, args, kwargs, site)
        if base in ("group_norm", "instance_norm") or base.startswith(
            ("conv", "max_pool", "avg_pool", "adaptive_", "lp_pool", "interpolate", "upsample")
        ):
            return self._batch_only(name, func, args, kwargs, site)
        if base == "batch_norm":
            return self._batch_norm(name, func, args, kwargs, site)
        if base in _MATMUL:
            return self._matmul(name, base, func, args, kwargs, site)
        return self._shape_op(name, base, func, args, kwargs, site)

    def _attr(self, func: Callable, args: tuple, tag: _Tag | None, site: str) -> Any:
        attr = getattr(getattr(func, "__self__", None), "__name__", "")
        if tag is None:
            return func(*args)
        if attr == "shape":
            return self._size_query("shape", func, args, {}, tag)
        if attr in _SAFE_ATTRS:
            out = func(*args)
            if attr == "data":
                self._tag(out, tag.sel, tag.dim, tag.ident, site)
            return out
        if attr in ("T", "mT"):
            t = args[0]
            out = func(*args)
            nd = t.ndim
            perm = list(range(nd))[::-1] if attr == "T" else [*range(nd - 2), nd - 1, nd - 2]
            self._tag(out, tag.sel, perm.index(tag.dim), False, site)
            return out
        _refuse(f"Tensor.{attr}", "it is not known to keep the selected rows apart", site)

    def _pointwise(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, site: str
    ) -> Any:
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            _refuse(name, "its result is not a tensor", site)
        nd = out.ndim
        sel: _Selection | None = None
        dim = -1
        for x in _leaves((args, kwargs)):
            if not isinstance(x, torch.Tensor):
                continue
            tag = self._tag_of(x)
            if tag is None:
                continue
            d = tag.dim + nd - x.ndim
            if sel is None:
                sel, dim = tag.sel, d
            elif tag.sel is not sel:
                _refuse(name, "it combines rows of two different selections", site)
            elif d != dim:
                _refuse(name, "it lines up selected rows with another dim", site)
        assert sel is not None
        for x in _leaves((args, kwargs)):
            if isinstance(x, torch.Tensor) and self._tag_of(x) is None:
                k = dim - (nd - x.ndim)
                if 0 <= k < x.ndim and x.shape[k] != 1:
                    _refuse(
                        name,
                        "it pairs the selected rows with the rows of a full-size tensor "
                        "position by position",
                        site,
                    )
        ident = base in _KEEPS_VALUES and self._tag_of(args[0]) is not None
        ident = ident and self._tags[id(args[0])].ident and not out.dtype.is_floating_point
        if out is args[0] and id(out) in self._tags:
            return out
        self._tag(out, sel, dim, ident, site)
        return out

    def _dim_op(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, site: str
    ) -> Any:
        t = args[0]
        tag = self._tag_of(t)
        if tag is None:
            _refuse(name, "it takes the selected rows as a secondary argument", site)
        pos, default, keeps = _DIM_OPS[base]
        if base in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self._pointwise(name, base, func, args, kwargs, site)
        dim = _arg(args, kwargs, pos, _DIM_KW, default)
        if base in ("std", "var", "std_mean", "var_mean") and isinstance(dim, bool):
            dim = None
        if dim is None or dim == ():
            _refuse(name, "it reduces over the selected rows (all dims)", site)
        dims = [d % t.ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if tag.dim in dims:
            what = "reduces over" if not keeps else "works along"
            _refuse(name, f"it {what} the selected rows (dim {tag.dim})", site)
        keepdim = keeps or bool(_arg(args, kwargs, pos + 1, ("keepdim",), False))
        new = tag.dim if keepdim else tag.dim - sum(d < tag.dim for d in dims)
        out = func(*args, **kwargs)
        for leaf in _leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._tag(leaf, tag.sel, new, False, site)
        return out

    def _last_dims_op(self, name: str, func: Callable, args: tuple, kwargs: dict, site: str) -> Any:
        t = args[0]
        tag = self._tag_of(t)
        shape = _arg(args, kwargs, 1, ("normalized_shape",), None)
        k = 1 if isinstance(shape, int) else len(shape)
        if tag is None or any(self._tag_of(a) is not None for a in args[2:]):
            _refuse(name, "it takes the selected rows as weights", site)
        if tag.dim >= t.ndim - k:
            _refuse(name, f"it normalises over the selected rows (dim {tag.dim})", site)
        out = func(*args, **kwargs)
        self._tag(out, tag.sel, tag.dim, False, site)
        return out

    def _batch_only(self, name: str, func: Callable, args: tuple, kwargs: dict, site: str) -> Any:
        tag = self._tag_of(args[0])
        if tag is None or tag.dim != 0 or any(self._tag_of(a) for a in args[1:]):
            _refuse(name, "it is row-wise only over dim 0 of its input", site)
        out = func(*args, **kwargs)
        self._tag(out, tag.sel, 0, False, site)
        return out

    def _batch_norm(self, name: str, func: Callable, args: tuple, kwargs: dict, site: str) -> Any:
        tag = self._tag_of(args[0])
        training = bool(_arg(args, kwargs, 5, ("training",), False))
        if tag is None or training or tag.dim == 1 or any(self._tag_of(a) for a in args[1:]):
            _refuse(name, "in training mode it reduces over the selected rows", site)
        out = func(*args, **kwargs)
        self._tag(out, tag.sel, tag.dim, False, site)
        return out

    def _matmul(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, site: str
    ) -> Any:
        if base in ("addmm", "baddbmm", "addmv"):
            bias, a, b = args[0], args[1], args[2]
            if self._tag_of(bias) is not None:
                _refuse(name, "it adds the selected rows as its bias", site)
        elif base == "rmatmul":
            b, a = args[0], args[1]
        else:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        ta, tb = self._tag_of(a), self._tag_of(b)
        if base == "linear" and (
            tb is not None or self._tag_of(_arg(args, kwargs, 2, ("bias",), None))
        ):
            _refuse(name, "it uses the selected rows as its weight", site)
        if tb is not None:
            _refuse(
                name,
                "it uses the selected rows as the reduction operand of a matrix product",
                site,
            )
        if ta is None:
            _refuse(name, "it takes the selected rows as a secondary argument", site)
        if a.ndim < 2 or ta.dim == a.ndim - 1:
            _refuse(name, "it contracts over the selected rows", site)
        out = func(*args, **kwargs)
        new = ta.dim + out.ndim - a.ndim if base != "linear" else ta.dim
        if base not in ("linear", "mv", "addmv") and isinstance(b, torch.Tensor) and b.ndim > 2:
            k = new - (out.ndim - b.ndim)
            if 0 <= k < b.ndim - 2 and b.shape[k] != 1:
                _refuse(name, "it pairs the selected rows with a full-size batch", site)
        self._tag(out, ta.sel, new, False, site)
        return out

    def _shape_op(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, site: str
    ) -> Any:
        tag = self._tag_of(args[0]) if args else None
        if base in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            return self._cat(name, base, func, args, kwargs, site)
        if tag is None or any(self._tag_of(x) is not None for x in _leaves((args[1:], kwargs))):
            _refuse(name, "it is not known to keep the selected rows apart", site)
        t = args[0]
        d = tag.dim
        if base in (
            "view",
            "reshape",
            "flatten",
            "unflatten",
            "squeeze",
            "unsqueeze",
            "view_as",
            "reshape_as",
            "ravel",
        ):
            if base in ("view", "reshape") and any(isinstance(a, torch.dtype) for a in args[1:]):
                _refuse(name, "it reinterprets the selected rows' bytes", site)
            out = func(*args, **kwargs)
            new = _same_prefix_dim(t.shape, out.shape, d)
            if new is None:
                _refuse(name, f"it merges or splits the selected rows (dim {d})", site)
            rows = tag.rows
            if rows is not None and t.ndim == 2 and t.shape[1] == 1 and out.ndim == 1:
                rows = _first_of(rows)
            elif rows is not None and tuple(out.shape) != tuple(t.shape):
                rows = None
            self._tag(out, tag.sel, new, tag.ident, site, rows)
            return out
        if base in ("expand", "expand_as", "broadcast_to"):
            out = func(*args, **kwargs)
            self._tag(out, tag.sel, d + out.ndim - t.ndim, tag.ident, site)
            return out
        if base in ("transpose", "swapaxes", "swapdims", "t", "permute", "movedim", "moveaxis"):
            out = func(*args, **kwargs)
            perm = _permutation(base, args, kwargs, t.ndim)
            self._tag(out, tag.sel, perm.index(d), False, site)
            return out
        if base in (
            "split",
            "chunk",
            "tensor_split",
            "split_with_sizes",
            "unbind",
            "narrow",
            "select",
            "flip",
            "roll",
            "tril",
            "triu",
            "repeat",
            "tile",
            "pad",
        ):
            return self._dims_kept(name, base, func, args, kwargs, tag, site)
        _refuse(name, "it is not known to work row by row", site)

    def _dims_kept(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, tag: _Tag, site: str
    ) -> Any:
        t, d = args[0], tag.dim
        nd = t.ndim
        if base in (
            "split",
            "chunk",
            "tensor_split",
            "split_with_sizes",
            "unbind",
            "narrow",
            "select",
        ):
            pos = {"split": 2, "chunk": 2, "tensor_split": 2, "split_with_sizes": 2}.get(base, 1)
            default = 0
            dim = _arg(args, kwargs, pos, _DIM_KW, default) % nd
            if dim == d and base == "unbind" and tag.rows is not None:
                return self._loop_rows(func, args, kwargs, tag, site)
            if dim == d and base == "unbind":
                _refuse(
                    name,
                    f"it iterates over the selected rows one by one (dim {d})",
                    site,
                    hint="a loop over a nonzero() result runs a data-dependent number of "
                    "times; loop over every candidate instead (for e in range(E): idx = "
                    "torch.where(route == e)[0] ...), which splice captures densely",
                )
            if dim == d:
                _refuse(name, f"it cuts the selected rows apart (dim {d})", site)
            new = d - 1 if base in ("unbind", "select") and dim < d else d
        elif base in ("flip", "roll"):
            dims = _arg(args, kwargs, 1 if base == "flip" else 2, ("dims",), None)
            dims = (
                [x % nd for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
                if dims is not None
                else list(range(nd))
            )
            if d in dims:
                _refuse(name, f"it moves the selected rows (dim {d})", site)
            new = d
        elif base in ("tril", "triu"):
            if d >= nd - 2:
                _refuse(name, f"it treats the selected rows as matrix rows (dim {d})", site)
            new = d
        elif base in ("repeat", "tile"):
            reps = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            reps = list(reps)
            k = d + len(reps) - nd
            if len(reps) < nd or reps[k] != 1:
                _refuse(name, f"it repeats the selected rows (dim {d})", site)
            new = k
        else:  # pad
            pad = _arg(args, kwargs, 1, ("pad",), ())
            if d >= nd - len(pad) // 2:
                _refuse(name, f"it pads the selected rows (dim {d})", site)
            new = d
        out = func(*args, **kwargs)
        for leaf in _leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._tag(leaf, tag.sel, new, False, site)
        return out

    def _cat(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, site: str
    ) -> Any:
        seq = list(args[0]) if args else list(kwargs.get("tensors", ()))
        tags = [self._tag_of(x) for x in seq]
        if base not in ("cat", "concat", "concatenate", "stack") or any(x is None for x in tags):
            _refuse(name, "it puts the selected rows next to a full-size tensor", site)
        sels = {id(x.sel) for x in tags if x is not None}
        dims = {x.dim for x in tags if x is not None}
        if len(sels) != 1 or len(dims) != 1:
            _refuse(name, "it combines rows of two different selections", site)
        (d,) = dims
        nd = seq[0].ndim
        dim = _arg(args, kwargs, 1, _DIM_KW, 0)
        if base == "stack":
            dim %= nd + 1
            new = d + 1 if dim <= d else d
        else:
            dim %= nd
            if dim == d:
                _refuse(name, f"it concatenates along the selected rows (dim {d})", site)
            new = d
        out = func(*args, **kwargs)
        assert tags[0] is not None
        self._tag(out, tags[0].sel, new, False, site)
        return out

    # -- gathers and scatters ------------------------------------------------------------

    def _indexing(
        self, name: str, func: Callable, args: tuple, kwargs: dict, counts: list[SelectedCount]
    ) -> Any:
        site = _user_site()
        base = _base_name(name)
        target = args[0] if args else kwargs.get("input", kwargs.get("self"))
        if base == "embedding":
            return self._embedding(name, func, args, kwargs, site)
        if name in ("__getitem__", "__setitem__"):
            index = _index_tuple(args[1])
            if self._tag_of(target) is not None:
                if name == "__setitem__":
                    _refuse(name, "it writes into selected rows", site)
                return self._getitem_tagged(func, target, args[1], index, site)
            tensor_idx = [i for i in index if isinstance(i, torch.Tensor)]
            if counts:
                counts[0]._refuse(f"in an index of a tensor without those rows ({name})")
            if not tensor_idx:
                if name == "__setitem__" and self._tag_of(args[2]) is not None:
                    _refuse(name, "it writes selected rows at full-size positions", site)
                return func(*args, **kwargs)
            if len(tensor_idx) == 1 and _is_bool_tensor(tensor_idx[0]):
                if self._tag_of(tensor_idx[0]) is not None:
                    _refuse(name, "it selects among rows that another selection picked", site)
                if name == "__getitem__":
                    return self._mask_gather(target, index, site)
                return self._mask_scatter(target, index, args[2], site)
            if not any(self._tag_of(i) for i in tensor_idx):
                if name == "__setitem__" and self._tag_of(args[2]) is not None:
                    _refuse(name, "it writes selected rows at full-size positions", site)
                return func(*args, **kwargs)
            if name == "__getitem__":
                return self._gather(target, index, site)
            return self._scatter(name, target, index, args[2], "set", site)
        if counts:
            counts[0]._refuse(f"passed to {name}")
        if base == "index_select":
            dim = _arg(args, kwargs, 1, _DIM_KW, 0)
            idx = _arg(args, kwargs, 2, ("index",), None)
            if self._tag_of(target) is not None:
                return self._shape_like_gather(name, func, args, kwargs, dim, site)
            if self._tag_of(idx) is None:
                return func(*args, **kwargs)
            index = (slice(None),) * (dim % target.ndim) + (idx,)
            return self._gather(target, index, site)
        if base == "gather":
            return self._gather_op(name, func, args, kwargs, site)
        if base in ("index_add", "index_copy"):
            dim = _arg(args, kwargs, 1, _DIM_KW, 0)
            idx = _arg(args, kwargs, 2, ("index",), None)
            src = _arg(args, kwargs, 3, ("source", "tensor"), None)
            if self._tag_of(target) is not None:
                _refuse(name, "it writes into selected rows", site)
            if self._tag_of(idx) is None:
                if self._tag_of(src) is not None:
                    _refuse(name, "it writes selected rows at full-size positions", site)
                return func(*args, **kwargs)
            alpha = kwargs.get("alpha", 1)
            if not name.endswith("_"):
                target = target.clone()
            index = (slice(None),) * (dim % target.ndim) + (idx,)
            mode = "add" if base == "index_add" else "set"
            return self._scatter(name, target, index, src, mode, site, alpha=alpha)
        if base == "index_put":
            indices = _arg(args, kwargs, 1, ("indices",), ())
            values = _arg(args, kwargs, 2, ("values",), None)
            acc = bool(_arg(args, kwargs, 3, ("accumulate",), False))
            if self._tag_of(target) is not None:
                _refuse(name, "it writes into selected rows", site)
            if not any(self._tag_of(i) for i in indices):
                if self._tag_of(values) is not None:
                    _refuse(name, "it writes selected rows at full-size positions", site)
                return func(*args, **kwargs)
            if not name.endswith("_"):
                target = target.clone()
            index = tuple(slice(None) if i is None else i for i in indices)
            return self._scatter(name, target, index, values, "add" if acc else "set", site)
        if base in ("scatter", "scatter_add", "scatter_reduce"):
            return self._scatter_op(name, base, func, args, kwargs, site)
        return func(*args, **kwargs)

    def _getitem_tagged(
        self, func: Callable, t: torch.Tensor, raw: Any, index: tuple, site: str
    ) -> torch.Tensor:
        tag = self._tags[id(t)]
        walk = _walk_index(index, t.ndim)
        if walk is None or any(isinstance(i, torch.Tensor) for i in index):
            _refuse("__getitem__", "it indexes the selected rows with a tensor", site)
        out_pos = walk[tag.dim]
        if out_pos is None or not _full_slice(walk.elements[tag.dim], t.shape[tag.dim]):
            _refuse("__getitem__", f"it picks among the selected rows (dim {tag.dim})", site)
        out = func(t, raw)
        rows = None
        if tag.rows is not None and t.ndim == 2 and tag.dim == 0 and len(index) == 2:
            k = index[1]
            if isinstance(k, int) and not isinstance(k, bool):
                rows = _item_of(tag.rows, k)
        self._tag(out, tag.sel, out_pos, tag.ident, site, rows)
        return out

    def _gather(self, src: torch.Tensor, index: tuple, site: str) -> torch.Tensor:
        """``src[index]`` where the tensor indices carry one selection."""
        sel, tdim, _, new_pos, in_pos, ident = self._advanced(src, index, "__getitem__", site)
        if ident and src.shape[in_pos] == sel.n:
            plain = tuple(slice(None) if isinstance(i, torch.Tensor) else i for i in index)
            trivial = all(isinstance(i, slice) and i == slice(None) for i in plain)
            out = src.clone() if trivial else src[plain].clone()
            self._tag(out, sel, new_pos, False, site)
            return out
        safe = tuple(self._safe(i) if isinstance(i, torch.Tensor) else i for i in index)
        out = src[safe]
        self._tag(out, sel, new_pos + tdim, False, site)
        return out

    def _advanced(
        self, t: torch.Tensor, index: tuple, name: str, site: str
    ) -> tuple[_Selection, int, tuple[int, ...], int, int, bool]:
        """Check the tensor indices of ``index`` on ``t``: (selection, tagged dim of the
        index tensors, their shape, output position of the indexed block, input dim of the
        first tensor index, whether the index is one identity index)."""
        tensors = [(k, i) for k, i in enumerate(index) if isinstance(i, torch.Tensor)]
        tags = [self._tag_of(i) for _, i in tensors]
        if any(x is None for x in tags):
            _refuse(name, "it mixes selected-row indices with full-size index tensors", site)
        sels = {id(x.sel) for x in tags if x is not None}
        shape = tuple(tensors[0][1].shape)
        same = all(tuple(i.shape) == shape for _, i in tensors)
        dims = {x.dim for x in tags if x is not None}
        if len(sels) != 1 or not same or len(dims) != 1:
            _refuse(name, "its index tensors come from different selections or shapes", site)
        walk = _walk_index(index, t.ndim)
        if walk is None:
            _refuse(name, "it uses an index form splice does not know", site)
        ks = [k for k, _ in tensors]
        adjacent = all(isinstance(index[j], (torch.Tensor, int)) for j in range(ks[0], ks[-1] + 1))
        pos = walk.out_before[ks[0]] if adjacent else 0
        first = tags[0]
        assert first is not None
        in_pos = walk.dims_of_elements[ks[0]]
        ident = len(tensors) == 1 and first.ident and tensors[0][1].ndim == 1
        return first.sel, first.dim, shape, pos, in_pos, ident

    def _safe(self, idx: torch.Tensor) -> torch.Tensor:
        """A tagged index with its unselected entries set to 0 (always in range)."""
        tag = self._tags[id(idx)]
        if tag.ident:
            return idx
        return torch.where(_mask_along(tag.sel.mask, idx.ndim, tag.dim), idx, 0)

    def _mask_gather(self, src: torch.Tensor, index: tuple, site: str) -> torch.Tensor:
        p, mask = _bool_position(index, src, site)
        if self._tag_of(src) is not None:
            _refuse("__getitem__", "it selects among rows that another selection picked", site)
        sel = self._selection(mask, site)
        out = src.flatten(p, p + mask.ndim - 1).clone() if mask.ndim > 1 else src.clone()
        self._tag(out, sel, p, False, site)
        return out

    def _mask_scatter(self, out: torch.Tensor, index: tuple, v: Any, site: str) -> None:
        p, mask = _bool_position(index, out, site)
        sel = self._selection(mask, site)
        k = mask.ndim
        flat_shape = (*out.shape[:p], sel.n, *out.shape[p + k :])
        tag = self._tag_of(v)
        if isinstance(v, torch.Tensor):
            if tag is not None and (tag.sel is not sel or tag.dim + len(flat_shape) - v.ndim != p):
                _refuse("__setitem__", "it writes rows of another selection", site)
            j = p - (len(flat_shape) - v.ndim)
            if tag is None and 0 <= j < v.ndim and v.shape[j] != 1:
                _refuse("__setitem__", "it writes a full-size tensor into selected rows", site)
            v = v.expand(flat_shape).unflatten(p, mask.shape) if k > 1 else v.expand(flat_shape)
        m = mask.reshape((1,) * p + tuple(mask.shape) + (1,) * (out.ndim - p - k))
        out.copy_(torch.where(self._gated(m), v, out))

    def _scatter(
        self,
        name: str,
        target: torch.Tensor,
        index: tuple,
        v: Any,
        mode: str,
        site: str,
        *,
        alpha: Any = 1,
    ) -> torch.Tensor:
        """``target[index] = v`` (mode "set") or ``+= alpha * v`` ("add"), masked."""
        sel, tdim, shape, pos, in_pos, ident = self._advanced(target, index, name, site)
        plain = tuple(slice(None) if isinstance(i, torch.Tensor) else i for i in index)
        region_shape = list(target[plain].shape)
        region_shape[pos : pos + 1] = shape  # the indexed dim becomes the index's dims
        row = pos + tdim
        nd = len(region_shape)
        tag = self._tag_of(v)
        if isinstance(v, torch.Tensor):
            if tag is not None and (tag.sel is not sel or tag.dim + nd - v.ndim != row):
                _refuse(name, "it writes rows of another selection or dim", site)
            k = row - (nd - v.ndim)
            if tag is None and 0 <= k < v.ndim and v.shape[k] != 1:
                _refuse(name, "it writes a full-size tensor at selected positions", site)
        elif tag is None and not isinstance(v, (int, float, bool)):
            _refuse(name, f"it writes a {type(v).__name__}", site)
        m = self._gated(_mask_along(sel.mask, nd, row))
        if alpha != 1:
            v = v * alpha
        if ident and target.shape[in_pos] == sel.n:
            # the identity index selects every row: write the target itself, or the view
            # the other index elements make (no view where there is none: backends may
            # turn views into copies)
            trivial = all(isinstance(i, slice) and i == slice(None) for i in plain)
            region = target if trivial else target[plain]
            if mode == "add":
                region.add_(torch.where(m, v, 0))
            else:
                region.copy_(torch.where(m, v, region))
            return target
        if mode == "set":
            _refuse(
                name,
                "it overwrites rows at data-dependent positions that unselected rows could "
                "share (only an identity index or an accumulating write can be masked)",
                site,
            )
        tensors = [i for i in index if isinstance(i, torch.Tensor)]
        if (
            len(tensors) != 1
            or tensors[0].ndim != 1
            or not all(
                isinstance(i, torch.Tensor) or (isinstance(i, slice) and i == slice(None))
                for i in index
            )
        ):
            _refuse(
                name,
                "it accumulates at positions given by several index tensors, or with ints "
                "or partial slices",
                site,
            )
        vm = torch.where(m, v, 0).expand(region_shape)
        target.add_(_one_hot_sum(vm, tensors[0], in_pos, target.shape[in_pos]))
        return target

    def _scatter_op(
        self, name: str, base: str, func: Callable, args: tuple, kwargs: dict, site: str
    ) -> Any:
        target = args[0]
        dim = _arg(args, kwargs, 1, _DIM_KW, 0) % max(target.ndim, 1)
        idx = _arg(args, kwargs, 2, ("index",), None)
        src = _arg(args, kwargs, 3, ("src", "value"), None)
        reduce = _arg(args, kwargs, 4, ("reduce",), None)
        ti, ts = self._tag_of(idx), self._tag_of(src)
        if self._tag_of(target) is not None:
            _refuse(name, "it writes into selected rows", site)
        if ti is None:
            if ts is not None:
                _refuse(name, "it writes selected rows at full-size positions", site)
            return func(*args, **kwargs)
        if ti.dim != dim:
            _refuse(name, f"it scatters along dim {dim}, not along the selected rows", site)
        if isinstance(src, torch.Tensor) and (ts is None or ts.sel is not ti.sel or ts.dim != dim):
            _refuse(name, "it writes values that are not the selected rows", site)
        add = base == "scatter_add" or reduce in ("add", "sum")
        if base == "scatter_reduce" and reduce != "sum":
            _refuse(name, f"reduce={reduce!r} cannot be masked", site)
        if not name.endswith("_"):
            target = target.clone()
        m = self._gated(_mask_along(ti.sel.mask, idx.ndim, dim))
        if not isinstance(src, torch.Tensor):
            src = torch.full(idx.shape, src, dtype=target.dtype, device=target.device)
        src = src[tuple(slice(0, s) for s in idx.shape)]
        if ti.ident and tuple(idx.shape) == tuple(target.shape):
            if add:
                return target.add_(torch.where(m, src, 0))
            return target.copy_(torch.where(m, src, target))
        if not add:
            _refuse(name, "it overwrites rows at data-dependent positions", site)
        moved_t = list(target.shape)
        moved_i = list(idx.shape)
        del moved_t[dim], moved_i[dim]
        if moved_t != moved_i:
            _refuse(name, "its index covers only part of the other dims of its target", site)
        src = torch.where(m, src, 0)
        return target.add_(_one_hot_sum(src, idx, dim, target.shape[dim]))

    def _gather_op(self, name: str, func: Callable, args: tuple, kwargs: dict, site: str) -> Any:
        src = args[0]
        dim = _arg(args, kwargs, 1, _DIM_KW, 0) % max(src.ndim, 1)
        idx = _arg(args, kwargs, 2, ("index",), None)
        ts, ti = self._tag_of(src), self._tag_of(idx)
        if ti is None and ts is None:
            return func(*args, **kwargs)
        if ts is not None:
            if ti is None or ti.sel is not ts.sel or ti.dim != ts.dim or dim == ts.dim:
                _refuse(name, "it gathers across the selected rows", site)
            out = func(*args, **kwargs)
            self._tag(out, ts.sel, ts.dim, False, site)
            return out
        assert ti is not None
        if ti.dim != dim:
            _refuse(name, "it pairs selected-row indices with full-size rows", site)
        if ti.ident and tuple(idx.shape) == tuple(src.shape):
            out = src.clone()
        else:
            out = torch.gather(src, dim, self._safe(idx))
        self._tag(out, ti.sel, dim, False, site)
        return out

    def _shape_like_gather(
        self, name: str, func: Callable, args: tuple, kwargs: dict, dim: int, site: str
    ) -> Any:
        tag = self._tags[id(args[0])]
        idx = _arg(args, kwargs, 2, ("index",), None)
        if dim % args[0].ndim == tag.dim or self._tag_of(idx) is not None:
            _refuse(name, f"it picks among the selected rows (dim {tag.dim})", site)
        out = func(*args, **kwargs)
        self._tag(out, tag.sel, tag.dim, False, site)
        return out

    def _embedding(self, name: str, func: Callable, args: tuple, kwargs: dict, site: str) -> Any:
        ids, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        if self._tag_of(weight) is not None:
            _refuse(name, "it uses the selected rows as its weight", site)
        tag = self._tag_of(ids)
        out = func(*args, **kwargs)
        if tag is not None:
            self._tag(out, tag.sel, tag.dim, False, site)
        return out


# ---------------------------------------------------------------------------------------
# helpers


def _refuse(op: str, why: str, site: str, hint: str = _HINT) -> NoReturn:
    raise CaptureError(
        f"cannot capture `{op}` on the rows a data-dependent selection (nonzero/where(mask)) "
        f"picked: {why}",
        where=site,
        hint=hint,
    )


def _leaves(x: Any) -> list[Any]:
    """Leaves of nested tuples, lists and dicts (their subclasses too, e.g. _Shape)."""
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _leaves(item)]
    if isinstance(x, dict):
        return [y for item in x.values() for y in _leaves(item)]
    return [x]


def _is_pytree(x: Any) -> bool:
    return not isinstance(x, (tuple, list, dict, torch.Tensor))


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return "__get__"
    return name


def _base_name(name: str) -> str:
    if name in _REFLECTED:
        return _REFLECTED[name]
    if name in _DUNDER:
        return _DUNDER[name]
    if name.startswith("__i") and name.endswith("__") and f"__{name[3:]}" in _DUNDER:
        return _DUNDER[f"__{name[3:]}"]
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


def _arg(args: tuple, kwargs: dict, pos: int, names: Sequence[str], default: Any) -> Any:
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return args[pos] if len(args) > pos else default


def _size_args(name: str, args: tuple, kwargs: dict) -> list[Any]:
    """The size list of a view/factory call, flattened from varargs or one sequence."""
    start = 0 if name in ("zeros", "ones", "empty", "full", "randn", "rand") else 1
    if name == "unflatten":
        start = 2
    rest = list(args[start:])
    if "size" in kwargs:
        rest = [kwargs["size"]]
    if name in ("full", "new_full"):
        rest = rest[:1]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    return rest


def _index_tuple(idx: Any) -> tuple:
    return idx if isinstance(idx, tuple) else (idx,)


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def _full_slice(elem: Any, size: int) -> bool:
    if not isinstance(elem, slice):
        return False
    start, stop, step = elem.start, elem.stop, elem.step
    return (
        (start is None or (not isinstance(start, torch.Tensor) and start == 0))
        and (stop is None or isinstance(stop, SelectedCount) or stop >= size)
        and step in (None, 1)
    )


@dataclass
class _Walk:
    """How a basic/advanced index tuple maps input dims to output dims."""

    out_of_dim: dict[int, int | None]  # input dim -> output dim (None: removed)
    elements: dict[int, Any]  # input dim -> the index element applied to it
    dims_of_elements: list[int | None]  # element k -> input dim it applies to
    out_before: list[int]  # element k -> output dims made before it

    def __getitem__(self, dim: int) -> int | None:
        return self.out_of_dim[dim]


def _walk_index(index: tuple, ndim: int) -> _Walk | None:
    consumed = sum(1 if not (i is None or i is Ellipsis) else 0 for i in index) + sum(
        i.ndim - 1 for i in index if _is_bool_tensor(i)
    )
    if consumed > ndim or sum(i is Ellipsis for i in index) > 1:
        return None
    out_of_dim: dict[int, int | None] = {}
    elements: dict[int, Any] = {}
    dims_of: list[int | None] = []
    before: list[int] = []
    d = o = 0
    for elem in index:
        before.append(o)
        if elem is None:
            dims_of.append(None)
            o += 1
        elif elem is Ellipsis:
            dims_of.append(None)
            for _ in range(ndim - consumed):
                out_of_dim[d], elements[d] = o, slice(None)
                d += 1
                o += 1
        elif isinstance(elem, torch.Tensor):
            dims_of.append(d)
            out_of_dim[d], elements[d] = None, elem
            d += 1
        elif isinstance(elem, slice):
            dims_of.append(d)
            out_of_dim[d], elements[d] = o, elem
            d += 1
            o += 1
        elif isinstance(elem, int):
            dims_of.append(d)
            out_of_dim[d], elements[d] = None, elem
            d += 1
        else:
            return None
    while d < ndim:
        out_of_dim[d], elements[d] = o, slice(None)
        d += 1
        o += 1
    return _Walk(out_of_dim, elements, dims_of, before)


def _bool_position(index: tuple, t: torch.Tensor, site: str) -> tuple[int, torch.Tensor]:
    """The first dim a bool-mask index applies to, and the mask; only full slices before
    and after it are supported."""
    p = 0
    mask = None
    for elem in index:
        if _is_bool_tensor(elem):
            mask = elem
            continue
        if mask is None and isinstance(elem, slice) and _full_slice(elem, t.shape[p]):
            p += 1
            continue
        if elem is Ellipsis and mask is not None:
            continue
        if mask is not None and isinstance(elem, slice) and elem == slice(None):
            continue
        _refuse("__getitem__", "a bool mask index is supported only with full slices", site)
    assert mask is not None
    if tuple(t.shape[p : p + mask.ndim]) != tuple(mask.shape):
        _refuse("__getitem__", f"the mask {list(mask.shape)} does not match the indexed dims", site)
    return p, mask


_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
}


def _unravel(i: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(i % size)
        i //= size
    return tuple(reversed(out))


def _coord_of(shape: Sequence[int], a: int) -> Callable[[int], int]:
    return lambda i: _unravel(i, shape)[a]


def _first_of(rows: Callable[[int], Any]) -> Callable[[int], Any]:
    return lambda i: rows(i)[0]


def _item_of(rows: Callable[[int], Any], k: int) -> Callable[[int], Any]:
    return lambda i: rows(i)[k]


def _mutates(name: str) -> bool:
    if name in ("__setitem__", "copy_") or name in _SCATTERS:
        return True
    if name.startswith("__i") and name.endswith("__"):
        return True
    return name.endswith("_") and not name.endswith("__")


def _refuse_loop_value(c: _Cond, what: str) -> NoReturn:
    raise CaptureError(
        f"a value computed inside a loop over a nonzero() result is {what}: splice runs "
        "that loop once per candidate row, so only what each iteration writes back through "
        "a selection (index_add_, out[idx] = v) is exact",
        where=_user_site(),
        hint=f"keep every value made in the loop at {c.loop.site} inside its iteration, and "
        "write results back with index_add_ or out[idx] = v",
    )


def _one_hot_sum(v: torch.Tensor, idx: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The full-size tensor that ``index_add``/``scatter_add`` of ``v`` at ``idx`` along
    ``dim`` adds, as a one-hot product (static shapes, no scatter for backends to import).

    ``idx`` is ``[N]`` (one index per slice of ``v`` along ``dim``) or has ``v``'s shape
    (``scatter_add``, one index per element). Rows of ``v`` that are masked out are zero,
    so whatever their index holds adds nothing.
    """
    n = v.shape[dim]
    v0 = v.movedim(dim, 0)
    positions = torch.arange(size, device=idx.device)
    if idx.ndim == 1:
        hot = (idx.unsqueeze(1) == positions.unsqueeze(0)).to(v.dtype)  # [N, size]
        out = (hot.t() @ v0.reshape(n, -1)).reshape((size, *v0.shape[1:]))
    else:
        i0 = idx.movedim(dim, 0).unsqueeze(1)  # [N, 1, rest...]
        hot = (i0 == positions.view((1, size) + (1,) * (idx.ndim - 1))).to(v.dtype)
        out = (hot * v0.unsqueeze(1)).sum(0)  # [size, rest...]
    return out.movedim(0, dim)


def _mask_along(mask: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """``mask`` ``[N]`` viewed to broadcast along dim ``dim`` of an ``ndim``-dim tensor."""
    shape = [1] * ndim
    shape[dim] = mask.shape[0]
    return mask.view(shape)


def _same_prefix_dim(src: Sequence[int], dst: Sequence[int], d: int) -> int | None:
    """The dim of ``dst`` that holds dim ``d`` of ``src`` whole: same size, same product
    of the dims before it."""
    before = math.prod(src[:d])
    acc = 1
    for k, s in enumerate(dst):
        if acc == before and s == src[d]:
            return k
        acc *= s
    return None


def _permutation(base: str, args: tuple, kwargs: dict, nd: int) -> list[int]:
    """Output dim k holds input dim perm[k]."""
    perm = list(range(nd))
    if base == "t":
        return perm[::-1]
    if base == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
        dims = kwargs.get("dims", dims)
        return [int(x) % nd for x in dims]
    if base in ("movedim", "moveaxis"):
        src = _arg(args, kwargs, 1, ("source",), 0)
        dst = _arg(args, kwargs, 2, ("destination",), 0)
        src = [s % nd for s in (src if isinstance(src, (list, tuple)) else [src])]
        dst = [s % nd for s in (dst if isinstance(dst, (list, tuple)) else [dst])]
        out: list[int | None] = [None] * nd
        for s, t in zip(src, dst):
            out[t] = s
        rest = iter(x for x in range(nd) if x not in src)
        return [x if x is not None else next(rest) for x in out]
    a = _arg(args, kwargs, 1, ("dim0", "axis0"), 0) % nd
    b = _arg(args, kwargs, 2, ("dim1", "axis1"), 1) % nd
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _user_site() -> str:
    """file:line of the innermost frame outside torch and splice's own layers."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith((_TORCH_DIR, "<")) and not name.startswith(_INTERNAL):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return ""


@contextlib.contextmanager
def dense_selections_in(model: nn.Module) -> Iterator[None]:
    """Run ``model.forward`` inside :class:`DenseSelections` (outputs checked) while the
    block runs: wrap a ``torch.export.export(model, ...)`` call in it."""
    had = "forward" in model.__dict__
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with DenseSelections() as dense:
            return dense.check_outputs(original(*args, **kwargs))

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            model.forward = original  # type: ignore[method-assign]
        else:
            del model.forward


__all__ = ["DenseSelections", "SelectedCount", "dense_selections_in"]
