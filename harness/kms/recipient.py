"""Recipient evidence: parse the request's Recipient, verify it with harness.attest (``AttestVerifier``: the
roots a key policy names, then the claims as policy condition keys), bind the recipient key.

A Recipient is ``{"AttestationDocument": b64, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}`` for an enclave
attestation document (which carries the public key and nonce), and additionally ``"PublicKey": b64 DER`` and
``"Nonce": b64`` for an SNP report or TDX quote, whose report_data must equal
``teelab_guest.binding.report_data(nonce, public_key)``; SNP evidence may add ``"Certificates": b64`` (the
guest's certificate table, or VCEK DER/PEM).

``AttestVerifier`` remembers enclave documents that verified (``VerifiedDocuments``): the same bytes, verified
against the same anchors and roots, give the same verdict, so their signature, chain and contents are not
checked again. Everything that depends on the request or the clock still runs on every request (the KMS's age
and replay checks, the key policy, sealing to the document's key).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from teelab_guest.kms_envelope import KEY_ENCRYPTION_ALGORITHM, EnvelopeError, load_recipient_key

from harness.kms.errors import EvidenceMalformed, EvidenceRefused, KmsRequestError
from harness.kms.policy import DEBUG_KEY, ROOT_KEY

if TYPE_CHECKING:
    from harness.attest.collateral_cache import CollateralCache

MAX_EVIDENCE_BYTES = 32768
VERIFIED_DOCUMENTS = 1024  # enclave documents whose verdict is kept (least recently used goes first)


@dataclass(frozen=True)
class Recipient:
    evidence: bytes
    public_key: bytes | None  # given beside SNP/TDX evidence
    nonce: bytes | None
    certificates: tuple[bytes, ...] = ()  # SNP VCEK/VLEK (DER, PEM or a GHCB certificate table)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the evidence (the audit log's and VerifiedDocuments' name for it)."""
        return hashlib.sha256(self.evidence).hexdigest()


@dataclass(frozen=True)
class Attested:
    """Verified evidence reduced to what the KMS needs."""

    kind: str  # "nitro" | "snp" | "tdx"
    root: str
    vendor_root: bool
    debug: bool
    public_key: bytes  # the recipient's SubjectPublicKeyInfo DER
    nonce: bytes | None
    timestamp_ms: int | None  # enclave documents only
    # lower-case condition key -> value; read-only, as one Attested may serve many requests
    conditions: Mapping[str, Any] = field(default_factory=dict)
    remembered: bool = False  # the verdict of the same document bytes, verified before (VerifiedDocuments)


# (evidence, recipient, roots the caller's policy accepts, now) -> Attested; raises EvidenceRefused/Malformed.
Verifier = Callable[[Recipient, frozenset[str], float], Attested]


def parse_recipient(raw: Any) -> Recipient:
    """Check the Recipient object's shape; ValidationException (or EvidenceMalformed) says what is wrong."""
    if not isinstance(raw, dict):
        raise KmsRequestError("Recipient must be an object")
    unknown = set(raw) - {
        "AttestationDocument",
        "KeyEncryptionAlgorithm",
        "PublicKey",
        "Nonce",
        "Certificates",
    }
    if unknown:
        raise KmsRequestError(f"Recipient has unknown fields {sorted(unknown)}")
    algorithm = raw.get("KeyEncryptionAlgorithm")
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise KmsRequestError(
            f"Recipient.KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}", given=str(algorithm)[:64]
        )
    evidence = _b64(raw.get("AttestationDocument"), "Recipient.AttestationDocument", MAX_EVIDENCE_BYTES)
    if evidence is None:
        raise KmsRequestError("Recipient.AttestationDocument is required")
    public_key = _b64(raw.get("PublicKey"), "Recipient.PublicKey", 4096)
    nonce = _b64(raw.get("Nonce"), "Recipient.Nonce", 1024)
    certificates = _b64(raw.get("Certificates"), "Recipient.Certificates", MAX_EVIDENCE_BYTES)
    if public_key is not None:
        try:
            load_recipient_key(public_key)
        except EnvelopeError as exc:
            raise EvidenceMalformed(f"Recipient.PublicKey: {exc}") from None
    return Recipient(evidence, public_key, nonce, (certificates,) if certificates else ())


