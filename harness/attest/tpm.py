"""vTPM evidence: a quote, its signature, the PCR values, the event log and the certificates that make the
AK trustworthy (the EK certificate from TPM NV, the AK certificate the lab AK CA issued after credential
activation), as one JSON document with ``"format": "teelab-tpm-evidence/1"`` first."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.attest.errors import EvidenceError

FORMAT = "teelab-tpm-evidence/1"
PREFIX = b'{"format": "teelab-tpm-evidence/'
MAX_EVENTS = 1024


@dataclass(frozen=True)
class TpmEvidence:
    ek_certificate: bytes  # DER
    ak_certificate: bytes  # DER
    ak_public: bytes  # TPMT_PUBLIC
    quote: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcrs: Mapping[int, bytes]
    event_log: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    tee_evidence: bytes = b""  # a CVM's SNP report binding the nonce and the AK, when the quote came with one
    tee_certificates: bytes = b""  # its certificate table (VCEK, ASK, ARK)

    def to_bytes(self) -> bytes:
        tee = {"tee_evidence": _b64(self.tee_evidence), "tee_certificates": _b64(self.tee_certificates)}
        return json.dumps(
            {
                "format": FORMAT,
                "ek_certificate": _b64(self.ek_certificate),
                "ak_certificate": _b64(self.ak_certificate),
                "ak_public": _b64(self.ak_public),
                "quote": _b64(self.quote),
                "signature": _b64(self.signature),
                "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
                "event_log": list(self.event_log),
                **(tee if self.tee_evidence else {}),
            }
        ).encode()


def looks_like_tpm(data: bytes) -> bool:
    return bytes(data[: len(PREFIX)]) == PREFIX


def parse_tpm_evidence(data: bytes) -> TpmEvidence:
    """Decode the JSON document; EvidenceError names the first field that is wrong."""
    try:
        doc = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvidenceError(f"TPM evidence is not JSON: {exc}", field="evidence") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EvidenceError(f"TPM evidence must be an object with format {FORMAT!r}", field="format")
    values = {name: _unb64(doc, name) for name in ("ek_certificate", "ak_certificate", "ak_public", "quote")}
    pcrs_doc = doc.get("pcrs")
    if not isinstance(pcrs_doc, dict):
        raise EvidenceError("pcrs must map PCR indexes to hex values", field="pcrs")
    pcrs = {}
    for key, value in pcrs_doc.items():
        try:
            index, digest = int(key), bytes.fromhex(value)
        except (ValueError, TypeError):
            raise EvidenceError(f"pcrs[{key!r}] is not index = hex", field="pcrs") from None
        if not 0 <= index < 24 or len(digest) != 32:
            raise EvidenceError(f"pcrs[{key}] is not a SHA-256 PCR 0..23", field=f"pcr{key}")
        pcrs[index] = digest
    events = doc.get("event_log", [])
    if (
        not isinstance(events, list)
        or len(events) > MAX_EVENTS
        or not all(isinstance(e, dict) for e in events)
    ):
        raise EvidenceError(f"event_log must be a list of at most {MAX_EVENTS} objects", field="event_log")
    tee = {name: _unb64(doc, name) for name in ("tee_evidence", "tee_certificates") if name in doc}
    return TpmEvidence(
        signature=_unb64(doc, "signature"), pcrs=pcrs, event_log=tuple(events), **values, **tee
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(doc: Mapping[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str):
        raise EvidenceError(f"{name} is missing or not base64 text", field=name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"{name} is not base64", field=name) from None
