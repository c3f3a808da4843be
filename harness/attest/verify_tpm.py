"""``verify_tpm``: every check of vTPM evidence, each failure a named Reason.

- ``ek-untrusted`` [ek_certificate]: the EK certificate does not chain to a TPM root the policy trusts;
- ``ak-not-certified`` [ak_certificate / ak_public]: no AK certificate from the lab AK CA for this AK's key
  and name and this EK (the AK never proved, by credential activation, that it lives beside this EK), or
  the AK is not a restricted signing key of the TPM;
- ``quote-signature-invalid`` [signature]: the AK did not sign this quote;
- ``nonce-mismatch`` [nonce]: extraData is not the nonce (or, with the policy's public_key, the binding of
  both); the nonce book's ``nonce-unknown``/``nonce-stale``/``nonce-reused``;
- ``pcr-digest-mismatch`` [pcrs]: the PCR values given are not the ones the quote covers;
- ``event-log-mismatch`` [pcrN or event_log[i]]: replaying the event log does not give the quoted PCR N;
- ``pcr-mismatch`` [pcrN]: PCR N is not the policy's value;
- a CVM's SNP report beside the quote is verified as SNP evidence whose report_data must bind the quote's
  nonce and the AK (``binding.report_data(nonce, AK SubjectPublicKeyInfo)``), its reasons under ``tee.``;
  ``tee-evidence-missing`` [tee_evidence] when the policy pins SNP values and no report came.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from teelab_guest import binding, tpm_wire

from harness.attest.certs import Anchor, Cert, build_chain, load_cert
from harness.attest.checks import Findings, malformed_verdict
from harness.attest.errors import EvidenceError
from harness.attest.policy import Policy
from harness.attest.tpm import TpmEvidence, parse_tpm_evidence
from harness.attest.tpm_ca import AK_CA, MANUFACTURER, ak_binding, default_tpm_dir, load_tpm_certificates
from harness.attest.verdict import Verdict
from harness.attest.verify_snp import verify_snp

KIND = "tpm"
TEE_PINS = ("measurement", "host_data", "min_tcb")  # SNP values a policy for a CVM with a vTPM may pin
NONCE_REASONS = {
    "nonce-unknown": "the nonce was not issued by the policy's nonce book",
    "nonce-stale": "the nonce expired before the evidence arrived",
    "nonce-reused": "the nonce was already used",
}


def tpm_trust(policy: Policy) -> tuple[tuple[Anchor, ...], tuple[Cert, ...]]:
    """The TPM roots chains may end at (the lab's, when it has one) and the lab's TPM CAs."""
    lab_dir = policy.lab_dir / "tpm" if policy.lab_dir is not None else default_tpm_dir()
    certs = load_tpm_certificates(lab_dir)
    if certs is None:
        return (), ()
    return (Anchor("lab", KIND, certs["tpm-root"]),), (certs[MANUFACTURER], certs[AK_CA])


def verify_tpm(evidence: bytes, policy: Policy, *, now: dt.datetime | None = None) -> Verdict:
    """Verify a vTPM evidence document against ``policy`` (roots, nonce/nonce_book, pcrs of 32 bytes)."""
    field = "evidence"
    try:
        doc = parse_tpm_evidence(evidence)
        field = "quote"
        quote = tpm_wire.parse_quote(doc.quote)
        field = "ak_public"
        ak = tpm_wire.parse_ecc_public(doc.ak_public)
        ek_cert = load_cert(doc.ek_certificate, field="ek_certificate")
        ak_cert = load_cert(doc.ak_certificate, field="ak_certificate")
    except tpm_wire.TpmFormatError as exc:
        return malformed_verdict(KIND, EvidenceError(f"{field}: {exc}", field=field))
    except EvidenceError as exc:
        return malformed_verdict(KIND, exc)
    at = now or dt.datetime.now(dt.UTC)
    found = Findings()
    claims: dict[str, Any] = {
        "kind": KIND,
        "debug": False,  # a vTPM has no debug mode; a CVM's SNP report beside the quote may set it
        "ek_fingerprint": ek_cert.fingerprint,
        "ak_name": ak.name.hex(),
        "pcrs": {str(i): v.hex() for i, v in sorted(doc.pcrs.items())},
        "reset_count": quote.reset_count,
        "events": [str(e.get("type")) for e in doc.event_log],
    }
    root = _check_certificates(found, doc, ek_cert, ak_cert, ak, policy, at)
    signed = _check_signature(found, ak, doc)
    _check_pcrs(found, quote, doc, policy, claims)
    _check_tee(found, doc, ak, quote.extra_data, policy, at, claims)
    _check_nonce(found, quote.extra_data, policy, claims, authentic=signed and not found.reasons)
    return found.verdict(KIND, root, claims)


def _check_tee(
    found: Findings, doc: TpmEvidence, ak: tpm_wire.EccPublic, nonce: bytes, policy: Policy, at: dt.datetime,
    claims: dict[str, Any],
) -> None:  # fmt: skip
    """One verdict for a CVM and its vTPM: its SNP report must bind this quote's nonce and this AK."""
    if not doc.tee_evidence:
        pinned = [name for name in TEE_PINS if getattr(policy, name)]
        if pinned:
            found.fail(
                "tee-evidence-missing", "tee_evidence",
                f"the policy pins {', '.join(pinned)}, but no CVM report binding the AK came with the quote",
            )  # fmt: skip
        return
    try:
        spki = tpm_wire.ak_spki_der(ak)
    except tpm_wire.TpmFormatError as exc:
        found.fail("ak-not-certified", "ak_public", str(exc))
        return
    tee_policy = dataclasses.replace(policy, pcrs={}, nonce=nonce, nonce_book=None, public_key=spki)
    certificates = [doc.tee_certificates] if doc.tee_certificates else []
    verdict = verify_snp(doc.tee_evidence, tee_policy, now=at, certificates=certificates)
    for reason in verdict.reasons:
        found.fail(reason.code, f"tee.{reason.field}", reason.message)
    claims["tee"] = dict(verdict.claims)
    claims["debug"] = bool(verdict.claims.get("debug"))


def _check_certificates(
    found: Findings, doc: TpmEvidence, ek_cert: Cert, ak_cert: Cert, ak: tpm_wire.EccPublic, policy: Policy,
    at: dt.datetime,
) -> str | None:  # fmt: skip
    """The EK and AK chains, then what the AK certificate binds; the name of the EK's root."""
    anchors, pool = tpm_trust(policy)
    manufacturer, ak_ca = pool if pool else (None, None)
    root = _check_chain(
        found, ek_cert, "ek-untrusted", "ek_certificate", manufacturer, anchors, pool, policy, at
    )
    _check_chain(found, ak_cert, "ak-not-certified", "ak_certificate", ak_ca, anchors, pool, policy, at)
    binding = ak_binding(ak_cert)
    if binding is None:
        found.fail("ak-not-certified", "ak_certificate", "the AK certificate names no EK and no AK")
    else:
        if not hmac.compare_digest(binding.ek_fingerprint, bytes.fromhex(ek_cert.fingerprint)):
            found.fail("ak-not-certified", "ak_certificate", "the AK was certified for another EK")
        if not hmac.compare_digest(binding.ak_name, ak.name):
            found.fail("ak-not-certified", "ak_public", "the AK certificate names another AK")
    key = ak_public_key(ak)
    cert_key = ak_cert.public_key
    if key is None or cert_key is None or key.public_numbers() != cert_key.public_numbers():
        found.fail("ak-not-certified", "ak_public", "the AK certificate's key is not the quoting AK")
    if ak.attributes & tpm_wire.AK_ATTRIBUTES != tpm_wire.AK_ATTRIBUTES:
        found.fail("ak-not-certified", "ak_public", "the AK is not a restricted signing key fixed to its TPM")
    return root


def _check_chain(
    found: Findings, cert: Cert, code: str, name: str, issuer: Cert | None, anchors: tuple[Anchor, ...],
    pool: tuple[Cert, ...], policy: Policy, at: dt.datetime,
) -> str | None:  # fmt: skip
    """``cert`` must chain through ``issuer`` to a TPM root the policy trusts; every problem is ``code``."""
    chain = build_chain(cert, pool, anchors, field=name, leaf_field=f"{name}.leaf")
    problems = list(chain.problems)
    if name == "ek_certificate":
        # An EK's key encrypts (keyEncipherment), it never signs: only its leaf key usage is no problem.
        problems = [p for p in problems if not (p.field == f"{name}.leaf" and p.code == "ca-constraints")]
    problems += chain.validity_problems(at, name)
    if chain.anchor is None or chain.anchor.name not in policy.roots:
        where = "no TPM root" if chain.anchor is None else f"the {chain.anchor.name} root, not trusted"
        found.fail(
            code, name, f"{cert.subject_text} chains to {where} (policy roots: {', '.join(policy.roots)})"
        )
    for problem in problems:
        found.fail(code, name, f"{problem.code}: {problem.message}")
    through = {c.fingerprint for c in chain.certs}
    if chain.anchor is not None and issuer is not None and issuer.fingerprint not in through:
        found.fail(code, name, f"{cert.subject_text} is not issued by {issuer.subject_text}")
    return chain.anchor.name if chain.anchor is not None else None


def ak_public_key(ak: tpm_wire.EccPublic) -> ec.EllipticCurvePublicKey | None:
    if ak.curve != tpm_wire.ECC_NIST_P256 or len(ak.x) != 32 or len(ak.y) != 32:
        return None
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(ak.x, "big"), int.from_bytes(ak.y, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError:
        return None


def _check_signature(found: Findings, ak: tpm_wire.EccPublic, doc: TpmEvidence) -> bool:
    key = ak_public_key(ak)
    try:
        alg, r, s = tpm_wire.parse_ecdsa_signature(doc.signature)
        if key is None or alg != tpm_wire.ALG_SHA256:
            raise InvalidSignature
        key.verify(encode_dss_signature(r, s), doc.quote, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, tpm_wire.TpmFormatError, ValueError):
        found.fail(
            "quote-signature-invalid", "signature", "the quote's signature does not verify under the AK"
        )
        return False
    return True


def _check_pcrs(
    found: Findings, quote: tpm_wire.Quote, doc: TpmEvidence, policy: Policy, claims: dict[str, Any]
) -> None:
    """The PCR values against the quote's digest, the event log's replay and the policy."""
    selected = quote.selection.get(tpm_wire.ALG_SHA256, ())
    if set(quote.selection) != {tpm_wire.ALG_SHA256} or tuple(sorted(doc.pcrs)) != selected:
        message = f"the quote covers SHA-256 PCRs {list(selected)}, not {sorted(doc.pcrs)}"
        found.fail("pcr-digest-mismatch", "pcrs", message)
    elif tpm_wire.pcr_digest([doc.pcrs[i] for i in selected]) != quote.pcr_digest:
        found.fail("pcr-digest-mismatch", "pcrs", "the PCR values are not the ones the quote's digest covers")
    replayed = _replay(found, doc.event_log, claims)
    for index, value in sorted(doc.pcrs.items()):
        if replayed[index] != value:
            message = f"replaying the event log does not give PCR {index}"
            found.fail("event-log-mismatch", f"pcr{index}", message)
    for index, expected in sorted(policy.pcrs.items()):
        actual = doc.pcrs.get(index)
        if len(expected) != 32:
            found.fail("pcr-mismatch", f"pcr{index}", f"the policy's PCR {index} is not a SHA-256 value")
        elif actual is None:
            found.fail("pcr-mismatch", f"pcr{index}", f"the quote does not cover PCR {index}")
        elif not hmac.compare_digest(actual, expected):
            message = f"PCR {index} is {actual.hex()[:16]}..., the policy wants {expected.hex()[:16]}..."
            found.fail("pcr-mismatch", f"pcr{index}", message)


def _replay(found: Findings, events: Any, claims: dict[str, Any]) -> dict[int, bytes]:
    """The PCRs the event log leads to from zero; an event whose digest is not its data's is named."""
    replayed = {i: bytes(32) for i in range(tpm_wire.PCR_COUNT)}
    for number, item in enumerate(events):
        where = f"event_log[{number}]"
        try:
            pcr, digest = int(item["pcr"]), bytes.fromhex(str(item["digest"]))
            if not 0 <= pcr < tpm_wire.PCR_COUNT or len(digest) != 32:
                raise ValueError
        except (KeyError, ValueError, TypeError):
            found.fail("event-log-mismatch", where, "the event has no PCR 0..23 and SHA-256 digest")
            continue
        if "data" in item and hashlib.sha256(str(item["data"]).encode()).digest() != digest:
            found.fail("event-log-mismatch", where, "the event's digest is not its data's SHA-256")
        replayed[pcr] = tpm_wire.extend(replayed[pcr], digest)
        if item.get("type") == "kernel-cmdline":
            claims["cmdline"] = str(item.get("data"))
    return replayed


def _check_nonce(
    found: Findings, extra: bytes, policy: Policy, claims: dict[str, Any], *, authentic: bool
) -> None:
    """extraData is the policy's nonce, or (with the policy's public_key, as for a KMS Recipient) SHA-512
    binding of nonce and key (``teelab_guest.binding.report_data``), exactly as SNP/TDX report_data."""
    if policy.public_key is not None:
        expected: bytes | None = binding.report_data(policy.nonce or b"", policy.public_key)
    else:
        expected = policy.nonce
    if expected is not None:
        if not hmac.compare_digest(extra, expected):
            found.fail("nonce-mismatch", "nonce", "the quote's extraData is not the policy's nonce (and key)")
            return
        if policy.nonce is not None:
            claims["nonce"] = policy.nonce.hex()
        if policy.public_key is not None:
            claims["public_key"] = policy.public_key.hex()
    book = policy.nonce_book
    if book is None:
        return
    if policy.nonce is None:
        found.fail("nonce-missing", "nonce", "the policy has a nonce book but names no nonce")
        return
    problem = book.consume(policy.nonce) if authentic else book.check(policy.nonce)
    if problem is not None:
        found.fail(problem, "nonce", NONCE_REASONS.get(problem, problem))
