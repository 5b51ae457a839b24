"""unify_outputs: one output layout for the paths of a dynamic program.

A model with data-dependent control flow may return a structure that depends on the path:
an adaptive network returns the list of the classifier outputs computed so far, a greedy
decoder a shorter sequence when it stops early. Each distinct structure is a *variant*;
:func:`unify_outputs` gives every path's program one fixed layout (a variant index, then
every variant's *slots*) and records the variant table in ``program.attrs["variants"]``.

The output tree and variant table formats, and the functions that read them, are in
:mod:`splice.ir.output_tree` (re-exported here).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from splice.errors import CaptureError
from splice.ir import meta as M
from splice.ir.output_tree import (
    CONST_TYPES,
    MAX_DEPTH,
    TREE_ATTR,
    VARIANTS_ATTR,
    OutputStructureError,
    TreeNode,
    Variants,
    build_tree,
    check_tree,
    check_variants,
    constant_leaf,
    format_structure,
    format_tree,
    is_constant,
    leaves_of,
    map_outputs,
    output_names,
    rename_in_attrs,
    tree_from_spec,
    unflatten,
)
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter

_aten = torch.ops.aten


# ---------------------------------------------------------------------------------------
# unify_outputs: one layout for the paths of a dynamic program


def _path_leaves(
    i: int, program: Program, tree: pytree.TreeSpec | TreeNode
) -> tuple[TreeNode, list[tuple[str, Any]]]:
    """Path ``i``'s tree with outputs renamed to its leaf names, and its leaves: per tensor
    leaf ``(leaf name, output node)`` in order."""
    outs = dict(zip(program.output_names, program.output_values))
    if isinstance(tree, dict):
        refs = check_tree(tree)
        missing = [r for r in refs if r not in outs]
        if missing:
            raise CaptureError(
                f"path {i}: its output tree names {missing[0]!r}, which is not an output of "
                f"its program (outputs {program.output_names})"
            )
        return tree, [(r, outs[r]) for r in refs]
    n_leaves = tree.num_leaves
    recorded = program.attrs.get(TREE_ATTR)
    if recorded is not None:
        leaves: list[TreeNode] = leaves_of(recorded)[:n_leaves]
    else:
        leaves = [{"output": n} for n in program.output_names[:n_leaves]]
    if len(leaves) != n_leaves or any(
        "output" in leaf and leaf["output"] not in outs for leaf in leaves
    ):
        raise CaptureError(
            f"path {i}: its output has {n_leaves} leaves but its program returns "
            f"{len(program.output_names)} outputs ({program.output_names})",
            hint="pass each path's program with one output per tensor leaf of its tree "
            "(in leaf order; further outputs are dropped), constants recorded by capture",
        )
    names = output_names(tree, n_leaves) if n_leaves else []
    values: list[tuple[str, Any]] = []

    def leaf(j: int, node: TreeNode, path: str) -> TreeNode:
        if "output" in node:
            values.append((names[j], outs[node["output"]]))
            return {"output": names[j]}
        return dict(node)

    node = tree_from_spec(tree, leaves, leaf, where=f"path {i}")
    return node, values


def _static_spec(i: int, name: str, node: fx.Node) -> M.TensorSpec:
    s = M.get_spec(node)
    if not isinstance(s, M.TensorSpec) or not all(isinstance(d, int) for d in s.shape):
        raise CaptureError(
            f"path {i}: output {name!r} is {s}; outputs whose structure depends on the path "
            "must be tensors of static shape",
            hint="capture with static shapes (no dynamic_shapes) or return a tensor",
        )
    return s


def _fill(value: float | int, dtype: torch.dtype, where: str) -> float | int | bool:
    if dtype == torch.bool:
        return bool(value)
    if dtype.is_floating_point or dtype.is_complex:
        return float(value)
    if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
        raise CaptureError(
            f"pad={value!r} cannot fill the integer output {where}",
            hint="pass an integral fill value (e.g. pad=0, or the end token)",
        )
    return int(value)


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def _union(a: TreeNode, b: TreeNode, at: str) -> TreeNode:
    """The padded tree covering ``a`` and ``b`` (same containers; longer sequences win;
    dict keys united; leaves aligned by their place in the structure)."""
    if "output" in a and "output" in b:
        return a
    if "const" in a and "const" in b and a["const"] == b["const"]:
        return a
    for key in ("tuple", "list"):
        if key in a and key in b:
            xs, ys = a[key], b[key]
            both = [_union(x, y, f"{at}[{k}]") for k, (x, y) in enumerate(zip(xs, ys))]
            return {key: both + (xs if len(xs) > len(ys) else ys)[len(both) :]}
    if "dict" in a and "dict" in b:
        mine = dict((json.dumps(k), c) for k, c in a["dict"])
        pairs = [list(p) for p in a["dict"]]
        for k, c in b["dict"]:
            key = json.dumps(k)
            if key in mine:
                pairs[[json.dumps(p[0]) for p in pairs].index(key)][1] = _union(mine[key], c, at)
            else:
                pairs.append([k, c])
        return {"dict": pairs}
    if (
        "namedtuple" in a
        and a.get("fields") == b.get("fields")
        and a["namedtuple"] == b.get("namedtuple")
    ):
        return {**a, "items": [_union(x, y, at) for x, y in zip(a["items"], b["items"])]}
    raise CaptureError(
        f"pad: the paths return different structures at {at or 'the top'} "
        f"({format_tree(a)} and {format_tree(b)}), which padding cannot align",
        hint="padding aligns sequences of different lengths and tensors of different "
        "sizes; without pad each structure becomes its own variant",
    )


def _leaf_places(node: TreeNode, at: str = "") -> list[tuple[str, TreeNode]]:
    """(place in the structure, leaf) of every leaf: places align leaves across paths."""
    if "output" in node or "const" in node:
        return [(at, node)]
    if "dict" in node:
        return [p for k, c in node["dict"] for p in _leaf_places(c, f"{at}[{json.dumps(k)}]")]
    key = next(k for k in ("tuple", "list", "items") if k in node)
    return [p for j, c in enumerate(node[key]) for p in _leaf_places(c, f"{at}[{j}]")]


def unify_outputs(
    programs: Sequence[Program],
    trees: Sequence[pytree.TreeSpec | TreeNode],
    *,
    pad: float | int | None = None,
) -> tuple[list[Program], Variants]:
    """Rewrite the programs of the paths of a dynamic model to one output layout.

    ``programs[i]``: path ``i``'s flat-output Program; ``trees[i]``: its output structure,
    a torch ``TreeSpec`` (``pytree.tree_flatten(out)[1]``: the program's first outputs are
    its leaves in order, constant leaves taken from ``attrs["output_tree"]`` where capture
    recorded them; any further outputs, such as the explorer's predicates, are dropped) or
    an output tree (:data:`TreeNode`) over the program's output names.

    Paths with the same structure (constants included) and the same output specs share a
    *variant*. Without ``pad`` every program returns the same layout: an int64 0-d
    ``variant`` output (a constant in each path), then every variant's slots in variant
    order, named ``v<k>_<leaf name>``; a path fills its own variant's slots and the others
    with zeros of their specs (cheap for small outputs). With one variant there is no index
    output and the outputs are the tree's leaves under their own names.

    ``pad`` (the fill value) asks for one fixed-shape layout instead: leaves are aligned by
    their place in the structure (``out[3]``, ``out['tokens']``), each slot has the
    largest shape any path gives it (same dtype and rank), and a path writes its tensors
    at the slot's leading corner and the fill value everywhere else (a missing leaf, e.g.
    the classifier outputs an early exit never computed, is all fill). Every call then
    returns the same padded structure; the ``variant`` output still says which path
    structure filled it. ``capture_dynamic(..., pad_outputs=0.0)`` passes ``pad`` here.

    Returns the rewritten programs (copies) and the variant table to store as
    ``program.attrs["variants"]`` on the joined program (module docstring)."""
    if len(programs) != len(trees) or not programs:
        raise CaptureError(
            f"unify_outputs takes one tree per program, got {len(programs)} programs and "
            f"{len(trees)} trees"
        )
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, float))):
        raise CaptureError(f"pad must be a number (the fill value), got {pad!r}")
    paths = []
    for i, (p, t) in enumerate(zip(programs, trees)):
        node, values = _path_leaves(i, p, t)
        specs = [_static_spec(i, n, v) for n, v in values]
        paths.append((node, values, specs))
    keys: dict[str, int] = {}
    variant_of: list[int] = []
    for node, _, specs in paths:
        key = json.dumps([node, [M.spec_json(s) for s in specs]], sort_keys=True)
        variant_of.append(keys.setdefault(key, len(keys)))
    n_var = len(keys)
    first = [variant_of.index(k) for k in range(n_var)]  # one path per variant
    if pad is None:
        return _unify_slots(programs, paths, variant_of, first)
    return _unify_padded(programs, paths, variant_of, first, pad)


def _rewrite(
    program: Program,
    index: tuple[str, int] | None,
    slots: Sequence[tuple[str, Callable[[Any], fx.Node]]],
) -> Program:
    """A copy of ``program`` whose outputs are ``index`` (name, value) and ``slots``:
    (name, build(rewriter) -> node)."""
    p = program.copy()
    p.attrs.pop(TREE_ATTR, None)
    rw = Rewriter(p, "unify-outputs")
    old = dict(zip(program.output_names, p.output_values))
    values, names = [], []
    with rw.at(p.output_node):
        if index is not None:
            values.append(
                rw.call(
                    _aten.full.default,
                    ([], index[1]),
                    {"dtype": torch.int64},
                    name=f"variant_is_{index[1]}",
                )
            )
            names.append(index[0])
        for name, build in slots:
            values.append(build((rw, old)))
            names.append(name)
    p.set_outputs(values, names)
    return p


def _unify_slots(
    programs: Sequence[Program],
    paths: list[tuple[TreeNode, list[tuple[str, Any]], list[M.TensorSpec]]],
    variant_of: list[int],
    first: list[int],
) -> tuple[list[Program], Variants]:
    n_var = len(first)
    taken: set[str] = set()
    index = _unique("variant", taken) if n_var > 1 else None
    table: list[dict[str, Any]] = []
    slot_names: list[list[str]] = []
    pos = 1 if index else 0
    for k, i in enumerate(first):
        node, values, specs = paths[i]
        names = {n: _unique(f"v{k}_{n}" if index else n, taken) for n, _ in values}
        slot_names.append([names[n] for n, _ in values])
        table.append(
            {
                "tree": map_outputs(node, names.__getitem__),
                "slots": list(range(pos, pos + len(values))),
                "outputs": slot_names[-1],
                "specs": [M.spec_json(s) for s in specs],
            }
        )
        pos += len(values)
    out = []
    for i, p in enumerate(programs):
        mine = variant_of[i]
        values = paths[i][1]
        slots: list[tuple[str, Callable[[Any], fx.Node]]] = []
        for k in range(n_var):
            for j, (name, spec) in enumerate(zip(slot_names[k], paths[first[k]][2])):
                if k == mine:
                    src = values[j][1].name
                    slots.append((name, lambda ctx, src=src: _by_name(ctx, src)))
                else:
                    slots.append((name, lambda ctx, s=spec, n=name: _full(ctx, s, 0, f"zeros_{n}")))
        out.append(_rewrite(p, (index, mine) if index else None, slots))
    return out, {"index": index, "pad": None, "variants": table}


def _by_name(ctx: Any, name: str) -> fx.Node:
    rw, _ = ctx
    return next(n for n in rw.graph.nodes if n.name == name)


def _full(ctx: Any, spec: M.TensorSpec, value: Any, name: str) -> fx.Node:
    rw, _ = ctx
    fill = _fill(value, spec.dtype, name)
    return rw.call(_aten.full.default, (list(spec.shape), fill), {"dtype": spec.dtype}, name=name)


def _unify_padded(
    programs: Sequence[Program],
    paths: list[tuple[TreeNode, list[tuple[str, Any]], list[M.TensorSpec]]],
    variant_of: list[int],
    first: list[int],
    pad: float | int,
) -> tuple[list[Program], Variants]:
    union = paths[first[0]][0]
    for i in first[1:]:
        union = _union(union, paths[i][0], "")
    places = [(at, leaf) for at, leaf in _leaf_places(union) if "output" in leaf]
    # per place: the largest shape any path gives it
    shapes: dict[str, M.TensorSpec] = {}
    path_at: list[dict[str, tuple[str, M.TensorSpec]]] = []
    for node, values, specs in paths:
        spec_of = {n: s for (n, _), s in zip(values, specs)}
        mine = {}
        for at, leaf in _leaf_places(node):
            if "output" not in leaf:
                continue
            s = spec_of[leaf["output"]]
            mine[at] = (leaf["output"], s)
            have = shapes.get(at)
            if have is None:
                shapes[at] = s
            elif have.dtype != s.dtype or len(have.shape) != len(s.shape):
                raise CaptureError(
                    f"pad: output {at or '<root>'} is {have} on one path and {s} on another; "
                    "padding needs one dtype and rank per place",
                    hint="without pad each structure becomes its own variant",
                )
            else:
                shape = tuple(max(a, b) for a, b in zip(have.shape, s.shape))
                shapes[at] = M.TensorSpec(shape, s.dtype)
        path_at.append(mine)
    taken: set[str] = set()
    index = _unique("variant", taken)
    slot_name = {at: _unique(leaf["output"], taken) for at, leaf in places}
    slot_pos = {at: 1 + j for j, (at, _) in enumerate(places)}
    tree = _rename_places(union, slot_name)
    table = []
    for i in first:
        node = _rename_places(paths[i][0], slot_name)
        outs = [leaf["output"] for leaf in leaves_of(node) if "output" in leaf]
        ats = [at for at, leaf in _leaf_places(paths[i][0]) if "output" in leaf]
        table.append(
            {
                "tree": node,
                "slots": [slot_pos[at] for at in ats],
                "outputs": outs,
                "specs": [M.spec_json(path_at[i][at][1]) for at in ats],
            }
        )
    out = []
    for i, p in enumerate(programs):
        values = dict(paths[i][1])
        slots: list[tuple[str, Callable[[Any], fx.Node]]] = []
        for at, _ in places:
            full = shapes[at]
            name = slot_name[at]
            if at in path_at[i]:
                leaf, s = path_at[i][at]
                src = values[leaf].name
                slots.append(
                    (
                        name,
                        lambda ctx, src=src, s=s, full=full, n=name: _padded(
                            ctx, src, s, full, pad, n
                        ),
                    )
                )
            else:
                slots.append(
                    (name, lambda ctx, full=full, n=name: _full(ctx, full, pad, f"fill_{n}"))
                )
        out.append(_rewrite(p, (index, variant_of[i]), slots))
    return out, {"index": index, "pad": pad, "tree": tree, "variants": table}


def _padded(
    ctx: Any, src: str, s: M.TensorSpec, full: M.TensorSpec, pad: float | int, name: str
) -> fx.Node:
    node = _by_name(ctx, src)
    if tuple(s.shape) == tuple(full.shape):
        return node
    rw, _ = ctx
    amounts: list[int] = []
    for have, want in reversed(list(zip(s.shape, full.shape))):
        amounts += [0, int(want) - int(have)]
    return rw.call(
        _aten.constant_pad_nd.default,
        (node, amounts, _fill(pad, s.dtype, name)),
        name=f"pad_{name}",
    )


def _rename_places(node: TreeNode, names: Mapping[str, str], at: str = "") -> TreeNode:
    """``node`` with the output at each place renamed to ``names[place]``."""
    if "output" in node:
        return {"output": names[at]}
    if "const" in node:
        return dict(node)
    if "dict" in node:
        return {"dict": [[k, _rename_places(c, names, f"{at}[{json.dumps(k)}]")] for k, c in node["dict"]]}  # fmt: skip
    for key in ("tuple", "list"):
        if key in node:
            return {key: [_rename_places(c, names, f"{at}[{j}]") for j, c in enumerate(node[key])]}  # fmt: skip
    return {**node, "items": [_rename_places(c, names, f"{at}[{j}]") for j, c in enumerate(node["items"])]}  # fmt: skip


__all__ = [
    "CONST_TYPES",
    "MAX_DEPTH",
    "TREE_ATTR",
    "VARIANTS_ATTR",
    "OutputStructureError",
    "TreeNode",
    "Variants",
    "build_tree",
    "check_tree",
    "check_variants",
    "constant_leaf",
    "format_structure",
    "format_tree",
    "is_constant",
    "leaves_of",
    "map_outputs",
    "output_names",
    "rename_in_attrs",
    "tree_from_spec",
    "unflatten",
    "unify_outputs",
]
