"""``verify(evidence, policy)``: detect the format, run every check of that kind, return a Verdict."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from harness.attest.checks import evidence_time, malformed_verdict
from harness.attest.errors import EvidenceTruncated, UnknownEvidenceFormat
from harness.attest.nitro import AttestationDocument, looks_like_nitro, parse_attestation_document
from harness.attest.policy import Policy
from harness.attest.sgx import SgxQuote, looks_like_sgx, parse_sgx_quote
from harness.attest.snp import REPORT_SIZE, SnpReport, looks_like_snp, parse_snp_report
from harness.attest.tdx import TdxQuote, looks_like_tdx, parse_tdx_quote
from harness.attest.tpm import looks_like_tpm
from harness.attest.verdict import Reason, Verdict
from harness.attest.verify_nitro import verify_nitro
from harness.attest.verify_sgx import verify_sgx
from harness.attest.verify_snp import verify_snp
from harness.attest.verify_tdx import verify_tdx
from harness.attest.verify_tpm import verify_tpm

KINDS = ("snp", "tdx", "sgx", "nitro")


def detect_kind(evidence: bytes) -> str:
    """ "snp", "tdx" or "nitro" from the first bytes; raises E802/E804 when it cannot tell."""
    data = bytes(evidence[:8])
    if looks_like_tpm(evidence):
        return "tpm"  # vTPM evidence (quote, event log, EK and AK certificates): docs/tpm.md
    if looks_like_nitro(data):
        return "nitro"
    if len(evidence) == REPORT_SIZE and looks_like_snp(data):
        return "snp"  # TDX quotes are never 1184 bytes (at least 1226)
    if looks_like_sgx(data):
        return "sgx"  # before TDX: a v4 quote with tee_type 0 is SGX
    if looks_like_tdx(data):
        return "tdx"
    if looks_like_snp(data):
        return "snp"
    if len(evidence) < 4:
        raise EvidenceTruncated(
            f"{len(evidence)} bytes are too few to be evidence of any kind", field="evidence"
        )
    raise UnknownEvidenceFormat(
        f"evidence starting {data[:4].hex()} is not an SNP report (u32 version 2-5), a TDX quote "
        "(04 00 02 00 or 05 00 02 00) or a COSE_Sign1 (84 or d2 84)",
        field="evidence",
    )


def parse(evidence: bytes, kind: str | None = None) -> SnpReport | TdxQuote | SgxQuote | AttestationDocument:
    """Decode evidence of ``kind`` (detected when None); raises E8xx errors that name the field."""
    kind = kind or detect_kind(evidence)
    if kind == "snp":
        return parse_snp_report(evidence)
    if kind == "tdx":
        return parse_tdx_quote(evidence)
    if kind == "sgx":
        return parse_sgx_quote(evidence)
    if kind == "nitro":
        return parse_attestation_document(evidence)
    raise UnknownEvidenceFormat(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}", field="kind")


def verify(
    evidence: bytes,
    policy: Policy,
    *,
    now: dt.datetime | None = None,
    kind: str | None = None,
    certificates: Sequence[bytes] | bytes = (),
    collateral: Mapping[str, Any] | None = None,
) -> Verdict:
    """Verify ``evidence`` against ``policy``. Never raises for bad evidence: every failed check is a Reason.

    ``now`` pins the time certificates must be valid at (default: now; Nitro documents are checked at their
    own timestamp). ``certificates`` adds certificates the evidence does not carry: the SNP VCEK/VLEK
    (and ASK) as DER, PEM or a GHCB certificate table. ``collateral`` is Intel PCS collateral for TDX quotes
    (tcb_info, qe_identity, CRLs and their issuer chains, as in Phala's dcap-qvl JSON).
    """
    if isinstance(certificates, (bytes, bytearray)):
        certificates = [bytes(certificates)]
    evidence = bytes(evidence)
    at = evidence_time(now)
    try:
        kind = kind or detect_kind(evidence)
    except (UnknownEvidenceFormat, EvidenceTruncated) as err:
        return malformed_verdict("unknown", err)
    if kind == "snp":
        verdict = verify_snp(evidence, policy, now=at, certificates=certificates)
    elif kind == "tdx":
        verdict = verify_tdx(evidence, policy, now=at, collateral=collateral)
    elif kind == "sgx":
        verdict = verify_sgx(evidence, policy, now=at, collateral=collateral)
    elif kind == "nitro":
        verdict = verify_nitro(evidence, policy, now=at)
    elif kind == "tpm":
        verdict = verify_tpm(evidence, policy, now=at)
    else:
        return malformed_verdict("unknown", UnknownEvidenceFormat(f"unknown kind {kind!r}", field="kind"))
    foreign = foreign_pins(policy, kind)
    if not foreign:
        return verdict
    return replace(verdict, ok=False, reasons=(*verdict.reasons, *foreign))


# Reference values only one kind of evidence carries ("report_data": SNP and TDX). A policy that pins one was
# written for that kind: evidence of another kind cannot meet it, and must not pass because the pin is moot.
PINS_BY_KIND = {
    "snp": ("measurement", "host_data", "min_tcb", "report_data"),
    "tdx": ("mrtd", "rtmrs", "mrconfigid", "mrowner", "mrownerconfig", "report_data"),
    "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "min_isv_svn", "report_data"),
    "nitro": ("pcrs", "module_id", "user_data"),
    "tpm": ("pcrs", "measurement", "host_data", "min_tcb"),  # the SNP values of a CVM's report beside it
}


def foreign_pins(policy: Policy, kind: str) -> tuple[Reason, ...]:
    """A ``policy-kind-mismatch`` reason for each pinned value that evidence of ``kind`` does not carry."""
    carried = set(PINS_BY_KIND.get(kind, ()))
    pinned = {
        name
        for names in PINS_BY_KIND.values()
        for name in names
        if getattr(policy, name) not in (None, {}, ())  # an ISVPRODID of 0 is a pin too
    }
    return tuple(
        Reason("policy-kind-mismatch", name, f"the policy pins {name}, which {kind} evidence does not carry")
        for name in sorted(pinned - carried)
    )