def _b64(value: Any, name: str, limit: int) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KmsRequestError(f"{name} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsRequestError(f"{name} is not valid base64") from None
    if not data or len(data) > limit:
        raise KmsRequestError(f"{name} must be 1..{limit} bytes", length=len(data))
    return data


def base_conditions(attested: Attested) -> dict[str, Any]:
    """The condition keys every kind of evidence sets."""
    return {
        ROOT_KEY.lower(): attested.root,
        DEBUG_KEY.lower(): attested.debug,
        "teelab:recipientattestation:kind": attested.kind,
    }


def refuse(message: str, **evidence: Any) -> EvidenceRefused:
    return EvidenceRefused(
        message, hint="see the audit log (teelab kms audit) for the verifier's reasons", **evidence
    )


# Reasons that say the bytes are not evidence at all (ValidationException) rather than evidence that fails.
_MALFORMED = {"malformed", "truncated", "unsupported", "unknown-format"}
_PREFIX = "teelab:recipientattestation:"
_QUOTES = ("tdx", "sgx")  # Intel DCAP quotes: collateral from the cache
log = logging.getLogger("teelab.kms")


class VerifiedDocuments:
    """Enclave attestation documents that verified, by the SHA-256 of their whole bytes, the roots the key
    policy names and the fingerprints of every anchor a chain may end at; at most ``limit`` (least recently
    used goes first). Thread-safe.

    Only enclave documents qualify: their verdict is a function of those inputs alone (the chain is checked
    at the document's own timestamp, and the document carries its key and nonce), while SNP, TDX, SGX and
    vTPM verdicts depend on the time (certificate and collateral validity now) and on fields beside the
    evidence. Refusals are not kept: evidence that fails is checked in full each time it comes."""

    def __init__(self, limit: int = VERIFIED_DOCUMENTS) -> None:
        self.limit = limit
        self._entries: OrderedDict[tuple[object, ...], Attested] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[object, ...]) -> Attested | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[object, ...], attested: Attested) -> None:
        with self._lock:
            self._entries[key] = replace(attested, remembered=True)
            self._entries.move_to_end(key)
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)


class AttestVerifier:
    """Verifies Recipient evidence with harness.attest; ``lab_dir``: the lab CA that policies may name;
    ``tdx_collateral``: a file or directory of Intel PCS collateral for TDX and SGX quotes (read now:
    E805/E830 if it is unusable). Without collateral for its platform a vendor quote is refused
    (collateral-missing); a lab quote gets the lab CA's collateral where the key policy names the lab root.
    Enclave documents that verified are remembered (``VerifiedDocuments``)."""

    def __init__(
        self,
        lab_dir: Path | None = None,
        tdx_collateral: Path | None = None,
        verified: VerifiedDocuments | None = None,
    ) -> None:
        from harness.attest.collateral_cache import CollateralCache

        self.lab_dir = lab_dir
        self.collateral = None if tdx_collateral is None else CollateralCache.load(tdx_collateral)
        self.verified = VerifiedDocuments() if verified is None else verified

    def __call__(self, recipient: Recipient, roots: frozenset[str], now: float) -> Attested:
        key = self._document_key(recipient, roots)
        if key is not None:
            known = self.verified.get(key)
            if known is not None:
                return known
        attested = verify_recipient(recipient, roots, now, lab_dir=self.lab_dir, collateral=self.collateral)
        # kept only if the anchors did not change while it was verified (a lab CA replaced meanwhile)
        if key is not None and attested.kind == "nitro" and key == self._document_key(recipient, roots):
            self.verified.put(key, attested)
        return attested

    def _document_key(self, recipient: Recipient, roots: frozenset[str]) -> tuple[object, ...] | None:
        """What an enclave document's verdict depends on: its bytes' SHA-256, the roots the key policy names
        and the fingerprints of the anchors (the lab CA's may be replaced); None for other evidence."""
        from harness import attest
        from harness.attest.roots import vendor_anchors

        if recipient.public_key is not None or recipient.nonce is not None or recipient.certificates:
            return None  # fields sent beside the evidence: not an enclave document's request alone
        try:
            if attest.detect_kind(recipient.evidence) != "nitro":
                return None
            lab = attest.load_lab_certificates(self.lab_dir or attest.default_lab_dir())
            anchors = vendor_anchors() + (lab.anchors() if lab is not None else ())
        except attest.AttestError:  # not evidence, or unusable roots: verify_recipient says which
            return None
        return (recipient.digest, roots, tuple(a.cert.fingerprint for a in anchors))


