"""Runtime folders: a process's sockets and scratch files under the state dir, named after their owner (pid
and its start time), and swept once that owner is gone, however it died (SIGKILL included)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from harness import paths

RUNTIME = "rt"
_FOLDER = re.compile(r"(?P<prefix>[a-z0-9-]+?)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}")
_PREFIX = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def runtime_root() -> Path:
    """The folder that holds every runtime folder (``<state dir>/rt``)."""
    root = paths.state_dir() / RUNTIME
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def runtime_dir(prefix: str, root: Path | None = None) -> Path:
    """A new private (0700) folder owned by this process in ``root`` (default: ``runtime_root()``); folders
    there whose owners are gone are swept first."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"runtime folder prefix {prefix!r} is not lower-case words joined by '-'")
    root = sweep_runtime_dirs(root)
    pid = os.getpid()
    folder = root / f"{prefix}-{pid}-{process_start_time(pid) or 0}-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    return folder


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A runtime folder removed when the block ends (and swept later if this process is killed inside it)."""
    folder = runtime_dir(prefix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def owner_alive(folder_name: str) -> bool:
    """Whether the process a runtime folder's name records still runs (same pid, same start time)."""
    match = _FOLDER.fullmatch(folder_name)
    if match is None:
        return False
    start = process_start_time(int(match["pid"]))
    return start is not None and start == int(match["start"])


def sweep_runtime_dirs(root: Path | None = None) -> Path:
    """Remove the runtime folders in ``root`` (default: ``runtime_root()``) whose owner is gone; the root."""
    if root is None:
        root = runtime_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in root.iterdir():
        ours = _FOLDER.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
        if ours and not owner_alive(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    return root
