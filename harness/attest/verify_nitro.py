"""Verify an attestation document: chain to the Nitro (or lab) root at the document's timestamp, COSE ES384
over the Sig_structure, digest, PCR lengths, debug mode, PCRs, module id, key/nonce/user data, freshness."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography.hazmat.primitives import hashes

from harness.attest.certs import Cert, build_chain, load_cert
from harness.attest.checks import (
    CLOCK_SKEW,
    Findings,
    all_zero,
    check_chain,
    check_claims,
    check_nonce_book,
    check_value,
    ecdsa_verify,
    hexed,
    malformed_verdict,
    raw_rs,
    trust_material,
)
from harness.attest.errors import EvidenceError
from harness.attest.nitro import AttestationDocument, parse_attestation_document
from harness.attest.policy import Policy
from harness.attest.verdict import Verdict

PCR_SIZE = 48
ES384_SIGNATURE_SIZE = 96  # r || s, 48 bytes each
DEBUG_PCRS = (0, 1, 2)


def document_debug(doc: AttestationDocument) -> bool:
    """A debug-mode enclave attests with all-zero PCR0, PCR1 and PCR2."""
    return all_zero([doc.pcrs.get(i, b"") for i in DEBUG_PCRS])


def nitro_claims(doc: AttestationDocument) -> dict[str, Any]:
    """The document's facts as JSON-ready claims (documented in docs/attestation.md)."""
    return {
        "kind": "nitro",
        "module_id": doc.module_id,
        "digest": doc.digest,
        "timestamp": doc.timestamp,
        "pcrs": {str(k): v.hex() for k, v in sorted(doc.pcrs.items())},
        "debug": document_debug(doc),
        "public_key": hexed(doc.public_key),
        "user_data": hexed(doc.user_data),
        "nonce": hexed(doc.nonce),
    }


def _load(found: Findings, der: bytes, field: str) -> Cert | None:
    """The certificate, or None with the reason it cannot be read: every unreadable one is named."""
    try:
        return load_cert(der, field=field)
    except EvidenceError as err:
        found.fail("malformed", err.field, err.message)
        return None


def verify_nitro(data: bytes, policy: Policy, *, now: dt.datetime) -> Verdict:
    try:
        doc = parse_attestation_document(data)
    except EvidenceError as err:
        return malformed_verdict("nitro", err)
    found = Findings()
    claims = nitro_claims(doc)
    try:
        issued = dt.datetime.fromtimestamp(doc.timestamp / 1000, dt.UTC)
    except (ValueError, OverflowError, OSError):
        bad = EvidenceError(f"timestamp {doc.timestamp} ms is not a date", field="timestamp")
        return malformed_verdict("nitro", bad)
    root = _check_signed(found, doc, policy, issued)
    _check_contents(found, doc, policy, claims)
    _check_age(found, policy, issued, now)
    check_claims(found, policy.claims, claims)
    return found.verdict("nitro", root, claims)


def _check_signed(
    found: Findings, doc: AttestationDocument, policy: Policy, issued: dt.datetime
) -> str | None:
    """The certificate's chain to a root the policy trusts (at the document's time) and the COSE signature;
    the root's name, or None."""
    anchors, _ = trust_material(policy)
    leaf = _load(found, doc.certificate, "certificate")
    loaded = (_load(found, der, f"cabundle.{index}") for index, der in enumerate(doc.cabundle))
    pool = [cert for cert in loaded if cert is not None]
    if leaf is None:
        return None
    chain = build_chain(leaf, pool, anchors, field="cabundle", leaf_field="certificate")
    root = check_chain(found, chain, "nitro", policy, at=issued, field="cabundle")
    if chain.anchor is not None and doc.cabundle[0] != chain.anchor.cert.der:
        found.fail("chain-invalid", "cabundle.0", "cabundle[0] is not the root certificate the chain ends at")
    if len(doc.signature) != ES384_SIGNATURE_SIZE or not ecdsa_verify(
        leaf, raw_rs(doc.signature), doc.sig_structure(), hashes.SHA384()
    ):
        found.fail(
            "signature-invalid",
            "signature",
            "the COSE_Sign1 signature does not verify with the certificate's key (ES384)",
        )
    return root


def _check_contents(
    found: Findings, doc: AttestationDocument, policy: Policy, claims: dict[str, Any]
) -> None:
    """Digest, PCR lengths, debug mode, and each value the policy pins (PCRs, module, key, data, nonce)."""
    if doc.digest != "SHA384":
        found.fail("digest-unsupported", "digest", f"digest is {doc.digest!r}; documents use SHA384")
    for index, value in sorted(doc.pcrs.items()):
        if len(value) != PCR_SIZE:
            found.fail(
                "pcr-length", f"pcrs.{index}", f"PCR{index} is {len(value)} bytes, SHA384 gives {PCR_SIZE}"
            )
    if claims["debug"] and not policy.allow_debug:
        found.fail("debug-not-allowed", "pcrs", "PCR0-2 are all zero: a debug-mode enclave")
    for index, expected in sorted(policy.pcrs.items()):
        check_value(found, "pcr-mismatch", f"pcrs.{index}", expected, doc.pcrs.get(index))
    if policy.module_id is not None and doc.module_id != policy.module_id:
        found.fail(
            "module-id-mismatch",
            "module_id",
            f"module_id is {doc.module_id!r}, expected {policy.module_id!r}",
        )
    check_value(found, "public-key-mismatch", "public_key", policy.public_key, doc.public_key)
    check_value(found, "user-data-mismatch", "user_data", policy.user_data, doc.user_data)
    check_value(found, "nonce-mismatch", "nonce", policy.nonce, doc.nonce)
    check_nonce_book(found, policy, doc.nonce)


def _check_age(found: Findings, policy: Policy, issued: dt.datetime, now: dt.datetime) -> None:
    if policy.max_age is None:
        return
    if now - issued > policy.max_age:
        found.fail(
            "evidence-stale",
            "timestamp",
            f"the document is from {issued.isoformat()}, over {policy.max_age} before {now.isoformat()}",
        )
    elif issued - now > CLOCK_SKEW:
        found.fail(
            "timestamp-in-future",
            "timestamp",
            f"the document is from {issued.isoformat()}, after {now.isoformat()}",
        )
