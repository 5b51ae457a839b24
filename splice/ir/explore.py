"""Capture of models with data-dependent control flow, from their own ``forward``.

A plain ``torch.export`` of such a model stops at the first Python branch on a tensor value
(``if p.max() >= t``, ``self.experts[idx]``, ``break`` in a loop); a plain trace silently
bakes in the one path the example input takes. DyCL (Chen et al., ISSTA 2023) rewrites
``forward``'s AST by hand-written variants and unrolls loops. splice explores paths
instead:

1. Every conversion of a tensor to a Python value — ``bool(t)``, ``int(t)``, ``t.item()``,
   ``modules[t]`` — reaches ATen as ``_local_scalar_dense``. A dispatch mode pushed *inside*
   a non-strict ``torch.export`` sees it before export's fake mode does and answers it with a
   value chosen by the explorer, so export never has to guard on data. The predicate tensor
   is returned as an extra output, so it stays in the graph, and export leaves an
   ``aten.item`` node where the decision happened: the cut point between segments.
2. The explorer walks every path: the value domain of a decision is ``{False, True}`` for a
   bool tensor and ``range(n)`` for an index produced by ``argmax``/``argmin`` over ``n``
   entries (through views and selects). A float turned into a Python number is an error (no
   finite domain); so is an integer of unknown range. Loops are bounded by their Python form
   (``for _ in range(n): ... break``); a path with more than ``max_decisions`` decisions is
   reported as an unbounded loop, and more than ``max_paths`` paths as too many.
3. The paths form a trie of decisions. Nodes of one path before decision ``k`` are the same
   in every path that shares the first ``k`` decisions (export names nodes in creation
   order, so they have the same names; dead ones may be missing from some paths, so a
   segment is the union over the paths that share it). Each trie node becomes a graph:
   its segment, then ``torch.cond`` on the predicate with one sub-graph per outcome (an
   index decision is a chain of ``cond(idx == k, ...)``); leaves return the outputs.

The result is an ordinary Program with ``higher_order.cond`` nodes in *tail form* (every
graph is straight-line code followed by at most one ``cond`` whose results are the graph's
results), which the ``branches`` pass splits into parts and a host program. Why not
TorchDynamo graph breaks: Dynamo's resume functions are Python bytecode, so the control
structure between the subgraphs it hands a backend would have to be recovered from
bytecode, and the host program could not be serialised without pickling Python. Why not
an AST rewrite into ``torch.cond``: early returns, ``break`` and module indexing by a tensor
have no direct ``cond`` form, and rewriting source breaks on models defined in notebooks
or C extensions; the explorer needs no source.

Exploration is exhaustive: k independent gates give 2**k paths (each traced once). The
``branches`` pass shares the identical parts between them, so compiled code stays linear in
k, but capture time does not; ``max_paths`` bounds it.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from splice.errors import CaptureError
from splice.ir import meta as M
from splice.ir.program import Program, build_graph_module
from splice.ir.signatures import SignatureSet, signature_of_values

_aten = torch.ops.aten
_INDEX_PRODUCERS = {_aten.argmax.default, _aten.argmin.default}
_PASS_THROUGH = {
    _aten.select.int,
    _aten.squeeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.unsqueeze.default,
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.reshape.default,
    _aten.clone.default,
    _aten.alias.default,
    _aten.slice.Tensor,
    _aten.detach.default,
    _aten.lift_fresh.default,
}


@dataclass(frozen=True)
class Decision:
    """One conversion of a tensor to a Python value on a path."""

    site: str  # file:line of the model code that converted the tensor
    domain: tuple[Any, ...]  # the values it can take: (False, True) or (0, ..., n-1)
    value: Any  # the value this path took


class _DecisionMode(TorchDispatchMode):
    """Answers ``_local_scalar_dense`` with forced or first-in-domain values.

    ``record_only``: run on real tensors and keep the real values (the eager branch trace).
    """

    def __init__(self, forced: Sequence[Any], *, max_decisions: int, record_only: bool = False):
        super().__init__()
        self.forced = list(forced)
        self.max_decisions = max_decisions
        self.record_only = record_only
        self.decisions: list[Decision] = []
        self.preds: list[torch.Tensor] = []
        self._domain: dict[int, int] = {}  # id(tensor) -> n for index tensors
        self._keep: list[torch.Tensor] = []  # keeps ids unique while the mode runs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default:
            return self._decide(args[0])
        out = func(*args, **kwargs)
        if func in _INDEX_PRODUCERS and isinstance(out, torch.Tensor):
            src = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            n = src.numel() if dim is None else src.shape[dim]
            self._note(out, int(n))
        elif func in _PASS_THROUGH and isinstance(out, torch.Tensor) and args:
            n = self._domain.get(id(args[0]))
            if n is not None:
                self._note(out, n)
        return out

    def _note(self, t: torch.Tensor, n: int) -> None:
        self._domain[id(t)] = n
        self._keep.append(t)

    def _decide(self, t: torch.Tensor) -> Any:
        site = _user_site()
        k = len(self.decisions)
        if k >= self.max_decisions:
            raise CaptureError(
                f"a path made more than {self.max_decisions} data-dependent decisions",
                where=site,
                hint="a loop whose trip count depends on tensors has no bound: bound it "
                "(`for _ in range(n): ... break`) or raise max_decisions",
            )
        if t.numel() != 1:
            raise CaptureError(
                f"a tensor of shape {list(t.shape)} was converted to a Python value",
                where=site,
                hint="only one-element tensors can decide a branch",
            )
        if t.dtype == torch.bool:
            domain: tuple[Any, ...] = (False, True)
        elif not t.dtype.is_floating_point and not t.dtype.is_complex:
            n = self._domain.get(id(t))
            if n is None:
                raise CaptureError(
                    f"an integer tensor ({M.dtype_name(t.dtype)}) decides a Python value here, "
                    "and its range is unknown",
                    where=site,
                    hint="splice explores index decisions produced by argmax/argmin; compare "
                    "with a threshold (a bool tensor) or index with an argmax",
                )
            domain = tuple(range(n))
        else:
            raise CaptureError(
                f"a {M.dtype_name(t.dtype)} tensor was turned into a Python number "
                "(.item(), float() or bool() on float data)",
                where=site,
                hint="branch on a bool tensor instead, e.g. `if (p >= 0.5):` rather than "
                "`if p.item() >= 0.5:`",
            )
        if self.record_only:
            value = bool(t.item()) if t.dtype == torch.bool else int(t.item())
        else:
            value = self.forced[k] if k < len(self.forced) else domain[0]
            self.preds.append(t)
        self.decisions.append(Decision(site, domain, value))
        return value


def _user_site() -> str:
    """file:line of the innermost frame outside torch and splice."""
    root = __file__.rsplit("/", 2)[0]
    internal = tuple(f"{root}/{d}/" for d in ("ir", "passes", "runtime"))
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith((M._TORCH_DIR, "<")) and not name.startswith(internal):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return ""


def eager_decisions(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[Decision]:
    """Run ``model`` eagerly and list the data-dependent decisions it made (its branch trace)."""
    mode = _DecisionMode([], max_decisions=10_000, record_only=True)
    with torch.no_grad(), mode:
        model(*inputs)
    return mode.decisions


def cond_trace(decisions: Sequence[Decision]) -> list[bool]:
    """A decision list as the conditions of the ``cond`` chain that represents it.

    A bool decision is one condition; index ``v`` of ``n`` is the chain ``idx == 0``,
    ``idx == 1``, ... up to the first true one (``n - 1`` false ones for the last index).
    """
    out: list[bool] = []
    for d in decisions:
        if d.domain == (False, True):
            out.append(bool(d.value))
        else:
            n, v = len(d.domain), int(d.value)
            out += [False] * v + ([True] if v < n - 1 else [])
    return out


# ---------------------------------------------------------------------------------------
# path exploration


@dataclass
class _Path:
    decisions: list[Decision]
    program: Program
    n_out: int
    items: list[fx.Node] = field(default_factory=list)
    segment: dict[str, int] = field(default_factory=dict)  # node name -> segment index


def _trace_path(
    model: nn.Module, args: tuple[torch.Tensor, ...], forced: list[Any], max_decisions: int
) -> tuple[torch.export.ExportedProgram, list[Decision], Any, int]:
    original = model.forward
    state: dict[str, Any] = {}

    @functools.wraps(original)
    def forward(*a: Any, **kw: Any) -> tuple[Any, ...]:
        mode = _DecisionMode(forced, max_decisions=max_decisions)
        with mode:
            out = original(*a, **kw)
        leaves, spec = pytree.tree_flatten(out)
        state.update(decisions=mode.decisions, spec=spec, n=len(leaves))
        return (*leaves, *mode.preds)

    model.forward = forward  # type: ignore[method-assign]
    try:
        ep = torch.export.export(model, args, strict=False)
    finally:
        del model.forward
    return ep, state["decisions"], state["spec"], state["n"]


def _explore(
    model: nn.Module, args: tuple[torch.Tensor, ...], max_paths: int, max_decisions: int
) -> tuple[list[_Path], list[str]]:
    from splice.ir.capture import _capture_error, _output_names, _to_program

    paths: list[_Path] = []
    stack: list[list[Any]] = [[]]
    out_names: list[str] = []
    while stack:
        forced = stack.pop()
        if len(paths) >= max_paths:
            sites = sorted({d.site for p in paths for d in p.decisions})
            raise CaptureError(
                f"the model has more than {max_paths} paths through its data-dependent branches",
                where=", ".join(sites[:4]),
                hint="raise max_paths, or make independent gates fewer",
            )
        try:
            ep, decisions, spec, n_out = _trace_path(model, args, forced, max_decisions)
        except CaptureError:
            raise
        except Exception as e:
            where = " ".join(f"{d}" for d in forced)
            err = _capture_error(model, e)
            err.message = f"{err.message} (on the path that decides {where or 'nothing yet'})"
            raise err from e
        program = _to_program(ep, args, {}, {}, type(model).__name__)
        if not out_names:
            out_names = _output_names(spec, n_out) if n_out else []
        paths.append(_Path(decisions, program, n_out))
        # schedule the other outcomes of the decisions this path took by default
        taken = [d.value for d in decisions]
        for k in range(len(forced), len(decisions)):
            for v in reversed(decisions[k].domain):
                if v != taken[k]:
                    stack.append([*taken[:k], v])
    return paths, out_names


# ---------------------------------------------------------------------------------------
# paths -> one program with conds in tail form


class _Trie:
    def __init__(self, depth: int):
        self.depth = depth
        self.paths: list[_Path] = []
        self.children: dict[Any, _Trie] = {}
        self.decision: Decision | None = None  # the decision made at the end of this node


def _index_path(p: _Path) -> None:
    seg = 0
    for n in p.program.graph.nodes:
        if n.op == "placeholder":
            p.segment[n.name] = -1
            continue
        if n.op == "call_function" and n.target is _aten.item.default:
            p.items.append(n)
            p.segment[n.name] = seg
            seg += 1
            continue
        p.segment[n.name] = seg
    if len(p.items) != len(p.decisions):
        raise CaptureError(
            f"export kept {len(p.items)} of the {len(p.decisions)} decision points of a path",
            hint="this torch version drops aten.item nodes; report it with the model",
        )


def _build_trie(paths: list[_Path]) -> _Trie:
    root = _Trie(0)
    for p in paths:
        node = root
        node.paths.append(p)
        for d in p.decisions:
            node.decision = d
            node = node.children.setdefault(d.value, _Trie(node.depth + 1))
            node.paths.append(p)
    return root


class _Builder:
    """Builds the graph of one trie node: its segment, then a cond, or the outputs.

    Values are keyed by name: a node's export name, or ``@weight`` for a weight.
    """

    def __init__(self, n_out: int, weights: dict[str, tuple[torch.Tensor, str]]):
        self.weights = weights
        self.n_out = n_out
        self._sub = 0
        self._segments: dict[int, list[fx.Node]] = {}
        self._specs: dict[int, dict[str, M.Spec]] = {}
        self._free: dict[int, list[str]] = {}

    def segment_nodes(self, trie: _Trie) -> list[fx.Node]:
        """Union over the trie node's paths of their nodes in segment ``depth`` (by name)."""
        if id(trie) not in self._segments:
            seen: dict[str, fx.Node] = {}
            for p in trie.paths:
                for n in p.program.graph.nodes:
                    if n.op in ("placeholder", "output", "get_attr") or n.name in seen:
                        continue
                    if p.segment[n.name] == trie.depth and n.target is not _aten.item.default:
                        seen[n.name] = n
            self._segments[id(trie)] = list(seen.values())
        return self._segments[id(trie)]

    def specs(self, trie: _Trie) -> dict[str, M.Spec]:
        """Spec of every value named in the trie node's paths (names agree on the prefix)."""
        if id(trie) not in self._specs:
            out: dict[str, M.Spec] = {}
            for p in trie.paths:
                for n in p.program.graph.nodes:
                    if n.op not in ("get_attr", "output"):
                        out.setdefault(n.name, M.spec(n))
            self._specs[id(trie)] = out
        return self._specs[id(trie)]

    def free_names(self, trie: _Trie) -> list[str]:
        """Values the subtree reads from outside itself, in first-use order."""
        if id(trie) in self._free:
            return self._free[id(trie)]
        defined: set[str] = set()
        needed: dict[str, None] = {}

        def use(name: str) -> None:
            if name not in defined:
                needed.setdefault(name, None)

        for n in self.segment_nodes(trie):
            for a in n.all_input_nodes:
                use(_key(a))
            defined.add(n.name)
        if trie.children:
            use(_key(self._pred_source(trie)))
            for name in self.child_operands(trie):
                use(name)
        else:
            for a in self._outputs(trie.paths[0]):
                use(_key(a))
        self._free[id(trie)] = list(needed)
        return self._free[id(trie)]

    def child_operands(self, trie: _Trie) -> list[str]:
        """The operands of the trie node's cond: what any of its children reads."""
        names: dict[str, None] = {}
        for child in trie.children.values():
            names.update(dict.fromkeys(self.free_names(child)))
        return list(names)

    def build(self, trie: _Trie, params: list[str] | None) -> Any:
        """The graph of ``trie``; ``params`` are its placeholders' names.

        Returns a sub-graph's GraphModule, or for the top graph (``params`` None, the
        program's inputs as placeholders and weights as get_attr) ``(graph, subgraphs)``.
        """
        graph = fx.Graph()
        if params is None:
            env = {
                n.name: graph.node_copy(n)
                for n in trie.paths[0].program.graph.nodes
                if n.op == "placeholder"
            }
        else:
            env = self._placeholders(graph, params, trie)

        def value(name: str) -> fx.Node:
            if name not in env and name.startswith("@") and params is None:
                env[name] = graph.get_attr(name[1:])
                M.set_spec(env[name], self._weight_spec(name))
                M.set_loc(env[name], M.UNKNOWN_LOC)
            return env[name]

        for n in self.segment_nodes(trie):
            env[n.name] = graph.node_copy(n, lambda a: value(_key(a)))
        subgraphs: dict[str, fx.GraphModule] = {}
        if trie.children:
            decision = trie.decision
            assert decision is not None
            pred_src = value(_key(self._pred_source(trie)))
            results = self._cond_chain(
                graph, trie, decision, pred_src, self.child_operands(trie), value, subgraphs
            )
        else:
            results = [value(_key(a)) for a in self._outputs(trie.paths[0])]
        graph.output(tuple(results))
        if params is None:
            return graph, subgraphs
        return build_graph_module(graph, {}, subgraphs, class_name="SubGraph")

    def _cond_chain(
        self,
        graph: fx.Graph,
        trie: _Trie,
        decision: Decision,
        pred_src: fx.Node,
        operands: list[str],
        value: Callable[[str], fx.Node],
        subgraphs: dict[str, fx.GraphModule],
    ) -> list[fx.Node]:
        """cond(pred, then, else) for a bool decision; a chain of idx == k for an index."""
        loc = _site_loc(decision.site)

        def sub(child: _Trie) -> fx.Node:
            return self._ref(graph, subgraphs, self.build(child, operands), loc)

        ops = tuple(value(name) for name in operands)
        if decision.domain == (False, True):
            pred = pred_src
            then_ref, else_ref = sub(trie.children[True]), sub(trie.children[False])
        else:
            first, *rest = decision.domain
            pred = graph.call_function(_aten.eq.Scalar, (pred_src, first))
            M.set_spec(pred, M.TensorSpec(M.tensor_spec(pred_src).shape, torch.bool))
            M.set_loc(pred, loc)
            then_ref = sub(trie.children[first])
            if len(rest) == 1:
                else_ref = sub(trie.children[rest[0]])
            else:
                # the rest of the chain is a graph of its own: the same operands and the index
                chain = self._chain_rest(trie, decision, tuple(rest), operands, pred_src)
                else_ref = self._ref(graph, subgraphs, chain, loc)
                ops = (*ops, pred_src)
                _add_placeholder(subgraphs[then_ref.target], "index", M.spec(pred_src))
        cond = graph.call_function(torch.ops.higher_order.cond, (pred, then_ref, else_ref, ops))
        specs = self._out_specs(trie)
        M.set_spec(cond, M.TupleSpec(tuple(specs)))
        M.set_loc(cond, loc)
        results = []
        for i, s in enumerate(specs):
            g = graph.call_function(_getitem, (cond, i))
            M.set_spec(g, s)
            M.set_loc(g, loc)
            results.append(g)
        return results

    def _chain_rest(
        self,
        trie: _Trie,
        decision: Decision,
        rest: tuple[Any, ...],
        operands: list[str],
        pred_src: fx.Node,
    ) -> fx.GraphModule:
        """A sub-graph (operands..., index) -> cond(index == rest[0], ...) chain over ``rest``."""
        inner = fx.Graph()
        env = self._placeholders(inner, operands, trie)
        idx = inner.placeholder("index")
        M.set_spec(idx, M.spec(pred_src))
        M.set_loc(idx, M.UNKNOWN_LOC)
        subs: dict[str, fx.GraphModule] = {}
        sub_decision = Decision(decision.site, rest, decision.value)
        results = self._cond_chain(inner, trie, sub_decision, idx, operands, env.__getitem__, subs)
        inner.output(tuple(results))
        return build_graph_module(inner, {}, subs, class_name="SubGraph")

    def _placeholders(self, graph: fx.Graph, names: list[str], trie: _Trie) -> dict[str, fx.Node]:
        specs = self.specs(trie)
        env: dict[str, fx.Node] = {}
        for name in names:
            ph = graph.placeholder(_ph_name(name))
            M.set_spec(ph, self._weight_spec(name) if name.startswith("@") else specs[name])
            M.set_loc(ph, M.UNKNOWN_LOC)
            env[name] = ph
        return env

    def _ref(
        self, graph: fx.Graph, subgraphs: dict[str, fx.GraphModule], gm: fx.GraphModule, loc: M.Loc
    ) -> fx.Node:
        """Register ``gm`` as a new branch sub-graph and read it with a get_attr node."""
        name = f"branch_{self._sub}"
        self._sub += 1
        subgraphs[name] = gm
        ref = graph.get_attr(name)
        M.set_spec(ref, M.GraphRefSpec(name))
        M.set_loc(ref, loc)
        return ref

    def _pred_source(self, trie: _Trie) -> fx.Node:
        return _strip_bool_test(trie.paths[0].items[trie.depth].args[0])

    def _outputs(self, path: _Path) -> list[fx.Node]:
        return list(path.program.graph.find_nodes(op="output")[0].args[0][: self.n_out])

    def _out_specs(self, trie: _Trie) -> list[M.Spec]:
        specs: list[M.Spec] | None = None
        for p in trie.paths:
            s = [M.spec(a) for a in self._outputs(p)]
            if specs is None:
                specs = s
            elif s != specs:
                raise CaptureError(
                    "two paths of the model return outputs of different shapes or types: "
                    f"{', '.join(map(str, specs))} vs {', '.join(map(str, s))}",
                    where=", ".join(d.site for d in p.decisions[:3]),
                    hint="every path of a data-dependent branch must return the same shapes "
                    "(pad or project the early outputs)",
                )
        assert specs is not None
        return specs

    def _weight_spec(self, name: str) -> M.Spec:
        t, _ = self.weights[name[1:]]
        return M.TensorSpec(tuple(t.shape), t.dtype)


