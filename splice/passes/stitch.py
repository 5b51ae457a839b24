"""``stitch``: stitching-layer insertion across a model family (SN-Net, Pan et al., CVPR 2023;
SN-Netv2, 2023).

Input: two or more captured programs of one family (the same architecture at different
widths or depths, e.g. small and base BERT) with the same inputs and output specs, and
calibration inputs. Output: one Program with an extra input ``config`` (an integer scalar)
that selects, at run time, either one anchor or a *stitch*: the front (smaller) anchor runs
its blocks ``0..j``, a stitching layer maps its activation to the end anchor's width, and
the end (larger) anchor continues from block ``m`` through its head.

* **Blocks** (:func:`find_blocks`): the repeated blocks of a program are the children of
  the module path with the most consecutive integer-indexed children that run the same ops
  (``encoder.layer.0..11``, ``transformer.h.*``, ``stages.*``; a factored Linear,
  ``splice::lowrank_linear``, counts as the Linear, so a ``lowrank`` anchor whose blocks
  factored different Linears still repeats). Each block's nodes must be
  contiguous; the value flowing from one block to the next is the *boundary* activation
  (exactly one per boundary, else the pass says why), and values computed before the first
  block and read inside them (attention masks, rotary tables) are *side* values.
* **Enumeration** (``cuts``): a window of ``window`` blocks slides by ``stride``; every
  front/end pair ``(j, m)`` inside the window that no earlier window produced is a
  configuration, and each window adds one stitching layer that all its new pairs share.
  ``cuts=forward`` (the default, SN-Netv2's enumeration: its code drops ``j >= m``) keeps only
  ``m > j``, so every block runs once (depth 12, window 2 → 11 configurations, one layer
  each; ``share`` no longer matters at window 2; ``window=1`` has no such pair and is
  refused). ``cuts=all`` is SN-Net's paired stitching as published (depth 12, window 2,
  stride 1 → 34 configurations, 11 layers): a pair with ``m <= j`` runs blocks ``m..j``
  twice, so its stitching layer has to undo a block. Why the default is ``forward``: each of
  those configurations is beaten by a configuration of fewer FLOPs (a forward cut or an
  anchor) — none is on the FLOPs/fidelity Pareto front of all-MiniLM-L6-v2 stitched with its
  low-rank self (benchmarks/stitch.py) — and healed they stay far below the anchors
  (benchmarks/heal.py, real text: down to 0.75), while every forward configuration reaches
  0.958 or more. For
  unequal depths each front block ``j`` is stitched to the end block at the same relative
  depth, ``m = round((j + 1) · L_end / L_front)`` (SN-Netv2's rule), one layer each. With
  more than two anchors, adjacent anchors (by FLOPs) are paired, small → large.
* **Least squares** (:func:`least_squares`): on calibration activations X (front output of
  block ``j``) and Y (end input of block ``m``; the embedding output for ``m = 0``, not
  SN-Net's wrapped ``end_features[-1]``), ``X·Wᵀ + b ≈ Y`` in float64, on centred features,
  ignoring singular directions below 10⁻⁶ of the largest (float32 rounding noise: kept, a
  LayerNorm's near-null direction gets weights of up to 10⁸ that a window's mean layer does
  not cancel).
  A layer shared by a window gets the mean of its pairs' solutions (SN-Net's rule,
  ``share=window``); ``share=pair`` gives every configuration its own least-squares layer.
  On real weights the mean is a worse map than each pair's own before fine-tuning, so ``pair``
  is the choice when there is no training (all-MiniLM-L6-v2 stitched with its svd-0.8 self:
  per-pair layers keep the cuts near 1 embedding cosine; the window-shared ones measured ~0
  in benchmarks/stitch.py while the solve kept float32 noise directions, and start at
  0.6-0.98 cosine on the training rows of ``heal`` since it does not).
* **Layers**: ``kind=linear`` over the last dimension of ``[..., C]`` activations;
  ``conv1x1`` over the channels of ``[B, C, H, W]``; ``lora`` (SN-Netv2) is ``linear`` plus a
  rank-``lora_rank`` update ``(x Aᵀ) Bᵀ`` with B = 0, so it starts at the least-squares map.
* **Run-time choice**: the program is a chain of ``cond(config == k, route_k, ...)``; every
  route is built from copies of the anchors' pieces (prologue, blocks, stitching layer,
  head) whose first node is marked ``part_start``, so the ``branches`` pass makes each piece
  one part shared by every route that runs it, and the host compares ``config`` itself.
  Switching configuration changes the path through the host program, never a weight. A
  ``config`` outside ``[0, n)`` yields NaN outputs (the chain's last ``else``).

The pass is split at these seams: :mod:`~splice.passes.stitch_blocks` (block discovery),
:mod:`~splice.passes.stitch_fit` (enumeration and least squares),
:mod:`~splice.passes.stitch_routes` (the routes and the ``cond`` chain, built through the
:class:`~splice.ir.builder.Builder`); this module holds the entry points and the pass.

Invariants (tests): configurations that are one anchor equal that anchor exactly; least
squares between identical features gives W = I, b = 0; the counts follow SN-Net's rule;
switching configuration never changes weights; :func:`select_config` gives a static program
equal to the stitched one at that configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splice.errors import PassError, PipelineError
from splice.ir.program import Program
from splice.ir.serialize import load
from splice.passes.analysis.cost import cost_model
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.bind import bind_input
from splice.passes.registry import register_pass
from splice.passes.stitch_blocks import Blocks, find_blocks
from splice.passes.stitch_fit import (
    CUTS,
    Config,
    boundary_features,
    fit_layers,
    least_squares,
    paired_stitching,
    unpaired_stitching,
)
from splice.passes.stitch_routes import Anchor, build_program

KINDS = ("linear", "conv1x1", "lora")
SHARES = ("window", "pair")


@dataclass
class StitchResult:
    program: Program
    configs: list[Config]
    stats: dict[str, Any]


def stitch_programs(
    anchors: Sequence[Program],
    calib: Sequence[Sequence[torch.Tensor]],
    *,
    window: int = 2,
    stride: int = 1,
    kind: str = "linear",
    lora_rank: int = 8,
    share: str = "window",
    names: Sequence[str] | None = None,
    cuts: str = "forward",
) -> StitchResult:
    """Stitch ``anchors`` (smallest first after sorting by FLOPs) into one program whose
    configuration is its ``config`` input; least squares on ``calib`` inputs."""
    if len(anchors) < 2:
        raise PassError(f"stitch needs two or more anchors, got {len(anchors)}")
    if kind not in KINDS:
        raise PassError(f"unknown stitching layer kind {kind!r}", hint=f"kinds: {', '.join(KINDS)}")
    if not calib:
        raise PassError("stitch needs calibration inputs for the least-squares initialisation")
    if share not in SHARES:
        raise PassError(f"unknown share={share!r}", hint=f"share: {', '.join(SHARES)}")
    if cuts not in CUTS:
        raise PassError(f"unknown cuts={cuts!r}", hint=f"cuts: {', '.join(CUTS)}")
    first = anchors[0]
    for k, a in enumerate(anchors):
        if a.input_names != first.input_names or a.input_specs != first.input_specs:
            raise PassError(
                f"anchor {k} ({a.name}) takes {a.input_names} {a.input_specs}, anchor 0 takes "
                f"{first.input_names} {first.input_specs}",
                hint="anchors of one family take the same inputs",
            )
        if a.output_specs != first.output_specs:
            raise PassError(
                f"anchor {k} ({a.name}) returns {a.output_specs}, anchor 0 returns "
                f"{first.output_specs}",
                hint="stitched routes end in one anchor's head: the heads must agree",
            )
        if "config" in a.input_names:
            raise PassError(f"anchor {k} already has an input named 'config'")
    flops = [cost_model(a).total.flops for a in anchors]
    order = sorted(range(len(anchors)), key=lambda k: flops[k])
    names = list(names or [a.name for a in anchors])
    if len(set(names)) < len(names):
        names = [f"{n}#{k}" for k, n in enumerate(names)]
    names = [names[k] for k in order]
    anc = [Anchor(anchors[k], find_blocks(anchors[k]), f"a{i}") for i, k in enumerate(order)]
    for a in anc:
        a.nodes = {n.name: n for n in a.program.graph.nodes}
    kind_needed = "conv1x1" if anc[0].blocks.channel_dim == 1 else "linear"
    if kind == "conv1x1" and kind_needed != "conv1x1":
        raise PassError("kind=conv1x1 stitches [B, C, H, W] activations; these are [..., C]")
    if kind == "linear" and kind_needed == "conv1x1":
        kind = "conv1x1"
    feats = [boundary_features(a.program, a.blocks, calib) for a in anc]
    layers, configs, n_layers = fit_layers(
        feats, [a.blocks.depth for a in anc], names, window=window, stride=stride,
        share=share, kind=kind, lora_rank=lora_rank, cuts=cuts,
    )  # fmt: skip

    program = build_program(anc, configs, layers, kind)
    program.attrs["stitch"] = {
        "anchors": names,
        "depths": [a.blocks.depth for a in anc],
        "kind": kind,
        "configs": [c.to_json() for c in configs],
    }
    stats = {
        "anchors": len(anc),
        "configs": len(configs),
        "stitching_layers": n_layers,
        "depths": [a.blocks.depth for a in anc],
        "block_prefixes": [a.blocks.prefix for a in anc],
        "kind": kind,
        "share": share,
        "cuts": cuts,
    }
    return StitchResult(program, configs, stats)


def select_config(program: Program, index: int, *, input: str = "config") -> Program:
    """The static program of configuration ``index``: ``input`` bound to ``index``
    (:func:`~splice.passes.bind.bind_input`), so every ``cond(input == k)`` is decided and its
    chosen branch inlined; ``input`` is no longer a program input."""
    if input not in program.input_names:
        raise PassError(
            f"program {program.name!r} has no input {input!r}",
            hint="select a configuration of a program made by the stitch pass",
        )
    n_configs = len(program.attrs.get("stitch", {}).get("configs", [])) or None
    if n_configs is not None and not 0 <= index < n_configs:
        raise PassError(f"configuration {index} does not exist (0..{n_configs - 1})")
    name = f"{program.name}_config{index}"
    return bind_input(
        program, input, index, pass_name=None, result_name=name, drop_attrs=("stitch",)
    ).program


@register_pass
@dataclass(frozen=True)
class Stitch(Pass):
    """SN-Net stitching of the pipeline's program with ``anchors`` (module docstring).

    ``anchors``: ``|``-separated names of programs in the pass context
    (``PassContext(programs={...})``) or saved program folders. Least squares uses the first
    ``calib_samples`` calibration inputs of the context. The result takes an extra input
    ``config``; NumericCheck compares configuration 0 (the smallest anchor)."""

    name = "stitch"
    semantics = "approximate"
    summary = "stitch a model family into one program with run-time configurations (SN-Net)"

    anchors: str = ""
    window: int = 2
    stride: int = 1
    calib_samples: int = 16
    kind: str = "linear"
    lora_rank: int = 8
    share: str = "window"
    cuts: str = "forward"

    def validate(self) -> None:
        if not self.anchors:
            raise PipelineError(
                "stitch needs anchors=NAME|PATH, the other members of the model family",
                hint="e.g. stitch{anchors=small.program} or PassContext(programs={'small': p})",
            )
        if self.kind not in KINDS:
            raise PipelineError(
                f"stitch: unknown kind {self.kind!r}", hint=f"kinds: {', '.join(KINDS)}"
            )
        if self.share not in SHARES:
            raise PipelineError(
                f"stitch: unknown share {self.share!r}", hint=f"share: {', '.join(SHARES)}"
            )
        if self.cuts not in CUTS:
            raise PipelineError(
                f"stitch: unknown cuts {self.cuts!r}", hint=f"cuts: {', '.join(CUTS)}"
            )
        if self.window < 1 or self.stride < 1 or self.calib_samples < 1 or self.lora_rank < 1:
            raise PipelineError("stitch: window, stride, calib_samples and lora_rank must be >= 1")
        if self.cuts == "forward" and self.window < 2:
            raise PipelineError(
                "stitch: cuts=forward with window=1 makes no stitched configuration "
                "(a window of one block has no cut j -> m with m > j)",
                hint="use window >= 2, or cuts=all (SN-Net: block j -> block j)",
            )

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        others = []
        for ref in (a for a in self.anchors.split("|") if a):
            if ref in ctx.programs:
                others.append(ctx.programs[ref])
            else:
                try:
                    others.append(load(ref))
                except Exception as e:
                    # a SpliceError's own message, without its hint (the hint below replaces it)
                    why = getattr(e, "message", None) or str(e).splitlines()[0]
                    raise PassError(
                        f"stitch: anchor {ref!r} is neither a program in the pass context nor a "
                        f"saved program (loading it: {why})",
                        hint="save it with splice.save or pass PassContext(programs={...})",
                    ) from e
        calib = ctx.calibration[: self.calib_samples]
        if not calib:
            raise PassError(
                "stitch needs calibration inputs for its least-squares initialisation",
                hint="give sample or calibration inputs to the pipeline (--samples on the CLI)",
            )
        ctx.progress("stitching", 0, 1)
        r = stitch_programs(
            [program, *others], calib, window=self.window, stride=self.stride, kind=self.kind,
            lora_rank=self.lora_rank, share=self.share, cuts=self.cuts,
        )  # fmt: skip
        ctx.progress("stitching", 1, 1)
        return PassResult(
            r.program, True, r.stats, sample_inputs_for_new_inputs={"config": torch.tensor(0)}
        )


__all__ = [
    "Blocks",
    "Config",
    "Stitch",
    "StitchResult",
    "find_blocks",
    "least_squares",
    "paired_stitching",
    "select_config",
    "stitch_programs",
    "unpaired_stitching",
]
