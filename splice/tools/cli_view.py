"""``splice view``: a program, a pass dump or an artifact in Model Explorer, or an HTML report.

::

    splice view IN [--port P] [--host H] [--no-browser]   serve Model Explorer with IN open
    splice view ARTIFACT --time-parts N                   ... with each part's latency
    splice view IN --html OUT                             write the pass-by-pass HTML report

Without ``--html`` the command opens IN with :func:`splice.tools.explorer.open_path` first
(a missing or damaged IN is one error line and exit status 1, before any server starts),
then starts Model Explorer's server with splice's adapter loaded and IN open, prints the
URL (``http://127.0.0.1:PORT/?data=...``) and serves until Ctrl-C.

The server binds 127.0.0.1 unless ``--host`` names another address. Model Explorer's
server reads any file the user can read for the page that asks (that is how it opens
models), so binding another address shares those files with whoever reaches it.
Model Explorer's check for a newer release on PyPI is turned off, so the server makes no
request to the network; the page itself asks ``fonts.gstatic.com`` for a few font ranges
Model Explorer does not ship, and falls back to a local font when offline.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.tools.common import int_at_least

DEFAULT_HOST = "127.0.0.1"
FIRST_PORT = 8080  # Model Explorer's own default; the next free one up to 8099 is taken
PORT_TRIES = 20
EXTENSION = "splice.tools.explorer"  # Model Explorer imports EXTENSION + ".main"


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def add_command(sub: Any) -> None:
    """Register ``splice view`` on the ``splice`` subcommand parsers ``sub``."""
    sp = sub.add_parser(
        "view",
        help="open a program, pass dump or artifact in Model Explorer (or --html: a report)",
        description="Serve Google's Model Explorer with IN open: a saved program folder, a "
        "--dump-dir folder of `splice opt` (one graph per pass) or a compiled artifact. "
        "With --html, write a self-contained pass-by-pass HTML report instead.",
    )
    sp.add_argument(
        "input", metavar="IN", help="saved program folder, --dump-dir folder or artifact folder"
    )
    sp.add_argument(
        "--port",
        type=port_number,
        default=None,
        help=f"port to serve on (default: the first free one from {FIRST_PORT})",
    )
    sp.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}; another one shares the page, and "
        "the files Model Explorer reads, with the network)",
    )
    sp.add_argument(
        "--no-browser", action="store_true", help="do not open a browser tab; print the URL"
    )
    sp.add_argument(
        "--time-parts",
        type=int_at_least(1),
        default=0,
        metavar="N",
        help="artifacts: run the stored samples N times and show each compiled part's mean "
        "latency (runs the artifact's code)",
    )
    sp.add_argument("--html", metavar="OUT", help="write the HTML pass report to OUT instead")
    sp.set_defaults(fn=cmd_view)


def cmd_view(a: argparse.Namespace) -> int:
    if a.html:
        return _write_html(a.input, a.html)
    server = prepare(
        a.input,
        host=a.host,
        port=a.port,
        open_browser=not a.no_browser,
        time_parts=a.time_parts,
    )
    server.serve()
    return 0


def _write_html(in_path: str, out_path: str) -> int:
    from splice.tools.common import check_output_file, console

    check_output_file(out_path, "--html")
    try:
        from splice.tools.report import write_report
    except ImportError as e:
        raise SpliceError(
            f"the HTML report is not available: {e}", hint="reinstall splice"
        ) from None
    written = write_report(in_path, out_path)
    console().print(f"wrote {written}")
    return 0


def _explorer() -> Any:
    """splice.tools.explorer, or a SpliceError saying how to install Model Explorer."""
    try:
        import model_explorer  # noqa: F401

        import splice.tools.explorer as explorer
    except ImportError as e:
        raise SpliceError(
            f"Model Explorer is not installed ({e})",
            hint="pip install 'splice[explorer]' (ai-edge-model-explorer), or use --html",
        ) from None
    return explorer


def free_port(host: str, start: int = FIRST_PORT, tries: int = PORT_TRIES) -> int:
    """The first port from ``start`` that ``host`` can bind (``tries`` of them), else one
    the system picks."""
    for port in range(start, start + tries):
        if port_free(host, port):
            return port
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host``:``port`` now."""
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError:
        return False
    return True


def _check_host(host: str) -> None:
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise SpliceError(
            f"--host {host}: not an address this machine can bind ({e})",
            hint=f"use an IP address, e.g. the default {DEFAULT_HOST}",
        ) from None


@dataclass
class Server:
    """A Model Explorer server ready to start: where it binds, what it shows.

    :func:`prepare` builds it (and fails on a bad input before anything listens);
    :meth:`serve` runs it until Ctrl-C."""

    input: str
    host: str
    port: int
    open_browser: bool
    config: Any
    view: Any

    @property
    def url(self) -> str:
        """The page that opens the input: ``http://HOST:PORT/?data=<models and node data>``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?data={self.config.to_url_param_value()}"

    def serve(self) -> None:
        """Serve until Ctrl-C; print the URL once the server answers."""
        from model_explorer import server as me_server

        _offline(me_server)
        threading.Thread(target=self._announce, daemon=True).start()
        me_server.start(
            host=self.host,
            port=self.port,
            config=self.config,
            no_open_in_browser=not self.open_browser,
            extensions=[EXTENSION],
        )

    def _announce(self) -> None:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        family = _family(host)
        while True:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if s.connect_ex((host, self.port)) == 0:
                    break
            time.sleep(0.1)
        print(f"splice view: serving {self.input} at {self.url}", flush=True)


def _offline(me_server: Any) -> None:
    """Turn off Model Explorer's release check (requests to PyPI and GitHub, in a thread at
    start and whenever the page asks): it answers "no new version" without the network."""

    def no_check(print_msg: bool = True) -> dict[str, str]:
        return {"version": "", "runningVersion": "", "releaseUrl": "", "desktopAppUrl": ""}

    me_server._check_new_version = no_check


def prepare(
    in_path: str,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    open_browser: bool = True,
    time_parts: int = 0,
) -> Server:
    """Open ``in_path`` (errors here: nothing is served; ``time_parts``: see
    :func:`splice.tools.explorer.open_path`), check ``host`` and ``port``, and build the
    Model Explorer config with the input and its overlays."""
    explorer = _explorer()
    from model_explorer import config as me_config

    from splice.tools.explorer.main import ADAPTER_ID, remember

    view = explorer.open_path(in_path, time_parts=time_parts)
    _check_host(host)
    if port is None:
        port = free_port(host)
    elif not port_free(host, port):
        raise SpliceError(
            f"--port {port}: {host}:{port} is in use",
            hint="choose another port, or leave out --port to take a free one",
        )
    abs_path = str(Path(in_path).resolve())
    remember(abs_path, view)
    cfg = me_config()
    cfg.add_model_from_path(abs_path, adapterId=ADAPTER_ID)
    for name, data in view.node_data().items():
        cfg.add_node_data(name=name, node_data=data)
    return Server(in_path, host, port, open_browser, cfg, view)


__all__ = [
    "DEFAULT_HOST",
    "EXTENSION",
    "Server",
    "add_command",
    "cmd_view",
    "free_port",
    "port_free",
    "port_number",
    "prepare",
]
