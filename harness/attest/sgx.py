"""Intel SGX DCAP quotes (tee_type 0), version 3 and 4, ECDSA P-256: parse and write byte-exact.

The layout is the TDX quote's with an SGX enclave REPORT body (384 bytes, the QE report's layout) in place of
the TD report: header (48) | report body (384) | signature data length | signature data. In v3 the signature
data holds the QE report certification data directly after the attestation key; in v4 it is wrapped as
certification data type 6. Bytes after the declared signature-data length are kept as ``trailer`` and never
read, as for TDX.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from harness.attest.binary import Reader
from harness.attest.tdx import (
    HEADER_SIZE,
    QE_REPORT_SIZE,
    EnclaveReport,
    QuoteHeader,
    SignedQuote,
    header_spans,
    read_header,
    read_signature_data,
    report_spans,
    signature_data_spans,
)

TEE_TYPE_SGX = 0
VERSIONS = (3, 4)
SGX_FLAG_DEBUG = 1 << 1  # ATTRIBUTES.FLAGS bit 1
SGX_FLAG_MODE64BIT = 1 << 2


def flags(report: EnclaveReport) -> int:
    """ATTRIBUTES.FLAGS: the first 8 bytes of ATTRIBUTES, little-endian (the other 8 are XFRM)."""
    return int.from_bytes(report.attributes[:8], "little")


def is_debug(report: EnclaveReport) -> bool:
    return bool(flags(report) & SGX_FLAG_DEBUG)


@dataclass(frozen=True)
class SgxQuote(SignedQuote):
    """An SGX quote with its ECDSA signature data; ``to_bytes()`` writes back the exact input."""

    header: QuoteHeader
    body: EnclaveReport
    signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: bytes
    trailer: bytes = b""

    @property
    def debug(self) -> bool:
        return is_debug(self.body)

    @property
    def wraps_qe_certification(self) -> bool:
        return self.version == 4  # v3 has the QE report certification data right after the key

    def signed_bytes(self) -> bytes:
        """Header and enclave report body: what the attestation key signs."""
        return self.header.to_bytes() + self.body.to_bytes()

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _hexed(getattr(self.body, f.name)) for f in fields(self.body)}
        return self.header_dict() | body | {"debug": self.debug} | self.signature_dict()


def _hexed(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


def parse_sgx_quote(data: bytes) -> SgxQuote:
    """Decode a v3 or v4 SGX quote; raises E801-E803 naming the offending field."""
    reader = Reader(bytes(data), "sgx")
    header = read_header(reader, VERSIONS, TEE_TYPE_SGX)
    body = EnclaveReport.from_bytes(reader.take(QE_REPORT_SIZE, "report_body"))
    return SgxQuote(header=header, body=body, **read_signature_data(reader, wrapped=header.version == 4))


def sgx_field_spans(quote: SgxQuote) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of every field of ``quote`` as written by ``to_bytes()``."""
    spans = header_spans() | report_spans(HEADER_SIZE, "")
    return spans | signature_data_spans(HEADER_SIZE + QE_REPORT_SIZE, quote)


def looks_like_sgx(data: bytes) -> bool:
    """An SGX quote header, or one with a single field wrong (so the parser names it): version 3 or 4,
    attestation key type 2, tee_type 0. An SNP report's first 8 bytes (a small u32 version, then guest_svn)
    never have a nonzero key type; a TDX quote's tee_type 0x81 is never one bit away from 0."""
    head = bytes(data[:8])
    version, key, tee = head[:2], head[2:4], head[4:8]
    if len(head) < 8:
        return head[:4] == b"\x03\x00\x02\x00"
    if tee != bytes(4):
        return version == b"\x03\x00" and key == b"\x02\x00"  # v3 is SGX only: its tee_type is wrong
    return key == b"\x02\x00" or (version == b"\x03\x00" and key != bytes(2))
