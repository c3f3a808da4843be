"""Nitro-style attestation documents: COSE_Sign1 (tagged or not) over a CBOR payload map; parse and write."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2

from harness.attest.errors import EvidenceError, EvidenceTruncated, EvidenceUnsupported

COSE_SIGN1_TAG = 18
ALG_ES384 = -35
MAX_OPTIONAL_FIELD = 1024
_REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")
_MAX_DEPTH = 16


@dataclass(frozen=True)
class AttestationDocument:
    """A decoded document; ``protected`` and ``payload`` are the exact signed bytes."""

    protected: bytes
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool
    algorithm: Any
    module_id: str
    digest: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def sig_structure(self) -> bytes:
        """The COSE Sig_structure ["Signature1", protected, external_aad = b"", payload] that is signed."""
        return sig_structure(self.protected, self.payload)

    def to_bytes(self) -> bytes:
        return encode_cose_sign1(
            self.protected, self.payload, self.signature, tagged=self.tagged, unprotected=self.unprotected
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tagged": self.tagged,
            "algorithm": self.algorithm,
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp,
            "pcrs": {str(k): v.hex() for k, v in sorted(self.pcrs.items())},
            "certificate": self.certificate.hex(),
            "cabundle": [c.hex() for c in self.cabundle],
            "public_key": _hex_or_none(self.public_key),
            "user_data": _hex_or_none(self.user_data),
            "nonce": _hex_or_none(self.nonce),
            "signature": self.signature.hex(),
        }


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def encode_cose_sign1(
    protected: bytes,
    payload: bytes,
    signature: bytes,
    *,
    tagged: bool = False,
    unprotected: Mapping[Any, Any] | None = None,
) -> bytes:
    message = [protected, dict(unprotected or {}), payload, signature]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, message) if tagged else message)


def encode_payload(
    *,
    module_id: str,
    digest: str,
    timestamp: int,
    pcrs: Mapping[int, bytes],
    certificate: bytes,
    cabundle: Sequence[bytes],
    public_key: bytes | None,
    user_data: bytes | None,
    nonce: bytes | None,
) -> bytes:
    """The payload map in the order the Nitro security module writes it (definite-length)."""
    return cbor2.dumps(
        {
            "module_id": module_id,
            "digest": digest,
            "timestamp": timestamp,
            "pcrs": {int(k): bytes(v) for k, v in sorted(pcrs.items())},
            "certificate": certificate,
            "cabundle": list(cabundle),
            "public_key": public_key,
            "user_data": user_data,
            "nonce": nonce,
        }
    )


def _decode(data: bytes, field_name: str) -> Any:
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, max_depth=_MAX_DEPTH).decode()
    except cbor2.CBORDecodeEOF:
        raise EvidenceTruncated(
            f"nitro: {field_name} ends early (CBOR)", field=field_name, kind="nitro"
        ) from None
    except Exception as exc:  # cbor2 raises CBORDecodeError, but semantic tags can raise anything
        raise EvidenceError(
            f"nitro: {field_name} is not valid CBOR ({exc})", field=field_name, kind="nitro"
        ) from None
    if stream.tell() != len(data):
        raise EvidenceError(
            f"nitro: {len(data) - stream.tell()} bytes follow the CBOR item in {field_name}",
            field=field_name,
            kind="nitro",
        )
    return value


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise EvidenceError(f"nitro: {field_name} {message}", field=field_name, kind="nitro")


def parse_attestation_document(data: bytes) -> AttestationDocument:
    """Decode a COSE_Sign1 attestation document; raises E801-E803 naming the offending field."""
    data = bytes(data)
    if not data:
        raise EvidenceTruncated("nitro: empty document", field="cose_sign1", kind="nitro")
    top = _decode(data, "cose_sign1")
    tagged = False
    if isinstance(top, cbor2.CBORTag):
        _require(top.tag == COSE_SIGN1_TAG, "tag", f"is {top.tag}, COSE_Sign1 is {COSE_SIGN1_TAG}")
        top, tagged = top.value, True
    _require(isinstance(top, (list, tuple)) and len(top) == 4, "cose_sign1", "must be an array of 4 items")
    protected, unprotected, payload, signature = top
    _require(isinstance(protected, bytes), "protected", "must be a byte string")
    _require(isinstance(unprotected, Mapping), "unprotected", "must be a map")
    _require(isinstance(payload, bytes), "payload", "must be a byte string (detached payloads are not used)")
    _require(isinstance(signature, bytes), "signature", "must be a byte string")
    headers = _decode(protected, "protected") if protected else {}
    _require(isinstance(headers, Mapping), "protected", "must encode a map")
    algorithm = headers.get(1)
    if algorithm != ALG_ES384:
        raise EvidenceUnsupported(
            f"nitro: COSE algorithm {algorithm!r}, only ES384 (-35) is supported",
            field="protected",
            kind="nitro",
        )
    body = _decode(payload, "payload")
    _require(isinstance(body, Mapping), "payload", "must encode a map")
    for name in _REQUIRED:
        _require(name in body, name, "is missing from the payload")
    _require(
        type(body["module_id"]) is str and body["module_id"] != "", "module_id", "must be non-empty text"
    )
    _require(type(body["digest"]) is str, "digest", "must be text")
    _require(
        type(body["timestamp"]) is int and body["timestamp"] >= 0, "timestamp", "must be an unsigned integer"
    )
    pcrs = body["pcrs"]
    _require(isinstance(pcrs, Mapping) and 0 < len(pcrs) <= 32, "pcrs", "must be a map of 1..32 entries")
    for index, value in pcrs.items():
        _require(type(index) is int and 0 <= index < 32, "pcrs", f"index {index!r} is not 0..31")
        _require(isinstance(value, bytes), f"pcrs.{index}", "must be a byte string")
    _require(
        isinstance(body["certificate"], bytes) and body["certificate"], "certificate", "must be a byte string"
    )
    cabundle = body["cabundle"]
    _require(isinstance(cabundle, (list, tuple)) and cabundle, "cabundle", "must be a non-empty array")
    for position, cert in enumerate(cabundle):
        _require(isinstance(cert, bytes) and cert, f"cabundle.{position}", "must be a byte string")
    optional: dict[str, bytes | None] = {}
    for name in _OPTIONAL:
        value = body.get(name)
        _require(value is None or isinstance(value, bytes), name, "must be a byte string or null")
        _require(
            value is None or len(value) <= MAX_OPTIONAL_FIELD,
            name,
            f"is longer than {MAX_OPTIONAL_FIELD} bytes",
        )
        optional[name] = value
    extra = {k: v for k, v in body.items() if k not in _REQUIRED + _OPTIONAL}
    return AttestationDocument(
        protected=protected,
        unprotected=unprotected,
        payload=payload,
        signature=signature,
        tagged=tagged,
        algorithm=algorithm,
        module_id=body["module_id"],
        digest=body["digest"],
        timestamp=body["timestamp"],
        pcrs=dict(pcrs),
        certificate=body["certificate"],
        cabundle=tuple(cabundle),
        extra=extra,
        **optional,
    )


def looks_like_nitro(data: bytes) -> bool:
    # untagged array of 4, or tag 18 followed by one
    return data[:1] == b"\x84" or data[:2] == b"\xd2\x84"
