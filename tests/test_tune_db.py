"""The tuning databases under concurrent writers (issue #15 item 7): nothing is lost."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from splice.runtime.backends.tvm_tuner import TuningDatabase
from splice.runtime.cache import file_lock
from splice.runtime.kernels.tvm_schedules import MatmulConfig

RECORDS = 300  # per process, each by its own short-lived database (like 300 compiles)


def _writer(path: str, who: int, start: mp.synchronize.Event) -> None:
    start.wait()
    for i in range(RECORDS):
        db = TuningDatabase(path)
        db.put(f"{who}-{i}", MatmulConfig(16, 4), {"us": float(i)})
        db.save()


def test_two_processes_keep_every_record(tmp_path: Path) -> None:
    path = str(tmp_path / "tvm_tuning.json")
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(path, who, start)) for who in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    records = TuningDatabase(path).records
    assert len(records) == 2 * RECORDS
    assert records["1-299"]["us"] == 299.0
    assert not list(tmp_path.glob(".tuning-*"))  # no temporary file left behind


def test_file_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    import fcntl
    import os

    lock = tmp_path / "x.lock"
    with file_lock(lock):
        fd = os.open(lock, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                got = False
        finally:
            os.close(fd)
    assert not got
    with file_lock(lock, shared=True):  # free again once the block is left
        pass
