"""splice's on-disk cache: where it lives, and the file lock its writers share.

The cache (tuning databases, compiled C kernels) is ``$SPLICE_CACHE_DIR``, else
``~/.cache/splice``. Concurrent compiles merge their records under :func:`file_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``$SPLICE_CACHE_DIR``, else ``~/.cache/splice`` (not created here)."""
    base = os.environ.get("SPLICE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "splice"
    )
    return Path(base)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, shared: bool = False) -> Iterator[None]:
    """Hold ``fcntl.flock`` on ``path`` (created if missing) for the block: exclusive for a
    writer, ``shared`` for a reader. Blocks until the lock is free; the kernel drops it when
    the process dies, so a crashed writer never leaves it held."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


__all__ = ["cache_dir", "file_lock"]
