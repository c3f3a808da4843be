"""Key specs as AWS KMS names them: what each spec is for, its algorithms and its material (cryptography).

Symmetric keys keep 32 random bytes; asymmetric keys a PKCS#8 DER private key; HMAC keys their secret. The
material is wrapped under the master key like any other.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from harness.kms.errors import InvalidCiphertext, InvalidKeyUsage, KmsRequestError

ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
SIGN_VERIFY = "SIGN_VERIFY"
GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
SYMMETRIC = "SYMMETRIC_DEFAULT"

_HASHES = {"SHA_1": hashes.SHA1, "SHA_256": hashes.SHA256, "SHA_384": hashes.SHA384, "SHA_512": hashes.SHA512}
_RSA_SIGNING = tuple(
    f"{p}_{h}" for p in ("RSASSA_PSS", "RSASSA_PKCS1_V1_5") for h in ("SHA_256", "SHA_384", "SHA_512")
)
_RSA_ENCRYPTION = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")
_CURVES = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1, "ECC_NIST_P521": ec.SECP521R1}
_ECDSA = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
}
_HMAC_BITS = {"HMAC_224": 224, "HMAC_256": 256, "HMAC_384": 384, "HMAC_512": 512}
MAX_MESSAGE = 4096


@dataclass(frozen=True)
class Spec:
    """One KeySpec: the usages CreateKey allows with it, and the algorithms of each usage."""

    name: str
    usages: tuple[str, ...]
    encryption: tuple[str, ...] = ()
    signing: tuple[str, ...] = ()
    mac: tuple[str, ...] = ()

    def algorithms(self, usage: str) -> dict[str, list[str]]:
        """DescribeKey's and GetPublicKey's algorithm lists for a key of this spec and ``usage``."""
        if usage == ENCRYPT_DECRYPT:
            return {"EncryptionAlgorithms": list(self.encryption)}
        if usage == SIGN_VERIFY:
            return {"SigningAlgorithms": list(self.signing)}
        return {"MacAlgorithms": list(self.mac)}


SPECS: dict[str, Spec] = {
    SYMMETRIC: Spec(SYMMETRIC, (ENCRYPT_DECRYPT,), encryption=(SYMMETRIC,)),
    **{
        f"RSA_{bits}": Spec(
            f"RSA_{bits}", (ENCRYPT_DECRYPT, SIGN_VERIFY), encryption=_RSA_ENCRYPTION, signing=_RSA_SIGNING
        )
        for bits in (2048, 3072, 4096)
    },
    **{name: Spec(name, (SIGN_VERIFY,), signing=(_ECDSA[name],)) for name in _CURVES},
    **{
        name: Spec(name, (GENERATE_VERIFY_MAC,), mac=(f"HMAC_SHA_{bits}",))
        for name, bits in _HMAC_BITS.items()
    },
}  # fmt: skip
ALL_SIGNING = (*_RSA_SIGNING, *_ECDSA.values())
ALL_MAC = tuple(f"HMAC_SHA_{bits}" for bits in _HMAC_BITS.values())
DATA_KEY_PAIR_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521")


def is_asymmetric(spec: str) -> bool:
    return spec.startswith(("RSA_", "ECC_"))


def new_material(spec: str) -> bytes:
    """Fresh material for a key of ``spec``: 32 bytes, an HMAC secret, or a PKCS#8 DER private key."""
    if spec == SYMMETRIC:
        return secrets.token_bytes(32)
    if spec in _HMAC_BITS:
        return secrets.token_bytes(_HMAC_BITS[spec] // 8)
    return private_der(generate_private(spec))


def generate_private(spec: str) -> PrivateKeyTypes:
    if spec.startswith("RSA_"):
        return rsa.generate_private_key(65537, int(spec[4:]))
    return ec.generate_private_key(_CURVES[spec]())


def private_der(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_der(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@lru_cache(maxsize=256)
def load_private(material: bytes) -> PrivateKeyTypes:
    """The private key of an asymmetric key's material (parsed once: RSA loading checks the key)."""
    return serialization.load_der_private_key(material, None)


def _check(spec: str, usage: str, algorithm: str, kind: str) -> None:
    allowed = getattr(SPECS[spec], kind)
    if algorithm not in allowed:
        raise InvalidKeyUsage(
            f"{algorithm} is not a {kind} algorithm of a {spec} {usage} key "
            f"(it has {', '.join(allowed) or 'none'})"
        )


def _oaep(algorithm: str) -> padding.OAEP:
    digest = _HASHES[algorithm.removeprefix("RSAES_OAEP_")]()
    return padding.OAEP(padding.MGF1(digest), digest, None)


def encrypt(spec: str, material: bytes, algorithm: str, plaintext: bytes) -> bytes:
    """RSAES-OAEP under an RSA ENCRYPT_DECRYPT key; ValidationException when the plaintext is too long."""
    _check(spec, ENCRYPT_DECRYPT, algorithm, "encryption")
    key = load_private(material)
    assert isinstance(key, rsa.RSAPrivateKey)
    digest_size = _HASHES[algorithm.removeprefix("RSAES_OAEP_")].digest_size
    limit = key.key_size // 8 - 2 * digest_size - 2
    if len(plaintext) > limit:
        raise KmsRequestError(f"Plaintext must be at most {limit} bytes for {spec} with {algorithm}")
    return key.public_key().encrypt(plaintext, _oaep(algorithm))


def decrypt(spec: str, material: bytes, algorithm: str, ciphertext: bytes) -> bytes:
    _check(spec, ENCRYPT_DECRYPT, algorithm, "encryption")
    key = load_private(material)
    assert isinstance(key, rsa.RSAPrivateKey)
    try:
        return key.decrypt(ciphertext, _oaep(algorithm))
    except ValueError:
        raise InvalidCiphertext(
            f"CiphertextBlob does not decrypt under this {spec} key with {algorithm}"
        ) from None


def _signing(
    spec: str, algorithm: str, message: bytes, message_type: str
) -> tuple[hashes.HashAlgorithm, bytes]:
    """The hash of ``algorithm`` and the digest to sign: ``message`` hashed, or itself (DIGEST)."""
    _check(spec, SIGN_VERIFY, algorithm, "signing")
    digest = _HASHES["SHA_" + algorithm.rsplit("_", 1)[1]]()
    if message_type == "RAW":
        return digest, hashlib.new(digest.name, message).digest()
    if len(message) != digest.digest_size:
        raise KmsRequestError(f"a DIGEST message for {algorithm} must be {digest.digest_size} bytes")
    return digest, message


def _rsa_padding(algorithm: str, digest: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    if algorithm.startswith("RSASSA_PSS"):
        return padding.PSS(padding.MGF1(digest), digest.digest_size)  # AWS: salt length = digest length
    return padding.PKCS1v15()


def sign(spec: str, material: bytes, algorithm: str, message: bytes, message_type: str) -> bytes:
    """A signature as AWS KMS makes it: RSASSA-PSS/PKCS#1 v1.5, or a DER-encoded ECDSA signature."""
    digest, value = _signing(spec, algorithm, message, message_type)
    key = load_private(material)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(value, _rsa_padding(algorithm, digest), utils.Prehashed(digest))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(value, ec.ECDSA(utils.Prehashed(digest)))


def verify(
    spec: str, material: bytes, algorithm: str, message: bytes, message_type: str, signature: bytes
) -> bool:
    digest, value = _signing(spec, algorithm, message, message_type)
    public = load_private(material).public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, value, _rsa_padding(algorithm, digest), utils.Prehashed(digest))
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(signature, value, ec.ECDSA(utils.Prehashed(digest)))
    except InvalidSignature:
        return False
    return True


def mac(spec: str, material: bytes, algorithm: str, message: bytes) -> bytes:
    _check(spec, GENERATE_VERIFY_MAC, algorithm, "mac")
    return hmac.new(material, message, algorithm.removeprefix("HMAC_").replace("_", "").lower()).digest()
