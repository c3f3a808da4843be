"""CiphertextForRecipient: CMS EnvelopedData (RFC 5652) with RSAES-OAEP-SHA256 key transport and AES-256-CBC.

The shape AWS KMS returns to an attested enclave. ``seal`` is the KMS side, ``open_envelope`` the guest's;
both run on Debian's python3-cryptography 38 and python3-asn1crypto 1.5 as well as on newer releases.
"""

from __future__ import annotations

import hashlib
import os

from asn1crypto import algos, cms, core, keys
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
    info = keys.PublicKeyInfo.load(public_key_der)
    return hashlib.sha1(info["public_key"].contents[1:]).digest()


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


def seal(plaintext: bytes, public_key_der: bytes) -> bytes:
    """DER ContentInfo(EnvelopedData) that only the holder of the private key for ``public_key_der`` opens."""
    recipient = load_recipient_key(public_key_der)
    content_key = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    recipient_info = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                {"subject_key_identifier": subject_key_identifier(public_key_der)}
            ),
            "key_encryption_algorithm": {"algorithm": "rsaes_oaep", "parameters": _OAEP_SHA256},
            "encrypted_key": recipient.encrypt(content_key, _oaep()),
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v2",
            "recipient_infos": [cms.RecipientInfo({"ktri": recipient_info})],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {
                    "algorithm": "aes256_cbc",
                    "parameters": core.OctetString(iv),
                },
                "encrypted_content": encrypted,
            },
        }
    )
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


def open_envelope(envelope: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext inside a CiphertextForRecipient; EnvelopeError if it is malformed or not for this key."""
    try:
        info = cms.ContentInfo.load(envelope)
        if info["content_type"].native != "enveloped_data":
            raise EnvelopeError(f"content type is {info['content_type'].native}, not enveloped_data")
        enveloped = info["content"]
        content = enveloped["encrypted_content_info"]
        algorithm = content["content_encryption_algorithm"]
        if algorithm["algorithm"].native != "aes256_cbc":
            raise EnvelopeError(f"content encryption is {algorithm['algorithm'].native}, not aes256_cbc")
        iv = algorithm["parameters"].native
        encrypted = content["encrypted_content"].native
        own_ski = subject_key_identifier(
            private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        encrypted_key = None
        for choice in enveloped["recipient_infos"]:
            if choice.name != "ktri":
                continue
            ktri = choice.chosen
            rid = ktri["rid"]
            if rid.name == "subject_key_identifier" and rid.chosen.native != own_ski:
                continue
            _check_oaep_sha256(ktri["key_encryption_algorithm"])
            encrypted_key = ktri["encrypted_key"].native
            break
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
