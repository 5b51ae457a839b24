"""Run a splice artifact with nothing but the TVM runtime and numpy (no torch, no splice).

This is the program that runs on (or for) the edge device: ``splice.runtime.edge`` starts
it with an aarch64 Python under ``qemu-aarch64``; on a real board it runs as it is::

    python edge_runner.py ARTIFACT IN_DIR OUT_DIR

``IN_DIR`` holds one ``<input name>.npy`` per input; the outputs are written to
``OUT_DIR/<output name>.npy`` (and the branch trace to ``OUT_DIR/trace.json``). A model
whose output structure is recorded (constants beside its tensors, or a structure that
depends on the path: the manifest's ``output_tree`` / ``variants``, see
``splice/ir/outputs.py``) also gets ``OUT_DIR/structure.json``: ``{"variant": k, "tree":
...}``, the structure this run returned, whose ``output`` leaves name the ``.npy`` files
(:func:`output_structure`). An artifact
with a host program (branches, several input signatures) is run by interpreting its
``host.json`` here, calling each part's library. Weights are read from
``weights.safetensors`` with a small reader of the format (a JSON header, then raw
little-endian data), so no safetensors build is needed on the device.

Before any library is opened the artifact is checked the way ``splice.load`` checks it
(this module holds the checks both share, since it cannot import splice): the manifest's
schema (:func:`check_manifest`), that every file it names is a plain file in the artifact
folder with its recorded sha256 (:func:`check_files`), that each library is a complete ELF
file for this machine (:func:`check_elf`) bound to this artifact's program and weights
(:func:`check_binding`), and that every integer input feeding an embedding has an
``index_bound`` no larger than the table's rows (:func:`embedding_rows`, a scan of
``program.ir``). A failed check prints ``error: ...`` and exits with status 2. It runs TVM
parts only: an artifact with ONNX Runtime parts (``backend="onnxruntime"``, whose manifest
schema is checked here too) is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "splice.artifact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.ir"
SAMPLES = "samples.safetensors"
DTYPE_NAMES = ("f16", "bf16", "f32", "f64", "i8", "i16", "i32", "i64", "u8", "bool", "c64",
               "c128", "f8e4m3fn", "f8e5m2")  # fmt: skip
INT_DTYPES = ("i8", "i16", "i32", "i64", "u8")
REBUILD = "rebuild the artifact with splice.compile / `splice compile`; never edit its files"

# A library's binding: JSON {"part": name, "files": {file: sha256}} naming the program files
# it was compiled from, appended to the ELF file as  JSON | u64 length | BINDING_MAGIC.
# The dynamic loader maps segments by offset and ignores bytes after the ELF contents.
BINDING_MAGIC = b"SPLICE-BINDING/1"
_BINDING_MAX = 1 << 20
# e_machine of the ELF files an artifact may hold, by the target triple's architecture
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")
_ENTRY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


# the part kinds an artifact may hold: backend -> the field naming its file
PART_BACKENDS = {"tvm": "library", "onnxruntime": "model"}


def part_file(part: dict) -> str:
    """The file a (validated) part runs: its ``library`` (TVM) or ``model`` (onnxruntime)."""
    return part["library"] if "library" in part else part["model"]


class Invalid(Exception):
    """An artifact that must not be loaded: ``message`` says what, ``hint`` what to do.

    splice raises it again as :class:`~splice.errors.ArtifactError`; the edge runner prints
    it and exits with status 2."""

    def __init__(self, message: str, hint: str | None = REBUILD) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# ---------------------------------------------------------------------------------------
# the manifest's schema


def kind_of(v: Any) -> str:
    """How a JSON value is called in messages ("a list", "null", ...)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(v), type(v).__name__)  # fmt: skip


