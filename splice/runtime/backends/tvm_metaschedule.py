"""MetaSchedule, TVM's tuner, as the search engine against splice's hand rules.

When a compile asks for tuning (``tune=N``), every matmul-like PrimFunc of the module (the
ones :func:`~splice.runtime.kernels.tvm_schedules.analyse_matmul` recognises) is tuned by MetaSchedule for ``N``
trials on the compile target; the hand-rule schedule of the same function is measured the
same way (same builder, same runner, same random data), and the faster one is kept.
``tune=0`` never tunes: it uses the database's decision where there is one, else the hand
rules.

**The database** lives in ``<cache>/metaschedule/<target-key>/`` (cache: ``$SPLICE_CACHE_DIR``
or ``~/.cache/splice``): ``database_workload.json`` and ``database_tuning_record.json`` in
TVM's own JSON-database format (one JSON line per workload / record, workloads keyed by
TVM's structural hash), and ``splice_choices.json``, splice's per-workload decision (hand
vs MetaSchedule, both times in µs, the trials done). Every write happens under an
exclusive ``fcntl.flock`` on ``<dir>/.lock``, and records are appended as soon as they are
measured, so concurrent compiles keep every record, Ctrl-C keeps what was measured, and a
re-run resumes: a workload with ``N`` records already does no tuning.

**Measuring.** Candidates are built in this process (``tvm.tirx.build`` after
``RemoveWeightLayoutRewriteBlock``, so weights are measured already repacked, as at run
time) and timed with ``time_evaluator``: in this process for a local target, or on devices
registered with a TVM RPC tracker (``rpc="HOST:PORT:KEY"``), one session per registered
device, measuring in parallel. MetaSchedule's own LocalBuilder/LocalRunner start worker
processes that import TVM, which on a loaded 2-core machine outlasts their 30 s timeouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from splice.errors import LoweringError
from splice.runtime.cache import cache_dir, file_lock
from splice.runtime.kernels.tvm_schedules import analyse_matmul, schedule_module

Progress = Callable[[str, int, int], None]

RPC_TIMEOUT_S = 60.0
"""How long to wait for the tracker to answer and for a device with the key to be free."""

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
CHOICES = "splice_choices.json"
FAILED = 1e10  # MetaSchedule's run time of a candidate that did not build or run

TRIALS_PER_ITER = 16
"""Candidates MetaSchedule measures per round (and so per database write batch)."""

INTERRUPTED = threading.Event()
"""Set by Ctrl-C during a tuning run: MetaSchedule's C++ loop swallows a KeyboardInterrupt
raised in its Python callbacks, so the builder and runner stop working, nothing more is
recorded, and the run raises KeyboardInterrupt when the loop returns."""


@dataclasses.dataclass(frozen=True)
class RpcSpec:
    """A TVM RPC tracker address and the device key to request from it."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> RpcSpec:
        """``HOST:PORT:KEY`` -> RpcSpec, or a LoweringError saying what is wrong."""
        parts = str(text).split(":")
        hint = (
            "give the tracker as HOST:PORT:KEY, e.g. 127.0.0.1:9190:rasp4 "
            "(python -m tvm.exec.rpc_tracker; rpc_server --tracker HOST:PORT --key KEY)"
        )
        if len(parts) != 3 or not all(parts):
            raise LoweringError(f"bad rpc address {text!r}: expected HOST:PORT:KEY", hint=hint)
        host, port, key = parts
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise LoweringError(
                f"bad rpc address {text!r}: port {port!r} is not 1..65535", hint=hint
            )
        return cls(host, int(port), key)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"


# ---------------------------------------------------------------------------------------
# the database


def target_key(ttarget: Any) -> str:
    """A folder name for a TVM target: readable prefix + hash of its full description."""
    text = str(ttarget)
    attrs = dict(ttarget.attrs) if hasattr(ttarget, "attrs") else {}
    triple = str(attrs.get("mtriple", "")).split("-")[0] or "generic"
    cpu = str(attrs.get("mcpu", "")) or "generic"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{ttarget.kind.name}-{triple}-{cpu}-{digest}"


