"""Attestation: wire formats (SNP report, TDX quote, COSE attestation document), roots of trust (vendor roots
as data, a persistent lab CA with issuers), and ``verify(evidence, policy) -> Verdict``."""

from __future__ import annotations

from harness.attest.authority import LabAuthority
from harness.attest.errors import (
    AttestError,
    EvidenceError,
    EvidenceTruncated,
    EvidenceUnsupported,
    LabAuthorityError,
    PolicyError,
    UnknownEvidenceFormat,
)
from harness.attest.lab_certificates import LabCertificates, default_lab_dir, load_lab_certificates
from harness.attest.nitro import AttestationDocument, parse_attestation_document
from harness.attest.policy import NonceBook, Policy
from harness.attest.roots import LAB, ROOT_NAMES, VENDOR_ROOT_NAMES, VENDOR_ROOTS
from harness.attest.snp import SnpReport, TcbVersion, parse_snp_cert_table, parse_snp_report
from harness.attest.tdx import TdxQuote, parse_tdx_quote
from harness.attest.verdict import Reason, Verdict
from harness.attest.verifier import KINDS, detect_kind, parse, verify

__all__ = [
    "KINDS",
    "LAB",
    "ROOT_NAMES",
    "VENDOR_ROOTS",
    "VENDOR_ROOT_NAMES",
    "AttestError",
    "AttestationDocument",
    "EvidenceError",
    "EvidenceTruncated",
    "EvidenceUnsupported",
    "LabAuthority",
    "LabAuthorityError",
    "LabCertificates",
    "NonceBook",
    "Policy",
    "PolicyError",
    "Reason",
    "SnpReport",
    "TcbVersion",
    "TdxQuote",
    "UnknownEvidenceFormat",
    "Verdict",
    "default_lab_dir",
    "detect_kind",
    "load_lab_certificates",
    "parse",
    "parse_attestation_document",
    "parse_snp_cert_table",
    "parse_snp_report",
    "parse_tdx_quote",
    "verify",
]
