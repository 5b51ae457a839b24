"""Enumeration and least squares for ``stitch`` (SN-Net's rules; see
:mod:`splice.passes.stitch`).

* :func:`paired_stitching` / :func:`unpaired_stitching`: the (front block, end block) cuts
  of two anchors and the stitching layer each cut uses;
* :func:`boundary_features`: an anchor's activations at its block boundaries on
  calibration inputs, channels last;
* :func:`least_squares` and :func:`fit_layers`: the stitching layers' weights (float64
  least squares, a window's layer the mean of its pairs' solutions) and the configurations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splice.errors import PassError
from splice.ir.program import Program
from splice.passes.stitch_blocks import Blocks


@dataclass
class Config:
    """One configuration: an anchor alone, or front anchor's blocks 0..j → layer → end
    anchor's blocks m.. and head."""

    index: int
    anchor: int | None = None
    front: int | None = None
    end: int | None = None
    cut: tuple[int, int] | None = None
    layer: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index}
        if self.anchor is not None:
            d["anchor"] = self.anchor
        else:
            d.update(front=self.front, end=self.end, cut=list(self.cut or ()), layer=self.layer)
        return d

    def describe(self, names: Sequence[str]) -> str:
        if self.anchor is not None:
            return f"{names[self.anchor]}"
        j, m = self.cut or (0, 0)
        return f"{names[self.front]}[0..{j}] → {names[self.end]}[{m}..]"


#: which (front block j, end block m) cuts paired stitching keeps
CUTS = ("all", "forward")


def paired_stitching(
    depth: int, window: int = 2, stride: int = 1, cuts: str = "forward"
) -> tuple[list[tuple[int, int]], list[int]]:
    """SN-Net's paired stitching for two anchors of equal ``depth``: the (front block j,
    end block m) pairs and, per pair, its stitching layer (one per window with new pairs).

    ``cuts="all"`` keeps every pair of the window (SN-Net): ``m <= j`` runs blocks ``m..j``
    twice. ``cuts="forward"`` keeps only ``m > j`` (SN-Netv2 drops ``j >= m``): every block
    runs at most once, so no stitching layer has to undo a block."""
    if window < 1 or stride < 1:
        raise PassError(f"window and stride must be >= 1, got window={window} stride={stride}")
    if cuts not in CUTS:
        raise PassError(f"unknown cuts={cuts!r}", hint=f"cuts: {', '.join(CUTS)}")
    pairs: list[tuple[int, int]] = []
    layer_of: list[int] = []
    layer = -1
    for start in range(0, depth, stride):
        ids = list(range(start, min(start + window, depth)))
        new = [(j, m) for j in ids for m in ids if (j, m) not in pairs and (cuts == "all" or m > j)]
        if new:
            layer += 1
            pairs.extend(new)
            layer_of.extend([layer] * len(new))
    return pairs, layer_of


