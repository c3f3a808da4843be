"""CiphertextForRecipient: CMS EnvelopedData (RFC 5652) with RSAES-OAEP-SHA256 key transport and AES-256-CBC.

The shape AWS KMS returns to an attested enclave. ``seal`` is the KMS side, ``open_envelope`` the guest's;
both run on Debian's python3-cryptography 38 and python3-asn1crypto 1.5 as well as on newer releases.
"""

from __future__ import annotations

import hashlib
import os

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 4096

_OAEP_SHA256 = {
    "hash_algorithm": {"algorithm": "sha256"},
    "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
}


class EnvelopeError(ValueError):
    """A CiphertextForRecipient that is not the expected CMS shape, or that this key cannot open."""


def _oaep() -> asym_padding.OAEP:
    return asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def subject_key_identifier(public_key_der: bytes) -> bytes:
    """SHA-1 of the subjectPublicKey bits (RFC 5280 4.2.1.2 method 1): names the recipient in the envelope."""
    return _ski(load_recipient_key(public_key_der))


def _ski(key: rsa.RSAPublicKey) -> bytes:
    # for RSA the subjectPublicKey BIT STRING holds exactly the PKCS#1 RSAPublicKey DER
    return hashlib.sha1(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    ).digest()


def load_recipient_key(public_key_der: bytes) -> rsa.RSAPublicKey:
    """The recipient's RSA public key from SubjectPublicKeyInfo DER; EnvelopeError if unusable."""
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError) as exc:
        raise EnvelopeError(f"recipient public key is not a DER SubjectPublicKeyInfo: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EnvelopeError("recipient public key must be RSA for RSAES_OAEP_SHA_256")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise EnvelopeError(
            f"recipient RSA key is {key.key_size} bits; {MIN_RSA_BITS}..{MAX_RSA_BITS} accepted"
        )
    return key


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


# The constant parts of the envelope, encoded once by asn1crypto; seal() only frames the variable parts.
_VERSION_2 = core.Integer(2).dump()
_ENVELOPED_DATA = cms.ContentType("enveloped_data").dump()
_DATA = cms.ContentType("data").dump()
_AES256_CBC = algos.EncryptionAlgorithmId("aes256_cbc").dump()
_RSAES_OAEP_SHA256 = cms.KeyEncryptionAlgorithm(
    {"algorithm": "rsaes_oaep", "parameters": _OAEP_SHA256}
).dump()


def seal(plaintext: bytes, public_key_der: bytes) -> bytes:
    """DER ContentInfo(EnvelopedData) that only the holder of the private key for ``public_key_der`` opens:
    KeyTransRecipientInfo v2 naming the key by subject key identifier, RSAES-OAEP (SHA-256, MGF1-SHA-256),
    AES-256-CBC content with PKCS#7 padding."""
    recipient = load_recipient_key(public_key_der)
    content_key = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    ktri = _tlv(
        0x30,
        _VERSION_2
        + _tlv(0x80, _ski(recipient))
        + _RSAES_OAEP_SHA256
        + _tlv(0x04, recipient.encrypt(content_key, _oaep())),
    )
    content = _tlv(0x30, _DATA + _tlv(0x30, _AES256_CBC + _tlv(0x04, iv)) + _tlv(0x80, encrypted))
    enveloped = _tlv(0x30, _VERSION_2 + _tlv(0x31, ktri) + content)
    return _tlv(0x30, _ENVELOPED_DATA + _tlv(0xA0, enveloped))


def open_envelope(envelope: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext inside a CiphertextForRecipient; EnvelopeError if it is malformed or not for this key."""
    try:
        iv, encrypted, encrypted_key = _parse_envelope(envelope, _ski(private_key.public_key()))
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, EnvelopeError):
            raise
        raise EnvelopeError(f"not a CMS EnvelopedData: {exc}") from None
    if encrypted_key is None:
        raise EnvelopeError("no key-transport recipient in the envelope matches this key")
    if not isinstance(iv, bytes) or len(iv) != 16 or not encrypted or len(encrypted) % 16:
        raise EnvelopeError("AES-256-CBC parameters or ciphertext have the wrong length")
    try:
        content_key = private_key.decrypt(encrypted_key, _oaep())
    except ValueError:
        raise EnvelopeError("the content key does not decrypt with this private key") from None
    if len(content_key) != 32:
        raise EnvelopeError("the content key is not 32 bytes")
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(encrypted) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise EnvelopeError("bad padding after AES-256-CBC decryption") from None


def _parse_envelope(envelope: bytes, own_ski: bytes) -> tuple[object, bytes, bytes | None]:
    """(IV, encrypted content, the content key encrypted to ``own_ski`` or None) of an AES-256-CBC
    EnvelopedData; EnvelopeError (or what asn1crypto raises) when it is not one."""
    info = cms.ContentInfo.load(envelope)
    if info["content_type"].native != "enveloped_data":
        raise EnvelopeError(f"content type is {info['content_type'].native}, not enveloped_data")
    enveloped = info["content"]
    content = enveloped["encrypted_content_info"]
    algorithm = content["content_encryption_algorithm"]
    if algorithm["algorithm"].native != "aes256_cbc":
        raise EnvelopeError(f"content encryption is {algorithm['algorithm'].native}, not aes256_cbc")
    return algorithm["parameters"].native, content["encrypted_content"].native, _key_for(enveloped, own_ski)


def _key_for(enveloped: cms.EnvelopedData, own_ski: bytes) -> bytes | None:
    """The encrypted content key of the first key-transport recipient that is (or may be) this key."""
    for choice in enveloped["recipient_infos"]:
        if choice.name != "ktri":
            continue
        ktri = choice.chosen
        rid = ktri["rid"]
        if rid.name == "subject_key_identifier" and rid.chosen.native != own_ski:
            continue
        _check_oaep_sha256(ktri["key_encryption_algorithm"])
        return ktri["encrypted_key"].native
    return None


def _check_oaep_sha256(algorithm: cms.KeyEncryptionAlgorithm) -> None:
    if algorithm["algorithm"].native != "rsaes_oaep":
        raise EnvelopeError(f"key transport is {algorithm['algorithm'].native}, not rsaes_oaep")
    params = algorithm["parameters"]
    if not isinstance(params, algos.RSAESOAEPParams):
        raise EnvelopeError("rsaes_oaep without parameters (that would be SHA-1)")
    if params["hash_algorithm"]["algorithm"].native != "sha256":
        raise EnvelopeError("OAEP hash is not SHA-256")
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1" or mgf["parameters"]["algorithm"].native != "sha256":
        raise EnvelopeError("OAEP mask generation is not MGF1 with SHA-256")
