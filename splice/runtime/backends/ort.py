"""The ONNX Runtime backend: a part as an ``.onnx`` model run by an ``InferenceSession``.

Compile side (:func:`lower`, :func:`write_model`, :func:`bind_model`):

1. **Export.** :func:`splice.runtime.backends.onnx.to_onnx` turns the (prepared) part into
   an ONNX model; its inputs and outputs are the part's, in order (an input the model does
   not read is kept as an unused graph input, so that parts are called positionally).
2. **Weights, stored once.** The artifact already holds every weight in
   ``weights.safetensors`` (the reference program reads it). :func:`write_model` points each
   initializer whose bytes equal a tensor of that file at those bytes with ONNX external
   data (``location=weights.safetensors``, ``offset``, ``length``: safetensors stores raw
   little-endian data after its JSON header, which is ONNX's raw layout), so the ``.onnx``
   holds the graph and only the constants the program does not have as weights (folded
   masks, scalars). The model stays a standard ONNX model: any ONNX tool can open it in
   the artifact folder.
3. **Binding.** :func:`bind_model` records in the model's ``metadata_props``
   (``splice.binding``) the part's name and the sha256 of the program files it was
   compiled with, as the TVM backend appends them to a ``.so``; loading refuses a model
   copied from another artifact.

Run side: :func:`check_model` reads the file as ONNX before any session sees it (a
truncated or non-ONNX file, a missing or foreign binding, external data outside
``weights.safetensors`` or past its end, inputs/outputs other than the part's: all
:class:`~splice.errors.ArtifactError`), then :class:`ORTPart` makes the session:
``ORT_ENABLE_ALL`` graph optimisations, the CPU execution provider, and intra-op threads
as the TVM backend sets its threads (``num_threads``, else every core of this machine).

onnx and onnxruntime are imported lazily; without them :func:`require_ort` raises a
LoweringError naming the extra to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError, LoweringError
from splice.ir import meta as M
from splice.ir.program import Program
from splice.runtime import edge_runner as E

ORT_EXTRA = "pip install 'splice[onnx]'  (onnx, onnxscript, onnxruntime)"
BINDING_KEY = "splice.binding"
# initializers smaller than this stay inside the .onnx (scalars, tiny constants)
EXTERNAL_MIN_BYTES = 64

# ONNX TensorProto data types <-> splice dtype names (the manifest's)
_ONNX_DTYPES = {1: "f32", 2: "u8", 3: "i8", 5: "i16", 6: "i32", 7: "i64", 9: "bool",
                10: "f16", 11: "f64", 14: "c64", 15: "c128", 16: "bf16", 17: "f8e4m3fn",
                19: "f8e5m2"}  # fmt: skip


def require_ort() -> Any:
    """Import onnxruntime (and onnx), or raise LoweringError naming the extra to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise LoweringError(
            f"the onnxruntime backend needs onnx and onnxruntime, which are not importable ({e})",
            hint=ORT_EXTRA,
        ) from e
    return onnxruntime


def backend_versions() -> dict[str, str]:
    """The versions an artifact's manifest records (``onnxruntime_version``, ``onnx_version``)."""
    import onnx

    ort = require_ort()
    return {"onnxruntime_version": ort.__version__, "onnx_version": onnx.__version__}


# ---------------------------------------------------------------------------------------
# compile side


def lower(program: Program, *, opset: int | None = None) -> Any:
    """``program`` as an ``onnx.ModelProto`` whose graph inputs and outputs are the
    program's, in order (weights as initializers, held in memory until :func:`write_model`).

    LoweringError when the exporter cannot express the program (it names the node) or the
    exported model's inputs or outputs do not correspond to the program's."""
    require_ort()
    from splice.runtime.backends import onnx as onnx_backend

    kwargs = {} if opset is None else {"opset": opset}
    model = onnx_backend.to_onnx(program, **kwargs)
    _align_inputs(model, program)
    n_out = len(model.graph.output)
    if n_out != len(program.output_specs):
        raise LoweringError(
            f"the ONNX model of {program.name!r} has {n_out} outputs, the program "
            f"{len(program.output_specs)}",
            hint="this is a bug in the ONNX exporter (splice/runtime/backends/onnx.py); "
            "compile with backend='tvm' meanwhile",
        )
    return model