def _bad(field: str, want: str, got: Any) -> Invalid:
    shown = repr(got) if not isinstance(got, (dict, list)) else kind_of(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return Invalid(f"manifest.json: field {field!r} must be {want}, got {shown}")


def _get(obj: dict, key: str, field: str) -> Any:
    if key not in obj:
        raise Invalid(f"manifest.json: field {field!r} is missing")
    return obj[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _obj(v: Any, field: str) -> dict:
    if not isinstance(v, dict):
        raise _bad(field, "an object", v)
    return v


def _list(v: Any, field: str) -> list:
    if not isinstance(v, list):
        raise _bad(field, "a list", v)
    return v


def _str(v: Any, field: str) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(field, "a non-empty string", v)
    return v


def file_name(v: Any, field: str) -> str:
    """``v`` if it names a plain file inside the artifact folder: one path component, no
    ``..``, no absolute path, no hidden name (compile writes only such names)."""
    if not isinstance(v, str) or not _FILE_NAME.match(v) or v in (".", ".."):
        raise _bad(field, "the name of a file in the artifact folder (no folders, no '..')", v)
    return v


def _spec(v: Any, field: str, *, named: bool, bound: bool = False) -> None:
    spec = _obj(v, field)
    if named:
        _str(_get(spec, "name", f"{field}.name"), f"{field}.name")
    shape = _list(_get(spec, "shape", f"{field}.shape"), f"{field}.shape")
    if not all(_is_int(d) and 0 <= d < 2**40 for d in shape):
        raise _bad(f"{field}.shape", "a list of non-negative integers", shape)
    dtype = _get(spec, "dtype", f"{field}.dtype")
    if dtype not in DTYPE_NAMES:
        raise _bad(f"{field}.dtype", f"one of {', '.join(DTYPE_NAMES)}", dtype)
    if "index_bound" in spec:
        b = spec["index_bound"]
        if not bound or dtype not in INT_DTYPES:
            raise Invalid(f"manifest.json: field '{field}.index_bound' on a non-index input")
        if not _is_int(b) or b < 1:
            raise _bad(f"{field}.index_bound", "a positive integer (embedding rows)", b)


def _specs(v: Any, field: str, *, named: bool, bound: bool = False) -> list:
    specs = _list(v, field)
    for i, s in enumerate(specs):
        _spec(s, f"{field}[{i}]", named=named, bound=bound)
    if named:
        names = [s["name"] for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise Invalid(f"manifest.json: field {field!r} names {dup[0]!r} twice")
    return specs


def _part(v: Any, field: str) -> None:
    part = _obj(v, field)
    _str(_get(part, "name", f"{field}.name"), f"{field}.name")
    backend = part.get("backend", "tvm")
    if backend not in PART_BACKENDS:
        raise _bad(f"{field}.backend", " or ".join(map(repr, PART_BACKENDS)), backend)
    key = PART_BACKENDS[backend]
    if key == "model" and "library" in part:
        raise Invalid(f"manifest.json: field '{field}.library' on an onnxruntime part")
    file_name(_get(part, key, f"{field}.{key}"), f"{field}.{key}")
    entry = part.get("entry", "main")
    if not isinstance(entry, str) or not _ENTRY.match(entry):
        raise _bad(f"{field}.entry", "a function name", entry)
    params = _list(_get(part, "params", f"{field}.params"), f"{field}.params")
    if not all(isinstance(p, str) and p for p in params):
        raise _bad(f"{field}.params", "a list of weight names", params)
    for key in ("inputs", "outputs"):
        if key in part:
            _specs(part[key], f"{field}.{key}", named=False)
    inplace = part.get("inplace_inputs", [])
    if not isinstance(inplace, list) or not all(isinstance(n, str) and n for n in inplace):
        raise _bad(f"{field}.inplace_inputs", "a list of input names", inplace)


def check_manifest(manifest: Any) -> dict:
    """Raise :class:`Invalid` naming the first field of ``manifest`` (parsed manifest.json)
    that a compiled artifact cannot have; return it otherwise."""
    if not isinstance(manifest, dict):
        raise Invalid(f"manifest.json must be a JSON object, got {kind_of(manifest)}")
    fmt = _get(manifest, "format", "format")
    if fmt != FORMAT:
        raise Invalid(f"manifest.json: unknown format {fmt!r}, expected {FORMAT!r}")
    target = _obj(_get(manifest, "target", "target"), "target")
    for key in ("name", "triple"):
        _str(_get(target, key, f"target.{key}"), f"target.{key}")
    if not isinstance(target.get("kind", ""), str):
        raise _bad("target.kind", "a string", target.get("kind"))
    feats = manifest.get("required_features", [])
    if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
        raise _bad("required_features", "a list of CPU feature names", feats)
    _specs(_get(manifest, "inputs", "inputs"), "inputs", named=True, bound=True)
    _specs(_get(manifest, "outputs", "outputs"), "outputs", named=True)
    parts = _list(_get(manifest, "parts", "parts"), "parts")
    if not parts:
        raise _bad("parts", "a non-empty list", parts)
    for i, p in enumerate(parts):
        _part(p, f"parts[{i}]")
    names = [p["name"] for p in parts]
    if len(set(names)) != len(names):
        raise Invalid("manifest.json: field 'parts' names one part twice")
    inputs = {i["name"] for i in manifest["inputs"]}
    for i, p in enumerate(parts):
        unknown = [n for n in p.get("inplace_inputs", []) if n not in inputs]
        if unknown or (p.get("inplace_inputs") and len(parts) != 1):
            raise _bad(f"parts[{i}].inplace_inputs", "names of the inputs of a one-part artifact",
                       p["inplace_inputs"])  # fmt: skip
    host = manifest.get("host")
    if host is not None:
        file_name(host, "host")
    elif len(parts) != 1:
        raise Invalid("manifest.json: several parts but no host program (field 'host')")
    sigs = manifest.get("signatures")
    if sigs is not None:
        for i, s in enumerate(_list(sigs, "signatures")):
            field = f"signatures[{i}]"
            s = _obj(s, field)
            for key in ("inputs", "outputs"):
                _specs(_get(s, key, f"{field}.{key}"), f"{field}.{key}", named=False)
            file_name(_get(s, "program", f"{field}.program"), f"{field}.program")
    check_output_structure(manifest)
    for key, want, ok in (("program", "a string", lambda v: isinstance(v, str)),
                          ("options", "an object", lambda v: isinstance(v, dict)),
                          ("lowering", "an object", lambda v: isinstance(v, dict)),
                          ("branches", "an integer", _is_int)):  # fmt: skip
        if key in manifest and not ok(manifest[key]):
            raise _bad(key, want, manifest[key])
    files = _obj(_get(manifest, "files", "files"), "files")
    for f, digest in files.items():
        file_name(f, f"files[{f!r}]")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise _bad(f"files[{f!r}]", "a sha256 (64 lowercase hex digits)", digest)
    needed = [WEIGHTS, PROGRAM, *(part_file(p) for p in parts), *([host] if host else []),
              *(s["program"] for s in sigs or [])]  # fmt: skip
    for f in needed:
        if f not in files:
            raise Invalid(f"manifest.json: {f} is used but not listed (with its sha256) in 'files'")
    return manifest


# the output structure (splice/ir/outputs.py keeps the same schema for programs; this
# module cannot import splice, so the checks are written again here)

_TREE_DEPTH = 64
_CONSTS = (type(None), bool, int, float, str)


def _tree(node: Any, field: str, depth: int = 0) -> list[str]:
    """The output names a tree refers to (leaf order); :class:`Invalid` if it is no tree."""
    if depth > _TREE_DEPTH:
        raise Invalid(f"manifest.json: field {field!r} is nested deeper than {_TREE_DEPTH}")
    if not isinstance(node, dict):
        raise _bad(field, "an output tree node (an object)", node)
    keys = set(node)
    if keys == {"output"}:
        return [_str(node["output"], f"{field}.output")]
    if keys == {"const"}:
        if type(node["const"]) not in _CONSTS:
            raise _bad(f"{field}.const", "null, a boolean, a number or a string", node["const"])
        return []
    if keys in ({"tuple"}, {"list"}):
        (key,) = keys
        kids = _list(node[key], f"{field}.{key}")
        return [n for k, c in enumerate(kids) for n in _tree(c, f"{field}.{key}[{k}]", depth + 1)]
    if keys == {"dict"}:
        pairs = _list(node["dict"], f"{field}.dict")
        out: list[str] = []
        for k, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) in _CONSTS):
                raise _bad(f"{field}.dict[{k}]", "a [key, node] pair", pair)
            out += _tree(pair[1], f"{field}.dict[{k}]", depth + 1)
        return out
    if keys == {"namedtuple", "fields", "items"}:
        name, fields = node["namedtuple"], _list(node["fields"], f"{field}.fields")
        if not (isinstance(name, str) and name.isidentifier()):
            raise _bad(f"{field}.namedtuple", "an identifier", name)
        if not all(isinstance(f, str) and f.isidentifier() and f[:1] != "_" for f in fields) or len(
            set(fields)
        ) != len(fields):
            raise _bad(f"{field}.fields", "distinct field names", fields)
        items = _list(node["items"], f"{field}.items")
        if len(items) != len(fields):
            raise _bad(f"{field}.items", f"a list of {len(fields)} nodes", items)
        return [n for k, c in enumerate(items) for n in _tree(c, f"{field}.items[{k}]", depth + 1)]
    raise _bad(field, "an output tree node (output, const, tuple, list, dict, namedtuple)", node)


def check_output_structure(manifest: dict) -> None:
    """``output_tree`` and ``variants``, where present, refer only to the manifest's outputs
    with the specs the outputs have (``index``: an i64[] output; per variant: its slots are
    the indices of its outputs, its specs those of the slots, or fit inside them with
    ``pad``)."""
    outputs = manifest["outputs"]
    names = [o["name"] for o in outputs]
    spec = {o["name"]: {"shape": o["shape"], "dtype": o["dtype"]} for o in outputs}

    def known(refs: list[str], field: str) -> None:
        for r in refs:
            if r not in spec:
                raise Invalid(f"manifest.json: field {field!r} names {r!r}, which is no output")

    if "output_tree" in manifest:
        known(_tree(manifest["output_tree"], "output_tree"), "output_tree")
    if "variants" not in manifest:
        return
    if "output_tree" in manifest:
        raise Invalid("manifest.json: fields 'output_tree' and 'variants' exclude each other")
    table = _obj(manifest["variants"], "variants")
    index, pad = table.get("index"), table.get("pad")
    variants = _list(_get(table, "variants", "variants.variants"), "variants.variants")
    if not variants or (index is None and len(variants) != 1):
        raise _bad("variants.variants", "a non-empty list (one entry when index is null)", variants)
    if index is not None:
        known([_str(index, "variants.index")], "variants.index")
        if spec[index] != {"shape": [], "dtype": "i64"}:
            raise _bad("variants.index", "an i64[] output", index)
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, (int, float)) or index is None:
            raise _bad("variants.pad", "a number (with an index output) or null", pad)
        known(_tree(_get(table, "tree", "variants.tree"), "variants.tree"), "variants.tree")
    for k, v in enumerate(variants):
        field = f"variants.variants[{k}]"
        v = _obj(v, field)
        refs = _tree(_get(v, "tree", f"{field}.tree"), f"{field}.tree")
        outs = _get(v, "outputs", f"{field}.outputs")
        if outs != refs:
            raise _bad(f"{field}.outputs", "the tree's outputs in leaf order", outs)
        known(refs, f"{field}.outputs")
        if _get(v, "slots", f"{field}.slots") != [names.index(r) for r in refs]:
            raise _bad(f"{field}.slots", "the indices of its outputs", v["slots"])
        specs = _specs(_get(v, "specs", f"{field}.specs"), f"{field}.specs", named=False)
        if len(specs) != len(refs):
            raise _bad(f"{field}.specs", f"{len(refs)} specs (one per output)", specs)
        for i, (s, r) in enumerate(zip(specs, refs)):
            have = spec[r]
            fits = ({"shape": s["shape"], "dtype": s["dtype"]} == have if pad is None else
                    s["dtype"] == have["dtype"] and len(s["shape"]) == len(have["shape"])
                    and all(a <= b for a, b in zip(s["shape"], have["shape"])))  # fmt: skip
            if not fits:
                raise Invalid(
                    f"manifest.json: field '{field}.specs[{i}]' does not fit output {r!r} "
                    f"({have['dtype']}{have['shape']})"
                )