def database_dir(ttarget: Any) -> Path:
    return cache_dir() / "metaschedule" / target_key(ttarget)


def _ms() -> Any:
    import tvm.s_tir.meta_schedule as ms

    return ms


def _read_lines(path: Path) -> list[Any]:
    """The JSON lines of ``path``; a line cut short by a crash is skipped."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _append_line(path: Path, obj: Any) -> None:
    data = (json.dumps(obj) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _make_database_class() -> type:
    """The PyDatabase subclass (defined lazily: it needs TVM)."""
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class SpliceDatabase(ms.database.PyDatabase):
        """A MetaSchedule database in memory, persisted as TVM's JSON-database files and
        written under a file lock (see the module docstring)."""

        def __init__(self, folder: str) -> None:
            super().__init__()
            self.folder = Path(folder)
            self.mem = ms.database.MemoryDatabase()
            self.counts: dict[str, int] = {}
            self.committed = 0  # records this process measured (the tests' counter)
            self._scratch: tempfile.TemporaryDirectory[str] | None = None
            self._json: Any = None
            self.folder.mkdir(parents=True, exist_ok=True)
            with file_lock(self.folder / ".lock", shared=True):
                workloads = _read_lines(self.folder / WORKLOADS)
                records = _read_lines(self.folder / RECORDS)
            loaded = []
            for w in workloads:
                try:
                    loaded.append(self.mem.commit_workload(ms.database.Workload.from_json(w).mod))
                except Exception:
                    loaded.append(None)
            for line in records:
                try:
                    idx, rec = int(line[0]), line[1]
                    wl = loaded[idx]
                    if wl is None:
                        continue
                    self.mem.commit_tuning_record(ms.database.TuningRecord.from_json(rec, wl))
                    key = str(wl.as_json()[0])
                    self.counts[key] = self.counts.get(key, 0) + 1
                except Exception:  # a damaged line: skipped
                    continue

        def has_workload(self, mod: Any) -> bool:
            return bool(self.mem.has_workload(mod))

        def commit_workload(self, mod: Any) -> Any:
            return self.mem.commit_workload(mod)

        def commit_tuning_record(self, record: Any) -> None:
            if INTERRUPTED.is_set():  # not measured: must not count as a trial done
                return
            self.mem.commit_tuning_record(record)
            wl_json = record.workload.as_json()
            key = str(wl_json[0])
            self.counts[key] = self.counts.get(key, 0) + 1
            self.committed += 1
            with file_lock(self.folder / ".lock"):
                # indices are positions in the workload file as it is now, under the lock
                known = [str(w[0]) for w in _read_lines(self.folder / WORKLOADS)]
                if key in known:
                    idx = known.index(key)
                else:
                    _append_line(self.folder / WORKLOADS, wl_json)
                    idx = len(known)
                _append_line(self.folder / RECORDS, [idx, self._record_json(record)])

        def _record_json(self, record: Any) -> Any:
            """The record as TVM's JSON database writes it (its trace may hold objects, such
            as IndexMaps, that ``TuningRecord.as_json`` cannot turn into Python): written
            through a scratch JSONDatabase, read back."""
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="splice-ms-json-")
                d = self._scratch.name
                self._json = ms.database.JSONDatabase(
                    f"{d}/{WORKLOADS}", f"{d}/{RECORDS}", allow_missing=True
                )
            self._json.commit_workload(record.workload.mod)
            self._json.commit_tuning_record(record)
            with open(f"{self._scratch.name}/{RECORDS}", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - (1 << 22)))
                last = f.read().decode().rstrip("\n").rsplit("\n", 1)[-1]
            return json.loads(last)[1]

        def get_top_k(self, workload: Any, top_k: int) -> list[Any]:
            return list(self.mem.get_top_k(workload, top_k))

        def get_all_tuning_records(self) -> list[Any]:
            return list(self.mem.get_all_tuning_records())

        def __len__(self) -> int:
            return len(self.mem)

        def count(self, key: str) -> int:
            """Trials recorded for a workload (failed ones included)."""
            return self.counts.get(key, 0)

    return SpliceDatabase


_DB_CLASS: type | None = None


def open_database(folder: str | os.PathLike[str]) -> Any:
    """The MetaSchedule database in ``folder`` (created if missing)."""
    global _DB_CLASS
    if _DB_CLASS is None:
        _DB_CLASS = _make_database_class()
    return _DB_CLASS(str(folder))


def read_choices(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((folder / CHOICES).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_choice(folder: Path, key: str, choice: dict[str, Any]) -> None:
    """Merge one decision into ``splice_choices.json`` under the folder's lock."""
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock"):
        data = read_choices(folder)
        data[key] = choice
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".choices-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, folder / CHOICES)


