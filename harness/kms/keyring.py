"""What the KMS keeps about keys beside their rows in the store: aliases, tags, material versions, rotation.

Tables of their own in the store's database, written through the store's writer (so a change commits with
its request's audit row). A key's material version 0 is the one in its ``keys`` row; each rotation adds a
version here, wrapped under the master key with the key id and version as associated data. Ciphertext blobs
name their version, so every version keeps decrypting.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.kms.errors import AlreadyExists, StoreError, TagError
from harness.kms.store import Store

MAX_CATCH_UP = 16  # rotations one overdue check makes at most (a clock moved years ahead)
DAY_S = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY, key_id TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS aliases_key ON aliases (key_id);
CREATE TABLE IF NOT EXISTS key_tags (
    key_id TEXT NOT NULL, tag_key TEXT NOT NULL, tag_value TEXT NOT NULL, PRIMARY KEY (key_id, tag_key));
CREATE TABLE IF NOT EXISTS key_versions (
    key_id TEXT NOT NULL, version INTEGER NOT NULL, created REAL NOT NULL, kind TEXT NOT NULL,
    wrapped BLOB NOT NULL, PRIMARY KEY (key_id, version));
CREATE TABLE IF NOT EXISTS key_rotation (
    key_id TEXT PRIMARY KEY, period_days INTEGER NOT NULL, next_rotation REAL NOT NULL);
"""


@dataclass(frozen=True)
class Alias:
    name: str
    key_id: str
    created: float
    updated: float


@dataclass(frozen=True)
class Rotation:
    version: int
    created: float
    kind: str  # "AUTOMATIC" | "ON_DEMAND"


