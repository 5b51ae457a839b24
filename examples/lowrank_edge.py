"""Low-rank decoding for an edge target: factor a LLaMA's Linear layers, compile, compare.

Captures a small transformers LLaMA (random weights), factors its decoder layers with
whitened SVD (SVD-LLM) at half their parameters, compiles dense and factored programs for
this CPU with TVM, checks both against PyTorch, and times them; then lowers the rank at
compile time (nested truncation, no refactoring). With gcc-aarch64-linux-gnu installed it
also cross-compiles the factored program for aarch64-linux.

    python examples/lowrank_edge.py
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import splice
from splice import models
from splice.passes import NumericCheck, parse_pipeline


def median_ms(fn, *args, repeats: int = 20) -> float:
    fn(*args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    torch.manual_seed(0)
    model, (ids,) = models.llama(layers=2, hidden=256, inter=688, vocab=1000, seq=16)
    program = splice.capture(model, (ids,))
    calib = [(torch.randint(0, 1000, ids.shape),) for _ in range(8)]
    check = NumericCheck()
    result = parse_pipeline("lowrank{method=whitened,ratio=0.5,targets=model.layers.*}").run(
        program, sample_inputs=calib, instruments=[check]
    )
    st = result.stats["passes"][0]["stats"]
    print(f"factored {st['factored']} layers; Linear params kept: {st['params_kept']:.2f}")
    print(check.report())

    out = Path(tempfile.mkdtemp(prefix="splice-example-"))
    with torch.inference_mode():
        ref = model(ids).logits
    for name, p, opts in (
        ("dense", program, {}),
        ("factored", result.program, {}),
        ("factored, rank / 2", result.program, {"lowrank_rank": 0.5}),
    ):
        art = splice.compile(p, "host", output=out / f"{name.replace(' ', '')}.artifact", **opts)
        m = art.load()
        diff = (m(ids) - m.reference()(ids)).abs().max().item()  # the program as compiled
        drift = (m(ids) - ref).abs().max().item()
        print(
            f"{name:>20}: {median_ms(m, ids):6.3f} ms   vs its program {diff:.1e}   "
            f"vs dense eager {drift:.3f}"
        )
    if shutil.which("aarch64-linux-gnu-gcc"):
        art = splice.compile(result.program, "aarch64-linux", output=out / "arm.artifact")
        print(f"aarch64 artifact: {art.path} (run it with `splice run {art.path}` under qemu)")
    print(f"artifacts in {out}")


if __name__ == "__main__":
    main()
