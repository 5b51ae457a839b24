"""Cost model: FLOPs, parameters and bytes moved, per node and rolled up per module path.

Conventions (the tests hold the model to them):

* a multiply-add is 2 FLOPs; a bias add is 1 FLOP per output element;
* ``linear(x[..., K], W[N, K], b)``: 2·rows·N·K + rows·N;  ``addmm``: 2·M·N·K + M·N;
  ``mm``/``bmm``/``matmul``: 2·(output elements)·K;
* ``conv*``: 2·(output elements)·(C_in/groups)·prod(kernel) (+ output elements for the bias);
* ``scaled_dot_product_attention(q[...,L,E], k[...,S,E], v[...,S,Ev])``: the two matrix
  products, 2·B·L·S·E + 2·B·L·S·Ev (softmax not counted, as torch's flop counter does);
* normalisations and softmax: 5 FLOPs per element; reductions: 1 per input element; other
  element-wise ops: 1 per output element; views and shape ops: 0 FLOPs and 0 bytes;
* bytes read are the sizes of the tensor operands (an ``embedding`` reads only the rows it
  gathers); bytes written the size of the result;
* splice dialect ops report their own cost (:attr:`splice.ir.ops.OpDef.cost`);
* parameters (weights of kind ``param``) are counted once, at the first node that reads
  them, and roll up to that node's module.

Symbolic dims are evaluated at the program's symbol hints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from splice.ir import meta as M
from splice.ir.ops import op_def
from splice.ir.program import Program

VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "permute",
    "transpose",
    "t",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "as_strided",
    "unflatten",
    "flatten",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "sym_size",
    "sym_numel",
    "sym_stride",
    "lift_fresh_copy",
    "view_as",
    "expand_as",
    "narrow",
    "movedim",
    "_assert_scalar",
    "_assert_tensor_metadata",
    "scalar_tensor",
    "diagonal",
}
FIVE_FLOP_OPS = {
    "layer_norm",
    "native_layer_norm",
    "batch_norm",
    "_native_batch_norm_legit_no_training",
    "group_norm",
    "native_group_norm",
    "rms_norm",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "instance_norm",
    "_safe_softmax",
}
REDUCTIONS = {
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "var",
    "std",
    "prod",
    "norm",
    "argmax",
    "argmin",
    "logsumexp",
    "any",
    "all",
    "var_mean",
    "linalg_vector_norm",
    "cumsum",
}


@dataclass
class Cost:
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    params: int = 0

    def __iadd__(self, other: Cost) -> Cost:
        self.flops += other.flops
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.params += other.params
        return self

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass
class CostReport:
    """Per-node costs (by node name), their modules, and roll-ups."""

    nodes: dict[str, Cost] = field(default_factory=dict)
    module_of: dict[str, str] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)
    weight_bytes: int = 0

    @property
    def total(self) -> Cost:
        t = Cost()
        for c in self.nodes.values():
            t += c
        return t

    def by_module(self, depth: int | None = None) -> dict[str, Cost]:
        """Costs summed per module path, truncated to ``depth`` components (None: full paths)."""
        out: dict[str, Cost] = {}
        for name, c in self.nodes.items():
            path = self.module_of.get(name, "")
            if depth is not None:
                path = ".".join(path.split(".")[:depth]) if path else ""
            out.setdefault(path, Cost())
            out[path] += c
        return out

    def module_total(self, prefix: str) -> Cost:
        """Cost of everything under module ``prefix`` (itself and its submodules)."""
        t = Cost()
        for name, c in self.nodes.items():
            p = self.module_of.get(name, "")
            if not prefix or p == prefix or p.startswith(prefix + "."):
                t += c
        return t

    def predicted_seconds(self, target: Any) -> float:
        """Sum over nodes of the roofline time on ``target`` (a :class:`splice.target.Target`)."""
        return sum(target.roofline_seconds(c.flops, c.bytes) for c in self.nodes.values())


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def _tspec(a: Any) -> M.TensorSpec | None:
    if isinstance(a, fx.Node):
        s = M.get_spec(a)
        return s if isinstance(s, M.TensorSpec) else None
    return None


def _numel(s: M.TensorSpec | None, hints: dict[str, int]) -> int:
    return s.numel(hints) if s is not None else 0


def _nbytes(s: M.TensorSpec | None, hints: dict[str, int]) -> int:
    return s.nbytes(hints) if s is not None else 0


def _dim(s: M.TensorSpec, i: int, hints: dict[str, int]) -> int:
    return M.eval_dim(s.shape[i], hints)


def node_cost(node: fx.Node, hints: dict[str, int]) -> Cost | None:
    """The cost of one call node, or None if the model does not know the op."""
    name = _op_name(node.target)
    out_spec = M.get_spec(node)
    outs = list(M.iter_tensor_specs(out_spec)) if out_spec is not None else []
    out_numel = sum(s.numel(hints) for s in outs)
    out_bytes = sum(s.nbytes(hints) for s in outs)
    tensor_args = [s for s in (_tspec(a) for a in node.all_input_nodes) if s is not None]
    read = sum(s.nbytes(hints) for s in tensor_args)
    a = node.args
    d = op_def(node.target)
    if d is not None and d.cost is not None:
        env = M.FakeEnv()
        fakes = fx.node.map_arg(a, lambda n: _fake_at_hints(n, env, hints))
        c = d.cost(*fakes, **fx.node.map_arg(node.kwargs, lambda n: _fake_at_hints(n, env, hints)))
        return Cost(c.flops, c.bytes_read, c.bytes_written)
    if node.target is torch.ops.higher_order.cond or isinstance(
        node.target, torch._ops.HigherOrderOperator
    ):
        return None
    if name in VIEW_OPS or name == "getitem":
        return Cost()
    if name == "linear":
        x, w = _tspec(a[0]), _tspec(a[1])
        has_bias = len(a) > 2 and a[2] is not None
        k = _dim(w, 1, hints)
        n = _dim(w, 0, hints)
        rows = _numel(x, hints) // max(k, 1)
        return Cost(2 * rows * n * k + (rows * n if has_bias else 0), read, out_bytes)
    if name in ("addmm", "mm", "bmm", "baddbmm", "matmul"):
        left = _tspec(a[1] if name in ("addmm", "baddbmm") else a[0])
        k = _dim(left, left.rank - 1, hints) if left is not None and left.rank else 1
        flops = 2 * out_numel * k + (out_numel if name in ("addmm", "baddbmm") else 0)
        return Cost(flops, read, out_bytes)
    if name in (
        "convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
    ):
        x, w = _tspec(a[0]), _tspec(a[1])
        has_bias = len(a) > 2 and a[2] is not None
        kernel = 1
        for i in range(2, w.rank):
            kernel *= _dim(w, i, hints)
        if "transpose" in name or (name in ("convolution", "_convolution") and len(a) > 6 and a[6]):
            flops = 2 * _numel(x, hints) * _dim(w, 1, hints) * kernel
        else:
            flops = 2 * out_numel * _dim(w, 1, hints) * kernel
        return Cost(flops + (out_numel if has_bias else 0), read, out_bytes)
    if name in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
    ):
        q, k, v = _tspec(a[0]), _tspec(a[1]), _tspec(a[2])
        L, E = _dim(q, q.rank - 2, hints), _dim(q, q.rank - 1, hints)
        S, Ev = _dim(k, k.rank - 2, hints), _dim(v, v.rank - 1, hints)
        batch = _numel(q, hints) // max(L * E, 1)
        return Cost(2 * batch * L * S * E + 2 * batch * L * S * Ev, read, out_bytes)
    if name == "embedding":
        w = _tspec(a[0])
        dim = _dim(w, w.rank - 1, hints) if w is not None else 1
        rows = out_numel // max(dim, 1)
        idx = _tspec(a[1])
        return Cost(
            0,
            rows * dim * (w.nbytes(hints) // max(w.numel(hints), 1)) + _nbytes(idx, hints),
            out_bytes,
        )
    if name in FIVE_FLOP_OPS:
        return Cost(5 * _numel(tensor_args[0] if tensor_args else None, hints), read, out_bytes)
    if name in REDUCTIONS:
        return Cost(_numel(tensor_args[0] if tensor_args else None, hints), read, out_bytes)
    return Cost(out_numel, read, out_bytes)


def _fake_at_hints(n: fx.Node, env: M.FakeEnv, hints: dict[str, int]) -> Any:
    s = M.get_spec(n)
    if isinstance(s, M.TensorSpec):
        return env.fake(M.TensorSpec(tuple(M.eval_dim(d, hints) for d in s.shape), s.dtype))
    if isinstance(s, M.ScalarSpec):
        return M.eval_dim(s.expr, hints) if s.expr else None
    return None


def cost_model(
    program: Program, ctx: Any = None, *, hints: dict[str, int] | None = None
) -> CostReport:
    """Cost of every call node of ``program`` (see the module docstring for conventions)."""
    hints = dict(hints or {n: s.hint for n, s in program.symbols.items()})
    report = CostReport()
    kinds = program.weight_kinds
    counted: set[str] = set()
    for node in program.graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        c = node_cost(node, hints) if node.op == "call_function" else None
        if c is None:
            report.uncounted.append(node.name)
            c = Cost()
        for inp in node.all_input_nodes:
            if (
                inp.op == "get_attr"
                and kinds.get(inp.target) == "param"
                and inp.target not in counted
            ):
                counted.add(inp.target)
                c.params += program.get_weight(inp.target).numel()
        report.nodes[node.name] = c
        report.module_of[node.name] = M.loc(node).module_path
    report.weight_bytes = sum(t.numel() * t.element_size() for t in program.weights.values())
    return report


__all__ = ["Cost", "CostReport", "cost_model", "node_cost"]
