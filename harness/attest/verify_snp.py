"""Verify an SEV-SNP report: VCEK/VLEK chain to an AMD (or lab) ARK, signature, TCB and chip id against the
certificate, guest policy bits, VMPL, minimum TCB and reference values."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes

from harness.attest.certs import Anchor, Cert, build_chain, load_any
from harness.attest.checks import (
    Findings,
    check_chain,
    check_claims,
    check_report_data_binding,
    check_value,
    ecdsa_verify,
    malformed_verdict,
    trust_material,
)
from harness.attest.errors import EvidenceError
from harness.attest.lab_certificates import LabCertificates
from harness.attest.policy import Policy
from harness.attest.roots import vendor_intermediates
from harness.attest.snp import (
    PLATFORM_SMT_EN,
    POLICY_SINGLE_SOCKET,
    SIGNATURE_ALGO_ECDSA_P384_SHA384,
    SIGNED_SIZE,
    SnpReport,
    parse_snp_report,
)
from harness.attest.verdict import Verdict

UNSIGNED_RESERVED = (
    0x330  # the signature structure's reserved tail: no signature covers it, so it must be zero
)


# Report fields that are claims under their own names; the rest are reserved (covered by the signature).
_CLAIMED = (
    "version",
    "guest_svn",
    "policy",
    "family_id",
    "image_id",
    "vmpl",
    "signature_algo",
    "current_tcb",
    "platform_info",
    "key_info",
    "report_data",
    "measurement",
    "host_data",
    "id_key_digest",
    "author_key_digest",
    "report_id",
    "report_id_ma",
    "reported_tcb",
    "chip_id",
    "committed_tcb",
    "current_build",
    "current_minor",
    "current_major",
    "committed_build",
    "committed_minor",
    "committed_major",
    "launch_tcb",
)


def snp_claims(report: SnpReport) -> dict[str, Any]:
    """The report's facts as JSON-ready claims under the report's field names, plus derived ones
    (documented in docs/attestation.md)."""
    fields = report.to_dict()
    claims: dict[str, Any] = {"kind": "snp", **{name: fields[name] for name in _CLAIMED}}
    if report.version >= 3:
        claims.update(
            cpuid_fam_id=report.cpuid_fam_id, cpuid_mod_id=report.cpuid_mod_id, cpuid_step=report.cpuid_step
        )
    if report.version >= 5:
        claims.update(
            launch_mit_vector=report.launch_mit_vector, current_mit_vector=report.current_mit_vector
        )
    claims.update(
        debug=report.debug,
        migrate_ma=report.migrate_ma,
        smt_allowed=report.smt_allowed,
        single_socket=bool(report.policy & POLICY_SINGLE_SOCKET),
        abi_major=(report.policy >> 8) & 0xFF,
        abi_minor=report.policy & 0xFF,
        signing_key=report.signing_key,
        mask_chip_key=report.mask_chip_key,
        smt_enabled=bool(report.platform_info & PLATFORM_SMT_EN),
        tcb=report.reported_tcb.to_dict(),
    )
    return claims


def _endorsement(candidates: Sequence[Cert], report: SnpReport) -> Cert | None:
    """The candidate certificate most likely to have signed ``report``: TCB and chip id match first."""

    def score(cert: Cert) -> int:
        amd = cert.amd
        assert amd is not None
        tcb_match = amd.tcb is not None and amd.tcb.components() == report.reported_tcb.components()
        return 2 * tcb_match + (amd.hwid == report.chip_id)

    return max(candidates, key=score, default=None)


def verify_snp(
    data: bytes, policy: Policy, *, now: dt.datetime, certificates: Sequence[bytes] = ()
) -> Verdict:
    try:
        report = parse_snp_report(data)
    except EvidenceError as err:
        return malformed_verdict("snp", err)
    found = Findings()
    claims = snp_claims(report)
    if report.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        found.fail(
            "signature-algo-unsupported",
            "signature_algo",
            f"signature_algo {report.signature_algo}; only 1 (ECDSA P-384 with SHA-384) is defined",
        )
    root = _check_signed(found, report, data, policy, now, certificates, claims)
    _check_guest_policy(found, report, policy)
    if policy.min_tcb is not None and not report.reported_tcb.at_least(policy.min_tcb):
        found.fail(
            "tcb-too-low",
            "reported_tcb",
            f"reported TCB {report.reported_tcb.components()} is below the minimum "
            f"{policy.min_tcb.components()}",
        )
    check_value(found, "measurement-mismatch", "measurement", policy.measurement, report.measurement)
    check_value(found, "host-data-mismatch", "host_data", policy.host_data, report.host_data)
    check_report_data_binding(found, policy, report.report_data, claims)
    if policy.max_age is not None:
        found.note("SNP reports carry no time; max_age is not applied (freshness comes from the nonce)")
    check_claims(found, policy.claims, claims)
    return found.verdict("snp", root, claims)


def _check_signed(
    found: Findings,
    report: SnpReport,
    data: bytes,
    policy: Policy,
    now: dt.datetime,
    certificates: Sequence[bytes],
    claims: dict[str, Any],
) -> str | None:
    """The report's endorsement (VCEK or VLEK, supplied or the lab's), its chain and the signature; the root's
    name, or None."""
    signer = report.signing_key
    anchors, lab = trust_material(policy)
    supplied: list[Cert] = []
    for index, blob in enumerate(certificates):
        try:
            supplied += load_any(blob, field=f"certificates[{index}]")
        except EvidenceError as err:
            found.fail("malformed", err.field, err.message)
    if signer not in ("vcek", "vlek"):
        found.fail(
            "signing-key-unsupported",
            "key_info",
            f"the report names signing key {signer!r}; only VCEK and VLEK signed reports can be verified",
        )
        return None
    candidates = [c for c in supplied if c.amd is not None and c.amd.signing_key == signer]
    if lab is not None and signer == "vcek":
        lab_vcek = lab.vcek(report.reported_tcb)
        # only for the lab's chip: another chip's report is not the lab's to endorse (nor to fail)
        if lab_vcek is not None and lab_vcek.amd is not None and lab_vcek.amd.hwid == report.chip_id:
            candidates.append(lab_vcek)
    endorsement = _endorsement(candidates, report)
    if endorsement is None:
        found.fail(
            "certificate-missing",
            signer,
            f"no {signer.upper()} certificate for this report (chip_id {report.chip_id.hex()[:16]}..., "
            f"TCB {report.reported_tcb.to_bytes().hex()}); pass it in certificates= "
            "(from the guest's certificate table or AMD's KDS)",
        )
        return None
    root = _check_endorsement(found, endorsement, report, data, policy, anchors, lab, supplied, now, signer)
    if endorsement.amd is not None and endorsement.amd.product:
        claims["product"] = endorsement.amd.product
    return root


def _check_guest_policy(found: Findings, report: SnpReport, policy: Policy) -> None:
    """What the guest's launch policy and the platform allow (debug, migration agent, SMT) and the VMPL the
    report was asked at, against what the verifier's policy accepts."""
    if report.debug and not policy.allow_debug:
        found.fail(
            "debug-not-allowed", "policy", "the guest policy allows debugging (bit 19); the policy refuses it"
        )
    if report.migrate_ma and not policy.allow_migrate_ma:
        found.fail(
            "migrate-ma-not-allowed",
            "policy",
            "the guest policy allows a migration agent (bit 18); the policy refuses it",
        )
    if not policy.allow_smt:
        if report.smt_allowed:
            found.fail(
                "smt-not-allowed", "policy", "the guest policy allows SMT (bit 16); the policy refuses it"
            )
        if report.platform_info & PLATFORM_SMT_EN:
            found.fail(
                "smt-not-allowed", "platform_info", "SMT is enabled on the platform; the policy refuses it"
            )
    if report.vmpl > policy.max_vmpl:
        found.fail(
            "vmpl-not-allowed",
            "vmpl",
            f"the report was requested at VMPL {report.vmpl}, the policy allows at most {policy.max_vmpl}",
        )