def _key(n: fx.Node) -> str:
    """The builder's name for a value: ``@weight`` for a weight read, else the node name."""
    return f"@{n.target}" if n.op == "get_attr" else n.name


def _add_placeholder(gm: fx.GraphModule, name: str, spec: M.Spec) -> None:
    """Append an (unused) placeholder: cond passes the same operands to both branches, and
    an index chain's else branch also takes the index."""
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_after(last):
        ph = gm.graph.placeholder(name)
    M.set_spec(ph, spec)
    M.set_loc(ph, M.UNKNOWN_LOC)
    gm.recompile()


_getitem = operator.getitem


def _strip_bool_test(n: fx.Node) -> fx.Node:
    """``bool(b)`` on a bool tensor traces as ``ne(b, 0)``: the condition is ``b`` itself
    (TVM also miscompiles ``ne`` on bool tensors: an fcmp on i1)."""
    if (
        n.op == "call_function"
        and n.target is _aten.ne.Scalar
        and n.args[1] in (0, False)
        and isinstance(n.args[0], fx.Node)
        and M.tensor_spec(n.args[0]).dtype == torch.bool
    ):
        return n.args[0]
    return n


def _ph_name(name: str) -> str:
    return "w_" + name[1:].replace(".", "_") if name.startswith("@") else name


