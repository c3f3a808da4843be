"""AWS Signature Version 4 for the KMS JSON protocol, stdlib only: guests sign with it, the lab KMS verifies.

One definition on both sides, so a request the guest signs is checked by exactly the same canonical form.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
_SPACES = re.compile(r"\s+")
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*Signature=([0-9a-f]{64})\s*$"
)


@dataclass(frozen=True)
class Authorization:
    """The parts of an ``Authorization: AWS4-HMAC-SHA256 ...`` header."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse_authorization(value: str) -> Authorization:
    """Split an Authorization header; ValueError says what is malformed."""
    match = _AUTH.match(value.strip())
    if not match:
        raise ValueError(
            "Authorization is not 'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...'"
        )
    credential, signed, signature = match.groups()
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not re.fullmatch(r"\d{8}", parts[1]):
        raise ValueError("Credential must be ACCESS_KEY/YYYYMMDD/REGION/SERVICE/aws4_request")
    headers = tuple(signed.split(";"))
    if list(headers) != sorted(headers) or any(h != h.lower() or not h for h in headers):
        raise ValueError("SignedHeaders must be sorted lower-case header names separated by ';'")
    return Authorization(parts[0], parts[1], parts[2], parts[3], headers, signature)


def canonical_request(
    method: str, path: str, query: str, headers: dict[str, str], signed_headers: tuple[str, ...], body: bytes
) -> str:
    """The SigV4 canonical request; ``headers`` maps lower-case names to values (KeyError if absent).

    Bytes that are not UTF-8 (in the path or a header value) come as surrogate escapes, as Python's HTTP
    servers decode them, and are signed as the bytes that were sent."""
    canonical_path = quote(unquote(path or "/"), safe="/-_.~", errors="surrogateescape")
    pairs = sorted(tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p)
    canonical_query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in pairs)
    canonical_headers = "".join(
        f"{name}:{_SPACES.sub(' ', headers[name].strip())}\n" for name in signed_headers
    )
    return "\n".join(
        [
            method.upper(),
            canonical_path,
            canonical_query,
            canonical_headers,
            ";".join(signed_headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )


def _encode(part: str) -> str:
    return quote(unquote(part), safe="-_.~", errors="surrogateescape")


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signature(secret: str, amz_date: str, auth_scope: str, canonical: str) -> str:
    """Hex HMAC of the string to sign under the key derived from ``secret`` and the scope."""
    date, region, service, _ = auth_scope.split("/")
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    to_sign = "\n".join([ALGORITHM, amz_date, auth_scope, digest])
    return hmac.new(signing_key(secret, date, region, service), to_sign.encode(), hashlib.sha256).hexdigest()


def sign(
    *,
    access_key: str,
    secret: str,
    region: str,
    host: str,
    target: str,
    body: bytes,
    service: str = "kms",
    session_token: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """Headers for a signed ``POST /`` of the KMS JSON protocol (Host, X-Amz-Date, Authorization, ...)."""
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    headers = {
        "host": host,
        "content-type": "application/x-amz-json-1.1",
        "x-amz-date": amz_date,
        "x-amz-target": target,
    }
    if session_token:
        headers["x-amz-security-token"] = session_token
    signed = tuple(sorted(headers))
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    sig = signature(secret, amz_date, scope, canonical_request("POST", "/", "", headers, signed, body))
    headers["authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={';'.join(signed)}, Signature={sig}"
    )
    return headers
