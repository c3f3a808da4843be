"""The KMS as an AWS SDK sees it: boto3 with a custom endpoint, SigV4 with lab credentials, AWS errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from teelab_guest.kms_client import KmsCallError, KmsClient, Transport

from harness.kms import KmsServer, Listen, Store
from harness.kms.errors import MasterKeyError
from harness.kms.material import MASTER_KEY_ENV


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsServer]:
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms") as srv:
        yield srv


def client(server: KmsServer, access_key: str, secret: str, **kwargs: object):
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}),
        **kwargs,
    )


@pytest.fixture(scope="module")
def admin(server: KmsServer):
    creds = server.credentials("admin")
    return client(server, creds.access_key, creds.secret)


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def test_boto3_key_lifecycle(admin) -> None:
    key = admin.create_key(Description="lifecycle")["KeyMetadata"]
    assert key["KeyState"] == "Enabled" and key["Arn"].endswith(key["KeyId"])
    assert admin.describe_key(KeyId=key["Arn"])["KeyMetadata"]["Description"] == "lifecycle"
    blob = admin.encrypt(KeyId=key["KeyId"], Plaintext=b"attack at dawn", EncryptionContext={"app": "t"})
    assert b"attack at dawn" not in blob["CiphertextBlob"]
    out = admin.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"app": "t"})
    assert out["Plaintext"] == b"attack at dawn" and out["KeyId"] == key["Arn"]
    with pytest.raises(ClientError) as exc:
        admin.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"app": "other"})
    assert error_of(exc) == "InvalidCiphertextException"
    data_key = admin.generate_data_key(KeyId=key["KeyId"], NumberOfBytes=24)
    assert len(data_key["Plaintext"]) == 24
    assert admin.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    assert len(admin.generate_random(NumberOfBytes=1024)["Plaintext"]) == 1024
    policy = json.loads(admin.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    assert policy["Statement"][0]["Action"] == "kms:*"
    deletion = admin.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    assert deletion["KeyState"] == "PendingDeletion"
    with pytest.raises(ClientError) as exc:
        admin.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert error_of(exc) == "KMSInvalidStateException"
    admin.cancel_key_deletion(KeyId=key["KeyId"])  # as in AWS, the key comes back disabled
    assert admin.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Disabled"
    with pytest.raises(ClientError) as exc:
        admin.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert error_of(exc) == "DisabledException"
    admin.enable_key(KeyId=key["KeyId"])
    assert admin.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["CiphertextBlob"]


def test_list_keys_paginates(admin) -> None:
    made = {admin.create_key()["KeyMetadata"]["KeyId"] for _ in range(5)}
    seen: set[str] = set()
    for page in admin.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 2}):
        assert len(page["Keys"]) <= 2
        seen.update(k["KeyId"] for k in page["Keys"])
    assert made <= seen


def test_errors_have_aws_names(server: KmsServer, admin) -> None:
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    other = admin.create_key()["KeyMetadata"]["KeyId"]
    cases = [
        (lambda: admin.describe_key(KeyId="00000000-0000-0000-0000-000000000000"), "NotFoundException"),
        (lambda: admin.describe_key(KeyId="alias/nothing"), "NotFoundException"),
        (lambda: admin.decrypt(CiphertextBlob=blob, KeyId=other), "IncorrectKeyException"),
        (
            lambda: admin.decrypt(
                CiphertextBlob=b"not ours at all, not ours at all, not ours at all, not ours"
            ),
            "InvalidCiphertextException",
        ),
        (
            lambda: admin.put_key_policy(KeyId=key, PolicyName="default", Policy='{"Statement": []}'),
            "MalformedPolicyDocumentException",
        ),
        (lambda: admin.generate_data_key(KeyId=key), "ValidationException"),
        (lambda: admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=3), "ValidationException"),
        (lambda: client(server, "AKIANOTISSUED0000000", "x").list_keys(), "UnrecognizedClientException"),
    ]
    for call, name in cases:
        with pytest.raises(ClientError) as exc:
            call()
        assert error_of(exc) == name
    stolen = server.credentials("mallory")
    with pytest.raises(ClientError) as exc:
        client(server, stolen.access_key, "guessed-secret").list_keys()
    assert error_of(exc) == "InvalidSignatureException"


def test_policy_names_principals_and_denials_are_audited(server: KmsServer, admin) -> None:
    bob = server.credentials("bob")
    eve = server.credentials("eve")
    policy = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{server.store.account}:user/admin"},
                "Action": "kms:*",
            },
            {"Effect": "Allow", "Principal": {"AWS": bob.arn}, "Action": ["kms:Encrypt", "kms:Decrypt"]},
        ]
    }
    key = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    blob = client(server, bob.access_key, bob.secret).encrypt(KeyId=key, Plaintext=b"bob's")["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        client(server, eve.access_key, eve.secret).decrypt(CiphertextBlob=blob)
    assert error_of(exc) == "AccessDeniedException"
    with pytest.raises(ClientError) as exc:
        client(server, bob.access_key, bob.secret).put_key_policy(
            KeyId=key, PolicyName="default", Policy=json.dumps(policy)
        )
    assert error_of(exc) == "AccessDeniedException"
    rows = list(server.store.audit(key_id=key))
    assert [(r.operation, r.decision) for r in rows] == [
        ("CreateKey", "allow"),
        ("Encrypt", "allow"),
        ("Decrypt", "deny"),
        ("PutKeyPolicy", "deny"),
    ]
    assert rows[2].principal == eve.arn and "principal" in " ".join(rows[2].reasons)


def test_unsigned_requests_are_anonymous(server: KmsServer, admin) -> None:
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    anonymous = KmsClient(Transport.endpoint(server.endpoint))
    with pytest.raises(KmsCallError) as exc:
        anonymous.encrypt(key, b"x")
    assert exc.value.aws_type == "AccessDeniedException"
    open_policy = {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Encrypt"}}
    admin.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(open_policy))
    assert anonymous.encrypt(key, b"x")


def test_guest_client_signs_like_an_sdk(server: KmsServer) -> None:
    creds = server.credentials("guest")
    signed = KmsClient(Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret)
    key = signed.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    blob = signed.encrypt(key, b"hello", {"purpose": "test"})
    assert signed.decrypt(blob, context={"purpose": "test"}) == b"hello"
    plain, wrapped = signed.generate_data_key(key)
    assert len(plain) == 32 and signed.decrypt(wrapped) == plain


def test_replaced_credentials_stop_working_at_once(server: KmsServer) -> None:
    def signed_by(creds) -> KmsClient:  # type: ignore[no-untyped-def]
        return KmsClient(
            Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret
        )

    first = server.credentials("rotated")
    assert signed_by(first).call("ListKeys", {})["Truncated"] is False
    second = server.credentials("rotated")  # in this process
    with pytest.raises(KmsCallError) as exc:
        signed_by(first).call("ListKeys", {})
    assert exc.value.aws_type == "UnrecognizedClientException"
    other = Store.open(server.kms_dir)  # as `teelab kms credentials` does, from another process
    try:
        other.issue_credentials("rotated")
    finally:
        other.close()
    with pytest.raises(KmsCallError) as exc:
        signed_by(second).call("ListKeys", {})
    assert exc.value.aws_type == "UnrecognizedClientException"


def test_tls_and_unix_socket(tmp_path: Path) -> None:
    with KmsServer.start(tmp_path / "kms", Listen(tls=True)) as srv:
        creds = srv.credentials()
        tls = client(srv, creds.access_key, creds.secret, verify=str(srv.ca_certificate))
        assert srv.endpoint.startswith("https://")
        assert tls.create_key()["KeyMetadata"]["KeyState"] == "Enabled"
        with pytest.raises(Exception, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            client(srv, creds.access_key, creds.secret).list_keys()
    sock = tmp_path / "kms.sock"
    with KmsServer.start(tmp_path / "kms", Listen(unix_path=sock)) as srv:
        creds = srv.credentials()
        unix = KmsClient(Transport.endpoint(srv.endpoint), access_key=creds.access_key, secret=creds.secret)
        assert len(unix.generate_random(16)) == 16
    assert not sock.exists()


def test_a_damaged_tls_key_is_a_start_error(tmp_path: Path) -> None:
    from harness.kms.errors import ServerStartError
    from harness.kms.tls import ensure_certificate

    ensure_certificate(tmp_path / "kms")
    (tmp_path / "kms" / "tls" / "server.key").write_text("not a key")
    with pytest.raises(ServerStartError, match="TLS certificate"):
        KmsServer.start(tmp_path / "kms", Listen(tls=True))


def test_master_key_file_is_private_and_env_key_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path / "kms")
    key = store.create_key('{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Encrypt"}}')
    material = store.material(key.id)
    store.close()
    master = tmp_path / "kms" / "master.key"
    assert master.stat().st_mode & 0o777 == 0o600
    os.chmod(master, 0o644)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        Store.open(tmp_path / "kms")
    os.chmod(master, 0o600)
    monkeypatch.setenv(MASTER_KEY_ENV, "too short")
    with pytest.raises(MasterKeyError):
        Store.open(tmp_path / "kms")
    monkeypatch.setenv(MASTER_KEY_ENV, "A" * 43 + "=")
    other = Store.open(tmp_path / "kms")
    try:
        with pytest.raises(MasterKeyError, match="does not unwrap"):
            other.material(key.id)
    finally:
        other.close()
    monkeypatch.delenv(MASTER_KEY_ENV)
    again = Store.open(tmp_path / "kms")
    assert again.material(key.id) == material
    again.close()


def test_a_caller_that_gives_up_does_not_stop_the_store_writer(tmp_path: Path) -> None:
    import threading

    store = Store.open(tmp_path / "kms")
    try:
        gate = threading.Event()
        busy = store.submit(lambda conn: gate.wait(10))
        given_up = store.submit(Store.set_policy("no-such-key", "{}"))  # queued behind the busy change
        assert given_up.cancel()
        gate.set()
        assert busy.result(10) is True
        assert store.submit(lambda conn: "still writing").result(10) == "still writing"
    finally:
        store.close()
