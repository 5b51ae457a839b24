"""CPython's full garbage collections deferred while :func:`splice.ir.explore.capture_dynamic`
explores a model.

Why: CPython's cyclic collector runs a *full* (generation-2) collection now and then, and
a full collection walks every object the process holds -- torch's modules, the fake-tensor
caches, and the graphs of every path the capture has traced so far. The number of objects a
capture keeps alive grows with the number of paths, so for a model of ``n`` sequential
decisions the full collections during its capture cost O(n) each and start once the
capture has grown past CPython's 25% rule: on a 54-gate SkipNet (benchmarks/
explore_scaling.py's model) four full collections took 1.0-1.2 of 8-10 CPU seconds, none
at 18 gates. Deferred, one full collection (~0.4 s) runs soon after the thresholds are
restored, usually still inside ``capture_dynamic``'s last steps: the capture's surviving
objects are collected once instead of four times. The young generations are collected as
always, so the short-lived cycles of each trace (fake tensors, proxies, export's scratch
graphs) are freed as before.

How: the generation-2 threshold is raised for the capture (CPython only counts it after
each generation-1 collection, so nothing else changes) and the thresholds are restored
exactly as they were when the capture ends, by return or by exception. Nothing is frozen
(``gc.freeze``) and the collector is never disabled: a nested capture (one per input
signature) raises and restores again, and ``gc.collect()`` still works inside.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: the generation-2 threshold during a capture: generation-1 collections before CPython
#: considers a full one (its default is 10; a capture of 54 gates runs ~80 of them)
DEFERRED_THRESHOLD2 = 1_000_000


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
    """Raise CPython's generation-2 threshold while the block runs (module docs); the
    previous thresholds are restored exactly, also when the block raises."""
    before = gc.get_threshold()
    if len(before) >= 3 and before[0] > 0:
        gc.set_threshold(before[0], before[1], max(before[2], DEFERRED_THRESHOLD2))
    try:
        yield
    finally:
        gc.set_threshold(*before)


__all__ = ["DEFERRED_THRESHOLD2", "full_collections_deferred"]