def unpaired_stitching(front_depth: int, end_depth: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Different depths: front block j to the end block at the same relative depth."""
    pairs = []
    for j in range(front_depth - 1):
        m = round((j + 1) * end_depth / front_depth)
        if 0 < m < end_depth and (j, m) not in pairs:
            pairs.append((j, m))
    return pairs, list(range(len(pairs)))


#: singular values of the centred features below this fraction of the largest are treated
#: as zero: calibration features are float32, so directions that small are rounding noise
LSTSQ_RCOND = 1e-6


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ‖x·Wᵀ + b − y‖ (rows are samples), in float64.

    Solved on centred features (b = ȳ − W·x̄) as the minimum-norm solution over the
    singular directions of x − x̄ above :data:`LSTSQ_RCOND` of the largest. Features with an
    exact linear dependency in exact arithmetic (a LayerNorm's outputs: Σᵢ (xᵢ − βᵢ)/γᵢ = 0
    in every row) have one only up to float32 rounding; keeping that direction gives weights
    of 10³–10⁸ along it, harmless on the pair's own features but not once a window's layer
    averages several pairs' solutions (all-MiniLM-L6-v2 self-stitched: the mean layer's
    residual was 10³–10⁷ times the target's spread; heal's gradients then overflowed).
    On well-conditioned features this is the ordinary least-squares solution.
    """
    if x.shape[0] != y.shape[0]:
        raise PassError(
            f"least squares needs as many rows in X ({x.shape[0]}) as in Y ({y.shape[0]})"
        )
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    a = torch.linalg.lstsq(x64 - mx, y64 - my, rcond=LSTSQ_RCOND, driver="gelsd").solution
    w = a.T.contiguous()
    return w, (my - w @ mx).contiguous()


def boundary_features(
    program: Program, blocks: Blocks, calib: Sequence[Sequence[torch.Tensor]]
) -> list[torch.Tensor]:
    """Boundary activations of ``program`` on ``calib``, channels last, concatenated over
    samples (one tensor per boundary of ``blocks``)."""
    p = program.copy()
    for i, name in enumerate(blocks.boundary):
        p.add_output(f"__boundary_{i}", p.node(name))
    n_out = len(program.output_names)
    per: list[list[torch.Tensor]] = [[] for _ in blocks.boundary]
    with torch.no_grad():
        for sample in calib:
            outs = p.run(*sample)[n_out:]
            for i, t in enumerate(outs):
                per[i].append(t.movedim(1, -1) if blocks.channel_dim == 1 else t)
    return [torch.cat(ts, dim=0) for ts in per]


def fit_layers(
    feats: Sequence[Sequence[torch.Tensor]],
    depths: Sequence[int],
    names: Sequence[str],
    *,
    window: int,
    stride: int,
    share: str,
    kind: str,
    lora_rank: int,
    cuts: str = "forward",
) -> tuple[dict[str, dict[str, torch.Tensor]], list[Config], int]:
    """Stitching layers and configurations for anchors sorted small to large: ``feats[a]``
    are anchor ``a``'s :func:`boundary_features`, ``depths[a]`` its block count. Adjacent
    anchors are paired; returns (layer key -> its tensors, every configuration with the
    anchors alone first, the number of layers)."""
    configs = [Config(i, anchor=i) for i in range(len(feats))]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    n_layers = 0
    for f in range(len(feats) - 1):
        e = f + 1
        lf, le = depths[f], depths[e]
        pairs, layer_of = (
            paired_stitching(lf, window, stride, cuts) if lf == le else unpaired_stitching(lf, le)
        )
        if not pairs:
            raise PassError(
                f"no stitching configuration between {names[f]} and {names[e]}: cuts={cuts} "
                f"with window={window} keeps no (front block, end block) pair of depth {lf}",
                hint="stitch needs window >= 2 and two or more blocks with cuts=forward, "
                "or use cuts=all",
            )
        if share == "pair":
            layer_of = list(range(len(pairs)))
        sols: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (j, m), li in zip(pairs, layer_of):
            x, y = feats[f][j + 1], feats[e][m]
            if x.shape[:-1] != y.shape[:-1]:
                raise PassError(
                    f"cannot stitch {names[f]} block {j} ({list(x.shape)}) to {names[e]} block "
                    f"{m} ({list(y.shape)}): token or spatial counts differ",
                )
            sols.setdefault(li, []).append(
                least_squares(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
            )
        for li, ss in sols.items():
            w = torch.stack([s[0] for s in ss]).mean(0).float()
            b = torch.stack([s[1] for s in ss]).mean(0).float()
            key = f"stitch.{f}_{e}.{li}"
            layers[key] = {"weight": w, "bias": b}
            if kind == "lora":
                g = torch.Generator().manual_seed(li)
                r = max(1, min(lora_rank, *w.shape))
                layers[key]["lora_a"] = torch.randn(r, w.shape[1], generator=g) / math.sqrt(
                    w.shape[1]
                )
                layers[key]["lora_b"] = torch.zeros(w.shape[0], r)
        n_layers += len(sols)
        for (j, m), li in zip(pairs, layer_of):
            configs.append(
                Config(len(configs), front=f, end=e, cut=(j, m), layer=f"stitch.{f}_{e}.{li}")
            )
    return layers, configs, n_layers


__all__ = [
    "CUTS",
    "Config",
    "boundary_features",
    "fit_layers",
    "least_squares",
    "paired_stitching",
    "unpaired_stitching",
]
