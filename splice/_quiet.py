"""Silence torch's tracing loggers while splice runs its own checks.

When capture, verification or shape propagation meets a bad program, torch's fake-tensor
and export machinery logs the failure (a 25-line traceback from
``torch._subclasses.fake_tensor``) before it raises; splice then turns the exception into
one :class:`~splice.errors.SpliceError` that says the same thing better. The command line
runs every command inside :func:`quiet_torch_logs` so that only splice's message is printed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: loggers (and everything below them) whose records splice's own errors replace
TORCH_TRACING_LOGGERS = (
    "torch._subclasses",  # fake_tensor: "failed while attempting to run meta for ..."
    "torch.fx.experimental",  # symbolic_shapes, proxy_tensor, recording
    "torch._export",
    "torch.export",
    "torch._dynamo",
    "torch._functorch",
    "torch._guards",
)


def _loggers(prefixes: tuple[str, ...]) -> list[logging.Logger]:
    """The loggers named ``prefixes`` (created if need be, so that modules imported later
    get the same object) and every existing logger below them."""
    names = set(prefixes)
    for name in list(logging.root.manager.loggerDict):
        if any(name.startswith(p + ".") for p in prefixes):
            names.add(name)
    return [logging.getLogger(n) for n in sorted(names)]


class _DropTracing(logging.Filter):
    """Drops records of loggers below the prefixes (for loggers created inside the block,
    whose records reach the handlers of ``torch`` or the root)."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return not any(name == p or name.startswith(p + ".") for p in self.prefixes)


@contextlib.contextmanager
def quiet_torch_logs(
    enabled: bool = True, prefixes: tuple[str, ...] = TORCH_TRACING_LOGGERS
) -> Iterator[None]:
    """Disable torch's tracing loggers inside the block (restored after it).

    ``enabled=False`` leaves them alone (the command line passes it when SPLICE_DEBUG is
    set, so that torch's own report is visible when debugging).
    """
    if not enabled:
        yield
        return
    saved = [(lg, lg.disabled) for lg in _loggers(prefixes)]
    for lg, _ in saved:
        lg.disabled = True
    drop = _DropTracing(prefixes)
    handlers = {*logging.getLogger("torch").handlers, *logging.getLogger().handlers}
    if logging.lastResort is not None:
        handlers.add(logging.lastResort)
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)
        for lg, was in saved:
            lg.disabled = was


__all__ = ["TORCH_TRACING_LOGGERS", "quiet_torch_logs"]