def output_structure(manifest: dict, outs: list) -> dict | None:
    """What ``structure.json`` holds for one run: the variant it took and that variant's
    tree (``output`` leaves name the ``<name>.npy`` files); None without a recorded one."""
    table = manifest.get("variants")
    if table is None:
        tree = manifest.get("output_tree")
        return None if tree is None else {"variant": None, "tree": tree}
    k = 0
    if table.get("index") is not None:
        i = [o["name"] for o in manifest["outputs"]].index(table["index"])
        v = outs[i]
        k = int(v.numpy() if hasattr(v, "numpy") else v)
        if not 0 <= k < len(table["variants"]):
            raise _HostError(
                f"the variant index output {table['index']!r} is {k}; the manifest has "
                f"{len(table['variants'])} variants"
            )
    tree = table["tree"] if table.get("pad") is not None else table["variants"][k]["tree"]
    return {"variant": k, "tree": tree}


# ---------------------------------------------------------------------------------------
# files: inside the folder, unchanged, complete libraries bound to this artifact


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(root: Path, name: str) -> Path:
    """``root/name`` if it is a regular file of the folder ``root`` itself (not a link, not
    reached through one); :class:`Invalid` otherwise."""
    path = root / file_name(name, "file")
    if path.is_symlink():
        raise Invalid(f"{name} is a symbolic link; an artifact holds only plain files")
    if not path.is_file():
        raise Invalid(f"file {name} is missing")
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except ValueError:
        raise Invalid(f"{name} lies outside the artifact folder") from None
    return path


