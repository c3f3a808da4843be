"""The EIF signature section: a COSE_Sign1 over {register_index: 0, register_value: PCR0} and its certificate.

The section is laid out as nitro-cli writes it (serde_cbor of ``Vec<PcrSignature>``): byte fields are CBOR
arrays of small integers, not byte strings; reading accepts either.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from harness.enclave.errors import EifSignatureMalformed, EifSignatureMismatch, SigningKeyInvalid

SIGNATURE_SECTION_MAX_BYTES = 32768
COSE_ALG_ES384 = -35
# COSE algorithm -> (hash, curve, coordinate bytes); nitro-cli signs with whichever curve the key has.
COSE_ALGORITHMS: dict[int, tuple[type[hashes.HashAlgorithm], type[ec.EllipticCurve], int]] = {
    -7: (hashes.SHA256, ec.SECP256R1, 32),
    -35: (hashes.SHA384, ec.SECP384R1, 48),
    -36: (hashes.SHA512, ec.SECP521R1, 66),
}


@dataclass(frozen=True)
class SigningMaterial:
    """A P-384 private key and the certificate of its public key, checked to belong together."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class SignatureEntry:
    """The first {signing_certificate, signature} of a signature section, decoded and checked to be readable:
    the certificate, its DER (what PCR8 measures), its public key, nitro-cli's description of it, the COSE."""

    certificate: x509.Certificate
    certificate_der: bytes
    public_key: Any
    subject: str
    info: dict[str, Any]
    cose_sign1: bytes


