"""Role enclave: run the application ramdisk's ``/app/run`` once, after readiness, its output on the console;
and the console line an application reports an attestation document with. Stdlib only (the host imports it).
"""

from __future__ import annotations

import binascii
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

APP_RUN = "/app/run"
CONSOLE = "/dev/console"
EXIT_PREFIX = "TEELAB-APP-EXIT"
EXIT_REGEX = r"TEELAB-APP-EXIT status=(?P<status>-?[0-9]+)"
DOCUMENT_PREFIX = "TEELAB-APP-DOCUMENT"
DOCUMENT_REGEX = (
    r"TEELAB-APP-DOCUMENT nonce=(?P<nonce>[0-9a-f]*) public_key=(?P<public_key>[A-Za-z0-9+/=]*) "
    r"document=(?P<document>[A-Za-z0-9+/=]+)"
)
NOT_EXECUTABLE = 126
NOT_FOUND = 127


@dataclass(frozen=True)
class AppDocument:
    """What an application reported: the attestation document and the nonce and public key it asked for."""

    document: bytes
    nonce: bytes
    public_key: bytes


def exit_line(status: int) -> str:
    return f"{EXIT_PREFIX} status={status}"


def document_line(document: bytes, *, nonce: bytes, public_key: bytes) -> str:
    """One line: the prefix, the nonce in hex, the public key and the document in base64."""
    return f"{DOCUMENT_PREFIX} nonce={nonce.hex()} public_key={_b64(public_key)} document={_b64(document)}"


def parse_document_line(text: str) -> AppDocument | None:
    """The first document line in ``text`` (console output, a command's stdout), or None (also when that
    line's hex or base64 does not decode: the guest wrote it)."""
    import re  # host side, and off a guest's boot path

    match = re.search(DOCUMENT_REGEX, text)
    if match is None:
        return None
    try:
        return AppDocument(
            document=binascii.a2b_base64(match["document"]),
            nonce=bytes.fromhex(match["nonce"]),
            public_key=binascii.a2b_base64(match["public_key"]),
        )
    except ValueError:  # binascii.Error is one
        return None


def start(say: Callable[[str], None], path: str = APP_RUN, console: str = CONSOLE) -> threading.Thread | None:
    """Run ``path`` once in a thread when it exists; None when the image has no application."""
    if not os.path.lexists(path):
        return None
    thread = threading.Thread(target=run, args=(path, say, console), name="enclave-app", daemon=True)
    thread.start()
    return thread


def run(path: str, say: Callable[[str], None], console: str = CONSOLE) -> int:
    """Run ``path`` with stdin /dev/null and stdout and stderr on ``console``; say and return its exit status
    (negative: the signal that ended it; 126 or 127 when it could not be started)."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, console, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY, 0),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        pid = os.posix_spawn(path, [path], dict(os.environ), file_actions=actions)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    except OSError as exc:
        say(f"teelab: cannot run {path}: {exc.strerror or exc}")
        code = NOT_FOUND if isinstance(exc, FileNotFoundError) else NOT_EXECUTABLE
    say(exit_line(code))
    return code


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()
