"""Verify a TDX quote: PCK chain to the Intel (or lab) root, QE report signed by the PCK, the QE's binding of
the attestation key, the quote signature, TD attributes, reference values, and TCB status from collateral."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from harness.attest.certs import PEM_CERTIFICATES, build_chain, load_pem_certs
from harness.attest.checks import (
    Findings,
    check_chain,
    check_claims,
    check_report_data_binding,
    check_value,
    ecdsa_verify,
    malformed_verdict,
    raw_rs,
    trust_material,
)
from harness.attest.collateral import check_collateral
from harness.attest.errors import EvidenceError
from harness.attest.policy import Policy
from harness.attest.tdx import INTEL_QE_VENDOR_ID, TdxQuote, parse_tdx_quote
from harness.attest.verdict import Verdict

_RTMR_FIELDS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")


def tdx_claims(quote: TdxQuote) -> dict[str, Any]:
    """The quote's facts as JSON-ready claims under the quote's field names, plus derived ones
    (documented in docs/attestation.md)."""
    header, body = quote.header, quote.body
    claims: dict[str, Any] = {
        "kind": "tdx",
        "version": header.version,
        "att_key_type": header.att_key_type,
        "tee_type": header.tee_type,
        "pce_svn": header.pce_svn,
        "qe_svn": header.qe_svn,
        "qe_vendor_id": header.qe_vendor_id.hex(),
        "user_data": header.user_data.hex(),
    }
    if quote.body_type is not None:
        claims["body_type"] = quote.body_type
    claims.update(
        {f.name: getattr(body, f.name).hex() for f in fields(body) if getattr(body, f.name) is not None}
    )
    claims.update(
        rtmrs=[r.hex() for r in body.rtmrs],
        debug=body.debug,
        tcb={"tee_tcb_svn": body.tee_tcb_svn.hex(), "status": None},
        attestation_key=quote.attestation_key.hex(),
        qe_report={k: v for k, v in quote.qe_report.to_dict().items() if not k.startswith("reserved")},
        qe_auth_data=quote.qe_auth_data.hex(),
        trailing_bytes=len(quote.trailer),
    )
    return claims


def verify_tdx(
    data: bytes, policy: Policy, *, now: dt.datetime, collateral: Mapping[str, Any] | None = None
) -> Verdict:
    try:
        quote = parse_tdx_quote(data)
    except EvidenceError as err:
        return malformed_verdict("tdx", err)
    found = Findings()
    claims = tdx_claims(quote)
    anchors, lab = trust_material(policy)
    root = quote_root = None
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
        root = check_chain(found, chain, "tdx", policy, at=now, field="pck_chain")
        quote_root = chain.anchor
        on_chain = {c.fingerprint for c in chain.certs}
        for extra in (c for c in pck_chain if c.fingerprint not in on_chain):
            found.fail(
                "chain-invalid",
                "pck_chain",
                f"the quote carries {extra.subject_text}, which is not on the PCK certificate's chain "
                "(a carried root must be the trusted root itself)",
            )
        qe_report = quote.qe_report.to_bytes()
        if not ecdsa_verify(pck, raw_rs(quote.qe_report_signature), qe_report, hashes.SHA256()):
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

    if quote.body.debug and not policy.allow_debug:
        found.fail("debug-not-allowed", "td_attributes", "the TD runs in debug mode (TD_ATTRIBUTES bit 0)")
    check_value(found, "mrtd-mismatch", "mrtd", policy.mrtd, quote.body.mrtd)
    for index, expected in sorted(policy.rtmrs.items()):
        check_value(found, "rtmr-mismatch", _RTMR_FIELDS[index], expected, quote.body.rtmrs[index])
    check_value(found, "mrconfigid-mismatch", "mrconfigid", policy.mrconfigid, quote.body.mrconfigid)
    check_value(found, "mrowner-mismatch", "mrowner", policy.mrowner, quote.body.mrowner)
    check_value(
        found, "mrownerconfig-mismatch", "mrownerconfig", policy.mrownerconfig, quote.body.mrownerconfig
    )
    if collateral is None and lab is not None and quote_root in lab.anchors() and policy.trusts_lab:
        collateral = lab.tdx_collateral()  # lab quotes have lab collateral; vendor quotes never get it
    if collateral is None and root is not None and root not in policy.roots:
        pass  # refused for its root already: collateral for it could change nothing
    elif collateral is None:
        if policy.allow_missing_collateral:
            found.note("no TDX collateral given: TCB status, QE identity and revocation were not checked")
        else:
            found.fail(
                "collateral-missing",
                "collateral",
                "no TDX collateral: TCB status, QE identity and revocation cannot be checked (give Intel "
                "PCS collateral, or allow_missing_collateral = true in the policy)",
            )
    elif pck_chain:
        claims["tcb"] = check_collateral(
            found, quote, pck_chain, collateral, anchors, quote_root, policy, now
        )
    # after the collateral: a quote from a revoked PCK is not authentic and must not use up its nonce
    check_report_data_binding(found, policy, quote.body.report_data, claims)
    if policy.max_age is not None:
        found.note("TDX quotes carry no time; max_age is not applied (freshness comes from the nonce)")
    check_claims(found, policy.claims, claims)
    return found.verdict("tdx", root, claims)