def load_signing_material(private_key: Path | bytes, certificate: Path | bytes) -> SigningMaterial:
    """Load a PEM EC P-384 key and a PEM or DER certificate (paths or bytes); refuse a mismatched pair."""
    key_bytes = _read(private_key, "private key")
    cert_bytes = _read(certificate, "signing certificate")
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyInvalid(
            f"cannot load the private key: {err}",
            hint="give an unencrypted PEM EC P-384 key (openssl ecparam -name secp384r1)",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SigningKeyInvalid(
            "the private key is not an EC P-384 key",
            hint="EIF signatures here are ES384",
            key_type=type(key).__name__,
        )
    cert = _load_certificate(cert_bytes)
    if cert.public_key() != key.public_key():
        raise SigningKeyInvalid(
            "the certificate is not for this private key",
            hint="give the certificate issued for the signing key's public key",
            subject=cert.subject.rfc4514_string(),
        )
    return SigningMaterial(key, cert)


def _read(source: Path | bytes, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as err:
        raise SigningKeyInvalid(
            f"cannot read the {what} {source}: {err.strerror}",
            hint=f"check the {what} path",
            path=str(source),
        ) from None


def _load_certificate(data: bytes) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise SigningKeyInvalid(
            f"cannot load the signing certificate: {err}", hint="give a PEM or DER X.509 certificate"
        ) from None


def pcr0_payload(pcr0: bytes) -> bytes:
    """The signed payload, as serde_cbor writes nitro's ``PcrInfo {register_index: 0, register_value}``."""
    return cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign_pcr0(material: SigningMaterial, pcr0: bytes) -> bytes:
    """An untagged COSE_Sign1 (ES384) over the PCR0 payload."""
    protected = cbor2.dumps({1: COSE_ALG_ES384})
    payload = pcr0_payload(pcr0)
    der = material.key.sign(_sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


def signature_section(material: SigningMaterial, pcr0: bytes) -> bytes:
    """The whole signature section: a CBOR array with one {signing_certificate (PEM), signature}."""
    entry = {
        "signing_certificate": list(material.certificate_pem),
        "signature": list(sign_pcr0(material, pcr0)),
    }
    return cbor2.dumps([entry])


def _loads_exactly(data: bytes) -> Any:
    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} bytes after the CBOR item")
    return value


def _byte_field(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, list) and all(type(v) is int and 0 <= v <= 255 for v in value):
        return bytes(value)
    raise EifSignatureMalformed(
        f"{what} is neither a byte string nor an array of bytes",
        hint="rebuild or re-sign the image",
        found=type(value).__name__,
    )


def parse_signature_section(data: bytes) -> SignatureEntry:
    """Decode the first entry of a signature section; anything malformed raises E911."""
    hint = "rebuild or re-sign the image"
    try:
        entries = _loads_exactly(data)
    except Exception as err:
        raise EifSignatureMalformed(f"the signature section is not CBOR: {err}", hint=hint) from None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise EifSignatureMalformed("the signature section is not a non-empty array of maps", hint=hint)
    first = entries[0]
    if "signing_certificate" not in first or "signature" not in first:
        raise EifSignatureMalformed(
            "the signature entry lacks signing_certificate or signature",
            hint=hint,
            keys=[str(k) for k in first],
        )
    cert_pem = _byte_field(first["signing_certificate"], "signing_certificate")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        # x509 parses parts lazily: read now what later steps use, so a damaged certificate fails here
        der = certificate.public_bytes(serialization.Encoding.DER)
        public_key = certificate.public_key()
        subject = certificate.subject.rfc4514_string()
        info = certificate_info(certificate)
    except Exception as err:
        raise EifSignatureMalformed(
            f"signing_certificate is not a readable PEM certificate: {err}", hint=hint
        ) from None
    signature = _byte_field(first["signature"], "signature")
    return SignatureEntry(certificate, der, public_key, subject, info, signature)


def _decode_cose_sign1(data: bytes) -> tuple[bytes, int, bytes, bytes]:
    """(protected, alg, payload, signature) of a COSE_Sign1, tagged (18) or not."""
    try:
        item = _loads_exactly(data)
    except Exception as err:
        raise EifSignatureMalformed(f"the signature is not CBOR: {err}", hint="re-sign the image") from None
    if isinstance(item, cbor2.CBORTag) and item.tag == 18:
        item = item.value
    if not (
        isinstance(item, list)
        and len(item) == 4
        and isinstance(item[0], bytes)
        and isinstance(item[1], dict)
        and isinstance(item[2], bytes)
        and isinstance(item[3], bytes)
    ):
        raise EifSignatureMalformed(
            "the signature is not a COSE_Sign1 [protected, {}, payload, signature]", hint="re-sign the image"
        )
    try:
        header = _loads_exactly(item[0])
    except Exception:
        header = None
    alg = header.get(1) if isinstance(header, dict) else None
    if type(alg) is not int or alg not in COSE_ALGORITHMS:
        raise EifSignatureMalformed(
            f"the COSE protected header names no supported algorithm: {alg!r}",
            hint="sign with ES256, ES384 or ES512",
        )
    return item[0], alg, item[2], item[3]


def check_signature(entry: SignatureEntry, pcr0: bytes) -> str | None:
    """None when the COSE_Sign1 verifies with the certificate's key and signs this PCR0; else the reason."""
    protected, alg, payload, signature = _decode_cose_sign1(entry.cose_sign1)
    hash_type, curve_type, size = COSE_ALGORITHMS[alg]
    key = entry.public_key
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve_type):
        return f"the certificate's key does not fit COSE algorithm {alg}"
    if len(signature) != 2 * size:
        return f"the signature is {len(signature)} bytes, not {2 * size}"
    der = encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    try:
        key.verify(der, _sig_structure(protected, payload), ec.ECDSA(hash_type()))
    except InvalidSignature:
        return "the COSE_Sign1 signature does not verify with the certificate's key"
    try:
        signed = _loads_exactly(payload)
        index = signed["register_index"]
        value = _byte_field(signed["register_value"], "register_value")
    except Exception:
        return "the signed payload is not {register_index, register_value}"
    if type(index) is not int or index != 0:
        return f"the signature is for PCR{index}, not PCR0"
    if value != pcr0:
        return "the signature is for another PCR0 than this image's"
    return None


def require_valid_signature(entry: SignatureEntry, pcr0: bytes, *, now: datetime | None = None) -> None:
    """Raise E912 unless the signature verifies, signs this PCR0 and the certificate is valid ``now``."""
    problem = check_signature(entry, pcr0)
    when = now or datetime.now(UTC)
    cert = entry.certificate
    if problem is None and not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        problem = (
            f"the signing certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {when:%Y-%m-%d}"
        )
    if problem is not None:
        raise EifSignatureMismatch(
            problem,
            hint="re-sign the image with a current certificate",
            subject=entry.subject,
        )


def certificate_info(certificate: x509.Certificate) -> dict[str, Any]:
    """nitro-cli's ``SigningCertificate`` object of describe-eif."""
    issuer: dict[str, str] = {}
    for attribute in certificate.issuer:
        name = getattr(attribute.oid, "_name", None) or attribute.oid.dotted_string
        issuer[name] = str(attribute.value)
    oid = certificate.signature_algorithm_oid
    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": getattr(oid, "_name", None) or oid.dotted_string,
        "NotBefore": _openssl_time(certificate.not_valid_before_utc),
        "NotAfter": _openssl_time(certificate.not_valid_after_utc),
        "Signature": certificate.signature.hex(":").upper(),
    }


def _openssl_time(when: datetime) -> str:
    # OpenSSL's ASN1_TIME_print form, which nitro-cli shows: "Jan  2 03:04:05 2025 GMT".
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S %Y} GMT"
