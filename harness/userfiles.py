"""Files and directories a user names: read, or checked before anything is written, with coded errors
(E103 for inputs, E104 for outputs) instead of an OSError or UnicodeDecodeError at some later point."""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import InputFileError, OutputPathError


def read_bytes(path: Path | str, what: str) -> bytes:
    """The bytes of an input file; E103 naming ``what`` when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise InputFileError(f"{what} {path} is a directory", hint="name a file", path=str(path)) from None
    except FileNotFoundError:
        raise InputFileError(f"{what} {path} does not exist", hint="check the path", path=str(path)) from None
    except OSError as err:
        raise InputFileError(
            f"cannot read {what} {path}: {err.strerror or err}", hint="check its permissions", path=str(path)
        ) from err


def read_text(path: Path | str, what: str) -> str:
    """An input file as UTF-8 text; E103 when it cannot be read or is not UTF-8."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r})",
            hint="save it as UTF-8",
            path=str(path),
        ) from err


def output_file(path: Path | str, what: str) -> Path:
    """``path`` checked as a file to write: not a directory, in a directory that exists and can be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory", hint="name a file to write", path=str(path))
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(
            f"{what} {path}: directory {parent} does not exist", hint="create it first", path=str(path)
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputPathError(
            f"{what} {path} cannot be written", hint="check its permissions", path=str(path)
        )
    return path


def directory(path: Path | str, what: str) -> Path:
    """``path`` checked as a directory to use or create: not an existing file, nor under one."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputPathError(
                    f"{what} {path}: {candidate} is a file, not a directory",
                    hint="name a directory (it is created if missing)",
                    path=str(path),
                )
            break
    return path
