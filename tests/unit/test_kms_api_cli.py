"""The AWS CLI (PyPI awscli, in the test extra) against the lab KMS: the new operations, through an alias,
with errors named as AWS names them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.kms import KmsServer


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms") as server:
        creds = server.credentials("cli")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path_factory.mktemp("home")),  # no ~/.aws of the machine's
            "AWS_ACCESS_KEY_ID": creds.access_key,
            "AWS_SECRET_ACCESS_KEY": creds.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1",
        }

        def run(*args: str, ok: bool = True) -> Any:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "awscli",
                    "--endpoint-url",
                    server.endpoint,
                    "--output",
                    "json",
                    "kms",
                    *args,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if ok:
                assert proc.returncode == 0, proc.stderr
                return json.loads(proc.stdout) if proc.stdout.strip() else None
            assert proc.returncode != 0
            return proc.stderr

        yield run


def test_cli_keys_aliases_and_crypto(aws, tmp_path: Path) -> None:
    key = aws("create-key", "--tags", "TagKey=team,TagValue=cli")["KeyMetadata"]["KeyId"]
    aws("create-alias", "--alias-name", "alias/cli", "--target-key-id", key)
    assert any(a["AliasName"] == "alias/cli" for a in aws("list-aliases", "--key-id", key)["Aliases"])
    (tmp_path / "secret").write_bytes(b"from the cli")
    blob = aws("encrypt", "--key-id", "alias/cli", "--plaintext", f"fileb://{tmp_path / 'secret'}")[
        "CiphertextBlob"
    ]
    (tmp_path / "blob").write_bytes(base64.b64decode(blob))
    plain = aws("decrypt", "--key-id", "alias/cli", "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}")
    assert base64.b64decode(plain["Plaintext"]) == b"from the cli"
    aws("rotate-key-on-demand", "--key-id", "alias/cli")
    moved = aws(
        "re-encrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}", "--destination-key-id", "alias/cli"
    )
    assert moved["KeyId"].endswith(key)
    assert aws("list-resource-tags", "--key-id", key)["Tags"] == [{"TagKey": "team", "TagValue": "cli"}]
    assert len(aws("list-key-rotations", "--key-id", key)["Rotations"]) == 1
    aws("disable-key", "--key-id", "alias/cli")
    assert "(DisabledException)" in aws("encrypt", "--key-id", "alias/cli", "--plaintext", "eA==", ok=False)
    assert "(NotFoundException)" in aws("describe-key", "--key-id", "alias/none", ok=False)


def test_cli_signing_mac_and_key_pairs(aws, tmp_path: Path) -> None:
    """Blobs from an answer go back as files (fileb://): AWS CLI v1 sends a blob argument's text as is."""
    signer = aws("create-key", "--key-spec", "ECC_NIST_P384", "--key-usage", "SIGN_VERIFY")["KeyMetadata"][
        "KeyId"
    ]
    signed = aws("sign", "--key-id", signer, "--message", "aGVsbG8=", "--signing-algorithm", "ECDSA_SHA_384")
    (tmp_path / "signature").write_bytes(base64.b64decode(signed["Signature"]))
    verify = ["verify", "--key-id", signer, "--signing-algorithm", "ECDSA_SHA_384"]
    signature = f"fileb://{tmp_path / 'signature'}"
    assert aws(*verify, "--message", "aGVsbG8=", "--signature", signature)["SignatureValid"] is True
    stderr = aws(*verify, "--message", "aGVsbG9v", "--signature", signature, ok=False)
    assert "(KMSInvalidSignatureException)" in stderr
    assert aws("get-public-key", "--key-id", signer)["KeySpec"] == "ECC_NIST_P384"
    created = aws("create-key", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC")
    mac_key = created["KeyMetadata"]["KeyId"]
    mac = aws("generate-mac", "--key-id", mac_key, "--message", "aGVsbG8=", "--mac-algorithm", "HMAC_SHA_256")
    (tmp_path / "mac").write_bytes(base64.b64decode(mac["Mac"]))
    check = ["verify-mac", "--key-id", mac_key, "--mac-algorithm", "HMAC_SHA_256", "--mac"]
    assert aws(*check, f"fileb://{tmp_path / 'mac'}", "--message", "aGVsbG8=")["MacValid"] is True
    stderr = aws(*check, f"fileb://{tmp_path / 'mac'}", "--message", "aGVsbG9v", ok=False)
    assert "(KMSInvalidMacException)" in stderr
    symmetric = aws("create-key")["KeyMetadata"]["KeyId"]
    pair = aws("generate-data-key-pair", "--key-id", symmetric, "--key-pair-spec", "ECC_NIST_P256")
    assert pair["PrivateKeyPlaintext"] and pair["PublicKey"]
    bare = aws(
        "generate-data-key-pair-without-plaintext", "--key-id", symmetric, "--key-pair-spec", "RSA_2048"
    )
    assert "PrivateKeyPlaintext" not in bare
    assert "CiphertextBlob" in aws(
        "generate-data-key-without-plaintext", "--key-id", symmetric, "--key-spec", "AES_256"
    )
    aws("enable-key-rotation", "--key-id", symmetric, "--rotation-period-in-days", "90")
    assert aws("get-key-rotation-status", "--key-id", symmetric)["KeyRotationEnabled"] is True
    assert aws("list-key-policies", "--key-id", symmetric)["PolicyNames"] == ["default"]


def test_cli_the_remaining_operations(aws, tmp_path: Path) -> None:
    first = aws("create-key")["KeyMetadata"]["KeyId"]
    second = aws("create-key")["KeyMetadata"]["KeyId"]
    aws("create-alias", "--alias-name", "alias/cli-moving", "--target-key-id", first)
    aws("update-alias", "--alias-name", "alias/cli-moving", "--target-key-id", second)
    assert aws("describe-key", "--key-id", "alias/cli-moving")["KeyMetadata"]["KeyId"] == second
    aws("update-key-description", "--key-id", "alias/cli-moving", "--description", "moved")
    assert aws("describe-key", "--key-id", second)["KeyMetadata"]["Description"] == "moved"
    aws("delete-alias", "--alias-name", "alias/cli-moving")
    assert "(NotFoundException)" in aws("describe-key", "--key-id", "alias/cli-moving", ok=False)
    aws("tag-resource", "--key-id", first, "--tags", "TagKey=a,TagValue=1", "TagKey=b,TagValue=2")
    aws("untag-resource", "--key-id", first, "--tag-keys", "a")
    assert aws("list-resource-tags", "--key-id", first)["Tags"] == [{"TagKey": "b", "TagValue": "2"}]
    aws("enable-key-rotation", "--key-id", first)
    aws("disable-key-rotation", "--key-id", first)
    assert aws("get-key-rotation-status", "--key-id", first)["KeyRotationEnabled"] is False
    aws("disable-key", "--key-id", first)
    aws("enable-key", "--key-id", first)
    rsa = aws("create-key", "--key-spec", "RSA_2048", "--key-usage", "ENCRYPT_DECRYPT")["KeyMetadata"][
        "KeyId"
    ]
    sealed = aws(
        "encrypt", "--key-id", rsa, "--plaintext", "aGk=", "--encryption-algorithm", "RSAES_OAEP_SHA_256"
    )
    (tmp_path / "rsa-blob").write_bytes(base64.b64decode(sealed["CiphertextBlob"]))
    opened = aws(
        "decrypt", "--key-id", rsa, "--encryption-algorithm", "RSAES_OAEP_SHA_256",
        "--ciphertext-blob", f"fileb://{tmp_path / 'rsa-blob'}",
    )  # fmt: skip
    assert base64.b64decode(opened["Plaintext"]) == b"aGk="  # CLI v1 sent the argument's text as it is
    assert len(base64.b64decode(aws("generate-random", "--number-of-bytes", "24")["Plaintext"])) == 24
    data_key = aws("generate-data-key", "--key-id", first, "--number-of-bytes", "16")
    assert len(base64.b64decode(data_key["Plaintext"])) == 16
    policy = {
        "Statement": {
            "Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
            "Action": "kms:*",
        }
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    aws(
        "put-key-policy",
        "--key-id",
        first,
        "--policy-name",
        "default",
        "--policy",
        f"file://{tmp_path / 'policy.json'}",
    )
    stored = aws("get-key-policy", "--key-id", first, "--policy-name", "default")
    assert json.loads(stored["Policy"]) == policy
    aws("schedule-key-deletion", "--key-id", second, "--pending-window-in-days", "7")
    aws("cancel-key-deletion", "--key-id", second)
    assert len(aws("list-keys")["Keys"]) >= 3
