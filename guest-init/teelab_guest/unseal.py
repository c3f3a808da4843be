"""Unseal a secret in a confidential guest: make an ephemeral RSA key, get evidence binding it (and a fresh
nonce) from the platform, and ask the lab KMS to Decrypt with that key as the Recipient.

``python3 -m teelab_guest.unseal --kms vsock:2:8443 --kms-ca PEM --ciphertext B64`` prints one JSON line:
``served`` with the SHA-256 of the secret (never the secret), ``refused`` with the KMS's error, or
``untrusted`` with the reason the guest would not talk to that KMS. The same line goes to the console, so
the host sees the outcome even without the agent.

The KMS is spoken to in TLS, trusting only the CA whose SHA-256 the measured kernel command line pins
(``teelab.kms_ca=sha256:<hex>``); ``--kms-ca`` hands the CA certificate over untrusted and it is used only
when it matches. Without a pin the guest refuses to talk to any KMS; ``--plain`` (plain HTTP, for measuring
TLS against it) is the one explicit way around that.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import json
import os
import ssl
import sys
import time

from teelab_guest import protocol
from teelab_guest.binding import report_data
from teelab_guest.evidence import EvidenceError, get_evidence
from teelab_guest.kms_client import (
    KmsCallError,
    KmsClient,
    KmsTrustError,
    RecipientKey,
    Transport,
    pinned_context,
)

CONSOLE_PREFIX = "TEELAB-UNSEAL"


def transport(spec: str, tls: ssl.SSLContext | None = None) -> Transport:
    """``vsock:CID:PORT``, ``tcp:HOST:PORT`` or ``unix:PATH``; TLS with ``tls``."""
    kind, _, rest = spec.partition(":")
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        return Transport.vsock(int(cid), int(port), tls=tls)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return Transport.tcp(host, int(port), tls=tls)
    if kind == "unix":
        return Transport.unix(rest, tls=tls)
    raise ValueError(f"KMS address {spec!r}: use vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")


def cmdline_pin(path: str = "/proc/cmdline") -> str | None:
    """The KMS CA pin on this guest's kernel command line, or None."""
    with open(path) as cmdline:
        return protocol.parse_cmdline(cmdline.read()).get(protocol.KMS_CA_KEY) or None


def kms_tls(ca_pem: str | None, pin: str | None) -> ssl.SSLContext:
    """The TLS context for the KMS the pin names; KmsTrustError without a pin or a CA that matches it."""
    if pin and not ca_pem:
        raise KmsTrustError("bad-ca", "no KMS CA certificate was handed over (--kms-ca)")
    return pinned_context(ca_pem or "", pin)


def unseal(
    kms: str, ciphertext: bytes, key_id: str | None = None, *, tls: ssl.SSLContext | None = None
) -> dict[str, object]:
    """What happened, as a JSON-ready dict with the time each step took; plain HTTP when ``tls`` is None.
    The connection to the KMS (its TLS handshake) is opened while the recipient key is made, so the KMS
    round trip itself runs on an established connection."""
    steps: dict[str, float] = {}
    started = time.monotonic()

    def step(name: str) -> None:
        steps[name] = round(time.monotonic() - started, 3)

    client = KmsClient(transport(kms, tls))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    connecting = pool.submit(client.connect)
    try:
        key = RecipientKey()
        step("key")
        nonce = os.urandom(32)
        try:
            evidence = get_evidence(report_data(nonce, key.public_key_der))
        except EvidenceError as exc:
            return {"outcome": "no-evidence", "error": str(exc), "steps": steps}
        step("evidence")
        try:
            connecting.result()  # its failure (an untrusted KMS, no route) is the call's
            step("connected")
            secret = client.decrypt(
                ciphertext, key_id=key_id, recipient=key, evidence=evidence.blob, nonce=nonce
            )
        except KmsCallError as exc:
            step("kms")
            return {"outcome": "refused", "error": exc.aws_type, "message": str(exc),
                    "evidence": evidence.kind, "steps": steps}  # fmt: skip
        except KmsTrustError as exc:
            return {"outcome": "untrusted", "error": exc.reason, "message": str(exc), "steps": steps}
        except OSError as exc:
            return {"outcome": "unreachable", "error": f"{type(exc).__name__}: {exc}", "steps": steps}
    finally:
        pool.shutdown(wait=True)  # the connect ends (or fails) before its connection is closed
        client.close()
    step("kms")
    return {"outcome": "served", "sha256": hashlib.sha256(secret).hexdigest(), "bytes": len(secret),
            "evidence": evidence.kind, "source": evidence.source, "tls": tls is not None,
            "steps": steps}  # fmt: skip


def add_kms_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kms-ca", help="the KMS CA certificate (PEM), used only if it matches the pin")
    parser.add_argument(
        "--plain", action="store_true", help="plain HTTP, no TLS (only to measure TLS against it)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="teelab_guest.unseal", description=__doc__)
    parser.add_argument("--kms", required=True, help="vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--ciphertext", required=True, help="the KMS CiphertextBlob, base64")
    parser.add_argument("--key-id", help="the KMS key (optional: the blob names it)")
    add_kms_arguments(parser)
    args = parser.parse_args(argv)
    try:
        tls = None if args.plain else kms_tls(args.kms_ca, cmdline_pin())
    except KmsTrustError as exc:
        result: dict[str, object] = {"outcome": "untrusted", "error": exc.reason, "message": str(exc)}
    else:
        result = unseal(args.kms, base64.b64decode(args.ciphertext), args.key_id, tls=tls)
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
