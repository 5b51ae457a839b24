"""Distributed tuning over TVM RPC (issue #14 item 3), on 127.0.0.1: a tracker, two x86 RPC
servers, and an aarch64 RPC server under qemu-aarch64 (its timings are meaningless: the test
proves the path). Every process is started with a bounded lifetime and killed at the end.

The aarch64 case needs qemu-user, gcc-aarch64-linux-gnu and the aarch64 root (``python -m
splice.runtime.edge setup``); with SPLICE_REQUIRE_QEMU=1 (``.ci/run``) a missing piece fails
instead of skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import splice
from splice.errors import LoweringError
from splice.runtime import edge

TRIALS = 4
LIFETIME_S = 600  # no helper process outlives this, whatever happens to the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["timeout", "-s", "KILL", str(LIFETIME_S), *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own group: killing it takes the server's children too
    )


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 9)
        p.wait(timeout=30)


def _wait_for_servers(port: int, key: str, n: int, timeout: float) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            summary = rpc.connect_tracker("127.0.0.1", port).summary()
            free = summary.get("queue_info", {}).get(key, {}).get("free", 0)
            if free >= n:
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} RPC servers with key {key!r} did not register in {timeout} s")
        time.sleep(1)


def _wait_for_tracker(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the RPC tracker did not listen on {port} in {timeout} s")
        time.sleep(0.5)


def _tracker() -> tuple[int, subprocess.Popen[bytes]]:
    port = _free_port()
    proc = _spawn(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
         "--port", str(port), "--port-end", str(port + 1), "--silent"]
    )  # fmt: skip
    return port, proc


def _server_args(tracker_port: int, key: str) -> list[str]:
    port = _free_port()
    return [
        "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
        "--port-end", str(port + 50), "--tracker", f"127.0.0.1:{tracker_port}", "--key", key,
        "--silent",
    ]  # fmt: skip


def _entry(art: splice.Artifact) -> dict:
    manifest = json.loads((Path(art.path) / "manifest.json").read_text())
    (entry,) = [
        v["metaschedule"] for v in manifest["lowering"]["tuning"].values() if "metaschedule" in v
    ]
    return entry


@pytest.fixture
def x86_fleet() -> Iterator[int]:
    port, tracker = _tracker()
    procs = [tracker]
    try:
        _wait_for_tracker(port, timeout=120)
        procs += [_spawn([sys.executable, *_server_args(port, "x86")]) for _ in range(2)]
        _wait_for_servers(port, "x86", 2, timeout=180)
        yield port
    finally:
        _kill(procs)


def test_tuning_through_a_tracker_with_two_x86_servers(small, x86_fleet) -> None:
    program, model, x, tmp = small
    rpc = f"127.0.0.1:{x86_fleet}:x86"
    art = splice.compile(program, "host", tune=TRIALS, rpc=rpc, output=tmp / "a")
    entry = _entry(art)
    assert entry["rpc"] == rpc and entry["trials_run"] == TRIALS
    assert entry["ms_us"] > 0 and entry["hand_us"] > 0  # both measured on the servers
    torch.testing.assert_close(splice.load(art.path)(x), model(x), rtol=0, atol=1e-5)


def test_no_device_with_the_key_is_a_lowering_error() -> None:
    from splice.runtime.backends import tvm_metaschedule as TM

    port, tracker = _tracker()
    try:
        _wait_for_tracker(port, timeout=120)
        with pytest.raises(LoweringError, match="no device with key 'nokey'"):
            TM.connect_rpc(TM.RpcSpec("127.0.0.1", port, "nokey"), timeout=3)
    finally:
        _kill([tracker])


def test_bad_rpc_string_fails_before_compiling(small) -> None:
    program, _, _, tmp = small
    with pytest.raises(LoweringError, match="HOST:PORT:KEY"):
        splice.compile(program, "host", tune=2, rpc="127.0.0.1:x86", output=tmp / "b")


# The aarch64 server: TVM's rpc_server starts its server loop in a child Python (a
# PopenWorker, which also needs cloudpickle); under qemu-user without binfmt_misc an aarch64
# child cannot be exec'd, so this runs the same loop in the process (sessions still fork).
ARM_SERVER = """
import sys
from tvm.rpc import server as S
host, port, tracker, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
th, tp = tracker.rsplit(":", 1)
S._popen_start_rpc_server(host, port, port + 50, False, (th, int(tp)), key, silent=True)
S.PopenRPCServerState.current.thread.join()
"""


def test_tuning_for_aarch64_through_an_rpc_server_under_qemu(small, monkeypatch, need_edge) -> None:
    from splice.runtime.backends import tvm_metaschedule as TM

    program, model, x, tmp = small
    # emulated timings decide nothing: make MetaSchedule's kernel the one the artifact
    # carries, so its aarch64 code runs below (the x86 test measures the hand rule remotely)
    monkeypatch.setattr(TM.Measurer, "measure", lambda self, func: 1.0)
    root = edge.default_root()
    port, tracker = _tracker()
    procs = [tracker]
    try:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(root / "site"),
            "PYTHONNOUSERSITE": "1",
            "TVM_NUM_THREADS": "1",
        }
        py = str(root / "sysroot" / "usr" / "bin" / f"python{edge.PYTHON}")
        _wait_for_tracker(port, timeout=120)
        procs.append(
            _spawn(
                [
                    "qemu-aarch64",
                    "-L",
                    str(root / "sysroot"),
                    py,
                    "-c",
                    ARM_SERVER,
                    "127.0.0.1",
                    str(_free_port()),
                    f"127.0.0.1:{port}",
                    "arm",
                ],
                env,
            )
        )
        _wait_for_servers(port, "arm", 1, timeout=240)
        rpc = f"127.0.0.1:{port}:arm"
        art = splice.compile(program, "aarch64-linux", tune=TRIALS, rpc=rpc, output=tmp / "arm")
    finally:
        _kill(procs)
    entry = _entry(art)
    assert entry["rpc"] == rpc and entry["trials_run"] == TRIALS
    assert entry["ms_us"] is not None  # measured under qemu (meaningless, but measured)
    assert entry["winner"] == "metaschedule"
    run = edge.run_under_qemu(art.path, (x,))
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(run.outputs[0], want, rtol=0, atol=1e-5)