def verify_recipient(
    recipient: Recipient,
    roots: frozenset[str],
    now: float,
    *,
    lab_dir: Path | None = None,
    collateral: CollateralCache | None = None,
) -> Attested:
    """Attested facts of ``recipient``'s evidence, or EvidenceRefused / EvidenceMalformed."""
    from harness import attest

    try:
        kind = attest.detect_kind(recipient.evidence)
    except attest.AttestError as err:
        raise EvidenceMalformed(f"Recipient.AttestationDocument: {err.message}") from None
    bound = _bound(kind, recipient)
    trusted = tuple(r for r in (*attest.VENDOR_ROOT_NAMES, *sorted(roots)) if r in attest.ROOT_NAMES)
    policy = attest.Policy(
        roots=tuple(dict.fromkeys(trusted)),
        lab_dir=lab_dir,
        allow_debug=True,  # the key policy decides about debug guests (teelab:RecipientAttestation:Debug)
        max_vmpl=3,  # and about VMPL 1-3 (teelab:RecipientAttestation:SnpVmpl must be named to allow them)
        nonce=recipient.nonce if bound else None,
        public_key=recipient.public_key if bound else None,
    )
    try:
        verdict = attest.verify(
            recipient.evidence,
            policy,
            now=dt.datetime.fromtimestamp(now, dt.UTC),
            certificates=recipient.certificates,
            collateral=collateral.for_quote(recipient.evidence) if collateral and kind in _QUOTES else None,
        )
    except Exception as exc:  # attacker-controlled bytes at a trust boundary: never a 5xx
        # the verifier promises Reasons, not exceptions; if one slips through it is still the evidence's fault
        log.warning("verifier raised %s on %s evidence: %s", type(exc).__name__, kind, exc)
        raise EvidenceMalformed(f"{kind} evidence could not be verified ({type(exc).__name__})") from None
    if not verdict.ok:
        reasons = "; ".join(str(r) for r in verdict.reasons[:4])
        if verdict.root is None and verdict.codes <= _MALFORMED:
            raise EvidenceMalformed(f"{verdict.kind} evidence is malformed: {reasons}")
        raise refuse(f"{verdict.kind} evidence does not verify: {reasons}", kind=verdict.kind)
    claims = verdict.claims
    conditions: dict[str, Any] = {}
    if kind == "nitro":
        public_key = _bytes(claims.get("public_key"))
        if public_key is None:
            raise EvidenceMalformed("the attestation document carries no public_key to release to")
        nonce = _bytes(claims.get("nonce"))
        pcrs = {int(k): str(v).lower() for k, v in (claims.get("pcrs") or {}).items()}
        for index, value in pcrs.items():
            conditions[f"kms:recipientattestation:pcr{index}"] = value
            conditions[f"kms:recipientattestation/pcr{index}"] = value
        if 0 in pcrs:
            conditions["kms:recipientattestation:imagesha384"] = pcrs[0]
        conditions[_PREFIX + "moduleid"] = claims.get("module_id")
        # a debug-mode enclave attests with all-zero PCRs
        debug = all(set(pcrs.get(i, "0")) == {"0"} for i in (0, 1, 2))
        timestamp = claims.get("timestamp")
    else:
        public_key, nonce, timestamp = recipient.public_key, recipient.nonce, None
        debug = bool(claims.get("debug"))
        conditions.update(_CONDITIONS[kind](claims))
    attested = Attested(
        kind=kind,
        root=str(verdict.root),
        vendor_root=verdict.root in attest.VENDOR_ROOT_NAMES,
        debug=debug,
        public_key=public_key,
        nonce=nonce,
        timestamp_ms=int(timestamp) if timestamp is not None else None,
    )
    conditions.update(base_conditions(attested))
    return replace(
        attested, conditions=MappingProxyType({k: v for k, v in conditions.items() if v is not None})
    )


