"""How fast splice's compiled CPU kernels run, against eager PyTorch, torch.compile and ORT.

What is measured
----------------
Wall-clock milliseconds per call of five fp32 inference workloads (random weights, seeded
with ``torch.manual_seed(0)``, eval mode, nothing downloaded), each run by four peers on
the same input tensors:

* ``eager`` — the PyTorch module under ``torch.inference_mode()``;
* ``torch.compile`` — ``torch.compile(model)`` (default mode, Inductor), warmed up; if it
  fails the error is recorded instead of a time;
* ``onnxruntime`` — ``torch.onnx.export`` (the dynamo exporter, falling back to the legacy
  TorchScript one), CPU execution provider, ``intra_op_num_threads = torch.get_num_threads()``;
* ``splice`` — ``splice.capture`` → ``splice.compile(p, "host")`` (TVM) → ``splice.load``;
  the loaded ``CompiledModel`` is called on torch tensors. Defaults of the public API
  throughout: no tuning unless ``--tune N``, no ``TVM_NUM_THREADS``, the thread count the
  loaded model picks itself;
* ``splice v3`` — the same for the target ``x86-64-v3`` (AVX2/FMA), which runs on any
  x86-64 CPU with AVX2, so an AVX-512 machine measures both its own ISA and AVX2's (x86
  machines with AVX2 only);
* ``splice→ORT`` — the same program through ``splice.compile(p, "host",
  backend="onnxruntime")`` → ``splice.load``: splice's ONNX export run by ONNX Runtime
  (ORT_ENABLE_ALL, intra-op threads as the loaded model picks them: every core). Unlike the
  ``onnxruntime`` peer it also runs what torch.onnx cannot export: splice ops (``lowrank``,
  ``experts``) and data-dependent branches (ORT parts under splice's host program).

Every peer's outputs are checked against eager's (max abs diff over all outputs, printed);
a difference above 1e-3 fails the run (exit status 1, RESULTS.md left alone).

Workloads
---------
* ``mlp1``, ``mlp32`` — ``splice.models.mlp``: Linear 768→3072, GELU (erf), Linear 3072→768,
  at batch 1 and batch 32.
* ``gpt2`` — one ``transformers`` ``GPT2Block`` (hidden 768, 12 heads, FFN 3072, gelu_new,
  SDPA attention, causal) on hidden states ``[1, 128, 768]``: ln_1, attention, residual,
  ln_2, MLP, residual. No embeddings, no final layer norm. (Not GPT2Model with one layer,
  whose embeddings and final norm would be extra work.) Causality is checked before timing.
* ``llama-decode`` — a 4-layer ``LlamaForCausalLM`` (``splice.models.llama``: hidden 512,
  FFN 1376, 8 heads, 8 KV heads, vocab 4096, untied lm_head) doing one decode step at
  batch 1: one new token at position 127 with a KV cache of 127 positions. The cache is
  passed as explicit inputs (a key and a value tensor ``[1, 8, 127, 64]`` per layer, taken
  from a real 127-token prefill) and wrapped in a ``transformers`` ``DynamicCache`` inside
  ``forward``; the step returns the logits ``[1, 1, 4096]`` and the 8 updated cache tensors
  ``[1, 8, 128, 64]``. Before timing, the step's logits are checked against the last
  position of a plain 128-token forward.
* ``llama-prefill`` — the same model on 128 tokens at batch 1 (``use_cache=False``),
  returning the logits ``[1, 128, 4096]``.

Transformed workloads (the program every splice peer compiles is built once, before
timing; ``eager`` and ``torch.compile`` run that program's GraphModule, whose splice ops run
their reference implementations; the ``onnxruntime`` peer is n/a: torch.onnx exports no
splice op and would trace only one side of a branch):

* ``llama-decode-lowrank50`` — the decode step after
  ``lowrank{method=svd,ratio=0.5,targets=lm.model.layers.*}`` (every decoder-layer Linear
  at 50% of its parameters, ``splice::lowrank_linear``);
* ``llama-prefill-lowrank50`` — the 128-token prefill after the same pass (from 128 rows
  on each ``lowrank_linear`` is two C GEMM calls, whatever its rank);
* ``llama-decode-experts`` — the decode step after ``experts{num_experts=8,top_k=2}``
  (every FFN as 8 experts, top-2 routing, ``splice::moe_ffn``);
* ``zoo-<name>`` — a model of the dynamic-branch zoo (``splice.models_dynamic.ZOO``:
  early_exit, skipnet, blockdrop, dynamic_depth, routed_moe, shape_branch) captured with
  ``capture_dynamic`` (``signatures=`` its branch inputs, as benchmarks/branches.py does);
  one timed call runs every one of its branch inputs in turn, so every branch is timed.

Method
------
The machine is measured first with :func:`splice.target.measure_host` (STREAM-triad
bandwidth as two single-threaded numpy passes, and the best fp32 ``torch.mm`` 1024³ rate),
plus a single-pass, multi-threaded triad ``a = b + 3·c`` in torch (3 × 64 MiB arrays).
For each peer: ``--warmup`` calls (5), then ``--repeats`` timed calls (30) with
``time.perf_counter``; the table gives the median and the 10th–90th percentile. Ratios
``eager/splice`` and ``ORT/splice`` are of medians (> 1: splice is faster). For the decode
step, the memory-bandwidth lower bound is the bytes of weights one step must read (every
parameter except the embedding table, of which only the token's row; the lm_head
included) divided by the higher of the two measured bandwidths; ``fraction`` = bound /
time. Nothing sets TVM's threads: the loaded model uses every core, as a user gets it.

Run from the repository root (needs ``pip install -e '.[onnx]'`` for onnxruntime)::

    python benchmarks/lowering.py                    # full run, writes benchmarks/RESULTS.md
    python benchmarks/lowering.py --quick            # smoke run: 3 repeats, no write
    python benchmarks/lowering.py --repeats 3 --models mlp1,gpt2 --no-results
    python benchmarks/lowering.py --models transformed   # lowrank, experts, the branch zoo

RESULTS.md keeps one section per kind of CPU (model name and vector ISA): a run replaces
only its own machine's section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    busy_seconds,
    cpu_model,
    error_text,
    flat_outputs,
    git_state,
    log,
    lscpu,
    max_abs_diff,
    other_cores,
    torch_triad_gbs,
    version,
    write_marked_section,
)
from torch import nn

import splice
from splice import models

SECTION = (
    "## Lowering: splice→TVM against eager, torch.compile and ONNX Runtime (benchmarks/lowering.py)"
)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ATOL = 1e-3
PEERS = ("eager", "torch.compile", "onnxruntime", "splice", "splice v3", "splice→ORT")
SPLICE_TARGETS = {"splice": "host", "splice v3": "x86-64-v3"}
ALL_MODELS = ("mlp1", "mlp32", "gpt2", "llama-decode", "llama-prefill")
ZOO_MODELS = ("early_exit", "skipnet", "blockdrop", "dynamic_depth", "routed_moe", "shape_branch")
TRANSFORMED = (
    "llama-decode-lowrank50",
    "llama-prefill-lowrank50",
    "llama-decode-experts",
    *(f"zoo-{n}" for n in ZOO_MODELS),
)

GPT2_SHAPE: dict[str, int] = {"hidden": 768, "heads": 12, "seq": 128}
LLAMA_SHAPE: dict[str, int] = {
    "layers": 4,
    "hidden": 512,
    "heads": 8,
    "kv_heads": 8,
    "inter": 1376,
    "vocab": 4096,
    "seq": 128,
}


# -- workloads ----------------------------------------------------------------------------


@dataclass
class Case:
    """One workload: a module returning a tensor or a tuple of tensors, and its inputs."""

    name: str
    description: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    weight_bytes: int | None = None  # bytes of weights one call must read (decode only)
    kv_bytes: int | None = None  # bytes of KV cache one call reads (decode only)
    program: Any = None  # the Program (or SignatureSet) splice compiles; None: capture model
    calls: tuple[tuple[torch.Tensor, ...], ...] | None = None  # one call = each of these
    plain_onnx: str | None = None  # why the onnxruntime peer does not apply (None: it does)

    def invoke(self, fn: Callable[..., Any]) -> Any:
        """One call of the workload on ``fn`` (the model or a peer's callable)."""
        if self.calls is None:
            return fn(*self.inputs)
        return [fn(*x) for x in self.calls]


class BlockOut(nn.Module):
    """A transformers block called on hidden states, returning a tensor."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden_states)
        return out[0] if isinstance(out, tuple) else out


class Prefill(nn.Module):
    """A causal LM over a whole prompt, without a cache: ids -> logits."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class DecodeStep(nn.Module):
    """One decode step with the KV cache as explicit tensors: (ids, k0, v0, k1, v1, ...) ->
    (logits, k0', v0', ...), where each ki' is ki with the new position appended.

    The cache tensors are put into a ``DynamicCache`` directly: filling it through
    ``update`` would concatenate onto an empty 1-D tensor, which TVM's concat rejects.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        assert len(cache.layers) * 2 == len(kv), "one key and one value tensor per layer"
        for i, layer in enumerate(cache.layers):
            layer.dtype, layer.device = kv[0].dtype, kv[0].device
            layer.keys, layer.values = kv[2 * i], kv[2 * i + 1]
            layer.is_initialized = True
        out = self.lm(input_ids=input_ids, past_key_values=cache, use_cache=True)
        new: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            new += [layer.keys, layer.values]
        return (out.logits, *new)


def mlp_case(batch: int) -> Case:
    model, inputs = models.mlp(768, 3072, batch)
    return Case(
        f"mlp{batch}",
        f"MLP 768→3072→768, GELU (erf), batch {batch}: x [{batch}, 768]",
        model,
        tuple(inputs),
    )


def gpt2_case() -> Case:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    h, heads, seq = GPT2_SHAPE["hidden"], GPT2_SHAPE["heads"], GPT2_SHAPE["seq"]
    cfg = transformers.GPT2Config(n_layer=1, n_embd=h, n_head=heads, n_positions=max(1024, seq))
    # A bare block's config names no attention implementation, and GPT-2's fallback (eager
    # attention, no mask given) is bidirectional. SDPA, what GPT2Model picks, applies
    # is_causal when no mask is given.
    cfg._attn_implementation = "sdpa"
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block(cfg, layer_idx=0)
    model = BlockOut(block).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq, h, generator=g)
    y = x.clone()
    y[:, seq // 2 :] = torch.randn(1, seq - seq // 2, h, generator=g)
    with torch.inference_mode():
        leak = (model(x) - model(y))[:, : seq // 2].abs().max().item()
    assert leak <= 1e-5, f"the GPT-2 block is not causal: later positions move earlier by {leak}"
    return Case(
        "gpt2",
        f"one GPT2Block (hidden {h}, {heads} heads, FFN {4 * h}, gelu_new, SDPA attention, "
        f"causal via is_causal), hidden states [1, {seq}, {h}] in and out",
        model,
        (x,),
    )


def _llama() -> tuple[nn.Module, torch.Tensor]:
    lm, (ids,) = models.llama(**LLAMA_SHAPE)
    return lm, ids


def _decode_weight_bytes(lm: nn.Module, tokens: int) -> int:
    """Parameter bytes one step reads: all but the embedding table, of which ``tokens`` rows."""
    emb = lm.get_input_embeddings().weight
    out_emb = lm.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb
    total = 0
    for p in lm.parameters():  # parameters() yields each shared tensor once
        if p is emb and not tied:
            total += tokens * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def llama_decode_case() -> Case:
    lm, ids = _llama()
    seq = ids.shape[1]
    past_len = seq - 1
    with torch.inference_mode():
        prefix = lm(input_ids=ids[:, :past_len], use_cache=True)
        full = lm(input_ids=ids, use_cache=False).logits
    kv: list[torch.Tensor] = []
    for layer in prefix.past_key_values.layers:
        kv += [layer.keys.clone(), layer.values.clone()]
    model = DecodeStep(lm).eval()
    inputs = (ids[:, past_len:].clone(), *kv)
    with torch.inference_mode():
        step = model(*inputs)
    diff = (step[0][:, -1] - full[:, -1]).abs().max().item()
    assert diff <= 1e-4, f"decode step differs from the full forward's last logits by {diff:.3g}"
    heads, hd = kv[0].shape[1], kv[0].shape[3]
    L = LLAMA_SHAPE
    return Case(
        "llama-decode",
        f"LLaMA {L['layers']} layers, decode step at batch 1: 1 new token at position "
        f"{past_len}, KV cache of {past_len} positions in as {len(kv)} tensors "
        f"[1, {heads}, {past_len}, {hd}], out logits [1, 1, {L['vocab']}] + {len(kv)} updated "
        f"caches [1, {heads}, {seq}, {hd}]",
        model,
        inputs,
        weight_bytes=_decode_weight_bytes(lm, tokens=1),
        kv_bytes=sum(t.numel() * t.element_size() for t in kv),
    )


def llama_prefill_case() -> Case:
    lm, ids = _llama()
    L = LLAMA_SHAPE
    return Case(
        "llama-prefill",
        f"LLaMA {L['layers']} layers, prefill of {ids.shape[1]} tokens at batch 1 "
        f"(no cache), out logits [1, {ids.shape[1]}, {L['vocab']}]",
        Prefill(lm).eval(),
        (ids,),
    )


NO_PLAIN_ONNX_OPS = "n/a: torch.onnx exports no splice op (lowrank_linear, moe_ffn)"
NO_PLAIN_ONNX_BRANCHES = (
    "n/a: torch.onnx cannot export data-dependent branches (a trace bakes in one path)"
)


def transformed_case(
    name: str, pipeline: str, what: str, base: Callable[[], Case] | None = None
) -> Case:
    """A LLaMA case (the decode step unless ``base`` is given) after ``pipeline``; eager
    runs the transformed program."""
    from splice.passes import parse_pipeline

    dense = (base or llama_decode_case)()
    log(f"  capturing {dense.name} and running {pipeline}…")
    program = splice.capture(dense.model, dense.inputs, name=name.replace("-", "_"))
    program = parse_pipeline(pipeline).run(program).program
    return Case(
        name,
        f"{dense.description}; after `{pipeline}` ({what})",
        program.to_module().eval(),
        dense.inputs,
        program=program,
        plain_onnx=NO_PLAIN_ONNX_OPS,
    )


def zoo_case(name: str) -> Case:
    from splice import models_dynamic as Z
    from splice.ir.explore import capture_dynamic

    case = Z.ZOO[name]()
    log(f"  capture_dynamic {name}…")
    program = capture_dynamic(case.model, case.example, signatures=case.branch_inputs)
    shapes = sorted({", ".join(str(list(t.shape)) for t in x) for x in case.branch_inputs})
    return Case(
        f"zoo-{name}",
        f"dynamic zoo `{name}` (splice.models_dynamic): one call runs its "
        f"{len(case.branch_inputs)} branch inputs ({'; '.join(shapes)}) in turn",
        case.model.eval(),
        case.branch_inputs[0],
        program=program,
        calls=tuple(tuple(x) for x in case.branch_inputs),
        plain_onnx=NO_PLAIN_ONNX_BRANCHES,
    )


FACTORIES: dict[str, Callable[[], Case]] = {
    "mlp1": lambda: mlp_case(1),
    "mlp32": lambda: mlp_case(32),
    "gpt2": gpt2_case,
    "llama-decode": llama_decode_case,
    "llama-prefill": llama_prefill_case,
    "llama-decode-lowrank50": lambda: transformed_case(
        "llama-decode-lowrank50",
        "lowrank{method=svd,ratio=0.5,targets=lm.model.layers.*}",
        "every decoder-layer Linear at 50% of its parameters",
    ),
    "llama-prefill-lowrank50": lambda: transformed_case(
        "llama-prefill-lowrank50",
        "lowrank{method=svd,ratio=0.5,targets=lm.model.layers.*}",
        "every decoder-layer Linear at 50% of its parameters; 128 rows per Linear",
        base=llama_prefill_case,
    ),
    "llama-decode-experts": lambda: transformed_case(
        "llama-decode-experts",
        "experts{num_experts=8,top_k=2}",
        "every FFN as 8 experts, top-2 routing",
    ),
    **{f"zoo-{n}": (lambda n=n: zoo_case(n)) for n in ZOO_MODELS},
}


# -- machine ------------------------------------------------------------------------------


@dataclass
class Machine:
    triad_numpy_gbs: float  # splice.target.measure_host: two single-threaded numpy passes
    triad_torch_gbs: float  # one multi-threaded torch pass
    matmul_gflops: float

    @property
    def bandwidth_gbs(self) -> float:
        return max(self.triad_numpy_gbs, self.triad_torch_gbs)


def measure_machine(repeats: int) -> Machine:
    from splice.target import measure_host

    host = measure_host(repeats)
    return Machine(
        triad_numpy_gbs=host["mem_bandwidth_gbs"],
        triad_torch_gbs=torch_triad_gbs(repeats),
        matmul_gflops=host["peak_gflops"],
    )


# -- peers --------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    min_s: float

    @staticmethod
    def of(times: Sequence[float]) -> Timing:
        ts = sorted(times)
        if len(ts) >= 2:
            q = statistics.quantiles(ts, n=10, method="inclusive")
            p10, p90 = q[0], q[-1]
        else:
            p10 = p90 = ts[0]
        return Timing(statistics.median(ts), p10, p90, ts[0])


@dataclass
class PeerResult:
    peer: str
    timing: Timing | None = None
    max_abs_diff: float | None = None
    setup_s: float | None = None  # compile / export / warm-up cost before timing
    error: str | None = None
    note: str = ""


@dataclass
class CaseResult:
    case: Case
    peers: dict[str, PeerResult] = field(default_factory=dict)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()
    gc.collect()
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing.of(times)


def run_eager(case: Case, warmup: int, repeats: int) -> tuple[PeerResult, list[torch.Tensor]]:
    with torch.inference_mode():
        ref = [t.clone() for t in flat_outputs(case.invoke(case.model))]
        timing = time_calls(lambda: case.invoke(case.model), warmup, repeats)
    return PeerResult("eager", timing, 0.0), ref


def run_torch_compile(case: Case, ref: list[torch.Tensor], warmup: int, repeats: int) -> PeerResult:
    torch._dynamo.reset()
    try:
        compiled = torch.compile(case.model)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = case.invoke(compiled)
            setup = time.perf_counter() - t0
            diff = max_abs_diff(out, ref)
            timing = time_calls(lambda: case.invoke(compiled), warmup, repeats)
    except Exception as e:
        return PeerResult("torch.compile", error=error_text(e))
    return PeerResult("torch.compile", timing, diff, setup)


def _onnx_export(case: Case, path: Path) -> str:
    """Export with the dynamo exporter, else the legacy one; returns which one worked."""
    names = [f"in{i}" for i in range(len(case.inputs))]
    first: BaseException | None = None
    for dynamo in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
                torch.onnx.export(
                    case.model,
                    case.inputs,
                    str(path),
                    input_names=names,
                    dynamo=dynamo,
                    verbose=False,
                )
            return "dynamo exporter" if dynamo else "legacy TorchScript exporter"
        except Exception as e:
            log(f"    onnx export ({'dynamo' if dynamo else 'legacy'}) failed: {error_text(e)}")
            first = first or e
    assert first is not None
    raise first


def run_onnxruntime(
    case: Case, ref: list[torch.Tensor], warmup: int, repeats: int, threads: int, tmp: Path
) -> PeerResult:
    if case.plain_onnx is not None:
        return PeerResult("onnxruntime", error=case.plain_onnx)
    try:
        import onnxruntime as ort
    except ImportError as e:
        return PeerResult("onnxruntime", error=f"{error_text(e)} (pip install -e '.[onnx]')")
    try:
        t0 = time.perf_counter()
        path = tmp / f"{case.name}.onnx"
        exporter = _onnx_export(case, path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        setup = time.perf_counter() - t0
        inputs = sess.get_inputs()
        if len(inputs) != len(case.inputs):
            raise RuntimeError(
                f"the ONNX model has {len(inputs)} inputs, the module {len(case.inputs)}"
            )
        feeds = {i.name: x.numpy() for i, x in zip(inputs, case.inputs)}
        diff = max_abs_diff(sess.run(None, feeds), ref)
        timing = time_calls(lambda: sess.run(None, feeds), warmup, repeats)
    except Exception as e:
        return PeerResult("onnxruntime", error=error_text(e))
    return PeerResult("onnxruntime", timing, diff, setup, note=exporter)


def run_splice(
    case: Case,
    ref: list[torch.Tensor],
    warmup: int,
    repeats: int,
    tune: int,
    tmp: Path,
    peer: str = "splice",
) -> PeerResult:
    last = [""]
    target = SPLICE_TARGETS.get(peer, "host")
    backend = "onnxruntime" if peer == "splice→ORT" else "tvm"

    def progress(message: str, done: int, total: int) -> None:
        if message != last[0]:  # one line per stage / per tuned kernel
            last[0] = message
            log(f"    {peer}: {message} ({done}/{total})")

    try:
        t0 = time.perf_counter()
        program = case.program
        if program is None:
            program = splice.capture(case.model, case.inputs, name=case.name.replace("-", "_"))
        art = splice.compile(
            program,
            target,
            tune=tune if backend == "tvm" else 0,
            output=tmp / f"{case.name}-{target}-{backend}.artifact",
            progress=progress,
            backend=backend,
        )
        m = splice.load(art.path)
        setup = time.perf_counter() - t0
        with torch.inference_mode():
            diff = max_abs_diff(case.invoke(m), ref)
            timing = time_calls(lambda: case.invoke(m), warmup, repeats)
    except Exception as e:
        return PeerResult(peer, error=error_text(e))
    return PeerResult(peer, timing, diff, setup)


def splice_peers() -> list[str]:
    """``splice`` always; ``splice v3`` on x86 machines that can run AVX2 code."""
    from splice.target import X86_LEVELS, host_target

    host = host_target(measure=False)
    v3 = set(X86_LEVELS["x86-64-v3"][0]) <= set(host.features)
    return ["splice", *(["splice v3"] if v3 else [])]


def run_case(case: Case, args: argparse.Namespace, threads: int) -> CaseResult:
    res = CaseResult(case)
    with tempfile.TemporaryDirectory(prefix="splice-lowering-") as d:
        tmp = Path(d)
        log(f"timing {case.name}: eager…")
        res.peers["eager"], ref = run_eager(case, args.warmup, args.repeats)
        log(f"compiling {case.name}: torch.compile…")
        res.peers["torch.compile"] = run_torch_compile(case, ref, args.warmup, args.repeats)
        torch._dynamo.reset()
        log(f"compiling {case.name}: onnxruntime (torch.onnx.export)…")
        res.peers["onnxruntime"] = run_onnxruntime(
            case, ref, args.warmup, args.repeats, threads, tmp
        )
        for peer in splice_peers():
            log(f"compiling {case.name}: {peer} ({SPLICE_TARGETS[peer]}, tune={args.tune})…")
            res.peers[peer] = run_splice(case, ref, args.warmup, args.repeats, args.tune, tmp, peer)
        log(f"compiling {case.name}: splice→ORT (backend onnxruntime)…")
        res.peers["splice→ORT"] = run_splice(
            case, ref, args.warmup, args.repeats, args.tune, tmp, "splice→ORT"
        )
    for peer in PEERS:
        if peer not in res.peers:
            continue
        r = res.peers[peer]
        if r.error is not None:
            log(f"  {case.name:<14} {peer:<14} FAILED: {r.error}")
            continue
        assert r.timing is not None and r.max_abs_diff is not None
        flag = "" if r.max_abs_diff <= ATOL else f"  MISMATCH (> {ATOL:g})"
        log(
            f"  {case.name:<14} {peer:<14} {r.timing.median_s * 1e3:9.3f} ms  "
            f"max abs diff vs eager {r.max_abs_diff:.2e}{flag}"
        )
    return res


# -- report -------------------------------------------------------------------------------


def _ms(r: PeerResult) -> str:
    if r.timing is None:
        return "failed"
    t = r.timing
    return f"{t.median_s * 1e3:.3f} ({t.p10_s * 1e3:.3f}–{t.p90_s * 1e3:.3f})"


def _ratio(a: PeerResult, b: PeerResult) -> str:
    if a.timing is None or b.timing is None:
        return "—"
    return f"{a.timing.median_s / b.timing.median_s:.2f}"


def _diff(r: PeerResult) -> str:
    return "—" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"


def table(results: list[CaseResult]) -> str:
    """Milliseconds and ratios per model. ``splice→ORT`` columns: its time, eager/it,
    plain ORT/it and splice(TVM)/it (> 1: splice→ORT faster than that peer)."""
    v3 = any("splice v3" in res.peers for res in results)
    out = [
        "| model | eager ms | torch.compile ms | ORT ms | splice ms | eager/splice | ORT/splice "
        + ("| splice v3 ms | eager/v3 | ORT/v3 " if v3 else "")
        + "| splice→ORT ms | eager/splice→ORT | ORT/splice→ORT | splice/splice→ORT "
        + "| max abs diff vs eager (compile / ORT / splice"
        + (" / v3" if v3 else "")
        + " / splice→ORT) |",
        "|---|--:|--:|--:|--:|--:|--:|" + ("--:|--:|--:|" if v3 else "") + "--:|--:|--:|--:|--:|",
    ]
    missing = PeerResult("splice v3", error="not run")
    for res in results:
        p = res.peers
        keys = ["torch.compile", "onnxruntime", "splice", *(["splice v3"] if v3 else [])]
        keys.append("splice→ORT")
        diffs = " / ".join(_diff(p.get(k, missing)) for k in keys)
        row = (
            f"| {res.case.name} | {_ms(p['eager'])} | {_ms(p['torch.compile'])} "
            f"| {_ms(p['onnxruntime'])} | {_ms(p['splice'])} "
            f"| {_ratio(p['eager'], p['splice'])} | {_ratio(p['onnxruntime'], p['splice'])} "
        )
        if v3:
            q = p.get("splice v3", missing)
            row += f"| {_ms(q)} | {_ratio(p['eager'], q)} | {_ratio(p['onnxruntime'], q)} "
        o = p.get("splice→ORT", missing)
        row += (
            f"| {_ms(o)} | {_ratio(p['eager'], o)} | {_ratio(p['onnxruntime'], o)} "
            f"| {_ratio(p['splice'], o)} "
        )
        out.append(row + f"| {diffs} |")
    return "\n".join(out)


def setup_table(results: list[CaseResult]) -> str:
    out = [
        "| model | torch.compile first call s | ORT export + session s | splice capture + compile + load s | splice v3 s | splice→ORT s |",
        "|---|--:|--:|--:|--:|--:|",
    ]

    def s(r: PeerResult) -> str:
        return "—" if r.setup_s is None else f"{r.setup_s:.1f}"

    for res in results:
        p = res.peers
        v3 = p.get("splice v3", PeerResult("splice v3"))
        o = p.get("splice→ORT", PeerResult("splice→ORT"))
        out.append(
            f"| {res.case.name} | {s(p['torch.compile'])} | {s(p['onnxruntime'])} "
            f"| {s(p['splice'])} | {s(v3)} | {s(o)} |"
        )
    return "\n".join(out)


def bandwidth_lines(results: list[CaseResult], machine: Machine) -> list[str]:
    lines: list[str] = []
    bw = machine.bandwidth_gbs * 1e9
    for res in results:
        c = res.case
        if c.weight_bytes is None:
            continue
        bound = c.weight_bytes / bw
        fracs = []
        for peer in ("eager", "torch.compile", "onnxruntime", "splice v3"):  # splice: headline
            if peer not in res.peers:
                continue
            t = res.peers[peer].timing
            fracs.append(f"{peer} {bound / t.median_s:.2f}" if t else f"{peer} —")
        sp = res.peers["splice"].timing
        head = f"**{bound / sp.median_s:.2f}**" if sp else "n/a (splice failed)"
        kv = ""
        if c.kv_bytes:
            kv_bound = (c.weight_bytes + c.kv_bytes) / bw
            kv = (
                f" Counting the KV cache read as well ({c.kv_bytes / 1e6:.2f} MB) the bound is "
                f"{kv_bound * 1e3:.3f} ms"
                + (f" (splice fraction {kv_bound / sp.median_s:.2f})." if sp else ".")
            )
        lines.append(
            f"- {c.name} bandwidth bound: {c.weight_bytes / 1e6:.2f} MB of weights per step "
            f"(all parameters except the embedding table, of which the one row read; lm_head "
            f"included) / {machine.bandwidth_gbs:.1f} GB/s = {bound * 1e3:.3f} ms; fraction of "
            f"the bound reached (bound / median time): splice {head} (others: {', '.join(fracs)}).{kv} "
            f"With an L3 of {l3_text()}, part of the weights can stay cache-resident between "
            "back-to-back calls, so a fraction near or above 1 is possible."
        )
    return lines


def l3_text() -> str:
    return lscpu("L3") or "unknown"


def isa_text() -> str:
    from splice.target import host_target

    t = host_target(measure=False)
    return f"{t.isa}, {t.vector_bits}-bit vectors, {t.vector_registers} registers"


def tvm_threads() -> str:
    return os.environ.get("TVM_NUM_THREADS", "unset")


def cpu_kind() -> str:
    """The key of this machine's RESULTS.md section: CPU model name and vector ISA."""
    from splice.target import host_target

    return f"{cpu_model()}, {host_target(measure=False).isa}"


def markers() -> tuple[str, str, str]:
    """Heading and markers of this CPU kind's section."""
    import re

    kind = cpu_kind()
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    return (
        f"{SECTION} — {kind}",
        f"<!-- lowering:{slug}:begin -->",
        f"<!-- lowering:{slug}:end -->",
    )


def section(
    results: list[CaseResult],
    machine: Machine,
    args: argparse.Namespace,
    command: str,
    threads: int,
    load: tuple[float, ...],
    busy_start: tuple[float, float],
    wall: float,
) -> str:
    """This benchmark's part of RESULTS.md: heading, then everything between the markers."""
    failures = [
        f"- {res.case.name} / {peer}: {r.error}"
        for res in results
        for peer, r in res.peers.items()
        if r.error is not None
    ]
    exporters = sorted({r.note for res in results for r in res.peers.values() if r.note})
    L = LLAMA_SHAPE
    heading, begin, end = markers()
    parts = [
        heading,
        begin,
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()} ({isa_text()}), {os.cpu_count()} cores, L3 {l3_text()}; "
        f"threads: torch {threads}, TVM {tvm_threads()} (splice.load's default), ORT intra-op "
        f"{threads}; 1-min load "
        f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after the run",
        f"- measured: STREAM triad {machine.triad_numpy_gbs:.1f} GB/s "
        f"(`splice.target.measure_host`: numpy, two single-threaded passes) and "
        f"{machine.triad_torch_gbs:.1f} GB/s (torch, one pass, {threads} threads); fp32 matmul "
        f"peak {machine.matmul_gflops:.1f} GFLOP/s (torch.mm 1024³, best of the repeats)",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"apache-tvm {version('tvm')}, onnxruntime {version('onnxruntime')}, "
        f"onnx {version('onnx')}, transformers {version('transformers')}, "
        f"splice {splice.__version__} at {git_state()}",
        f"- command: `{command}` (from the repository root)",
        f"- method: fp32, eval, random weights (seed 0); per peer {args.warmup} warm-up calls, "
        f"then the median of {args.repeats} timed calls (time.perf_counter), with the 10th–90th "
        f"percentile in brackets; ratios are of medians (> 1: splice faster); splice compiled "
        f"with `splice.compile(p, target, tune={args.tune})` for `host` and `x86-64-v3` and "
        f"loaded with `splice.load(path)` (defaults); splice→ORT: `splice.compile(p, 'host', "
        f"backend='onnxruntime')` + `splice.load` (ORT_ENABLE_ALL, intra-op threads = every "
        f"core; transformed workloads: splice peers time compile + load only, the program is "
        f"built before); plain ORT via "
        f"{', '.join(exporters) or 'n/a'}, CPU execution provider",
        f"- LLaMA: {L['layers']} layers, hidden {L['hidden']}, FFN {L['inter']}, {L['heads']} "
        f"heads, {L['kv_heads']} KV heads, vocab {L['vocab']}, untied lm_head "
        "(`splice.models.llama`)",
        "",
        "| model | workload |",
        "|---|---|",
        *(f"| {res.case.name} | {res.case.description} |" for res in results),
        "",
        "Milliseconds per call, median (p10–p90):",
        "",
        table(results),
        "",
        *bandwidth_lines(results, machine),
        "",
        "One-off costs before timing (seconds):",
        "",
        setup_table(results),
        "",
        f"Checks: the outputs of every peer that ran matched eager within {ATOL:g} (max abs "
        "diff over all outputs)"
        + (
            "; the decode step's logits matched the last position of a full 128-token "
            "forward within 1e-4"
            if any(res.case.name == "llama-decode" for res in results)
            else ""
        )
        + ("." if not failures else ". Peers that failed:"),
        *failures,
        *_load_warning(busy_start, wall),
        "",
        end,
    ]
    return "\n".join(parts)


