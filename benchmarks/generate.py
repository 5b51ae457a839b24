"""Generation benchmark: tokens/s of a compiled prefill/decode loop over a static KV cache.

For LLaMA at the decode benchmarks' shape (``common.LLAMA_DECODE_SHAPE``: hidden 2048,
4 layers, inter 5632, 16 heads, vocab 1024) and a small GPT-2 (hidden 768, 4 layers,
12 heads, vocab 4096), all with seeded random weights, fp32, batch 1: 128 new tokens
after a 128-token prompt (greedy; stop tokens off, so every run makes exactly 128 tokens).

Peers:

* ``eager``: ``transformers`` ``generate()`` (its DynamicCache), ``do_sample=False``,
  ``min_new_tokens=max_new_tokens``;
* ``compile``: ``generate()`` with ``cache_implementation="static"`` and its forward
  auto-compiled by ``torch.compile`` (``CompileConfig(mode="default", _compile_all_devices=
  True)``: transformers only auto-compiles on accelerators otherwise); the first, compiling
  call is a warm-up;
* ``dense``, ``lowrank``, ``experts``: :func:`splice.capture_lm` (max_len = prompt + new),
  then nothing / ``lowrank{method=svd,ratio=0.5,targets=*.layers.*}`` (LLaMA; GPT-2:
  ``targets=*.h.*``: the decoder layers' Linears, as benchmarks/lowrank_decode.py; not the
  LM head; the run stops if a pipeline changes nothing) /
  ``experts{num_experts=8,top_k=2}`` on both
  programs, :class:`splice.runtime.Generator` compiled for the host (TVM).

The splice peers are compiled first and then timed in alternating rounds (each round runs
every splice peer's ``generate()`` once; ``--repeats`` rounds, 5 by default; medians): this
2-vCPU machine has slow stretches (a dense LLaMA run measured 34–52 tokens/s from one
round to the next), and alternating puts them on every peer alike. The transformers peers
run ``--repeats`` times each, before.

Reported per peer: prefill ms (transformers: one forward over the prompt with a cache;
splice: the prefill program), decode tokens/s (transformers: 127 steps over the time of
``generate()`` minus that prefill), end-to-end tokens/s (128 / the whole call), and whether
the greedy tokens equal the eager ones (lowrank/experts are approximations: they differ).
For splice decode, the fraction of the bandwidth bound: the bytes one step must read
(weights, minus the embedding table but one row, plus the whole static cache) over the
read rate of ``torch.sum`` on a 256 MiB array (``common.torch_read_gbs``, measured just
before the splice rounds: a decode step only reads), divided by the measured step time.
The STREAM triad is printed too; it moves two reads and a write and understates a
read-only stream.

Also: the LLaMA decode step at position 10 and at position 1000 of a 1024-position cache
(splice dense; median of ``--repeats`` steps each): the cost of a step does not depend on
the position (it reads the whole static cache).

::

    python benchmarks/generate.py                       # full run (see the note below)
    python benchmarks/generate.py --peers eager,compile,dense,experts   # about 10 min
    python benchmarks/generate.py --quick               # smoke run: tiny shapes, no write
    python benchmarks/generate.py --models gpt2 --peers eager,dense --no-results

Note: at the LLaMA shape the ``lowrank`` peer's capture is the longest step: the pass
factors each of the 28 decoder Linears with a float64 full SVD (once for both programs;
about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    LLAMA_DECODE_SHAPE,
    busy_seconds,
    cpu_model,
    git_state,
    llama_lm,
    log,
    other_cores,
    torch_read_gbs,
    torch_triad_gbs,
    version,
    write_marked_section,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Generation (benchmarks/generate.py)"
BEGIN, END = "<!-- generate:begin -->", "<!-- generate:end -->"
PEERS = ("eager", "compile", "dense", "lowrank", "experts")
PIPELINES = {
    "dense": None,
    "lowrank": "lowrank{method=svd,ratio=0.5,targets=%s}",
    "experts": "experts{num_experts=8,top_k=2}",
}
# the decoder layers' Linears (not the LM head): module paths differ per architecture
DECODER_LAYERS = {"llama": "*.layers.*", "gpt2": "*.h.*"}
GPT2_SHAPE = {"layers": 4, "hidden": 768, "heads": 12, "vocab": 4096}
QUICK_LLAMA = {"layers": 2, "hidden": 128, "inter": 344, "heads": 4, "kv_heads": 4, "vocab": 256}
QUICK_GPT2 = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 256}


@dataclass
class Row:
    model: str
    peer: str
    prefill_ms: float = float("nan")
    decode_tps: float = float("nan")
    total_tps: float = float("nan")
    same_tokens: str = ""
    bound_fraction: float | None = None
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    position: dict[int, float] = field(default_factory=dict)
    read_gbs: dict[str, float] = field(default_factory=dict)  # per model, before its rounds
    paired: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> peer


def build(model: str, quick: bool, max_positions: int) -> torch.nn.Module:
    """The benchmark's LLaMA or GPT-2 (seeded random weights, eval mode)."""
    import transformers

    transformers.logging.set_verbosity_error()
    if model == "llama":
        lm = llama_lm(
            (QUICK_LLAMA if quick else LLAMA_DECODE_SHAPE)["layers"],
            QUICK_LLAMA if quick else LLAMA_DECODE_SHAPE,
        )
        lm.config.max_position_embeddings = max_positions  # RoPE: a limit, not a table
        lm.config.eos_token_id = lm.generation_config.eos_token_id = None
        return lm
    s = QUICK_GPT2 if quick else GPT2_SHAPE
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], vocab_size=s["vocab"],
        n_positions=max_positions, bos_token_id=0, eos_token_id=None,
    )  # fmt: skip
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    lm.generation_config.eos_token_id = None
    return lm