def _align_inputs(model: Any, program: Program) -> None:
    """Make the graph's inputs the program's inputs in order: exporters drop inputs the graph
    does not read, and a part is called positionally, so those come back as unused inputs."""
    from onnx import helper

    graph = model.graph
    have = {i.name: i for i in graph.input}
    names = list(program.input_names)
    if [i.name for i in graph.input] == names:
        return
    extra = sorted(set(have) - set(names))
    if extra:
        raise LoweringError(
            f"the ONNX model of {program.name!r} has inputs {extra[:5]} that the program "
            f"does not (program inputs: {names})",
            hint="this is a bug in the ONNX exporter (splice/runtime/backends/onnx.py); "
            "compile with backend='tvm' meanwhile",
        )
    new = []
    for name, spec in zip(names, program.input_specs):
        if name in have:
            new.append(have[name])
        else:
            elem = _onnx_elem_type(spec.dtype)
            new.append(helper.make_tensor_value_info(name, elem, list(spec.shape)))
    del graph.input[:]
    graph.input.extend(new)


def _onnx_elem_type(dtype: torch.dtype) -> int:
    name = M.dtype_name(dtype)
    for code, n in _ONNX_DTYPES.items():
        if n == name:
            return code
    raise LoweringError(f"dtype {dtype} has no ONNX element type")


