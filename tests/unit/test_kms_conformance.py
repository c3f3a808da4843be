"""The same boto3 cases against the lab KMS and against moto's KMS server (its own process), each case with
what AWS KMS answers. The lab KMS must answer as AWS does; where moto answers otherwise, ``MOTO_DIFFERS``
holds what it answers, so that docs/kms.md's table of both stays true (a moto upgrade that changes an answer
fails here until the table is updated)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from harness.kms import KmsServer

Case = Callable[[Any], Any]
CASES: dict[str, tuple[Case, Any]] = {}  # name -> (case, what AWS KMS answers)


def case(expected: Any) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[fn.__name__] = (fn, expected)
        return fn

    return register


def error(call: Callable[..., Any], **kwargs: Any) -> str:
    """The AWS error code of a call that should fail, or "succeeded"."""
    try:
        call(**kwargs)
    except ClientError as exc:
        return exc.response["Error"]["Code"]
    return "succeeded"


def new_key(kms: Any, **kwargs: Any) -> str:
    return kms.create_key(**kwargs)["KeyMetadata"]["KeyId"]


# -- the cases -----------------------------------------------------------------------------------------------


@case(("Enabled", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", ["SYMMETRIC_DEFAULT"]))
def create_and_describe(kms: Any) -> Any:
    meta = kms.describe_key(KeyId=new_key(kms))["KeyMetadata"]
    return tuple(meta.get(f) for f in ("KeyState", "KeySpec", "KeyUsage", "EncryptionAlgorithms"))


@case((b"attack at dawn", "InvalidCiphertextException"))
def encrypt_decrypt_with_context(kms: Any) -> Any:
    key = new_key(kms)
    blob = kms.encrypt(KeyId=key, Plaintext=b"attack at dawn", EncryptionContext={"a": "1"})["CiphertextBlob"]
    plain = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "1"})["Plaintext"]
    return plain, error(kms.decrypt, CiphertextBlob=blob, EncryptionContext={"a": "2"})


@case("IncorrectKeyException")
def decrypt_with_another_key_id(kms: Any) -> Any:
    blob = kms.encrypt(KeyId=new_key(kms), Plaintext=b"x")["CiphertextBlob"]
    return error(kms.decrypt, CiphertextBlob=blob, KeyId=new_key(kms))


@case("NotFoundException")
def unknown_key(kms: Any) -> Any:
    return error(kms.describe_key, KeyId="00000000-0000-0000-0000-000000000000")


@case((32, True))
def generate_data_key(kms: Any) -> Any:
    key = new_key(kms)
    answer = kms.generate_data_key(KeyId=key, KeySpec="AES_256")
    return len(answer["Plaintext"]), kms.decrypt(CiphertextBlob=answer["CiphertextBlob"])["Plaintext"] == (
        answer["Plaintext"]
    )


@case((False, 16))
def generate_data_key_without_plaintext(kms: Any) -> Any:
    answer = kms.generate_data_key_without_plaintext(KeyId=new_key(kms), KeySpec="AES_128")
    return "Plaintext" in answer, len(kms.decrypt(CiphertextBlob=answer["CiphertextBlob"])["Plaintext"])


@case(64)
def generate_random(kms: Any) -> Any:
    return len(kms.generate_random(NumberOfBytes=64)["Plaintext"])


@case((b"moving", True))
def re_encrypt(kms: Any) -> Any:
    source, target = new_key(kms), new_key(kms)
    blob = kms.encrypt(KeyId=source, Plaintext=b"moving")["CiphertextBlob"]
    answer = kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId=target)
    out = kms.decrypt(CiphertextBlob=answer["CiphertextBlob"])
    return out["Plaintext"], out["KeyId"].endswith(target) and answer["SourceKeyId"].endswith(source)


@case((b"via alias", True, "AlreadyExistsException"))
def alias_as_key_id(kms: Any) -> Any:
    key = new_key(kms)
    name = f"alias/conformance-{key[:8]}"
    kms.create_alias(AliasName=name, TargetKeyId=key)
    blob = kms.encrypt(KeyId=name, Plaintext=b"via alias")["CiphertextBlob"]
    listed = any(
        a["AliasName"] == name and a["TargetKeyId"] == key for a in kms.list_aliases(KeyId=key)["Aliases"]
    )
    return (
        kms.decrypt(CiphertextBlob=blob)["Plaintext"],
        listed,
        error(kms.create_alias, AliasName=name, TargetKeyId=key),
    )


@case("NotAuthorizedException")
def reserved_alias(kms: Any) -> Any:
    return error(kms.create_alias, AliasName="alias/aws/mine", TargetKeyId=new_key(kms))


@case((True, "NotFoundException"))
def update_and_delete_alias(kms: Any) -> Any:
    first, second = new_key(kms), new_key(kms)
    name = f"alias/moving-{first[:8]}"
    kms.create_alias(AliasName=name, TargetKeyId=first)
    kms.update_alias(AliasName=name, TargetKeyId=second)
    moved = kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == second
    kms.delete_alias(AliasName=name)
    return moved, error(kms.describe_key, KeyId=name)


@case(("Disabled", "DisabledException", "succeeded"))
def disable_and_enable(kms: Any) -> Any:
    key = new_key(kms)
    kms.disable_key(KeyId=key)
    state = kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"]
    refused = error(kms.encrypt, KeyId=key, Plaintext=b"x")
    kms.enable_key(KeyId=key)
    return state, refused, error(kms.encrypt, KeyId=key, Plaintext=b"x")


@case(("PendingDeletion", "KMSInvalidStateException", "Disabled"))
def schedule_and_cancel_deletion(kms: Any) -> Any:
    key = new_key(kms)
    state = kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7).get("KeyState")
    refused = error(kms.encrypt, KeyId=key, Plaintext=b"x")
    kms.cancel_key_deletion(KeyId=key)
    return state, refused, kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"]


@case(
    (
        [{"TagKey": "env", "TagValue": "lab"}, {"TagKey": "team", "TagValue": "a"}],
        [{"TagKey": "team", "TagValue": "a"}],
    )
)
def tags(kms: Any) -> Any:
    key = new_key(kms, Tags=[{"TagKey": "team", "TagValue": "a"}])
    kms.tag_resource(KeyId=key, Tags=[{"TagKey": "env", "TagValue": "lab"}])
    both = sorted(kms.list_resource_tags(KeyId=key)["Tags"], key=lambda t: t["TagKey"])
    kms.untag_resource(KeyId=key, TagKeys=["env"])
    return both, kms.list_resource_tags(KeyId=key)["Tags"]


@case("TagException")
def reserved_tag(kms: Any) -> Any:
    return error(kms.tag_resource, KeyId=new_key(kms), Tags=[{"TagKey": "aws:x", "TagValue": "y"}])


@case((["default"], True))
def key_policies(kms: Any) -> Any:
    key = new_key(kms)
    return kms.list_key_policies(KeyId=key)["PolicyNames"], "Statement" in kms.get_key_policy(
        KeyId=key, PolicyName="default"
    )["Policy"]


@case("second")
def update_key_description(kms: Any) -> Any:
    key = new_key(kms, Description="first")
    kms.update_key_description(KeyId=key, Description="second")
    return kms.describe_key(KeyId=key)["KeyMetadata"]["Description"]


@case("NotFoundException")
def a_policy_not_named_default(kms: Any) -> Any:
    return error(kms.get_key_policy, KeyId=new_key(kms), PolicyName="other")


@case((False, True, 180, False))
def rotation_status(kms: Any) -> Any:
    key = new_key(kms)
    before = kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"]
    kms.enable_key_rotation(KeyId=key, RotationPeriodInDays=180)
    status = kms.get_key_rotation_status(KeyId=key)
    kms.disable_key_rotation(KeyId=key)
    after = kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"]
    return before, status["KeyRotationEnabled"], status.get("RotationPeriodInDays"), after


@case((b"old", 1, "ON_DEMAND"))
def rotate_on_demand(kms: Any) -> Any:
    key = new_key(kms)
    blob = kms.encrypt(KeyId=key, Plaintext=b"old")["CiphertextBlob"]
    kms.rotate_key_on_demand(KeyId=key)
    rotations = kms.list_key_rotations(KeyId=key)["Rotations"]
    return kms.decrypt(CiphertextBlob=blob)["Plaintext"], len(rotations), rotations[0]["RotationType"]


@case("UnsupportedOperationException")
def rotation_of_an_asymmetric_key(kms: Any) -> Any:
    return error(kms.enable_key_rotation, KeyId=new_key(kms, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY"))


@case((["ECDSA_SHA_256"], True))
def ecdsa_sign(kms: Any) -> Any:
    key = new_key(kms, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key)["PublicKey"])
    signature = kms.sign(KeyId=key, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    public.verify(signature, b"m", ec.ECDSA(hashes.SHA256()))
    valid = kms.verify(KeyId=key, Message=b"m", Signature=signature, SigningAlgorithm="ECDSA_SHA_256")
    return kms.describe_key(KeyId=key)["KeyMetadata"]["SigningAlgorithms"], valid["SignatureValid"]


@case(True)
def rsa_pss_sign_digest(kms: Any) -> Any:
    key = new_key(kms, KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key)["PublicKey"])
    digest = hashlib.sha256(b"m").digest()
    signature = kms.sign(
        KeyId=key, Message=digest, MessageType="DIGEST", SigningAlgorithm="RSASSA_PSS_SHA_256"
    )["Signature"]
    try:  # the signature is over the message whose SHA-256 was sent, not over the digest itself
        public.verify(signature, b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


@case("KMSInvalidSignatureException")
def verify_a_bad_signature(kms: Any) -> Any:
    key = new_key(kms, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    signature = kms.sign(KeyId=key, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    return error(
        kms.verify, KeyId=key, Message=b"other", Signature=signature, SigningAlgorithm="ECDSA_SHA_256"
    )


@case(b"oaep")
def rsa_encrypt_decrypt(kms: Any) -> Any:
    key = new_key(kms, KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key)["PublicKey"])
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    blob = public.encrypt(b"oaep", oaep)
    return kms.decrypt(CiphertextBlob=blob, KeyId=key, EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"]


@case((32, True, "KMSInvalidMacException"))
def hmac_keys(kms: Any) -> Any:
    key = new_key(kms, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    mac = kms.generate_mac(KeyId=key, Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
    valid = kms.verify_mac(KeyId=key, Message=b"m", MacAlgorithm="HMAC_SHA_256", Mac=mac)["MacValid"]
    return (
        len(mac),
        valid,
        error(kms.verify_mac, KeyId=key, Message=b"n", MacAlgorithm="HMAC_SHA_256", Mac=mac),
    )


@case("InvalidKeyUsageException")
def encrypt_with_a_signing_key(kms: Any) -> Any:
    return error(
        kms.encrypt, KeyId=new_key(kms, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY"), Plaintext=b"x"
    )


@case("UnsupportedOperationException")
def public_key_of_a_symmetric_key(kms: Any) -> Any:
    return error(kms.get_public_key, KeyId=new_key(kms))


@case(True)
def generate_data_key_pair(kms: Any) -> Any:
    pair = kms.generate_data_key_pair(KeyId=new_key(kms), KeyPairSpec="ECC_NIST_P256")
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return private.public_key().public_bytes(*spki) == pair["PublicKey"]


@case(True)
def generate_data_key_pair_without_plaintext(kms: Any) -> Any:
    pair = kms.generate_data_key_pair_without_plaintext(KeyId=new_key(kms), KeyPairSpec="RSA_2048")
    private = serialization.load_der_private_key(
        kms.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"])["Plaintext"], None
    )
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return "PrivateKeyPlaintext" not in pair and private.public_key().public_bytes(*spki) == pair["PublicKey"]


# What moto 5 answers where it differs from AWS (the AWS answers: AWS KMS's API reference).
MOTO_DIFFERS: dict[str, Any] = {
    "create_and_describe": ("Enabled", "SYMMETRIC_DEFAULT", None, ["SYMMETRIC_DEFAULT"]),  # no KeyUsage
    "decrypt_with_another_key_id": "AccessDeniedException",
    "disable_and_enable": ("Disabled", "succeeded", "succeeded"),  # a disabled key still encrypts
    "encrypt_with_a_signing_key": "succeeded",
    "generate_data_key_pair": ("raised", "500"),  # not implemented
    "generate_data_key_pair_without_plaintext": ("raised", "500"),
    "public_key_of_a_symmetric_key": "succeeded",
    "reserved_alias": "succeeded",  # only the alias/aws/ names moto itself uses are reserved
    "reserved_tag": "succeeded",
    "rotation_of_an_asymmetric_key": "succeeded",
    "rotation_status": (False, True, None, False),  # no RotationPeriodInDays
    "rsa_encrypt_decrypt": ("raised", "InvalidCiphertextException"),  # OAEP from outside does not decrypt
    "rsa_pss_sign_digest": False,  # a DIGEST message is hashed again before signing
    "schedule_and_cancel_deletion": (None, "succeeded", "Disabled"),  # a key pending deletion still encrypts
    "verify_a_bad_signature": "succeeded",  # SignatureValid false instead of the exception
}


# -- the two services ----------------------------------------------------------------------------------------


def client(endpoint: str, access_key: str, secret: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    """moto's KMS server in a process of its own."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)
        yield client(endpoint, "testing", "testing")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def teelab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms") as server:
        creds = server.credentials("admin")
        yield client(server.endpoint, creds.access_key, creds.secret)


def observe(fn: Case, kms: Any) -> Any:
    try:
        return fn(kms)
    except ClientError as exc:
        return ("raised", exc.response["Error"]["Code"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_teelab_answers_as_aws(teelab: Any, name: str) -> None:
    fn, expected = CASES[name]
    assert observe(fn, teelab) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_moto_answers_as_recorded(moto: Any, name: str) -> None:
    fn, expected = CASES[name]
    assert observe(fn, moto) == MOTO_DIFFERS.get(name, expected)
