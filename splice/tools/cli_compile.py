"""``splice compile``, ``splice run`` and ``splice bench``: the lowering side of the CLI.

::

    splice compile IN [-t TARGET] [--backend tvm|onnxruntime] [--tune N] -o OUT.artifact
    splice run ART [--inputs FILE] [--check] [--save FILE]
    splice bench ART [--repeats N] [--torch-compile]

``run`` feeds the artifact the sample inputs stored in it (or ``--inputs``, a safetensors or
``.npz`` file keyed by input name; or seeded random values from the input specs). An
aarch64 artifact on an x86 machine runs under qemu-aarch64 (see docs/lowering.md).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import splice
from splice.errors import ArtifactError
from splice.ir import meta as M
from splice.runtime import edge
from splice.runtime.artifact import Artifact, is_foreign
from splice.tools.common import (
    check_output_file,
    check_output_folder,
    console,
    float_at_least,
    int_at_least,
    load_input,
    parse_factory_args,
    progress_printer,
)


def cmd_compile(a: argparse.Namespace) -> int:
    check_output_folder(a.output)
    loaded = load_input(a.input, parse_factory_args(a.arg))
    con = console()
    t0 = time.perf_counter()
    art = splice.compile(
        loaded.program,
        a.target,
        tune=a.tune,
        output=a.output,
        fast_math=not a.no_fast_math,
        samples=loaded.samples or None,
        progress=progress_printer(),
        lowrank_rank=_rank_option(a.lowrank_rank),
        overwrite=a.force,
        rpc=a.rpc,
        backend=a.backend,
    )
    seconds = time.perf_counter() - t0
    m = art.manifest
    low = m["lowering"]
    if m.get("backend") == "onnxruntime":
        con.print(
            f"compiled {m['program']} for {m['target']['name']} (onnxruntime "
            f"{m.get('onnxruntime_version')}) in {seconds:.1f} s -> {art.path}"
        )
        for f in art.files:
            con.print(f"  {f}  {(art.path / f).stat().st_size / 1e6:.2f} MB")
        return 0
    sources: dict[str, int] = {}
    for rec in low.get("tuning", {}).values():
        sources[rec["source"]] = sources.get(rec["source"], 0) + 1
    con.print(f"compiled {m['program']} for {m['target']['name']} in {seconds:.1f} s -> {art.path}")
    con.print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in low["seconds"].items()))
    con.print(
        "  kernels: " + ", ".join(f"{n} {r}" for r, n in sorted(low["schedule_rules"].items()))
    )
    if sources:
        con.print("  matmul tiles: " + ", ".join(f"{n} {s}" for s, n in sorted(sources.items())))
    if low.get("unscheduled"):
        con.print(f"  unscheduled (TVM's default loops): {', '.join(low['unscheduled'])}")
    for f in art.files:
        con.print(f"  {f}  {(art.path / f).stat().st_size / 1e6:.2f} MB")
    return 0


def _rank_option(v: str | None) -> float | int | None:
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        raise ArtifactError(
            f"--lowrank-rank {v!r} is neither a rank nor a fraction",
            hint="e.g. --lowrank-rank 0.5 (half of each stored rank) or --lowrank-rank 64",
        ) from None


def _read_inputs(path: str, specs: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """The tensors of ``path`` (safetensors or .npz) named like ``specs``."""
    p = Path(path)
    if not p.is_file():
        what = "a folder" if p.is_dir() else "no such file"
        raise ArtifactError(f"--inputs {path}: {what}", hint="name a safetensors or .npz file")
    flat = _load_tensor_file(p)
    names = [s["name"] for s in specs]
    missing = [n for n in names if n not in flat]
    if missing:
        raise ArtifactError(
            f"{path} lacks inputs {missing} (it has {sorted(flat)})",
            hint="key the tensors by the artifact's input names",
        )
    return tuple(flat[n] for n in names)  # shapes and dtypes: checked by the runtime


def _load_tensor_file(p: Path) -> dict[str, torch.Tensor]:
    try:
        if p.suffix == ".npz":
            import numpy as np

            with np.load(p, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        from safetensors.torch import load_file

        return load_file(str(p))
    except OSError:
        raise
    except Exception as e:  # numpy, zipfile and safetensors raise their own types
        kind = ".npz" if p.suffix == ".npz" else "safetensors"
        raise ArtifactError(
            f"--inputs {p}: not a readable {kind} file ({type(e).__name__}: {e})",
            hint="write it with safetensors.torch.save_file or numpy.savez "
            "(.npz, no object arrays)",
        ) from e


def _random_inputs(manifest: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    out = []
    for spec in manifest["inputs"]:
        dtype = M.dtype_from_name(spec["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=g).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(spec["shape"], dtype=dtype))
        else:  # token ids and indices: small values are valid for any vocabulary
            out.append(torch.randint(0, 2, spec["shape"], generator=g).to(dtype))
    return tuple(out)


def _inputs_for(a: argparse.Namespace, art: Any, names: list[str]) -> tuple[str, tuple]:
    if a.inputs:
        return a.inputs, _read_inputs(a.inputs, art.manifest["inputs"])
    samples = art.samples()
    if samples:
        return "the artifact's sample", samples[0]
    return "seeded random", _random_inputs(art.manifest)


def cmd_run(a: argparse.Namespace) -> int:
    if a.save:
        check_output_file(a.save, "--save")
    art = Artifact(a.artifact)
    m = art.manifest
    names = [i["name"] for i in m["inputs"]]
    where, inputs = _inputs_for(a, art, names)
    con = console()
    if is_foreign(m):
        con.print(f"running the {m['target']['triple']} artifact under qemu (slow: emulated)")
        run = edge.run_under_qemu(art.path, inputs)
        outs = [torch.from_numpy(o) for o in run.outputs]
        con.print(
            f"  TVM import {run.import_s:.1f} s, one call {run.run_s * 1e3:.1f} ms (emulated)"
        )
    else:
        outs = art.load().run(*inputs)
    con.print(f"inputs: {where}")
    for spec, o in zip(m["outputs"], outs):
        flat = o.detach().float().flatten()
        head = ", ".join(f"{v:.5g}" for v in flat[:4].tolist())
        con.print(
            f"  {spec['name']}: {spec['dtype']}{list(o.shape)}  mean {flat.mean():.5g}  "
            f"std {flat.std():.5g}  [{head}, ...]"
        )
    if a.save:
        from safetensors.torch import save_file

        save_file({s["name"]: o.contiguous() for s, o in zip(m["outputs"], outs)}, a.save)
        con.print(f"wrote {a.save}")
    if a.check:
        ref = art.reference()(*inputs)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        worst = 0.0
        for spec, o, r in zip(m["outputs"], outs, ref):
            diff = (o.double() - r.double()).abs().max().item() if o.numel() else 0.0
            worst = max(worst, diff)
            con.print(f"  check {spec['name']}: max abs diff vs PyTorch {diff:.3g}")
        if worst > a.atol:
            con.print(f"FAILED: max abs diff {worst:.3g} > {a.atol:g}")
            return 1
        con.print(f"ok: within {a.atol:g} of the PyTorch reference")
    return 0


def _time(fn: Any, inputs: tuple, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn(*inputs)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*inputs)
        out.append(time.perf_counter() - t0)
    return out


def cmd_bench(a: argparse.Namespace) -> int:
    from rich.table import Table

    art = Artifact(a.artifact)
    m = art.manifest
    if is_foreign(m):
        raise ArtifactError(
            f"cannot benchmark a {m['target']['triple']} artifact on {platform.machine()}",
            hint="run `splice bench` on the target (timings under qemu mean nothing)",
        )
    names = [i["name"] for i in m["inputs"]]
    where, inputs = _inputs_for(a, art, names)
    compiled = art.load(num_threads=a.threads)
    reference = art.reference()
    reference(*inputs)  # generates the GraphModule's code
    peers: list[tuple[str, Any]] = [("splice (TVM)", compiled)]
    with torch.inference_mode():
        peers.append(("eager PyTorch", reference))
        if a.torch_compile:
            peers.append(("torch.compile", torch.compile(reference.graph_module)))
        con = console()
        con.print(
            f"{m['program']} on {m['target']['name']}, inputs: {where}, "
            f"{a.repeats} repeats after {a.warmup} warm-up, {torch.get_num_threads()} threads"
        )
        rows = []
        for name, fn in peers:
            ts = sorted(_time(fn, inputs, a.warmup, a.repeats))
            rows.append((name, statistics.median(ts), ts[len(ts) // 10], ts[(9 * len(ts)) // 10]))
    base = rows[0][1]
    t = Table(show_edge=False)
    for col in ("runs", "median ms", "p10 ms", "p90 ms", "vs splice"):
        t.add_column(col, justify="left" if col == "runs" else "right")
    for name, med, p10, p90 in rows:
        t.add_row(
            name, f"{med * 1e3:.3f}", f"{p10 * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{med / base:.2f}x"
        )
    con.print(t)
    return 0


def add_commands(sub: Any, model_arg: Any) -> None:
    sp = sub.add_parser("compile", help="compile a program into an artifact for a target")
    model_arg(sp)
    sp.add_argument(
        "-t",
        "--target",
        default="host",
        help="host (default), x86-64-v3 (AVX2), x86-64-v4 (AVX-512), aarch64-linux[:CORE] "
        "(e.g. aarch64-linux:cortex-a76) or cuda",
    )
    sp.add_argument(
        "--backend",
        choices=("tvm", "onnxruntime"),
        default="tvm",
        help="tvm (default): compiled, tuned libraries; onnxruntime: ONNX models run by "
        "ONNX Runtime (target host only)",
    )
    sp.add_argument(
        "--tune",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="tune each matmul kernel with N MetaSchedule trials against the hand rules "
        "(database in ~/.cache/splice/metaschedule: a second compile does not tune)",
    )
    sp.add_argument(
        "--rpc",
        metavar="HOST:PORT:KEY",
        help="with --tune: measure on the devices registered under KEY with this TVM RPC "
        "tracker (python -m tvm.exec.rpc_tracker / rpc_server), e.g. for aarch64-linux",
    )
    sp.add_argument(
        "--no-fast-math",
        action="store_true",
        help="use exact erf/tanh/exp instead of TVM's fast polynomial versions",
    )
    sp.add_argument(
        "--lowrank-rank",
        metavar="R",
        help="lower the rank of lowrank layers: a fraction (0.5) of each stored rank, or a rank",
    )
    sp.add_argument("-o", "--output", required=True, help="artifact folder to write")
    sp.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT even if it is not a splice program or artifact",
    )
    sp.set_defaults(fn=cmd_compile)

    def input_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("artifact", help="artifact folder (from `splice compile`)")
        sp.add_argument(
            "--inputs",
            metavar="FILE",
            help="safetensors or .npz keyed by input name (default: stored samples)",
        )

    sp = sub.add_parser("run", help="run an artifact (under qemu when built for aarch64)")
    input_args(sp)
    sp.add_argument(
        "--check",
        action="store_true",
        help="compare with the PyTorch reference; exit 1 beyond --atol",
    )
    sp.add_argument("--atol", type=float_at_least(0.0), default=1e-4, help="default 1e-4 (>= 0)")
    sp.add_argument("--save", metavar="FILE", help="write the outputs to a safetensors file")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("bench", help="time an artifact against its PyTorch reference")
    input_args(sp)
    sp.add_argument("--repeats", type=int_at_least(1), default=30)
    sp.add_argument("--warmup", type=int_at_least(0), default=5)
    sp.add_argument(
        "--threads", type=int_at_least(1), default=None, help="TVM threads (default: all cores)"
    )
    sp.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    sp.set_defaults(fn=cmd_bench)


__all__ = ["add_commands", "cmd_bench", "cmd_compile", "cmd_run"]
