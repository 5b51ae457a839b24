"""Output structure: what a model returns, beyond its flat tuple of tensors.

A Program returns a flat tuple of named tensors. Two kinds of models return more:

* **Constant leaves.** ``{"sentence_embedding": t, "modality": "text"}``: the string (or
  an int, a float, a bool, None) is the same on every call. Capture keeps such leaves as
  *constants of the output structure*: the program's outputs are the tensor leaves only
  (named as before), and ``program.attrs["output_tree"]`` records the whole tree.
* **Path-dependent structure** (:func:`unify_outputs`). A model with data-dependent control
  flow may return a structure that depends on the path: an adaptive network returns the
  list of the classifier outputs computed so far, a greedy decoder a shorter sequence when
  it stops early. Each distinct structure is a *variant*; the program returns one fixed
  layout (a variant index, then every variant's *slots*) and
  ``program.attrs["variants"]`` records the variant table.

Either way, :meth:`Program.unflatten <splice.ir.program.Program.unflatten>` (and the same
method of a loaded artifact) rebuilds the user's structure from the flat outputs, and
calling the program returns it. Programs whose outputs are all tensors record nothing:
calling them returns one tensor or a tuple, as it always did.

**The tree** (JSON; it is data, never code): a node is one of ::

    {"output": NAME}                     a tensor leaf: the program output named NAME
    {"const": null | bool | int | float | str}
    {"tuple": [NODE...]}   {"list": [NODE...]}
    {"dict": [[KEY, NODE]...]}           KEY: str, int, float, bool or null; order kept
    {"namedtuple": NAME, "fields": [FIELD...], "items": [NODE...]}

Dict-like containers (``OrderedDict``, ``defaultdict``, transformers' ``ModelOutput``) are
recorded and rebuilt as ``dict``; a namedtuple as a namedtuple type of the same name and
fields (created from the data, not imported). Other container types and other constants
(a dtype, a device, an object) cannot be recorded: capture raises a
:class:`~splice.errors.CaptureError` naming the output.

**The variant table** (``attrs["variants"]``, and the artifact manifest's ``variants``)::

    {"index": "variant" | null,  the int64 0-d output holding the variant (null: only one)
     "pad": null | NUMBER,        the fill value of the fixed-shape (padded) layout
     "tree": NODE,                pad only: the one padded structure every call returns
     "variants": [{"tree": NODE, "slots": [int...], "outputs": [NAME...],
                   "specs": [{"shape": [...], "dtype": "f32"}...]}...]}

Per variant: its own tree (whose ``output`` leaves name its slots), the indices of its
slots among the program outputs, their names, and its own output specs (with ``pad``, the
unpadded shapes; the slot holds them at its leading corner, the rest is the fill value).
"""

from __future__ import annotations

import collections
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from splice.errors import CaptureError, SpliceError
from splice.ir import meta as M
from splice.ir.program import Program

#: JSON node of an output tree (see the module docstring)
TreeNode = dict[str, Any]
#: JSON variant table (see the module docstring)
Variants = dict[str, Any]

TREE_ATTR = "output_tree"
VARIANTS_ATTR = "variants"
CONST_TYPES = (type(None), bool, int, float, str)
MAX_DEPTH = 64

_aten = torch.ops.aten


class OutputStructureError(SpliceError):
    """A recorded output tree or variant table that does not fit the program's outputs."""


# ---------------------------------------------------------------------------------------
# building trees


def is_constant(v: Any) -> bool:
    """Whether ``v`` can be a constant leaf of an output tree (JSON scalars only)."""
    return type(v) in CONST_TYPES


