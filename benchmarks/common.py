"""What the benchmark scripts share: describing the machine and the software, a torch STREAM
triad, comparing outputs, measuring other jobs' CPU use during a run, and replacing one
benchmark's section of RESULTS.md.

Benchmarks run as scripts (``python benchmarks/x.py``), so this module is imported as
``common`` from their folder.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lscpu(field_name: str) -> str:
    """One field of ``lscpu`` (e.g. ``"L3"`` -> ``"32 MiB (1 instance)"``), or ``""``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    for line in out.splitlines():
        if line.strip().startswith(field_name):
            return line.split(":", 1)[1].strip()
    return ""


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_state() -> str:
    """The short HEAD, noting uncommitted changes under splice/."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "splice")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes in splice/)" if dirty else head


def version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def torch_triad_gbs(repeats: int = 5, n: int = 1 << 24) -> float:
    """Best rate of a = b + 3·c over 64 MiB fp32 arrays in one torch pass (3 arrays moved),
    after one untimed pass."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.empty(n), torch.rand(n, generator=g), torch.rand(n, generator=g)
    torch.add(b, c, alpha=3.0, out=a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    return 3 * 4 * n / best / 1e9


def torch_read_gbs(repeats: int = 5, n: int = 1 << 26) -> float:
    """Best rate of ``torch.sum`` over a 256 MiB fp32 array (read only, nothing written),
    after one untimed pass: the bound for a decode step, which streams its weights and
    writes almost nothing. The triad (two reads, one write) understates it."""
    b = torch.rand(n, generator=torch.Generator().manual_seed(0))
    float(b.sum())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(b.sum())
        best = min(best, time.perf_counter() - t0)
    return 4 * n / best / 1e9


def write_marked_section(path: Path, heading: str, begin: str, end: str, text: str) -> None:
    """Replace one benchmark's section of ``path`` (or append it); other sections are kept.

    A section is its ``heading`` followed by everything from ``begin`` to ``end``. The
    heading sits before the begin marker so that benchmarks which delimit their sections by
    the next ``## `` heading (ir_scaling.py) stop before it. A heading left without markers
    is replaced up to the next section. Written to a temporary file, then renamed.
    """
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    block = text.rstrip("\n").splitlines()
    if begin in lines and end in lines[lines.index(begin) :]:
        start = lines.index(begin)
        stop = lines.index(end, start)
        while start > 0 and not lines[start - 1].strip():
            start -= 1
        if start > 0 and lines[start - 1] == heading:
            start -= 1
        new = [*lines[:start], *block, *lines[stop + 1 :]]
    elif heading in lines:
        start = lines.index(heading)
        stop = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[stop:]
        new = [*lines[:start], *block, *(["", *tail] if tail else [])]
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        new = [*lines, "", *block]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(new) + "\n")
    tmp.replace(path)


__all__ = ["cpu_model", "git_state", "lscpu", "torch_triad_gbs", "version", "write_marked_section"]


def batched(ids: torch.Tensor, mask: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    """(ids, attention mask) rows in batches of ``size``: a tokenizer's output as inputs."""
    return [(ids[i : i + size], mask[i : i + size]) for i in range(0, len(ids), size)]


#: the LLaMA-shaped decoder of the decode benchmarks (lowrank_decode.py, experts.py)
LLAMA_DECODE_SHAPE: dict[str, int] = {
    "layers": 4,
    "hidden": 2048,
    "inter": 5632,
    "heads": 16,
    "kv_heads": 16,
    "vocab": 1024,
}


def run_and_compare(
    pipe: str, program: Any, ctx: Any, eval_batches: Sequence[Sequence[Any]], ref: torch.Tensor
) -> tuple[Any, float, torch.Tensor]:
    """Run the pipeline text ``pipe`` on ``program`` with ``ctx``; then the transformed
    program's outputs on ``eval_batches`` against ``ref`` (the original's, concatenated):
    (pipeline result, pass seconds, per-row cosine)."""
    from splice.passes import PassManager, parse_pipeline

    t0 = time.perf_counter()
    result = PassManager(parse_pipeline(pipe)).run(program, ctx)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = torch.cat([result.program(*b) for b in eval_batches])
    return result, seconds, torch.nn.functional.cosine_similarity(out, ref, dim=1)


def llama_lm(layers: int, shape: dict[str, int]) -> Any:
    """A LlamaForCausalLM of ``shape`` with seeded random weights, in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def error_text(e: BaseException, limit: int = 240) -> str:
    """An exception as one line: its type and the first ``limit`` characters of its text."""
    text = " ".join(str(e).strip().split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """A peer's outputs as a flat list of torch tensors (numpy arrays are wrapped)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    if type(out).__module__ == "numpy":
        return [torch.from_numpy(out)]
    raise TypeError(f"unexpected output type {type(out).__name__}")


def max_abs_diff(got: Any, ref: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over all outputs (shapes and counts must agree)."""
    outs = flat_outputs(got)
    assert len(outs) == len(ref), f"{len(outs)} outputs, expected {len(ref)}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(outs, ref, strict=True)):
        assert tuple(x.shape) == tuple(y.shape), f"output {i}: shape {x.shape} != {y.shape}"
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes were busy since boot, CPU seconds of this process)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (user + nice + system + irq + softirq + steal) / hz, t.user + t.system


def other_cores(start: tuple[float, float], wall: float) -> float:
    """Cores other processes kept busy on average since ``start`` (a busy_seconds())."""
    end = busy_seconds()
    return ((end[0] - start[0]) - (end[1] - start[1])) / max(wall, 1e-9)