def _bound(kind: str, recipient: Recipient) -> bool:
    """Whether ``kind`` evidence binds the Recipient's key and nonce in report_data (SNP, TDX, SGX, vTPM)
    rather than carrying them (enclave documents); EvidenceMalformed when the Recipient's fields misfit."""
    bound = kind in ("snp", "tdx", "sgx", "tpm")
    if bound and (recipient.public_key is None or recipient.nonce is None):
        raise EvidenceMalformed(f"{kind} evidence needs Recipient.PublicKey and Recipient.Nonce beside it")
    if not bound and (recipient.public_key is not None or recipient.certificates):
        raise EvidenceMalformed("an attestation document carries its own public key and certificates")
    return bound


def _bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return bytes.fromhex(str(value))


def _snp_conditions(claims: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        _PREFIX + "snpmeasurement": claims.get("measurement"),
        _PREFIX + "snphostdata": claims.get("host_data"),
        _PREFIX + "snppolicy": claims.get("policy"),
        _PREFIX + "snpguestsvn": claims.get("guest_svn"),
        _PREFIX + "snpvmpl": claims.get("vmpl"),
    }
    tcb = claims.get("tcb") or {}
    for part in ("bootloader", "tee", "snp", "microcode"):
        out[_PREFIX + "snptcb" + part] = tcb.get(part)
    return out


def _tpm_conditions(claims: Any) -> dict[str, Any]:
    """A vTPM quote's PCRs and EK; with a CVM's SNP report binding its AK (claims["tee"]), its keys too."""
    out = {_PREFIX + f"tpmpcr{index}": value for index, value in (claims.get("pcrs") or {}).items()}
    out[_PREFIX + "tpmekfingerprint"] = claims.get("ek_fingerprint")
    tee = claims.get("tee")
    return {**(_snp_conditions(tee) if tee else {}), **out}


def _sgx_conditions(claims: Any) -> dict[str, Any]:
    return {
        _PREFIX + "sgxmrenclave": claims.get("mrenclave"),
        _PREFIX + "sgxmrsigner": claims.get("mrsigner"),
        _PREFIX + "sgxisvprodid": claims.get("isv_prod_id"),
        _PREFIX + "sgxisvsvn": claims.get("isv_svn"),
    }


def _tdx_conditions(claims: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        _PREFIX + "tdxmrtd": claims.get("mrtd"),
        _PREFIX + "tdxmrconfigid": claims.get("mrconfigid"),
    }
    attributes = claims.get("td_attributes")  # the quote's 8 bytes (little-endian) in hex: a number key
    if attributes is not None:
        out[_PREFIX + "tdxattributes"] = int.from_bytes(bytes.fromhex(attributes), "little")
    rtmrs = claims.get("rtmrs") or []
    for index, value in enumerate(rtmrs):
        out[_PREFIX + f"tdxrtmr{index}"] = value
    return out


_CONDITIONS = {"snp": _snp_conditions, "tdx": _tdx_conditions, "sgx": _sgx_conditions, "tpm": _tpm_conditions}
