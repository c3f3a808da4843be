"""The checks TDX and SGX quotes share (Intel DCAP, ECDSA P-256): the PCK chain to the Intel (or lab) root,
the QE report signed by the PCK, the QE's binding of the attestation key, the quote signature, and the rule
that a quote without collateral is refused unless the policy allows it."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from harness.attest.certs import PEM_CERTIFICATES, Anchor, Cert, build_chain, load_pem_certs
from harness.attest.checks import (
    Findings,
    check_chain,
    check_claims,
    check_report_data_binding,
    ecdsa_verify,
    raw_rs,
    trust_material,
)
from harness.attest.collateral import check_collateral
from harness.attest.errors import EvidenceError
from harness.attest.lab_certificates import LabCertificates
from harness.attest.policy import Policy
from harness.attest.sgx import SgxQuote
from harness.attest.tdx import INTEL_QE_VENDOR_ID, SignedQuote, TdxQuote


@dataclass(frozen=True)
class QuoteTrust:
    """Where the quote's PCK chain led: root name, anchor, the carried chain, and the trust material."""

    root: str | None
    anchor: Anchor | None
    pck_chain: tuple[Cert, ...]
    lab: LabCertificates | None
    anchors: tuple[Anchor, ...]


def check_quote(
    found: Findings, quote: SignedQuote, data: bytes, policy: Policy, now: dt.datetime
) -> QuoteTrust:
    """PCK chain, QE report signature and vendor, QE binding of the attestation key, quote signature."""
    trust = _check_pck_chain(found, quote, policy, now)
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(binding, quote.qe_report.report_data):
        found.fail(
            "qe-binding-invalid",
            "qe_report.report_data",
            "the QE report does not bind SHA-256(attestation key || QE auth data)",
        )
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attestation_key)
    except ValueError:
        found.fail("signature-invalid", "attestation_key", "the attestation key is not a P-256 point")
    else:
        signed = data[: len(quote.signed_bytes())]
        if not ecdsa_verify(key, raw_rs(quote.signature), signed, hashes.SHA256()):
            found.fail(
                "signature-invalid",
                "signature",
                "the quote signature does not verify with the attestation key",
            )
    return trust


def _check_pck_chain(found: Findings, quote: SignedQuote, policy: Policy, now: dt.datetime) -> QuoteTrust:
    """The PCK chain to a root, the QE report signed by the PCK, Intel's QE vendor under Intel's root."""
    anchors, lab = trust_material(policy)
    root = anchor = None
    try:
        pck_chain = load_pem_certs(quote.pck_chain_pem, field="pck_chain")
        if not pck_chain:
            found.fail("certificate-missing", "pck_chain", "the quote carries no PCK certificate")
        elif not PEM_CERTIFICATES.fullmatch(quote.pck_chain_pem):
            found.fail(
                "malformed", "pck_chain", "the PCK chain holds more than PEM certificates and whitespace"
            )
    except EvidenceError as err:
        found.fail("malformed", err.field, err.message)
        pck_chain = ()
    if pck_chain:
        pck = pck_chain[0]
        pool = list(pck_chain[1:]) + (list(lab.intermediates()) if lab is not None else [])
        chain = build_chain(pck, pool, anchors, field="pck_chain")
        root = check_chain(found, chain, "tdx", policy, at=now, field="pck_chain")  # "tdx": Intel DCAP roots
        anchor = chain.anchor
        on_chain = {c.fingerprint for c in chain.certs}
        for extra in (c for c in pck_chain if c.fingerprint not in on_chain):
            found.fail(
                "chain-invalid",
                "pck_chain",
                f"the quote carries {extra.subject_text}, which is not on the PCK certificate's chain "
                "(a carried root must be the trusted root itself)",
            )
        if not ecdsa_verify(
            pck, raw_rs(quote.qe_report_signature), quote.qe_report.to_bytes(), hashes.SHA256()
        ):
            found.fail(
                "qe-signature-invalid",
                "qe_report_signature",
                "the QE report signature does not verify with the PCK certificate's key",
            )
        if root == "intel-sgx" and quote.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
            found.fail(
                "qe-vendor-unknown",
                "qe_vendor_id",
                f"QE vendor {quote.header.qe_vendor_id.hex()} is not Intel's quoting enclave",
            )
    return QuoteTrust(root, anchor, tuple(pck_chain), lab, anchors)


def check_quote_collateral(
    found: Findings,
    quote: TdxQuote | SgxQuote,
    trust: QuoteTrust,
    policy: Policy,
    now: dt.datetime,
    collateral: Mapping[str, Any] | None,
    lab_collateral: Callable[[LabCertificates], Mapping[str, Any] | None],
    kind: str,
) -> dict[str, Any] | None:
    """The collateral checks, or ``collateral-missing``; returns the TCB claims when collateral was checked.
    A quote chained to the lab root, under a policy trusting the lab, gets ``lab_collateral(lab)``."""
    lab = trust.lab
    if collateral is None and lab is not None and trust.anchor in lab.anchors() and policy.trusts_lab:
        collateral = lab_collateral(lab)  # lab quotes have lab collateral; vendor quotes never get it
    if collateral is None and trust.root is not None and trust.root not in policy.roots:
        return None  # refused for its root already: collateral for it could change nothing
    if collateral is None:
        if policy.allow_missing_collateral:
            found.note(f"no {kind} collateral given: TCB status, QE identity and revocation were not checked")
        else:
            found.fail(
                "collateral-missing",
                "collateral",
                f"no {kind} collateral: TCB status, QE identity and revocation cannot be checked (give Intel "
                "PCS collateral, or allow_missing_collateral = true in the policy)",
            )
        return None
    if not trust.pck_chain:
        return None
    return check_collateral(
        found, quote, trust.pck_chain, collateral, trust.anchors, trust.anchor, policy, now
    )


def header_claims(quote: SignedQuote, kind: str) -> dict[str, Any]:
    """The quote header's fields as claims, after ``kind``."""
    return {"kind": kind, **quote.header_dict()}


def signature_claims(quote: SignedQuote) -> dict[str, Any]:
    """The attestation key, the QE report (but its reserved fields), QE auth data and the trailer's count."""
    return {
        "attestation_key": quote.attestation_key.hex(),
        "qe_report": {k: v for k, v in quote.qe_report.to_dict().items() if not k.startswith("reserved")},
        "qe_auth_data": quote.qe_auth_data.hex(),
        "trailing_bytes": len(quote.trailer),
    }


def finish_quote(
    found: Findings,
    quote: TdxQuote | SgxQuote,
    trust: QuoteTrust,
    policy: Policy,
    now: dt.datetime,
    collateral: Mapping[str, Any] | None,
    lab_collateral: Callable[[LabCertificates], Mapping[str, Any] | None],
    report_data: bytes,
    claims: dict[str, Any],
) -> None:
    """Collateral (its TCB claims into ``claims["tcb"]``), then report_data against the policy's binding and
    nonce book (after the collateral: a quote from a revoked PCK is not authentic and must not use up its
    nonce), and the pinned claims."""
    kind = str(claims["kind"]).upper()
    tcb = check_quote_collateral(found, quote, trust, policy, now, collateral, lab_collateral, kind)
    if tcb is not None:
        claims["tcb"] = tcb
    check_report_data_binding(found, policy, report_data, claims)
    if policy.max_age is not None:
        found.note(f"{kind} quotes carry no time; max_age is not applied (freshness comes from the nonce)")
    check_claims(found, policy.claims, claims)
