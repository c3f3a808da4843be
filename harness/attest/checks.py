"""Checks every evidence kind shares: the chain to a named root, reference values, binding and nonces."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from teelab_guest import binding

from harness.attest.certs import Anchor, Cert, Chain
from harness.attest.errors import EvidenceError
from harness.attest.lab_certificates import LabCertificates, default_lab_dir, load_lab_certificates
from harness.attest.policy import Policy
from harness.attest.roots import LAB, vendor_anchors
from harness.attest.verdict import Reason, Verdict

# Failures that mean the evidence itself is not authentic (as opposed to authentic but unwanted). A
# certificate that cannot be read ("malformed") leaves the signature unchecked, so it counts too.
AUTHENTICITY_CODES = frozenset(
    {
        "malformed",
        "signature-invalid",
        "chain-invalid",
        "untrusted-root",
        "certificate-expired",
        "certificate-not-yet-valid",
        "certificate-revoked",
        "ca-constraints",
        "certificate-missing",
        "qe-signature-invalid",
        "qe-binding-invalid",
        "signature-algo-unsupported",
        "signing-key-unsupported",
        "tcb-mismatch",
        "chip-id-mismatch",
        "collateral-missing",
    }
)
CLOCK_SKEW = dt.timedelta(minutes=5)


class Findings:
    """Collects every failed check (as Reasons) and informational notes of one verification."""

    def __init__(self) -> None:
        self.reasons: list[Reason] = []
        self.notes: list[str] = []

    def fail(self, code: str, field: str, message: str) -> None:
        self.reasons.append(Reason(code, field, message))

    def note(self, message: str) -> None:
        self.notes.append(message)

    @property
    def authentic(self) -> bool:
        return not any(r.code in AUTHENTICITY_CODES for r in self.reasons)

    def verdict(self, kind: str, root: str | None, claims: Mapping[str, Any]) -> Verdict:
        return Verdict(
            ok=not self.reasons,
            kind=kind,
            root=root,
            claims=claims,
            reasons=tuple(self.reasons),
            notes=tuple(self.notes),
        )


def malformed_verdict(kind: str, error: EvidenceError) -> Verdict:
    return Verdict(
        ok=False,
        kind=kind,
        root=None,
        claims={"kind": kind},
        reasons=(Reason(error.reason, error.field, error.message),),
    )


def evidence_time(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def trust_material(policy: Policy) -> tuple[tuple[Anchor, ...], LabCertificates | None]:
    """Every anchor chains may end at (vendor roots, and the lab's when a lab CA exists) and the lab CA.
    Knowing the lab root lets a verdict say "this is lab evidence"; trusting it is the policy's choice."""
    lab = load_lab_certificates(policy.lab_dir or default_lab_dir())
    anchors = vendor_anchors() + (lab.anchors() if lab is not None else ())
    return anchors, lab


def check_chain(
    found: Findings, chain: Chain, kind: str, policy: Policy, *, at: dt.datetime, field: str
) -> str | None:
    """Report the chain's problems and whether its root is one the policy trusts; return the root's name."""
    for problem in chain.problems:
        found.fail(problem.code, problem.field, problem.message)
    for problem in chain.validity_problems(at, field):
        found.fail(problem.code, problem.field, problem.message)
    anchor = chain.anchor
    if anchor is None:
        return None
    if anchor.kind != kind:
        found.fail(
            "untrusted-root",
            field,
            f"the chain ends at the {anchor.name} root for {anchor.kind} evidence, not {kind}",
        )
    elif anchor.name not in policy.roots:
        found.fail(
            "untrusted-root",
            field,
            f"the chain ends at the {anchor.name} root; the policy trusts only "
            f"{', '.join(policy.roots) or 'no root'}"
            + (
                '; this is lab evidence: name the lab root to trust it (roots = ["lab"] in a verifier '
                "policy; teelab:RecipientAttestation:Root = lab in a KMS key policy)"
                if anchor.name == LAB
                else ""
            ),
        )
    return anchor.name


_signature_cache: dict[tuple[str, tuple[int, int], bytes, str], bool] = {}
_SIGNATURE_CACHE_LIMIT = 4096


def ecdsa_verify(
    cert_or_key: Cert | ec.EllipticCurvePublicKey,
    signature: tuple[int, int],
    message: bytes,
    digest: hashes.HashAlgorithm,
) -> bool:
    """ECDSA over ``message``; by a certificate's key the result is cached by its fingerprint, the
    signature and the message's SHA-256 (evidence repeats the QE report and collateral signatures)."""
    if not isinstance(cert_or_key, Cert):
        return _ecdsa_verify(cert_or_key, signature, message, digest)
    key = (cert_or_key.fingerprint, signature, hashlib.sha256(message).digest(), digest.name)
    cached = _signature_cache.get(key)
    if cached is None:
        cached = _ecdsa_verify(cert_or_key.public_key, signature, message, digest)
        if len(_signature_cache) >= _SIGNATURE_CACHE_LIMIT:
            _signature_cache.clear()
        _signature_cache[key] = cached
    return cached


def _ecdsa_verify(key: Any, signature: tuple[int, int], message: bytes, digest: hashes.HashAlgorithm) -> bool:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(encode_dss_signature(*signature), message, ec.ECDSA(digest))
    except (InvalidSignature, ValueError):
        return False
    return True


def raw_rs(signature: bytes) -> tuple[int, int]:
    half = len(signature) // 2
    return int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")


def check_value(found: Findings, code: str, field: str, expected: bytes | None, actual: bytes | None) -> None:
    if expected is None:
        return
    if actual is None or not hmac.compare_digest(expected, actual):
        shown = "absent" if actual is None else actual.hex()
        found.fail(code, field, f"{field} is {shown}, the policy expects {expected.hex()}")


def check_claims(found: Findings, pinned: Mapping[str, Any], claims: Mapping[str, Any]) -> None:
    """Every pinned claim must equal the evidence's; a difference inside a map or list is reported at its
    dotted path ("reported_tcb.microcode", "pcrs.0")."""
    for key, expected in pinned.items():
        if key not in claims:
            found.fail("claim-mismatch", key, f"the evidence has no claim {key!r}; the policy pins it")
        else:
            _diff(found, key, expected, claims[key])


def _diff(found: Findings, path: str, expected: Any, actual: Any) -> None:
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        for key in sorted(set(expected) | set(actual), key=str):
            _diff(found, f"{path}.{key}", expected.get(key), actual.get(key))
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for index, (want, have) in enumerate(zip(expected, actual, strict=True)):
            _diff(found, f"{path}.{index}", want, have)
    elif expected != actual:
        found.fail("claim-mismatch", path, f"{path} is {actual!r}, the policy pins {expected!r}")


def check_report_data_binding(
    found: Findings, policy: Policy, report_data: bytes, claims: dict[str, Any]
) -> None:
    """SNP/TDX: report_data against the policy's exact value, or against binding.report_data(nonce, key)."""
    check_value(found, "report-data-mismatch", "report_data", policy.report_data, report_data)
    if policy.nonce is None and policy.public_key is None:
        if policy.nonce_book is not None:
            found.fail(
                "nonce-missing",
                "nonce",
                "the policy has a nonce book but names no nonce to look for in report_data",
            )
        return
    expected = binding.report_data(policy.nonce or b"", policy.public_key or b"")
    if hmac.compare_digest(expected, report_data):
        if policy.nonce is not None:
            claims["nonce"] = policy.nonce.hex()
        if policy.public_key is not None:
            claims["public_key"] = policy.public_key.hex()
    else:
        found.fail(
            "binding-mismatch",
            "report_data",
            "report_data is not SHA-512 binding of the policy's nonce and public key "
            f"(expected {expected.hex()[:32]}..., got {report_data.hex()[:32]}...)",
        )
    if policy.nonce is not None:
        check_nonce_book(found, policy, policy.nonce)


def check_nonce_book(found: Findings, policy: Policy, nonce: bytes | None) -> None:
    """Ask the policy's nonce book about ``nonce``; use it up only if the evidence is authentic so far."""
    book = policy.nonce_book
    if book is None:
        return
    if nonce is None:
        found.fail("nonce-missing", "nonce", "the evidence carries no nonce; the policy requires a fresh one")
        return
    problem = book.consume(nonce) if found.authentic else book.check(nonce)
    if problem is not None:
        found.fail(
            problem,
            "nonce",
            {
                "nonce-unknown": "the nonce was not issued by the policy's nonce book",
                "nonce-stale": "the nonce expired before the evidence arrived",
                "nonce-reused": "the nonce was already used",
            }.get(problem, problem),
        )


def hexed(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def all_zero(values: Sequence[bytes]) -> bool:
    return all(not any(v) for v in values)