def safetensors_layout(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """{name: (dtype, shape, absolute offset, length)} of a safetensors file's tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ArtifactError(f"{path.name} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ArtifactError(f"{path.name} has no valid safetensors header: {e}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        start, end = info["data_offsets"]
        out[name] = (str(info["dtype"]), list(info["shape"]), 8 + n + int(start), end - start)
    return out


def write_model(model: Any, path: Path, weights_file: Path) -> list[str]:
    """Write ``model`` to ``path``, its large initializers pointed at the equal tensors of
    ``weights_file`` (the artifact's ``weights.safetensors``, in the same folder) as ONNX
    external data; returns the names of the initializers stored that way.

    An initializer is matched by its raw bytes, not its name (the exporter may rename; its
    own shape and element type stay in the model); one that matches no weight stays inside."""
    import onnx
    from onnx import numpy_helper

    layout = safetensors_layout(weights_file)
    sizes = {_nbytes(init) for init in model.graph.initializer}
    where: dict[tuple[int, str], int] = {}  # (length, sha256) -> offset, each tensor read once
    with open(weights_file, "rb") as f:
        for _, _, offset, length in layout.values():
            if length >= EXTERNAL_MIN_BYTES and length in sizes:
                f.seek(offset)
                where.setdefault((length, hashlib.sha256(f.read(length)).hexdigest()), offset)
    external: list[str] = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise LoweringError(
                f"the ONNX model's initializer {init.name!r} already has external data",
                hint="this is a bug in the ONNX exporter's in-memory model",
            )
        arr = numpy_helper.to_array(init)
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        offset = where.get((len(data), hashlib.sha256(data).hexdigest()))
        if len(data) >= EXTERNAL_MIN_BYTES and offset is not None:
            _point_at(init, weights_file.name, offset, len(data))
            external.append(init.name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return external


def _nbytes(init: Any) -> int:
    """The bytes of an initializer's data (element count x element size)."""
    from onnx import helper

    n = 1
    for d in init.dims:
        n *= d
    return n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _point_at(init: Any, location: str, offset: int, length: int) -> None:
    import onnx

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):  # fmt: skip
        init.ClearField(field)
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def bind_model(path: Path, part: str, files: dict[str, str]) -> None:
    """Record in the model at ``path`` that it is part ``part`` compiled with ``files``
    ({name: sha256}), in its ``metadata_props`` (rewritten in place, atomically)."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    props = [p for p in model.metadata_props if p.key != BINDING_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key = BINDING_KEY
    entry.value = json.dumps({"part": part, "files": dict(sorted(files.items()))})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# load side


def check_model(
    root: Path,
    name: str,
    *,
    part: str,
    bound: dict[str, str],
    weights_file: str,
    inputs: Sequence[dict[str, Any]],
    outputs: Sequence[dict[str, Any]] | None,
) -> Path:
    """The path of the model ``name`` in ``root``, after checking that it parses as ONNX, is
    bound to part ``part`` and the files ``bound``, reads external data only from
    ``weights_file`` within its size, and has the inputs (and outputs, where given) the
    manifest lists (shapes and dtypes). ArtifactError naming the first problem otherwise."""
    import onnx
    from google.protobuf.message import DecodeError

    path = root / name
    hint = E.REBUILD
    try:
        model = onnx.ModelProto.FromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ArtifactError(
            f"{name} is not an ONNX model (it does not parse: {e})", where=str(root), hint=hint
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise ArtifactError(
            f"{name} is not an ONNX model (no graph or no opset)", where=str(root), hint=hint
        )
    props = {p.key: p.value for p in model.metadata_props}
    try:
        binding = json.loads(props[BINDING_KEY])
    except (KeyError, ValueError, RecursionError):
        binding = None
    if not isinstance(binding, dict):
        raise ArtifactError(
            f"{name} carries no splice binding: it was not written by this splice's compile",
            where=str(root),
            hint=hint,
        )
    try:
        E.check_bound_to(name, part, binding, bound, kind="model")
    except E.Invalid as e:
        raise ArtifactError(e.message, where=str(root), hint=e.hint) from None
    size = (root / weights_file).stat().st_size
    for init in _all_initializers(model.graph):
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        try:
            offset, length = int(ext.get("offset", "0")), int(ext["length"])
        except (KeyError, ValueError):
            offset, length = -1, -1
        if (
            ext.get("location") != weights_file
            or offset < 0
            or length < 0
            or offset + length > size
        ):
            raise ArtifactError(
                f"{name}: tensor {init.name!r} reads external data {ext} outside "
                f"{weights_file} ({size} bytes)",
                where=str(root),
                hint=hint,
            )
    _check_io(name, "inputs", model.graph.input, inputs, root, hint)
    if outputs is not None:
        _check_io(name, "outputs", model.graph.output, outputs, root, hint)
    return path


def _all_initializers(graph: Any) -> list[Any]:
    """Every tensor of ``graph`` that may hold external data: initializers (sparse ones'
    values and indices too), tensor attributes (``Constant``), in it and in every subgraph
    (``If``/``Loop`` bodies)."""
    out = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        out += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            out += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
                attr.sparse_tensors
            ):
                out += [sparse.values, sparse.indices]
            subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for g in subs:
                out += _all_initializers(g)
    return out


def _check_io(
    name: str, kind: str, values: Any, want: Sequence[dict[str, Any]], root: Path, hint: str
) -> None:
    have = list(values)
    if len(have) != len(want):
        raise ArtifactError(
            f"{name} has {len(have)} {kind}, the manifest lists {len(want)}",
            where=str(root),
            hint=hint,
        )
    for i, (v, spec) in enumerate(zip(have, want)):
        t = v.type.tensor_type
        dtype = _ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shape_ok = not t.HasField("shape") or all(
            d is None or d == s for d, s in zip(dims, spec["shape"])
        )
        if dtype != spec["dtype"] or (t.HasField("shape") and len(dims) != len(spec["shape"])):
            shape_ok = False
        if not shape_ok:
            shown = "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"
            raise ArtifactError(
                f"{name}: {kind[:-1]} {i} ({v.name!r}) is {dtype}{shown}, the manifest says "
                f"{spec['dtype']}{spec['shape']} (the model was compiled for another program)",
                where=str(root),
                hint=hint,
            )


def intra_op_threads(num_threads: int | None) -> int:
    """The intra-op threads a session runs on: ``num_threads``, else every core of this
    machine (as :class:`~splice.runtime.backends.tvm.TVMPart` sizes TVM's pool; ORT's own
    default is the physical cores only)."""
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise LoweringError(f"num_threads must be at least 1, got {num_threads}")
    return num_threads or os.cpu_count() or 1


class ORTPart:
    """A part's ONNX model in an ``onnxruntime.InferenceSession``: takes and returns torch
    tensors, positionally (the model's inputs and outputs are the part's, in order).

    ``model``: a path (external data is read relative to its folder) or the serialized
    model's bytes (all initializers inside)."""

    def __init__(self, model: str | os.PathLike[str] | bytes, *, num_threads: int | None = None):
        ort = require_ort()
        self.num_threads = intra_op_threads(num_threads)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.num_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ArtifactError(
                f"the ONNX part takes {len(self.input_names)} inputs, got {len(inputs)}"
            )
        feeds = {n: _numpy(x) for n, x in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names, feeds)
        return [torch.from_numpy(o) for o in outs]


def _numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            raise ArtifactError("bfloat16 inputs are not supported by the onnxruntime backend")
        return x.contiguous().numpy()
    return x  # a numpy value (the host program's eq results)


__all__ = [
    "BINDING_KEY",
    "ORTPart",
    "backend_versions",
    "bind_model",
    "check_model",
    "intra_op_threads",
    "lower",
    "require_ort",
    "safetensors_layout",
    "write_model",
]
