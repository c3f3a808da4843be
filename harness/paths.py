"""Where teelab keeps state and cache: XDG directories, overridable by environment variables."""

from __future__ import annotations

import os
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
