"""Verify an SGX quote: the DCAP checks it shares with TDX (PCK chain, QE report, binding, quote signature,
collateral), then the enclave: DEBUG, MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN and report_data."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from harness.attest.checks import (
    Findings,
    check_value,
    malformed_verdict,
)
from harness.attest.dcap import check_quote, finish_quote, header_claims, signature_claims
from harness.attest.errors import EvidenceError
from harness.attest.lab_certificates import LabCertificates
from harness.attest.policy import Policy
from harness.attest.sgx import SgxQuote, flags, parse_sgx_quote
from harness.attest.verdict import Verdict


def sgx_claims(quote: SgxQuote) -> dict[str, Any]:
    """The quote's facts as JSON-ready claims under the report's field names (docs/attestation.md)."""
    body = quote.body
    claims = header_claims(quote, "sgx")
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
    )
    return claims | signature_claims(quote)


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
    finish_quote(
        found, quote, trust, policy, now, collateral, LabCertificates.sgx_collateral, body.report_data, claims
    )
    return found.verdict("sgx", trust.root, claims)
