"""Output structure: what a model returns, beyond its flat tuple of tensors — the format.

A Program returns a flat tuple of named tensors. Two kinds of models return more:

* **Constant leaves.** ``{"sentence_embedding": t, "modality": "text"}``: the string (or
  an int, a float, a bool, None) is the same on every call. Capture keeps such leaves as
  *constants of the output structure*: the program's outputs are the tensor leaves only
  (named as before), and ``program.attrs["output_tree"]`` records the whole tree.
* **Path-dependent structure** (:func:`splice.ir.outputs.unify_outputs`). A model with data-dependent control
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

This module holds the format and the functions that build, check, read and rename trees
and tables; it depends on no Program, so that :class:`~splice.ir.program.Program`, capture
and the runtime can all use it. :mod:`splice.ir.outputs` builds variant tables
(:func:`~splice.ir.outputs.unify_outputs`) and re-exports these names.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.utils._pytree as pytree

from splice.errors import CaptureError, SpliceError

#: JSON node of an output tree (see the module docstring)
TreeNode = dict[str, Any]
#: JSON variant table (see the module docstring)
Variants = dict[str, Any]

TREE_ATTR = "output_tree"
VARIANTS_ATTR = "variants"
CONST_TYPES = (type(None), bool, int, float, str)
MAX_DEPTH = 64


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
# naming outputs


def output_names(out_spec: Any, n: int) -> list[str]:
    """Names of the ``n`` leaves of a torch pytree ``out_spec``, from their paths in the
    structure (``logits``, ``last_hidden_state``, ``0_1``...; ``out`` for a bare tensor), made
    identifiers and unique."""
    tree = pytree.tree_unflatten(list(range(n)), out_spec)
    leaves = pytree.tree_flatten_with_path(tree)[0]
    names: list[str] = []
    for path, _ in leaves:
        parts = []
        for k in path:
            key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
            parts.append(str(key))
        name = "_".join(parts) if parts else "out"
        name = re.sub(r"\W", "_", name)
        if not name or name[0].isdigit():
            name = f"out{name}"
        names.append(name)
    # make unique
    seen: dict[str, int] = {}
    for i, nm in enumerate(names):
        if nm in seen:
            seen[nm] += 1
            names[i] = f"{nm}_{seen[nm]}"
        else:
            seen[nm] = 0
    return names


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
]
