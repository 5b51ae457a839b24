"""Spec inference by fake-tensor execution.

:class:`FakeRunner` runs a node's op on fake values to learn the spec of what it produces.
The Builder (and the Rewriter, a Builder) uses it for every node it creates (inputs taken
from their stored specs); ``cond`` and ``invoke_subgraph`` take their specs from the called
graphs' stored output specs instead of tracing them. The verifier uses it to re-propagate a whole graph and compare against the stored specs.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from splice.ir import meta as M
from splice.ir.program import Program, get_attr_path


class FakeRunner:
    """Fake execution of single nodes under one FakeEnv for one program.

    ``gm`` arguments name the module that a graph's ``get_attr`` targets resolve in: the
    program's module (the default), a sub-graph's, or any holder of a new graph's sub-graphs.
    """

    def __init__(self, program: Program):
        self.program = program
        self.env = M.FakeEnv(program.symbols)
        self._weight_fakes: dict[str, torch.Tensor] = {}
        self._spec_fakes: dict[M.Spec, Any] = {}
        # static-shape results are shared by all runners; symbolic ones depend on the symbols
        self._memo: dict[Any, M.Spec] = _STATIC_MEMO if not program.symbols else {}

    # -- fake inputs
    def weight_fake(self, name: str) -> torch.Tensor:
        f = self._weight_fakes.get(name)
        if f is None:
            f = self.env.from_tensor(self.program.get_weight(name))
            self._weight_fakes[name] = f
        return f

    def stored_fake(self, node: fx.Node, gm: nn.Module | None = None) -> Any:
        """A fake value for ``node`` built from its stored spec (or its weight)."""
        if node.op == "get_attr":
            return self._get_attr_fake(node, self.program.graph_module if gm is None else gm)
        s = M.get_spec(node)
        if s is None:
            raise KeyError(f"node %{node.name} has no spec")
        # one fake per spec: the IR's ops are functional, so inputs are never written to
        f = self._spec_fakes.get(s)
        if f is None:
            f = self._spec_fakes[s] = self.env.fake(s)
        return f

    def _get_attr_fake(self, node: fx.Node, gm: nn.Module) -> Any:
        if gm is self.program.graph_module and self.program.has_weight(node.target):
            return self.weight_fake(node.target)
        obj = get_attr_path(gm, node.target)
        if isinstance(obj, torch.Tensor):
            return self.env.from_tensor(obj)
        return obj

    # -- running one node
    def run(
        self, node: fx.Node, value_of: Callable[[fx.Node], Any], gm: nn.Module | None = None
    ) -> Any:
        """Fake-run ``node`` with input values given by ``value_of``."""
        gm = self.program.graph_module if gm is None else gm
        if node.op == "get_attr":
            return self._get_attr_fake(node, gm)
        if node.op == "placeholder":
            return self.env.fake(M.spec(node))
        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
            return self._cond(node, args, gm)
        if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph:
            return self._invoke(node, args, gm)
        with self.env.mode:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_module":
                return get_attr_path(gm, node.target)(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise ValueError(f"cannot fake-run node %{node.name} (op {node.op})")

    def _cond(self, node: fx.Node, args: tuple, gm: nn.Module) -> tuple:
        """A ``cond`` from its branches' stored specs, without tracing them.

        torch's fake ``cond`` traces both branches, and each nested ``cond`` in them again,
        so a chain of k conds costs exponentially many traces. Each branch graph is checked
        on its own (the verifier visits every graph), so here it is enough that the operands
        match both branches' inputs and that the branches return the same specs."""
        _pred, t_ref, f_ref, _operands = node.args
        have = [self.env.spec_of(v) for v in args[3]]
        outs = []
        for ref in (t_ref, f_ref):
            sub = get_attr_path(gm, ref.target)
            phs = [p for p in sub.graph.nodes if p.op == "placeholder"]
            want = [M.spec(p) for p in phs]
            if want != have:
                raise ValueError(
                    f"cond %{node.name}: branch {ref.target} takes {want}, operands are {have}"
                )
            out = next(iter(sub.graph.find_nodes(op="output"))).args[0]
            outs.append([M.spec(o) for o in out])
        if outs[0] != outs[1]:
            raise ValueError(
                f"cond %{node.name}: branches return different specs {outs[0]} and {outs[1]}"
            )
        return tuple(self.env.fake(s) for s in outs[0])

    def _invoke(self, node: fx.Node, args: tuple, gm: nn.Module) -> tuple:
        """An ``invoke_subgraph(@part, id, *operands)`` from the part's stored specs, for the
        reason given at :meth:`_cond`: the operands must match the part's inputs."""
        sub = get_attr_path(gm, node.args[0].target)
        have = [self.env.spec_of(v) for v in args[2:]]
        want = [M.spec(p) for p in sub.graph.nodes if p.op == "placeholder"]
        if want != have:
            raise ValueError(
                f"invoke_subgraph %{node.name}: part {node.args[0].target} takes {want}, "
                f"operands are {have}"
            )
        out = next(iter(sub.graph.find_nodes(op="output"))).args[0]
        return tuple(self.env.fake(M.spec(o)) for o in out)

    def infer(self, node: fx.Node, gm: nn.Module | None = None) -> M.Spec:
        """The spec of ``node``, running it on fakes of its inputs' stored specs.

        Results are memoised by (op, input specs, literal arguments): shape functions are
        deterministic, and real models repeat the same op on the same shapes in every layer.
        """
        if node.op == "get_attr":
            v = self._get_attr_fake(node, self.program.graph_module if gm is None else gm)
            if isinstance(v, fx.GraphModule):
                return M.GraphRefSpec(node.target)
            return self.env.spec_of(v)
        key = self._cache_key(node) if node.op == "call_function" else None
        if key is not None:
            hit = self._memo.get(key)
            if hit is not None:
                return hit
        cache: dict[fx.Node, Any] = {}

        def value_of(n: fx.Node) -> Any:
            if n not in cache:
                cache[n] = self.stored_fake(n, gm)
            return cache[n]

        result = self.env.spec_of(self.run(node, value_of, gm))
        if key is not None and _declared_only(result, self.env.symbols):
            if len(self._memo) > _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = result
        return result

    def _cache_key(self, node: fx.Node) -> Any:
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return None
        try:
            key = (node.target, _arg_key(node.args, self), _arg_key(node.kwargs, self))
            hash(key)
        except (TypeError, _Uncacheable):
            return None
        return key

    def propagate(
        self, gm: fx.GraphModule, on_node: Callable[[fx.Node, M.Spec], None] | None = None
    ) -> dict[fx.Node, M.Spec]:
        """Re-derive the spec of every node of ``gm`` from its placeholders' specs."""
        values: dict[fx.Node, Any] = {}
        specs: dict[fx.Node, M.Spec] = {}
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            v = self.run(node, values.__getitem__, gm)
            values[node] = v
            s = (
                M.GraphRefSpec(node.target)
                if isinstance(v, fx.GraphModule)
                else self.env.spec_of(v)
            )
            specs[node] = s
            if on_node is not None:
                on_node(node, s)
        return specs