def _load_warning(start: tuple[float, float], wall: float) -> list[str]:
    """A caveat when other jobs shared the CPU: OpenMP peers (eager, torch.compile) then show
    bimodal, up to 20x slower medians, since a preempted thread stalls every barrier.

    Other jobs' CPU time = all busy CPU time minus this process's, over the run."""
    cores = other_cores(start, wall)
    if cores < 0.2:
        return []
    return [
        "",
        f"- WARNING: other processes used {cores:.2f} cores on average during this run (of "
        f"{os.cpu_count()}), so some medians (above all eager and torch.compile, whose OpenMP "
        "threads stall each other when one is preempted) may be several times too slow; check "
        "the p10–p90 spread and rerun on a quiet machine.",
    ]


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per peer (30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (5)")
    ap.add_argument(
        "--tune", type=int, default=0, help="splice.compile tune= trials (0, the default)"
    )
    ap.add_argument(
        "--models",
        default=",".join(ALL_MODELS),
        help=f"comma-separated subset of {','.join(ALL_MODELS)} and of the transformed "
        f"workloads {','.join(TRANSFORMED)}; 'dense' and 'transformed' name those groups",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, no write")
    ap.add_argument("--no-results", action="store_true", help="print only; do not write RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file to update")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 30)
    write = not (args.no_results or args.quick)
    groups = {"dense": ALL_MODELS, "transformed": TRANSFORMED}
    names = [
        m for n in args.models.split(",") if n.strip() for m in groups.get(n.strip(), [n.strip()])
    ]
    unknown = [n for n in names if n not in FACTORIES]
    if unknown or not names or args.repeats < 1 or args.warmup < 0 or args.tune < 0:
        ap.error(f"bad arguments (unknown models: {unknown}; models: {', '.join(ALL_MODELS)})")
    command = shlex.join(["python", *(sys.argv if argv is None else ["lowering.py", *argv])])

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/pytree chatter
    threads = torch.get_num_threads()
    load = os.getloadavg()
    busy_start = busy_seconds()
    t_start = time.perf_counter()

    log("measuring the machine (STREAM triad, matmul peak)…")
    machine = measure_machine(3 if args.quick else 10)
    log(
        f"  triad {machine.triad_numpy_gbs:.1f} GB/s (numpy, measure_host), "
        f"{machine.triad_torch_gbs:.1f} GB/s (torch, {threads} threads); "
        f"matmul {machine.matmul_gflops:.1f} GFLOP/s"
    )

    results: list[CaseResult] = []
    for name in names:
        log(f"building {name}…")
        results.append(run_case(FACTORIES[name](), args, threads))

    text = section(
        results, machine, args, command, threads, load, busy_start, time.perf_counter() - t_start
    )
    print(text)
    log(f"(benchmark wall time {time.perf_counter() - t_start:.0f} s)")

    mismatches = [
        f"{res.case.name} / {peer}: max abs diff {r.max_abs_diff:.3g} > {ATOL:g}"
        for res in results
        for peer, r in res.peers.items()
        if r.max_abs_diff is not None and r.max_abs_diff > ATOL
    ]
    splice_failed = [
        (res.case.name, peer, r.error)
        for res in results
        for peer, r in res.peers.items()
        if peer.startswith("splice") and r.error is not None
    ]
    if mismatches or splice_failed:
        for m in mismatches:
            log(f"ERROR: output mismatch: {m}")
        for name, peer, err in splice_failed:
            log(f"ERROR: {peer} failed on {name}: {err}")
        log(f"not writing {args.results}")
        return 1
    if write:
        heading, begin, end = markers()
        write_marked_section(args.results, heading, begin, end, text)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
