"""The guest's SSH host key bound into its attestation evidence, so a verifier can pin the key of an attested
guest even when the console and the agent are the host's: ``python3 -m teelab_guest.ssh_hostkey NONCE_HEX``
reads the host key dropbear serves, puts ``binding.report_data(nonce, SPKI DER of that key)`` in the report,
and prints CBOR ``{host_key, kind, blob, aux, source}``."""

from __future__ import annotations

import subprocess
import sys

import cbor2
from cryptography.hazmat.primitives import serialization

from teelab_guest import binding
from teelab_guest.evidence import get_evidence

HOST_KEY = "/run/teelab-ssh/host_ed25519"


def host_key_line(path: str = HOST_KEY) -> str:
    """The public half of dropbear's host key, ``ssh-ed25519 AAAA...``."""
    out = subprocess.run(["dropbearkey", "-y", "-f", path], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("ssh-ed25519 "))


def key_der(line: str) -> bytes:
    """The key of an OpenSSH public key line as SubjectPublicKeyInfo DER (what ``binding`` frames)."""
    key = serialization.load_ssh_public_key(line.encode())
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def main(argv: list[str]) -> int:
    nonce = bytes.fromhex(argv[1])
    line = host_key_line()
    evidence = get_evidence(binding.report_data(nonce, key_der(line)))
    record = {"host_key": line, "kind": evidence.kind, "blob": evidence.blob, "aux": evidence.aux,
              "source": evidence.source}  # fmt: skip
    sys.stdout.buffer.write(cbor2.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
