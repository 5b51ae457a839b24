"""Run a splice artifact with nothing but the TVM runtime and numpy (no torch, no splice).

This is the program that runs on (or for) the edge device: ``splice.runtime.edge`` starts
it with an aarch64 Python under ``qemu-aarch64``; on a real board it runs as it is::

    python edge_runner.py ARTIFACT IN_DIR OUT_DIR

``IN_DIR`` holds one ``<input name>.npy`` per input; the outputs are written to
``OUT_DIR/<output name>.npy``. The artifact's checksums are verified first; weights are read
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
    from tvm.runtime.vm import VirtualMachine

    t_import = time.perf_counter() - t0
    part = manifest["parts"][0]
    weights = read_safetensors(art / "weights.safetensors")
    dev = tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(str(art / part["library"])), dev)
    params = [tvm.runtime.tensor(weights[n], dev) for n in part["params"]]
    transform = f"{part.get('entry', 'main')}_transform_params"
    if params and vm.module.implements_function(transform):
        params = list(vm[transform](params))
    arrays = [np.load(in_dir / f"{i['name']}.npy") for i in manifest["inputs"]]
    for spec, arr in zip(manifest["inputs"], arrays):
        bound = spec.get("index_bound")
        if bound is not None and arr.size and (arr.min() < 0 or arr.max() >= bound):
            print(
                f"error: input {spec['name']!r} holds indices outside [0, {bound})", file=sys.stderr
            )
            return 2
    inputs = [tvm.runtime.tensor(a, dev) for a in arrays]
    t1 = time.perf_counter()
    out = vm[part.get("entry", "main")](*inputs, *params)
    t_run = time.perf_counter() - t1
    outs = list(out) if hasattr(out, "__len__") else [out]
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec, o in zip(manifest["outputs"], outs):
        np.save(out_dir / f"{spec['name']}.npy", o.numpy())
    (out_dir / "timing.json").write_text(json.dumps({"import_s": t_import, "run_s": t_run}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
