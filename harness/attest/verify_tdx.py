"""Verify a TDX quote: PCK chain to the Intel (or lab) root, QE report signed by the PCK, the QE's binding of
the attestation key, the quote signature, TD attributes, reference values, and TCB status from collateral."""

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
from harness.attest.tdx import TdxQuote, parse_tdx_quote
from harness.attest.verdict import Verdict

_RTMR_FIELDS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")


def tdx_claims(quote: TdxQuote) -> dict[str, Any]:
    """The quote's facts as JSON-ready claims under the quote's field names, plus derived ones
    (documented in docs/attestation.md)."""
    body = quote.body
    claims = header_claims(quote, "tdx")
    if quote.body_type is not None:
        claims["body_type"] = quote.body_type
    claims.update(
        {f.name: getattr(body, f.name).hex() for f in fields(body) if getattr(body, f.name) is not None}
    )
    claims.update(
        rtmrs=[r.hex() for r in body.rtmrs],
        debug=body.debug,
        tcb={"tee_tcb_svn": body.tee_tcb_svn.hex(), "status": None},
    )
    return claims | signature_claims(quote)


def verify_tdx(
    data: bytes, policy: Policy, *, now: dt.datetime, collateral: Mapping[str, Any] | None = None
) -> Verdict:
    try:
        quote = parse_tdx_quote(data)
    except EvidenceError as err:
        return malformed_verdict("tdx", err)
    found = Findings()
    claims = tdx_claims(quote)
    trust = check_quote(found, quote, data, policy, now)
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
    finish_quote(
        found,
        quote,
        trust,
        policy,
        now,
        collateral,
        LabCertificates.tdx_collateral,
        quote.body.report_data,
        claims,
    )
    return found.verdict("tdx", trust.root, claims)
