"""A corpus of malformed requests (over 1,000) gets 4xx answers with the right AWS error names, never a 5xx:
bad JSON, wrong types, huge bodies, base64 garbage, truncated or foreign-signed evidence, evidence bound to
another key, replayed nonces, broken signatures."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kms_raw import RawConnection
from teelab_guest import kms_sigv4
from teelab_guest.binding import report_data
from teelab_guest.kms_client import RecipientKey

from harness.attest import LabAuthority
from harness.kms import KmsServer

PCR0 = bytes.fromhex("3e" * 48)
SEEN: list[int] = []


class Raw(RawConnection):
    """Sends exact bytes with exact headers; every status is remembered in SEEN."""

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        status, data = self.send(body, headers)
        SEEN.append(status)
        return status, json.loads(data) if data else {}


@pytest.fixture(scope="module")
def raw(server: KmsServer) -> Raw:
    return Raw(server.endpoint)


@pytest.fixture(scope="module")
def sealed(server: KmsServer) -> tuple[str, str]:
    from harness.kms.material import encrypt_blob

    policy = {
        "Statement": {
            "Effect": "Allow",
            "Principal": "*",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Condition": {
                "StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCR0.hex()},
                "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
            },
        }
    }
    policy = {
        "Statement": [
            policy["Statement"],
            {"Effect": "Allow", "Action": "kms:*", "Principal": {"AWS": "arn:aws:iam::000000000000:root"}},
        ]
    }
    key = server.create_key(policy)
    blob = encrypt_blob(key.id, server.store.material(key.id), b"secret", None)
    return key.id, base64.b64encode(blob).decode()


def headers(op: str) -> dict[str, str]:
    return {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"TrentService.{op}"}


def expect(raw: Raw, op: str, body: bytes | dict, names: set[str] | str, extra: dict | None = None) -> dict:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {**headers(op), **(extra or {})} if extra is None or "host" not in extra else extra
    status, answer = raw.post(payload, sent)
    names = {names} if isinstance(names, str) else names
    assert 400 <= status < 500, (op, payload[:200], status, answer)
    assert answer.get("__type") in names, (op, payload[:200], answer)
    return answer


WRONG_VALUES = [1, -1, 2**70, 1.5, True, [], ["x"], {}, {"a": 1}, "", "x" * 5000, "\u0000"]
FIELDS = {
    "CreateKey": ["Policy", "Description", "KeyUsage", "KeySpec", "Tags", "BypassPolicyLockoutSafetyCheck"],
    "DescribeKey": ["KeyId"],
    "ListKeys": ["Limit", "Marker"],
    "Encrypt": ["KeyId", "Plaintext", "EncryptionContext", "EncryptionAlgorithm"],
    "Decrypt": ["CiphertextBlob", "KeyId", "EncryptionContext", "EncryptionAlgorithm", "Recipient"],
    "GenerateDataKey": ["KeyId", "KeySpec", "NumberOfBytes", "EncryptionContext", "Recipient"],
    "GenerateRandom": ["NumberOfBytes", "Recipient", "CustomKeyStoreId"],
    "GetKeyPolicy": ["KeyId", "PolicyName"],
    "PutKeyPolicy": ["KeyId", "PolicyName", "Policy"],
    "ScheduleKeyDeletion": ["KeyId", "PendingWindowInDays"],
}
VALIDATION = {
    "ValidationException",
    "NotFoundException",
    "MalformedPolicyDocumentException",
    "AccessDeniedException",
    "InvalidCiphertextException",
}


def test_wrong_types_and_values_for_every_field(raw: Raw, sealed: tuple[str, str]) -> None:
    key, blob = sealed
    base = {
        "Encrypt": {"KeyId": key, "Plaintext": "aGk="},
        "Decrypt": {"CiphertextBlob": blob},
        "GenerateDataKey": {"KeyId": key, "KeySpec": "AES_256"},
        "DescribeKey": {"KeyId": key},
        "GetKeyPolicy": {"KeyId": key},
        "PutKeyPolicy": {"KeyId": key, "Policy": "{}"},
        "ScheduleKeyDeletion": {"KeyId": key},
    }
    count = 0
    legal: list[tuple] = []
    for op, fields in FIELDS.items():
        for name in fields:
            for value in WRONG_VALUES:
                body = {**base.get(op, {}), name: value}
                status, answer = raw.post(json.dumps(body).encode(), headers(op))
                if status == 200:
                    legal.append((op, name, value))
                    continue
                assert 400 <= status < 500 and answer["__type"] in VALIDATION, (op, name, value, answer)
                count += 1
        expect(raw, op, {**base.get(op, {}), "Unexpected": 1}, "ValidationException")
    assert count > 350
    assert all(op in ("GenerateRandom",) for op, _, _ in legal), legal


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=1, max_size=300))
def test_random_bytes_are_serialization_or_validation_errors(raw: Raw, body: bytes) -> None:
    try:
        json.loads(body.decode("utf-8"))
        names = {"ValidationException", "AccessDeniedException"}
    except (UnicodeDecodeError, ValueError, RecursionError):
        names = {"SerializationException"}
    expect(raw, "Decrypt", body, names)


def test_json_oddities_huge_bodies_and_protocol_errors(raw: Raw, server: KmsServer) -> None:
    for body in (
        b"[" * 60_000,
        b'{"a": NaN}',
        b'{"Limit": 1' + b"0" * 5000 + b"}",
        b"\xff\xfe{}",
        b'{"a":1}x',
        b'"string"',
        b"[]",
        b"null",
    ):
        expect(
            raw, "ListKeys", body, {"SerializationException", "ValidationException", "AccessDeniedException"}
        )
    for size in (65537, 200_000, 2_000_000):
        expect(
            raw, "Decrypt", b'{"CiphertextBlob": "' + b"A" * size + b'"}', "RequestEntityTooLargeException"
        )
    expect(raw, "Fly", {}, "UnknownOperationException")
    status, answer = raw.post(b"{}", {"X-Amz-Target": "Other.ListKeys"})
    assert status == 400 and answer["__type"] == "UnknownOperationException"
    for auth, name in [
        ("Basic dXNlcjpwYXNz", "IncompleteSignatureException"),
        (
            "AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/kms/aws4_request, SignedHeaders=host, "
            "Signature=" + "0" * 64,
            "IncompleteSignatureException",
        ),
    ]:
        expect(raw, "ListKeys", {}, name, {"Authorization": auth, "X-Amz-Date": "20240101T000000Z"})
    creds = server.credentials("corpus")
    signed = kms_sigv4.sign(
        access_key=creds.access_key,
        secret=creds.secret,
        region="us-east-1",
        host=f"{raw.host}:{raw.port}",
        target="TrentService.ListKeys",
        body=b"{}",
    )
    status, _ = raw.post(b"{}", signed)
    assert status == 200
    expect(raw, "ListKeys", b"{ }", "InvalidSignatureException", signed)  # body changed after signing
    old = kms_sigv4.sign(
        access_key=creds.access_key,
        secret=creds.secret,
        region="us-east-1",
        host=f"{raw.host}:{raw.port}",
        target="TrentService.ListKeys",
        body=b"{}",
        now=1e9,
    )
    expect(raw, "ListKeys", b"{}", "InvalidSignatureException", old)


def test_base64_garbage(raw: Raw, sealed: tuple[str, str], server: KmsServer) -> None:
    key, blob = sealed
    garbage = ["!!!!", "abc", "a===", "Zm9v\n", "Zm9v YmFy", "", "=" * 8, "\u00e9t\u00e9", blob + "!"]
    for value in garbage:
        expect(
            raw, "Decrypt", {"CiphertextBlob": value}, {"ValidationException", "InvalidCiphertextException"}
        )
        expect(raw, "Encrypt", {"KeyId": key, "Plaintext": value}, "ValidationException")
        recipient = {"AttestationDocument": value, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}
        expect(raw, "Decrypt", {"CiphertextBlob": blob, "Recipient": recipient}, "ValidationException")
    creds = server.credentials("operator")
    flipped = bytearray(base64.b64decode(blob))
    for position in range(0, len(flipped), 3):
        mutated = bytearray(flipped)
        mutated[position] ^= 0x40
        body = json.dumps({"CiphertextBlob": base64.b64encode(bytes(mutated)).decode()}).encode()
        signed = kms_sigv4.sign(
            access_key=creds.access_key,
            secret=creds.secret,
            region="us-east-1",
            host=f"{raw.host}:{raw.port}",
            target="TrentService.Decrypt",
            body=body,
        )
        expect(raw, "Decrypt", body, {"InvalidCiphertextException", "NotFoundException"}, signed)


def test_bad_evidence(raw: Raw, sealed: tuple[str, str], lab: LabAuthority, tmp_path: Path) -> None:
    key, blob = sealed
    recipient = RecipientKey()
    doc = lab.attestation_document(
        pcrs={0: PCR0, 1: bytes(48)},
        public_key=recipient.public_key_der,
        user_data=None,
        nonce=None,
        module_id="i-corpus",
    )

    def send(evidence: bytes, names: set[str] | str, **more: str) -> None:
        field = {
            "AttestationDocument": base64.b64encode(evidence).decode(),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            **more,
        }
        expect(raw, "Decrypt", {"CiphertextBlob": blob, "Recipient": field}, names)

    for cut in range(1, len(doc), max(1, len(doc) // 120)):
        send(doc[:cut], "ValidationException")
    for position in range(0, len(doc), max(1, len(doc) // 150)):
        mutated = bytearray(doc)
        mutated[position] ^= 0x01
        send(bytes(mutated), {"ValidationException", "AccessDeniedException"})
    rogue = LabAuthority.load_or_create(tmp_path / "rogue-ca")  # a CA the KMS does not know
    foreign = rogue.attestation_document(
        pcrs={0: PCR0}, public_key=recipient.public_key_der, user_data=None, nonce=None, module_id="i-rogue"
    )
    send(foreign, "AccessDeniedException")
    nonce = os.urandom(32)
    thief = RecipientKey()
    report = lab.snp_report(report_data(nonce, recipient.public_key_der), measurement=bytes(48))
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    send(report, "AccessDeniedException", PublicKey=b64(thief.public_key_der), Nonce=b64(nonce))
    send(report, "ValidationException")  # SNP evidence without PublicKey and Nonce
    send(report[:1000], "ValidationException", PublicKey=b64(recipient.public_key_der), Nonce=b64(nonce))
    send(doc, "ValidationException", PublicKey=b64(thief.public_key_der), Nonce=b64(nonce))
    replayed = lab.attestation_document(
        pcrs={0: PCR0, 1: bytes(48)},
        public_key=recipient.public_key_der,
        user_data=None,
        nonce=os.urandom(16),
        module_id="i-corpus",
    )
    field = {"AttestationDocument": b64(replayed), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}
    status, _ = raw.post(
        json.dumps({"CiphertextBlob": blob, "Recipient": field}).encode(), headers("Decrypt")
    )
    assert status == 200
    for _ in range(20):
        expect(raw, "Decrypt", {"CiphertextBlob": blob, "Recipient": field}, "AccessDeniedException")
    expect(
        raw,
        "GenerateDataKey",
        {"KeyId": key, "KeySpec": "AES_256", "Recipient": field},
        "AccessDeniedException",
    )


def test_lone_surrogates_are_serialization_errors(
    raw: Raw, sealed: tuple[str, str], server: KmsServer
) -> None:
    """Issue 10: a lone surrogate ("\\ud800") in a Description, Policy or EncryptionContext gave a 500."""
    key, _ = sealed
    creds = server.credentials("surrogates")
    before = server.store.get_key(key, now=0).policy
    policy = json.loads(before)
    bodies = [
        ("CreateKey", {"Description": "\ud800"}),
        ("CreateKey", {"Policy": json.dumps(policy)[:-1] + ', "Id": "\udfff"}'}),
        ("PutKeyPolicy", {"KeyId": key, "PolicyName": "default", "Policy": "\ud800"}),
        ("Encrypt", {"KeyId": key, "Plaintext": "aGk=", "EncryptionContext": {"app": "\udc80"}}),
        ("Encrypt", {"KeyId": key, "Plaintext": "aGk=", "EncryptionContext": {"\udbff": "x"}}),
        ("ListKeys", {"Marker": "a\ud800b"}),
    ]

    def signed(op: str, payload: bytes) -> dict[str, str]:
        return kms_sigv4.sign(
            access_key=creds.access_key,
            secret=creds.secret,
            region="us-east-1",
            host=f"{raw.host}:{raw.port}",
            target=f"TrentService.{op}",
            body=payload,
        )

    for op, body in bodies:
        payload = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a \\u escape
        answer = expect(raw, op, payload, "SerializationException", signed(op, payload))
        assert "surrogate" in answer["message"]
    # a policy whose own text escapes a surrogate (valid outer JSON, no surrogate in the request)
    escaped = json.dumps({**policy, "Id": "\ud800"})
    assert "\\ud800" in escaped  # the escape is in the policy text, not in the request body
    payload = json.dumps({"KeyId": key, "PolicyName": "default", "Policy": escaped}).encode()
    answer = expect(
        raw, "PutKeyPolicy", payload, "MalformedPolicyDocumentException", signed("PutKeyPolicy", payload)
    )
    assert "surrogate" in answer["message"]
    for target in (b"TrentService.\xff\xfe", b"TrentService.ListKeys\xe9"):  # header bytes that are not UTF-8
        status, answer = raw.post(
            b"{}", {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target}
        )
        assert (status, answer["__type"]) == (400, "UnknownOperationException"), answer
    assert server.store.get_key(key, now=0).policy == before
    refusals = [row for row in server.store.audit(limit=10**6) if row.error == "SerializationException"]
    assert any("surrogate" in reason for row in refusals for reason in row.reasons)


def test_corpus_size_and_no_server_errors() -> None:
    """Runs last in this module: the corpus was over 1,000 requests and not one got a 5xx."""
    assert len(SEEN) >= 1000
    assert all(status < 500 for status in SEEN)
