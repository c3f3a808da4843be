"""What /proc says about the QEMU processes tests start: live ones by a word of their command line."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def qemu_pids(word: str) -> set[int]:
    """Live QEMU processes with ``word`` in one of their arguments."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and b"qemu-system" in argv[0]
            and any(word.encode() in a for a in argv)
            and alive(int(entry.name))
        ):
            found.add(int(entry.name))
    return found
