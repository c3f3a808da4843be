"""The outcome of verification: ``Verdict`` (ok, kind, root, claims) and each failed check as a ``Reason``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reason:
    """One failed check: a stable ``code`` ("measurement-mismatch"), the evidence ``field`` it concerns."""

    code: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.code} [{self.field}]: {self.message}"


@dataclass(frozen=True)
class Verdict:
    """``ok`` only when no check failed. ``claims`` is JSON-ready (hex for bytes); see docs/attestation.md."""

    ok: bool
    kind: str
    root: str | None
    claims: Mapping[str, Any]
    reasons: tuple[Reason, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def codes(self) -> set[str]:
        return {r.code for r in self.reasons}

    def fields(self) -> set[str]:
        return {r.field for r in self.reasons}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kind": self.kind,
            "root": self.root,
            "claims": dict(self.claims),
            "reasons": [{"code": r.code, "field": r.field, "message": r.message} for r in self.reasons],
            "notes": list(self.notes),
        }
