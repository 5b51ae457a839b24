"""Per-sample weights for ``hyper{per_sample=true}``: how each op that reads a [B, *shape]
weight is rewritten into a batched form, as a table from ATen op to rule.

With ``per_sample=true`` the hypernetwork emits one weight set per sample: every target
becomes a [B, *shape] value. :class:`PerSample` walks the top-level graph once, in order;
a node that reads such a value is rewritten by the rule its op has in one of two tables:

* :data:`WEIGHT_RULES` — the node computes on the weight alone (its first operand is the
  only per-sample value and it reads no activation): the result stays per-sample, one more
  leading dim. ``t``/``transpose``/``permute``/``view``/``reshape``/``unsqueeze`` move their
  dims by one; aliases, clones and casts keep the value; ``embedding`` at constant indices
  (position tables) reads one [B·V, D] table. Pointwise ops (``torch.Tag.pointwise``)
  broadcast [B, 1…, *shape].
* :data:`CONSUMER_RULES` — the node meets an activation (a value that depends on the
  program's inputs): ``linear``/``addmm``/``mm``/``matmul`` become ``bmm`` over
  [B, rows, in]; ``conv1d/2d/3d``/``convolution`` one grouped convolution over
  [1, B·C, …] (groups·B); ``embedding`` reads one [B·V, D] table at indices offset by b·V;
  ``layer_norm``/``batch_norm`` normalise, then apply the per-sample affine. Pointwise ops
  broadcast against the [B, …] activation.

A 2-D activation [N, in] must be a batch-major flattening (a view) of a tensor whose dim 0
is the batch, or have N = B. An op with no rule (a reduction over a weight, say), a weight
passed into a sub-graph, or a weight that is a program output raises :class:`PassError`
naming the node. Every rule returns the node that replaces (or, for a weight rule, stands
for) the one it rewrites; new nodes get their specs from the Rewriter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError
from splice.ir import meta as M
from splice.ir.printer import format_target
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter

aten = torch.ops.aten

#: a rule: (the rewriter state, the node that reads a per-sample value) -> its batched form
Rule = Callable[["PerSample", fx.Node], fx.Node]

_VIEW_LIKE = {
    aten.alias.default, aten.clone.default, aten.detach.default, aten.contiguous.default,
    aten.lift_fresh_copy.default,
}  # fmt: skip
_TO = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
for _op, _k in list(_CONVS.items()):
    _pad = getattr(getattr(aten, _op._schema.name.split("::")[-1]), "padding", None)
    if _pad is not None:
        _CONVS[_pad] = _k
_FLATTENING = {*_RESHAPES, aten.flatten.using_ints}


def _is_pointwise(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


class PerSample:
    """Rewrites the uses of per-sample weights ([B, *shape] values) into batched forms.

    ``rw`` edits ``program``'s top-level graph; ``batch`` is B; ``cond`` is the new program
    input (not an activation: values computed from it alone are weights)."""

    def __init__(self, program: Program, rw: Rewriter, batch: int, cond: fx.Node):
        self.program, self.rw, self.B, self.cond = program, rw, batch, cond
        self.live: set[fx.Node] = set()
        self.batched: dict[fx.Node, fx.Node] = {}

    def rewrite(self, roots: dict[fx.Node, fx.Node]) -> None:
        """Rewrite every use of the weights ``roots`` maps to their per-sample values."""
        # values that vary with the program's inputs (activations); the rest are constants
        live: set[fx.Node] = set()
        values = set(roots.values())
        for n in self.program.graph.nodes:
            is_input = n.op == "placeholder" and n is not self.cond
            if is_input or any(a in live for a in n.all_input_nodes):
                live.add(n)
        self.live = live
        self.batched = dict(roots)
        for node in list(self.program.graph.nodes):
            if node in values or node in self.batched or node.op != "call_function":
                if node.op == "output" and any(a in self.batched for a in node.all_input_nodes):
                    raise PassError(
                        "hyper{per_sample=true}: a target weight is a program output",
                        where=str(M.loc(node)),
                        hint="use per_sample=false",
                    )
                continue
            if not any(a in self.batched for a in node.all_input_nodes):
                continue
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                names = ", ".join(f"%{a.name}" for a in node.all_input_nodes if a in self.batched)
                raise PassError(
                    f"hyper{{per_sample=true}}: %{node.name} ({node.target.name()}) passes "
                    f"per-sample weights ({names}) into a sub-graph (a branch or part); "
                    "per-sample weights are rewritten in the top-level graph only",
                    where=str(M.loc(node)),
                    hint="use per_sample=false (one cond for the whole batch: weights read "
                    "inside branches are generated too), or exclude= the weights read inside "
                    "branches",
                )
            with self.rw.at(node):
                if node in live:
                    self.rw.replace(node, self.consumer(node))
                else:
                    self.batched[node] = self.weight_op(node)
        for node in reversed(list(self.batched)):
            if node not in roots and not node.users:
                self.rw.erase(node)

    # -- dispatch ------------------------------------------------------------------------------
    def weight_op(self, node: fx.Node) -> fx.Node:
        """The per-sample form of ``node``, which computes on per-sample weights only."""
        a0 = node.args[0] if node.args else None
        first_only = (
            isinstance(a0, fx.Node)
            and a0 in self.batched
            and all(a not in self.batched for a in node.all_input_nodes[1:])
        )
        rule = WEIGHT_RULES.get(node.target) if first_only else None
        if rule is not None:
            return rule(self, node)
        if _is_pointwise(node.target) and isinstance(M.get_spec(node), M.TensorSpec):
            return self.pointwise(node, len(self.shape(node)) + 1, batched_out=True)
        raise self.error(node, "has no per-sample form")

    def consumer(self, node: fx.Node) -> fx.Node:
        """The batched form of ``node``, where an activation meets per-sample weights."""
        rule = CONSUMER_RULES.get(node.target)
        if rule is not None:
            return rule(self, node)
        if _is_pointwise(node.target):
            out_shape = self.shape(node)
            if out_shape and out_shape[0] == self.B:
                return self.pointwise(node, len(out_shape), batched_out=False)
            raise self.error(node, f"produces {M.spec(node)}, which has no batch dimension")
        raise self.error(node, "has no per-sample form")

    # -- helpers ---------------------------------------------------------------------------
    def call(self, op: Any, *args: Any) -> fx.Node:
        return self.rw.call(op, args)

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        return tuple(M.tensor_spec(n).shape)  # type: ignore[arg-type]

    def error(self, node: fx.Node, why: str) -> PassError:
        return PassError(
            f"hyper{{per_sample=true}}: %{node.name} ({format_target(node)}) reads a target "
            f"weight and {why}",
            where=str(M.loc(node)),
            hint="per-sample weights support linear/addmm/mm/matmul, conv, embedding, "
            "layer_norm, batch_norm and pointwise uses; exclude= this weight, or use "
            "per_sample=false (one cond for the whole batch)",
        )

    def align(self, wb: fx.Node, rank: int, node: fx.Node) -> fx.Node:
        """[B, *s] -> [B, 1…, *s] with ``rank`` dims (broadcasts against [B, …] values)."""
        s = list(self.shape(wb))
        pad = rank - len(s)
        if pad < 0 and all(d == 1 for d in s[1 : 1 - pad]):
            # the value has the batch's dim already, as 1 (broadcast over the batch): drop it
            return self.call(aten.view.default, wb, [s[0], *s[1 - pad :]])
        if pad < 0:
            raise self.error(node, f"broadcasts a weight of rank {len(s) - 1} into rank {rank - 1}")
        if pad == 0:
            return wb
        return self.call(aten.view.default, wb, [s[0], *([1] * pad), *s[1:]])

    def rows(self, x: fx.Node, node: fx.Node) -> fx.Node:
        """An activation [..., in] as [B, R, in]: rows grouped by sample."""
        B = self.B
        s = self.shape(x)
        if len(s) == 2:
            src = x
            for _ in range(4):  # a batch-major flattening: view(t [B, ...], [-1, in])
                if src.op != "call_function" or src.target not in _FLATTENING:
                    break
                src = src.args[0]
                ss = self.shape(src)
                if len(ss) >= 2 and ss[0] == B and math.prod(ss) == math.prod(s):
                    return self.call(aten.reshape.default, x, [B, s[0] // B, s[1]])
        if len(s) >= 2 and s[0] == B:
            return self.call(aten.reshape.default, x, [B, math.prod(s[1:-1]), s[-1]])
        raise self.error(
            node,
            f"its input %{x.name} {M.spec(x)} has no batch dimension of size {B} "
            "(dim 0, or a batch-major flattening of a [B, …] value)",
        )

    def pointwise(self, node: fx.Node, rank: int, *, batched_out: bool) -> fx.Node:
        """``node`` on [B, 1…, *s] weights (``rank`` dims); with an activation operand
        (``batched_out=False``) that operand must be a [B, …] value of that rank."""
        args = [
            self.align(self.batched[a], rank, node) if a in self.batched else a for a in node.args
        ]
        if not batched_out:
            for a in node.args:
                if (
                    isinstance(a, fx.Node)
                    and isinstance(M.get_spec(a), M.TensorSpec)
                    and a in self.live
                ):
                    s = self.shape(a)
                    if len(s) != rank or s[0] != self.B:
                        raise self.error(
                            node, f"its input %{a.name} {M.spec(a)} is not a [B={self.B}, …] value"
                        )
        kwargs = {k: self.batched.get(v, v) for k, v in node.kwargs.items()}
        return self.rw.call(node.target, args, kwargs)

    def matmul(self, node: fx.Node, x: Any, w: Any, b: Any, *, weight_is_out_in: bool) -> fx.Node:
        """x·W (+ b) with W [in, out] (or [out, in] when ``weight_is_out_in``), per sample."""
        bt = self.batched
        if x in bt:
            raise self.error(node, "multiplies two weights")
        x3 = self.rows(x, node)
        if w in bt:
            wb = bt[w]
            if weight_is_out_in:
                wb = self.call(aten.transpose.int, wb, 1, 2)
            y = self.call(aten.bmm.default, x3, wb)
        elif weight_is_out_in:
            y = self.call(aten.linear.default, x3, w)
        else:
            y = self.call(aten.matmul.default, x3, w)
        if b is not None:
            if b in bt:
                bb = bt[b]
                if len(self.shape(bb)) != 2:
                    raise self.error(node, "has a bias that is not a vector")
                y = self.call(aten.add.Tensor, y, self.call(aten.unsqueeze.default, bb, 1))
            else:
                y = self.call(aten.add.Tensor, y, b)
        return self.call(aten.view.default, y, list(self.shape(node)))

    def embedding(self, node: fx.Node, *, live_ids: bool) -> fx.Node:
        """Rows of a per-sample table [B, V, D]: one [B·V, D] table, sample b's indices + b·V.

        ``padding_idx`` only masks the gradient of the original table's padding row; it is
        not carried over (the table is generated, its gradient flows to the hypernetwork)."""
        w, ids = node.args[0], node.args[1]
        if ids in self.batched or w not in self.batched:
            raise self.error(node, "indexes with a weight")
        B, V, D = self.shape(self.batched[w])
        table = self.call(aten.reshape.default, self.batched[w], [B * V, D])
        s = self.shape(ids)
        if live_ids and (not s or s[0] != B):
            raise self.error(node, f"its indices %{ids.name} {M.spec(ids)} have no batch dim {B}")
        tail = len(s) - 1 if live_ids else len(s)
        dtype = M.tensor_spec(ids).dtype
        off = self.rw.call(aten.arange.start_step, (0, B * V, V), {"dtype": dtype})
        off = self.call(aten.view.default, off, [B, *([1] * tail)])
        return self.call(aten.embedding.default, table, self.call(aten.add.Tensor, ids, off))

    def add_channel(self, y: fx.Node, b: fx.Node, channel_dim: int, rank: int) -> fx.Node:
        """y + b along ``channel_dim`` of [B, C, *sp] (b [C] shared or [B, C] per sample)."""
        tail = [1] * (rank - channel_dim - 1)
        if b in self.batched:
            bb = self.batched[b]
            bs = self.shape(bb)
            bv = self.call(aten.view.default, bb, [bs[0], bs[1], *tail])
        else:
            bv = self.call(aten.view.default, b, [self.shape(b)[0], *tail])
        return self.call(aten.add.Tensor, y, bv)

    def affine(
        self, node: fx.Node, y: fx.Node, w: Any, b: Any, *, channel_dim: int | None
    ) -> fx.Node:
        """y·w + b for a normalisation's affine part, w/b per sample or shared."""
        rank = len(self.shape(node))
        for p, op in ((w, aten.mul.Tensor), (b, aten.add.Tensor)):
            if p is None:
                continue
            if channel_dim is None:  # layer_norm: w/b over the trailing dims
                pv = self.align(self.batched[p], rank, node) if p in self.batched else p
                y = self.call(op, y, pv)
            else:
                tail = [1] * (rank - channel_dim - 1)
                if p in self.batched:
                    ps = self.shape(self.batched[p])
                    pv = self.call(aten.view.default, self.batched[p], [ps[0], ps[1], *tail])
                else:
                    pv = self.call(aten.view.default, p, [self.shape(p)[0], *tail])
                y = self.call(op, y, pv)
        return y


