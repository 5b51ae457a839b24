"""parse_ir(text, weights) -> Program: the inverse of :func:`splice.ir.printer.print_ir`.

The parser is a hand-written recursive-descent reader, one statement per line. It never
evaluates Python and never walks attributes by a name the text gives:

* an op name ``ns.op[.overload]`` resolves only if ``ns::op[.overload]`` is an op the
  PyTorch dispatcher has registered (ATen, prims, the splice dialect, and namespaces a
  library registered with ``torch.library``); ``higher_order.name`` only if ``name`` is a
  registered higher-order operator; a fixed table covers Python callables on sizes (see
  :data:`splice.ir.shape_prop.PY_OPS`). Anything else is a :class:`ParseError` naming the
  line, so a saved program cannot reach ``torch.ops.load_library`` or ``import_module``;
* constants (dtypes, layouts, devices) come from a fixed table too;
* value names that are Python keywords, builtins or names the generated ``forward`` code
  uses (``self``, ``torch``, ``device``, ``inf``...) are rejected with the reason;
* nesting of literals, specs and sub-graphs is bounded (:data:`MAX_NESTING`).

Every failure is a :class:`ParseError` with the line number. Weights come from a dict of
tensors or a ``.safetensors`` file; each one must match its ``weight`` declaration.
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

from splice.errors import ArtifactError, ParseError, SpliceError
from splice.ir import meta as M
from splice.ir.program import WEIGHT_KINDS, Program, build_graph_module
from splice.ir.shape_prop import PY_OPS
from splice.ir.verify import reserved_name_reason

# How deeply literals, specs and sub-graphs may nest (real programs use 2-3 levels).
MAX_NESTING = 100

# Registered ops a saved program may still not call: they reach outside the program's
# tensors (``from_file`` reads a file the text names).
DENIED_OPS = frozenset({"aten::from_file"})

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
_registered_ops: set[str] = set()
_OP_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def resolve_target(name: str) -> Any:
    """The op a printed name denotes; ``KeyError`` if there is none.

    ``name`` is looked up as a whole in the dispatcher's registry (or the higher-order
    operator registry, or :data:`PY_OPS`); no attribute named by the text is traversed
    before the name is known to be a registered op.
    """
    t = _target_cache.get(name)
    if t is not None:
        return t
    if name in PY_OPS:
        t = PY_OPS[name]
    else:
        parts = name.split(".")
        if len(parts) not in (2, 3) or not all(_plain_part(p) for p in parts):
            raise KeyError(name)
        ns, op = parts[0], parts[1]
        if ns == "higher_order":
            if len(parts) != 2:
                raise KeyError(name)
            t = _higher_order_op(op)
        else:
            t = _lookup_overload(ns, op, parts[2] if len(parts) == 3 else "default")
    _target_cache[name] = t
    return t


def _plain_part(part: str) -> bool:
    """A name component that can be an op namespace, op or overload (ATen has ``__and__``)."""
    return bool(_OP_PART.fullmatch(part))


def _higher_order_op(name: str) -> Any:
    op = torch._ops._higher_order_ops.get(name)
    if not isinstance(op, torch._ops.HigherOrderOperator):
        raise KeyError(f"higher_order.{name}")
    return op


def is_registered_op(qualified: str) -> bool:
    """Whether the dispatcher knows ``ns::op`` or ``ns::op.overload`` (refreshed on a miss)."""
    if qualified not in _registered_ops:
        _registered_ops.update(torch._C._dispatch_get_all_op_names())
    return qualified in _registered_ops


def _lookup_overload(ns: str, op: str, overload: str) -> Any:
    qualified = f"{ns}::{op}" if overload == "default" else f"{ns}::{op}.{overload}"
    if qualified in DENIED_OPS:
        raise KeyError(qualified)
    if not is_registered_op(qualified):
        for mod in OP_PROVIDERS.get(ns, []):
            with contextlib.suppress(ImportError):
                importlib.import_module(mod)
        if not is_registered_op(qualified):
            raise KeyError(qualified)
    # The name is a registered op, so torch.ops resolves it through the dispatcher; the
    # type checks keep a namespace that shadows an attribute of torch.ops from resolving.
    try:
        namespace = getattr(torch.ops, ns)
        packet = getattr(namespace, op) if isinstance(namespace, torch._ops._OpNamespace) else None
        t = getattr(packet, overload) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    except (AttributeError, RuntimeError):
        t = None
    if not isinstance(t, torch._ops.OpOverload):
        raise KeyError(qualified)
    return t


class _Line:
    """A cursor over one line of text."""

    __slots__ = ("lineno", "pos", "text")

    def __init__(self, text: str, lineno: int):
        self.text = text
        self.pos = 0
        self.lineno = lineno

    def error(self, msg: str, hint: str | None = None) -> ParseError:
        text = self.text if len(self.text) <= 200 else self.text[:200] + " ..."
        return ParseError(f"{msg} (column {self.pos + 1})", line=self.lineno, text=text, hint=hint)

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


def parse_spec(cur: _Line, depth: int = 0) -> M.Spec:
    """One spec (``f32[2,s]``, ``(spec, ...)``, ``[spec, ...]``, ``int(s)``, ``none``...)."""
    cur.ws()
    if depth > MAX_NESTING:
        raise cur.error(f"specs nest deeper than {MAX_NESTING} levels")
    if cur.accept("("):
        items = []
        while not cur.accept(")"):
            items.append(parse_spec(cur, depth + 1))
            if not cur.accept(","):
                cur.expect(")")
                break
        return M.TupleSpec(tuple(items))
    if cur.accept("["):
        items = []
        while not cur.accept("]"):
            items.append(parse_spec(cur, depth + 1))
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
            end = _matching_at(cur, cur.pos - 1)
            expr = cur.text[cur.pos : end]
            cur.pos = end + 1
        return M.ScalarSpec(word, expr)
    try:
        dtype = M.dtype_from_name(word)
    except KeyError:
        raise cur.error(f"unknown dtype {word!r}") from None
    if not cur.text.startswith("[", cur.pos):
        raise cur.error("expected '[' after the dtype")
    end = _matching_at(cur, cur.pos)
    body = cur.text[cur.pos + 1 : end]
    cur.pos = end + 1
    dims: list[M.Dim] = []
    for d in _split_top(body):
        d = d.strip()
        if not d:
            continue
        dims.append(int(d) if d.lstrip("-").isdigit() else d)
    return M.TensorSpec(tuple(dims), dtype)


def _matching_at(cur: _Line, open_pos: int) -> int:
    """:func:`_matching` on the cursor's line; an unbalanced bracket names the line."""
    end = _matching(cur.text, open_pos)
    if end < 0:
        cur.pos = open_pos
        raise cur.error(f"unbalanced {cur.text[open_pos]!r}")
    return end