def check_files(root: Path, manifest: dict) -> None:
    """Every file the manifest lists is a plain file in ``root`` with its recorded sha256."""
    for name, digest in manifest["files"].items():
        if sha256_path(inside(root, name)) != digest:
            raise Invalid(
                f"checksum of {name} does not match the manifest (file changed or corrupt)"
            )


def split_binding(data: bytes) -> tuple[bytes, dict | None]:
    """(the ELF bytes, the binding) of a library file's contents; binding None if absent."""
    tail = len(BINDING_MAGIC) + 8
    if len(data) < tail or data[-len(BINDING_MAGIC) :] != BINDING_MAGIC:
        return data, None
    (n,) = struct.unpack("<Q", data[-tail : -len(BINDING_MAGIC)])
    if n > min(_BINDING_MAX, len(data) - tail):
        return data, None
    try:
        binding = json.loads(data[-tail - n : -tail])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return data, None
    return data[: -tail - n], binding if isinstance(binding, dict) else None


def binding_bytes(part: str, files: dict[str, str]) -> bytes:
    """The trailer that binds library ``part`` to the program ``files`` ({name: sha256})."""
    blob = json.dumps({"part": part, "files": dict(sorted(files.items()))}).encode()
    return blob + struct.pack("<Q", len(blob)) + BINDING_MAGIC


