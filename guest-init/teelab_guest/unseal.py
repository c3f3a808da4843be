"""Unseal a secret in a confidential guest: make an ephemeral RSA key, get evidence binding it (and a fresh
nonce) from the platform, and ask the lab KMS to Decrypt with that key as the Recipient.

``python3 -m teelab_guest.unseal --kms vsock:2:8000 --ciphertext B64`` prints one JSON line: ``served`` with
the SHA-256 of the secret (never the secret), or ``refused`` with the KMS's error. The same line goes to the
console, so the host sees the outcome even without the agent.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time

from teelab_guest.binding import report_data
from teelab_guest.evidence import EvidenceError, get_evidence
from teelab_guest.kms_client import KmsCallError, KmsClient, RecipientKey, Transport

CONSOLE_PREFIX = "TEELAB-UNSEAL"


def transport(spec: str) -> Transport:
    """``vsock:CID:PORT``, ``tcp:HOST:PORT`` or ``unix:PATH``."""
    kind, _, rest = spec.partition(":")
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        return Transport.vsock(int(cid), int(port))
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return Transport.tcp(host, int(port))
    if kind == "unix":
        return Transport.unix(rest)
    raise ValueError(f"KMS address {spec!r}: use vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")


def unseal(kms: str, ciphertext: bytes, key_id: str | None = None) -> dict[str, object]:
    """What happened, as a JSON-ready dict with the time each step took."""
    steps: dict[str, float] = {}
    started = time.monotonic()

    def step(name: str) -> None:
        steps[name] = round(time.monotonic() - started, 3)

    key = RecipientKey()
    step("key")
    nonce = os.urandom(32)
    try:
        evidence = get_evidence(report_data(nonce, key.public_key_der))
    except EvidenceError as exc:
        return {"outcome": "no-evidence", "error": str(exc), "steps": steps}
    step("evidence")
    try:
        with KmsClient(transport(kms)) as client:
            secret = client.decrypt(
                ciphertext, key_id=key_id, recipient=key, evidence=evidence.blob, nonce=nonce
            )
    except KmsCallError as exc:
        step("kms")
        return {"outcome": "refused", "error": exc.aws_type, "message": str(exc), "evidence": evidence.kind,
                "steps": steps}  # fmt: skip
    except OSError as exc:
        return {"outcome": "unreachable", "error": f"{type(exc).__name__}: {exc}", "steps": steps}
    step("kms")
    return {"outcome": "served", "sha256": hashlib.sha256(secret).hexdigest(), "bytes": len(secret),
            "evidence": evidence.kind, "source": evidence.source, "steps": steps}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="teelab_guest.unseal", description=__doc__)
    parser.add_argument("--kms", required=True, help="vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--ciphertext", required=True, help="the KMS CiphertextBlob, base64")
    parser.add_argument("--key-id", help="the KMS key (optional: the blob names it)")
    args = parser.parse_args(argv)
    result = unseal(args.kms, base64.b64decode(args.ciphertext), args.key_id)
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    try:
        with open("/dev/console", "w") as console:
            console.write(f"{CONSOLE_PREFIX} {line}\n")
    except OSError:
        pass
    return 0 if result["outcome"] == "served" else 1


if __name__ == "__main__":
    sys.exit(main())