# ---------------------------------------------------------------------------------------
# builder and runner


def _normalize(func: Any) -> Any:
    """The single-function IRModule MetaSchedule uses for ``func`` (its workload)."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def workload_key(func: Any) -> str:
    """TVM's structural hash of the workload, as the JSON database writes it."""
    return str(_ms().database.Workload(_normalize(func)).as_json()[0])


def build_candidate(mod: Any, target: Any, out_dir: str, fcompile: Any | None) -> str:
    """Build one scheduled IRModule into a shared library under ``out_dir``; its path."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    rt = tvm_build(mod, target=target)
    # one folder per candidate: MetaSchedule's RemoveBuildArtifact removes the folder
    path = os.path.join(tempfile.mkdtemp(dir=out_dir), "kernel.so")
    if fcompile is None:
        rt.export_library(path)
    else:
        rt.export_library(path, fcompile=fcompile)
    return path


class Session:
    """Where kernels are timed: this process, or one device of an RPC tracker."""

    def __init__(self, remote: Any | None = None):
        import tvm

        self.tvm = tvm
        self.remote = remote
        self.device = remote.cpu(0) if remote is not None else tvm.cpu(0)

    def time(self, path: str, args_info: list[Any], *, repeat: int = 3) -> list[float]:
        import numpy as np

        tvm = self.tvm
        if self.remote is not None:
            name = f"splice-{os.getpid()}-{id(self)}-{time.monotonic_ns()}.so"
            self.remote.upload(path, name)
            rt = self.remote.load_module(name)
        else:
            rt = tvm.runtime.load_module(path)
        rng = np.random.default_rng(0)
        args = []
        for info in args_info:
            _, dtype, shape = info.as_json()
            arr = rng.standard_normal([int(d) for d in shape]).astype(str(dtype))
            args.append(tvm.runtime.tensor(arr, self.device))
        timer = rt.time_evaluator(
            rt.entry_name, self.device, number=3, repeat=repeat, min_repeat_ms=20
        )
        try:
            return [float(x) for x in timer(*args).results]
        finally:
            if self.remote is not None:
                self.remote.remove(name)


def connect_rpc(spec: RpcSpec, *, timeout: float = RPC_TIMEOUT_S) -> tuple[Any, int]:
    """Connect to the tracker and wait (at most ``timeout``) for a device with the key:
    returns the tracker session and the number of devices registered under the key."""
    from tvm import rpc

    hint = (
        f"start a tracker (python -m tvm.exec.rpc_tracker --host {spec.host} --port "
        f"{spec.port}) and a server (python -m tvm.exec.rpc_server --tracker "
        f"{spec.host}:{spec.port} --key {spec.key}), or compile without rpc"
    )
    deadline = time.monotonic() + timeout
    try:
        # one plain connect first: TVM's own client retries a refused connection for 60 s
        socket.create_connection((spec.host, spec.port), timeout=min(5.0, timeout)).close()
        tracker = rpc.connect_tracker(spec.host, spec.port)
        summary = _call_with_timeout(tracker.summary, timeout)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"cannot reach the RPC tracker at {spec.host}:{spec.port}: {type(e).__name__}: {e}",
            hint=hint,
        ) from e
    while True:
        info = summary.get("queue_info", {}).get(spec.key)
        servers = [s for s in summary.get("server_info", []) if _server_key(s) == spec.key]
        n = len(servers) or (int(info.get("free", 0)) if info else 0)
        if n > 0:
            return tracker, n
        if time.monotonic() > deadline:
            raise LoweringError(
                f"no device with key {spec.key!r} registered at the RPC tracker "
                f"{spec.host}:{spec.port} within {timeout:.0f} s",
                hint=hint,
            )
        time.sleep(0.5)
        summary = _call_with_timeout(tracker.summary, timeout)


def _server_key(server: dict[str, Any]) -> str:
    key = str(server.get("key", ""))
    return key.split(":", 1)[1] if key.startswith("server:") else key


def _call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; a LoweringError if it takes longer than ``timeout``."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def run() -> None:
        try:
            box.put((True, fn()))
        except BaseException as e:
            box.put((False, e))

    threading.Thread(target=run, daemon=True).start()
    try:
        ok, value = box.get(timeout=timeout)
    except queue.Empty:
        raise LoweringError(
            f"the RPC tracker did not answer within {timeout:.0f} s",
            hint="check the tracker and that a server with the key is free",
        ) from None
    if not ok:
        raise value
    return value


class Measurer:
    """Builds candidates in this process and times them in sessions (local or RPC)."""

    def __init__(self, target: Any, *, rpc: RpcSpec | None = None, fcompile: Any | None = None):
        self.target = target
        self.rpc = rpc
        self.fcompile = fcompile
        self.tmp = tempfile.TemporaryDirectory(prefix="splice-ms-")
        self.sessions: list[Session] = []
        self.measured = 0
        if rpc is None:
            self.sessions = [Session()]
        else:
            tracker, n = connect_rpc(rpc)
            for _ in range(min(n, 8)):
                remote = _call_with_timeout(
                    lambda: tracker.request(rpc.key, priority=1, session_timeout=0),
                    RPC_TIMEOUT_S,
                )
                self.sessions.append(Session(remote))

    def build(self, mods: list[Any]) -> list[tuple[str | None, str | None]]:
        """(path, error) per module."""
        out: list[tuple[str | None, str | None]] = []
        for mod in mods:
            if INTERRUPTED.is_set():
                out.append((None, "interrupted"))
                continue
            try:
                out.append((build_candidate(mod, self.target, self.tmp.name, self.fcompile), None))
            except Exception as e:
                out.append((None, f"{type(e).__name__}: {str(e)[-300:]}"))
        return out

    def run(self, jobs: list[tuple[str, list[Any]]]) -> list[tuple[list[float] | None, str | None]]:
        """Time each (library path, args info) job: (seconds per repeat, error) per job,
        spread over the sessions (one thread per session)."""
        results: list[tuple[list[float] | None, str | None]] = [(None, "not run")] * len(jobs)
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(jobs)):
            todo.put(i)

        def worker(session: Session) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                path, info = jobs[i]
                if INTERRUPTED.is_set():
                    results[i] = (None, "interrupted")
                    continue
                try:
                    results[i] = (session.time(path, info), None)
                except Exception as e:
                    results[i] = (None, f"{type(e).__name__}: {str(e)[-300:]}")
                self.measured += 1

        if len(self.sessions) == 1:
            worker(self.sessions[0])
        else:
            with ThreadPoolExecutor(len(self.sessions)) as pool:
                list(pool.map(worker, self.sessions))
        return results

    def measure(self, func: Any) -> float | None:
        """Median seconds of one scheduled PrimFunc, built and timed like a candidate."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo

        mod = _normalize(func)
        ((path, _err),) = self.build([mod])
        if path is None:
            return None
        info = list(ArgInfo.from_entry_func(mod, remove_preproc=True))
        ((secs, _err),) = self.run([(path, info)])
        if not secs:
            return None
        return sorted(secs)[len(secs) // 2]

    def close(self) -> None:
        self.sessions = []
        self.tmp.cleanup()


def _builder_runner(measurer: Measurer) -> tuple[Any, Any]:
    """MetaSchedule Builder and Runner objects over ``measurer``."""
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            done = measurer.build([b.mod for b in build_inputs])
            return [ms.builder.BuilderResult(path, err) for path, err in done]

    @derived_object
    class Future(ms.runner.PyRunnerFuture):
        def __init__(self, result: Any) -> None:
            super().__init__()
            self._result = result

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return self._result

    @derived_object
    class SessionRunner(ms.runner.PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            jobs = [(r.artifact_path, list(r.args_info)) for r in runner_inputs]
            out = []
            for secs, err in measurer.run(jobs):
                out.append(Future(ms.runner.RunnerResult(secs, err)))
            return out

    return InProcessBuilder(), SessionRunner()


def _progress_callback(name: str, total: int, flop: float, say: Progress) -> Any:
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.done = 0
            self.best = float("inf")

        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):  # type: ignore[no-untyped-def]
            for r in runner_results:
                self.done += 1
                if r.error_msg is None and r.run_secs:
                    secs = [float(x) for x in r.run_secs]
                    self.best = min(self.best, sum(secs) / len(secs))
            best = (
                f"best {self.best * 1e6:.1f} us, {flop / self.best / 1e9:.1f} GFLOP/s"
                if self.best < float("inf")
                else "no valid candidate yet"
            )
            say(f"tuning {name} (MetaSchedule, {best})", min(self.done, total), total)

    return ProgressCallback()


# ---------------------------------------------------------------------------------------
# the driver


def _flop(info: Any) -> float:
    return 2.0 * info.m * info.n * info.k * max(1, info.batch)


def _reset_ms_logging() -> None:
    """MetaSchedule configures its loggers per run (files in the work dir, a console
    handler at the logger's level): warnings only on the console, and the previous run's
    handlers closed (a second configuration in one process trips over them otherwise)."""
    import logging

    root = logging.getLogger("tvm.s_tir.meta_schedule")
    root.setLevel(logging.WARNING)
    for logger in [root, *(
        lg for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("tvm.s_tir.meta_schedule.") and isinstance(lg, logging.Logger)
    )]:  # fmt: skip
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()


class MetaScheduleTuner:
    """Per-function choice between MetaSchedule and the hand rules (module docstring)."""

    def __init__(
        self,
        ttarget: Any,
        trials: int,
        *,
        hand: Callable[[Any, str], Any | None],
        rpc: RpcSpec | None = None,
        fcompile: Any | None = None,
        progress: Progress | None = None,
        folder: Path | None = None,
    ):
        self.target = ttarget
        self.trials = trials
        self.hand = hand
        self.rpc = rpc
        self.fcompile = fcompile
        self.say = progress or (lambda message, done, total: None)
        self.folder = folder if folder is not None else database_dir(ttarget)
        self.log: dict[str, dict[str, Any]] = {}
        self.trials_run = 0  # MetaSchedule trials measured by this tuner (0 on a re-run)
        self.hand_measured = 0
        self._db: Any | None = None
        self._measurer: Measurer | None = None

    @property
    def active(self) -> bool:
        """Tuning asked for, or a database to read decisions from."""
        return self.trials > 0 or (self.folder / CHOICES).exists()

    def db(self) -> Any:
        if self._db is None:
            self._db = open_database(self.folder)
        return self._db

    def measurer(self) -> Measurer:
        if self._measurer is None:
            self._measurer = Measurer(self.target, rpc=self.rpc, fcompile=self.fcompile)
        return self._measurer

    def close(self) -> None:
        if self._measurer is not None:
            self._measurer.close()
            self._measurer = None

    def best_schedule(self, func: Any) -> Any | None:
        """MetaSchedule's best scheduled function for ``func`` from the database, or None."""
        ms = _ms()
        with self.target:
            sch = ms.tir_integration.compile_tir(self.db(), func, self.target)
        return None if sch is None else sch.mod["main"]

    def choose(self, name: str, func: Any, info: Any) -> Any | None:
        """The MetaSchedule-scheduled ``func`` when it beats the hand rules, else None."""
        key = workload_key(func)
        choices = read_choices(self.folder)
        choice = choices.get(key)
        if self.trials <= 0:
            if choice is None or choice.get("winner") != "metaschedule":
                return None
            best = self.best_schedule(func)
            self.log[name] = {
                **choice,
                "source": "database",
                "trials_run": 0,
                **({} if best is not None else {"winner": "hand", "note": "record missing"}),
            }
            return best
        return self._tune(name, func, info, key, choice)

    def _tune(
        self, name: str, func: Any, info: Any, key: str, choice: dict[str, Any] | None
    ) -> Any | None:
        db = self.db()
        have = db.count(key)
        todo = max(0, self.trials - have)
        t0 = time.perf_counter()
        if todo > 0:
            self._run_metaschedule(name, func, info, todo)
        tuning_s = time.perf_counter() - t0
        best = self.best_schedule(func)
        ms_s = self._record_time(func, key)
        hand_func = self.hand(func, name)
        hand_key = workload_key(hand_func) if hand_func is not None else None
        if choice is not None and choice.get("hand_key") == hand_key and "hand_us" in choice:
            hand_s = choice["hand_us"] * 1e-6 if choice["hand_us"] is not None else None
        else:
            hand_s = self.measurer().measure(hand_func) if hand_func is not None else None
            self.hand_measured += 1
        winner = (
            "metaschedule"
            if best is not None and ms_s is not None and (hand_s is None or ms_s < hand_s)
            else "hand"
        )
        flop = _flop(info)
        new = {
            "winner": winner,
            "hand_key": hand_key,
            "hand_us": None if hand_s is None else hand_s * 1e6,
            "ms_us": None if ms_s is None else ms_s * 1e6,
            "hand_gflops": None if not hand_s else flop / hand_s / 1e9,
            "ms_gflops": None if not ms_s else flop / ms_s / 1e9,
            "trials": db.count(key),
            "m": info.m,
            "n": info.n,
            "k": info.k,
            "batch": info.batch,
            "rpc": str(self.rpc) if self.rpc is not None else None,
        }
        if new != choice:
            write_choice(self.folder, key, new)
        self.log[name] = {**new, "source": "tuned", "trials_run": todo, "tuning_s": tuning_s}
        return best if winner == "metaschedule" else None

    def _record_time(self, func: Any, key: str) -> float | None:
        """Mean seconds of MetaSchedule's best record for ``func`` (None without one)."""
        db = self.db()
        mod = _normalize(func)
        if not db.has_workload(mod):
            return None
        top = db.get_top_k(db.commit_workload(mod), 1)
        if not top:
            return None
        secs = [float(x) for x in top[0].run_secs]
        mean = sum(secs) / len(secs)
        return None if mean >= FAILED else mean

    def _run_metaschedule(self, name: str, func: Any, info: Any, trials: int) -> None:
        ms = _ms()
        builder, runner = _builder_runner(self.measurer())
        per_iter = max(1, min(trials, TRIALS_PER_ITER))
        callbacks = [
            *ms.measure_callback.MeasureCallback.create("default"),
            _progress_callback(name, trials, _flop(info), self.say),
        ]
        cost_model = "xgb" if _has_xgboost() else "random"
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=max(32, min(256, 16 * trials)), genetic_num_iters=2
        )
        self.say(f"tuning {name} (MetaSchedule)", 0, trials)
        before = self.db().committed
        with _interruptible(), tempfile.TemporaryDirectory(prefix="splice-ms-work-") as work:
            _reset_ms_logging()
            with self.target, _without_tensor_intrinsics():
                ms.tune_tir(
                    _normalize(func),
                    self.target,
                    work,
                    max_trials_global=trials,
                    max_trials_per_task=trials,
                    num_trials_per_iter=per_iter,
                    builder=builder,
                    runner=runner,
                    database=self.db(),
                    cost_model=cost_model,
                    measure_callbacks=callbacks,
                    task_scheduler="round-robin",
                    strategy=strategy,
                    num_tuning_cores=1,
                    seed=0,
                )
            _reset_ms_logging()
        self.trials_run += self.db().committed - before


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C during the block sets :data:`INTERRUPTED` (see there); a KeyboardInterrupt is
    raised when the block ends. What was measured before is already in the database."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: INTERRUPTED.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if INTERRUPTED.is_set():
        INTERRUPTED.clear()
        raise KeyboardInterrupt("tuning interrupted; the trials measured so far are kept")


