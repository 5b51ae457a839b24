"""Headless Chromium driven over the Chrome DevTools Protocol (for tests/test_browser.py).

:func:`find_chromium` returns Debian's ``chromium`` (or ``$SPLICE_CHROMIUM``); when it or
``websocket-client`` is missing, :func:`require_browser` skips the test, or fails it when
``SPLICE_REQUIRE_BROWSER=1`` (``.ci/run`` sets it). :class:`Browser` starts Chromium with
software GL (SwiftShader: Model Explorer draws with WebGL), a throw-away profile and
``--remote-debugging-port=0``, talks to its one page over the DevTools websocket, and
records console errors, uncaught exceptions and error log entries (failed requests) in
``errors`` and the URL of every request the page makes in ``requests``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def find_chromium() -> str | None:
    """The Chromium executable: ``$SPLICE_CHROMIUM``, else ``chromium`` on the PATH."""
    env = os.environ.get("SPLICE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The Chromium executable; skips (or fails with SPLICE_REQUIRE_BROWSER=1) without it
    or without the ``websocket-client`` package."""
    reason = None
    exe = find_chromium()
    if exe is None:
        reason = "chromium is not installed (apt-get install chromium)"
    else:
        try:
            import websocket  # noqa: F401
        except ImportError:
            reason = "websocket-client is not installed (pip install -e '.[dev]')"
    if reason is None:
        assert exe is not None
        return exe
    if os.environ.get("SPLICE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SPLICE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools call failed, or a wait timed out."""


class Browser:
    """One headless Chromium with one page. Use as a context manager."""

    def __init__(self, executable: str, *, width: int = 1400, height: int = 900):
        import websocket

        self.errors: list[str] = []
        self.requests: list[str] = []  # every URL the page asked for, in order
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._events: list[dict[str, Any]] = []
        self._next_id = 0
        self._profile = tempfile.mkdtemp(prefix="splice-chromium-")
        args = [
            executable,
            "--headless",
            "--no-sandbox",  # root in CI containers
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader",
            "--hide-scrollbars",
            "--mute-audio",
            f"--window-size={width},{height}",
            f"--user-data-dir={self._profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        port = self._devtools_port()
        page = self._page_target(port)
        self._ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        # the viewport (and so every screenshot) is exactly width x height
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    # -- start-up ------------------------------------------------------------------------
    def _devtools_port(self, timeout: float = 30.0) -> int:
        """Chromium prints ``DevTools listening on ws://127.0.0.1:PORT/...`` on stderr."""
        assert self._proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = self._proc.stderr.readline()
            if not line:
                if self._proc.poll() is not None:
                    break
                continue
            seen.append(line.rstrip())
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                # keep reading stderr, or chromium blocks once the pipe is full
                threading.Thread(target=self._drain, daemon=True).start()
                return int(m.group(1))
        self.close()
        raise BrowserError("chromium did not start:\n" + "\n".join(seen[-20:]))

    def _drain(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self.stderr_tail.append(line.rstrip())

    @staticmethod
    def _page_target(port: int) -> dict[str, Any]:
        for _ in range(50):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]
            time.sleep(0.1)
        raise BrowserError("chromium has no page target")

    # -- protocol --------------------------------------------------------------------------
    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events seen meanwhile are kept)."""
        self._next_id += 1
        mine = self._next_id
        self._ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = self._receive()
            if msg.get("id") == mine:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _receive(self) -> dict[str, Any]:
        msg = json.loads(self._ws.recv())
        if "method" in msg:
            self._note(msg)
            self._events.append(msg)
        return msg

    def _note(self, event: dict[str, Any]) -> None:
        """Keep what counts as a page error: console.error, uncaught exceptions, and
        error-level log entries (failed loads, CSP and security violations)."""
        method, p = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = p.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.errors.append(f"console.{p['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            desc = d.get("exception", {}).get("description") or d.get("text", "")
            self.errors.append(f"uncaught exception: {desc}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}")

    def _wait_event(self, method: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        self._ws.settimeout(1.0)
        try:
            while time.monotonic() < deadline:
                for i, e in enumerate(self._events):
                    if e["method"] == method:
                        return self._events.pop(i)
                try:
                    self._receive()
                except Exception as e:  # websocket timeout: look again
                    if type(e).__name__ != "WebSocketTimeoutException":
                        raise
        finally:
            self._ws.settimeout(30)
        raise BrowserError(f"no {method} within {timeout:g} s")

    # -- what tests use --------------------------------------------------------------------
    def goto(self, url: str, *, timeout: float = 60.0) -> None:
        """Load ``url`` and wait for its load event."""
        self._events = [e for e in self._events if e["method"] != "Page.loadEventFired"]
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        self._wait_event("Page.loadEventFired", timeout)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); a thrown error raises."""
        r = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(d.get("exception", {}).get("description") or d.get("text"))
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"timed out after {timeout:g} s waiting for {what or expression}"
                )
            self.pump(0.2)

    def pump(self, seconds: float) -> None:
        """Read events for ``seconds`` (so errors the page logs meanwhile are recorded)."""
        deadline = time.monotonic() + seconds
        self._ws.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                try:
                    self._receive()
                except Exception as e:
                    if type(e).__name__ != "WebSocketTimeoutException":
                        raise
        finally:
            self._ws.settimeout(30)

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the viewport to ``path``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
