"""The guest half of ``teelab bench unseal``: the unseal round trip (Decrypt with an attested Recipient) over
TLS to a pinned KMS and over plain HTTP to another, alternating, timed from the request to the opened secret.

``python3 -m teelab_guest.unseal_bench --tls vsock:2:8443 --tls-ciphertext B64 --plain vsock:2:8000
--plain-ciphertext B64 --kms-ca PEM --rounds N --cold M`` prints one JSON line. Each mode keeps one client
(one connection, as a guest that unseals more than once would); the first round trip of each, which opens the
connection, is reported apart. Then ``--cold`` rounds each open a fresh connection (a full TLS handshake),
as a guest that unseals once does. Evidence is fetched fresh before every round trip (the KMS refuses a
replay) and is not timed: it costs the same either way.
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
from teelab_guest.evidence import get_evidence
from teelab_guest.kms_client import KmsClient, RecipientKey
from teelab_guest.unseal import cmdline_pin, kms_tls, transport


def round_trip(client: KmsClient, key: RecipientKey, ciphertext: bytes) -> tuple[float, str]:
    """(milliseconds, SHA-256 of the secret) of one Decrypt with fresh evidence as the Recipient."""
    nonce = os.urandom(32)
    evidence = get_evidence(report_data(nonce, key.public_key_der))
    started = time.perf_counter()
    secret = client.decrypt(ciphertext, recipient=key, evidence=evidence.blob, nonce=nonce)
    return (time.perf_counter() - started) * 1000, hashlib.sha256(secret).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="teelab_guest.unseal_bench", description=__doc__)
    parser.add_argument("--tls", required=True, help="the TLS KMS: vsock:CID:PORT, tcp:HOST:PORT, unix:PATH")
    parser.add_argument("--tls-ciphertext", required=True, help="a CiphertextBlob of the TLS KMS, base64")
    parser.add_argument("--plain", required=True, help="the plain HTTP KMS")
    parser.add_argument("--plain-ciphertext", required=True, help="a CiphertextBlob of the plain KMS, base64")
    parser.add_argument("--kms-ca", required=True, help="the TLS KMS's CA (PEM), checked against the pin")
    parser.add_argument("--rounds", type=int, default=30, help="round trips per mode on kept connections")
    parser.add_argument("--cold", type=int, default=5, help="round trips per mode on fresh connections")
    args = parser.parse_args(argv)
    tls = kms_tls(args.kms_ca, cmdline_pin())
    modes = {
        "tls": (lambda: KmsClient(transport(args.tls, tls)), base64.b64decode(args.tls_ciphertext)),
        "plain": (lambda: KmsClient(transport(args.plain)), base64.b64decode(args.plain_ciphertext)),
    }
    key = RecipientKey()
    clients = {mode: connect() for mode, (connect, _) in modes.items()}
    out: dict[str, object] = {}
    secrets = set()
    for mode, client in clients.items():
        out[f"first_{mode}_ms"], digest = round_trip(client, key, modes[mode][1])
        secrets.add(digest)
    warm: dict[str, list[float]] = {mode: [] for mode in modes}
    cold: dict[str, list[float]] = {mode: [] for mode in modes}
    for index in range(args.rounds + args.cold):
        order = list(modes) if index % 2 == 0 else list(reversed(modes))  # neither always goes first
        for mode in order:
            connect, ciphertext = modes[mode]
            if index < args.rounds:
                milliseconds, digest = round_trip(clients[mode], key, ciphertext)
                warm[mode].append(milliseconds)
            else:
                with connect() as fresh:
                    milliseconds, digest = round_trip(fresh, key, ciphertext)
                cold[mode].append(milliseconds)
            secrets.add(digest)
    for client in clients.values():
        client.close()
    out.update({f"{mode}_ms": samples for mode, samples in warm.items()})
    out.update({f"cold_{mode}_ms": samples for mode, samples in cold.items()})
    out["secrets"] = sorted(secrets)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
