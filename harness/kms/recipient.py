"""Recipient evidence: parse the request's Recipient, verify it with harness.attest, bind the recipient key.

A Recipient is ``{"AttestationDocument": b64, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}`` for an enclave
attestation document (which carries the public key and nonce), and additionally ``"PublicKey": b64 DER`` and
``"Nonce": b64`` for an SNP report or TDX quote, whose report_data must equal
``teelab_guest.binding.report_data(nonce, public_key)``; SNP evidence may add ``"Certificates": b64`` (the
guest's certificate table, or VCEK DER/PEM).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teelab_guest.kms_envelope import KEY_ENCRYPTION_ALGORITHM, EnvelopeError, load_recipient_key

from harness.kms.errors import EvidenceMalformed, EvidenceRefused, KmsRequestError
from harness.kms.policy import DEBUG_KEY, ROOT_KEY

MAX_EVIDENCE_BYTES = 32768


@dataclass(frozen=True)
class Recipient:
    evidence: bytes
    public_key: bytes | None  # given beside SNP/TDX evidence
    nonce: bytes | None
    certificates: tuple[bytes, ...] = ()  # SNP VCEK/VLEK (DER, PEM or a GHCB certificate table)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.evidence).hexdigest()


@dataclass(frozen=True)
class Attested:
    """Verified evidence reduced to what the KMS needs."""

    kind: str  # "nitro" | "snp" | "tdx"
    root: str
    vendor_root: bool
    debug: bool
    public_key: bytes  # the recipient's SubjectPublicKeyInfo DER
    nonce: bytes | None
    timestamp_ms: int | None  # enclave documents only
    conditions: dict[str, Any] = field(default_factory=dict)  # lower-case condition key -> value


# (evidence, recipient, roots the caller's policy accepts, now) -> Attested; raises EvidenceRefused/Malformed.
Verifier = Callable[[Recipient, frozenset[str], float], Attested]


def parse_recipient(raw: Any) -> Recipient:
    """Check the Recipient object's shape; ValidationException (or EvidenceMalformed) says what is wrong."""
    if not isinstance(raw, dict):
        raise KmsRequestError("Recipient must be an object")
    unknown = set(raw) - {
        "AttestationDocument",
        "KeyEncryptionAlgorithm",
        "PublicKey",
        "Nonce",
        "Certificates",
    }
    if unknown:
        raise KmsRequestError(f"Recipient has unknown fields {sorted(unknown)}")
    algorithm = raw.get("KeyEncryptionAlgorithm")
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise KmsRequestError(
            f"Recipient.KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}", given=str(algorithm)[:64]
        )
    evidence = _b64(raw.get("AttestationDocument"), "Recipient.AttestationDocument", MAX_EVIDENCE_BYTES)
    if evidence is None:
        raise KmsRequestError("Recipient.AttestationDocument is required")
    public_key = _b64(raw.get("PublicKey"), "Recipient.PublicKey", 4096)
    nonce = _b64(raw.get("Nonce"), "Recipient.Nonce", 1024)
    certificates = _b64(raw.get("Certificates"), "Recipient.Certificates", MAX_EVIDENCE_BYTES)
    if public_key is not None:
        try:
            load_recipient_key(public_key)
        except EnvelopeError as exc:
            raise EvidenceMalformed(f"Recipient.PublicKey: {exc}") from None
    return Recipient(evidence, public_key, nonce, (certificates,) if certificates else ())


def _b64(value: Any, name: str, limit: int) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KmsRequestError(f"{name} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsRequestError(f"{name} is not valid base64") from None
    if not data or len(data) > limit:
        raise KmsRequestError(f"{name} must be 1..{limit} bytes", length=len(data))
    return data


def base_conditions(attested: Attested) -> dict[str, Any]:
    """The condition keys every kind of evidence sets."""
    return {
        ROOT_KEY.lower(): attested.root,
        DEBUG_KEY.lower(): attested.debug,
        "teelab:recipientattestation:kind": attested.kind,
    }


def refuse(message: str, **evidence: Any) -> EvidenceRefused:
    return EvidenceRefused(
        message, hint="see the audit log (teelab kms audit) for the verifier's reasons", **evidence
    )