def tree_from_spec(
    spec: pytree.TreeSpec,
    leaves: Sequence[Any],
    leaf: Callable[[int, Any, str], TreeNode],
    *,
    where: str = "the model",
) -> TreeNode:
    """The tree of ``spec`` (a torch pytree TreeSpec) over ``leaves``.

    ``leaf(i, value, path)`` gives the node of leaf ``i`` (``path`` is its place in the
    output, e.g. ``['l'][2]``, for messages). A container the tree cannot hold raises
    CaptureError naming it."""
    it = iter(enumerate(leaves))

    def walk(s: pytree.TreeSpec, path: str, depth: int) -> TreeNode:
        if depth > MAX_DEPTH:
            raise CaptureError(
                f"the output of {where} is nested deeper than {MAX_DEPTH} levels",
                where=f"output {path}",
                hint="return a flatter structure",
            )
        if s.is_leaf():
            i, v = next(it)
            return leaf(i, v, path)
        t, ctx, kids = s.type, s.context, s.children()
        if t is tuple or t is list:
            items = [walk(c, f"{path}[{k}]", depth + 1) for k, c in enumerate(kids)]
            return {"tuple" if t is tuple else "list": items}
        if t is collections.namedtuple or (isinstance(ctx, type) and hasattr(ctx, "_fields")):
            cls = ctx if isinstance(ctx, type) else t
            fields = list(cls._fields)
            items = [walk(c, f"{path}.{f}", depth + 1) for f, c in zip(fields, kids)]
            return {"namedtuple": cls.__name__, "fields": fields, "items": items}
        keys: Any = None
        if isinstance(t, type) and issubclass(t, dict):
            keys = ctx[1] if t is collections.defaultdict else ctx
        elif isinstance(ctx, (list, tuple)) and all(isinstance(k, str) for k in ctx):
            keys = ctx  # a keyed container registered with pytree (context = its keys)
        if (
            isinstance(keys, (list, tuple))
            and len(keys) == len(kids)
            and all(is_constant(k) for k in keys)
        ):
            return {"dict": [[k, walk(c, f"{path}[{k!r}]", depth + 1)] for k, c in zip(keys, kids)]}
        name = getattr(t, "__qualname__", None) or repr(t)
        raise CaptureError(
            f"the output of {where} holds a {name} at {path or 'the top'}, a container "
            "splice cannot record in a program's output structure",
            where=f"output {path or '<root>'}",
            hint="return tuples, lists, dicts or namedtuples of tensors and constants",
        )

    return walk(spec, "", 0)


