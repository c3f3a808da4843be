"""``teelab kms``: create-key with a policy file, credentials, keys and the audit log, as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from teelab_guest.kms_client import KmsClient, Transport

from harness.cli import kms as kms_cli
from harness.cli import main
from harness.errors import LabError
from harness.kms import KmsServer


def run(kms_dir: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    kms_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kms", "--kms-dir", str(kms_dir), *argv])
    try:
        return int(args.func(args) or 0)
    except LabError as err:
        print(str(err))
        return err.exit_status


def test_create_key_credentials_and_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kms_dir = tmp_path / "kms"
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
                    "Action": ["kms:Encrypt", "kms:Decrypt"],
                }
            }
        )
    )
    assert run(kms_dir, "create-key", "--policy", str(policy), "--description", "from the cli", "--json") == 0
    key = json.loads(capsys.readouterr().out)
    assert key["Description"] == "from the cli" and key["KeyState"] == "Enabled"
    assert run(kms_dir, "credentials", "ops", "--json") == 0
    creds = json.loads(capsys.readouterr().out)
    assert creds["Arn"].endswith(":user/ops")
    with KmsServer.start(kms_dir) as server:
        client = KmsClient(
            Transport.endpoint(server.endpoint),
            access_key=creds["AccessKeyId"],
            secret=creds["SecretAccessKey"],
        )
        assert client.decrypt(client.encrypt(key["KeyId"], b"cli")) == b"cli"
        with pytest.raises(Exception, match="AccessDenied"):
            client.generate_data_key(key["KeyId"])
    assert run(kms_dir, "audit", "--key", key["KeyId"], "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["operation"], r["decision"]) for r in rows] == [
        ("Encrypt", "allow"),
        ("Decrypt", "allow"),
        ("GenerateDataKey", "deny"),
    ]
    assert run(kms_dir, "keys", "--json") == 0
    assert [k["KeyId"] for k in json.loads(capsys.readouterr().out)] == [key["KeyId"]]


def test_bad_policy_file_is_refused_and_leaves_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kms_dir = tmp_path / "kms"
    policy = tmp_path / "policy.json"
    policy.write_text(
        '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", '
        '"Condition": {"StringEquals": {"kms:RecipientAttestation:PCR77": "00"}}}}'
    )
    assert run(kms_dir, "create-key", "--policy", str(policy)) == 2
    assert "E1008" in capsys.readouterr().out
    assert run(kms_dir, "create-key", "--policy", str(tmp_path / "missing.json")) == 2
    assert "E103" in capsys.readouterr().out
    assert not kms_dir.exists()  # refused before a store (or a key) was made


@pytest.mark.parametrize(
    "argv",
    [
        ["kms", "--kms-dir", "{d}", "keys", "--json"],
        ["kms", "keys", "--kms-dir", "{d}", "--json"],
    ],
    ids=["before-the-command", "after-the-command"],
)
def test_kms_dir_is_taken_where_users_put_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    kms_dir = tmp_path / "kms"
    assert run(kms_dir, "credentials", "ops") == 0
    capsys.readouterr()
    assert main([a.format(d=kms_dir) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out) == []