def _check_endorsement(
    found: Findings,
    endorsement: Cert,
    report: SnpReport,
    data: bytes,
    policy: Policy,
    anchors: Sequence[Anchor],
    lab: LabCertificates | None,
    supplied: Sequence[Cert],
    now: dt.datetime,
    signer: str,
) -> str | None:
    pool = [c for c in supplied if c is not endorsement] + list(vendor_intermediates())
    if lab is not None:
        pool += lab.intermediates()
    chain = build_chain(endorsement, pool, anchors, field=signer)
    root = check_chain(found, chain, "snp", policy, at=now, field=signer)
    if any(data[UNSIGNED_RESERVED:]):
        found.fail(
            "signature-invalid", "signature", "the reserved bytes after r and s (0x330-0x49F) are not zero"
        )
    if not ecdsa_verify(endorsement, report.signature, data[:SIGNED_SIZE], hashes.SHA384()):
        found.fail(
            "signature-invalid",
            "signature",
            f"the report signature does not verify with the {signer.upper()} public key",
        )
    amd = endorsement.amd
    assert amd is not None
    if amd.tcb is None:
        found.fail("tcb-mismatch", "reported_tcb", f"the {signer.upper()} carries no TCB extensions")
    elif amd.tcb.components() != report.reported_tcb.components():
        found.fail(
            "tcb-mismatch",
            "reported_tcb",
            f"reported TCB {report.reported_tcb.components()} differs from "
            f"the {signer.upper()}'s {amd.tcb.components()}",
        )
    if signer == "vcek":
        if report.mask_chip_key:
            if any(report.chip_id):
                found.fail("chip-id-mismatch", "chip_id", "MASK_CHIP_KEY is set but chip_id is not zero")
        elif amd.hwid != report.chip_id:
            found.fail("chip-id-mismatch", "chip_id", "chip_id differs from the VCEK's hwID")
    return root
