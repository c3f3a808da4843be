"""Keys as applications manage them, from boto3: aliases (as KeyId everywhere), enabling and disabling, tags,
key policy names, data keys without plaintext and ReEncrypt, each refusal with AWS's exception name."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from harness.kms import KmsServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsServer]:
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms") as srv:
        yield srv


def client(server: KmsServer, name: str):
    creds = server.credentials(name)
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret,
        config=Config(retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def kms(server: KmsServer):
    return client(server, "admin")


def refused(call, *args: object, **kwargs: object) -> str:
    with pytest.raises(ClientError) as exc:
        call(*args, **kwargs)
    return exc.value.response["Error"]["Code"]


def test_an_alias_works_wherever_a_key_id_does(kms) -> None:
    key = kms.create_key()["KeyMetadata"]
    kms.create_alias(AliasName="alias/app/orders", TargetKeyId=key["KeyId"])
    alias_arn = "arn:aws:kms:us-east-1:000000000000:alias/app/orders"
    for ref in ("alias/app/orders", alias_arn):
        assert kms.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == key["KeyId"]
        blob = kms.encrypt(KeyId=ref, Plaintext=b"order 66")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob, KeyId=ref)["Plaintext"] == b"order 66"
        assert kms.generate_data_key(KeyId=ref, KeySpec="AES_256")["KeyId"] == key["Arn"]
    listed = kms.list_aliases(KeyId=key["KeyId"])["Aliases"]
    assert [(a["AliasName"], a["AliasArn"], a["TargetKeyId"]) for a in listed] == [
        ("alias/app/orders", alias_arn, key["KeyId"])
    ]
    assert refused(kms.create_alias, AliasName="alias/app/orders", TargetKeyId=key["KeyId"]) == (
        "AlreadyExistsException"
    )
    other = kms.create_key()["KeyMetadata"]
    kms.update_alias(AliasName="alias/app/orders", TargetKeyId=other["KeyId"])
    assert kms.describe_key(KeyId="alias/app/orders")["KeyMetadata"]["KeyId"] == other["KeyId"]
    # a blob made through the alias before the update still names its own key
    assert kms.decrypt(CiphertextBlob=blob)["KeyId"] == key["Arn"]
    assert refused(kms.decrypt, CiphertextBlob=blob, KeyId="alias/app/orders") == "IncorrectKeyException"
    kms.delete_alias(AliasName="alias/app/orders")
    assert refused(kms.describe_key, KeyId="alias/app/orders") == "NotFoundException"
    assert refused(kms.delete_alias, AliasName="alias/app/orders") == "NotFoundException"


def test_alias_refusals_have_aws_names(kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/taken", TargetKeyId=key)
    signing = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    cases = [
        (dict(AliasName="alias/aws/mine", TargetKeyId=key), "NotAuthorizedException"),
        (dict(AliasName="alias/has space", TargetKeyId=key), "ValidationException"),
        (dict(AliasName="orders", TargetKeyId=key), "ValidationException"),
        (dict(AliasName="alias/new", TargetKeyId="alias/taken"), "ValidationException"),
        (
            dict(AliasName="alias/new", TargetKeyId="00000000-0000-0000-0000-000000000000"),
            "NotFoundException",
        ),
    ]
    for kwargs, name in cases:
        assert refused(kms.create_alias, **kwargs) == name, kwargs
    assert refused(kms.update_alias, AliasName="alias/taken", TargetKeyId=signing) == "ValidationException"
    assert refused(kms.update_alias, AliasName="alias/none", TargetKeyId=key) == "NotFoundException"
    kms.schedule_key_deletion(KeyId=signing, PendingWindowInDays=7)
    assert refused(kms.create_alias, AliasName="alias/doomed", TargetKeyId=signing) == (
        "KMSInvalidStateException"
    )


def test_list_aliases_pages(kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    made = {f"alias/page-{i}" for i in range(5)}
    for name in made:
        kms.create_alias(AliasName=name, TargetKeyId=key)
    seen: list[str] = []
    for page in kms.get_paginator("list_aliases").paginate(PaginationConfig={"PageSize": 2}):
        assert len(page["Aliases"]) <= 2
        seen += [a["AliasName"] for a in page["Aliases"]]
    assert made <= set(seen) and len(seen) == len(set(seen))
    assert refused(kms.list_aliases, Marker="not-a-marker") == "InvalidMarkerException"


def test_disable_and_enable(kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"kept")["CiphertextBlob"]
    kms.disable_key(KeyId=key)
    meta = kms.describe_key(KeyId=key)["KeyMetadata"]
    assert (meta["KeyState"], meta["Enabled"]) == ("Disabled", False)
    for call, kwargs in [
        (kms.encrypt, dict(KeyId=key, Plaintext=b"x")),
        (kms.decrypt, dict(CiphertextBlob=blob)),
        (kms.generate_data_key, dict(KeyId=key, NumberOfBytes=16)),
        (kms.generate_data_key_without_plaintext, dict(KeyId=key, NumberOfBytes=16)),
    ]:
        assert refused(call, **kwargs) == "DisabledException"
    kms.enable_key(KeyId=key)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
    kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert refused(kms.enable_key, KeyId=key) == "KMSInvalidStateException"
    assert refused(kms.disable_key, KeyId=key) == "KMSInvalidStateException"
    assert refused(kms.enable_key, KeyId="alias/no-such") == "NotFoundException"


def test_tags(kms) -> None:
    key = kms.create_key(Tags=[{"TagKey": "team", "TagValue": "payments"}])["KeyMetadata"]["KeyId"]
    kms.tag_resource(
        KeyId=key, Tags=[{"TagKey": "env", "TagValue": "lab"}, {"TagKey": "team", "TagValue": "p2"}]
    )
    assert kms.list_resource_tags(KeyId=key)["Tags"] == [
        {"TagKey": "env", "TagValue": "lab"},
        {"TagKey": "team", "TagValue": "p2"},
    ]
    kms.untag_resource(KeyId=key, TagKeys=["env", "absent"])
    assert kms.list_resource_tags(KeyId=key)["Tags"] == [{"TagKey": "team", "TagValue": "p2"}]
    assert (
        refused(kms.tag_resource, KeyId=key, Tags=[{"TagKey": "aws:owner", "TagValue": "x"}])
        == "TagException"
    )
    many = [{"TagKey": f"k{i}", "TagValue": ""} for i in range(50)]
    assert refused(kms.tag_resource, KeyId=key, Tags=many) == "TagException"  # 51 with "team"
    kms.tag_resource(KeyId=key, Tags=many[:49])
    first = kms.list_resource_tags(KeyId=key, Limit=30)
    second = kms.list_resource_tags(KeyId=key, Limit=30, Marker=first["NextMarker"])
    assert first["Truncated"] and not second["Truncated"]
    assert len(first["Tags"]) + len(second["Tags"]) == 50


def test_update_key_description(kms) -> None:
    key = kms.create_key(Description="first")["KeyMetadata"]["KeyId"]
    kms.update_key_description(KeyId="arn:aws:kms:us-east-1:000000000000:key/" + key, Description="second")
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["Description"] == "second"
    kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert refused(kms.update_key_description, KeyId=key, Description="third") == "KMSInvalidStateException"


def test_key_policies_listed(kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    answer = kms.list_key_policies(KeyId=key)
    assert (answer["PolicyNames"], answer["Truncated"]) == (["default"], False)


def test_data_key_without_plaintext_decrypts_later(kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    answer = kms.generate_data_key_without_plaintext(
        KeyId=key, KeySpec="AES_128", EncryptionContext={"a": "b"}
    )
    assert "Plaintext" not in answer
    plain = kms.decrypt(CiphertextBlob=answer["CiphertextBlob"], EncryptionContext={"a": "b"})["Plaintext"]
    assert len(plain) == 16
    assert refused(kms.generate_data_key_without_plaintext, KeyId=key) == "ValidationException"


def test_re_encrypt_moves_a_ciphertext_between_keys(kms) -> None:
    source = kms.create_key()["KeyMetadata"]
    target = kms.create_key()["KeyMetadata"]
    blob = kms.encrypt(KeyId=source["KeyId"], Plaintext=b"moving", EncryptionContext={"v": "1"})[
        "CiphertextBlob"
    ]
    answer = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext={"v": "1"},
        DestinationKeyId=target["KeyId"],
        DestinationEncryptionContext={"v": "2"},
    )
    assert (answer["SourceKeyId"], answer["KeyId"]) == (source["Arn"], target["Arn"])
    out = kms.decrypt(CiphertextBlob=answer["CiphertextBlob"], EncryptionContext={"v": "2"})
    assert (out["Plaintext"], out["KeyId"]) == (b"moving", target["Arn"])
    assert refused(kms.re_encrypt, CiphertextBlob=blob, DestinationKeyId=target["KeyId"]) == (
        "InvalidCiphertextException"
    )  # the source context is missing
    assert (
        refused(
            kms.re_encrypt, CiphertextBlob=blob, SourceKeyId=target["KeyId"], DestinationKeyId=target["KeyId"]
        )
        == "IncorrectKeyException"
    )


def test_re_encrypt_needs_both_policy_actions(server: KmsServer, kms) -> None:
    carol = client(server, "carol")
    carol_arn = server.store.principal_arn("carol")
    admin_arn = server.store.principal_arn("admin")  # not the account root: that would take in carol too

    def policy(*actions: str) -> str:
        return json.dumps(
            {
                "Statement": [
                    {"Effect": "Allow", "Principal": {"AWS": admin_arn}, "Action": "kms:*"},
                    {"Effect": "Allow", "Principal": {"AWS": carol_arn}, "Action": list(actions)},
                ]
            }
        )

    source = kms.create_key(Policy=policy("kms:Encrypt"))["KeyMetadata"]["KeyId"]
    target = kms.create_key(Policy=policy("kms:ReEncrypt*"))["KeyMetadata"]["KeyId"]
    blob = carol.encrypt(KeyId=source, Plaintext=b"p")["CiphertextBlob"]
    assert refused(carol.re_encrypt, CiphertextBlob=blob, DestinationKeyId=target) == "AccessDeniedException"
    kms.put_key_policy(KeyId=source, PolicyName="default", Policy=policy("kms:Encrypt", "kms:ReEncryptFrom"))
    moved = carol.re_encrypt(CiphertextBlob=blob, DestinationKeyId=target)["CiphertextBlob"]
    assert (
        refused(carol.decrypt, CiphertextBlob=moved) == "AccessDeniedException"
    )  # ReEncrypt* is not Decrypt
    assert kms.decrypt(CiphertextBlob=moved)["Plaintext"] == b"p"
    kms.put_key_policy(KeyId=target, PolicyName="default", Policy=policy("kms:ReEncryptFrom"))
    assert refused(carol.re_encrypt, CiphertextBlob=blob, DestinationKeyId=target) == "AccessDeniedException"


def test_an_alias_goes_with_its_purged_key(server: KmsServer, kms) -> None:
    doomed = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/short-lived", TargetKeyId=doomed)
    server.store.submit(server.store.set_state(doomed, "PendingDeletion", 1.0)).result()  # long past due
    assert server.store.purge_deleted() >= 1
    assert refused(kms.describe_key, KeyId="alias/short-lived") == "NotFoundException"
    assert "alias/short-lived" not in {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
    heir = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/short-lived", TargetKeyId=heir)
    assert kms.describe_key(KeyId="alias/short-lived")["KeyMetadata"]["KeyId"] == heir


def test_every_operation_has_its_method_and_policy_action() -> None:
    from harness.kms.policy import ACTIONS, OPERATIONS
    from harness.kms.service import KmsService

    served = {name.removeprefix("_op_") for name in dir(KmsService) if name.startswith("_op_")}
    assert served == set(OPERATIONS) and len(OPERATIONS) == 36
    assert set(ACTIONS) == set(OPERATIONS) - {"ReEncrypt"} | {"ReEncryptFrom", "ReEncryptTo"}


def test_policy_actions_take_wildcards_that_name_kms_actions() -> None:
    from harness.kms.errors import MalformedPolicy
    from harness.kms.policy import KeyPolicy, RequestContext

    def allows(action_pattern: str, action: str) -> bool:
        policy = KeyPolicy.parse(
            json.dumps({"Statement": {"Effect": "Allow", "Principal": "*", "Action": action_pattern}})
        )
        return policy.evaluate(RequestContext(action=f"kms:{action}", principal=None), "000000000000").allowed

    assert allows("kms:GenerateDataKey*", "GenerateDataKeyPairWithoutPlaintext")
    assert allows("kms:ReEncrypt*", "ReEncryptFrom") and allows("KMS:reencrypt*", "ReEncryptTo")
    assert not allows("kms:GenerateDataKey*", "Decrypt")
    assert not allows("kms:List*", "GetKeyPolicy") and allows("kms:List*", "ListKeyRotations")
    for pattern in ("kms:Fly*", "kms:ReEncrypt", "s3:*"):  # ReEncrypt is an operation, not an action
        with pytest.raises(MalformedPolicy, match="unknown action"):
            KeyPolicy.parse(
                json.dumps({"Statement": {"Effect": "Allow", "Principal": "*", "Action": pattern}})
            )
