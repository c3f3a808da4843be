"""The emulated security processor: answers one VM's ``org.teelab.tee.0`` port (``teelab_guest.tee_wire``)
from an asyncio task on the harness's loop thread, over the port's socketpair channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from teelab_guest import tee_wire
from teelab_guest.tee_wire import MAGIC, WireError

from harness.aio import EventLoopThread, shared_loop
from harness.tee.errors import DeviceConfigError, DeviceServiceError

log = logging.getLogger(__name__)

FRAME_TIMEOUT = 10.0  # seconds a started frame may take to arrive in full
WRITE_TIMEOUT = 10.0  # seconds a response may wait for the guest to read
READ_CHUNK = 64 * 1024
# The loop holds tasks weakly: a port being served is held here until its task ends (the guest's end closes,
# or close()), whoever holds the DeviceService.
_SERVING: set[asyncio.Task[None]] = set()


class SnpIssuer(Protocol):
    """Makes a signed 1184-byte SNP report (and the certificate table) for this VM and report_data."""

    def __call__(self, *, report_data: bytes, vmpl: int) -> tuple[bytes, bytes]: ...


class TdxIssuer(Protocol):
    """Makes a signed TDX quote for this VM and report_data."""

    def __call__(self, *, report_data: bytes) -> bytes: ...


class SgxIssuer(Protocol):
    """Makes a signed SGX quote of this VM's enclave for report_data (what a quoting library returns)."""

    def __call__(self, *, report_data: bytes) -> bytes: ...


class NsmHandler(Protocol):
    """An enclave security module: ``handle(cbor_request) -> cbor_response``, never raising."""

    def handle(self, request: bytes) -> bytes: ...


class SecurityProcessor:
    """One VM's emulated security processor of one ``kind``: a decoded request in, a response map out.

    Thread-safe as its issuers are; ``answer`` never raises (a failure becomes an ``internal`` error frame).
    """

    def __init__(
        self,
        kind: str,
        *,
        snp: SnpIssuer | None = None,
        tdx: TdxIssuer | None = None,
        nsm: NsmHandler | None = None,
        sgx: SgxIssuer | None = None,
    ) -> None:
        needed = {"snp": snp, "tdx": tdx, "sgx": sgx, "nsm": nsm}
        if kind not in needed:
            raise DeviceConfigError(
                f"unknown security processor kind {kind!r}", hint=f"use one of {', '.join(tee_wire.KINDS)}"
            )
        if needed[kind] is None:
            raise DeviceConfigError(
                f"a {kind} security processor needs its {kind} issuer",
                hint=f"pass {kind}= (the lab authority's issuer, or a SecurityModule for nsm)",
            )
        self.kind = kind
        self._snp, self._tdx, self._sgx, self._nsm = snp, tdx, sgx, nsm

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        ident = tee_wire.request_id(message)
        try:
            request = tee_wire.parse_request(message)
            return self._dispatch(request)
        except WireError as exc:
            return tee_wire.error_response(ident, exc.code, exc.message)
        except Exception as exc:
            log.exception("security processor (%s) failed on a request", self.kind)
            return tee_wire.error_response(ident, "internal", f"{type(exc).__name__}: {exc}")

    def _dispatch(self, request: tee_wire.Request) -> dict[str, Any]:
        if request.op == "describe":
            return tee_wire.ok_response(request.id, kind=self.kind)
        if request.op == "snp-report" and self._snp is not None:
            report, certs = self._snp(report_data=request.report_data, vmpl=request.vmpl)
            return tee_wire.ok_response(request.id, report=report, certs=certs)
        if request.op == "tdx-quote" and self._tdx is not None:
            return tee_wire.ok_response(request.id, quote=self._tdx(report_data=request.report_data))
        if request.op == "sgx-quote" and self._sgx is not None:
            return tee_wire.ok_response(request.id, quote=self._sgx(report_data=request.report_data))
        if request.op == "nsm" and self._nsm is not None:
            return tee_wire.ok_response(request.id, response=self._nsm.handle(request.nsm_request))
        raise WireError(
            "unsupported", f"this security processor is {self.kind}; it does not serve {request.op}"
        )