# ---------------------------------------------------------------------------------------
# weight rules: the node's first operand is the only per-sample value; the result stays
# per-sample (dim d of the weight is dim d + 1 of its [B, *shape] value)


def _dim(d: int, rank: int) -> int:
    return (d % rank) + 1


def _first(ps: PerSample, node: fx.Node) -> tuple[fx.Node, int]:
    """The per-sample value of the node's first operand, and the weight's rank."""
    a0 = node.args[0]
    return ps.batched[a0], len(ps.shape(a0))


def _t(ps: PerSample, node: fx.Node) -> fx.Node:
    b, r0 = _first(ps, node)
    return ps.call(aten.transpose.int, b, 1, 2) if r0 == 2 else b


def _transpose(ps: PerSample, node: fx.Node) -> fx.Node:
    b, r0 = _first(ps, node)
    return ps.call(aten.transpose.int, b, _dim(node.args[1], r0), _dim(node.args[2], r0))


def _permute(ps: PerSample, node: fx.Node) -> fx.Node:
    b, r0 = _first(ps, node)
    return ps.call(aten.permute.default, b, [0, *(_dim(d, r0) for d in node.args[1])])


def _reshape(ps: PerSample, node: fx.Node) -> fx.Node:
    b, _ = _first(ps, node)
    return ps.call(aten.reshape.default, b, [ps.B, *ps.shape(node)])


