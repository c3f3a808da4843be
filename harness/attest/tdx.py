"""Intel TDX quotes v4 and v5 (ECDSA P-256, certification data type 6 -> 5): parse and write byte-exact.

Bytes after the declared signature-data length are kept as ``trailer``: quote buffers handed out by
quote-generation libraries are often larger than the quote (zero padding), no signature covers those bytes,
and the verifier never reads them; it reports their count as the claim ``trailing_bytes``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any

from harness.attest.binary import Reader
from harness.attest.errors import EvidenceError, EvidenceUnsupported

TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
TD10_SIZE = 584
TD15_SIZE = 648
HEADER_SIZE = 48
QE_REPORT_SIZE = 384
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TD_ATTRIBUTE_DEBUG = 1 << 0
TD_ATTRIBUTE_SEPT_VE_DISABLE = 1 << 28

_HEADER = struct.Struct("<HHIHH16s20s")
_HEADER_FIELDS = ("version", "att_key_type", "tee_type", "pce_svn", "qe_svn", "qe_vendor_id", "user_data")
_TD10_LAYOUT: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mrseam", 48),
    ("mrsignerseam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mrtd", 48),
    ("mrconfigid", 48),
    ("mrowner", 48),
    ("mrownerconfig", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_EXTRA: tuple[tuple[str, int], ...] = (("tee_tcb_svn2", 16), ("mrservicetd", 48))
_QE_LAYOUT: tuple[tuple[str, str], ...] = (
    ("cpu_svn", "16s"),
    ("misc_select", "I"),
    ("reserved1", "12s"),
    ("isv_ext_prod_id", "16s"),
    ("attributes", "16s"),
    ("mrenclave", "32s"),
    ("reserved2", "32s"),
    ("mrsigner", "32s"),
    ("reserved3", "32s"),
    ("config_id", "64s"),
    ("isv_prod_id", "H"),
    ("isv_svn", "H"),
    ("config_svn", "H"),
    ("reserved4", "42s"),
    ("isv_family_id", "16s"),
    ("report_data", "64s"),
)
_QE_STRUCT = struct.Struct("<" + "".join(code for _, code in _QE_LAYOUT))
assert _QE_STRUCT.size == QE_REPORT_SIZE


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    pce_svn: int
    qe_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def to_bytes(self) -> bytes:
        return _HEADER.pack(*(getattr(self, name) for name in _HEADER_FIELDS))


@dataclass(frozen=True)
class TdReportBody:
    """The TD report in a quote: TD 1.0 (584 bytes) or TD 1.5 (648, adds tee_tcb_svn2 and mrservicetd)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def td_attributes_value(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes_value & TD_ATTRIBUTE_DEBUG)

    @property
    def is_td15(self) -> bool:
        return self.tee_tcb_svn2 is not None

    def to_bytes(self) -> bytes:
        layout = _TD10_LAYOUT + (_TD15_EXTRA if self.is_td15 else ())
        out = b""
        for name, size in layout:
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise EvidenceError(f"tdx: {name} must be {size} bytes", field=name, kind="tdx")
            out += value
        return out


@dataclass(frozen=True)
class EnclaveReport:
    """The 384-byte SGX REPORT body of the quoting enclave (QE report)."""

    cpu_svn: bytes
    misc_select: int
    reserved1: bytes
    isv_ext_prod_id: bytes
    attributes: bytes
    mrenclave: bytes
    reserved2: bytes
    mrsigner: bytes
    reserved3: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    reserved4: bytes
    isv_family_id: bytes
    report_data: bytes

    @classmethod
    def from_bytes(cls, raw: bytes) -> EnclaveReport:
        return cls(*_QE_STRUCT.unpack(raw))

    @classmethod
    def build(cls, **values: Any) -> EnclaveReport:
        defaults: dict[str, Any] = {
            name: (bytes(struct.calcsize("<" + code)) if code.endswith("s") else 0)
            for name, code in _QE_LAYOUT
        }
        defaults.update(values)
        return cls(**defaults)

    def to_bytes(self) -> bytes:
        try:
            return _QE_STRUCT.pack(*(getattr(self, name) for name, _ in _QE_LAYOUT))
        except struct.error as exc:
            raise EvidenceError(
                f"tdx: QE report field does not fit: {exc}", field="qe_report", kind="tdx"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (
                getattr(self, f.name).hex()
                if isinstance(getattr(self, f.name), bytes)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }


class SignedQuote:
    """What TDX and SGX quotes share after their body: the ECDSA signature data (quote signature, attestation
    key, QE report certification data), wrapped as certification data type 6 unless ``wraps_qe_certification``
    is false (SGX v3), and the unread trailer."""

    header: QuoteHeader
    signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: bytes
    trailer: bytes

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def wraps_qe_certification(self) -> bool:
        return True

    def signed_bytes(self) -> bytes:
        raise NotImplementedError

    def signature_data(self) -> bytes:
        qe_cert = qe_certification_bytes(
            self.qe_report, self.qe_report_signature, self.qe_auth_data, self.pck_chain
        )
        if self.wraps_qe_certification:
            qe_cert = struct.pack("<HI", CERT_DATA_QE_REPORT, len(qe_cert)) + qe_cert
        return self.signature + self.attestation_key + qe_cert

    def to_bytes(self) -> bytes:
        sig_data = self.signature_data()
        return self.signed_bytes() + struct.pack("<I", len(sig_data)) + sig_data + self.trailer

    @property
    def pck_chain_pem(self) -> bytes:
        return self.pck_chain.rstrip(b"\0")

    def header_dict(self) -> dict[str, Any]:
        return {name: _hexed(getattr(self.header, name)) for name in _HEADER_FIELDS}

    def signature_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature.hex(),
            "attestation_key": self.attestation_key.hex(),
            "qe_report": self.qe_report.to_dict(),
            "qe_report_signature": self.qe_report_signature.hex(),
            "qe_auth_data": self.qe_auth_data.hex(),
            "pck_chain": self.pck_chain_pem.decode("ascii", "replace"),
            "trailing_bytes": len(self.trailer),
        }