@contextlib.contextmanager
def _without_tensor_intrinsics() -> Iterator[None]:
    """Skip ``import tvm.s_tir.tensor_intrin`` (which MetaSchedule's TuneContext does) for
    the block: it parses every CUDA/ARM/x86/Hexagon tensor intrinsic as TVMScript, which
    took 4 minutes on a loaded 2-core machine; the CPU search spaces need only the x86
    and ARM ones, which are imported.
    A package stub with the real ``__path__`` stands in (submodules still import); it is
    removed afterwards, so a later real import registers the intrinsics."""
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    import tvm.s_tir as parent

    spec = importlib.util.find_spec(name)
    stub = types.ModuleType(name)
    stub.__path__ = list(spec.submodule_search_locations or []) if spec else []
    stub.__package__ = name
    sys.modules[name] = stub
    try:
        # the CPU spaces' rules look up the x86 (VNNI) and ARM (dot-product) intrinsics
        importlib.import_module(f"{name}.x86")
        importlib.import_module(f"{name}.arm_cpu")
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
            if getattr(parent, "tensor_intrin", None) is stub:
                delattr(parent, "tensor_intrin")


def _has_xgboost() -> bool:
    return importlib.util.find_spec("xgboost") is not None


def iter_matmuls(mod: Any) -> Iterator[tuple[Any, str, Any, Any]]:
    """(global var, name, PrimFunc, MatmulInfo) of each unscheduled matmul-like function."""
    from tvm import tirx

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and (
            func.attrs.get("tirx.is_scheduled", False) or func.attrs.get("splice.kernel", None)
        ):
            continue
        info = analyse_matmul(func)
        if info is not None:
            yield gv, gv.name_hint, func, info


