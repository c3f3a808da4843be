"""Verify an SGX quote: the DCAP checks it shares with TDX (PCK chain, QE report, binding, quote signature,
collateral), then the enclave: DEBUG, MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN and report_data."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from harness.attest.checks import (
    Findings,
    check_claims,
    check_report_data_binding,
    check_value,
    malformed_verdict,
)
from harness.attest.dcap import check_quote, check_quote_collateral
from harness.attest.errors import EvidenceError
from harness.attest.lab import LabCertificates
from harness.attest.policy import Policy
from harness.attest.sgx import SgxQuote, flags, parse_sgx_quote
from harness.attest.verdict import Verdict


def sgx_claims(quote: SgxQuote) -> dict[str, Any]:
    """The quote's facts as JSON-ready claims under the report's field names (docs/attestation.md)."""
    header, body = quote.header, quote.body
    claims: dict[str, Any] = {
        "kind": "sgx",
        "version": header.version,
        "att_key_type": header.att_key_type,
        "tee_type": header.tee_type,
        "pce_svn": header.pce_svn,
        "qe_svn": header.qe_svn,
        "qe_vendor_id": header.qe_vendor_id.hex(),
        "user_data": header.user_data.hex(),
    }
    claims.update(
        {
            f.name: value.hex() if isinstance(value, bytes) else value
            for f in fields(body)
            if not f.name.startswith("reserved")
            for value in (getattr(body, f.name),)
        }
    )
    claims.update(
        debug=quote.debug,
        flags=flags(body),
        tcb={"cpu_svn": body.cpu_svn.hex(), "status": None},
        attestation_key=quote.attestation_key.hex(),
        qe_report={k: v for k, v in quote.qe_report.to_dict().items() if not k.startswith("reserved")},
        qe_auth_data=quote.qe_auth_data.hex(),
        trailing_bytes=len(quote.trailer),
    )
    return claims


def verify_sgx(
    data: bytes, policy: Policy, *, now: dt.datetime, collateral: Mapping[str, Any] | None = None
) -> Verdict:
    try:
        quote = parse_sgx_quote(data)
    except EvidenceError as err:
        return malformed_verdict("sgx", err)
    found = Findings()
    claims = sgx_claims(quote)
    trust = check_quote(found, quote, data, policy, now)
    body = quote.body
    if quote.debug and not policy.allow_debug:
        found.fail("debug-not-allowed", "attributes", "the enclave runs in debug mode (ATTRIBUTES.DEBUG)")
    check_value(found, "mrenclave-mismatch", "mrenclave", policy.mrenclave, body.mrenclave)
    check_value(found, "mrsigner-mismatch", "mrsigner", policy.mrsigner, body.mrsigner)
    if policy.isv_prod_id is not None and body.isv_prod_id != policy.isv_prod_id:
        found.fail(
            "isv-prod-id-mismatch",
            "isv_prod_id",
            f"ISVPRODID is {body.isv_prod_id}, the policy expects {policy.isv_prod_id}",
        )
    if policy.min_isv_svn is not None and body.isv_svn < policy.min_isv_svn:
        found.fail(
            "isv-svn-too-low",
            "isv_svn",
            f"ISVSVN is {body.isv_svn}, the policy needs at least {policy.min_isv_svn}",
        )
    tcb = check_quote_collateral(
        found, quote, trust, policy, now, collateral, LabCertificates.sgx_collateral, "SGX"
    )
    if tcb is not None:
        claims["tcb"] = tcb
    # after the collateral: a quote from a revoked PCK is not authentic and must not use up its nonce
    check_report_data_binding(found, policy, body.report_data, claims)
    if policy.max_age is not None:
        found.note("SGX quotes carry no time; max_age is not applied (freshness comes from the nonce)")
    check_claims(found, policy.claims, claims)
    return found.verdict("sgx", trust.root, claims)