@dataclass(frozen=True)
class TdxQuote(SignedQuote):
    """A TDX quote with its ECDSA signature data; ``to_bytes()`` writes back the exact input."""

    header: QuoteHeader
    body: TdReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: bytes
    body_type: int | None = None
    trailer: bytes = b""

    def signed_bytes(self) -> bytes:
        """Header and body: what the attestation key signs."""
        body = self.body.to_bytes()
        if self.header.version == 5:
            return self.header.to_bytes() + struct.pack("<HI", self.body_type or 0, len(body)) + body
        return self.header.to_bytes() + body

    def to_dict(self) -> dict[str, Any]:
        out = self.header_dict()
        if self.body_type is not None:
            out["body_type"] = self.body_type
        out.update(
            {
                f.name: _hexed(getattr(self.body, f.name))
                for f in fields(self.body)
                if getattr(self.body, f.name) is not None
            }
        )
        out["debug"] = self.body.debug
        return out | self.signature_dict()


def _hexed(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


def qe_certification_bytes(
    qe_report: EnclaveReport, qe_report_signature: bytes, qe_auth_data: bytes, pck_chain: bytes
) -> bytes:
    """The QE report certification data: QE report, its signature, QE auth data and the PCK chain as
    certification data type 5 (inside type 6 in v4/v5 quotes; directly in the signature data of v3)."""
    return (
        qe_report.to_bytes()
        + qe_report_signature
        + struct.pack("<H", len(qe_auth_data))
        + qe_auth_data
        + struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pck_chain))
        + pck_chain
    )


def read_qe_certification(sig: Reader) -> tuple[EnclaveReport, bytes, bytes, bytes]:
    """(QE report, its signature, QE auth data, PCK chain) from ``sig``, which they must fill exactly."""
    qe_report = EnclaveReport.from_bytes(sig.take(QE_REPORT_SIZE, "qe_report"))
    qe_report_signature = sig.take(64, "qe_report_signature")
    auth_size = sig.u16("qe_auth_data.size")
    qe_auth_data = sig.take(auth_size, "qe_auth_data", size_field="qe_auth_data.size")
    size = read_certification_header(sig, "pck_chain", CERT_DATA_PCK_CHAIN, "PCK certificate chain")
    return qe_report, qe_report_signature, qe_auth_data, sig.take(size, "pck_chain")


def read_certification_header(sig: Reader, field: str, expected: int, meaning: str) -> int:
    """A certification data type (u16), which must be ``expected``, and its size (u32), which must be what
    is left of ``sig``; raises E803/E801 naming ``field``.type/.size."""
    kind = sig.kind
    cert_type = sig.u16(f"{field}.type")
    if cert_type != expected:
        raise EvidenceUnsupported(
            f"{kind}: certification data type {cert_type}, only {expected} ({meaning}) is supported",
            field=f"{field}.type",
            kind=kind,
        )
    size = sig.u32(f"{field}.size")
    if size != sig.remaining:
        raise EvidenceError(
            f"{kind}: {field} says {size} bytes, its container leaves {sig.remaining}",
            field=f"{field}.size",
            kind=kind,
        )
    return size


def read_header(reader: Reader, versions: tuple[int, int], tee_type: int) -> QuoteHeader:
    """The 48-byte quote header; its version must be one of ``versions``, its key ECDSA P-256, its tee_type
    ``tee_type`` (raises E803 naming the field)."""
    kind = reader.kind
    header = QuoteHeader(*_HEADER.unpack(reader.take(HEADER_SIZE, "header")))
    if header.version not in versions:
        raise EvidenceUnsupported(
            f"{kind}: quote version {header.version}, not {versions[0]} or {versions[1]}",
            field="version",
            kind=kind,
        )
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise EvidenceUnsupported(
            f"{kind}: attestation key type {header.att_key_type}, only 2 (ECDSA P-256) is supported",
            field="att_key_type",
            kind=kind,
        )
    if header.tee_type != tee_type:
        raise EvidenceUnsupported(
            f"{kind}: tee_type {header.tee_type:#x} is not {kind.upper()} ({tee_type:#x})",
            field="tee_type",
            kind=kind,
        )
    return header


