"""The KMS store: keys (material wrapped under the master key), credentials, policies, audit log and nonces.

SQLite in WAL mode with synchronous=FULL. Every write goes through one writer thread that commits whatever is
queued in one transaction (group commit), then resolves the callers' futures: acknowledged means durable.
Audit rows are chained in that transaction: each row's ``chain`` is an HMAC (keyed from the master key) over
the previous row's and its own fields, and a MAC'd head names the last row, so editing, removing or
truncating rows shows in ``verify_audit``. Anonymous refusals past ``REFUSAL_CAP`` an hour per source and
kind are counted instead of logged; the count enters the chain as one summary row.
"""

from __future__ import annotations

import os
import queue
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness.kms.audit_log import REFUSAL_WINDOW_S, AuditLog, written_ids
from harness.kms.errors import StoreError
from harness.kms.material import MasterKey

T = TypeVar("T")
DEFAULT_ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, created REAL NOT NULL, description TEXT NOT NULL, state TEXT NOT NULL,
    deletion_date REAL, key_usage TEXT NOT NULL, key_spec TEXT NOT NULL, wrapped BLOB NOT NULL,
    policy TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    access_key TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, wrapped_secret BLOB NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL, operation TEXT NOT NULL,
    key_id TEXT, principal TEXT, evidence_digest TEXT, decision TEXT NOT NULL, reasons TEXT NOT NULL,
    status INTEGER NOT NULL, error TEXT, chain TEXT);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id);
