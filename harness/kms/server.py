"""The KMS over HTTP (aiohttp): AWS JSON protocol, SigV4 authentication, body cap, audit before answer."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import sqlite3
import time
import uuid
from calendar import timegm
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from teelab_guest import kms_sigv4

from harness.kms.audit_log import AuditRow
from harness.kms.base import Audit, Outcome
from harness.kms.errors import (
    AccessDenied,
    BodyTooLarge,
    IncompleteSignature,
    InvalidSignature,
    KmsError,
    KmsRequestError,
    SerializationError,
    UnknownOperation,
    UnrecognizedClient,
)
from harness.kms.service import KmsService
from harness.kms.store import Store

log = logging.getLogger("teelab.kms")
DEFAULT_MAX_BODY = 65536
MAX_SKEW_S = 900
CONTENT_TYPE = "application/x-amz-json-1.1"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate written as a JSON escape


class KmsHttp:
    """The aiohttp application around a ``KmsService``."""

    def __init__(self, service: KmsService, *, max_body: int = DEFAULT_MAX_BODY, workers: int = 2) -> None:
        self.service = service
        self.store: Store = service.store
        self.max_body = max_body
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teelab-kms")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        self._pool.shutdown(wait=True)

    async def handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        target = _printable(request.headers.get("X-Amz-Target", ""))
        operation = target.removeprefix("TrentService.") if target.startswith("TrentService.") else target
        audit = Audit(operation=operation[:64] or "-", principal=None)
        try:
            body = await self._body(request)
            if request.method != "POST":
                raise UnknownOperation(f"method {request.method} is not supported; KMS requests are POST")
            if not target.startswith("TrentService."):
                raise UnknownOperation("X-Amz-Target must be TrentService.<Operation>", given=target[:64])
            if len(request.headers.getall("X-Amz-Target")) > 1:
                raise UnknownOperation("X-Amz-Target must be sent once")
            audit.principal = self._authenticate(request, body)
            document = _parse_json(body)
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.service.call, operation, document, audit
            )
            await self._commit(outcome, audit, request_id, 200, None)
        except KmsRequestError as err:
            return await self._refuse(err, audit, request_id)
        except Exception as exc:  # anything else is our bug: answer 500, keep the audit row
            log.exception("request %s (%s) failed", request_id, audit.operation)
            err = KmsError(f"internal error {type(exc).__name__}; request id {request_id}")
            return await self._refuse(err, audit, request_id)
        log.info("%s %s %s 200", request_id, audit.operation, audit.key_id or "-")
        return web.Response(
            body=json.dumps(outcome.response, separators=(",", ":")).encode(),
            content_type=CONTENT_TYPE,
            headers={"x-amzn-RequestId": request_id},
        )

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body:
            raise BodyTooLarge(f"request body of {request.content_length} bytes exceeds {self.max_body}")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"request body exceeds {self.max_body} bytes") from None

    def _authenticate(self, request: web.Request, body: bytes) -> str | None:
        """The principal ARN of a SigV4-signed request, None for an unsigned one."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        auth = _parse_authorization(request, header)
        amz_date = request.headers.get("X-Amz-Date", "")
        try:
            signed_at = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            raise IncompleteSignature("X-Amz-Date must be YYYYMMDDTHHMMSSZ") from None
        if abs(self.service.clock() - signed_at) > MAX_SKEW_S or auth.date != amz_date[:8]:
            raise InvalidSignature("Signature expired or dated outside the 15-minute window")
        known = self.store.secret_for(auth.access_key)
        if known is None:
            raise UnrecognizedClient(
                "The security token included in the request is invalid (unknown access key)"
            )
        secret, arn = known
        headers = {}
        for name in auth.signed_headers:
            values = request.headers.getall(name, None)
            if values is None:
                raise IncompleteSignature(f"signed header {name} is missing")
            headers[name] = ",".join(v.strip() for v in values)
        url = request.rel_url
        canonical = kms_sigv4.canonical_request(
            request.method, url.raw_path, url.raw_query_string, headers, auth.signed_headers, body
        )
        expected = kms_sigv4.signature(secret, amz_date, auth.scope, canonical)
        if not hmac.compare_digest(expected, auth.signature):
            raise InvalidSignature(
                "The request signature we calculated does not match the signature you provided"
            )
        return arn

    async def _commit(
        self, outcome: Outcome | None, audit: Audit, request_id: str, status: int, err: KmsError | None
    ) -> None:
        decision = "allow" if err is None else ("deny" if isinstance(err, AccessDenied) else "error")
        reasons = list(audit.reasons)
        if err is not None:
            reasons.append(f"{err.aws_type}: {err.message}")
        row = AuditRow(
            request_id,
            _printable(audit.operation),
            audit.key_id,
            audit.principal,
            audit.evidence_digest,
            decision,
            tuple(_printable(r) for r in reasons),  # messages may quote header bytes that are not UTF-8
            status,
            err.aws_type if err else None,
            time.time(),
        )
        record = Store.record(row, audit.nonce)
        first = outcome.change if outcome is not None else None

        def change(conn: sqlite3.Connection) -> None:
            if first is not None:
                first(conn)
            record(conn)

        await asyncio.wrap_future(self.store.submit(change))

    async def _refuse(self, err: KmsError, audit: Audit, request_id: str) -> web.Response:
        status = err.http_status
        try:
            await self._commit(None, audit, request_id, status, err)
        except KmsError as store_err:  # the refusal cannot be audited: that is a server fault
            log.error("request %s: audit failed: %s", request_id, store_err.message)
            err, status = store_err, 500
        log.info("%s %s %s %d %s", request_id, audit.operation, audit.key_id or "-", status, err.aws_type)
        return web.Response(
            status=status,
            body=json.dumps({"__type": err.aws_type, "message": err.message}).encode(),
            content_type=CONTENT_TYPE,
            headers={"x-amzn-RequestId": request_id},
        )


def _parse_authorization(request: web.Request, header: str) -> kms_sigv4.Authorization:
    """The Authorization header, refused unless it signs host and every x-amz-* header sent, for kms."""
    if not header.isascii():  # its access key goes to SQLite: no undecodable bytes
        raise IncompleteSignature("Authorization must be ASCII")
    try:
        auth = kms_sigv4.parse_authorization(header)
    except ValueError as exc:
        raise IncompleteSignature(str(exc)) from None
    unsigned = sorted(_must_sign(request) - set(auth.signed_headers))
    if unsigned:  # else a signature over host;x-amz-date alone would carry any X-Amz-Target
        raise IncompleteSignature(
            "SignedHeaders must include host and every x-amz-* header sent; "
            f"not signed: {', '.join(unsigned)}"
        )
    if auth.service != "kms":
        raise InvalidSignature(f"credential scope names service {auth.service!r}, not kms")
    return auth


def _must_sign(request: web.Request) -> set[str]:
    """The headers a signature must cover, as AWS requires: host, x-amz-date and every x-amz-* header sent."""
    sent = {name.lower() for name in request.headers}
    return {"host", "x-amz-date"} | {name for name in sent if name.startswith("x-amz-")}


def _printable(text: str) -> str:
    """``text`` with lone surrogates (what aiohttp makes of header bytes that are not UTF-8) escaped."""
    return text.encode("utf-8", "backslashreplace").decode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> Any:
    if not body:
        return {}
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"body is not valid JSON: {str(exc)[:120]}") from None
    if _SURROGATE_ESCAPE.search(body):  # "\ud800" parses but is no Unicode: refuse it before it is used
        try:
            json.dumps(document, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            raise SerializationError(
                "body is not valid JSON text: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
            ) from None
    return document
