"""argparse types that refuse bad values as usage errors (E102) before a command starts, so no command has to
re-check a count, a duration or a port, and none sees NaN, infinity or a negative count."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """A count of at least 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A count of at least 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of at least 0")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535)")
    return value


def seconds(text: str) -> float:
    """A finite, positive duration in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0 or value > 86400 * 365:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive, finite number of seconds (at most a year)"
        )
    return value


def existing_directory(text: str) -> Path:
    """A directory that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not an existing directory")
    return path


def _int(text: str) -> int:
    # int() takes '²'-free ASCII digits only with this check: it would accept other Unicode digits
    if not text.strip().lstrip("+-").isascii() or len(text) > 20:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