def constant_leaf(value: Any, path: str, where: str) -> TreeNode:
    """``{"const": value}``; CaptureError when ``value`` is not a JSON scalar."""
    if not is_constant(value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CaptureError(
            f"output {path or '<root>'} of {where} is a {type(value).__name__} ({shown}); a "
            "program keeps only tensors, and None, bool, int, float or str as constants of "
            "its output structure",
            where=f"output {path or '<root>'}",
            hint="return it as a tensor, turn it into one of those types, or leave it out "
            "of forward's result (wrap the model in a module whose forward drops it)",
        )
    return {"const": value}


# ---------------------------------------------------------------------------------------
# reading trees


def check_tree(node: Any, path: str = "tree", depth: int = 0) -> list[str]:
    """The output names ``node`` refers to, in leaf order; ValueError naming the first bad
    field (``path``) when ``node`` is not a tree of the module docstring's grammar."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict) or len(node) not in (1, 3):
        raise ValueError(f"{path}: must be an object with one of output, const, tuple, list, dict")
    if "output" in node and len(node) == 1:
        if not isinstance(node["output"], str) or not node["output"]:
            raise ValueError(f"{path}.output: must be an output name")
        return [node["output"]]
    if "const" in node and len(node) == 1:
        if not is_constant(node["const"]):
            raise ValueError(f"{path}.const: must be null, a boolean, a number or a string")
        return []
    for key in ("tuple", "list"):
        if key in node and len(node) == 1:
            if not isinstance(node[key], list):
                raise ValueError(f"{path}.{key}: must be a list")
            return [n for k, c in enumerate(node[key]) for n in check_tree(c, f"{path}.{key}[{k}]", depth + 1)]  # fmt: skip
    if "dict" in node and len(node) == 1:
        pairs = node["dict"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and is_constant(p[0]) for p in pairs
        ):
            raise ValueError(f"{path}.dict: must be a list of [key, node] pairs")
        return [n for k, p in enumerate(pairs) for n in check_tree(p[1], f"{path}.dict[{k}]", depth + 1)]  # fmt: skip
    if "namedtuple" in node and len(node) == 3:
        name, fields, items = node["namedtuple"], node.get("fields"), node.get("items")
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"{path}.namedtuple: must be an identifier")
        if (
            not isinstance(fields, list)
            or not all(
                isinstance(f, str) and f.isidentifier() and not f.startswith("_") for f in fields
            )
            or len(set(fields)) != len(fields)
        ):
            raise ValueError(f"{path}.fields: must be distinct field names")
        if not isinstance(items, list) or len(items) != len(fields):
            raise ValueError(f"{path}.items: must be a list of {len(fields)} nodes")
        return [n for k, c in enumerate(items) for n in check_tree(c, f"{path}.items[{k}]", depth + 1)]  # fmt: skip
    raise ValueError(f"{path}: must be an object with one of output, const, tuple, list, dict")


@functools.cache
def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    return collections.namedtuple(name, fields)  # type: ignore[misc]


def build_tree(node: TreeNode, value: Callable[[str], Any]) -> Any:
    """The structure ``node`` describes, with ``value(name)`` at each output leaf."""
    if "output" in node:
        return value(node["output"])
    if "const" in node:
        return node["const"]
    if "tuple" in node:
        return tuple(build_tree(c, value) for c in node["tuple"])
    if "list" in node:
        return [build_tree(c, value) for c in node["list"]]
    if "dict" in node:
        return {k: build_tree(c, value) for k, c in node["dict"]}
    cls = _namedtuple(node["namedtuple"], tuple(node["fields"]))
    return cls(*(build_tree(c, value) for c in node["items"]))


def leaves_of(node: TreeNode) -> list[TreeNode]:
    """The leaf nodes (``output`` and ``const``) of a tree, in order."""
    if "output" in node or "const" in node:
        return [node]
    if "dict" in node:
        kids = [c for _, c in node["dict"]]
    else:
        kids = node.get("tuple", node.get("list", node.get("items", [])))
    return [leaf for c in kids for leaf in leaves_of(c)]


def map_outputs(node: TreeNode, fn: Callable[[str], str]) -> TreeNode:
    """A copy of ``node`` whose output leaves are renamed by ``fn``."""
    if "output" in node:
        return {"output": fn(node["output"])}
    if "const" in node:
        return dict(node)
    if "dict" in node:
        return {"dict": [[k, map_outputs(c, fn)] for k, c in node["dict"]]}
    for key in ("tuple", "list"):
        if key in node:
            return {key: [map_outputs(c, fn) for c in node[key]]}
    return {**node, "items": [map_outputs(c, fn) for c in node["items"]]}


def rename_in_attrs(attrs: dict[str, Any], renames: Mapping[str, str]) -> None:
    """Rename output references in a program's ``output_tree`` and ``variants`` attrs."""

    def fn(name: str) -> str:
        return renames.get(name, name)

    tree = attrs.get(TREE_ATTR)
    if isinstance(tree, dict):
        try:
            check_tree(tree)
        except ValueError:
            return
        attrs[TREE_ATTR] = map_outputs(tree, fn)
    table = attrs.get(VARIANTS_ATTR)
    if isinstance(table, dict) and isinstance(table.get("variants"), list):
        try:
            for v in table["variants"]:
                check_tree(v["tree"])
            if table.get("pad") is not None:
                check_tree(table["tree"])
        except (ValueError, TypeError, KeyError):
            return
        new = dict(table)
        if new.get("index") is not None:
            new["index"] = fn(new["index"])
        if new.get("pad") is not None:
            new["tree"] = map_outputs(table["tree"], fn)
        new["variants"] = [
            {
                **v,
                "tree": map_outputs(v["tree"], fn),
                "outputs": [fn(o) for o in v.get("outputs", [])],
            }
            for v in table["variants"]
        ]
        attrs[VARIANTS_ATTR] = new


def format_tree(node: TreeNode) -> str:
    """One-line text of a tree: ``{'emb': %sentence_embedding, 'modality': 'text'}``."""
    if "output" in node:
        return f"%{node['output']}"
    if "const" in node:
        return repr(node["const"])
    if "tuple" in node:
        items = [format_tree(c) for c in node["tuple"]]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if "list" in node:
        return "[" + ", ".join(format_tree(c) for c in node["list"]) + "]"
    if "dict" in node:
        return "{" + ", ".join(f"{k!r}: {format_tree(c)}" for k, c in node["dict"]) + "}"
    body = ", ".join(f"{f}={format_tree(c)}" for f, c in zip(node["fields"], node["items"]))
    return f"{node['namedtuple']}({body})"


def format_structure(attrs: Mapping[str, Any], specs: Mapping[str, str] | None = None) -> str:
    """The output structure recorded in ``attrs`` (a program's attrs or an artifact's
    manifest) as text lines, for ``splice show``; empty when none is recorded. ``specs``:
    output name -> spec text, shown beside a variant's outputs when no own specs are given."""
    tree, table = attrs.get(TREE_ATTR), attrs.get(VARIANTS_ATTR)
    lines: list[str] = []
    if isinstance(tree, dict):
        lines.append(f"output structure: {format_tree(tree)}")
    if isinstance(table, dict) and isinstance(table.get("variants"), list):
        variants = table["variants"]
        head = f"output variants: {len(variants)}"
        if table.get("index") is not None:
            head += f", chosen by output %{table['index']}"
        if table.get("pad") is not None:
            head += f"; padded with {table['pad']!r} to {format_tree(table['tree'])}"
        lines.append(head)
        for k, v in enumerate(variants):
            shown = []
            for o, sp in zip(v.get("outputs", []), v.get("specs", [])):
                text = (
                    f"{sp.get('dtype')}{list(sp.get('shape', []))}" if isinstance(sp, dict) else "?"
                )
                shown.append(f"%{o}: {text}")
            lines.append(f"  variant {k}: {format_tree(v['tree'])}")
            if shown:
                lines.append(f"    outputs {', '.join(shown)}  (slots {v.get('slots')})")
    return "\n".join(lines) + ("\n" if lines else "")


def check_variants(table: Any, names: Sequence[str], specs: Sequence[Any] | None) -> None:
    """ValueError naming the first field of a variant table that does not fit a program
    with outputs ``names`` (and ``specs``: ``{"shape", "dtype"}`` dicts, when known)."""
    if not isinstance(table, dict):
        raise ValueError("variants: must be an object")
    index, pad, variants = table.get("index"), table.get("pad"), table.get("variants")
    if index is not None and index not in names:
        raise ValueError(f"variants.index: {index!r} is not an output")
    if pad is not None and (
        isinstance(pad, bool) or not isinstance(pad, (int, float)) or index is None
    ):
        raise ValueError("variants.pad: must be a number (with an index output) or null")
    if not isinstance(variants, list) or not variants or (index is None and len(variants) != 1):
        raise ValueError("variants.variants: must be a non-empty list (one entry without index)")
    if index is not None and specs is not None:
        ispec = specs[list(names).index(index)]
        if ispec != {"shape": [], "dtype": "i64"}:
            raise ValueError(f"variants.index: output {index!r} must be i64[], not {ispec}")
    if pad is not None:
        refs = check_tree(table.get("tree"), "variants.tree")
        _known(refs, names, "variants.tree")
    for k, v in enumerate(variants):
        at = f"variants.variants[{k}]"
        if not isinstance(v, dict):
            raise ValueError(f"{at}: must be an object")
        refs = check_tree(v.get("tree"), f"{at}.tree")
        outs, slots, vspecs = v.get("outputs"), v.get("slots"), v.get("specs")
        if not isinstance(outs, list) or refs != outs:
            raise ValueError(f"{at}.outputs: must list the tree's outputs in leaf order")
        _known(outs, names, f"{at}.outputs")
        if slots != [list(names).index(o) for o in outs]:
            raise ValueError(f"{at}.slots: must be the indices of its outputs")
        if not isinstance(vspecs, list) or len(vspecs) != len(outs):
            raise ValueError(f"{at}.specs: must have one spec per output")
        for i, (s, slot) in enumerate(zip(vspecs, slots)):
            if not (
                isinstance(s, dict)
                and set(s) == {"shape", "dtype"}
                and isinstance(s["shape"], list)
                and all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s["shape"]
                )
                and isinstance(s["dtype"], str)
            ):
                raise ValueError(f"{at}.specs[{i}]: must be {{shape, dtype}}")
            if specs is None:
                continue
            have = specs[slot]
            fits = (
                s == have
                if pad is None
                else have["dtype"] == s["dtype"]
                and len(have["shape"]) == len(s["shape"])
                and all(a <= b for a, b in zip(s["shape"], have["shape"]))
            )
            if not fits:
                raise ValueError(f"{at}.specs[{i}]: {s} does not fit output {outs[i]!r} ({have})")


