"""A small tuner for the matmul schedules, with an on-disk database keyed by workload.

For each matmul function it builds every candidate tile size
(:func:`~splice.runtime.kernels.tvm_schedules.matmul_candidates`, at most ``trials``),
times the kernel in this process with TVM's ``time_evaluator`` on random data (weights
already packed, as at run time) and keeps the fastest. Results are stored in
``<cache>/tvm_tuning.json`` under ``sha256(target + TIR text)``, so compiling the same
shapes again costs no tuning: a database hit is used even when ``trials`` is 0.

This is the hand rules' own small search; MetaSchedule, TVM's tuner, competes with it per
function when a compile asks for tuning (:mod:`.tvm_metaschedule`). Both databases are
merged under a file lock (:func:`splice.runtime.cache.file_lock`), so concurrent compiles
keep every record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splice.runtime.cache import cache_dir, file_lock
from splice.runtime.kernels.tvm_schedules import (
    CpuShape,
    MatmulConfig,
    MatmulInfo,
    default_matmul_config,
    matmul_candidates,
    schedule_matmul,
)


class TuningDatabase:
    """workload key -> best config, persisted as one JSON file (written atomically)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else cache_dir() / "tvm_tuning.json"
        self.records: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        try:
            self.records = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.records = {}

    @staticmethod
    def key(func: Any, target: Any) -> str:
        text = f"{target}\n{func.script()}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> MatmulConfig | None:
        rec = self.records.get(key)
        if rec is None:
            return None
        return MatmulConfig(int(rec["nb"]), int(rec["mi"]))

    def put(self, key: str, cfg: MatmulConfig, record: dict[str, Any]) -> None:
        self.records[key] = {**cfg.to_json(), **record}
        self._new[key] = self.records[key]

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def save(self) -> None:
        """Merge this run's new records into the file as it is now (another compile may have
        added records since this one read it), then replace the file atomically.

        The read-merge-replace runs under an exclusive :func:`file_lock`: without it two
        processes saving at once each replace the file with their own merge, and one's
        records are lost (issue #15 measured 451 of 600 kept)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_path):
            try:
                on_disk = json.loads(self.path.read_text())
            except (OSError, ValueError):
                on_disk = {}
            self.records = {**on_disk, **self.records, **self._new}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.records, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._new = {}


def measure_kernel(
    func: Any, info: MatmulInfo, cfg: MatmulConfig, target: Any, *, repeat: int = 5
) -> float:
    """Median seconds of the scheduled kernel on random data (B already packed)."""
    import numpy as np
    import tvm

    scheduled = schedule_matmul(func, info, cfg, prepack=False).with_attr("tirx.is_scheduled", True)
    rt = tvm.compile(
        tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target
    )
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for p in scheduled.params:
        shape = [int(d) for d in p.shape]
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(p.dtype)), dev))
    timer = rt.mod.time_evaluator("main", dev, number=3, repeat=repeat, min_repeat_ms=20)
    res = timer(*args)
    return float(sorted(res.results)[len(res.results) // 2])


class Tuner:
    """Chooses matmul tile sizes: database hit, else measured search (``trials`` > 0), else default."""

    def __init__(
        self,
        target: Any,
        trials: int,
        db: TuningDatabase | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        cpu: CpuShape | None = None,
    ):
        self.target = target
        self.trials = trials
        self.cpu = cpu  # vector lanes and registers of the target (AVX2's when None)
        self.db = db if db is not None else TuningDatabase()
        self.progress = progress or (lambda message, done, total: None)
        self.log: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, str] = {}  # function name -> workload key asked in this run
        self._dirty = False

    def __call__(self, name: str, func: Any, info: MatmulInfo) -> MatmulConfig | None:
        key = TuningDatabase.key(func, self.target)
        hit = self.db.get(key)
        if hit is not None:
            if self._seen.get(name) != key:  # asked twice in one compile: keep the first log
                self.log[name] = {"source": "database", **hit.to_json()}
            self._seen[name] = key
            return hit
        self._seen[name] = key
        default = default_matmul_config(info, self.cpu)
        if self.trials <= 0 or default is None:
            self.log[name] = {"source": "default", **(default.to_json() if default else {})}
            return default
        cands = matmul_candidates(info, self.cpu)
        if default in cands:  # measure the default first, so a short budget still compares to it
            cands.remove(default)
            cands.insert(0, default)
        cands = cands[: self.trials]
        timings: dict[MatmulConfig, float] = {}
        t0 = time.perf_counter()
        for i, cfg in enumerate(cands):
            self.progress(f"tuning {name}", i, len(cands))
            try:
                timings[cfg] = measure_kernel(func, info, cfg, self.target)
            except Exception:  # a candidate that does not build is skipped
                continue
        self.progress(f"tuning {name}", len(cands), len(cands))
        if not timings:
            self.log[name] = {"source": "default", **(default.to_json() if default else {})}
            return default
        best = min(timings, key=timings.__getitem__)
        record = {
            "us": timings[best] * 1e6,
            "tried": len(timings),
            "tuning_s": time.perf_counter() - t0,
            "m": info.m,
            "n": info.n,
            "k": info.k,
        }
        self.db.put(key, best, record)
        self._dirty = True
        self.log[name] = {"source": "tuned", **best.to_json(), **record}
        return best

    def save(self) -> None:
        if self._dirty:
            self.db.save()
            self._dirty = False


__all__ = ["Tuner", "TuningDatabase", "measure_kernel"]