def _matching(text: str, open_pos: int) -> int:
    """The index of the bracket closing the one at ``open_pos``; -1 if it is not closed."""
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
    return -1


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


def _string(cur: _Line) -> str:
    """A JSON string literal starting at the cursor."""
    t, p = cur.text, cur.pos
    end = p + 1
    while end < len(t):
        if t[end] == "\\":
            end += 2
            continue
        if t[end] == '"':
            break
        end += 1
    if end >= len(t):
        raise cur.error("unterminated string literal")
    try:
        value = json.loads(t[p : end + 1])
    except json.JSONDecodeError as e:
        cur.pos = p + e.pos
        raise cur.error(f"bad string literal: {e.msg}") from None
    cur.pos = end + 1
    return value


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
        self._depth = 0

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
        if c in "[(":
            cur.pos += 1
            items = self._seq(cur, "]" if c == "[" else ")")
            return items if c == "[" else tuple(items)
        if c == '"':
            return _string(cur)
        if t.startswith("...", p):
            cur.pos += 3
            return Ellipsis
        m = _NUMBER.match(t, p)
        if m and (c.isdigit() or c == "-" or t.startswith(("inf", "nan"), p)):
            s = m.group(0)
            cur.pos = m.end()
            try:
                if s in ("inf", "-inf", "nan") or any(ch in s for ch in ".eE"):
                    return float(s)
                return int(s)
            except ValueError as e:  # e.g. more digits than Python converts
                cur.pos = p
                raise cur.error(f"bad number {s[:40]!r}: {e}") from None
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
            try:
                return torch.device(dev)
            except (RuntimeError, TypeError, ValueError) as e:
                raise cur.error(f"bad device {dev!r}: {e}") from None
        if word == "slice":
            cur.expect("(")
            a = self._seq(cur, ")")
            if len(a) != 3:
                raise cur.error(f"slice(...) takes start, stop and step, got {len(a)} values")
            return slice(*a)
        raise cur.error(f"unknown value {word!r}")

    def _seq(self, cur: _Line, close: str) -> list[Any]:
        if self._depth >= MAX_NESTING:
            raise cur.error(f"values nest deeper than {MAX_NESTING} levels")
        self._depth += 1
        try:
            items: list[Any] = []
            while not cur.accept(close):
                items.append(self.value(cur))
                if not cur.accept(","):
                    cur.expect(close)
                    break
            return items
        finally:
            self._depth -= 1

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


def _unknown_op_hint(opname: str) -> str:
    parts = opname.split(".")
    if len(parts) not in (2, 3) or not all(_plain_part(p) for p in parts):
        return (
            "an op is written namespace.op or namespace.op.overload and must be registered "
            "(aten, prims, splice, higher_order, or a torch.library namespace)"
        )
    ns = parts[0]
    if ns == "higher_order" or any(q.startswith(f"{ns}::") for q in _registered_ops):
        return f"the op namespace {ns!r} has no such op or overload; check the spelling"
    return f"no op namespace {ns!r} is registered; import the library that registers it"


