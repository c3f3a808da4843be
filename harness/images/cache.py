"""The content-addressed build cache shared by guest images and enclave images: one folder per build,
``<name>-<16 hex digits of the key>``, a lock per name while building, and only the newest few kept."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from harness import paths

KEEP_BUILDS = 3
_KEY_SUFFIX = re.compile(r"-[0-9a-f]{16}")


def build_dir(directory: Path, name: str, key: str) -> Path:
    return directory / f"{name}-{key[:16]}"


@contextlib.contextmanager
def build_lock(directory: Path, name: str) -> Iterator[None]:
    """One builder of ``name`` at a time, across processes."""
    with paths.exclusive_lock(directory / f".lock-{name}"):
        yield


def prune_builds(directory: Path, name: str, manifest: str, keep: Path, count: int = KEEP_BUILDS) -> None:
    """Remove all but the newest ``count`` builds of ``name`` (never ``keep``); builds of other names that
    start with ``name-`` are not touched."""
    ours = [
        m for m in directory.glob(f"{name}-*/{manifest}") if _KEY_SUFFIX.fullmatch(m.parent.name[len(name) :])
    ]
    for found in sorted(ours, key=lambda m: m.stat().st_mtime, reverse=True)[count:]:
        if found.parent != keep:
            shutil.rmtree(found.parent, ignore_errors=True)
