"""Runtime folders: a process's sockets and scratch files under the state dir (``<state dir>/rt``, or
``TEELAB_RUNTIME_DIR``), named after their owner (pid and start time) and removed once that owner is gone,
however it died: a watcher process removes the folder when its owner exits, and every new folder first sweeps
those whose owner is gone (a watcher killed too)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from harness import paths

ENV_RUNTIME = "TEELAB_RUNTIME_DIR"
RUNTIME = "rt"
# <prefix>-<pid in hex>-<start time in hex>-<random>: short, since Unix socket paths are capped at 108 bytes
_FOLDER = re.compile(r"(?P<prefix>[a-z0-9-]+?)-(?P<pid>[0-9a-f]+)-(?P<start>[0-9a-f]+)-[0-9a-f]{4}")
_PREFIX = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# Blocks until its stdin (a pipe only the owner holds) reaches EOF, which happens when the owner exits.
_WATCHER = 'read -r _; exec rm -rf -- "$0"'


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def runtime_root() -> Path:
    """The folder that holds every runtime folder: ``TEELAB_RUNTIME_DIR``, else ``<state dir>/rt``."""
    override = os.environ.get(ENV_RUNTIME)
    root = Path(override) if override else paths.state_dir() / RUNTIME
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def runtime_dir(prefix: str) -> Path:
    """A new private (0700) folder owned by this process, removed by a watcher when this process exits."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"runtime folder prefix {prefix!r} is not lower-case words joined by '-'")
    root = sweep_runtime_dirs()
    pid = os.getpid()
    folder = root / f"{prefix}-{pid:x}-{process_start_time(pid) or 0:x}-{secrets.token_hex(2)}"
    folder.mkdir(mode=0o700)
    _watch(folder)
    return folder


def _watch(folder: Path) -> None:
    """Start the watcher that removes ``folder`` when this process exits (the pipe's write end is held here
    alone: Python's fds are not inherited by other children)."""
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen(
            ["/bin/sh", "-c", _WATCHER, str(folder)],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    _watchers[folder] = write_end  # held open until the folder is removed or this process exits


_watchers: dict[Path, int] = {}


def remove_runtime_dir(folder: Path) -> None:
    """Remove a runtime folder of this process now, and let its watcher go."""
    shutil.rmtree(folder, ignore_errors=True)
    write_end = _watchers.pop(folder, None)
    if write_end is not None:
        os.close(write_end)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A runtime folder removed when the block ends (and by its watcher if this process dies inside it)."""
    folder = runtime_dir(prefix)
    try:
        yield folder
    finally:
        remove_runtime_dir(folder)


def owner_alive(folder_name: str) -> bool:
    """Whether the process a runtime folder's name records still runs (same pid, same start time)."""
    match = _FOLDER.fullmatch(folder_name)
    if match is None:
        return False
    start = process_start_time(int(match["pid"], 16))
    return start is not None and start == int(match["start"], 16)


def sweep_runtime_dirs() -> Path:
    """Remove the runtime folders whose owner is gone; the runtime root."""
    root = runtime_root()
    for entry in root.iterdir():
        ours = _FOLDER.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
        if ours and not owner_alive(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    return root