def _check_new_name(cur: _Line, b: _GraphBuilder, name: str, what: str) -> None:
    """Reject a value name that is taken or that the generated Python code cannot use."""
    cur.pos -= len(name)  # errors point at the name
    if name in b.values:
        raise cur.error(f"{what} name %{name} is defined twice")
    reason = reserved_name_reason(name)
    if reason is not None:
        raise cur.error(
            f"{what} name %{name} cannot be used: it {reason}", hint=f"rename it, e.g. %{name}_"
        )
    cur.pos += len(name)


def _check_given_name(cur: _Line, node: fx.Node, name: str, what: str) -> None:
    """torch.fx kept the name the text gave (it renames names its generated code needs)."""
    if node.name != name:
        raise cur.error(
            f"{what} name %{name} cannot be used: torch.fx renamed it to %{node.name} "
            "(it clashes with a name the generated code uses)",
            hint=f"rename it, e.g. %{name}_",
        )


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
                except (json.JSONDecodeError, RecursionError, ValueError) as e:
                    raise cur.error(f"attribute value is not JSON: {e}") from None
            elif cur.accept("program "):
                cur.expect("@")
                name = cur.regex(_NAME, "the program name")
                names = self._reserved_names(self.i)
                gm, builder = self._graph(cur, top=True, reserved=names, depth=0)
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
        self, cur: _Line, top: bool, reserved: set[str], depth: int
    ) -> tuple[fx.GraphModule, _GraphBuilder]:
        if depth > MAX_NESTING:
            raise cur.error(f"sub-graphs nest deeper than {MAX_NESTING} levels")
        b = _GraphBuilder(self, weights_visible=top, reserved=reserved)
        cur.expect("(")
        while not cur.accept(")"):
            cur.expect("%")
            name = cur.regex(_NAME, "an input name")
            _check_new_name(cur, b, name, "input")
            cur.expect(":")
            spec = parse_spec(cur)
            node = b.graph.placeholder(name)
            _check_given_name(cur, node, name, "input")
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
                sub_gm, _ = self._graph(line, top=False, reserved=reserved, depth=depth + 1)
                b.subgraphs[sub] = sub_gm
                continue
            if line.accept("return"):
                self._return(line, b, top)
                end = self.next_line()
                if end is None or not end.accept("}"):
                    raise ParseError("expected `}` after `return`", line=self.i)
                break
            if line.text.split("#", 1)[0].strip() == "part":
                part = self.next_line()
                if part is None or not part.text.startswith("%"):
                    raise line.error("`part` must stand before a value line (`%name : ...`)")
                self._node(part, b)
                M.mark_part_start(next(reversed(b.graph.nodes)))
                continue
            self._node(line, b)
        weights = {w: (self.weights[w], k) for w, k in self.weight_kinds.items()} if top else {}
        assert self.weights is not None or not weights
        try:
            gm = build_graph_module(
                b.graph, weights, b.subgraphs, class_name="Program_main" if top else "SubGraph"
            )
        except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
            raise ParseError(
                f"cannot build the graph that starts here: {type(e).__name__}: {e}",
                line=cur.lineno,
                text=cur.text,
                hint="a weight or sub-graph name clashes with an attribute of the module "
                "(forward, graph, code, to, ...) or is not a dotted name; rename it",
            ) from None
        return gm, b

    def _node(self, cur: _Line, b: _GraphBuilder) -> None:
        cur.expect("%")
        name = cur.regex(_NAME, "a value name")
        _check_new_name(cur, b, name, "value")
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
                cur.pos -= len(opname)
                raise cur.error(f"unknown op {opname!r}", hint=_unknown_op_hint(opname)) from None
            args, kwargs = b.call_args(cur)
            node = b.graph.create_node("call_function", target, args, kwargs, name=name)
        _check_given_name(cur, node, name, "value")
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
                if oname in names:
                    cur.pos -= len(oname)
                    raise cur.error(
                        f"output name {oname!r} is given twice",
                        hint="outputs are looked up by name; give each output its own name",
                    )
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
        weights = _load_weights_file(weights)
    parser = _Parser(text, weights)
    try:
        return parser.parse()
    except SpliceError:
        raise
    except RecursionError:
        raise ParseError("the program nests too deeply to parse", line=parser.i or None) from None
    except Exception as e:  # anything a damaged text reaches is a parse error with its line
        line = parser.i if 0 < parser.i <= len(parser.lines) else None
        raise ParseError(
            f"cannot parse the program: {type(e).__name__}: {e}",
            line=line,
            text=parser.lines[line - 1] if line else None,
        ) from e


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"cannot read the weights file {path}: {e}") from e


__all__ = [
    "DENIED_OPS",
    "MAX_NESTING",
    "OP_PROVIDERS",
    "is_registered_op",
    "parse_ir",
    "parse_spec",
    "resolve_target",
]
