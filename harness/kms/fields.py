"""Checks of request fields as AWS KMS's API model states them; each refusal names the field."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from harness.kms.errors import KmsRequestError

COMMON_FIELDS = {"GrantTokens", "DryRun"}


def only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed - COMMON_FIELDS
    if unknown:
        raise KmsRequestError(f"unknown fields {sorted(str(u)[:64] for u in unknown)[:5]}")


def optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise KmsRequestError(f"{name} must be an integer")
    if not isinstance(value, kind):
        raise KmsRequestError(f"{name} must be a {kind.__name__}")
    return value


def required(body: dict[str, Any], name: str, kind: type) -> Any:
    value = optional(body, name, kind)
    if value is None:
        raise KmsRequestError(f"{name} is required")
    return value


def choice(body: dict[str, Any], name: str, choices: tuple[str, ...] | list[str]) -> str | None:
    value = body.get(name)
    if value is not None and value not in choices:
        raise KmsRequestError(f"{name} must be one of {', '.join(choices)}", given=str(value)[:64])
    return value


def integer(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = optional(body, name, int)
    value = default if value is None else value
    if not low <= value <= high:
        raise KmsRequestError(f"{name} must be {low}..{high}")
    return value


def text(body: dict[str, Any], name: str, low: int, high: int, *, needed: bool = False) -> str | None:
    value = required(body, name, str) if needed else optional(body, name, str)
    if value is not None and not low <= len(value) <= high:
        raise KmsRequestError(f"{name} must be {low}..{high} characters")
    return value


def blob(body: dict[str, Any], name: str, limit: int, *, needed: bool = False) -> bytes:
    value = body.get(name)
    if value is None:
        if needed:
            raise KmsRequestError(f"{name} is required")
        return b""
    if not isinstance(value, str):
        raise KmsRequestError(f"{name} must be a base64 string")
    if len(value) > (limit + 2) // 3 * 4:
        raise KmsRequestError(f"{name} must be at most {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsRequestError(f"{name} is not valid base64") from None
    if not 1 <= len(data) <= limit:
        raise KmsRequestError(f"{name} must be 1..{limit} bytes")
    return data


def context(body: dict[str, Any], name: str = "EncryptionContext") -> dict[str, str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise KmsRequestError(f"{name} must map strings to strings")
    if len(json.dumps(value)) > 8192:
        raise KmsRequestError(f"{name} is too large")
    return value


def marker(body: dict[str, Any]) -> str:
    return optional(body, "Marker", str) or ""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