@dataclass
class RateLimit:
    """A token bucket: ``burst`` requests at once, then ``per_second``. A guest over the limit is slowed
    down (its next request is read later), not refused."""

    per_second: float = 200.0
    burst: int = 50

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def delay(self) -> float:
        """Take a token; the seconds to wait before serving (0 when a token was there)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.per_second)
        self._stamp = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.per_second


@dataclass
class ServiceStats:
    connections: int = 0
    answered: int = 0
    refused: int = 0
    bytes_in: int = 0


class DeviceService:
    """Serves one VM's security-processor port over a connected stream socket: in a lab, the harness's end
    of the port's ``ChardevChannel`` socketpair (no path, nothing left behind).

    One hostile guest can only slow its own port: frames are bounded, garbage is answered with one error
    frame and skipped, requests are rate-limited, and signing runs off the loop thread.
    """

    def __init__(
        self, processor: SecurityProcessor, *, name: str = "tee", rate: Callable[[], RateLimit] = RateLimit
    ) -> None:
        self.processor = processor
        self.name = name
        self.stats = ServiceStats()
        self._rate = rate
        self._loop: EventLoopThread | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self._task is not None and not self._task.done()

    def serve_socket(self, sock: socket.socket, loop: EventLoopThread | None = None) -> None:
        """Start answering frames on ``sock`` (a connected stream socket) from ``loop``'s thread."""
        if self._task is not None:
            raise DeviceServiceError(f"{self.name}: already serving", hint="make a new DeviceService per VM")
        self._loop = loop or shared_loop()
        try:
            self._task = self._loop.run(self._start(sock), timeout=10)
        except (OSError, TimeoutError) as exc:
            raise DeviceServiceError(
                f"{self.name}: cannot serve the port's socket: {exc}", hint="is the VM still running?"
            ) from exc

    async def _start(self, sock: socket.socket) -> asyncio.Task[None]:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_CHUNK)
        task = asyncio.get_running_loop().create_task(self.serve(reader, writer))
        _SERVING.add(task)
        task.add_done_callback(_SERVING.discard)
        return task

    def close(self) -> None:
        """Stop serving and close the socket."""
        task, self._task = self._task, None
        if task is None or self._loop is None or self._loop.loop.is_closed():
            return

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

        with contextlib.suppress(Exception):
            self._loop.run(stop(), timeout=5)

    def __enter__(self) -> DeviceService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one connection ---------------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer frames from ``reader`` on ``writer`` until the peer closes (usable on any stream pair)."""
        self.stats.connections += 1
        limiter = self._rate()
        frames = FrameAssembler(tee_wire.MAX_REQUEST_BODY)
        chunk = b""
        try:
            while True:
                for item in frames.feed(chunk):
                    if isinstance(item, WireError):
                        await self._send(writer, tee_wire.error_response(None, item.code, item.message))
                        continue
                    delay = limiter.delay()
                    if delay:
                        await asyncio.sleep(delay)
                    await self._send(writer, await self._answer(item))
                try:  # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow close()'s cancel
                    async with asyncio.timeout(frames.seconds_left(FRAME_TIMEOUT)):
                        chunk = await reader.read(READ_CHUNK)
                except TimeoutError:
                    frames.drop()
                    chunk = b""
                    await self._send(writer, tee_wire.error_response(None, "bad-frame", "frame incomplete"))
                    continue
                if not chunk:
                    return
                self.stats.bytes_in += len(chunk)
        except (ConnectionError, TimeoutError) as exc:
            log.info("%s: connection ended: %s", self.name, exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            message = tee_wire.decode_body(body)
        except WireError as exc:
            return tee_wire.error_response(None, exc.code, exc.message)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.processor.answer, message)

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if message.get("ok"):
            self.stats.answered += 1
        else:
            self.stats.refused += 1
        try:
            frame = tee_wire.encode_frame(message, tee_wire.MAX_RESPONSE_BODY)
        except ValueError as exc:
            log.error("%s: response too large: %s", self.name, exc)
            frame = tee_wire.encode_frame(
                tee_wire.error_response(message.get("id"), "internal", "response too large"),
                tee_wire.MAX_RESPONSE_BODY,
            )
        writer.write(frame)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()


class FrameAssembler:
    """Cuts a byte stream into request bodies. Bytes without the frame magic, and frames over the limit,
    are reported once (a ``WireError``) and skipped up to the next magic; a bad write cannot wedge a port."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False
        self._started: float | None = None

    def feed(self, data: bytes) -> list[bytes | WireError]:
        """Take ``data``; return the complete bodies and the errors, in stream order."""
        self._buffer += data
        out: list[bytes | WireError] = []
        header_size = tee_wire.HEADER.size
        while len(self._buffer) >= header_size:
            if not self._buffer.startswith(MAGIC):
                if not self._skipping:
                    out.append(WireError("bad-frame", "bytes without the frame magic were skipped"))
                    self._skipping = True
                found = self._buffer.find(MAGIC, 1)
                del self._buffer[: found if found > 0 else len(self._buffer) - len(MAGIC) + 1]
                continue
            try:
                length = tee_wire.parse_header(bytes(self._buffer[:header_size]), self.limit)
            except WireError as exc:
                out.append(exc)
                del self._buffer[: len(MAGIC)]  # the body that follows is skipped like any garbage
                self._skipping = True
                continue
            if len(self._buffer) < header_size + length:
                break
            out.append(bytes(self._buffer[header_size : header_size + length]))
            del self._buffer[: header_size + length]
            self._skipping = False
            self._started = None
        if not self._buffer:
            self._started = None
        elif self._started is None:
            self._started = time.monotonic()
        return out

    def seconds_left(self, frame_timeout: float) -> float | None:
        """How long the partial frame in the buffer may still take (None: no partial frame)."""
        if self._started is None:
            return None
        return max(0.0, self._started + frame_timeout - time.monotonic())

    def drop(self) -> None:
        self._buffer.clear()
        self._started = None
