"""Pipeline text: ``"cse,lowrank{method=whitened,ratio=0.5},dce"`` -> pipeline entries.

:func:`parse_entries` reads the text into :class:`~splice.passes.base.PipelineEntry`
values; :func:`splice.passes.parse_pipeline` wraps them into a runnable
:class:`~splice.passes.manager.Pipeline`. Grammar (xDSL/MLIR style, flat)::

    pipeline := pass ("," pass)*
    pass     := NAME ["{" [option ("," option)*] "}"]
    option   := KEY "=" value
    value    := "[" [value ("," value)*] "]" | QUOTED | BARE

Option values are converted by the type of the pass's dataclass field (bool, int, float,
str, Literal choices, tuples/lists of those, ``| None``). ``str(pipeline)`` prints the
options that were given, canonically formatted, so parse → print → parse is stable.
Unknown passes and bad options raise :class:`~splice.errors.PipelineError` listing what
exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

from splice.errors import PipelineError
from splice.passes.base import Pass, PipelineEntry, enum_values, format_value
from splice.passes.registry import available_passes, get_pass_class

_BARE = re.compile(r"[^,{}\[\]=\s\"']+")


# ---------------------------------------------------------------------------------------
# parsing


class _Cursor:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, msg: str, hint: str | None = None) -> PipelineError:
        pointer = " " * self.pos + "^"
        return PipelineError(
            f"{msg} at column {self.pos + 1}\n    {self.text}\n    {pointer}", hint=hint
        )

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def accept(self, c: str) -> bool:
        if self.peek() == c:
            self.pos += 1
            return True
        return False

    def expect(self, c: str) -> None:
        if not self.accept(c):
            raise self.error(f"expected {c!r}")

    def name(self) -> str:
        self.ws()
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*").match(self.text, self.pos)
        if not m:
            raise self.error("expected a pass or option name")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> Any:
        c = self.peek()
        if c == "[":
            self.pos += 1
            items = []
            if not self.accept("]"):
                while True:
                    items.append(self.value())
                    if self.accept("]"):
                        break
                    self.expect(",")
            return items
        if c in "\"'":
            end = self.text.find(c, self.pos + 1)
            if end < 0:
                raise self.error("unterminated quoted value")
            s = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return _Quoted(s)
        m = _BARE.match(self.text, self.pos)
        if not m:
            raise self.error("expected an option value")
        self.pos = m.end()
        return m.group(0)


class _Quoted(str):
    """A value that was quoted in the text: always a string."""


def parse_entries(text: str) -> list[PipelineEntry]:
    """Parse pipeline text into its entries (see the module docstring); PipelineError
    points at the column."""
    cur = _Cursor(text)
    entries: list[PipelineEntry] = []
    if not text.strip():
        return []
    while True:
        start = cur.pos
        name = cur.name()
        try:
            cls = get_pass_class(name)
        except PipelineError as e:
            cur.pos = start
            raise cur.error(e.message, hint=e.hint) from None
        raw: dict[str, Any] = {}
        if cur.accept("{") and not cur.accept("}"):
            while True:
                kpos = cur.pos
                key = cur.name()
                cur.expect("=")
                if key in raw:
                    cur.pos = kpos
                    raise cur.error(f"option {key!r} given twice")
                raw[key] = (cur.value(), kpos)
                if cur.accept("}"):
                    break
                cur.expect(",")
        # check what follows before building: `lowrank}ratio=0.5` is a stray brace, not a
        # lowrank without options
        nxt = cur.peek()
        if nxt not in ("", ","):
            hint = (
                f"options go in braces right after the pass name: {name}{{key=value,...}}"
                if nxt in "}=" else "separate passes with ','"
            )  # fmt: skip
            raise cur.error(f"unexpected {nxt!r} after pass {name!r}", hint=hint)
        end = cur.pos
        try:
            entries.append(PipelineEntry(_build(cls, raw, cur), tuple(raw)))
        except PipelineError as e:
            if "at column" in e.message or e.where:
                raise
            # the pass's own validation: its message stays, `where` points at the pass
            raise PipelineError(
                e.message, where=f"pass {name!r} at column {start + 1} of {text!r}", hint=e.hint
            ) from None
        cur.pos = end
        if cur.peek() == "":
            break
        cur.expect(",")
    return entries


def make_pass(name: str, **options: Any) -> Pass:
    """Build a pass by name from Python values (the programmatic twin of the text form)."""
    cls = get_pass_class(name)
    _check_option_names(cls, options)
    try:
        return cls(**options)
    except PipelineError:
        raise
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{name}: {e}") from e


def _check_option_names(
    cls: type[Pass], options: dict[str, Any], cur: _Cursor | None = None
) -> None:
    types_ = cls.option_types()
    for key in options:
        if key not in types_:
            listing = (
                ", ".join(f"{k}: {_type_name(t)}" for k, t in types_.items()) or "(no options)"
            )
            msg = f"pass {cls.name!r} has no option {key!r}"
            hint = f"options of {cls.name}: {listing}"
            if cur is not None:
                cur.pos = options[key][1]
                raise cur.error(msg, hint=hint)
            raise PipelineError(msg, hint=hint)


def _build(cls: type[Pass], raw: dict[str, Any], cur: _Cursor) -> Pass:
    _check_option_names(cls, raw, cur)
    types_ = cls.option_types()
    kwargs = {}
    for key, (val, pos) in raw.items():
        try:
            kwargs[key] = convert_option(val, types_[key])
        except ValueError as e:
            cur.pos = pos
            raise cur.error(f"{cls.name}: option {key}: {e}") from None
    try:
        return cls(**kwargs)
    except PipelineError:
        raise
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{cls.name}: {e}") from e


def _type_name(tp: Any) -> str:
    choices = enum_values(tp)
    if choices is not None:
        return "|".join(choices)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        optional = "?" if len(rest) < len(args) else ""
        return " | ".join(_type_name(a) for a in rest) + optional
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"[{_type_name(args[0]) if args else 'any'},...]"
    return getattr(tp, "__name__", str(tp))


def convert_option(val: Any, tp: Any) -> Any:
    """Convert a parsed option value to the field type ``tp``; ValueError says what is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if (
            type(None) in args
            and isinstance(val, str)
            and not isinstance(val, _Quoted)
            and val.lower() == "none"
        ):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_option(val, a)
            except ValueError as e:
                errors.append(str(e))
        if len(errors) == 1:  # `float | None`: the float's own reason ("not a finite number")
            raise ValueError(errors[0] + (" (or none)" if type(None) in args else ""))
        raise ValueError(f"{_show(val)} is not a {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if str(c) == str(val) and not isinstance(val, list):
                return c
        raise ValueError(f"{_show(val)} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_t = args[0] if args else Any
        items = val if isinstance(val, list) else [val]
        conv = [convert_option(x, item_t) if item_t is not Any else x for x in items]
        return tuple(conv) if origin is tuple else conv
    if isinstance(val, list):
        raise ValueError(f"expected a single {_type_name(tp)}, got a list")
    s = str(val)
    if tp is bool:
        if s.lower() in ("true", "1", "yes", "on"):
            return True
        if s.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{_show(val)} is not a bool (true|false)")
    if tp is int:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"{_show(val)} is not an int") from None
    if tp is float:
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"{_show(val)} is not a float") from None
        if not math.isfinite(f):
            raise ValueError(f"{_show(val)} is not a finite number")
        return f
    if tp is str or tp is Any:
        return str(val)
    raise ValueError(f"unsupported option type {tp}")


def _show(v: Any) -> str:
    return repr(str(v)) if not isinstance(v, list) else repr(v)


def describe_passes() -> list[dict[str, Any]]:
    """Name, semantics, summary and options of every registered pass (for docs and the CLI)."""
    out = []
    for name, cls in available_passes().items():
        opts = []
        for f in cls.options():
            default = f.default if f.default is not dataclasses.MISSING else None
            opts.append(
                {
                    "name": f.name,
                    "type": _type_name(cls.option_types()[f.name]),
                    "default": format_value(default),
                }
            )
        out.append(
            {"name": name, "semantics": cls.semantics, "summary": cls.summary, "options": opts}
        )
    return out


__all__ = ["convert_option", "describe_passes", "make_pass", "parse_entries"]
