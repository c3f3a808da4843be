"""Asymmetric and HMAC keys from boto3: signatures and ciphertexts that ``cryptography`` checks with the
public key GetPublicKey hands out, MACs, data key pairs, and the refusals AWS names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from harness.kms import KmsServer

HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms") as server:
        creds = server.credentials("admin")
        yield boto3.client(
            "kms",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret,
            config=Config(retries={"max_attempts": 1}),
        )


def refused(call, **kwargs: object) -> str:
    with pytest.raises(ClientError) as exc:
        call(**kwargs)
    return exc.value.response["Error"]["Code"]


def public_key(kms, key_id: str):
    return serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])


@pytest.mark.parametrize("spec", ["RSA_2048", "RSA_3072", "RSA_4096"])
def test_rsa_signatures_verify_with_the_public_key(kms, spec: str) -> None:
    key = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert key["SigningAlgorithms"] == [
        f"{p}_SHA_{h}" for p in ("RSASSA_PSS", "RSASSA_PKCS1_V1_5") for h in ("256", "384", "512")
    ]
    public = public_key(kms, key["KeyId"])
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == int(spec[4:])
    for algorithm in key["SigningAlgorithms"]:
        digest = HASHES[algorithm[-3:]]
        signature = kms.sign(KeyId=key["KeyId"], Message=b"pay 10", SigningAlgorithm=algorithm)["Signature"]
        pad = (
            padding.PSS(padding.MGF1(digest), digest.digest_size)
            if "PSS" in algorithm
            else padding.PKCS1v15()
        )
        public.verify(signature, b"pay 10", pad, digest)  # raises if it does not verify
        assert kms.verify(
            KeyId=key["KeyId"], Message=b"pay 10", Signature=signature, SigningAlgorithm=algorithm
        )["SignatureValid"]
        assert (
            refused(
                kms.verify,
                KeyId=key["KeyId"],
                Message=b"pay 99",
                Signature=signature,
                SigningAlgorithm=algorithm,
            )
            == "KMSInvalidSignatureException"
        )


@pytest.mark.parametrize(
    ("spec", "algorithm"), [("ECC_NIST_P256", "ECDSA_SHA_256"), ("ECC_NIST_P384", "ECDSA_SHA_384")]
)
def test_ecdsa_signatures_raw_and_digest(kms, spec: str, algorithm: str) -> None:
    key = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY", Description="signer")["KeyMetadata"]
    kms.create_alias(AliasName=f"alias/signer-{spec.lower()}", TargetKeyId=key["KeyId"])
    ref = f"alias/signer-{spec.lower()}"
    public = public_key(kms, ref)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    digest = HASHES[algorithm[-3:]]
    raw = kms.sign(KeyId=ref, Message=b"release v2", SigningAlgorithm=algorithm)["Signature"]
    public.verify(raw, b"release v2", ec.ECDSA(digest))
    hashed = hashlib.new(digest.name, b"release v2").digest()
    signed = kms.sign(KeyId=ref, Message=hashed, MessageType="DIGEST", SigningAlgorithm=algorithm)[
        "Signature"
    ]
    public.verify(signed, b"release v2", ec.ECDSA(digest))
    assert kms.verify(KeyId=ref, Message=b"release v2", Signature=signed, SigningAlgorithm=algorithm)[
        "SignatureValid"
    ]
    assert refused(kms.sign, KeyId=ref, Message=b"x", SigningAlgorithm="RSASSA_PSS_SHA_256") == (
        "InvalidKeyUsageException"
    )
    assert refused(
        kms.sign, KeyId=ref, Message=b"short", MessageType="DIGEST", SigningAlgorithm=algorithm
    ) == ("ValidationException")
    assert refused(kms.encrypt, KeyId=ref, Plaintext=b"x") == "InvalidKeyUsageException"
    assert refused(kms.generate_mac, KeyId=ref, Message=b"x", MacAlgorithm="HMAC_SHA_256") == (
        "InvalidKeyUsageException"
    )


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])
def test_rsa_encryption_both_ways(kms, algorithm: str) -> None:
    key = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    assert key["EncryptionAlgorithms"] == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    digest = hashes.SHA1() if algorithm.endswith("_1") else hashes.SHA256()
    oaep = padding.OAEP(padding.MGF1(digest), digest, None)
    outside = public_key(kms, key["KeyId"]).encrypt(b"wrapped outside", oaep)
    out = kms.decrypt(CiphertextBlob=outside, KeyId=key["KeyId"], EncryptionAlgorithm=algorithm)
    assert (out["Plaintext"], out["EncryptionAlgorithm"]) == (b"wrapped outside", algorithm)
    inside = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"wrapped inside", EncryptionAlgorithm=algorithm)
    assert inside["EncryptionAlgorithm"] == algorithm and len(inside["CiphertextBlob"]) == 256
    again = kms.decrypt(
        CiphertextBlob=inside["CiphertextBlob"], KeyId=key["KeyId"], EncryptionAlgorithm=algorithm
    )
    assert again["Plaintext"] == b"wrapped inside"
    limit = 256 - 2 * digest.digest_size - 2
    assert refused(
        kms.encrypt, KeyId=key["KeyId"], Plaintext=bytes(limit + 1), EncryptionAlgorithm=algorithm
    ) == ("ValidationException")
    assert refused(kms.encrypt, KeyId=key["KeyId"], Plaintext=b"x") == "InvalidKeyUsageException"
    assert refused(kms.decrypt, CiphertextBlob=outside, KeyId=key["KeyId"]) == "InvalidKeyUsageException"
    # an RSA ciphertext cannot bind an encryption context: one is refused, not ignored
    with_context = {"KeyId": key["KeyId"], "EncryptionAlgorithm": algorithm, "EncryptionContext": {"a": "b"}}
    assert refused(kms.encrypt, Plaintext=b"x", **with_context) == "ValidationException"
    assert refused(kms.decrypt, CiphertextBlob=outside, **with_context) == "ValidationException"
    assert refused(kms.decrypt, CiphertextBlob=outside, EncryptionAlgorithm=algorithm) == (
        "InvalidCiphertextException"
    )
    other = "RSAES_OAEP_SHA_256" if algorithm.endswith("_1") else "RSAES_OAEP_SHA_1"
    assert refused(kms.decrypt, CiphertextBlob=outside, KeyId=key["KeyId"], EncryptionAlgorithm=other) == (
        "InvalidCiphertextException"
    )


def test_hmac_keys(kms) -> None:
    key = kms.create_key(KeySpec="HMAC_384", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    assert key["MacAlgorithms"] == ["HMAC_SHA_384"] and "EncryptionAlgorithms" not in key
    mac = kms.generate_mac(KeyId=key["KeyId"], Message=b"token", MacAlgorithm="HMAC_SHA_384")["Mac"]
    assert len(mac) == 48
    assert kms.generate_mac(KeyId=key["KeyId"], Message=b"token", MacAlgorithm="HMAC_SHA_384")["Mac"] == mac
    assert kms.verify_mac(KeyId=key["KeyId"], Message=b"token", MacAlgorithm="HMAC_SHA_384", Mac=mac)[
        "MacValid"
    ]
    assert (
        refused(kms.verify_mac, KeyId=key["KeyId"], Message=b"token!", MacAlgorithm="HMAC_SHA_384", Mac=mac)
        == "KMSInvalidMacException"
    )
    assert refused(kms.generate_mac, KeyId=key["KeyId"], Message=b"t", MacAlgorithm="HMAC_SHA_256") == (
        "InvalidKeyUsageException"
    )
    other = kms.create_key(KeySpec="HMAC_384", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    assert kms.generate_mac(KeyId=other, Message=b"token", MacAlgorithm="HMAC_SHA_384")["Mac"] != mac
    assert refused(kms.get_public_key, KeyId=other) == "UnsupportedOperationException"
    assert refused(kms.create_key, KeySpec="HMAC_256") == "ValidationException"  # needs GENERATE_VERIFY_MAC


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256", "ECC_NIST_P384"])
def test_data_key_pairs(kms, spec: str) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    pair = kms.generate_data_key_pair(KeyId=key, KeyPairSpec=spec, EncryptionContext={"for": "tls"})
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert private.public_key().public_bytes(*spki) == pair["PublicKey"]
    assert pair["KeyPairSpec"] == spec and pair["KeyId"].endswith(key)
    stored = kms.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"], EncryptionContext={"for": "tls"})
    assert stored["Plaintext"] == pair["PrivateKeyPlaintext"]
    bare = kms.generate_data_key_pair_without_plaintext(KeyId=key, KeyPairSpec=spec)
    assert "PrivateKeyPlaintext" not in bare
    later = serialization.load_der_private_key(
        kms.decrypt(CiphertextBlob=bare["PrivateKeyCiphertextBlob"])["Plaintext"], None
    )
    assert later.public_key().public_bytes(*spki) == bare["PublicKey"]


def test_data_key_pair_refusals(kms) -> None:
    signing = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    assert (
        refused(kms.generate_data_key_pair, KeyId=signing, KeyPairSpec="RSA_2048")
        == "InvalidKeyUsageException"
    )
    rsa_key = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    assert refused(
        kms.generate_data_key_pair_without_plaintext, KeyId=rsa_key, KeyPairSpec="ECC_NIST_P256"
    ) == ("InvalidKeyUsageException")
    assert refused(kms.generate_data_key, KeyId=rsa_key, KeySpec="AES_256") == "InvalidKeyUsageException"
    assert (
        refused(kms.create_key, KeySpec="ECC_NIST_P256", KeyUsage="ENCRYPT_DECRYPT") == "ValidationException"
    )
    symmetric = kms.create_key()["KeyMetadata"]["KeyId"]
    assert refused(kms.get_public_key, KeyId=symmetric) == "UnsupportedOperationException"
    assert refused(kms.sign, KeyId=symmetric, Message=b"x", SigningAlgorithm="ECDSA_SHA_256") == (
        "InvalidKeyUsageException"
    )


def test_re_encrypt_from_an_rsa_key(kms) -> None:
    source = kms.create_key(KeySpec="RSA_3072", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    target = kms.create_key()["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=source, Plaintext=b"hop", EncryptionAlgorithm="RSAES_OAEP_SHA_256")[
        "CiphertextBlob"
    ]
    moved = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceKeyId=source,
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        DestinationKeyId=target,
    )
    assert kms.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"] == b"hop"
