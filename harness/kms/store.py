"""The KMS store: keys (material wrapped under the master key), credentials, policies, audit log and nonces.

SQLite in WAL mode with synchronous=FULL. Every write goes through one writer thread that commits whatever is
queued in one transaction (group commit), then resolves the callers' futures: acknowledged means durable.
Audit rows are chained in that transaction: each row's ``chain`` is an HMAC (keyed from the master key) over
the previous row's and its own fields, and a MAC'd head names the last row, so editing, removing or
truncating rows shows in ``verify_audit``. Anonymous refusals past ``REFUSAL_CAP`` an hour per source and
kind are counted instead of logged; the count enters the chain as one summary row.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness.kms.errors import AuditChainBroken, StoreError
from harness.kms.material import MasterKey

T = TypeVar("T")
DEFAULT_ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"
# the peer of the request being served (set by the HTTP layer): the source anonymous refusals are counted by
REQUEST_PEER: ContextVar[str] = ContextVar("REQUEST_PEER", default="-")
GENESIS = "00" * 32  # the chain value before the first audit row
REFUSAL_CAP = 100  # anonymous refusals logged per source and kind each REFUSAL_WINDOW_S; the rest are counted
REFUSAL_WINDOW_S = 3600.0
REFUSAL_SOURCES = 64  # sources counted apart; refusals from further ones share the source "other"
_AUDIT_FIELDS = (
    "id, time, request_id, operation, key_id, principal, evidence_digest, decision, reasons, status, error"
)

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


@dataclass(frozen=True)
class AuditRow:
    """One audit record; ``reasons`` says why the decision was taken."""

    request_id: str
    operation: str
    key_id: str | None
    principal: str | None
    evidence_digest: str | None
    decision: str  # "allow" | "deny" | "error"
    reasons: tuple[str, ...]
    status: int
    error: str | None
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "reasons": list(self.reasons)}


class Store:
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
        _written.__dict__.pop("ids", None)  # left by a batch that failed
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

    # -- audit and nonces ----------------------------------------------------------------------------------

    @staticmethod
    def record(
        row: AuditRow, nonce: tuple[str, float] | None = None, source: str | None = None
    ) -> Callable[[sqlite3.Connection], None]:
        """The change that appends an audit row (and remembers a nonce digest until its expiry). An anonymous
        refusal past the cap of its ``source`` (default: the peer of the request being served) and kind is
        counted instead."""
        peer = source or REQUEST_PEER.get()

        def change(conn: sqlite3.Connection) -> None:
            if nonce is not None:
                conn.execute("INSERT OR REPLACE INTO nonces (digest, expires) VALUES (?, ?)", nonce)
            if row.principal is None and row.decision != "allow" and not _admit_refusal(conn, row, peer):
                return
            _insert(conn, row)

        return change

    @staticmethod
    def flush_refusals(age: float) -> Callable[[sqlite3.Connection], int]:
        """The change that turns refusal counts at least ``age`` seconds old into summary audit rows."""

        def change(conn: sqlite3.Connection) -> int:
            now = time.time()
            stale = conn.execute(
                "SELECT source, kind, since, counted FROM refusals WHERE since <= ?", (now - age,)
            ).fetchall()
            for source, kind, since, counted in stale:
                if counted:
                    _insert(conn, _summary(source, kind, since, counted, now))
            conn.execute("DELETE FROM refusals WHERE since <= ?", (now - age,))
            return len(stale)

        return change

    def pending_refusals(self) -> list[tuple[str, str, float, int]]:
        """(source, kind, since, counted) of refusals counted but not yet summarised in the audit log."""
        return (
            self._conn()
            .execute(
                "SELECT source, kind, since, counted FROM refusals WHERE counted > 0 ORDER BY source, kind"
            )
            .fetchall()
        )

    def _seal(self, conn: sqlite3.Connection, *, adopt: bool = False) -> None:
        """Chain the audit rows this transaction inserted (``adopt``: every unchained row, for a store made
        before rows were chained), and MAC the new head. A row put in by other means stays unchained."""
        ids = sorted(_written.__dict__.pop("ids", set()))
        if adopt:
            rows = conn.execute(
                f"SELECT {_AUDIT_FIELDS} FROM audit WHERE chain IS NULL ORDER BY id"
            ).fetchall()
        else:
            rows = [
                r
                for i in ids
                if (r := conn.execute(f"SELECT {_AUDIT_FIELDS} FROM audit WHERE id = ?", (i,)).fetchone())
            ]
        if not rows:
            return
        before = conn.execute(
            "SELECT chain FROM audit WHERE id < ? AND chain IS NOT NULL ORDER BY id DESC LIMIT 1",
            (rows[0][0],),
        ).fetchone()
        chain = before[0] if before else GENESIS
        for row in rows:
            chain = self._link(chain, row)
            conn.execute("UPDATE audit SET chain = ? WHERE id = ?", (chain, row[0]))
        conn.execute(
            "INSERT OR REPLACE INTO settings (name, value) VALUES ('audit_head', ?)",
            (self._head(rows[-1][0], chain),),
        )

    def _link(self, previous: str, row: tuple[Any, ...]) -> str:
        fields = json.dumps(list(row), separators=(",", ":"), ensure_ascii=False).encode()
        return hmac.new(self._chain_key, bytes.fromhex(previous) + fields, hashlib.sha256).hexdigest()

    def _head(self, row_id: int, chain: str) -> str:
        mac = hmac.new(self._chain_key, f"head:{row_id}:{chain}".encode(), hashlib.sha256).hexdigest()
        return f"{row_id}:{chain}:{mac}"

    def verify_audit(self) -> tuple[int, str]:
        """Recompute the audit chain; (rows, head chain value) if intact, else AuditChainBroken naming the
        first row that does not match (edited, inserted, removed) or a head that is missing or moved."""
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot for the rows and the head, while a server may be writing
        try:
            return self._verify(conn)
        finally:
            conn.execute("COMMIT")

    def _verify(self, conn: sqlite3.Connection) -> tuple[int, str]:
        chain, count, last_id = GENESIS, 0, 0
        for row in conn.execute(f"SELECT {_AUDIT_FIELDS}, chain FROM audit ORDER BY id"):
            if row[-1] is None:
                raise AuditChainBroken(
                    f"audit row {row[0]} carries no chain value: it was not written by the KMS",
                    row=row[0],
                    path=str(self.path),
                )
            if not hmac.compare_digest(self._link(chain, row[:-1]), row[-1]):
                raise AuditChainBroken(
                    f"audit row {row[0]} does not follow from the rows before it: it, or a row before it, "
                    "was edited, inserted or removed",
                    row=row[0],
                    path=str(self.path),
                )
            chain, count, last_id = row[-1], count + 1, row[0]
        head = conn.execute("SELECT value FROM settings WHERE name = 'audit_head'").fetchone()
        if count == 0 and head is None:
            return 0, GENESIS
        if head is None or not hmac.compare_digest(head[0], self._head(last_id, chain)):
            raise AuditChainBroken(
                f"the audit log's head does not name its last row {last_id}: rows were removed from its end "
                "or the head was altered",
                row=last_id,
                path=str(self.path),
            )
        return count, chain

    def audit(self, *, key_id: str | None = None, limit: int = 100, since_id: int = 0) -> Iterator[AuditRow]:
        """Audit rows, oldest first, optionally for one key."""
        sql = (
            "SELECT request_id, operation, key_id, principal, evidence_digest, decision, reasons, status,"
            " error, time FROM audit WHERE id > ?"
        )
        args: list[Any] = [since_id]
        if key_id:
            sql += " AND key_id = ?"
            args.append(key_id)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        for r in self._conn().execute(sql, args):
            yield AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], tuple(json.loads(r[6])), r[7], r[8], r[9])

    def live_nonces(self) -> dict[str, float]:
        """Nonce digests not yet expired (loaded at start so a replay across a restart is still refused)."""
        rows = self._conn().execute("SELECT digest, expires FROM nonces WHERE expires > ?", (time.time(),))
        return dict(rows.fetchall())


_written = threading.local()  # ids of the audit rows the writer thread's open transaction inserted


def _insert(conn: sqlite3.Connection, row: AuditRow) -> None:
    cursor = conn.execute(
        "INSERT INTO audit (time, request_id, operation, key_id, principal, evidence_digest, decision,"
        " reasons, status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.time,
            row.request_id,
            row.operation,
            row.key_id,
            row.principal,
            row.evidence_digest,
            row.decision,
            json.dumps(list(row.reasons)),
            row.status,
            row.error,
        ),
    )
    _written.__dict__.setdefault("ids", set()).add(cursor.lastrowid)


def _admit_refusal(conn: sqlite3.Connection, row: AuditRow, source: str) -> bool:
    """Whether an anonymous refusal is logged (within the cap of its source and kind) or only counted."""
    kind = row.error or row.decision
    known = conn.execute("SELECT 1 FROM refusals WHERE source = ? LIMIT 1", (source,)).fetchone()
    if known is None and conn.execute("SELECT COUNT(DISTINCT source) FROM refusals").fetchone()[0] >= (
        REFUSAL_SOURCES
    ):
        source = "other"
    entry = conn.execute(
        "SELECT since, logged, counted FROM refusals WHERE source = ? AND kind = ?", (source, kind)
    ).fetchone()
    if entry is not None and row.time - entry[0] >= REFUSAL_WINDOW_S:
        if entry[2]:
            _insert(conn, _summary(source, kind, entry[0], entry[2], row.time))
        entry = None
    if entry is None:
        conn.execute(
            "INSERT OR REPLACE INTO refusals (source, kind, since, logged, counted) VALUES (?, ?, ?, 1, 0)",
            (source, kind, row.time),
        )
        return True
    if entry[1] < REFUSAL_CAP:
        conn.execute("UPDATE refusals SET logged = logged + 1 WHERE source = ? AND kind = ?", (source, kind))
        return True
    conn.execute("UPDATE refusals SET counted = counted + 1 WHERE source = ? AND kind = ?", (source, kind))
    return False


def _summary(source: str, kind: str, since: float, counted: int, now: float) -> AuditRow:
    return AuditRow(
        f"summary-{uuid.uuid4()}",
        "-",
        None,
        None,
        None,
        "counted",
        (
            f"{counted} more anonymous {kind} refusals from {source} since {since:.0f}"
            " were counted, not logged",
        ),
        0,
        kind,
        now,
    )