def _known(refs: Sequence[str], names: Sequence[str], at: str) -> None:
    unknown = [r for r in refs if r not in names]
    if unknown:
        raise ValueError(f"{at}: {unknown[0]!r} is not an output of the program")


def unflatten(
    outputs: Sequence[Any],
    names: Sequence[str],
    attrs: Mapping[str, Any],
    *,
    error: Callable[[str, str | None], Exception] | None = None,
) -> Any:
    """The user's structure from flat ``outputs`` (in ``names`` order), as ``attrs``
    (``output_tree`` / ``variants``, from a program or a manifest) describe it; without
    either, one value for one output and a tuple otherwise."""
    err = error or (lambda msg, hint: OutputStructureError(msg, hint=hint))
    if len(outputs) != len(names):
        raise err(f"{len(outputs)} outputs given, the program has {len(names)}", None)
    by_name = dict(zip(names, outputs))
    table = attrs.get(VARIANTS_ATTR)
    tree = attrs.get(TREE_ATTR)
    if table is None and tree is None:
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    try:
        if table is not None:
            check_variants(table, names, None)
        else:
            _known(check_tree(tree, TREE_ATTR), names, TREE_ATTR)
    except ValueError as e:
        raise err(
            f"the recorded output structure does not fit the outputs {list(names)}: {e}",
            "a pass changed the outputs without updating attrs['output_tree'/'variants']",
        ) from None
    if table is None:
        return build_tree(tree, by_name.__getitem__)
    if table.get("pad") is not None:
        return build_tree(table["tree"], by_name.__getitem__)
    k = 0
    if table.get("index") is not None:
        k = int(by_name[table["index"]])
        if not 0 <= k < len(table["variants"]):
            raise err(
                f"the variant index output {table['index']!r} is {k}; the program has "
                f"{len(table['variants'])} variants",
                None,
            )
    return build_tree(table["variants"][k]["tree"], by_name.__getitem__)


