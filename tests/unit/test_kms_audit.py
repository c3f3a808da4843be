"""The KMS audit log: rendered as text whatever requests put in it, chained so tampering shows, its database
private, its master key from outside the state directory if wanted, and bounded against anonymous junk."""

from __future__ import annotations

import base64
import http.client
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.kms import KmsServer, Store, audit_log
from harness.kms.audit_log import AuditRow
from harness.kms.errors import AuditChainBroken, MasterKeyError
from harness.kms.material import MASTER_KEY_FILE_ENV

Run = Callable[..., tuple[int, str, str]]


def post(server: KmsServer, target: str, body: bytes = b"{}") -> int:
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/", body=body, headers={"X-Amz-Target": target})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_request_fields_are_shown_as_text_not_markup(tmp_path: Path, run: Run) -> None:
    kms_dir = tmp_path / "kms"
    with KmsServer.start(kms_dir) as server:
        assert post(server, "TrentService.[/x]") == 400
        assert post(server, "TrentService.[b]") == 400
    status, out, err = run("kms", "--kms-dir", str(kms_dir), "audit")
    assert status == 0, err
    assert "[/x]" in out and "[b]" in out
    status, out, err = run("kms", "--kms-dir", str(kms_dir), "audit", "--verify")
    assert status == 0 and "intact: 2 rows" in out, err


def rows(store: Store, count: int, principal: str | None = "arn:aws:iam::000000000000:user/ops") -> None:
    for index in range(count):
        row = AuditRow(
            f"r{index}", "Decrypt", None, principal, None, "allow", ("ok",), 200, None, time.time()
        )
        store.submit(Store.record(row)).result()


def tamper(path: Path, sql: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(sql)


TAMPERING = {
    "edit a decision": ("UPDATE audit SET decision = 'deny' WHERE id = 3", 3),
    "edit a reason": ("UPDATE audit SET reasons = '[]' WHERE id = 2", 2),
    "remove a row": ("DELETE FROM audit WHERE id = 2", 3),
    "cut the end": ("DELETE FROM audit WHERE id >= 4", 3),
    "insert a row": (
        "INSERT INTO audit (time, request_id, operation, decision, reasons, status) "
        "VALUES (0, 'x', 'Decrypt', 'allow', '[]', 200)",
        6,
    ),
    "rechain with plain SHA-256": ("UPDATE audit SET chain = lower(hex(randomblob(32))) WHERE id = 5", 5),
    "remove the head": ("DELETE FROM settings WHERE name = 'audit_head'", 5),
}


@pytest.mark.parametrize("change", TAMPERING, ids=list(TAMPERING))
def test_verify_finds_every_kind_of_tampering(tmp_path: Path, change: str, run: Run) -> None:
    store = Store.open(tmp_path / "kms")
    try:
        rows(store, 5)
        assert store.verify_audit()[0] == 5
        sql, first_bad = TAMPERING[change]
        tamper(store.path, sql)
        with pytest.raises(AuditChainBroken) as caught:
            store.verify_audit()
        assert caught.value.evidence["row"] == first_bad
    finally:
        store.close()
    status, _, err = run("kms", "--kms-dir", str(tmp_path / "kms"), "audit", "--verify")
    assert status == 1 and "E1024" in err


def test_a_store_made_before_the_chain_is_adopted(tmp_path: Path) -> None:
    kms_dir = tmp_path / "kms"
    Store.open(kms_dir).close()
    with sqlite3.connect(kms_dir / "kms.sqlite3") as conn:  # the schema as it was: no chain column
        conn.execute("DROP TABLE audit")
        conn.execute(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL,"
            " operation TEXT NOT NULL, key_id TEXT, principal TEXT, evidence_digest TEXT,"
            " decision TEXT NOT NULL, reasons TEXT NOT NULL, status INTEGER NOT NULL, error TEXT)"
        )
        conn.execute(
            "INSERT INTO audit (time, request_id, operation, decision, reasons, status)"
            " VALUES (1, 'old', 'Encrypt', 'allow', '[]', 200)"
        )
    store = Store.open(kms_dir)
    try:
        rows(store, 2)
        assert store.verify_audit()[0] == 3
    finally:
        store.close()


def test_the_database_files_are_private(tmp_path: Path) -> None:
    kms_dir = tmp_path / "kms"
    kms_dir.mkdir()
    (kms_dir / "kms.sqlite3").touch(mode=0o644)  # as an older version left it
    os.chmod(kms_dir / "kms.sqlite3", 0o644)
    store = Store.open(kms_dir)
    try:
        rows(store, 1)
        for name in ("kms.sqlite3", "kms.sqlite3-wal"):
            assert stat.S_IMODE((kms_dir / name).stat().st_mode) == 0o600, name
    finally:
        store.close()


def test_the_master_key_can_come_from_a_credential_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    secret = tmp_path / "credentials" / "kms-master"
    secret.parent.mkdir()
    secret.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    secret.chmod(0o600)
    kms_dir = tmp_path / "kms"
    status, out, err = run("kms", "--kms-dir", str(kms_dir), "--master-key-file", str(secret), "credentials")
    assert status == 0, err
    assert not (kms_dir / "master.key").exists()
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(secret))
    store = Store.open(kms_dir)
    try:
        assert store.master.source == str(secret)
        assert store.list_keys(10) == [] and store.secret_for(out.split("=")[1].split()[0]) is not None
    finally:
        store.close()
    monkeypatch.delenv(MASTER_KEY_FILE_ENV)
    with pytest.raises(MasterKeyError, match="does not unwrap"):  # kms/master.key would be another key
        store = Store.open(kms_dir)
        try:
            store.secret_for(out.split("=")[1].split()[0])
        finally:
            store.close()


@pytest.mark.parametrize(
    "content, mode, message",
    [
        (os.urandom(32), 0o640, "accessible to group or others"),
        (b"too short", 0o600, "not 32"),
        (None, 0o600, "cannot read"),
    ],
    ids=["group-readable", "wrong-size", "missing"],
)
def test_a_bad_master_key_file_is_refused(
    tmp_path: Path, content: bytes | None, mode: int, message: str
) -> None:
    path = tmp_path / "master"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(MasterKeyError, match=message):
        Store.open(tmp_path / "kms", path)


def test_anonymous_junk_past_the_cap_is_counted_then_summarised_in_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "REFUSAL_CAP", 3)
    kms_dir = tmp_path / "kms"
    with KmsServer.start(kms_dir) as server:
        creds = server.credentials("ops")
        for _ in range(10):
            assert post(server, "TrentService.Junk") == 400
        assert post(server, "TrentService.ListKeys", b"not json") == 400
        logged = list(server.store.audit(limit=100))
        assert [r.error for r in logged] == ["UnknownOperationException"] * 3 + ["SerializationException"]
        assert server.store.pending_refusals() == [
            ("127.0.0.1", "UnknownOperationException", pytest.approx(time.time(), abs=60), 7)
        ]
        assert creds.arn.endswith("user/ops")
    store = Store.open(kms_dir)  # stopping the server wrote the count into the chain
    try:
        summary = list(store.audit(limit=100))[-1]
        assert summary.decision == "counted" and summary.error == "UnknownOperationException"
        assert summary.reasons[0].startswith("7 more anonymous UnknownOperationException refusals")
        assert store.pending_refusals() == []
        assert store.verify_audit()[0] == 5
    finally:
        store.close()
