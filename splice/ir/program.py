"""Program: what a model *is* inside splice.

A :class:`Program` wraps an ``fx.GraphModule`` at ATen level with

* a flat signature — named tensor inputs (the graph's placeholders, in order) and named
  outputs (the output node returns a flat tuple);
* named weights — parameters, buffers and constants, referenced from the graph by
  ``get_attr`` nodes whose targets are their state_dict names;
* sub-graphs — child ``GraphModule``\\ s used by control-flow ops (``torch.cond``) and,
  later, by split parts; weights live only in the top-level program and reach sub-graphs
  as operands, as ``torch.export`` does;
* symbols — the symbolic dimensions of dynamic shapes, with hints and ranges;
* a ``version`` that changes on every edit, so that analyses can be cached by version.

A Program is always runnable: ``program(*inputs)`` executes it eagerly with PyTorch and
returns one tensor for a one-output program, a tuple otherwise — or, where the program
records the model's output structure (constants beside the tensors, or a structure that
depends on the data-dependent path: :mod:`splice.ir.outputs`), that structure.
:meth:`Program.run` always returns the flat list and :meth:`Program.unflatten` rebuilds.

Weights are treated as immutable values: passes replace a weight, they never write into
its storage, so :meth:`Program.copy` shares weight tensors and costs only a graph copy.
"""

from __future__ import annotations

import copy as _copy
import functools
import itertools
import keyword
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from splice.errors import VerificationError
from splice.ir import meta as M
from splice.ir.output_tree import rename_in_attrs
from splice.ir.output_tree import unflatten as unflatten_outputs

WeightKind = Literal["param", "buffer", "constant"]
WEIGHT_KINDS: tuple[str, ...] = ("param", "buffer", "constant")

_uids = itertools.count()
# Versions are drawn from one counter for all programs: two programs with the same version
# are a program and its unedited copy, so (version) alone keys analysis caches.
_versions = itertools.count(1)


# ---------------------------------------------------------------------------------------
# weight names
#
# A weight is an attribute path of the program's GraphModule (``h.0.attn.c_attn.weight``):
# the first part is an attribute of the GraphModule itself, the others of the plain
# nn.Modules that hold them. A part that is already an attribute there (``to``, ``forward``,
# ``graph``, ``code``, ``meta``, ``training``), a Python keyword (FX writes ``self.a.def``)
# or not an identifier/number cannot be a weight name. :func:`weight_name_problem` says why
# a name is unusable; :func:`safe_weight_name` turns any text into a usable name and
# :meth:`Program.unique_weight_name` into a fresh one — the one helper passes and capture
# use for the weight names splice generates.


@functools.cache
def _module_reserved() -> frozenset[str]:
    """Attribute names every nn.Module has (methods, properties, instance state)."""
    return frozenset(dir(nn.Module)) | frozenset(vars(nn.Module()))


@functools.cache
def _root_reserved() -> frozenset[str]:
    """Attribute names a Program's GraphModule has (nn.Module's and GraphModule's own)."""
    g = fx.Graph()
    g.output(g.placeholder("x"))
    names = set(_module_reserved())
    for cls in (fx.GraphModule, graph_module_cls()):
        names |= set(dir(cls))
        gm = cls(nn.Module(), g)
        names |= set(vars(gm))
        gm.recompile()
        names |= set(vars(gm))
    return frozenset(names)


_PART = re.compile(r"[A-Za-z0-9_]+")  # FX reads non-identifier parts (`0`, `0_1`) by getattr


