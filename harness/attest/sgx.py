"""Intel SGX DCAP quotes (tee_type 0), version 3 and 4, ECDSA P-256: parse and write byte-exact.

The layout is the TDX quote's with an SGX enclave REPORT body (384 bytes, the QE report's layout) in place of
the TD report: header (48) | report body (384) | signature data length | signature data. In v3 the signature
data holds the QE report certification data directly after the attestation key; in v4 it is wrapped as
certification data type 6. Bytes after the declared signature-data length are kept as ``trailer`` and never
read, as for TDX.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any

from harness.attest.binary import Reader
from harness.attest.errors import EvidenceError, EvidenceUnsupported
from harness.attest.tdx import (
    _HEADER,
    _HEADER_FIELDS,
    ATT_KEY_TYPE_ECDSA_P256,
    CERT_DATA_QE_REPORT,
    HEADER_SIZE,
    QE_REPORT_SIZE,
    EnclaveReport,
    QuoteHeader,
    qe_certification_bytes,
    qe_certification_spans,
    read_qe_certification,
    report_spans,
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
class SgxQuote:
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
    def version(self) -> int:
        return self.header.version

    @property
    def debug(self) -> bool:
        return is_debug(self.body)

    def signed_bytes(self) -> bytes:
        """Header and enclave report body: what the attestation key signs."""
        return self.header.to_bytes() + self.body.to_bytes()

    def signature_data(self) -> bytes:
        qe_cert = qe_certification_bytes(
            self.qe_report, self.qe_report_signature, self.qe_auth_data, self.pck_chain
        )
        if self.version == 4:
            qe_cert = struct.pack("<HI", CERT_DATA_QE_REPORT, len(qe_cert)) + qe_cert
        return self.signature + self.attestation_key + qe_cert

    def to_bytes(self) -> bytes:
        sig_data = self.signature_data()
        return self.signed_bytes() + struct.pack("<I", len(sig_data)) + sig_data + self.trailer

    @property
    def pck_chain_pem(self) -> bytes:
        return self.pck_chain.rstrip(b"\0")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: _hexed(getattr(self.header, name)) for name in _HEADER_FIELDS}
        out.update({f.name: _hexed(getattr(self.body, f.name)) for f in fields(self.body)})
        out["debug"] = self.debug
        out["signature"] = self.signature.hex()
        out["attestation_key"] = self.attestation_key.hex()
        out["qe_report"] = self.qe_report.to_dict()
        out["qe_report_signature"] = self.qe_report_signature.hex()
        out["qe_auth_data"] = self.qe_auth_data.hex()
        out["pck_chain"] = self.pck_chain_pem.decode("ascii", "replace")
        out["trailing_bytes"] = len(self.trailer)
        return out


def _hexed(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


def parse_sgx_quote(data: bytes) -> SgxQuote:
    """Decode a v3 or v4 SGX quote; raises E801-E803 naming the offending field."""
    data = bytes(data)
    reader = Reader(data, "sgx")
    header = QuoteHeader(*_HEADER.unpack(reader.take(HEADER_SIZE, "header")))
    if header.version not in VERSIONS:
        raise EvidenceUnsupported(
            f"sgx: quote version {header.version}, not 3 or 4", field="version", kind="sgx"
        )
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise EvidenceUnsupported(
            f"sgx: attestation key type {header.att_key_type}, only 2 (ECDSA P-256) is supported",
            field="att_key_type",
            kind="sgx",
        )
    if header.tee_type != TEE_TYPE_SGX:
        raise EvidenceUnsupported(
            f"sgx: tee_type {header.tee_type:#x} is not SGX (0)", field="tee_type", kind="sgx"
        )
    body = EnclaveReport.from_bytes(reader.take(QE_REPORT_SIZE, "report_body"))
    sig_size = reader.u32("signature_data_size")
    sig_end = reader.pos + sig_size
    if sig_end > len(data):
        reader.take(sig_size, "signature_data", size_field="signature_data_size")  # raises: truncated
    sig = Reader(data, "sgx", offset=reader.pos, end=sig_end)
    signature = sig.take(64, "signature")
    attestation_key = sig.take(64, "attestation_key")
    if header.version == 4:
        cert_type = sig.u16("certification_data.type")
        if cert_type != CERT_DATA_QE_REPORT:
            raise EvidenceUnsupported(
                f"sgx: certification data type {cert_type}, only 6 (QE report certification data) is "
                "supported",
                field="certification_data.type",
                kind="sgx",
            )
        cert_size = sig.u32("certification_data.size")
        if cert_size != sig.remaining:
            raise EvidenceError(
                f"sgx: certification data says {cert_size} bytes, signature data leaves {sig.remaining}",
                field="certification_data.size",
                kind="sgx",
            )
    qe_report, qe_report_signature, qe_auth_data, pck_chain = read_qe_certification(sig)
    return SgxQuote(
        header=header,
        body=body,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain=pck_chain,
        trailer=data[sig_end:],
    )


def sgx_field_spans(quote: SgxQuote) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of every field of ``quote`` as written by ``to_bytes()``."""
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, code in zip(_HEADER_FIELDS, ("H", "H", "I", "H", "H", "16s", "20s"), strict=True):
        size = struct.calcsize("<" + code)
        spans[name] = (offset, size)
        offset += size
    spans.update(report_spans(offset, ""))
    offset += QE_REPORT_SIZE
    layout = [("signature_data_size", 4), ("signature", 64), ("attestation_key", 64)]
    if quote.version == 4:
        layout += [("certification_data.type", 2), ("certification_data.size", 4)]
    for name, size in layout:
        spans[name] = (offset, size)
        offset += size
    spans.update(qe_certification_spans(offset, quote.qe_auth_data, quote.pck_chain))
    return spans


def looks_like_sgx(data: bytes) -> bool:
    """Version 3 with attestation key type 2 (v3 quotes are SGX only), or version 4 with key type 2 and
    tee_type 0 (a TDX quote's 0x81 is never one bit away from 0)."""
    head = bytes(data[:8])
    return head[:4] == b"\x03\x00\x02\x00" or head == b"\x04\x00\x02\x00" + bytes(4)
