"""X.509 for attestation: certificates parsed once and cached by fingerprint, AMD VCEK/VLEK extensions,
and chain building to named anchors with the results cached by the fingerprints involved."""

from __future__ import annotations

import functools
import hashlib
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from harness.attest.errors import EvidenceError
from harness.attest.snp import TcbVersion, parse_snp_cert_table

# AMD KDS extensions of VCEK/VLEK certificates.
OID_AMD_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
OID_AMD_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_AMD_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_AMD_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_AMD_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_AMD_HWID = "1.3.6.1.4.1.3704.1.4"
OID_AMD_CSP_ID = "1.3.6.1.4.1.3704.1.5"
_ACCEPTED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
MAX_CHAIN_LENGTH = 8
# PEM certificates and whitespace, nothing else (text outside the blocks would be bytes nobody reads).
PEM_CERTIFICATES = re.compile(
    rb"(?:\s*-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----)+\s*"
)


@dataclass(frozen=True)
class AmdExtensions:
    """What an AMD VCEK or VLEK certificate says about the chip and TCB it was issued for."""

    product: str | None
    tcb: TcbVersion | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def signing_key(self) -> str | None:
        if self.hwid is not None:
            return "vcek"
        if self.csp_id is not None:
            return "vlek"
        return None


@dataclass(frozen=True, eq=False)
class Cert:
    """A parsed certificate with the facts chain building needs, computed once."""

    der: bytes
    fingerprint: str
    x509: x509.Certificate
    subject: bytes
    issuer: bytes
    subject_text: str
    not_before: datetime
    not_after: datetime
    ca: bool | None
    path_length: int | None
    key_usage: x509.KeyUsage | None
    amd: AmdExtensions | None

    @functools.cached_property
    def public_key(self) -> Any:
        """The subject public key, or None for a key type cryptography does not support."""
        try:
            return self.x509.public_key()
        except Exception:  # UnsupportedAlgorithm, ValueError for malformed keys
            return None

    @functools.cached_property
    def serial(self) -> int:
        """The serial number, read without cryptography's warning about non-positive ones (AMD's are 0)."""
        with _warn_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return self.x509.serial_number

    @property
    def self_issued(self) -> bool:
        return self.subject == self.issuer

    def pem(self) -> str:
        return self.x509.public_bytes(Encoding.PEM).decode()


_cache: dict[str, Cert] = {}
_pem_cache: dict[bytes, tuple[Cert, ...]] = {}
_warn_lock = threading.Lock()
_CACHE_LIMIT = 4096


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def load_cert(der: bytes, *, field: str = "certificate") -> Cert:
    """Parse a DER certificate (cached by SHA-256). AMD's KDS issues VCEK/VLEK certificates with serial
    number 0, which RFC 5280 forbids; we accept that deliberately (cryptography only warns)."""
    der = bytes(der)
    fp = fingerprint(der)
    cached = _cache.get(fp)
    if cached is not None:
        return cached
    try:
        with _warn_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)  # about malformed names: hostile input, not ours
            cert = x509.load_der_x509_certificate(der)
            _require_whole_bit_strings(der)
            info = _describe(der, fp, cert)
    except EvidenceError:
        raise
    except Exception as exc:  # cryptography reports bad DER as ValueError, bad extensions variously
        raise EvidenceError(f"{field}: not a valid X.509 certificate ({exc})", field=field) from None
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[fp] = info
    return info


def load_pem_certs(pem: bytes, *, field: str) -> tuple[Cert, ...]:
    """Every certificate of a PEM bundle, in order (cached by the bundle's bytes)."""
    pem = bytes(pem)
    cached = _pem_cache.get(pem)
    if cached is not None:
        return cached
    try:
        with _warn_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            parsed = x509.load_pem_x509_certificates(pem)
    except Exception as exc:
        raise EvidenceError(f"{field}: not a PEM certificate chain ({exc})", field=field) from None
    certs = tuple(load_cert(c.public_bytes(Encoding.DER), field=field) for c in parsed)
    if len(_pem_cache) >= _CACHE_LIMIT:
        _pem_cache.clear()
    _pem_cache[pem] = certs
    return certs


