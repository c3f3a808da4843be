"""The host ledger: which process holds which host CPUs, hugepages, vsock CIDs and ports.

One JSON file under the state dir, read and written under an exclusive ``flock``, so concurrent labs (several
pytest workers, two CLI runs) never hand out the same value. Each claim records the claiming pid and its start
time; claims of processes that are gone (or whose pid was reused) are reaped on every access.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import paths
from harness.host.errors import LedgerCorrupt, LedgerExhausted
from harness.host.runtime import process_start_time


@dataclass(frozen=True)
class Claim:
    kind: str
    value: int
    owner: str
    pid: int
    since: float


class Ledger:
    """Claims of host resources by kind (``cpu``, ``cid``, ``port``, ``hugepages-2048kB``...)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else paths.state_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "ledger.json"
        self._lock_path = self.directory / "ledger.lock"

    def claim(
        self, kind: str, candidates: Iterable[int], count: int, owner: str, *, pid: int | None = None
    ) -> tuple[int, ...]:
        """Claim the first ``count`` free values among ``candidates`` for ``owner``; all or nothing."""
        with self._locked() as table:
            return _take(table, kind, candidates, count, owner, pid)

    def claim_exact(self, kind: str, values: Iterable[int], owner: str, *, pid: int | None = None) -> None:
        """Claim exactly ``values`` or nothing (``LedgerExhausted`` names the values held by others)."""
        values = list(values)
        with self._locked() as table:
            taken = table.get(kind, {})
            held = [v for v in values if str(v) in taken]
            if held:
                owners = sorted({taken[str(v)]["owner"] for v in held})
                raise LedgerExhausted(
                    f"{owner} wants {kind} {values} but {held} are held by {', '.join(owners)}",
                    hint=f"choose other {kind} values or stop the holder",
                    kind=kind,
                    held=held,
                )
            _take(table, kind, values, len(values), owner, pid)

    def transfer(self, kind: str, values: Iterable[int], owner: str, *, pid: int | None = None) -> None:
        """Hand ``values`` (all held now) to ``owner`` in one step, so no other lab can take them between a
        release and a claim; ``LedgerExhausted`` names the values that are not held and changes nothing."""
        values = list(values)
        with self._locked() as table:
            taken = table.get(kind, {})
            loose = [v for v in values if str(v) not in taken]
            if loose:
                raise LedgerExhausted(
                    f"{owner} takes over {kind} {values} but {loose} are not held",
                    hint="claim the values before handing them over",
                    kind=kind,
                    loose=loose,
                )
            for value in values:
                del taken[str(value)]
            _take(table, kind, values, len(values), owner, pid)

    def release(self, kind: str, values: Iterable[int]) -> None:
        with self._locked() as table:
            for value in values:
                table.get(kind, {}).pop(str(value), None)

    def release_owner(self, owner: str) -> None:
        """Drop every claim ``owner`` holds, of any kind."""
        with self._locked() as table:
            for taken in table.values():
                for value in [v for v, e in taken.items() if e["owner"] == owner]:
                    del taken[value]

    def owner_of(self, kind: str, value: int) -> str | None:
        with self._locked() as table:
            entry = table.get(kind, {}).get(str(value))
        return entry["owner"] if entry else None

    def claims(self, kind: str | None = None) -> list[Claim]:
        """Live claims, of one kind or all."""
        with self._locked() as table:
            return [
                Claim(k, int(v), e["owner"], e["pid"], e["since"])
                for k, taken in sorted(table.items())
                if kind is None or k == kind
                for v, e in sorted(taken.items(), key=lambda item: int(item[0]))
            ]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        with paths.exclusive_lock(self._lock_path):
            table = self._load()
            _reap(table)
            yield table
            self._store(table)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            table = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise LedgerCorrupt(
                f"{self.path} is not JSON: {exc}", hint=f"move {self.path} aside; claims start afresh"
            ) from exc
        if not isinstance(table, dict):
            raise LedgerCorrupt(f"{self.path} is not a JSON object", hint=f"move {self.path} aside")
        return table

    def _store(self, table: dict[str, dict[str, Any]]) -> None:
        table = {kind: taken for kind, taken in table.items() if taken}
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(temp, self.path)


def _take(
    table: dict[str, dict[str, Any]],
    kind: str,
    candidates: Iterable[int],
    count: int,
    owner: str,
    pid: int | None,
) -> tuple[int, ...]:
    """Record the first ``count`` free values among ``candidates`` as ``owner``'s, in a locked ``table``."""
    pid = os.getpid() if pid is None else pid
    taken = table.setdefault(kind, {})
    chosen: list[int] = []
    for value in candidates:
        if str(value) not in taken and value not in chosen:
            chosen.append(value)
            if len(chosen) == count:
                break
    if len(chosen) < count:
        holders = sorted({entry["owner"] for entry in taken.values()})
        raise LedgerExhausted(
            f"{owner} needs {count} free {kind} value(s), {len(chosen)} left among the candidates",
            hint=f"stop a lab holding {kind} ({', '.join(holders[:5]) or 'none'}) or widen the range",
            kind=kind,
            wanted=count,
        )
    entry = {"owner": owner, "pid": pid, "start": process_start_time(pid), "since": time.time()}
    for value in chosen:
        taken[str(value)] = entry
    return tuple(chosen)


def _reap(table: dict[str, dict[str, Any]]) -> None:
    """Drop claims whose process is gone or whose pid now belongs to a newer process."""
    alive: dict[tuple[int, Any], bool] = {}
    for taken in table.values():
        for value, entry in list(taken.items()):
            key = (entry["pid"], entry.get("start"))
            if key not in alive:
                now = process_start_time(entry["pid"])
                alive[key] = now is not None and entry.get("start") in (None, now)
            if not alive[key]:
                del taken[value]