_MEMO_LIMIT = 100_000
_STATIC_MEMO: dict[Any, M.Spec] = {}


class _Uncacheable(Exception):
    pass


def _arg_key(v: Any, runner: FakeRunner) -> Any:
    if isinstance(v, fx.Node):
        if v.op == "get_attr":
            if runner.program.has_weight(v.target):
                t = runner.program.get_weight(v.target)
                return ("w", tuple(t.shape), t.dtype)
            raise _Uncacheable
        s = M.get_spec(v)
        if s is None:
            raise _Uncacheable
        return s
    if isinstance(v, (list, tuple)):
        return (type(v), tuple(_arg_key(x, runner) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _arg_key(x, runner)) for k, x in v.items()))
    if isinstance(v, float):
        return ("float", repr(v))
    if isinstance(v, slice):
        return (
            "slice",
            _arg_key(v.start, runner),
            _arg_key(v.stop, runner),
            _arg_key(v.step, runner),
        )
    if v is None or isinstance(
        v, (bool, int, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
    ):
        return (type(v), v)
    raise _Uncacheable


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _declared_only(s: M.Spec, symbols: dict[str, Any]) -> bool:
    """True if every symbolic dim of ``s`` uses declared symbols only (no fresh unbacked ones)."""
    for ts in M.iter_tensor_specs(s):
        for d in ts.shape:
            if isinstance(d, str) and any(
                n not in symbols and n not in ("Max", "Min") for n in _NAME_RE.findall(d)
            ):
                return False
    return not (isinstance(s, M.ScalarSpec) and s.expr is not None)


PY_OPS: dict[str, Any] = {
    f"operator.{n}": getattr(operator, n)
    for n in (
        "getitem",
        "add",
        "sub",
        "mul",
        "floordiv",
        "truediv",
        "mod",
        "neg",
        "pow",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "not_",
    )
}
"""The Python callables a graph may call (on SymInts and tuples), by printed name."""
PY_OPS.update(
    {
        f"torch.{n}": getattr(torch, n)
        for n in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sqrt")
        if hasattr(torch, n)
    }
)
PY_OP_NAMES: dict[Any, str] = {v: k for k, v in PY_OPS.items()}

__all__ = ["PY_OPS", "PY_OP_NAMES", "FakeRunner"]
