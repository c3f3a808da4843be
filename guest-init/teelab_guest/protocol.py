"""What guest-init says and hears: console lines, kernel command-line keys, and the guest agent's frames.

Stdlib only. The harness imports this module too, so the two sides cannot drift.
"""

from __future__ import annotations

import binascii

# No typing or re imports here: guest-init imports this module at every boot, where each import costs
# ~10x its host time under TCG.

# Console lines (on the serial console, one per line).
READY_PREFIX = "TEELAB-READY"
READY_REGEX = r"TEELAB-READY role=(?P<role>[a-z]+) uptime=(?P<uptime>[0-9.]+)"
POWEROFF_LINE = "TEELAB-POWEROFF"
FAILED_PREFIX = "TEELAB-FAILED"

# Kernel command-line keys read by guest-init.
ROLE_KEY = "teelab.role"
ROLES = ("parent", "enclave", "cvm")
DEBUG_KEY = "teelab.debug"
# ``sha256:<hex>`` of the KMS CA certificate's DER: the only CA a guest's KMS client trusts (measured with the
# command line, so the KMS key policy's expected measurement covers which KMS the guest will believe).
KMS_CA_KEY = "teelab.kms_ca"

# virtio-serial port names (/dev/virtio-ports/<name> in the guest).
AGENT_PORT = "org.teelab.agent.0"

# Guest agent: one JSON object per line each way. Requests carry an "id" echoed in the response.
#   {"id": 1, "op": "ping"}                                        -> {"id": 1, "ok": true, "uptime": 1.2}
#   {"id": 2, "op": "exec", "argv": [...], "stdin": b64, "timeout": s, "env": {...}}
#                                                                  -> {"id": 2, "ok": true, "rc": 0,
#                                                                      "stdout": b64, "stderr": b64}
#   {"id": 3, "op": "poweroff"}                                    -> {"id": 3, "ok": true} then power off
# A request that fails gets {"id": N, "ok": false, "error": "text"}.
AGENT_OPS = ("ping", "exec", "poweroff")
MAX_AGENT_LINE = 64 * 1024 * 1024
# The environment of guest-init and of every command the agent runs (a request's "env" is added to it).
GUEST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def ready_line(role: str, uptime: float) -> str:
    return f"{READY_PREFIX} role={role} uptime={uptime:.3f}"


def encode_frame(message: dict[str, object]) -> bytes:
    import json  # imported on first use: json pulls in re

    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_frame(line: bytes) -> dict[str, object]:
    import json

    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("an agent frame must be a JSON object")
    return message


def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def unb64(text: str | None) -> bytes:
    return binascii.a2b_base64(text) if text else b""


def parse_cmdline(text: str) -> dict[str, str]:
    """``key=value`` words of the kernel command line (a bare word maps to "")."""
    words = {}
    for word in text.split():
        key, _, value = word.partition("=")
        words[key] = value
    return words
