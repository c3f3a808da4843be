"""The 64 bytes a guest puts in SNP/TDX report_data to bind a verifier's nonce and the guest's ephemeral key.

report_data = SHA-512(frame(LABEL) || frame(nonce) || frame(public_key_der)), where frame(x) is x's length as
an 8-byte big-endian integer followed by x. The label separates this use of SHA-512 from every other; the
length prefixes make the encoding unambiguous (no two (nonce, key) pairs give the same input). Stdlib only:
the guest (Python 3.11) and the host's verifier import this same function.
"""

from __future__ import annotations

import hashlib

LABEL = b"teelab/report-data/v1"
REPORT_DATA_SIZE = 64


def _frame(part: bytes) -> bytes:
    return len(part).to_bytes(8, "big") + part


def report_data(nonce: bytes, public_key_der: bytes) -> bytes:
    """64 bytes binding ``nonce`` and ``public_key_der`` (SubjectPublicKeyInfo DER; b"" for none)."""
    if not isinstance(nonce, (bytes, bytearray)) or not isinstance(public_key_der, (bytes, bytearray)):
        raise TypeError("nonce and public_key_der must be bytes")
    return hashlib.sha512(_frame(LABEL) + _frame(bytes(nonce)) + _frame(bytes(public_key_der))).digest()