def _unsqueeze(ps: PerSample, node: fx.Node) -> fx.Node:
    b, r0 = _first(ps, node)
    return ps.call(aten.unsqueeze.default, b, _dim(node.args[1], r0 + 1))


def _same(ps: PerSample, node: fx.Node) -> fx.Node:
    return _first(ps, node)[0]


def _cast(ps: PerSample, node: fx.Node) -> fx.Node:
    b, _ = _first(ps, node)
    return ps.rw.call(node.target, (b, *node.args[1:]), dict(node.kwargs))


def _table(ps: PerSample, node: fx.Node) -> fx.Node:
    """A per-sample table read at constant indices (position embeddings)."""
    return ps.embedding(node, live_ids=False)


WEIGHT_RULES: dict[Any, Rule] = {
    aten.t.default: _t,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    **dict.fromkeys(_RESHAPES, _reshape),
    aten.unsqueeze.default: _unsqueeze,
    **dict.fromkeys(_VIEW_LIKE, _same),
    **dict.fromkeys(_TO, _cast),
    aten.embedding.default: _table,
}
"""Op -> rule for a node computing on a per-sample weight alone (pointwise ops without a
rule broadcast; any other op is an error)."""


# ---------------------------------------------------------------------------------------
# consumer rules: an activation meets per-sample weights


