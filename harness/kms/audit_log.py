"""The KMS audit log inside the store: rows appended in the writer thread's transaction and chained there
(an HMAC keyed from the master key over the previous row's chain value and the row's fields, with a MAC'd
head), so ``verify_audit`` finds an edited, inserted, removed or cut-off row; anonymous refusals past
``REFUSAL_CAP`` an hour per source and kind are counted, and the count enters the chain as one summary row."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from harness.kms.errors import AuditChainBroken

# the peer of the request being served (set by the HTTP layer): the source anonymous refusals are counted by
REQUEST_PEER: ContextVar[str] = ContextVar("REQUEST_PEER", default="-")
GENESIS = "00" * 32  # the chain value before the first audit row
REFUSAL_CAP = 100  # anonymous refusals logged per source and kind each REFUSAL_WINDOW_S; the rest are counted
REFUSAL_WINDOW_S = 3600.0
REFUSAL_SOURCES = 64  # sources counted apart; refusals from further ones share the source "other"
_AUDIT_FIELDS = (
    "id, time, request_id, operation, key_id, principal, evidence_digest, decision, reasons, status, error"
)


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


class AuditLog:
    """The audit log's half of ``Store``, which gives it ``_conn()`` (a reader) and ``_chain_key``."""

    _chain_key: bytes

    def _conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    # -- the audit log ----------------------------------------------------------------------------------

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
        ids = sorted(written_ids())
        written_ids().clear()
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


_written = threading.local()  # ids of the audit rows the writer thread's open transaction inserted


def written_ids() -> set[int]:
    """The ids of the audit rows the writer thread's open transaction inserted (to be chained at its end)."""
    if not hasattr(_written, "ids"):
        _written.ids = set()
    return _written.ids


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
    written_ids().add(cursor.lastrowid)


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