def bound_files(manifest: dict) -> dict[str, str]:
    """The files a library (or ONNX model) is bound to: all the artifact's files but the
    parts' libraries and models, and samples."""
    libs = {part_file(p) for p in manifest["parts"]}
    return {f: d for f, d in manifest["files"].items() if f not in libs and f != SAMPLES}


def library_owner(manifest: dict, library: str) -> str:
    """The part a library is bound to: the first part that calls it (parts that are the same
    computation on other weights call their twin's library with their own parameters)."""
    return next(p["name"] for p in manifest["parts"] if part_file(p) == library)


def check_binding(name: str, part: str, binding: dict | None, manifest: dict) -> None:
    """The library ``name`` of part ``part`` was compiled for this artifact's program files."""
    if binding is None:
        raise Invalid(
            f"{name} carries no splice binding: it was not written by this splice's compile "
            f"(or was compiled by an older one)"
        )
    check_bound_to(name, part, binding, bound_files(manifest), kind="library")


def check_bound_to(name: str, part: str, binding: dict, want: dict[str, str], *, kind: str) -> None:
    """The binding ``binding`` read from ``name`` (a ``kind``: library or ONNX model) names
    part ``part`` and the program files ``want`` (:func:`bound_files`); Invalid naming the
    files that differ otherwise."""
    if binding.get("part") != part or binding.get("files") != want:
        got = binding.get("files") if isinstance(binding.get("files"), dict) else {}
        which = sorted(f for f in set(want) | set(got) if want.get(f) != got.get(f))
        raise Invalid(
            f"{name} was compiled for another program: its binding (part "
            f"{binding.get('part')!r}) does not match this artifact's part {part!r} and "
            f"files ({', '.join(which) or 'part name'} differ)",
            hint=f"a {kind} from another artifact cannot be reused; " + REBUILD,
        )


def check_elf(name: str, data: bytes, arch: str | None) -> None:
    """``data`` is a complete 64-bit little-endian ELF shared object for ``arch``: every
    segment and section the headers describe lies inside it (a truncated file would fault
    when the loader touches the missing pages)."""
    size = len(data)
    if size < 64 or data[:4] != b"\x7fELF":
        raise Invalid(f"{name} is not an ELF shared library")
    if data[4] != 2 or data[5] != 1:
        raise Invalid(f"{name} is not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_type != 3:
        raise Invalid(f"{name} is not a shared library (ELF type {e_type})")
    want = ELF_MACHINES.get(arch or "")
    if want is not None and e_machine != want:
        raise Invalid(f"{name} is built for ELF machine {e_machine}, the manifest says {arch}")
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    if phentsize < 56 or phnum == 0 or phoff + phnum * phentsize > size:
        raise Invalid(f"{name} is truncated or damaged: its program headers lie past its end")
    for i in range(phnum):
        p_type, _, p_offset = struct.unpack_from("<IIQ", data, phoff + i * phentsize)
        (p_filesz,) = struct.unpack_from("<Q", data, phoff + i * phentsize + 32)
        if p_type != 0 and p_offset + p_filesz > size:
            raise Invalid(
                f"{name} is truncated: segment {i} ends at byte {p_offset + p_filesz}, "
                f"the file has {size}"
            )
    if shnum and (shentsize < 64 or shoff + shnum * shentsize > size):
        raise Invalid(f"{name} is truncated: its section headers lie past its end ({size} bytes)")
    for i in range(shnum):
        sh_type = struct.unpack_from("<I", data, shoff + i * shentsize + 4)[0]
        sh_offset, sh_size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 24)
        if sh_type not in (0, 8) and sh_offset + sh_size > size:  # NULL, NOBITS take no bytes
            raise Invalid(f"{name} is truncated: section {i} ends past the file's {size} bytes")


