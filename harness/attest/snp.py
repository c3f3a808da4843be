"""AMD SEV-SNP ATTESTATION_REPORT (1184 bytes, versions 2-5): parse, write byte-exact, and the cert table."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from harness.attest.errors import EvidenceError, EvidenceTruncated, EvidenceUnsupported

REPORT_SIZE = 1184
SIGNED_SIZE = 0x2A0
SUPPORTED_VERSIONS = (2, 3, 4, 5)
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1

# Guest policy bits (SEV-SNP ABI, GUEST_POLICY)
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

# PLATFORM_INFO bits
PLATFORM_SMT_EN = 1 << 0
PLATFORM_TSME_EN = 1 << 1

SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}

# Wire bytes of the GHCB certificate-table GUIDs (uuid_parse order, as AMD's tools write them).
CERT_TABLE_GUIDS = {
    "vcek": uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"),
    "vlek": uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"),
    "ask": uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"),
    "ark": uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"),
}
_GUID_NAMES = {g.bytes: name for name, g in CERT_TABLE_GUIDS.items()}


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION, Milan/Genoa layout: [0] bootloader, [1] tee, [2:6] reserved, [6] snp, [7] microcode."""

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0
    reserved: bytes = bytes(4)

    @classmethod
    def from_bytes(cls, raw: bytes) -> TcbVersion:
        return cls(raw[0], raw[1], raw[6], raw[7], bytes(raw[2:6]))

    @classmethod
    def from_value(cls, value: TcbVersion | Mapping[str, int] | int) -> TcbVersion:
        """From a TcbVersion, a mapping of the four SPLs, or the 64-bit little-endian integer."""
        if isinstance(value, TcbVersion):
            return value
        if isinstance(value, int):
            return cls.from_bytes(value.to_bytes(8, "little"))
        unknown = set(value) - {"bootloader", "tee", "snp", "microcode"}
        if unknown:
            raise ValueError(f"unknown TCB components {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in value.items()})

    def to_bytes(self) -> bytes:
        for name in ("bootloader", "tee", "snp", "microcode"):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"TCB {name} must be 0..255")
        return bytes([self.bootloader, self.tee]) + bytes(self.reserved) + bytes([self.snp, self.microcode])

    @property
    def raw(self) -> int:
        return int.from_bytes(self.to_bytes(), "little")

    def components(self) -> dict[str, int]:
        return {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}

    def at_least(self, minimum: TcbVersion) -> bool:
        """Every component is >= the minimum's."""
        mine, floor = self.components(), minimum.components()
        return all(mine[k] >= floor[k] for k in mine)

    def to_dict(self) -> dict[str, Any]:
        return {**self.components(), "raw": self.to_bytes().hex()}


# (field, struct code) in wire order; every byte of the report belongs to exactly one field.
_LAYOUT: tuple[tuple[str, str], ...] = (
    ("version", "I"),
    ("guest_svn", "I"),
    ("policy", "Q"),
    ("family_id", "16s"),
    ("image_id", "16s"),
    ("vmpl", "I"),
    ("signature_algo", "I"),
    ("current_tcb", "8s"),
    ("platform_info", "Q"),
    ("key_info", "I"),
    ("reserved_04c", "4s"),
    ("report_data", "64s"),
    ("measurement", "48s"),
    ("host_data", "32s"),
    ("id_key_digest", "48s"),
    ("author_key_digest", "48s"),
    ("report_id", "32s"),
    ("report_id_ma", "32s"),
    ("reported_tcb", "8s"),
    ("cpuid_fam_id", "B"),
    ("cpuid_mod_id", "B"),
    ("cpuid_step", "B"),
    ("reserved_18b", "21s"),
    ("chip_id", "64s"),
    ("committed_tcb", "8s"),
    ("current_build", "B"),
    ("current_minor", "B"),
    ("current_major", "B"),
    ("reserved_1eb", "B"),
    ("committed_build", "B"),
    ("committed_minor", "B"),
    ("committed_major", "B"),
    ("reserved_1ef", "B"),
    ("launch_tcb", "8s"),
    ("launch_mit_vector", "Q"),
    ("current_mit_vector", "Q"),
    ("reserved_208", "152s"),
    ("signature_r", "72s"),
    ("signature_s", "72s"),
    ("reserved_330", "368s"),
)
_STRUCT = struct.Struct("<" + "".join(code for _, code in _LAYOUT))
assert _STRUCT.size == REPORT_SIZE
_TCB_FIELDS = frozenset({"current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"})


def _spans() -> dict[str, tuple[int, int]]:
    spans, offset = {}, 0
    for name, code in _LAYOUT:
        size = struct.calcsize("<" + code)
        spans[name] = (offset, size)
        offset += size
    return spans


# name -> (offset, size) of every field, for tools and tests that address bytes.
FIELD_SPANS: dict[str, tuple[int, int]] = _spans()


