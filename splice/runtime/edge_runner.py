"""Run a splice artifact with nothing but the TVM runtime and numpy (no torch, no splice).

This is the program that runs on (or for) the edge device: ``splice.runtime.edge`` starts
it with an aarch64 Python under ``qemu-aarch64``; on a real board it runs as it is::

    python edge_runner.py ARTIFACT IN_DIR OUT_DIR

``IN_DIR`` holds one ``<input name>.npy`` per input; the outputs are written to
``OUT_DIR/<output name>.npy`` (and the branch trace to ``OUT_DIR/trace.json``). An artifact
with a host program (branches, several input signatures) is run by interpreting its
``host.json`` here, calling each part's library. The artifact's checksums are verified first; weights are read
from ``weights.safetensors`` with a small reader of the format (a JSON header, then raw
little-endian data), so no safetensors build is needed on the device.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

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
    art, in_dir, out_dir = (Path(a) for a in argv[1:4])
    manifest = json.loads((art / "manifest.json").read_text())
    for fname, digest in manifest["files"].items():
        if hashlib.sha256((art / fname).read_bytes()).hexdigest() != digest:
            print(f"error: checksum of {fname} does not match the manifest", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    import tvm

    t_import = time.perf_counter() - t0
    weights = read_safetensors(art / "weights.safetensors")
    dev = tvm.cpu(0)
    parts = {p["name"]: _Part(art, p, weights, dev) for p in manifest["parts"]}
    names = [i["name"] for i in manifest["inputs"]]
    arrays = [np.load(in_dir / f"{n}.npy") for n in names]
    for spec, arr in zip(manifest["inputs"], arrays):
        bound = spec.get("index_bound")
        if bound is not None and arr.size and (arr.min() < 0 or arr.max() >= bound):
            print(
                f"error: input {spec['name']!r} holds indices outside [0, {bound})", file=sys.stderr
            )
            return 2
    inputs = [tvm.runtime.tensor(a, dev) for a in arrays]
    trace: list = []
    t1 = time.perf_counter()
    if manifest.get("host"):
        host = json.loads((art / manifest["host"]).read_text())
        consts = {}
        try:
            outs = _run_block(host["main"], dict(zip(host["main"]["params"], inputs)), parts,
                              weights, consts, trace, dev)  # fmt: skip
        except _HostError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        outs = parts[manifest["parts"][0]["name"]](*inputs)
    t_run = time.perf_counter() - t1
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec, o in zip(manifest["outputs"], outs):
        np.save(out_dir / f"{spec['name']}.npy", o.numpy())
    (out_dir / "timing.json").write_text(json.dumps({"import_s": t_import, "run_s": t_run}))
    (out_dir / "trace.json").write_text(json.dumps(trace))
    return 0


class _HostError(Exception):
    pass


class _Part:
    """One compiled part: its Relax VM and its (transformed) weights."""

    def __init__(self, art: Path, part: dict, weights: dict[str, np.ndarray], dev) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.vm = VirtualMachine(tvm.runtime.load_module(str(art / part["library"])), dev)
        self.entry = part.get("entry", "main")
        params = [tvm.runtime.tensor(weights[n], dev) for n in part["params"]]
        transform = f"{self.entry}_transform_params"
        if params and self.vm.module.implements_function(transform):
            params = list(self.vm[transform](params))
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