def _linear(ps: PerSample, node: fx.Node) -> fx.Node:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return ps.matmul(node, x, w, b, weight_is_out_in=True)


def _addmm(ps: PerSample, node: fx.Node) -> fx.Node:
    if any(v != 1 for v in node.kwargs.values()):
        raise ps.error(node, "has beta/alpha != 1")
    b, x, w = node.args[0], node.args[1], node.args[2]
    return ps.matmul(node, x, w, b, weight_is_out_in=False)


def _mm(ps: PerSample, node: fx.Node) -> fx.Node:
    x, w = node.args[0], node.args[1]
    if x in ps.batched:
        raise ps.error(node, "multiplies by the weight from the left")
    if len(ps.shape(w)) != 2:
        raise ps.error(node, "is a batched matmul of a weight")
    return ps.matmul(node, x, w, None, weight_is_out_in=False)


def _conv(ps: PerSample, node: fx.Node) -> fx.Node:
    """One grouped convolution over [1, B·C, …] with B·groups groups."""
    bt, B = ps.batched, ps.B
    out_shape = list(ps.shape(node))
    args = list(node.args)
    if node.target is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _out_pad, groups = args
        if transposed:
            raise ps.error(node, "is a transposed convolution")
        k = len(ps.shape(w)) - 2
        op = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[k]
    else:
        k = _CONVS[node.target]
        defaults = [None, None, None, [1] * k, [0] * k, [1] * k, 1]
        full = args + defaults[len(args) :]
        for i, key in enumerate(
            ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        ):
            if key in node.kwargs:
                full[i] = node.kwargs[key]
        x, w, b, stride, padding, dilation, groups = full
        op = node.target
    if x in bt:
        raise ps.error(node, "convolves a weight")
    xs = ps.shape(x)
    if len(xs) != len(out_shape) or xs[0] != B:
        raise ps.error(node, f"its input %{x.name} {M.spec(x)} has no batch dimension of size {B}")
    if w in bt:
        wb = bt[w]
        ws = ps.shape(wb)  # [B, O, C/g, *k]
        xr = ps.call(aten.reshape.default, x, [1, B * xs[1], *xs[2:]])
        wr = ps.call(aten.reshape.default, wb, [B * ws[1], *ws[2:]])
        y = ps.call(op, xr, wr, None, stride, padding, dilation, B * groups)
        y = ps.call(aten.view.default, y, out_shape)
    else:
        y = ps.call(op, x, w, None, stride, padding, dilation, groups)
    if b is not None:
        y = ps.add_channel(y, b, 1, len(out_shape))
    return y


