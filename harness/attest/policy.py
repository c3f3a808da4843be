"""What a verifier requires of evidence (``Policy``, loadable from TOML) and a book of single-use nonces."""

from __future__ import annotations

import math
import os
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from harness.attest.errors import EvidenceFileError, PolicyError, UnknownRoot
from harness.attest.roots import LAB, ROOT_NAMES, VENDOR_ROOT_NAMES
from harness.attest.snp import TcbVersion

NONCE_UNKNOWN = "nonce-unknown"
NONCE_STALE = "nonce-stale"
NONCE_REUSED = "nonce-reused"


MAX_AGE_LIMIT_S = 10 * 365 * 86400  # a max_age past this is a typo, not a policy


class NonceChecker(Protocol):
    """What a policy's nonce book must do: say what is wrong with a nonce (or None), and use it up."""

    def check(self, nonce: bytes) -> str | None: ...

    def consume(self, nonce: bytes) -> str | None: ...


class NonceBook:
    """Issues random nonces and accepts each once within ``ttl`` seconds; thread-safe.

    ``check``/``consume`` return None for a good nonce, else "nonce-unknown", "nonce-stale" or "nonce-reused".
    """

    def __init__(
        self,
        ttl: float = 300.0,
        *,
        size: int = 32,
        clock: Callable[[], float] = time.monotonic,
        limit: int = 100_000,
    ) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._limit = limit
        self._issued: dict[bytes, float] = {}  # nonce -> issue time
        self._used: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        nonce = os.urandom(self.size)
        with self._lock:
            now = self._clock()
            self._prune(now)
            if len(self._issued) >= self._limit:
                oldest = min(self._issued, key=self._issued.__getitem__)
                del self._issued[oldest]
            self._issued[nonce] = now
        return nonce

    def check(self, nonce: bytes) -> str | None:
        with self._lock:
            return self._verdict(bytes(nonce), self._clock())

    def consume(self, nonce: bytes) -> str | None:
        nonce = bytes(nonce)
        with self._lock:
            now = self._clock()
            problem = self._verdict(nonce, now)
            if problem is None:
                self._used[nonce] = self._issued.pop(nonce)
            return problem

    def _verdict(self, nonce: bytes, now: float) -> str | None:
        if nonce in self._used:
            return NONCE_REUSED
        issued = self._issued.get(nonce)
        if issued is None:
            return NONCE_UNKNOWN
        if now - issued > self.ttl:
            return NONCE_STALE
        return None

    def _prune(self, now: float) -> None:
        # Expired nonces are kept for one more ttl so that a late use is reported as stale, not unknown.
        horizon = now - 2 * self.ttl
        for book in (self._issued, self._used):
            for nonce in [n for n, t in book.items() if t < horizon]:
                del book[nonce]


_BYTE_FIELDS = {
    "measurement": 48,
    "host_data": 32,
    "report_data": 64,
    "mrtd": 48,
    "mrconfigid": 48,
    "mrowner": 48,
    "mrownerconfig": 48,
    "mrenclave": 32,
    "mrsigner": 32,
    "nonce": None,
    "public_key": None,
    "user_data": None,
}