def apply(mod: Any, tuner: MetaScheduleTuner) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Replace each matmul function of ``mod`` whose MetaSchedule schedule wins by it
    (marked scheduled, so the hand rules leave it alone); the log per function."""
    if not tuner.active:
        return mod, {}
    try:
        for gv, name, func, info in list(iter_matmuls(mod)):
            new = tuner.choose(name, func, info)
            if new is not None:
                mod[gv] = _like(new, func).with_attr("tirx.is_scheduled", True)
    finally:
        tuner.close()
    return mod, tuner.log


def _like(new: Any, old: Any) -> Any:
    """``new`` with ``old``'s global symbol (or none, as ``old``): MetaSchedule's workload
    was named ``main``."""
    symbol = old.attrs.get("global_symbol", None) if old.attrs is not None else None
    if symbol is not None:
        return new.with_attr("global_symbol", symbol)
    return new.without_attr("global_symbol") if new.attrs is not None else new


def tune_module(
    mod: Any,
    target: Any,
    ttarget: Any,
    trials: int,
    *,
    choose: Callable[[str, Any, Any], Any],
    rpc: str | RpcSpec | None = None,
    fcompile: Any | None = None,
    foreign: bool = False,
    progress: Progress | None = None,
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The compile driver's entry: MetaSchedule against the hand rules on every matmul
    function of ``mod`` (a Relax module after FuseTIR), for splice ``target`` / TVM
    ``ttarget``. ``choose`` is the hand rules' tile chooser (the :class:`~.tvm_tuner.Tuner`).
    A ``foreign`` target (another architecture) can be measured only over ``rpc``: without
    it nothing is tuned, and database decisions are still used."""
    spec = RpcSpec.parse(rpc) if isinstance(rpc, str) else rpc
    if foreign and spec is None:
        trials = 0

    def hand(func: Any, name: str) -> Any | None:
        import tvm

        one = tvm.IRModule({name: func})  # named as in the module: the Tuner logs by name
        try:
            out, _ = schedule_module(one, choose, target=target)
        except TypeError:  # hand rules without a target argument
            out, _ = schedule_module(one, choose)
        return out[name]

    tuner = MetaScheduleTuner(
        ttarget, trials, hand=hand, rpc=spec, fcompile=fcompile, progress=progress
    )
    return apply(mod, tuner)


__all__ = [
    "MetaScheduleTuner",
    "RpcSpec",
    "apply",
    "connect_rpc",
    "database_dir",
    "open_database",
    "target_key",
    "tune_module",
    "workload_key",
]