def load_any(blob: bytes, *, field: str = "certificates") -> tuple[Cert, ...]:
    """Certificates from PEM (one or many), a single DER certificate, or an SNP certificate table."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise EvidenceError(f"{field}: certificates must be bytes, not {type(blob).__name__}", field=field)
    blob = bytes(blob)
    if b"-----BEGIN CERTIFICATE-----" in blob:
        if not PEM_CERTIFICATES.fullmatch(blob):
            raise EvidenceError(f"{field}: PEM holds more than certificates and whitespace", field=field)
        return load_pem_certs(blob, field=field)
    if blob[:1] == b"\x30":
        return (load_cert(blob, field=field),)
    return tuple(load_cert(der, field=f"{field}.{name}") for name, der in parse_snp_cert_table(blob))


def _require_whole_bit_strings(der: bytes) -> None:
    """DER's signature and key BIT STRINGs are whole bytes here; cryptography ignores a nonzero count of
    unused bits, which would let one certificate have several encodings that all verify."""
    parsed = asn1_x509.Certificate.load(der)
    for name, bits in (
        ("signature", parsed["signature_value"]),
        ("public key", parsed["tbs_certificate"]["subject_public_key_info"]["public_key"]),
    ):
        if bits.contents[:1] != b"\0":
            raise ValueError(f"its {name} BIT STRING declares unused bits")


def _describe(der: bytes, fp: str, cert: x509.Certificate) -> Cert:
    ca = path_length = key_usage = None
    amd_values: dict[str, bytes] = {}
    for ext in cert.extensions:
        oid = ext.oid.dotted_string
        if isinstance(ext.value, x509.BasicConstraints):
            ca, path_length = ext.value.ca, ext.value.path_length
        elif isinstance(ext.value, x509.KeyUsage):
            key_usage = ext.value
        elif oid.startswith("1.3.6.1.4.1.3704.") and isinstance(ext.value, x509.UnrecognizedExtension):
            amd_values[oid] = ext.value.value
    return Cert(
        der=der,
        fingerprint=fp,
        x509=cert,
        subject=cert.subject.public_bytes(),
        issuer=cert.issuer.public_bytes(),
        subject_text=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        ca=ca,
        path_length=path_length,
        key_usage=key_usage,
        amd=_amd_extensions(amd_values) if amd_values else None,
    )


def _amd_extensions(values: dict[str, bytes]) -> AmdExtensions:
    spls = [
        _der_integer(values.get(oid))
        for oid in (OID_AMD_BL_SPL, OID_AMD_TEE_SPL, OID_AMD_SNP_SPL, OID_AMD_UCODE_SPL)
    ]
    tcb = None
    if all(v is not None and 0 <= v <= 255 for v in spls):
        bl, tee, snp, ucode = spls
        tcb = TcbVersion(bootloader=bl, tee=tee, snp=snp, microcode=ucode)  # type: ignore[arg-type]
    hwid = values.get(OID_AMD_HWID)
    return AmdExtensions(
        product=_der_string(values.get(OID_AMD_PRODUCT_NAME)),
        tcb=tcb,
        hwid=hwid,
        csp_id=_der_string(values.get(OID_AMD_CSP_ID)),
    )


def _der_integer(raw: bytes | None) -> int | None:
    if not raw or len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2:
        return None
    return int.from_bytes(raw[2:], "big", signed=True)


def _der_string(raw: bytes | None) -> str | None:
    # IA5String (0x16), UTF8String (0x0c) or PrintableString (0x13), short form length
    if not raw or len(raw) < 2 or raw[0] not in (0x16, 0x0C, 0x13) or raw[1] != len(raw) - 2:
        return None
    return raw[2:].decode("utf-8", "replace")


def der_integer(value: int) -> bytes:
    """DER INTEGER with short-form length (the encoding AMD uses for SPL extensions)."""
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return bytes([0x02, len(body)]) + body


def der_ia5string(text: str) -> bytes:
    body = text.encode("ascii")
    return bytes([0x16, len(body)]) + body


# --- chains ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anchor:
    """A root of trust by name: which evidence kind it vouches for and its self-signed certificate."""

    name: str
    kind: str
    cert: Cert


@dataclass(frozen=True)
class Problem:
    code: str
    field: str
    message: str


@dataclass(frozen=True)
class Chain:
    """A path leaf -> ... -> anchor (or as far as it got) and every time-independent problem on it."""

    certs: tuple[Cert, ...]
    anchor: Anchor | None
    problems: tuple[Problem, ...]

    @property
    def leaf(self) -> Cert:
        return self.certs[0]

    def validity_problems(self, at: datetime, field: str) -> list[Problem]:
        found = []
        for cert in self.certs:
            if at < cert.not_before:
                found.append(
                    Problem(
                        "certificate-not-yet-valid",
                        field,
                        f"{cert.subject_text} is valid from {cert.not_before.isoformat()}, "
                        f"evidence time is {at.isoformat()}",
                    )
                )
            elif at > cert.not_after:
                found.append(
                    Problem(
                        "certificate-expired",
                        field,
                        f"{cert.subject_text} expired {cert.not_after.isoformat()}, "
                        f"evidence time is {at.isoformat()}",
                    )
                )
        return found


_chain_cache: dict[tuple[object, ...], Chain] = {}


def build_chain(
    leaf: Cert,
    pool: Sequence[Cert],
    anchors: Sequence[Anchor],
    *,
    field: str,
    leaf_field: str | None = None,
    leaf_signs: str = "data",
) -> Chain:
    """Walk issuer names from ``leaf`` through ``pool`` to one of ``anchors`` (matched by fingerprint),
    verifying every signature and the CA constraints. Problems are reported under ``field`` (those of the
    leaf itself under ``leaf_field``); ``leaf_signs`` is "data" or "crls" (a CRL issuer's chain). Cached by
    the fingerprints involved."""
    key = (
        field,
        leaf_field,
        leaf_signs,
        leaf.fingerprint,
        tuple(c.fingerprint for c in pool),
        tuple((a.name, a.cert.fingerprint) for a in anchors),
    )
    cached = _chain_cache.get(key)
    if cached is not None:
        return cached
    chain = _walk(leaf, pool, anchors, field, leaf_field or field, leaf_signs)
    if len(_chain_cache) >= _CACHE_LIMIT:
        _chain_cache.clear()
    _chain_cache[key] = chain
    return chain


_link_cache: dict[tuple[str, str], bool] = {}


def _signed_by(cert: Cert, issuer: Cert) -> bool:
    """Whether ``issuer`` signed ``cert`` (cached by both fingerprints: one changed certificate costs only
    the links it is on)."""
    key = (cert.fingerprint, issuer.fingerprint)
    cached = _link_cache.get(key)
    if cached is None:
        cached = _verify_link(cert, issuer)
        if len(_link_cache) >= _CACHE_LIMIT:
            _link_cache.clear()
        _link_cache[key] = cached
    return cached


def _verify_link(cert: Cert, issuer: Cert) -> bool:
    try:
        if not isinstance(cert.x509.signature_hash_algorithm, _ACCEPTED_HASHES):
            return False
        cert.x509.verify_directly_issued_by(issuer.x509)
    except Exception:  # UnsupportedAlgorithm (unknown OIDs), InvalidSignature, ValueError, TypeError
        return False
    return True


def _walk(
    leaf: Cert, pool: Sequence[Cert], anchors: Sequence[Anchor], field: str, leaf_field: str, leaf_signs: str
) -> Chain:
    by_fp = {a.cert.fingerprint: a for a in anchors}
    path = [leaf]
    problems: list[Problem] = []
    anchor = None
    while True:
        current = path[-1]
        if current.fingerprint in by_fp:
            anchor = by_fp[current.fingerprint]
            break
        if len(path) > MAX_CHAIN_LENGTH:
            problems.append(
                Problem("chain-invalid", field, f"chain longer than {MAX_CHAIN_LENGTH} certificates")
            )
            break
        if current.self_issued and _signed_by(current, current):
            problems.append(
                Problem(
                    "untrusted-root",
                    field,
                    f"chain ends at {current.subject_text} (SHA-256 {current.fingerprint}), "
                    "which is not a known root" + _lab_hint(current),
                )
            )
            break
        seen = {c.fingerprint for c in path}
        candidates = [a.cert for a in anchors if a.cert.subject == current.issuer]
        candidates += [c for c in pool if c.subject == current.issuer and c.fingerprint not in seen]
        issuer = next((c for c in candidates if _signed_by(current, c)), None)
        if issuer is None and candidates:
            # Report it, then keep walking with the named issuer: its own problems get reported too.
            where = leaf_field if current is leaf else field
            problems.append(
                Problem(
                    "chain-invalid",
                    where,
                    f"the signature on {current.subject_text} does not verify under any "
                    f"certificate named {candidates[0].subject_text}",
                )
            )
            issuer = candidates[0]
        elif issuer is None:
            problems.append(
                Problem(
                    "untrusted-root",
                    field,
                    f"no known certificate issued {current.subject_text} "
                    f"(issuer {current.x509.issuer.rfc4514_string()})" + _lab_hint(current),
                )
            )
            break
        path.append(issuer)
    problems += _constraint_problems(path, field, leaf_field, leaf_signs)
    return Chain(tuple(path), anchor, tuple(problems))


def _constraint_problems(path: Sequence[Cert], field: str, leaf_field: str, leaf_signs: str) -> list[Problem]:
    found = []
    leaf = path[0]
    usage = leaf.key_usage
    if leaf_signs == "crls":
        if usage is not None and not usage.crl_sign:
            found.append(
                Problem("ca-constraints", leaf_field, f"{leaf.subject_text} may not sign CRLs (keyUsage)")
            )
    elif usage is not None and not usage.digital_signature:
        found.append(Problem("ca-constraints", leaf_field, f"{leaf.subject_text} may not sign (keyUsage)"))
    for depth, ca in enumerate(path[1:]):
        if ca.ca is not True:
            found.append(
                Problem("ca-constraints", field, f"{ca.subject_text} is not a CA (basicConstraints)")
            )
        if ca.key_usage is not None and not ca.key_usage.key_cert_sign:
            found.append(
                Problem("ca-constraints", field, f"{ca.subject_text} may not sign certificates (keyUsage)")
            )
        if ca.path_length is not None and depth > ca.path_length:
            found.append(
                Problem(
                    "ca-constraints",
                    field,
                    f"{ca.subject_text} allows {ca.path_length} intermediate CAs below it, "
                    f"the chain has {depth}",
                )
            )
    return found


LAB_ORGANIZATION = "teelab lab CA (not a vendor)"  # the O= of every lab certificate (attest.lab_creation)


def _lab_hint(cert: Cert) -> str:
    """For a lab certificate the policy does not trust: how to trust it (lab evidence is never trusted unless
    a policy names the lab root)."""
    if (
        LAB_ORGANIZATION not in cert.subject_text
        and LAB_ORGANIZATION not in cert.x509.issuer.rfc4514_string()
    ):
        return ""
    return '; this is lab evidence: name the lab root in the policy (roots = ["lab"]) to trust it'
