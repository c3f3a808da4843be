"""Coded errors of attestation (E8xx): malformed evidence, bad policies, an unusable lab CA."""

from __future__ import annotations

from typing import Any

from harness.errors import LabError


class AttestError(LabError):
    code = "E800"
    title = "attestation error"
    explanation = "Attestation evidence, a verification policy or the lab CA could not be used."
    exit_status = 2


class EvidenceError(AttestError):
    """Evidence that cannot be decoded; ``field`` names where decoding stopped."""

    code = "E801"
    title = "malformed attestation evidence"
    explanation = (
        "The evidence (SNP report, TDX quote or attestation document) does not follow its wire format; the "
        "message names the field where decoding stopped. Nothing about it can be trusted."
    )
    reason = "malformed"

    def __init__(self, message: str, *, field: str, hint: str | None = None, **evidence: Any) -> None:
        super().__init__(message, hint=hint, field=field, **evidence)
        self.field = field


class EvidenceTruncated(EvidenceError):
    code = "E802"
    title = "attestation evidence truncated"
    explanation = (
        "The evidence ends before the field the message names; it was cut short in transit or storage."
    )
    reason = "truncated"


class EvidenceUnsupported(EvidenceError):
    code = "E803"
    title = "unsupported evidence version or variant"
    explanation = (
        "The evidence is well formed up to a version, key type or certification-data type this verifier "
        "does not handle (SNP report versions 2-5, TDX quote v4/v5 and SGX quote v3/v4 with ECDSA P-256 and "
        "certification data type 6 -> 5, COSE_Sign1 ES384)."
    )
    reason = "unsupported"


class UnknownEvidenceFormat(EvidenceError):
    code = "E804"
    title = "unknown evidence format"
    explanation = (
        "The bytes are neither an SEV-SNP attestation report, a TDX or SGX quote nor a COSE_Sign1 "
        "attestation document; name the format with kind= (or --kind) if detection is wrong."
    )
    reason = "unknown-format"


class CollateralError(EvidenceError):
    code = "E805"
    title = "malformed TDX collateral"
    explanation = (
        "The TDX collateral (TCB info, QE identity, CRLs and their issuer chains, as Intel's PCS serves "
        "them) is not in the expected JSON shape."
    )
    reason = "collateral-malformed"


class PolicyError(AttestError):
    code = "E810"
    title = "invalid attestation policy"
    explanation = (
        "A verification policy has a value of the wrong type or length (hex strings for bytes: 48-byte "
        "measurements and PCRs, 64-byte report data, 32-byte host data) or an unknown key."
    )


class UnknownRoot(PolicyError):
    code = "E811"
    title = "unknown root of trust"
    explanation = (
        "A policy names a root that teelab does not know. Vendor roots: amd-milan, amd-genoa, intel-sgx, "
        "aws-nitro; the lab CA: lab. `teelab attest roots` lists them."
    )


class LabAuthorityError(AttestError):
    code = "E820"
    title = "lab CA unusable"
    explanation = (
        "The lab certificate authority directory exists but cannot be read or is incomplete or "
        "inconsistent. Remove the directory to make a new lab CA (evidence issued by the old one will no "
        "longer verify)."
    )


class IssueError(AttestError):
    code = "E821"
    title = "bad arguments for lab evidence"
    explanation = (
        "A lab issuer was asked for evidence with a field of the wrong length or range (measurements and "
        "RTMRs 48 bytes, report data 64 bytes, host data 32 bytes, PCR index 0-31, ...)."
    )


class EvidenceFileError(AttestError):
    code = "E830"
    title = "evidence or policy file unreadable"
    explanation = (
        "A file given to `teelab attest` does not exist, cannot be read or is not in a known encoding."
    )
