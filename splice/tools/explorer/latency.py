"""Per-part latency of a compiled artifact, for the ``part latency (ms)`` overlay.

``splice bench`` times a whole artifact; :func:`time_parts` times each compiled part as the
artifact's host program calls it. It loads the artifact (every check of
:class:`~splice.runtime.artifact.CompiledModel` runs: this executes the artifact's native
code, so it runs only when asked, ``splice view ARTIFACT --time-parts N``), wraps each part
in a timer, runs the artifact's stored sample inputs once to warm up and then ``repeats``
times, and reports the mean wall time per call of each part, with its number of calls
(a part on a branch the samples never take has none and no time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError


@dataclass
class PartTime:
    """Wall time of one part: ``calls`` timed calls, ``seconds`` in all."""

    calls: int = 0
    seconds: float = 0.0

    @property
    def mean_ms(self) -> float:
        return 1e3 * self.seconds / self.calls if self.calls else 0.0


class _Timed:
    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], into: PartTime):
        self.fn, self.into, self.on = fn, into, False

    def __call__(self, *args: Any) -> Sequence[torch.Tensor]:
        t0 = time.perf_counter()
        out = self.fn(*args)
        if self.on:
            self.into.seconds += time.perf_counter() - t0
            self.into.calls += 1
        return out


def time_parts(path: str | Path, repeats: int) -> dict[str, PartTime]:
    """The time of each part of the artifact at ``path`` over ``repeats`` runs of its
    samples (see the module docstring). ArtifactError when it holds no samples."""
    from safetensors.torch import load_file

    from splice.runtime.artifact import Artifact
    from splice.runtime.host import HostProgram

    art = Artifact(path)
    samples = art.samples()
    if not samples:
        raise ArtifactError(
            f"{path} holds no sample inputs to time its parts with",
            hint="compile it with samples (splice compile on a saved program that has them)",
        )
    compiled = art.load()
    times = {name: PartTime() for name in compiled.parts}
    timed = {name: _Timed(fn, times[name]) for name, fn in compiled.parts.items()}
    host_file = art.manifest.get("host")
    if host_file:
        host = json.loads((Path(path) / host_file).read_text())
        run: Callable[..., Any] = HostProgram(
            host, dict(timed), load_file(str(Path(path) / "weights.safetensors"))
        )
    else:
        run = timed[art.manifest["parts"][0]["name"]]
    with torch.inference_mode():
        for s in samples:  # warm-up, not timed
            run(*s)
        for t in timed.values():
            t.on = True
        for _ in range(repeats):
            for s in samples:
                run(*s)
    return times


__all__ = ["PartTime", "time_parts"]