@dataclass(frozen=True)
class SnpReport:
    """Every field of an ATTESTATION_REPORT; ``to_bytes()`` writes back the exact 1184 bytes."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    key_info: int
    reserved_04c: bytes
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int
    cpuid_mod_id: int
    cpuid_step: int
    reserved_18b: bytes
    chip_id: bytes
    committed_tcb: TcbVersion
    current_build: int
    current_minor: int
    current_major: int
    reserved_1eb: int
    committed_build: int
    committed_minor: int
    committed_major: int
    reserved_1ef: int
    launch_tcb: TcbVersion
    launch_mit_vector: int
    current_mit_vector: int
    reserved_208: bytes
    signature_r: bytes
    signature_s: bytes
    reserved_330: bytes

    # --- derived views -------------------------------------------------------------------------------
    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.policy & POLICY_SMT)

    @property
    def signing_key(self) -> str:
        """ "vcek", "vlek", "none" (an unsigned report) or "reserved-N"."""
        selector = (self.key_info >> 2) & 0b111
        return SIGNING_KEYS.get(selector, f"reserved-{selector}")

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info & 0b10)

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & 0b1)

    @property
    def signature(self) -> tuple[int, int]:
        """(r, s) as integers (stored little-endian, zero-padded to 72 bytes)."""
        return int.from_bytes(self.signature_r, "little"), int.from_bytes(self.signature_s, "little")

    def signed_bytes(self) -> bytes:
        return self.to_bytes()[:SIGNED_SIZE]

    # --- wire ------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        values = []
        for name, code in _LAYOUT:
            value = getattr(self, name)
            if name in _TCB_FIELDS:
                value = value.to_bytes()
            elif code.endswith("s") and len(value) != FIELD_SPANS[name][1]:
                raise EvidenceError(
                    f"snp: {name} must be {FIELD_SPANS[name][1]} bytes", field=name, kind="snp"
                )
            values.append(value)
        try:
            return _STRUCT.pack(*values)
        except (struct.error, ValueError) as exc:
            raise EvidenceError(f"snp: a field does not fit its size: {exc}", field="report") from None

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (hex for bytes, TCB components spelled out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TcbVersion):
                out[f.name] = value.to_dict()
            elif isinstance(value, bytes):
                out[f.name] = value.hex()
            else:
                out[f.name] = value
        out["signing_key"] = self.signing_key
        out["debug"] = self.debug
        return out


def parse_snp_report(data: bytes) -> SnpReport:
    """Decode a 1184-byte ATTESTATION_REPORT; raises E801-E803 naming the offending field."""
    data = bytes(data)
    if len(data) < REPORT_SIZE:
        field = next(name for name, (off, size) in FIELD_SPANS.items() if off + size > len(data))
        raise EvidenceTruncated(
            f"snp: report is {len(data)} bytes, needs {REPORT_SIZE}; it ends inside {field}",
            field=field,
            kind="snp",
            length=len(data),
        )
    if len(data) > REPORT_SIZE:
        raise EvidenceError(
            f"snp: report is {len(data)} bytes, {len(data) - REPORT_SIZE} more than {REPORT_SIZE}",
            field="length",
            kind="snp",
            hint="pass exactly the ATTESTATION_REPORT (a /dev/sev-guest response carries it at offset 32)",
        )
    values = dict(zip((name for name, _ in _LAYOUT), _STRUCT.unpack(data), strict=True))
    if values["version"] not in SUPPORTED_VERSIONS:
        raise EvidenceUnsupported(
            f"snp: report version {values['version']} is not one of {SUPPORTED_VERSIONS}",
            field="version",
            kind="snp",
        )
    for name in _TCB_FIELDS:
        values[name] = TcbVersion.from_bytes(values[name])
    return SnpReport(**values)


def build_snp_report(**values: Any) -> SnpReport:
    """A report from keyword fields; every field not given is zero (TCBs zero, bytes all-zero)."""
    defaults: dict[str, Any] = {}
    for name, code in _LAYOUT:
        if name in _TCB_FIELDS:
            defaults[name] = TcbVersion()
        elif code.endswith("s"):
            defaults[name] = bytes(FIELD_SPANS[name][1])
        else:
            defaults[name] = 0
    unknown = set(values) - set(defaults)
    if unknown:
        raise TypeError(f"unknown SNP report fields {sorted(unknown)}")
    defaults.update(values)
    return SnpReport(**defaults)


# --- the GHCB certificate table (configfs-tsm auxblob, SNP_GET_EXT_REPORT) ------------------------------
def parse_snp_cert_table(blob: bytes) -> list[tuple[str, bytes]]:
    """(name or GUID, DER) entries of a certificate table: 24-byte entries {guid, offset u32, length u32}
    ended by an all-zero entry, offsets from the table's start."""
    blob = bytes(blob)
    entries: list[tuple[str, bytes]] = []
    pos = 0
    while True:
        if pos + 24 > len(blob):
            raise EvidenceTruncated(
                "snp cert table: no terminating all-zero entry", field="cert_table", kind="snp"
            )
        guid = blob[pos : pos + 16]
        offset, length = struct.unpack_from("<II", blob, pos + 16)
        pos += 24
        if guid == bytes(16) and offset == 0 and length == 0:
            return entries
        if offset + length > len(blob) or length == 0:
            raise EvidenceError(
                f"snp cert table: entry {uuid.UUID(bytes=guid)} points outside the table",
                field="cert_table",
                kind="snp",
            )
        name = _GUID_NAMES.get(guid, str(uuid.UUID(bytes=guid)))
        entries.append((name, blob[offset : offset + length]))
        if len(entries) > 64:
            raise EvidenceError("snp cert table: more than 64 entries", field="cert_table", kind="snp")


def write_snp_cert_table(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """A certificate table for (name, DER) pairs; names are vcek, vlek, ask, ark or GUID strings."""
    header_size = 24 * (len(entries) + 1)
    table, body = b"", b""
    for name, der in entries:
        guid = CERT_TABLE_GUIDS[name] if name in CERT_TABLE_GUIDS else uuid.UUID(name)
        table += guid.bytes + struct.pack("<II", header_size + len(body), len(der))
        body += der
    return table + bytes(24) + body


def looks_like_snp(data: bytes) -> bool:
    """A small little-endian u32 version first (the parser then names an unsupported one)."""
    return len(data) >= 4 and 0 < int.from_bytes(data[:4], "little") < 256