def check_library(root: Path, manifest: dict, part: dict) -> Path:
    """The path of ``part``'s library, after checking it is complete ELF for the artifact's
    architecture and bound to this artifact; reads the file once."""
    name = part["library"]
    path = inside(root, name)
    data, binding = split_binding(path.read_bytes())
    arch = str(manifest["target"].get("triple", "")).split("-")[0]
    check_elf(name, data, arch)
    check_binding(name, library_owner(manifest, name), binding, manifest)
    return path


# what a library says it takes: the Relax VM's parameter checks name each annotation

_TENSOR = re.compile(r'R\.Tensor\(\((.*?)\), dtype="(\w+)"\)')
_CONTEXT = re.compile(r"fn=(\w+), loc=param\[(\d+)\], param=[^,]*, annotation=(.*)", re.S)
_TVM_DTYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64",
               "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8",
               "bool": "bool"}  # fmt: skip
Spec = tuple[list[int] | None, str]


def _tensor_specs(text: str) -> list[Spec]:
    out: list[Spec] = []
    for inner, dtype in _TENSOR.findall(text):
        dims = [d.strip() for d in inner.replace("T.int64(", "").replace(")", "").split(",")]
        dims = [d for d in dims if d]
        shape = [int(d) for d in dims] if all(d.isdigit() for d in dims) else None
        out.append((shape, _TVM_DTYPES.get(dtype, dtype)))
    return out


def library_signature(stats: str, entry: str) -> tuple[dict[int, Spec], list[Spec] | None]:
    """What a Relax VM executable checks its arguments against, from its ``stats()`` text:
    (``entry``'s tensor parameters by position, the weights ``<entry>_transform_params``
    takes, or None when it has no such function or the text says nothing about it)."""
    params: dict[int, Spec] = {}
    weights = None
    for chunk in stats.split("ErrorContext(")[1:]:
        m = _CONTEXT.match(chunk.split("\n")[0])
        if not m:
            continue
        fn, i, annotation = m.group(1), int(m.group(2)), m.group(3)
        specs = _tensor_specs(annotation)
        if fn == entry and annotation.startswith("R.Tensor") and specs:
            params[i] = specs[0]
        elif fn == f"{entry}_transform_params" and i == 0 and annotation.startswith("T.Tuple"):
            weights = specs
    return params, weights


def _spec_text(spec: Spec) -> str:
    shape = "?" if spec[0] is None else ",".join(map(str, spec[0]))
    return f"{spec[1]}[{shape}]"


def check_signature(
    name: str, stats: str, entry: str, inputs: list[Spec], weights: list[Spec]
) -> None:
    """The library ``name`` (``stats``: its executable's stats text) takes ``inputs`` and,
    through its transform function, ``weights`` (shapes and dtypes in the manifest's order)."""
    params, expects = library_signature(stats, entry)
    for i, want in enumerate(inputs):
        got = params.get(i)
        if got is not None and got[0] is not None and got != want:
            raise Invalid(
                f"{name}: input {i} of {entry} is {_spec_text(got)}, the manifest says "
                f"{_spec_text(want)} (the library was compiled for another model)"
            )
    if expects is not None and expects != weights:
        diff = next((k for k, (a, b) in enumerate(zip(expects, weights)) if a != b), None)
        detail = (
            f"weight {diff} is {_spec_text(weights[diff])}, it expects {_spec_text(expects[diff])}"
            if diff is not None
            else f"it expects {len(expects)} weights, the manifest lists {len(weights)}"
        )
        raise Invalid(
            f"{name} was compiled for other weights than the manifest's part lists: {detail}"
        )


# ---------------------------------------------------------------------------------------
# index bounds: which integer inputs index which embedding table, read from program.ir

# ops whose result holds only values of their first operand (same list as compile's)
_SAME_VALUES = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.clone",
                "aten.contiguous", "aten.alias", "aten.unsqueeze", "aten.squeeze.dim",
                "aten.squeeze", "aten.flatten.using_ints", "aten.expand", "aten.slice.Tensor",
                "aten.select.int", "aten.permute", "aten.transpose.int"}  # fmt: skip
_NODE = re.compile(r"\s*%(\S+) : .*? = ([\w.]+)\((.*)\)\s*\Z")
_WEIGHT = re.compile(r"weight @(\S+) : \w+\[([0-9,]*)\]")