def _site_loc(site: str) -> M.Loc:
    file, _, line = site.rpartition(":")
    return M.Loc(file=file, line=int(line)) if line.isdigit() else M.UNKNOWN_LOC


def capture_dynamic(
    model: nn.Module,
    example_inputs: Any,
    *,
    signatures: Sequence[Any] | None = None,
    max_paths: int = 64,
    max_decisions: int = 64,
    name: str | None = None,
) -> Program | SignatureSet:
    """Capture ``model`` with every path of its data-dependent control flow (module docs).

    Returns a Program whose branches are ``torch.cond`` nodes in tail form; a model with no
    data-dependent decision gives the same Program as :func:`splice.capture`.

    ``signatures``: more example inputs, one per other input shape the model must accept.
    Shapes are constants in a capture, so a branch on a shape (``if x.shape[-1] > 16``) is
    decided while tracing; with ``signatures`` the model is captured once per distinct
    signature and the result is a :class:`~splice.ir.signatures.SignatureSet`, which picks
    the capture by the inputs' shapes (in the artifact too: the host program's
    ``signature`` step).
    """
    from splice.ir.capture import _ident, _split_inputs

    examples = [example_inputs, *(signatures or [])]
    if len(examples) > 1:
        programs: list[Program] = []
        seen: set[Any] = set()
        for ex in examples:
            args, _ = _split_inputs(ex)
            sig = signature_of_values(args)
            if sig in seen:
                continue
            seen.add(sig)
            programs.append(
                capture_dynamic(
                    model, ex, max_paths=max_paths, max_decisions=max_decisions, name=name
                )
            )
        if len(programs) > 1:
            return SignatureSet(programs, name=programs[0].name)
        return programs[0]
    args, kwargs = _split_inputs(example_inputs)
    if kwargs:
        raise CaptureError(
            "capture of data-dependent control flow takes positional tensor inputs only",
            hint="wrap the model so that its forward takes tensors positionally",
        )
    was_training = model.training
    model.eval()
    try:
        paths, out_names = _explore(model, args, max_paths, max_decisions)
    finally:
        model.train(was_training)
    if len(paths) == 1 and not paths[0].decisions:
        p = paths[0].program
        p.name = _ident(name or type(model).__name__)
        return p
    for p in paths:
        _index_path(p)
    weights: dict[str, tuple[torch.Tensor, str]] = {}
    for p in paths:
        for w, k in p.program.weight_kinds.items():
            weights.setdefault(w, (p.program.get_weight(w), k))
    trie = _build_trie(paths)
    graph, subgraphs = _Builder(paths[0].n_out, weights).build(trie, None)
    used = {n.target for n in graph.find_nodes(op="get_attr")} - set(subgraphs)
    gm = build_graph_module(
        graph,
        {w: weights[w] for w in used},
        subgraphs,
        class_name=f"Program_{_ident(name or type(model).__name__)}",
    )
    program = Program(
        gm,
        output_names=out_names or None,
        weight_kinds={w: weights[w][1] for w in used},
        name=_ident(name or type(model).__name__),
    )
    program.attrs["paths"] = len(paths)
    return program


__all__ = ["Decision", "capture_dynamic", "cond_trace", "eager_decisions"]
