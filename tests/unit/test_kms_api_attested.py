"""Attestation conditions gate every operation that can release material: Decrypt, GenerateDataKey*,
GenerateDataKeyPair*, GenerateRandom and ReEncrypt's source. Without verified evidence a conditioned statement
never applies (fail closed); with it, what is released travels only as CiphertextForRecipient."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from teelab_guest.kms_client import KmsCallError, KmsClient, RecipientKey, Transport

from harness.attest import LabAuthority
from harness.kms import KmsServer

PCR0 = bytes.fromhex("5a" * 48)
ATTESTED = {
    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex()},
    "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
}
RELEASING = [
    "Decrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext", "ReEncrypt",
]  # fmt: skip


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def world(server: KmsServer, lab: LabAuthority) -> dict[str, Any]:
    """A key whose only anonymous statement (kms:*) needs lab evidence of PCR0, an open destination key,
    a ciphertext under the first, and a recipient with good and wrong evidence."""
    admin = server.credentials("admin")
    operator = {"Effect": "Allow", "Principal": {"AWS": admin.arn}, "Action": "kms:*"}
    guarded = server.create_key(
        {
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Condition": ATTESTED},
                operator,
            ]
        }
    )
    open_key = server.create_key({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]})
    signed = KmsClient(Transport.endpoint(server.endpoint), access_key=admin.access_key, secret=admin.secret)
    recipient = RecipientKey()

    def document(pcr0: bytes) -> bytes:
        return lab.attestation_document(
            pcrs={0: pcr0, 1: bytes.fromhex("11" * 48), 2: bytes(48)},
            public_key=recipient.public_key_der,
            user_data=None,
            nonce=None,
            module_id="i-release",
        )

    return {
        "guarded": guarded.id,
        "open": open_key.id,
        "blob": signed.encrypt(guarded.id, b"released only to PCR0"),
        "recipient": recipient,
        "good": recipient.field(document(PCR0)),
        "wrong": recipient.field(document(bytes(range(48)))),
        "anonymous": KmsClient(Transport.endpoint(server.endpoint)),
        "server": server,
    }


def body(world: dict[str, Any], operation: str) -> dict[str, Any]:
    key, blob = world["guarded"], b64(world["blob"])
    return {
        "Decrypt": {"CiphertextBlob": blob},
        "GenerateDataKey": {"KeyId": key, "NumberOfBytes": 32},
        "GenerateDataKeyWithoutPlaintext": {"KeyId": key, "NumberOfBytes": 32},
        "GenerateDataKeyPair": {"KeyId": key, "KeyPairSpec": "ECC_NIST_P256"},
        "GenerateDataKeyPairWithoutPlaintext": {"KeyId": key, "KeyPairSpec": "ECC_NIST_P256"},
        "ReEncrypt": {"CiphertextBlob": blob, "DestinationKeyId": world["open"]},
    }[operation]


def refusal(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(KmsCallError) as exc:
        call()
    return exc.value.aws_type


@pytest.mark.parametrize("operation", RELEASING)
def test_without_evidence_a_conditioned_statement_never_applies(
    world: dict[str, Any], operation: str
) -> None:
    assert (
        refusal(lambda: world["anonymous"].call(operation, body(world, operation))) == "AccessDeniedException"
    )


@pytest.mark.parametrize("operation", ["Decrypt", "GenerateDataKey", "GenerateDataKeyPair"])
def test_wrong_evidence_is_refused(world: dict[str, Any], operation: str) -> None:
    request = {**body(world, operation), "Recipient": world["wrong"]}
    assert refusal(lambda: world["anonymous"].call(operation, request)) == "AccessDeniedException"


@pytest.mark.parametrize(
    "operation", ["GenerateDataKeyWithoutPlaintext", "GenerateDataKeyPairWithoutPlaintext", "ReEncrypt"]
)
def test_operations_without_a_recipient_field_refuse_one(world: dict[str, Any], operation: str) -> None:
    request = {**body(world, operation), "Recipient": world["good"]}
    assert refusal(lambda: world["anonymous"].call(operation, request)) == "ValidationException"


def test_good_evidence_gets_material_only_as_ciphertext_for_recipient(world: dict[str, Any]) -> None:
    anonymous, recipient = world["anonymous"], world["recipient"]

    def released(operation: str) -> tuple[dict[str, Any], bytes]:
        answer = anonymous.call(operation, {**body(world, operation), "Recipient": world["good"]})
        assert "Plaintext" not in answer and "PrivateKeyPlaintext" not in answer
        return answer, recipient.open(base64.b64decode(answer["CiphertextForRecipient"]))

    assert released("Decrypt")[1] == b"released only to PCR0"
    answer, data_key = released("GenerateDataKey")
    assert len(data_key) == 32 and answer["CiphertextBlob"]
    answer, private_der = released("GenerateDataKeyPair")
    private = serialization.load_der_private_key(private_der, None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert b64(private.public_key().public_bytes(*spki)) == answer["PublicKey"]
    assert answer["PrivateKeyCiphertextBlob"]


def test_generate_random_under_an_attested_account_policy(world: dict[str, Any]) -> None:
    server: KmsServer = world["server"]
    server.set_account_policy(
        {
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:GenerateRandom", "Condition": ATTESTED}
            ]
        }
    )
    try:
        anonymous = world["anonymous"]
        assert (
            refusal(lambda: anonymous.call("GenerateRandom", {"NumberOfBytes": 16}))
            == "AccessDeniedException"
        )
        answer = anonymous.call("GenerateRandom", {"NumberOfBytes": 16, "Recipient": world["good"]})
        assert "Plaintext" not in answer
        assert len(world["recipient"].open(base64.b64decode(answer["CiphertextForRecipient"]))) == 16
    finally:
        server.set_account_policy(None)