def weight_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a weight of a Program, or None when it can.

    Parts are dot-separated; each must be made of ASCII letters, digits and ``_`` (FX reads
    a part that is not an identifier, ``0`` or ``0_1``, with getattr), not a Python keyword, and not an attribute that the GraphModule (first part) or an nn.Module (the
    other parts) already has.
    """
    if not name:
        return "the name is empty"
    for i, part in enumerate(name.split(".")):
        if not part:
            return "it has an empty part (`..`, or a leading or trailing dot)"
        if not _PART.fullmatch(part):
            return f"part {part!r} has characters other than letters, digits and '_'"
        if keyword.iskeyword(part):
            return f"part {part!r} is a Python keyword"
        if i == 0 and part in _root_reserved():
            return f"part {part!r} is an attribute of torch.fx.GraphModule"
        if i > 0 and part in _module_reserved():
            return f"part {part!r} is an attribute of torch.nn.Module"
    return None


def safe_weight_name(base: str) -> str:
    """A usable weight name close to ``base`` (not necessarily fresh; see
    :meth:`Program.unique_weight_name`): empty parts are dropped, other characters become
    ``_``, and parts that clash with attributes or keywords get a trailing ``_``."""
    parts = [p for p in base.split(".") if p]
    out: list[str] = []
    for i, part in enumerate(parts):
        part = re.sub(r"[^A-Za-z0-9_]", "_", part)
        reserved = _root_reserved() if i == 0 else _module_reserved()
        while keyword.iskeyword(part) or part in reserved:
            part += "_"
        out.append(part)
    return ".".join(out) or "w"


# ---------------------------------------------------------------------------------------
# dotted attribute helpers


def get_attr_path(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_weight_attr(module: nn.Module, target: str, value: torch.Tensor, kind: str) -> None:
    *prefix, leaf = target.split(".")
    owner = module
    for part in prefix:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    for store in (owner._parameters, owner._buffers):
        store.pop(leaf, None)
    if kind == "param":
        p = (
            value
            if isinstance(value, nn.Parameter)
            else nn.Parameter(value, requires_grad=value.is_floating_point())
        )
        owner.register_parameter(leaf, p)
    else:
        owner.register_buffer(
            leaf,
            value.detach() if isinstance(value, nn.Parameter) else value,
            persistent=(kind == "buffer"),
        )


def del_attr_path(module: nn.Module, target: str) -> None:
    *prefix, leaf = target.split(".")
    owners = [module]
    for part in prefix:
        owners.append(owners[-1]._modules[part])
    owner = owners[-1]
    for store in (owner._parameters, owner._buffers, owner._modules):
        store.pop(leaf, None)
    # drop containers that became empty
    for parent, part, child in reversed(list(zip(owners[:-1], prefix, owners[1:]))):
        if child._parameters or child._buffers or child._modules:
            break
        parent._modules.pop(part, None)


# ---------------------------------------------------------------------------------------


class Program:
    """An FX graph at ATen level plus its signature, weights, symbols and version."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        *,
        output_names: Sequence[str] | None = None,
        weight_kinds: Mapping[str, str] | None = None,
        symbols: Mapping[str, M.SymbolInfo] | None = None,
        name: str = "main",
        attrs: Mapping[str, Any] | None = None,
    ):
        self._gm = graph_module
        self.name = name
        self.symbols: dict[str, M.SymbolInfo] = dict(symbols or {})
        #: free-form program attributes that passes may set (e.g. the rank option of lowrank)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self._uid = next(_uids)
        self._version = next(_versions)
        self._compiled_version = -1
        self._weight_kinds: dict[str, str] = {}
        if weight_kinds is None:
            weight_kinds = {n: "param" for n, _ in graph_module.named_parameters()}
            weight_kinds.update({n: "buffer" for n, _ in graph_module.named_buffers()})
        for n, k in weight_kinds.items():
            if k not in WEIGHT_KINDS:
                raise ValueError(f"weight {n!r}: kind {k!r} is not one of {WEIGHT_KINDS}")
            self._weight_kinds[n] = k
        outs = self._output_values_raw()
        if output_names is None:
            output_names = [f"out{i}" for i in range(len(outs))]
        if len(output_names) != len(outs):
            raise ValueError(f"{len(output_names)} output names for {len(outs)} outputs")
        self._output_names = list(output_names)
        for gm in self._all_graph_modules():
            self._install_hooks(gm)

    # -- identity and versioning -------------------------------------------------------
    @property
    def uid(self) -> int:
        """Unique per Program object (copies get a new one)."""
        return self._uid

    @property
    def version(self) -> int:
        """Changes on every edit of the graph, the signature or the weights.

        Unique across programs: a copy keeps the version of its source until either is edited.
        """
        return self._version

    def bump_version(self) -> None:
        self._version = next(_versions)

    def _install_hooks(self, gm: fx.GraphModule) -> None:
        def on_change(*_args: Any, **_kwargs: Any) -> None:
            self._version = next(_versions)

        gm._register_create_node_hook(on_change)
        gm._register_erase_node_hook(on_change)
        gm._register_replace_node_hook(on_change)

    def _all_graph_modules(self) -> Iterator[fx.GraphModule]:
        stack = [self._gm]
        while stack:
            gm = stack.pop()
            yield gm
            stack.extend(m for m in gm.children() if isinstance(m, fx.GraphModule))

    # -- structure ---------------------------------------------------------------------
    @property
    def graph_module(self) -> fx.GraphModule:
        return self._gm

    @property
    def graph(self) -> fx.Graph:
        return self._gm.graph

    @property
    def nodes(self) -> fx.graph._node_list:
        return self._gm.graph.nodes

    def node(self, name: str) -> fx.Node:
        """The node named ``name``; ``KeyError`` listing close names if there is none."""
        for n in self._gm.graph.nodes:
            if n.name == name:
                return n
        close = [n.name for n in self._gm.graph.nodes if name in n.name or n.name in name][:8]
        raise KeyError(
            f"no value %{name} in program {self.name!r}" + (f"; close: {close}" if close else "")
        )

    @property
    def subgraphs(self) -> dict[str, fx.GraphModule]:
        """Direct child graphs (branches of control flow, parts)."""
        return {n: m for n, m in self._gm.named_children() if isinstance(m, fx.GraphModule)}

    def add_subgraph(self, name: str, gm: fx.GraphModule) -> None:
        if hasattr(self._gm, name):
            raise ValueError(f"attribute {name!r} already exists in program {self.name!r}")
        self._gm.add_module(name, gm)
        for g in [gm, *(m for m in gm.modules() if isinstance(m, fx.GraphModule) and m is not gm)]:
            self._install_hooks(g)
        self.bump_version()

    # -- signature ---------------------------------------------------------------------
    @property
    def input_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    @property
    def input_names(self) -> list[str]:
        return [n.name for n in self.input_nodes]

    @property
    def input_specs(self) -> list[M.Spec]:
        return [M.spec(n) for n in self.input_nodes]

    @property
    def output_node(self) -> fx.Node:
        return self.graph.find_nodes(op="output")[0]

    def _output_values_raw(self) -> list[Any]:
        out = self._gm.graph.find_nodes(op="output")
        if not out:
            return []
        a = out[0].args[0]
        return list(a) if isinstance(a, (tuple, list)) else [a]

    @property
    def output_values(self) -> list[fx.Node]:
        return self._output_values_raw()

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def output_specs(self) -> list[M.Spec]:
        return [M.spec(v) for v in self.output_values]

    def add_input(
        self, name: str, spec: M.Spec, *, index: int | None = None, loc: M.Loc | None = None
    ) -> fx.Node:
        """Add a program input named ``name`` (at ``index``; last by default)."""
        if any(n.name == name for n in self.graph.nodes):
            raise ValueError(f"value %{name} already exists in program {self.name!r}")
        inputs = self.input_nodes
        index = len(inputs) if index is None else index
        if index < len(inputs):
            ctx = self.graph.inserting_before(inputs[index])
        elif inputs:
            ctx = self.graph.inserting_after(inputs[-1])
        else:
            ctx = self.graph.inserting_before(next(iter(self.graph.nodes), None))
        with ctx:
            node = self.graph.placeholder(name)
        if node.name != name:
            raise ValueError(f"{name!r} is not a valid value name (fx made it {node.name!r})")
        M.set_spec(node, spec)
        M.set_loc(node, loc or M.UNKNOWN_LOC)
        return node

    def remove_input(self, name: str) -> None:
        node = self._input(name)
        if node.users:
            users = ", ".join(f"%{u.name}" for u in node.users)
            raise ValueError(f"input %{name} is still used by {users}")
        self.graph.erase_node(node)

    def _input(self, name: str) -> fx.Node:
        for n in self.input_nodes:
            if n.name == name:
                return n
        raise KeyError(f"program {self.name!r} has no input {name!r}; inputs: {self.input_names}")

    def _set_outputs(self, values: list[Any], names: list[str]) -> None:
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"program {self.name!r}: output names {dup} would appear twice")
        if len(values) != len(names):
            raise ValueError(f"{len(names)} output names for {len(values)} outputs")
        out = self.output_node
        out.args = (tuple(values),)
        self._output_names = list(names)
        self.bump_version()

    def set_outputs(self, values: Sequence[fx.Node], names: Sequence[str]) -> None:
        """Replace every output: ``values`` named ``names`` (the output structure recorded in
        ``attrs`` is the caller's to update)."""
        self._set_outputs(list(values), list(names))

    def add_output(self, name: str, value: fx.Node) -> None:
        if name in self._output_names:
            raise ValueError(f"program {self.name!r} already has an output {name!r}")
        self._set_outputs([*self.output_values, value], [*self._output_names, name])

    def remove_output(self, name: str) -> None:
        i = self._output_index(name)
        vals, names = self.output_values, self.output_names
        del vals[i], names[i]
        self._set_outputs(vals, names)

    def set_output(self, name: str, value: fx.Node) -> None:
        i = self._output_index(name)
        vals = self.output_values
        vals[i] = value
        self._set_outputs(vals, self.output_names)

    def rename_output(self, old: str, new: str) -> None:
        """Rename output ``old``; the recorded output structure follows."""
        i = self._output_index(old)
        names = self.output_names
        names[i] = new
        self._set_outputs(self.output_values, names)
        rename_in_attrs(self.attrs, {old: new})

    def _output_index(self, name: str) -> int:
        try:
            return self._output_names.index(name)
        except ValueError:
            raise KeyError(
                f"program {self.name!r} has no output {name!r}; outputs: {self._output_names}"
            ) from None

    # -- weights -------------------------------------------------------------------------
    @property
    def weight_kinds(self) -> dict[str, str]:
        return dict(self._weight_kinds)

    def weight_kind(self, name: str) -> str:
        return self._weight_kinds[name]

    def has_weight(self, name: str) -> bool:
        return name in self._weight_kinds

    def get_weight(self, name: str) -> torch.Tensor:
        if name not in self._weight_kinds:
            raise KeyError(f"program {self.name!r} has no weight @{name}")
        return get_attr_path(self._gm, name)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight by name (parameters, buffers and constants)."""
        return {n: get_attr_path(self._gm, n) for n in self._weight_kinds}

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {
            n: get_attr_path(self._gm, n) for n, k in self._weight_kinds.items() if k == "param"
        }

    def named_buffers(self) -> dict[str, torch.Tensor]:
        return {
            n: get_attr_path(self._gm, n) for n, k in self._weight_kinds.items() if k != "param"
        }

    def add_weight(self, name: str, value: torch.Tensor, kind: str = "param") -> None:
        """Add (or replace) a weight. Values are shared, not copied."""
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"weight kind {kind!r} is not one of {WEIGHT_KINDS}")
        if not name or any(not _PART.fullmatch(p) for p in name.split(".")):
            # the parts weight_name_problem accepts (``stitch.0_1.0.weight``, as stitch names)
            raise ValueError(f"{name!r} is not a valid weight name (dotted identifiers)")
        if name not in self._weight_kinds and (problem := weight_name_problem(name)):
            raise ValueError(
                f"{name!r} cannot name a weight: {problem}; "
                f"use Program.unique_weight_name({name!r}) for a usable name"
            )
        set_weight_attr(self._gm, name, value, kind)
        self._weight_kinds[name] = kind
        self.bump_version()

    def remove_weight(self, name: str) -> None:
        users = [n.name for n in self._weight_getters(name)]
        if users:
            raise ValueError(f"weight @{name} is still read by %{', %'.join(users)}")
        del_attr_path(self._gm, name)
        del self._weight_kinds[name]
        self.bump_version()

    def rename_weight(self, old: str, new: str) -> None:
        """Give weight ``old`` the name ``new``; every read of it follows."""
        if self._name_taken(new):
            raise ValueError(f"cannot rename @{old} to @{new}: the name is taken")
        kind = self.weight_kind(old)
        self.add_weight(new, self.get_weight(old), kind)
        for n in self._weight_getters(old):
            n.target = new
        self.remove_weight(old)

    def _weight_getters(self, name: str) -> list[fx.Node]:
        return [n for n in self.graph.find_nodes(op="get_attr") if n.target == name]

    def _name_taken(self, name: str) -> bool:
        """True if ``name`` is a weight or would collide with an attribute of the module tree."""
        if name in self._weight_kinds:
            return True
        obj: Any = self._gm
        for part in name.split("."):
            if not isinstance(obj, torch.nn.Module):
                return True  # a path through a non-module attribute (e.g. `graph`)
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    def unique_weight_name(self, base: str) -> str:
        """A fresh weight name close to ``base``: made safe by :func:`safe_weight_name`
        (no clash with GraphModule/nn.Module attributes or keywords), then suffixed
        ``_1``, ``_2``... until no weight or attribute of the program has it."""
        base = safe_weight_name(base)
        if not self._name_taken(base):
            return base
        for i in itertools.count(1):
            cand = f"{base}_{i}"
            if not self._name_taken(cand):
                return cand
        raise AssertionError

    # -- running -----------------------------------------------------------------------
    def _ensure_compiled(self) -> None:
        if self._compiled_version != self._version:
            for gm in self._all_graph_modules():
                gm.recompile()
            self._compiled_version = self._version

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the program and return what the model returns: its output structure where
        one is recorded (:meth:`unflatten`), else one tensor or a tuple of them."""
        return self.unflatten(self.run(*args, **kwargs))

    # -- output structure --------------------------------------------------------------
    @property
    def output_tree(self) -> dict[str, Any] | None:
        """The recorded output structure (``attrs["output_tree"]``, JSON; see
        :mod:`splice.ir.outputs`): set by capture when the model returns constants beside
        its tensors (``{"modality": "text", ...}``); None for tensor-only outputs."""
        return self.attrs.get("output_tree")

    @property
    def variants(self) -> dict[str, Any] | None:
        """The variant table (``attrs["variants"]``) of a program whose output structure
        depends on its data-dependent path (:func:`splice.ir.outputs.unify_outputs`)."""
        return self.attrs.get("variants")

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        """The model's own output structure from the flat ``outputs`` (in
        :attr:`output_names` order, as :meth:`run` returns them): the recorded tree with its
        constants, or the path's own structure for a program with variants (the padded one
        with ``pad``). Without either: one value for one output, a tuple otherwise."""
        return unflatten_outputs(outputs, self._output_names, self.attrs)

    def run(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Run the program; returns the list of outputs (in ``output_names`` order)."""
        names = self.input_names
        if len(args) > len(names):
            raise TypeError(
                f"program {self.name!r} takes {len(names)} inputs ({names}), got {len(args)}"
            )
        values = list(args)
        for n in names[len(args) :]:
            if n not in kwargs:
                raise TypeError(f"program {self.name!r}: missing input {n!r} (inputs: {names})")
            values.append(kwargs.pop(n))
        if kwargs:
            raise TypeError(
                f"program {self.name!r}: unknown inputs {sorted(kwargs)} (inputs: {names})"
            )
        values = [torch.from_numpy(v) if type(v).__module__ == "numpy" else v for v in values]
        self._ensure_compiled()
        out = self._gm(*values)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def run_named(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(zip(self._output_names, self.run(*args, **kwargs)))

    def to_module(self) -> fx.GraphModule:
        """The GraphModule itself (an ``nn.Module``; its parameters can be trained)."""
        self._ensure_compiled()
        return self._gm

    # -- copies, sub-programs, composition ---------------------------------------------
    def copy(self) -> Program:
        """A new Program with a copied graph; weight tensors are shared (they are immutable)."""
        gm = _copy_graph_module(self._gm, self._weight_kinds)
        p = Program(
            gm,
            output_names=self._output_names,
            weight_kinds=self._weight_kinds,
            symbols=self.symbols,
            name=self.name,
            attrs=_copy.deepcopy(self.attrs),
        )
        p._version = self._version
        return p

    def extract(
        self, inputs: Sequence[str], outputs: Sequence[str], *, name: str | None = None
    ) -> Program:
        """The sub-program that computes values ``outputs`` from values ``inputs``.

        Values are named by their node names. Weights are carried along; any other value
        the outputs need must be listed in ``inputs``.
        """
        by_name = {n.name: n for n in self.graph.nodes}
        for v in [*inputs, *outputs]:
            if v not in by_name:
                raise KeyError(f"no value %{v} in program {self.name!r}")
        cut = {by_name[v] for v in inputs}
        needed: set[fx.Node] = set()
        stack = [by_name[v] for v in outputs]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n in cut:
                continue
            if n.op == "placeholder":
                raise VerificationError(
                    f"extracting {list(outputs)} needs program input %{n.name}, which is not among the given inputs",
                    node=n.name,
                    loc=M.loc(n),
                    hint=f"add {n.name!r} to inputs",
                )
            stack.extend(n.all_input_nodes)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for v in inputs:
            src = by_name[v]
            ph = graph.placeholder(src.name)
            ph.meta = _copy.copy(src.meta)
            env[src] = ph
        weights: set[str] = set()
        subs: set[str] = set()
        for n in self.graph.nodes:
            if n not in needed or n in env:
                continue
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op == "get_attr":
                (weights if n.target in self._weight_kinds else subs).add(n.target)
            if n.op == "call_module":
                subs.add(n.target)
        graph.output(tuple(env[by_name[v]] for v in outputs))
        kinds = {w: self._weight_kinds[w] for w in self._weight_kinds if w in weights}
        gm = build_graph_module(
            graph,
            {w: (self.get_weight(w), k) for w, k in kinds.items()},
            {s: _copy_graph_module(get_attr_path(self._gm, s), {}) for s in subs},
            class_name=f"Program_{name or self.name}",
        )
        return Program(
            gm,
            output_names=list(outputs),
            weight_kinds=kinds,
            symbols=self.symbols,
            name=name or f"{self.name}_part",
        )

    def __repr__(self) -> str:
        n_nodes = sum(
            1 for n in self.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
        )
        return (
            f"Program({self.name!r}, inputs={self.input_names}, outputs={self._output_names}, "
            f"ops={n_nodes}, weights={len(self._weight_kinds)}, version={self._version})"
        )


def _copy_graph_module(gm: fx.GraphModule, weight_kinds: Mapping[str, str]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.output(fx.node.map_arg(n.args[0], lambda a: env[a]))
            graph.output_node().meta = _copy.copy(n.meta)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    subs = {
        n: _copy_graph_module(c, {})
        for n, c in gm.named_children()
        if isinstance(c, fx.GraphModule)
    }
    weights = {w: (get_attr_path(gm, w), k) for w, k in weight_kinds.items()}
    return build_graph_module(graph, weights, subs, class_name=type(gm).__name__)


def graph_module_cls() -> type[fx.GraphModule]:
    """torch.fx's lazy GraphModule: Python code is generated on the first call, not on
    construction, so copies and parsed programs that are never run never pay for it (about a
    third of parsing a 20k-node program). torch is pinned, so the private class is stable."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - other torch versions
        return fx.GraphModule
    return _LazyGraphModule


def weight_for_input(graph: fx.Graph, weight: str, placeholder: fx.Node) -> fx.Node:
    """A ``get_attr`` of ``weight`` in ``graph`` that stands for ``placeholder``, an input
    bound to that weight (as a part's trailing weight inputs are): it has the placeholder's
    spec, and no location of its own."""
    node = graph.get_attr(weight)
    M.set_spec(node, M.spec(placeholder))
    M.set_loc(node, M.UNKNOWN_LOC)
    return node


def build_graph_module(
    graph: fx.Graph,
    weights: Mapping[str, tuple[torch.Tensor, str]],
    subgraphs: Mapping[str, fx.GraphModule] | None = None,
    class_name: str = "Program_main",
) -> fx.GraphModule:
    """A GraphModule over ``graph`` that owns ``weights`` (name -> (tensor, kind)) and the
    ``subgraphs`` its nodes reference.

    Built directly, in the module order ``GraphModule(root, graph)`` would give (containers
    in the order of the nodes' first references, then every weight registered in
    ``weights`` order), without populating a root and copying it: one registration per
    weight instead of three."""
    subgraphs = subgraphs or {}
    refs = [n.target for n in graph.nodes if n.op in ("get_attr", "call_module")]
    if any(not isinstance(r, str) or (r not in weights and r not in subgraphs) for r in refs):
        return _build_graph_module_copying(graph, weights, subgraphs, class_name)
    gm = graph_module_cls()(nn.Module(), fx.Graph(), class_name=class_name)
    for r in refs:
        if r in weights:
            owner: nn.Module = gm
            for part in r.split(".")[:-1]:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
        elif r not in gm._modules:
            gm.add_module(r, subgraphs[r])
    for w, (t, k) in weights.items():
        set_weight_attr(gm, w, t, k)
    gm.graph = graph
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:
        gm._tracer_cls = graph._tracer_cls
    if graph._tracer_extras:
        gm._tracer_extras = graph._tracer_extras
    return gm


def _build_graph_module_copying(
    graph: fx.Graph,
    weights: Mapping[str, tuple[torch.Tensor, str]],
    subgraphs: Mapping[str, fx.GraphModule],
    class_name: str,
) -> fx.GraphModule:
    """:func:`build_graph_module` through ``GraphModule(root, graph)`` (its errors for a
    target that names nothing)."""
    root = nn.Module()
    for w, (t, k) in weights.items():
        set_weight_attr(root, w, t, k)
    for s, g in subgraphs.items():
        root.add_module(s, g)
    gm = graph_module_cls()(root, graph, class_name=class_name)
    # set weights on the result: GraphModule copies only what get_attr nodes reference
    for w, (t, k) in weights.items():
        set_weight_attr(gm, w, t, k)
    return gm


def compose(
    first: Program,
    second: Program,
    bind: Mapping[str, str] | None = None,
    *,
    keep_first_outputs: bool = False,
    name: str | None = None,
) -> Program:
    """Feed outputs of ``first`` into inputs of ``second``.

    ``bind`` maps an input name of ``second`` to an output name of ``first``; by default,
    inputs of ``second`` bind to outputs of ``first`` with the same name, or by position
    when no names match. Unbound inputs of ``second`` become inputs of the result. Weights
    with the same name must be the same tensor (shared); otherwise rename one first.
    """
    if bind is None:
        common = [n for n in second.input_names if n in first.output_names]
        if common:
            bind = {n: n for n in common}
        else:
            bind = dict(zip(second.input_names, first.output_names))
    for s_in, f_out in bind.items():
        s_spec = M.get_spec(second._input(s_in))
        f_spec = M.get_spec(first.output_values[first._output_index(f_out)])
        if s_spec != f_spec:
            raise ValueError(
                f"cannot bind input {s_in} ({s_spec}) of {second.name!r} to output {f_out} ({f_spec}) "
                f"of {first.name!r}: specs differ"
            )
    for w in sorted(set(first.weight_kinds) & set(second.weight_kinds)):
        if first.get_weight(w) is not second.get_weight(w):
            raise ValueError(
                f"both programs have a different weight @{w}; rename it in one of them before composing"
            )
    graph = fx.Graph()
    env1: dict[fx.Node, fx.Node] = {}
    placeholders: list[tuple[str, fx.Node]] = []
    for n in first.input_nodes:
        placeholders.append((n.name, n))
    free2 = [n for n in second.input_nodes if n.name not in bind]
    for n in free2:
        if n.name in {p for p, _ in placeholders}:
            raise ValueError(f"input {n.name!r} exists in both programs; bind it or rename it")
        placeholders.append((n.name, n))
    ph_map: dict[fx.Node, fx.Node] = {}
    for pname, src in placeholders:
        ph = graph.placeholder(pname)
        ph.meta = _copy.copy(src.meta)
        ph_map[src] = ph
    subgraphs: dict[str, fx.GraphModule] = {}

    def copy_body(p: Program, env: dict[fx.Node, fx.Node], prefix: str) -> None:
        for n in p.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                break
            new = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module") and n.target not in p.weight_kinds:
                sub = prefix + n.target
                if sub in subgraphs:
                    raise ValueError(f"sub-graph {sub!r} exists twice")
                subgraphs[sub] = _copy_graph_module(get_attr_path(p.graph_module, n.target), {})
                new.target = sub
            env[n] = new

    for n in first.input_nodes:
        env1[n] = ph_map[n]
    copy_body(first, env1, "")
    out1 = dict(zip(first.output_names, (env1[v] for v in first.output_values)))
    env2: dict[fx.Node, fx.Node] = {}
    for n in second.input_nodes:
        env2[n] = out1[bind[n.name]] if n.name in bind else ph_map[n]
    prefix2 = "b_" if set(first.subgraphs) & set(second.subgraphs) else ""
    copy_body(second, env2, prefix2)
    values = [env2[v] for v in second.output_values]
    names = list(second.output_names)
    if keep_first_outputs:
        for oname, v in out1.items():
            if oname in names:
                raise ValueError(f"output {oname!r} exists in both programs")
            names.append(oname)
            values.append(v)
    graph.output(tuple(values))
    kinds = {**first.weight_kinds, **second.weight_kinds}
    weights = {
        w: (first.get_weight(w) if first.has_weight(w) else second.get_weight(w), k)
        for w, k in kinds.items()
    }
    gm = build_graph_module(graph, weights, subgraphs, class_name=f"Program_{name or first.name}")
    return Program(
        gm,
        output_names=names,
        weight_kinds=kinds,
        symbols={**first.symbols, **second.symbols},
        name=name or f"{first.name}+{second.name}",
    )


def weight_getters(program: Program) -> dict[str, list[fx.Node]]:
    """Weight name -> the get_attr nodes that read it."""
    out: dict[str, list[fx.Node]] = {}
    for n in program.graph.find_nodes(op="get_attr"):
        if n.target in program.weight_kinds:
            out.setdefault(n.target, []).append(n)
    return out


def iter_graphs(program: Program) -> Iterable[tuple[str, fx.GraphModule]]:
    """Every graph of the program, top-level first, with its dotted path ('' for the top)."""
    stack: list[tuple[str, fx.GraphModule]] = [("", program.graph_module)]
    while stack:
        path, gm = stack.pop(0)
        yield path, gm
        for n, m in gm.named_children():
            if isinstance(m, fx.GraphModule):
                stack.append((f"{path}.{n}" if path else n, m))


__all__ = [
    "WEIGHT_KINDS",
    "Program",
    "build_graph_module",
    "compose",
    "iter_graphs",
    "safe_weight_name",
    "weight_for_input",
    "weight_getters",
    "weight_name_problem",
]