def step_bytes(lm: torch.nn.Module, max_len: int) -> int:
    """Bytes one decode step must read: the parameters (the input embedding table counted as
    one row unless tied) and the static cache (keys and values, every layer, all slots)."""
    emb = lm.get_input_embeddings().weight
    out = lm.get_output_embeddings()
    tied = out is not None and out.weight is emb
    total = 0
    for p in lm.parameters():
        total += (p.shape[1] if p is emb and not tied else p.numel()) * p.element_size()
    with torch.no_grad():
        past = lm(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True).past_key_values
    for layer in past.layers:
        for t in (layer.keys, layer.values):
            total += t.shape[1] * max_len * t.shape[3] * t.element_size()
    return total


def time_transformers(
    lm: torch.nn.Module, ids: torch.Tensor, new: int, static: bool, repeats: int
) -> tuple[Row, list[int]]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    kwargs: dict = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
    if static:
        kwargs["cache_implementation"] = "static"
        compile_config = CompileConfig(fullgraph=False, mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only
        kwargs["compile_config"] = compile_config
    config = GenerationConfig(**{**lm.generation_config.to_dict(), **kwargs})
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        # warm-up: the compiled peer compiles here (the static cache's length is part of the
        # compiled shapes, so it warms up at full length); eager needs only a short run
        warm = (
            config
            if static
            else GenerationConfig(**{**config.to_dict(), "max_new_tokens": 4, "min_new_tokens": 4})
        )
        out = lm.generate(ids, attention_mask=mask, generation_config=warm)
        totals, prefills = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lm(input_ids=ids, attention_mask=mask, use_cache=True)
            prefills.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = lm.generate(ids, attention_mask=mask, generation_config=config)
            totals.append(time.perf_counter() - t0)
    total, prefill = statistics.median(totals), statistics.median(prefills)
    row = Row("", "compile" if static else "eager", prefill * 1e3)
    row.decode_tps = (new - 1) / max(total - prefill, 1e-9)
    row.total_tps = new / total
    if static:
        row.note = "prefill ms: eager forward (the compiled one is inside generate)"
    return row, out[0, ids.shape[1] :].tolist()


def pipeline_text(model: str, peer: str) -> str | None:
    """The peer's pipeline for ``model`` (None: dense)."""
    text = PIPELINES[peer]
    return text % DECODER_LAYERS[model] if text and "%s" in text else text


def build_splice(
    lm: torch.nn.Module, ids: torch.Tensor, new: int, model: str, peer: str, tmp: Path
) -> Any:
    """capture_lm, the peer's pipeline on both programs, Generator.compile; warmed up.
    A pipeline that leaves the decode program's ops as they were is an error (a target
    glob that matches nothing would time the dense program twice)."""
    import splice
    from splice.passes import parse_pipeline
    from splice.passes.instruments import op_counts
    from splice.runtime.generate import Generator

    t0 = time.perf_counter()
    programs = splice.capture_lm(lm, max_len=ids.shape[1] + new, prompt_len=ids.shape[1])
    text = pipeline_text(model, peer)
    if text:
        before = op_counts(programs.decode)
        programs = programs.run_pipeline(parse_pipeline(text))
        if op_counts(programs.decode) == before:
            raise SystemExit(f"{model} {peer}: {text} changed nothing in the decode program")
    gen = Generator.compile(programs, "host", output=tmp / peer)
    log(f"    {peer}: captured and compiled in {time.perf_counter() - t0:.0f} s")
    gen.generate(ids, max_new_tokens=4, stop_tokens=[])  # warm-up
    return gen


def time_splice(
    gens: dict[str, Any], ids: torch.Tensor, new: int, repeats: int, bound_bytes: int, gbs: float
) -> tuple[dict[str, tuple[Row, list[int]]], dict[str, list[float]]]:
    """Every splice peer's rows: ``repeats`` rounds, each running every peer's generate()
    once in turn (alternating, so a slow stretch of the machine hits every peer alike);
    medians per peer. Also, per peer other than dense, its decode speed over dense's in
    each round."""
    results: dict[str, list[Any]] = {peer: [] for peer in gens}
    for _ in range(repeats):
        for peer, gen in gens.items():
            results[peer].append(gen.generate(ids, max_new_tokens=new, stop_tokens=[]))
    out = {}
    paired: dict[str, list[float]] = {}
    if "dense" in results:
        # per round, each peer's decode speed over dense's in the same round: a slow
        # stretch of the machine moves both alike, a ratio of medians may pair a fast
        # dense round with a slow one of the other peer
        for peer, rs in results.items():
            if peer != "dense":
                paired[peer] = [
                    d.decode_seconds / r.decode_seconds for d, r in zip(results["dense"], rs)
                ]
    for peer, rs in results.items():
        pre = statistics.median(r.prefill_seconds for r in rs)
        dec = statistics.median(r.decode_seconds for r in rs)
        row = Row("", peer, pre * 1e3, (new - 1) / dec, new / (pre + dec))
        if peer == "dense":
            row.bound_fraction = bound_bytes / (gbs * 1e9) / (dec / (new - 1))
        out[peer] = (row, rs[0].tokens)
    return out, paired


def time_positions(lm: torch.nn.Module, repeats: int, tmp: Path) -> dict[int, float]:
    """Median seconds of a dense decode step at positions 10 and 1000 of a 1024 cache, as the
    Generator runs it (the cache donated to the call and taken back from its outputs)."""
    import splice

    programs = splice.capture_lm(lm, max_len=1024, prompt_len=16)
    art = splice.compile(programs.decode, "host", output=tmp / "decode1024.artifact")
    model = art.load()
    cache = programs.empty_cache()
    out: dict[int, float] = {}
    for pos in (10, 1000):
        ids, p = torch.tensor([[1]]), torch.tensor([pos])
        cache = model.run_donated(ids, p, *cache)[1:]
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache = model.run_donated(ids, p, *cache)[1:]
            ts.append(time.perf_counter() - t0)
        out[pos] = statistics.median(ts)
    return out


def section(report: Report, args: argparse.Namespace, gbs: float, load: tuple[float, float]) -> str:
    lines = [
        HEADING,
        BEGIN,
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores (torch threads: "
        f"{torch.get_num_threads()}); torch STREAM triad {gbs:.1f} GB/s, read rate "
        + ", ".join(f"{v:.1f} GB/s (before {k})" for k, v in report.read_gbs.items())
        + "; 1-min load "
        f"average {load[0]:.2f} before; other processes kept {load[1]:.2f} cores busy "
        "during the run",
        f"- software: Python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
        f"{version('transformers')}, tvm {version('tvm')}, splice at {git_state()}",
        f"- command: `{args.command}`",
        f"- workload: prompt {args.prompt} tokens, {args.new} new tokens, greedy, batch 1, "
        f"fp32; median of {args.repeats} run(s) after a warm-up; LLaMA "
        f"{'(quick shape)' if args.quick else 'hidden 2048, 4 layers, inter 5632, vocab 1024'}"
        f", GPT-2 {'(quick shape)' if args.quick else 'hidden 768, 4 layers, vocab 4096'}",
        "",
        "| model | peer | prefill ms | decode tokens/s | end-to-end tokens/s | tokens = eager "
        "| of bandwidth bound | note |",
        "|---|---|--:|--:|--:|---|--:|---|",
    ]
    for r in report.rows:
        frac = f"{r.bound_fraction:.0%}" if r.bound_fraction is not None else ""
        lines.append(
            f"| {r.model} | {r.peer} | {r.prefill_ms:.1f} | {r.decode_tps:.1f} | "
            f"{r.total_tps:.1f} | {r.same_tokens} | {frac} | {r.note} |"
        )
    for model, peers in report.paired.items():
        for peer, ratios in peers.items():
            lines += [
                "",
                f"{model} {peer} / dense decode tokens/s, per alternating round: "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f" (median {statistics.median(ratios):.2f}).",
            ]
    if report.position:
        a, b = report.position[10], report.position[1000]
        lines += [
            "",
            f"LLaMA dense decode step, cache of 1024 positions: position 10 {a * 1e3:.2f} ms, "
            f"position 1000 {b * 1e3:.2f} ms (ratio {b / a:.2f}).",
        ]
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (128)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (128)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generate() calls (5)")
    ap.add_argument("--no-position", action="store_true", help="skip the position 10/1000 check")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, no write")
    ap.add_argument("--no-results", action="store_true", help="print only; do not write")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.prompt = args.prompt or (8 if args.quick else 128)
    args.new = args.new or (8 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 5)
    peers = [p for p in args.peers.split(",") if p]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peers {bad}; peers: {', '.join(PEERS)}")
    args.command = shlex.join(
        ["python", *(sys.argv if argv is None else ["benchmarks/generate.py", *argv])]
    )
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    load_before = os.getloadavg()[0]
    start, t_start = busy_seconds(), time.perf_counter()
    gbs = torch_triad_gbs()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="splice-generate-") as d:
        tmp = Path(d)
        for model in [m for m in args.models.split(",") if m]:
            lm = build(model, args.quick, max(1024, args.prompt + args.new))
            ids = torch.randint(
                0,
                lm.config.vocab_size,
                (1, args.prompt),
                generator=torch.Generator().manual_seed(0),
            )
            bound = step_bytes(lm, args.prompt + args.new)
            ref: list[int] | None = None
            timed: dict[str, tuple[Row, list[int]]] = {}
            for peer in [p for p in peers if p in ("eager", "compile")]:
                log(f"{model}: {peer}…")
                timed[peer] = time_transformers(lm, ids, args.new, peer == "compile", args.repeats)
            gens = {}
            for peer in [p for p in peers if p not in ("eager", "compile")]:
                log(f"{model}: {peer}…")
                gens[peer] = build_splice(lm, ids, args.new, model, peer, tmp / model)
            if gens:
                read = report.read_gbs[model] = torch_read_gbs()
                log(f"{model}: timing {', '.join(gens)}, {args.repeats} alternating rounds…")
                rows, report.paired[model] = time_splice(
                    gens, ids, args.new, args.repeats, bound, read
                )
                timed.update(rows)
            del gens
            gc.collect()
            for peer in peers:
                row, tokens = timed[peer]
                row.model = model
                if peer == "eager":
                    ref = tokens
                row.same_tokens = "" if ref is None or peer == "eager" else (
                    "yes" if tokens == ref else f"no ({sum(a == b for a, b in zip(tokens, ref))}/{len(ref)})"
                )  # fmt: skip
                report.rows.append(row)
                log(
                    f"  {peer}: prefill {row.prefill_ms:.1f} ms, decode {row.decode_tps:.1f} "
                    f"tokens/s, end-to-end {row.total_tps:.1f} tokens/s {row.same_tokens}"
                )
            if model == "llama" and not args.no_position and "dense" in peers:
                log("llama: decode step at positions 10 and 1000 of 1024…")
                report.position = time_positions(lm, max(5, 4 * args.repeats), tmp / "pos")
            del lm
            gc.collect()
    wall = time.perf_counter() - t_start
    text = section(report, args, gbs, (load_before, other_cores(start, wall)))
    print(text)
    log(f"done in {wall:.0f} s")
    if not (args.quick or args.no_results):
        write_marked_section(args.results, HEADING, BEGIN, END, text)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