class Keyring:
    """Aliases, tags, versions and rotation schedules of one store's keys."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._versions: dict[tuple[str, int], bytes] = {}
        self._rotating = threading.Lock()
        try:
            store.reader().executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot add the keyring tables to {store.path}: {exc}") from None
        store.submit(_sweep).result()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.store.reader().execute(sql, args).fetchall()

    # -- aliases -------------------------------------------------------------------------------------------

    def alias(self, name: str) -> Alias | None:
        """The alias ``name``, unless it is missing or its key was purged."""
        rows = self._read(
            "SELECT a.name, a.key_id, a.created, a.updated FROM aliases a JOIN keys k ON k.id = a.key_id"
            " WHERE a.name = ?",
            (name,),
        )
        return Alias(*rows[0]) if rows else None

    def aliases(self, key_id: str | None, limit: int, after: str) -> list[Alias]:
        """Aliases ordered by name after ``after``, of one key or all; those of deleted keys are left out."""
        sql = (
            "SELECT a.name, a.key_id, a.created, a.updated FROM aliases a JOIN keys k ON k.id = a.key_id"
            " WHERE a.name > ?" + (" AND a.key_id = ?" if key_id else "") + " ORDER BY a.name LIMIT ?"
        )
        args = (after, key_id, limit) if key_id else (after, limit)
        return [Alias(*row) for row in self._read(sql, args)]

    @staticmethod
    def put_alias(
        name: str, key_id: str, now: float, *, create: bool
    ) -> Callable[[sqlite3.Connection], None]:
        """The change that makes alias ``name`` (AlreadyExists if it exists) or points it at ``key_id``."""

        def change(conn: sqlite3.Connection) -> None:
            if create:
                # an alias of a key that was purged went with it, as in AWS: its name is free again
                conn.execute(
                    "DELETE FROM aliases WHERE name = ? AND key_id NOT IN (SELECT id FROM keys)", (name,)
                )
                try:
                    conn.execute(
                        "INSERT INTO aliases (name, key_id, created, updated) VALUES (?, ?, ?, ?)",
                        (name, key_id, now, now),
                    )
                except sqlite3.IntegrityError:
                    raise AlreadyExists(f"an alias named {name} already exists") from None
            else:
                conn.execute("UPDATE aliases SET key_id = ?, updated = ? WHERE name = ?", (key_id, now, name))

        return change

    @staticmethod
    def delete_alias(name: str) -> Callable[[sqlite3.Connection], None]:
        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM aliases WHERE name = ?", (name,))

        return change

    @staticmethod
    def set_description(key_id: str, description: str) -> Callable[[sqlite3.Connection], None]:
        def change(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE keys SET description = ? WHERE id = ?", (description, key_id))

        return change

    # -- tags ----------------------------------------------------------------------------------------------

    def tags(self, key_id: str) -> list[tuple[str, str]]:
        return [
            (k, v)
            for k, v in self._read(
                "SELECT tag_key, tag_value FROM key_tags WHERE key_id = ? ORDER BY tag_key", (key_id,)
            )
        ]

    @staticmethod
    def set_tags(
        key_id: str, tags: list[tuple[str, str]], limit: int = 50
    ) -> Callable[[sqlite3.Connection], None]:
        """The change that adds or replaces ``tags``: TagException if the key would hold more than ``limit``
        (checked again here, in the transaction, against a concurrent TagResource)."""

        def change(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR REPLACE INTO key_tags (key_id, tag_key, tag_value) VALUES (?, ?, ?)",
                [(key_id, k, v) for k, v in tags],
            )
            count = conn.execute("SELECT COUNT(*) FROM key_tags WHERE key_id = ?", (key_id,)).fetchone()[0]
            if count > limit:
                raise TagError(f"a key holds at most {limit} tags")

        return change

    @staticmethod
    def remove_tags(key_id: str, keys: list[str]) -> Callable[[sqlite3.Connection], None]:
        def change(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "DELETE FROM key_tags WHERE key_id = ? AND tag_key = ?", [(key_id, k) for k in keys]
            )

        return change

    # -- material versions and rotation ----------------------------------------------------------------

    def current_version(self, key_id: str) -> int:
        rows = self._read("SELECT MAX(version) FROM key_versions WHERE key_id = ?", (key_id,))
        return rows[0][0] or 0

    def material(self, key_id: str, version: int) -> bytes:
        """The material of ``version`` of the key (KeyError if it has no such version)."""
        if version == 0:
            return self.store.material(key_id)
        cached = self._versions.get((key_id, version))
        if cached is None:
            rows = self._read(
                "SELECT wrapped FROM key_versions WHERE key_id = ? AND version = ?", (key_id, version)
            )
            if not rows:
                raise KeyError((key_id, version))
            cached = self._versions[(key_id, version)] = self.store.master.unwrap(
                _wrap_id(key_id, version), rows[0][0]
            )
        return cached

    def rotations(self, key_id: str) -> list[Rotation]:
        return [
            Rotation(*row)
            for row in self._read(
                "SELECT version, created, kind FROM key_versions WHERE key_id = ? ORDER BY version", (key_id,)
            )
        ]

    def schedule(self, key_id: str) -> tuple[int, float] | None:
        """(rotation period in days, next rotation time) of a key with automatic rotation, else None."""
        rows = self._read("SELECT period_days, next_rotation FROM key_rotation WHERE key_id = ?", (key_id,))
        return rows[0] if rows else None

    @staticmethod
    def set_schedule(
        key_id: str, period_days: int | None, next_rotation: float = 0.0
    ) -> Callable[[sqlite3.Connection], None]:
        """The change that turns automatic rotation on (every ``period_days``) or off (None)."""

        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM key_rotation WHERE key_id = ?", (key_id,))
            if period_days is not None:
                conn.execute(
                    "INSERT INTO key_rotation (key_id, period_days, next_rotation) VALUES (?, ?, ?)",
                    (key_id, period_days, next_rotation),
                )

        return change

    def rotate(self, key_id: str, when: float, kind: str) -> Callable[[sqlite3.Connection], int]:
        """The change that gives the key new material (the next version); returns that version."""
        master = self.store.master

        def change(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT MAX(version) FROM key_versions WHERE key_id = ?", (key_id,)).fetchone()
            version = (row[0] or 0) + 1
            wrapped = master.wrap(_wrap_id(key_id, version), secrets.token_bytes(32))
            conn.execute(
                "INSERT INTO key_versions (key_id, version, created, kind, wrapped) VALUES (?, ?, ?, ?, ?)",
                (key_id, version, when, kind, wrapped),
            )
            return version

        return change

    def rotate_if_due(self, key_id: str, now: float) -> int:
        """Make the automatic rotations that fell due by ``now`` (each dated when it fell due, at most
        MAX_CATCH_UP); returns how many. Durable on return."""
        schedule = self.schedule(key_id)
        if schedule is None or schedule[1] > now:
            return 0
        with self._rotating:

            def change(conn: sqlite3.Connection) -> int:
                row = conn.execute(
                    "SELECT period_days, next_rotation FROM key_rotation WHERE key_id = ?", (key_id,)
                ).fetchone()
                if row is None or row[1] > now:
                    return 0  # another request rotated it first
                period, due, made = row[0] * DAY_S, row[1], 0
                while due <= now and made < MAX_CATCH_UP:
                    self.rotate(key_id, due, "AUTOMATIC")(conn)
                    due, made = due + period, made + 1
                if due <= now:  # far behind: the next one is a period from now
                    due = now + period
                conn.execute("UPDATE key_rotation SET next_rotation = ? WHERE key_id = ?", (due, key_id))
                return made

            return self.store.submit(change).result()


def _wrap_id(key_id: str, version: int) -> str:
    return f"{key_id}#v{version}"


def _sweep(conn: sqlite3.Connection) -> None:
    """Forget what belonged to keys that were purged (Store.purge_deleted runs as a server starts): their
    rotated material above all, which must go with the key, and their aliases, tags and schedules."""
    for table in ("key_versions", "key_tags", "key_rotation", "aliases"):
        conn.execute(f"DELETE FROM {table} WHERE key_id NOT IN (SELECT id FROM keys)")