def embedding_rows(text: str, inputs: list[str]) -> dict[str, int]:
    """{input: rows of the smallest embedding table it indexes} from a program's text IR:
    the inputs reach ``aten.embedding``'s index operand through view-like ops only."""
    rows = {m.group(1): [int(d) for d in m.group(2).split(",") if d] for m in
            (_WEIGHT.match(ln) for ln in text.splitlines()) if m}  # fmt: skip
    origin = {n: n for n in inputs}  # value -> the input whose values it holds
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _NODE.match(line.split("  # ")[0])
        if not m:
            continue
        name, op, args = m.groups()
        first = args.split(",")[0].strip()
        if op in _SAME_VALUES and first.startswith("%") and first[1:] in origin:
            origin[name] = origin[first[1:]]
        elif op == "aten.embedding":
            operands = [a.strip() for a in args.split(",")]
            if len(operands) >= 2 and operands[1][1:] in origin and operands[0][1:] in rows:
                table = rows[operands[0][1:]]
                src = origin[operands[1][1:]]
                if table:
                    out[src] = min(out.get(src, table[0]), table[0])
    return out


def check_index_bounds(manifest: dict, text: str) -> None:
    """Every integer input that indexes an embedding in ``text`` (program.ir) has an
    ``index_bound`` no larger than the table's rows."""
    specs = manifest["inputs"]
    need = embedding_rows(text, [s["name"] for s in specs])
    for s in specs:
        rows = need.get(s["name"])
        if rows is None:
            continue
        bound = s.get("index_bound")
        if bound is None:
            raise Invalid(
                f"manifest.json: input {s['name']!r} indexes an embedding of {rows} rows but "
                f"has no 'index_bound' (out-of-range ids would read out of bounds)"
            )
        if bound > rows:
            raise Invalid(
                f"manifest.json: input {s['name']!r} has index_bound {bound}, more than the "
                f"{rows} rows of the embedding it indexes"
            )


