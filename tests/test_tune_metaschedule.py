"""MetaSchedule tuning (issue #14 item 2): a small matmul tuned with a small trial budget
writes its database; a second compile reads it without tuning; the faster of MetaSchedule
and the hand rules is kept per function, and the artifact's outputs equal eager's."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import splice
from splice.errors import LoweringError
from splice.runtime.backends import tvm_metaschedule as TM

TRIALS = 4


def _tuning(art: splice.Artifact) -> dict:
    manifest = json.loads((Path(art.path) / "manifest.json").read_text())
    return {
        k: v["metaschedule"]
        for k, v in manifest["lowering"]["tuning"].items()
        if "metaschedule" in v
    }


def _rules(art: splice.Artifact) -> dict:
    return json.loads((Path(art.path) / "manifest.json").read_text())["lowering"]["schedule_rules"]


def test_tuning_writes_the_database_and_a_second_compile_does_not_tune(small) -> None:
    program, model, x, tmp = small
    seen: list[str] = []
    art = splice.compile(
        program, "host", tune=TRIALS, output=tmp / "a1",
        progress=lambda msg, done, total: seen.append(msg),
    )  # fmt: skip
    first = _tuning(art)
    assert len(first) == 1
    (entry,) = first.values()
    assert entry["trials_run"] == TRIALS and entry["trials"] == TRIALS
    assert entry["winner"] in ("hand", "metaschedule")
    assert entry["hand_us"] > 0 and entry["ms_us"] > 0
    assert any("MetaSchedule" in m and "best" in m for m in seen)  # progress: best so far
    folders = list((tmp / "cache" / "metaschedule").iterdir())
    assert len(folders) == 1
    records = (folders[0] / TM.RECORDS).read_text().splitlines()
    assert len(records) == TRIALS
    assert json.loads((folders[0] / TM.CHOICES).read_text())
    torch.testing.assert_close(splice.load(art.path)(x), model(x), rtol=0, atol=1e-5)

    again = _tuning(splice.compile(program, "host", tune=TRIALS, output=tmp / "a2"))
    (entry2,) = again.values()
    assert entry2["trials_run"] == 0  # the database had the trials: nothing tuned
    assert entry2["winner"] == entry["winner"]
    assert len((folders[0] / TM.RECORDS).read_text().splitlines()) == TRIALS

    # resume: a bigger budget tunes only the difference
    more = _tuning(splice.compile(program, "host", tune=TRIALS + 2, output=tmp / "a3"))
    assert next(iter(more.values()))["trials_run"] == 2


def test_metaschedule_winner_is_used_and_read_back_with_tune_0(small, monkeypatch) -> None:
    program, model, x, tmp = small
    # make the hand rules lose the comparison, so the artifact carries MetaSchedule's kernel
    monkeypatch.setattr(TM.Measurer, "measure", lambda self, func: 1.0)
    art = splice.compile(program, "host", tune=TRIALS, output=tmp / "b1")
    (entry,) = _tuning(art).values()
    assert entry["winner"] == "metaschedule"
    assert _rules(art).get("metaschedule") == 1
    torch.testing.assert_close(splice.load(art.path)(x), model(x), rtol=0, atol=1e-5)

    monkeypatch.undo()
    monkeypatch.setenv("SPLICE_CACHE_DIR", str(tmp / "cache"))
    art0 = splice.compile(program, "host", output=tmp / "b2")  # tune=0: the database decides
    (entry0,) = _tuning(art0).values()
    assert entry0["source"] == "database" and entry0["trials_run"] == 0
    assert _rules(art0).get("metaschedule") == 1
    torch.testing.assert_close(splice.load(art0.path)(x), model(x), rtol=0, atol=1e-5)


def test_ctrl_c_keeps_the_measured_trials_and_a_rerun_resumes(small, monkeypatch) -> None:
    import os
    import signal

    program, model, x, tmp = small
    monkeypatch.setattr(TM, "TRIALS_PER_ITER", 2)
    run = TM.Measurer.run
    calls = {"n": 0}

    def run_then_ctrl_c(self, jobs):
        out = run(self, jobs)
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C in the second round: the first round is recorded
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(TM.Measurer, "run", run_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        splice.compile(program, "host", tune=TRIALS, output=tmp / "i1")
    (folder,) = (tmp / "cache" / "metaschedule").iterdir()
    assert len((folder / TM.RECORDS).read_text().splitlines()) == 2  # the first round only
    monkeypatch.setattr(TM.Measurer, "run", run)
    art = splice.compile(program, "host", tune=TRIALS, output=tmp / "i2")
    (entry,) = _tuning(art).values()
    assert entry["trials_run"] == TRIALS - 2 and entry["trials"] == TRIALS
    torch.testing.assert_close(splice.load(art.path)(x), model(x), rtol=0, atol=1e-5)


def test_tune_0_without_a_database_uses_the_hand_rules(small) -> None:
    program, _, _, tmp = small
    art = splice.compile(program, "host", output=tmp / "c1")
    assert _tuning(art) == {}
    assert not (tmp / "cache" / "metaschedule").exists()


def test_concurrent_database_writers_keep_every_record(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_commit_records, args=(str(tmp_path), w, 10)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    db = TM.open_database(tmp_path)
    assert len(db) == 20
    assert len((tmp_path / TM.WORKLOADS).read_text().splitlines()) == 2


def _commit_records(folder: str, who: int, n: int) -> None:
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((8, 8 + who), name="A")
    b = te.compute((8, 8 + who), lambda i, j: a[i, j] * 2.0, name="B")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b]).with_attr("global_symbol", "main")})
    db = TM.open_database(folder)
    wl = db.commit_workload(mod)
    sch = tvm.s_tir.Schedule(mod)
    info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    target = tvm.target.Target({"kind": "llvm"})
    for i in range(n):
        db.commit_tuning_record(
            ms.database.TuningRecord(sch.trace, wl, [1e-6 * (i + 1)], target, info)
        )


def test_bad_rpc_addresses_are_lowering_errors() -> None:
    for bad in ("nohost", "h:p:k", "h:0:k", "h:9190:", "h:70000:k"):
        with pytest.raises(LoweringError, match="rpc address"):
            TM.RpcSpec.parse(bad)
    assert str(TM.RpcSpec.parse("127.0.0.1:9190:x86")) == "127.0.0.1:9190:x86"


def test_unreachable_tracker_is_a_lowering_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LoweringError, match="cannot reach the RPC tracker"):
        TM.connect_rpc(TM.RpcSpec("127.0.0.1", port, "x86"), timeout=5)