CREATE TABLE IF NOT EXISTS nonces (digest TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refusals (
    source TEXT NOT NULL, kind TEXT NOT NULL, since REAL NOT NULL, logged INTEGER NOT NULL,
    counted INTEGER NOT NULL, PRIMARY KEY (source, kind));
"""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    arn: str
    created: float
    description: str
    state: str  # "Enabled" | "PendingDeletion"
    deletion_date: float | None
    key_usage: str
    key_spec: str
    policy: str

    def metadata(self, account: str) -> dict[str, Any]:
        """DescribeKey's KeyMetadata."""
        meta: dict[str, Any] = {
            "AWSAccountId": account,
            "KeyId": self.id,
            "Arn": self.arn,
            "CreationDate": self.created,
            "Enabled": self.state == "Enabled",
            "Description": self.description,
            "KeyUsage": self.key_usage,
            "KeyState": self.state,
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": self.key_spec,
            "KeySpec": self.key_spec,
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": False,
        }
        if self.deletion_date is not None:
            meta["DeletionDate"] = self.deletion_date
        return meta


@dataclass(frozen=True)
class Credentials:
    """A lab access key pair; ``arn`` is the principal key policies name."""

    name: str
    access_key: str
    secret: str
    arn: str

    def to_dict(self) -> dict[str, str]:
        return {
            "Name": self.name,
            "AccessKeyId": self.access_key,
            "SecretAccessKey": self.secret,
            "Arn": self.arn,
        }


class Store(AuditLog):
    """One KMS state directory. Reads run on the caller's thread; writes on the writer thread."""

    def __init__(self, kms_dir: Path, master: MasterKey) -> None:
        self.dir = kms_dir
        self.path = kms_dir / "kms.sqlite3"
        self.master = master
        self._chain_key = master.subkey("audit-chain")
        self._local = threading.local()
        self._material: dict[str, bytes] = {}
        try:
            kms_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(kms_dir, 0o700)
            # SQLite gives the -wal and -shm files the database file's mode
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            for path in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
                if path.exists():
                    os.chmod(path, 0o600)
            conn = self._conn()
            conn.executescript(_SCHEMA)
            if "chain" not in {row[1] for row in conn.execute("PRAGMA table_info(audit)")}:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ALTER TABLE audit ADD COLUMN chain TEXT")
                self._seal(conn, adopt=True)
                conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the KMS store {self.path}: {exc}", path=str(self.path)) from None
        self.account = self._setting("account", DEFAULT_ACCOUNT)
        self.region = self._setting("region", DEFAULT_REGION)
        self._queue: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._writer = threading.Thread(target=self._write_loop, name="teelab-kms-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, kms_dir: Path, master_key_file: Path | None = None) -> Store:
        """Open (or make) the store in ``kms_dir`` with its master key (see ``MasterKey.load_or_create``)."""
        if kms_dir.exists() and not kms_dir.is_dir():
            raise StoreError(
                f"the KMS directory {kms_dir} is not a directory",
                hint="name a directory (made if missing) for --kms-dir",
                path=str(kms_dir),
            )
        return cls(kms_dir, MasterKey.load_or_create(kms_dir, master_key_file))

    # -- connections and the writer thread ---------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def reader(self) -> sqlite3.Connection:
        """This thread's connection, for reads (and schema of modules that keep tables beside these)."""
        return self._conn()

    def _setting(self, name: str, default: str) -> str:
        conn = self._conn()
        conn.execute("INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)", (name, default))
        return conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()[0]

    def submit(self, change: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Run ``change(conn)`` in the next group commit; the future resolves once it is durable."""
        future: Future[T] = Future()
        self._queue.put((change, future))
        return future

    def _write_loop(self) -> None:
        conn = self._conn()
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            stop = False
            while len(batch) < 512:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(conn, batch)
            if stop:
                break
        conn.close()

    def _commit(
        self, conn: sqlite3.Connection, batch: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]]
    ) -> None:
        # once running, a future cannot be cancelled; a cancelled one's change is still committed, unanswered
        waiting = [future.set_running_or_notify_cancel() for _, future in batch]
        results: list[tuple[Future[Any], bool, Any]] = []
        written_ids().clear()  # left by a batch that failed
        try:
            conn.execute("BEGIN IMMEDIATE")
            for change, future in batch:
                conn.execute("SAVEPOINT item")
                try:
                    results.append((future, True, change(conn)))
                    conn.execute("RELEASE item")
                except Exception as exc:  # handed to that caller; the rest of the batch goes on
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                    results.append((future, False, exc))
            self._seal(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"KMS store write failed: {exc}", path=str(self.path))
            for (_, future), wanted in zip(batch, waiting, strict=True):
                if wanted:
                    future.set_exception(error)
            return
        for (future, ok, value), wanted in zip(results, waiting, strict=True):
            if not wanted:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- keys ----------------------------------------------------------------------------------------------

    def arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def new_key(
        self,
        policy: str,
        description: str = "",
        key_usage: str = "ENCRYPT_DECRYPT",
        key_spec: str = "SYMMETRIC_DEFAULT",
        material: bytes | None = None,
    ) -> tuple[KeyRecord, Callable[[sqlite3.Connection], KeyRecord]]:
        """A fresh key and the change that stores it (submit it, or run it inside a larger change);
        ``material``: what the key spec keeps (a private key, an HMAC secret), else 32 random bytes."""
        key_id = str(uuid.uuid4())
        material = secrets.token_bytes(32) if material is None else material
        record = KeyRecord(
            key_id,
            self.arn(key_id),
            round(time.time(), 3),
            description,
            "Enabled",
            None,
            key_usage,
            key_spec,
            policy,
        )
        wrapped = self.master.wrap(key_id, material)

        def change(conn: sqlite3.Connection) -> KeyRecord:
            conn.execute(
                "INSERT INTO keys (id, created, description, state, deletion_date, key_usage, key_spec,"
                " wrapped, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, record.created, description, "Enabled", None, key_usage, key_spec, wrapped, policy),
            )
            self._material[key_id] = material
            return record

        return record, change

    def create_key(self, policy: str, description: str = "") -> KeyRecord:
        """Store a new key and return once it is durable."""
        _, change = self.new_key(policy, description)
        return self.submit(change).result()

    def get_key(self, key_id: str, *, now: float | None = None) -> KeyRecord | None:
        """The key, or None if unknown or past its deletion date."""
        row = (
            self._conn()
            .execute(
                "SELECT id, created, description, state, deletion_date, key_usage, key_spec, policy FROM keys"
                " WHERE id = ?",
                (key_id,),
            )
            .fetchone()
        )
        if row is None:
            return None
        record = KeyRecord(row[0], self.arn(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7])
        if record.deletion_date is not None and record.deletion_date <= (time.time() if now is None else now):
            return None
        return record

    def material(self, key_id: str) -> bytes:
        """The key's 32 bytes, unwrapped under the master key (cached: material never changes)."""
        cached = self._material.get(key_id)
        if cached is None:
            row = self._conn().execute("SELECT wrapped FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise KeyError(key_id)
            cached = self._material[key_id] = self.master.unwrap(key_id, row[0])
        return cached

    def list_keys(self, limit: int, after: str = "") -> list[KeyRecord]:
        rows = (
            self._conn()
            .execute(
                "SELECT id FROM keys WHERE id > ? AND (deletion_date IS NULL OR deletion_date > ?)"
                " ORDER BY id LIMIT ?",
                (after, time.time(), limit),
            )
            .fetchall()
        )
        return [k for (key_id,) in rows if (k := self.get_key(key_id)) is not None]

    @staticmethod
    def set_policy(key_id: str, policy: str) -> Callable[[sqlite3.Connection], None]:
        def change(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE keys SET policy = ? WHERE id = ?", (policy, key_id))

        return change

    @staticmethod
    def set_state(
        key_id: str, state: str, deletion_date: float | None
    ) -> Callable[[sqlite3.Connection], None]:
        def change(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE keys SET state = ?, deletion_date = ? WHERE id = ?", (state, deletion_date, key_id)
            )

        return change

    def purge_deleted(self) -> int:
        """Remove keys past their deletion date (returns how many), and nonces past their expiry."""

        def change(conn: sqlite3.Connection) -> int:
            now = time.time()
            conn.execute("DELETE FROM nonces WHERE expires <= ?", (now,))
            self.flush_refusals(REFUSAL_WINDOW_S)(conn)
            return conn.execute(
                "DELETE FROM keys WHERE deletion_date IS NOT NULL AND deletion_date <= ?", (now,)
            ).rowcount

        return self.submit(change).result()

    def account_policy(self) -> str | None:
        """The policy for key-less operations (CreateKey, ListKeys, GenerateRandom); None: default."""
        row = self._conn().execute("SELECT value FROM settings WHERE name = 'account_policy'").fetchone()
        return row[0] if row else None

    def set_account_policy(self, text: str | None) -> None:
        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM settings WHERE name = 'account_policy'")
            if text is not None:
                conn.execute("INSERT INTO settings (name, value) VALUES ('account_policy', ?)", (text,))

        self.submit(change).result()

    # -- credentials ---------------------------------------------------------------------------------------

    def principal_arn(self, name: str) -> str:
        return f"arn:aws:iam::{self.account}:user/{name}"

    def issue_credentials(self, name: str) -> Credentials:
        """A new access key pair for principal ``name`` (replacing an older pair of that name)."""
        access_key = "AKIA" + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        wrapped = self.master.wrap("credential:" + access_key, secret.encode())

        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM credentials WHERE name = ?", (name,))
            conn.execute(
                "INSERT INTO credentials (access_key, name, wrapped_secret, created) VALUES (?, ?, ?, ?)",
                (access_key, name, wrapped, time.time()),
            )

        self.submit(change).result()
        return Credentials(name, access_key, secret, self.principal_arn(name))

    def secret_for(self, access_key: str) -> tuple[str, str] | None:
        """(secret, principal ARN) of an access key, or None. Read on every request, never cached: a pair
        replaced by ``issue_credentials`` (here or in another process) stops working at once."""
        row = (
            self._conn()
            .execute("SELECT name, wrapped_secret FROM credentials WHERE access_key = ?", (access_key,))
            .fetchone()
        )
        if row is None:
            return None
        return self.master.unwrap("credential:" + access_key, row[1]).decode(), self.principal_arn(row[0])

    # -- nonces ------------------------------------------------------------------------------------------

    def live_nonces(self) -> dict[str, float]:
        """Nonce digests not yet expired (loaded at start so a replay across a restart is still refused)."""
        rows = self._conn().execute("SELECT digest, expires FROM nonces WHERE expires > ?", (time.time(),))
        return dict(rows.fetchall())