# ---------------------------------------------------------------------------------------
# unify_outputs: one layout for the paths of a dynamic program


def _path_leaves(
    i: int, program: Program, tree: pytree.TreeSpec | TreeNode
) -> tuple[TreeNode, list[tuple[str, Any]]]:
    """Path ``i``'s tree with outputs renamed to its leaf names, and its leaves: per tensor
    leaf ``(leaf name, output node)`` in order."""
    from splice.ir.capture import _output_names

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
    names = _output_names(tree, n_leaves) if n_leaves else []
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


def _spec_json(s: M.TensorSpec) -> dict[str, Any]:
    return {"shape": [int(d) for d in s.shape], "dtype": M.dtype_name(s.dtype)}


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
        key = json.dumps([node, [_spec_json(s) for s in specs]], sort_keys=True)
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
    from splice.ir.rewriter import Rewriter

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
                "specs": [_spec_json(s) for s in specs],
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
                "specs": [_spec_json(path_at[i][at][1]) for at in ats],
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
    "TREE_ATTR",
    "VARIANTS_ATTR",
    "OutputStructureError",
    "TreeNode",
    "Variants",
    "build_tree",
    "check_tree",
    "check_variants",
    "format_structure",
    "format_tree",
    "leaves_of",
    "map_outputs",
    "rename_in_attrs",
    "tree_from_spec",
    "unflatten",
    "unify_outputs",
]