def _layer_norm(ps: PerSample, node: fx.Node) -> fx.Node:
    args = list(node.args)
    x, shape = args[0], args[1]
    w = args[2] if len(args) > 2 else None
    b = args[3] if len(args) > 3 else None
    if x in ps.batched:
        raise ps.error(node, "normalises a weight")
    y = ps.call(aten.layer_norm.default, x, shape, None, None, *args[4:])
    return ps.affine(node, y, w, b, channel_dim=None)


def _batch_norm(ps: PerSample, node: fx.Node) -> fx.Node:
    args = list(node.args)
    x, w, b = args[0], args[1], args[2]
    if x in ps.batched or args[3] in ps.batched or args[4] in ps.batched:
        raise ps.error(node, "normalises with per-sample statistics")
    y = ps.call(aten.batch_norm.default, x, None, None, *args[3:])
    return ps.affine(node, y, w, b, channel_dim=1)


def _embedding(ps: PerSample, node: fx.Node) -> fx.Node:
    return ps.embedding(node, live_ids=True)


CONSUMER_RULES: dict[Any, Rule] = {
    aten.linear.default: _linear,
    aten.addmm.default: _addmm,
    aten.mm.default: _mm,
    aten.matmul.default: _mm,
    **dict.fromkeys(_CONVS, _conv),
    aten.convolution.default: _conv,
    aten.layer_norm.default: _layer_norm,
    aten.batch_norm.default: _batch_norm,
    aten.embedding.default: _embedding,
}
"""Op -> rule for a node where an activation meets per-sample weights (pointwise ops
without a rule broadcast against the [B, …] activation; any other op is an error)."""


__all__ = ["CONSUMER_RULES", "WEIGHT_RULES", "PerSample", "Rule"]