def read_signature_data(reader: Reader, *, wrapped: bool) -> dict[str, Any]:
    """The signature data length and signature data after a quote's body, and the trailer after them, as
    the keyword arguments of the quote's signature fields (``SignedQuote``)."""
    kind, data = reader.kind, reader.data
    sig_size = reader.u32("signature_data_size")
    sig_end = reader.pos + sig_size
    if sig_end > len(data):
        reader.take(sig_size, "signature_data", size_field="signature_data_size")  # raises: truncated
    sig = Reader(data, kind, offset=reader.pos, end=sig_end)
    signature = sig.take(64, "signature")
    attestation_key = sig.take(64, "attestation_key")
    if wrapped:
        read_certification_header(sig, "certification_data", CERT_DATA_QE_REPORT, "QE report certification")
    qe_report, qe_report_signature, qe_auth_data, pck_chain = read_qe_certification(sig)
    return {
        "signature": signature,
        "attestation_key": attestation_key,
        "qe_report": qe_report,
        "qe_report_signature": qe_report_signature,
        "qe_auth_data": qe_auth_data,
        "pck_chain": pck_chain,
        "trailer": data[sig_end:],
    }


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Decode a v4 or v5 TDX quote; raises E801-E803 naming the offending field."""
    data = bytes(data)
    reader = Reader(data, "tdx")
    header = read_header(reader, (4, 5), TEE_TYPE_TDX)
    body_type = None
    body_size = TD10_SIZE
    if header.version == 5:
        body_type = reader.u16("body_type")
        body_size = reader.u32("body_size")
        expected = {BODY_TYPE_TD10: TD10_SIZE, BODY_TYPE_TD15: TD15_SIZE}.get(body_type)
        if expected is None:
            raise EvidenceUnsupported(
                f"tdx: v5 body type {body_type}; only 2 (TD 1.0) and 3 (TD 1.5) are supported",
                field="body_type",
                kind="tdx",
            )
        if body_size != expected:
            raise EvidenceError(
                f"tdx: v5 body type {body_type} must be {expected} bytes, says {body_size}",
                field="body_size",
                kind="tdx",
            )
    layout = _TD10_LAYOUT + (_TD15_EXTRA if body_size == TD15_SIZE else ())
    body = TdReportBody(**{name: reader.take(size, name) for name, size in layout})
    return TdxQuote(
        header=header, body=body, body_type=body_type, **read_signature_data(reader, wrapped=True)
    )


def quote_field_spans(quote: TdxQuote) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of every field of ``quote`` as written by ``to_bytes()``."""
    spans = header_spans()
    offset = HEADER_SIZE
    if quote.version == 5:
        spans["body_type"] = (offset, 2)
        spans["body_size"] = (offset + 2, 4)
        offset += 6
    for name, size in _TD10_LAYOUT + (_TD15_EXTRA if quote.body.is_td15 else ()):
        spans[name] = (offset, size)
        offset += size
    return spans | signature_data_spans(offset, quote)


def signature_data_spans(offset: int, quote: SignedQuote) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of the signature data length and signature data written at ``offset``."""
    layout = [("signature_data_size", 4), ("signature", 64), ("attestation_key", 64)]
    if quote.wraps_qe_certification:
        layout += [("certification_data.type", 2), ("certification_data.size", 4)]
    spans = {}
    for name, size in layout:
        spans[name] = (offset, size)
        offset += size
    return spans | qe_certification_spans(offset, quote.qe_auth_data, quote.pck_chain)


def header_spans() -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of each field of the quote header."""
    spans = {}
    offset = 0
    for name, code in zip(_HEADER_FIELDS, ("H", "H", "I", "H", "H", "16s", "20s"), strict=True):
        size = struct.calcsize("<" + code)
        spans[name] = (offset, size)
        offset += size
    return spans


def report_spans(offset: int, prefix: str) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of each field of a 384-byte SGX report written at ``offset``."""
    spans = {}
    for name, code in _QE_LAYOUT:
        size = struct.calcsize("<" + code)
        spans[f"{prefix}{name}"] = (offset, size)
        offset += size
    return spans


def qe_certification_spans(offset: int, qe_auth_data: bytes, pck_chain: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of the QE report certification data written at ``offset``."""
    spans = report_spans(offset, "qe_report.")
    offset += QE_REPORT_SIZE
    for name, size in (
        ("qe_report_signature", 64),
        ("qe_auth_data.size", 2),
        ("qe_auth_data", len(qe_auth_data)),
        ("pck_chain.type", 2),
        ("pck_chain.size", 4),
        ("pck_chain", len(pck_chain)),
    ):
        spans[name] = (offset, size)
        offset += size
    return spans


def looks_like_tdx(data: bytes) -> bool:
    """Two of version 4/5, attestation key type 2 and tee_type 0x81 (so a bad third one gets named)."""
    head = bytes(data[:8])
    return (
        (head[:2] in (b"\x04\x00", b"\x05\x00"))
        + (head[2:4] == b"\x02\x00")
        + (head[4:8] == TEE_TYPE_TDX.to_bytes(4, "little"))
    ) >= 2