def check_artifact(root: Path) -> dict:
    """All file-level checks of the artifact folder ``root``; returns its manifest."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Invalid(f"{MANIFEST} cannot be read: {e}") from None
    check_manifest(manifest)
    check_files(root, manifest)
    check_index_bounds(manifest, (root / PROGRAM).read_text())
    ort = [p["name"] for p in manifest["parts"] if p.get("backend") == "onnxruntime"]
    if ort:
        raise Invalid(
            f"part {ort[0]!r} runs on ONNX Runtime; the edge runner runs TVM parts only",
            hint="load it with splice.load (needs onnxruntime), or compile with backend='tvm'",
        )
    for part in manifest["parts"]:
        check_library(root, manifest, part)
    return manifest


# ---------------------------------------------------------------------------------------
# running

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: edge_runner.py ARTIFACT IN_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        return _run(*(Path(a) for a in argv[1:4]))
    except (Invalid, _HostError) as e:
        hint = getattr(e, "hint", None)
        print(f"error: {e}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
        return 2


def _run(art: Path, in_dir: Path, out_dir: Path) -> int:
    manifest = check_artifact(art)
    t0 = time.perf_counter()
    import tvm

    t_import = time.perf_counter() - t0
    weights = read_safetensors(art / WEIGHTS)
    missing = sorted({n for p in manifest["parts"] for n in p["params"]} - set(weights))
    if missing:
        raise Invalid(f"{WEIGHTS} lacks the weights {missing[:5]} that the manifest's parts use")
    names = [i["name"] for i in manifest["inputs"]]
    arrays = []
    for n in names:
        f = in_dir / f"{n}.npy"
        if not f.is_file():
            raise Invalid(f"input {n!r} is missing: no {f}", hint="write one .npy per input")
        arrays.append(np.load(f, allow_pickle=False))
    for spec, arr in zip(manifest["inputs"], arrays):
        bound = spec.get("index_bound")
        if bound is not None and arr.size and (arr.min() < 0 or arr.max() >= bound):
            raise Invalid(
                f"input {spec['name']!r} holds indices outside [0, {bound})",
                hint="token ids must be below the vocabulary size",
            )
    dev = tvm.cpu(0)
    parts = {p["name"]: _Part(art, manifest, p, weights, dev) for p in manifest["parts"]}
    inputs = [tvm.runtime.tensor(a, dev) for a in arrays]
    trace: list = []
    t1 = time.perf_counter()
    if manifest.get("host"):
        host = json.loads((art / manifest["host"]).read_text())
        consts: dict = {}
        try:
            outs = _run_block(host["main"], dict(zip(host["main"]["params"], inputs)), parts,
                              weights, consts, trace, dev)  # fmt: skip
        except (KeyError, TypeError, IndexError) as e:
            raise _HostError(f"host.json is malformed: {type(e).__name__}: {e}") from None
    else:
        outs = parts[manifest["parts"][0]["name"]](*inputs)
    t_run = time.perf_counter() - t1
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec, o in zip(manifest["outputs"], outs):
        np.save(out_dir / f"{spec['name']}.npy", o.numpy())
    structure = output_structure(manifest, outs)
    if structure is not None:
        (out_dir / "structure.json").write_text(json.dumps(structure))
    (out_dir / "timing.json").write_text(json.dumps({"import_s": t_import, "run_s": t_run}))
    (out_dir / "trace.json").write_text(json.dumps(trace))
    return 0


class _HostError(Exception):
    pass


class _Part:
    """One compiled part: its Relax VM and its (transformed) weights."""

    def __init__(self, art: Path, manifest: dict, part: dict, weights: dict, dev) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        path = check_library(art, manifest, part)  # again, right before the loader maps it
        self.entry = part.get("entry", "main")
        n_in = len(part["inputs"]) if "inputs" in part else len(manifest["inputs"])
        specs = part["inputs"] if "inputs" in part else manifest["inputs"]
        mine = [(list(w.shape), _DTYPE_NAMES.get(w.dtype, str(w.dtype))) for w in
                (weights[n] for n in part["params"])]  # fmt: skip
        try:
            lib = tvm.runtime.load_module(str(path))
            stats = lib["stats"]() if lib.implements_function("stats") else ""
        except Exception as e:
            raise Invalid(f"{part['library']} cannot be loaded: {type(e).__name__}: {e}") from None
        check_signature(part["library"], str(stats), self.entry,
                        [(list(s["shape"]), s["dtype"]) for s in specs], mine)  # fmt: skip
        try:
            self.vm = VirtualMachine(lib, dev)
            params = [tvm.runtime.tensor(weights[n], dev) for n in part["params"]]
            transform = f"{self.entry}_transform_params"
            if params and self.vm.module.implements_function(transform):
                params = list(self.vm[transform](params))
            arity = self.vm._get_function_arity(self.entry)
        except Exception as e:  # TVM's own checks of the weights' count, shapes and dtypes
            raise Invalid(
                f"part {part['name']!r}: {part['library']} does not accept the manifest's "
                f"weights: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            ) from None
        if arity != n_in + len(params):
            raise Invalid(
                f"part {part['name']!r}: {self.entry} of {part['library']} takes {arity} "
                f"arguments, the manifest gives {n_in} inputs and {len(params)} weights"
            )
        self.params = params

    def __call__(self, *values) -> list:
        out = self.vm[self.entry](*values, *self.params)
        return list(out) if hasattr(out, "__len__") else [out]


_DTYPE_NAMES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.float64): "f64",
    np.dtype(np.int64): "i64",
    np.dtype(np.int32): "i32",
    np.dtype(np.int16): "i16",
    np.dtype(np.int8): "i8",
    np.dtype(np.uint8): "u8",
    np.dtype(np.bool_): "bool",
}


def _run_block(block, env, parts, weights, consts, trace, dev) -> list:
    """Interpret a ``splice-host/1`` block (see splice/runtime/host.py) with numpy + TVM.

    ``trace`` receives ``["branch", site, taken]`` and ``["signature", k]`` entries."""
    import tvm

    for step in block["body"]:
        op = step["op"]
        if op == "call":
            outs = parts[step["part"]](*(env[a] for a in step["args"]))
        elif op == "const":
            w = step["weight"]
            if w not in consts:
                consts[w] = tvm.runtime.tensor(weights[w], dev)
            env[step["result"]] = consts[w]
            continue
        elif op == "eq":
            v = env[step["arg"]]
            env[step["result"]] = np.asarray(
                (v.numpy() if hasattr(v, "numpy") else v) == step["value"]
            )
            continue
        elif op == "branch":
            v = env[step["pred"]]
            taken = bool(v.numpy() if hasattr(v, "numpy") else v)
            trace.append(["branch", step.get("site"), taken])
            sub = step["then"] if taken else step["else"]
            inner = dict(env)
            inner.update(zip(sub["params"], (env[a] for a in step["args"])))
            outs = _run_block(sub, inner, parts, weights, consts, trace, dev)
        elif op == "signature":
            args = [env[a] for a in step["args"]]
            have = [
                (list(a.shape), _DTYPE_NAMES.get(np.dtype(a.dtype), str(a.dtype))) for a in args
            ]
            wanted = [[(list(i["shape"]), i["dtype"]) for i in c["inputs"]] for c in step["cases"]]
            if have not in wanted:
                raise _HostError(f"inputs {have} match none of the compiled signatures")
            k = wanted.index(have)
            case = step["cases"][k]
            trace.append(["signature", k])
            sub = case["block"]
            inner = dict(env)
            inner.update(zip(sub["params"], args))
            outs = _run_block(sub, inner, parts, weights, consts, trace, dev)
        else:
            raise _HostError(f"unknown host step {op!r}")
        for r, o in zip(step["results"], outs):
            env[r] = o
    return [env[r] for r in block["results"]]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
