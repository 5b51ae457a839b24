"""parse_ir(text, weights) -> Program: the inverse of :func:`splice.ir.printer.print_ir`.

The parser is a hand-written recursive-descent reader, one statement per line. It never
evaluates Python: ops resolve through ``torch.ops`` and a fixed table of Python callables
(see :data:`splice.ir.shape_prop.PY_OPS`); constants (dtypes, layouts, devices) through a
fixed table too. Weights come from a dict of tensors or a ``.safetensors`` file; each one
must match its ``weight`` declaration.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from splice.errors import ParseError
from splice.ir import meta as M
from splice.ir.program import WEIGHT_KINDS, Program, build_graph_module
from splice.ir.shape_prop import PY_OPS

# Libraries that register custom ops on import, by op namespace: loaded on demand.
OP_PROVIDERS: dict[str, list[str]] = {
    "transformers": ["transformers.integrations.moe"],
    "splice": ["splice.ir.ops"],
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
_NUMBER = re.compile(r"-?(?:inf|nan|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")
_DIMS = re.compile(r"[^\[\]]*")
_LOC = re.compile(r"^# (\S+)(?: @ (\S+):(\d+))?(?: \[([^\]]*)\])?$")
_TORCH_CONSTS: dict[str, Any] = {}
for _n in dir(torch):
    _v = getattr(torch, _n, None)
    if isinstance(_v, (torch.dtype, torch.layout, torch.memory_format)):
        _TORCH_CONSTS[f"torch.{_n}"] = _v

_target_cache: dict[str, Any] = {}


def resolve_target(name: str) -> Any:
    """The op a printed name denotes; ``KeyError`` if there is none."""
    t = _target_cache.get(name)
    if t is not None:
        return t
    if name in PY_OPS:
        t = PY_OPS[name]
    else:
        parts = name.split(".")
        if len(parts) not in (2, 3):
            raise KeyError(name)
        ns, op = parts[0], parts[1]
        if ns == "higher_order":
            t = getattr(torch.ops.higher_order, op)
        else:
            t = _lookup_overload(ns, op, parts[2] if len(parts) == 3 else "default")
    _target_cache[name] = t
    return t


def _lookup_overload(ns: str, op: str, overload: str) -> Any:
    for attempt in range(2):
        try:
            return getattr(getattr(getattr(torch.ops, ns), op), overload)
        except (AttributeError, RuntimeError):
            if attempt == 0:
                for mod in OP_PROVIDERS.get(ns, []):
                    with contextlib.suppress(ImportError):
                        importlib.import_module(mod)
    raise KeyError(f"{ns}.{op}.{overload}")


class _Line:
    """A cursor over one line of text."""

    __slots__ = ("lineno", "pos", "text")

    def __init__(self, text: str, lineno: int):
        self.text = text
        self.pos = 0
        self.lineno = lineno

    def error(self, msg: str) -> ParseError:
        return ParseError(f"{msg} (column {self.pos + 1})", line=self.lineno, text=self.text)

    def ws(self) -> None:
        t, p = self.text, self.pos
        while p < len(t) and t[p] == " ":
            p += 1
        self.pos = p

    def peek(self, s: str) -> bool:
        self.ws()
        return self.text.startswith(s, self.pos)

    def accept(self, s: str) -> bool:
        if self.peek(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.accept(s):
            raise self.error(f"expected {s!r}")

    def regex(self, pat: re.Pattern[str], what: str) -> str:
        self.ws()
        m = pat.match(self.text, self.pos)
        if not m or m.end() == self.pos:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def rest(self) -> str:
        self.ws()
        return self.text[self.pos :]

    def at_end(self) -> bool:
        self.ws()
        return self.pos >= len(self.text) or self.text[self.pos] == "#"


def parse_spec(cur: _Line) -> M.Spec:
    cur.ws()
    if cur.accept("("):
        items = []
        while not cur.accept(")"):
            items.append(parse_spec(cur))
            if not cur.accept(","):
                cur.expect(")")
                break
        return M.TupleSpec(tuple(items))
    if cur.accept("["):
        items = []
        while not cur.accept("]"):
            items.append(parse_spec(cur))
            if not cur.accept(","):
                cur.expect("]")
                break
        return M.TupleSpec(tuple(items), is_list=True)
    word = cur.regex(_NAME, "a spec")
    if word == "none":
        return M.NONE
    if word == "graph":
        cur.expect("(@")
        name = cur.regex(_WNAME, "a graph name")
        cur.expect(")")
        return M.GraphRefSpec(name)
    if word in ("int", "float", "bool") and not cur.text.startswith("[", cur.pos):
        expr = None
        if cur.text.startswith("(", cur.pos):
            cur.pos += 1
            end = _matching(cur.text, cur.pos - 1)
            expr = cur.text[cur.pos : end]
            cur.pos = end + 1
        return M.ScalarSpec(word, expr)
    try:
        dtype = M.dtype_from_name(word)
    except KeyError:
        raise cur.error(f"unknown dtype {word!r}") from None
    if not cur.text.startswith("[", cur.pos):
        raise cur.error("expected '[' after the dtype")
    end = _matching(cur.text, cur.pos)
    body = cur.text[cur.pos + 1 : end]
    cur.pos = end + 1
    dims: list[M.Dim] = []
    for d in _split_top(body):
        d = d.strip()
        if not d:
            continue
        dims.append(int(d) if d.lstrip("-").isdigit() else d)
    return M.TensorSpec(tuple(dims), dtype)


def _matching(text: str, open_pos: int) -> int:
    pairs = {"(": ")", "[": "]"}
    stack = [pairs[text[open_pos]]]
    i = open_pos + 1
    while i < len(text):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
        i += 1
    raise ParseError(f"unbalanced {text[open_pos]!r}", text=text)


def _split_top(body: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, c in enumerate(body):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(body[start:i])
            start = i + 1
    out.append(body[start:])
    return out


class _GraphBuilder:
    """Builds one fx.Graph (a program body or a sub-graph) from its lines."""

    def __init__(self, parser: _Parser, weights_visible: bool, reserved: set[str]):
        self.parser = parser
        self.graph = fx.Graph()
        self.values: dict[str, fx.Node] = {}
        self.attrs: dict[str, fx.Node] = {}
        self.subgraphs: dict[str, fx.GraphModule] = {}
        self.weights_visible = weights_visible
        self.reserved = reserved
        self.output_names: list[str] | None = None
        self._insert_before: fx.Node | None = None

    def attr_node(self, name: str, cur: _Line) -> fx.Node:
        node = self.attrs.get(name)
        if node is not None:
            return node
        if name in self.subgraphs:
            spec: M.Spec = M.GraphRefSpec(name)
        elif self.weights_visible and name in self.parser.weight_specs:
            spec = self.parser.weight_specs[name]
        else:
            raise cur.error(f"@{name} is neither a declared weight nor a sub-graph of this graph")
        base = "_attr_" + re.sub(r"\W", "_", name)
        cand, i = base, 0
        while cand in self.reserved:
            i += 1
            cand = f"{base}_{i}"
        self.reserved.add(cand)
        node = self.graph.create_node("get_attr", name, name=cand)
        M.set_spec(node, spec)
        self.attrs[name] = node
        return node

    def value(self, cur: _Line) -> Any:
        cur.ws()
        t, p = cur.text, cur.pos
        if p >= len(t):
            raise cur.error("expected a value")
        c = t[p]
        if c == "%":
            cur.pos += 1
            name = cur.regex(_NAME, "a value name")
            node = self.values.get(name)
            if node is None:
                raise cur.error(f"%{name} is used before it is defined")
            return node
        if c == "@":
            cur.pos += 1
            return self.attr_node(cur.regex(_WNAME, "a weight name"), cur)
        if c == "[":
            cur.pos += 1
            items = self._seq(cur, "]")
            return items
        if c == "(":
            cur.pos += 1
            items = self._seq(cur, ")")
            return tuple(items)
        if c == '"':
            end = p + 1
            while end < len(t):
                if t[end] == "\\":
                    end += 2
                    continue
                if t[end] == '"':
                    break
                end += 1
            cur.pos = end + 1
            return json.loads(t[p : end + 1])
        if t.startswith("...", p):
            cur.pos += 3
            return Ellipsis
        m = _NUMBER.match(t, p)
        if m and (c.isdigit() or c == "-" or t.startswith(("inf", "nan"), p)):
            s = m.group(0)
            cur.pos = m.end()
            if s in ("inf", "-inf", "nan") or any(ch in s for ch in ".eE"):
                return float(s)
            return int(s)
        word = cur.regex(re.compile(r"[A-Za-z_][A-Za-z0-9_.]*"), "a value")
        if word == "None":
            return None
        if word == "True":
            return True
        if word == "False":
            return False
        if word in _TORCH_CONSTS:
            return _TORCH_CONSTS[word]
        if word == "device":
            cur.expect("(")
            dev = self.value(cur)
            cur.expect(")")
            return torch.device(dev)
        if word == "slice":
            cur.expect("(")
            a = self._seq(cur, ")")
            return slice(*a)
        raise cur.error(f"unknown value {word!r}")

    def _seq(self, cur: _Line, close: str) -> list[Any]:
        items: list[Any] = []
        while not cur.accept(close):
            items.append(self.value(cur))
            if not cur.accept(","):
                cur.expect(close)
                break
        return items

    def call_args(self, cur: _Line) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        cur.expect("(")
        while not cur.accept(")"):
            cur.ws()
            m = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(?!=)").match(cur.text, cur.pos)
            if m:
                cur.pos = m.end()
                kwargs[m.group(1)] = self.value(cur)
            else:
                if kwargs:
                    raise cur.error("positional argument after a keyword argument")
                args.append(self.value(cur))
            if not cur.accept(","):
                cur.expect(")")
                break
        return tuple(args), kwargs


class _Parser:
    def __init__(self, text: str, weights: Mapping[str, torch.Tensor] | None):
        self.lines = text.splitlines()
        self.i = 0
        self.weights = weights
        self.weight_specs: dict[str, M.TensorSpec] = {}
        self.weight_kinds: dict[str, str] = {}
        self.symbols: dict[str, M.SymbolInfo] = {}
        self.attrs: dict[str, Any] = {}

    def next_line(self) -> _Line | None:
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            self.i += 1
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            return _Line(s, self.i)
        return None

    def parse(self) -> Program:
        while True:
            cur = self.next_line()
            if cur is None:
                raise ParseError("no `program @name(...) {` block found")
            if cur.accept("symbol "):
                self._symbol(cur)
            elif cur.accept("weight "):
                self._weight(cur)
            elif cur.accept("attr "):
                name = cur.regex(_NAME, "an attribute name")
                cur.expect("=")
                try:
                    self.attrs[name] = json.loads(cur.rest())
                except json.JSONDecodeError as e:
                    raise cur.error(f"attribute value is not JSON: {e}") from None
            elif cur.accept("program "):
                cur.expect("@")
                name = cur.regex(_NAME, "the program name")
                names = self._reserved_names(self.i)
                gm, builder = self._graph(cur, top=True, reserved=names)
                if self.next_line() is not None:
                    raise ParseError("text after the end of the program block", line=self.i)
                return Program(
                    gm,
                    output_names=builder.output_names,
                    weight_kinds=self.weight_kinds,
                    symbols=self.symbols,
                    name=name,
                    attrs=self.attrs,
                )
            else:
                raise cur.error("expected `symbol`, `weight`, `attr` or `program`")

    def _reserved_names(self, start: int) -> set[str]:
        names: set[str] = set()
        pat = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")
        for line in self.lines[start - 1 :]:
            names.update(pat.findall(line))
        return names

    def _symbol(self, cur: _Line) -> None:
        name = cur.regex(_NAME, "a symbol name")
        m = re.fullmatch(r":\s*hint=(-?\d+)\s+range=\[(-?\d+),(-?\d+|inf)\]", cur.rest())
        if not m:
            raise cur.error("expected `: hint=N range=[lo,hi]`")
        hi = None if m.group(3) == "inf" else int(m.group(3))
        self.symbols[name] = M.SymbolInfo(int(m.group(1)), int(m.group(2)), hi)

    def _weight(self, cur: _Line) -> None:
        cur.expect("@")
        name = cur.regex(_WNAME, "a weight name")
        cur.expect(":")
        spec = parse_spec(cur)
        kind = cur.regex(_NAME, "a weight kind")
        if kind not in WEIGHT_KINDS:
            raise cur.error(f"weight kind {kind!r} is not one of {WEIGHT_KINDS}")
        if not isinstance(spec, M.TensorSpec):
            raise cur.error("a weight must be a tensor")
        if self.weights is None or name not in self.weights:
            raise ParseError(
                f"no value given for weight @{name}",
                line=cur.lineno,
                text=cur.text,
                hint="pass weights=dict or the weights.safetensors file saved with the program",
            )
        t = self.weights[name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise ParseError(
                f"weight @{name} is declared {spec} but the value given is {M.TensorSpec(tuple(t.shape), t.dtype)}",
                line=cur.lineno,
                text=cur.text,
            )
        self.weight_specs[name] = spec
        self.weight_kinds[name] = kind

    def _graph(
        self, cur: _Line, top: bool, reserved: set[str]
    ) -> tuple[fx.GraphModule, _GraphBuilder]:
        b = _GraphBuilder(self, weights_visible=top, reserved=reserved)
        cur.expect("(")
        while not cur.accept(")"):
            cur.expect("%")
            name = cur.regex(_NAME, "an input name")
            cur.expect(":")
            spec = parse_spec(cur)
            node = b.graph.placeholder(name)
            if node.name != name:
                raise cur.error(f"input name %{name} is not usable (duplicate or reserved)")
            M.set_spec(node, spec)
            b.values[name] = node
            if not cur.accept(","):
                cur.expect(")")
                break
        cur.expect("{")
        while True:
            line = self.next_line()
            if line is None:
                raise ParseError("missing `}` at the end of a graph block", line=len(self.lines))
            if line.accept("}"):
                raise line.error("graph block ends without a `return`")
            if line.accept("graph "):
                line.expect("@")
                sub = line.regex(_WNAME, "a graph name")
                sub_gm, _ = self._graph(line, top=False, reserved=reserved)
                b.subgraphs[sub] = sub_gm
                continue
            if line.accept("return"):
                self._return(line, b, top)
                end = self.next_line()
                if end is None or not end.accept("}"):
                    raise ParseError("expected `}` after `return`", line=self.i)
                break
            self._node(line, b)
        weights = {w: (self.weights[w], k) for w, k in self.weight_kinds.items()} if top else {}
        assert self.weights is not None or not weights
        gm = build_graph_module(
            b.graph, weights, b.subgraphs, class_name="Program_main" if top else "SubGraph"
        )
        return gm, b

    def _node(self, cur: _Line, b: _GraphBuilder) -> None:
        cur.expect("%")
        name = cur.regex(_NAME, "a value name")
        cur.expect(":")
        spec = parse_spec(cur)
        cur.expect("=")
        cur.ws()
        if cur.accept("call @"):
            target = cur.regex(_WNAME, "a sub-graph name")
            if target not in b.subgraphs:
                raise cur.error(f"@{target} is not a sub-graph of this graph")
            args, kwargs = b.call_args(cur)
            node = b.graph.create_node("call_module", target, args, kwargs, name=name)
        else:
            opname = cur.regex(re.compile(r"[A-Za-z_<][A-Za-z0-9_.:>]*"), "an op name")
            try:
                target = resolve_target(opname)
            except KeyError:
                raise cur.error(
                    f"unknown op {opname!r}"
                    + (" (import the library that registers it)" if "." in opname else "")
                ) from None
            args, kwargs = b.call_args(cur)
            node = b.graph.create_node("call_function", target, args, kwargs, name=name)
        if node.name != name:
            raise cur.error(f"value name %{name} is defined twice")
        M.set_spec(node, spec)
        rest = cur.rest()
        if rest:
            m = _LOC.match(rest)
            if not m:
                raise cur.error(f"unexpected text {rest!r}")
            passes = tuple(p for p in (m.group(4) or "").split(",") if p)
            path = "" if m.group(1) == "<root>" else m.group(1)
            M.set_loc(
                node, M.Loc(path, m.group(2) or "", int(m.group(3)) if m.group(3) else None, passes)
            )
        b.values[name] = node

    def _return(self, cur: _Line, b: _GraphBuilder, top: bool) -> None:
        if top:
            names, vals = [], []
            while not cur.at_end():
                oname = cur.regex(_NAME, "an output name")
                cur.expect("=")
                names.append(oname)
                vals.append(b.value(cur))
                if not cur.accept(","):
                    break
            b.graph.output(tuple(vals))
            b.output_names = names
        else:
            b.graph.output(b.value(cur))
        if not cur.at_end():
            raise cur.error("unexpected text after `return`")


def parse_ir(text: str, weights: Mapping[str, torch.Tensor] | str | None = None) -> Program:
    """Parse the text form back into a Program.

    ``weights`` is a dict of tensors by weight name, or the path of a ``.safetensors`` file.
    """
    if isinstance(weights, str):
        from safetensors.torch import load_file

        weights = load_file(weights)
    return _Parser(text, weights).parse()


__all__ = ["OP_PROVIDERS", "parse_ir", "parse_spec", "resolve_target"]
