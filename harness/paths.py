"""Where teelab keeps state and cache (XDG directories, overridable by environment variables), and the file
lock that serialises processes sharing them."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def state_dir() -> Path:
    """The state dir (``TEELAB_STATE_DIR``, else ``$XDG_STATE_HOME/teelab``), created on demand."""
    return _dir("TEELAB_STATE_DIR", "XDG_STATE_HOME", ".local/state")


def cache_dir() -> Path:
    """The cache dir (``TEELAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/teelab``), created on demand."""
    return _dir("TEELAB_CACHE_DIR", "XDG_CACHE_HOME", ".cache")


def runs_dir() -> Path:
    """Where each VM run keeps its artifact folder."""
    path = state_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dir(own: str, xdg: str, fallback: str) -> Path:
    if os.environ.get(own):
        path = Path(os.environ[own])
    else:
        base = os.environ.get(xdg) or str(Path.home() / fallback)
        path = Path(base) / "teelab"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600 if missing) across processes; released on exit,
    or by the kernel if the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
