"""Ports and frames of the enclave lifecycle, shared by the host carver, the parent's pool service and the
enclave's init. Stdlib only (guest and host import it).

- The enclave's init sends one byte 0xB7 to its parent (CID 3) port 9000; the parent echoes it (Nitro's
  heartbeat).
- The parent's pool service listens on port 9101 for the host (CID 2 only): JSON lines
  ``{"op": "offline"|"online", "cpus": [N...]}``, ``{"op": "status"}``, and ``{"op": "heartbeat", "cid": C}``
  answering ``{"ok": true, "armed": true}`` at once, then ``{"ok": true, "cid": C}`` on C's heartbeat.
- ``teelab-enclave`` in the parent asks the host at CID 2 port 9102: one JSON line (a nitro-cli verb and its
  options), for run-enclave followed by ``eif_size`` bytes of the image; the host answers one JSON line
  ``{"ok": true, "result": ...}`` or ``{"ok": false, "code": "E9xx", "error": ..., "hint": ...}``; the console
  verb answers the line, then streams the console.
"""

from __future__ import annotations

PARENT_CID = 3
HOST_CID = 2
HEARTBEAT_PORT = 9000
HEARTBEAT = b"\xb7"
POOL_PORT = 9101
ENCLAVE_API_PORT = 9102
MAX_FRAME = 1 << 20
VERBS = ("run-enclave", "describe-enclaves", "terminate-enclave", "console")


def encode(message: dict[str, object]) -> bytes:
    import json

    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def read_frame(sock: object) -> dict[str, object]:
    """One JSON line from a stream socket (``ValueError`` on EOF, an overlong line, or a line that is not a
    JSON object)."""
    import json

    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)  # type: ignore[attr-defined]
        if not chunk:
            raise ValueError("connection closed before a full line")
        line += chunk
        if len(line) > MAX_FRAME:
            raise ValueError("line too long")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a frame is a JSON object")
    return message