@dataclass(frozen=True)
class Policy:
    """Requirements on evidence. Byte values are compared exactly; None means "not checked".

    ``roots`` names the roots a chain may end at (vendor names and "lab"; the lab root is accepted only when
    named). ``nonce``/``public_key`` are what the evidence must be bound to: Nitro documents carry them,
    SNP/TDX report_data must equal ``teelab_guest.binding.report_data(nonce, public_key)``. ``claims`` pins
    any claim by key to an exact JSON value. A TDX quote without collateral (TCB info, QE identity, CRLs) is
    refused as ``collateral-missing`` unless ``allow_missing_collateral``.
    """

    roots: tuple[str, ...] = VENDOR_ROOT_NAMES
    measurement: bytes | None = None
    host_data: bytes | None = None
    report_data: bytes | None = None
    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    mrtd: bytes | None = None
    rtmrs: Mapping[int, bytes] = field(default_factory=dict)
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    allow_debug: bool = False
    allow_migrate_ma: bool = False
    allow_smt: bool = True
    max_vmpl: int = 0
    min_tcb: TcbVersion | None = None
    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    allow_missing_collateral: bool = False
    nonce: bytes | None = None
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce_book: NonceChecker | None = None
    max_age: timedelta | None = None
    module_id: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    lab_dir: Path | None = None

    def __post_init__(self) -> None:
        """Check every field and bring each to its one type (a policy from TOML or code alike), or E810."""
        self._check_roots()
        self._check_bytes()
        object.__setattr__(self, "pcrs", _indexed(self.pcrs, "pcrs", 32, (32, 48, 64)))
        object.__setattr__(self, "rtmrs", _indexed(self.rtmrs, "rtmrs", 4, (48,)))
        _check_int(self.max_vmpl, "max_vmpl", 3)
        for name in ("isv_prod_id", "min_isv_svn"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, 0xFFFF)
        if self.min_tcb is not None and not isinstance(self.min_tcb, TcbVersion):
            try:
                object.__setattr__(self, "min_tcb", TcbVersion.from_value(self.min_tcb))
            except (ValueError, TypeError, AttributeError, OverflowError) as exc:
                raise PolicyError(f"policy min_tcb: {exc}", field="min_tcb") from None
        if self.max_age is not None and not isinstance(self.max_age, timedelta):
            object.__setattr__(self, "max_age", _max_age(self.max_age))
        for name in ("allow_debug", "allow_migrate_ma", "allow_smt", "allow_missing_collateral"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(
                    f"policy {name} must be true or false, got {getattr(self, name)!r}", field=name
                )
        self._check_texts()

    def _check_roots(self) -> None:
        roots = _names(self.roots, "roots")
        for name in roots:
            if name not in ROOT_NAMES:
                raise UnknownRoot(
                    f"unknown root {name!r}; known: {', '.join(ROOT_NAMES)}",
                    field="roots",
                    hint="run `teelab attest roots` to list them",
                )
        object.__setattr__(self, "roots", roots)

    def _check_bytes(self) -> None:
        for name, size in _BYTE_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (bytes, bytearray)) or (size is not None and len(value) != size):
                raise PolicyError(
                    f"policy {name} must be {size or 'some'} bytes, got {_describe(value)}", field=name
                )
            object.__setattr__(self, name, bytes(value))

    def _check_texts(self) -> None:
        """tcb_statuses, module_id, claims and lab_dir: names, text, a mapping and a path."""
        statuses = _names(self.tcb_statuses, "tcb_statuses")
        if not all(isinstance(status, str) for status in statuses):
            raise PolicyError(f"policy tcb_statuses must be names, got {statuses!r}", field="tcb_statuses")
        object.__setattr__(self, "tcb_statuses", statuses)
        if self.module_id is not None and not isinstance(self.module_id, str):
            raise PolicyError(
                f"policy module_id must be text, got {_describe(self.module_id)}", field="module_id"
            )
        if not isinstance(self.claims, Mapping):
            raise PolicyError(
                f"policy claims must map claim names to values, got {_describe(self.claims)}", field="claims"
            )
        object.__setattr__(self, "claims", dict(self.claims))
        if self.lab_dir is not None:
            try:
                object.__setattr__(self, "lab_dir", Path(self.lab_dir))
            except TypeError:
                raise PolicyError(
                    f"policy lab_dir must be a path, got {_describe(self.lab_dir)}", field="lab_dir"
                ) from None

    @property
    def trusts_lab(self) -> bool:
        return LAB in self.roots

    @classmethod
    def from_toml(cls, path: Path | str) -> Policy:
        """Load a policy file: top-level keys are Policy fields, hex strings for bytes, [pcrs] / [rtmrs]
        tables keyed by index, min_tcb as {bootloader, tee, snp, microcode}, max_age in seconds."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise PolicyError(
                f"policy {path} is not UTF-8 text (byte {exc.start})", field="toml", path=str(path)
            ) from None
        except OSError as exc:
            raise EvidenceFileError(f"cannot read policy {path}: {exc}", path=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(
                f"policy {path} is not valid TOML: {exc}", field="toml", path=str(path)
            ) from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        known = {f.name for f in fields(cls)} - {"nonce_book"}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(
                f"{source}: unknown keys {sorted(unknown)}",
                field=sorted(unknown)[0],
                hint=f"known keys: {', '.join(sorted(known))}",
            )
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in _BYTE_FIELDS:
                values[key] = _unhex(value, key, source)
            elif key in ("pcrs", "rtmrs"):
                if isinstance(value, list):
                    value = dict(enumerate(value))
                if not isinstance(value, Mapping):
                    raise PolicyError(f"{source}: {key} must be a table of index = hex", field=key)
                values[key] = {
                    _index(k, key, source): _unhex(v, f"{key}.{k}", source) for k, v in value.items()
                }
            else:
                values[key] = value
        return cls(**values)


def _indexed(
    value: Mapping[int, bytes] | Sequence[bytes], name: str, count: int, sizes: tuple[int, ...]
) -> dict[int, bytes]:
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    if not isinstance(value, Mapping):
        raise PolicyError(f"policy {name} must map index -> bytes", field=name)
    out = {}
    for index, digest in value.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise PolicyError(f"policy {name} index {index!r} is not 0..{count - 1}", field=name)
        if not isinstance(digest, (bytes, bytearray)) or len(digest) not in sizes:
            raise PolicyError(
                f"policy {name}[{index}] must be {' or '.join(map(str, sizes))} bytes, "
                f"got {_describe(digest)}",
                field=f"{name}.{index}",
            )
        out[index] = bytes(digest)
    return out


def _check_int(value: object, name: str, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise PolicyError(f"policy {name} must be 0..{high}, got {value!r}", field=name)


def _max_age(value: object) -> timedelta:
    """max_age in seconds: a finite number above 0 and at most ten years."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError("policy max_age must be seconds or a timedelta", field="max_age")
    if not (math.isfinite(value) and 0 < value <= MAX_AGE_LIMIT_S):
        raise PolicyError(
            f"policy max_age must be a number of seconds above 0 and at most {MAX_AGE_LIMIT_S:g} "
            f"(ten years), got {value!r}",
            field="max_age",
        )
    return timedelta(seconds=value)


def _names(value: Any, name: str) -> tuple[Any, ...]:
    """One name or a sequence of them, as a tuple."""
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise PolicyError(
            f"policy {name} must be a name or a list of names, got {_describe(value)}", field=name
        ) from None


def _index(key: object, name: str, source: str) -> int:
    try:
        return int(str(key))
    except ValueError:
        raise PolicyError(f"{source}: {name} key {key!r} is not an index", field=name) from None


def _unhex(value: object, name: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise PolicyError(f"{source}: {name} must be a hex string", field=name)
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise PolicyError(f"{source}: {name} is not hex: {value[:40]!r}", field=name) from None


def _describe(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    return type(value).__name__
