"""Who gets a connection to the KMS: a cap on open connections in two pools, a deadline for each request to
arrive whole, the oldest connection evicted where a pool is full, and a 503 when none may be.

A new connection is *fresh* until its first request head is whole; half of the cap is for fresh connections,
and a newcomer to a full fresh pool takes the place of the oldest fresh one. A half-open flood therefore only
churns the fresh pool: an honest client, whose head follows its connect within a millisecond, gets through.
A connection whose head is whole moves to the other half, the *delivered* pool; if that is full it takes the
place of the oldest idle one there that has waited ``eviction_grace`` seconds (a connection being served is
never evicted), else it is answered 503 ServiceUnavailableException and closed.

Every connection waiting for a request (fresh, idle keep-alive, or with a declared body still arriving) is
closed at its deadline: ``request_timeout`` from its opening or its last answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import resource
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from harness.errors import UsageError
from harness.kms.audit_log import REQUEST_PEER

log = logging.getLogger("teelab.kms")
MAX_HEAD = 16384  # bytes of request line and headers; aiohttp allows 8190 per line and per header
FD_RESERVE = 256  # descriptors kept for the store, the thread pool, TLS files and logs
BUSY_BODY = json.dumps(
    {"__type": "ServiceUnavailableException", "message": "the KMS is at its connection cap; retry"}
).encode()
BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/x-amz-json-1.1\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(BUSY_BODY)
) + BUSY_BODY


@dataclass(frozen=True)
class Limits:
    """``max_connections`` open at once (lowered to fit the descriptor limit), half of them fresh;
    ``request_timeout`` seconds at most (at least half of it, drawn per wait) for a request's head and
    declared body to arrive, counted from the connection's opening or its last answer; ``eviction_grace``
    seconds an idle delivered connection is kept before a newcomer may take its place."""

    max_connections: int = 4096
    request_timeout: float = 10.0
    eviction_grace: float = 1.0

    def __post_init__(self) -> None:
        within("max connections", self.max_connections, 2, 1 << 20)
        within("request timeout", self.request_timeout, 0.01, 3600)
        within("eviction grace", self.eviction_grace, 0, 3600)


def within(name: str, value: float, low: float, high: float) -> None:
    """UsageError unless ``low <= value <= high`` (NaN is outside every range)."""
    if not low <= value <= high:
        raise UsageError(f"{name} {value} is outside {low:g}..{high:g}", hint=f"give a {name} in that range")


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("cannot raise the descriptor limit from %d to %d", soft, target)
    return soft


def connection_cap(limits: Limits) -> int:
    """``limits.max_connections``, lowered so that the open connections leave ``FD_RESERVE`` descriptors."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = limits.max_connections if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
    return max(2, min(limits.max_connections, room))


class Admission:
    """The protocol factory to hand ``loop.create_server`` and the aiohttp middleware that tells it when a
    connection's request is in hand. ``counts`` says how many connections were evicted from either pool,
    timed out, refused with 503 or closed for an endless head."""

    def __init__(self, limits: Limits, max_body: int) -> None:
        self.factory: Callable[[], asyncio.Protocol] | None = None  # aiohttp's web.Server, once set up
        self.limits = limits
        self.cap = connection_cap(limits)
        self.max_fresh = self.cap // 2
        self.max_delivered = self.cap - self.max_fresh
        self.max_body = max_body
        self.fresh: OrderedDict[Guard, float] = OrderedDict()  # no whole head yet, oldest first
        self.delivered: set[Guard] = set()  # sent a whole head
        self.idle: OrderedDict[Guard, float] = OrderedDict()  # delivered, waiting for a request; oldest first
        self.by_handler: dict[asyncio.Protocol, Guard] = {}
        self.counts: Counter[str] = Counter()
        self.peak = 0

    @property
    def backlog(self) -> int:
        """The listen queue: small enough that the connections accepted in the few loop turns between a
        connection's accept and its first read cannot push it out of the fresh pool."""
        return max(8, min(1024, self.max_fresh // 4))

    def protocol(self) -> Guard:
        return Guard(self)

    def admit(self, guard: Guard) -> None:
        """Take ``guard`` into the fresh pool, in the place of the oldest fresh connection if it is full."""
        if len(self.fresh) >= self.max_fresh:
            oldest = next(iter(self.fresh))
            self.counts["evicted_fresh"] += 1
            oldest.close()
        self.fresh[guard] = asyncio.get_running_loop().time()
        self._count()

    def promote(self, guard: Guard) -> bool:
        """Move ``guard``, whose head is whole, to the delivered pool: in the place of the oldest idle one
        there past the grace if it is full; False if none may go."""
        if len(self.delivered) >= self.max_delivered:
            settled = asyncio.get_running_loop().time() - self.limits.eviction_grace
            oldest = next(iter(self.idle.items()), None)
            if oldest is None or oldest[1] > settled:
                self.counts["refused"] += 1
                return False
            self.counts["evicted_idle"] += 1
            oldest[0].close()
        del self.fresh[guard]
        self.idle[guard] = asyncio.get_running_loop().time()  # until its body is in; the deadline runs on
        self.delivered.add(guard)
        self._count()
        return True

    def forget(self, guard: Guard) -> None:
        self.fresh.pop(guard, None)
        self.idle.pop(guard, None)
        self.delivered.discard(guard)

    def _count(self) -> None:
        self.peak = max(self.peak, len(self.fresh) + len(self.delivered))

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Read a declared body under the connection's deadline, then mark the connection as served (a body
        without a declared length is read by the handler while the deadline runs and eviction may strike)."""
        REQUEST_PEER.set(request.remote or "-")
        guard = self.by_handler.get(request.protocol)
        if guard is None:
            return await handler(request)
        if request.content_length is not None and request.content_length <= self.max_body:
            await request.read()  # the guard closes the connection if its deadline passes meanwhile
            guard.serving()
        # else a chunked body (or one over the cap): the handler reads it, the connection still waiting
        try:
            return await handler(request)
        finally:
            guard.wait_next()

    def stats(self) -> dict[str, Any]:
        open_now = {"fresh": len(self.fresh), "delivered": len(self.delivered)}
        return {**open_now, "peak": self.peak, "cap": self.cap, **self.counts}


class Guard(asyncio.Protocol):
    """One connection: the deadline of the request it waits for, and aiohttp's protocol behind it, made only
    once a whole request head has come (a connection that never sends one costs no aiohttp handler)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.inner: asyncio.Protocol | None = None
        self.head = bytearray()  # the first request's head until it is whole
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.admission.admit(self)
        self._arm()

    def _arm(self) -> None:
        self._cancel_timer()
        # between half and all of the timeout: connections opened together do not all close together
        timeout = self.admission.limits.request_timeout * (0.5 + random.random() / 2)
        self.timer = asyncio.get_running_loop().call_later(timeout, self._expire)

    def wait_next(self) -> None:
        """Its answer is handed over: wait for the next request, idle (evictable past the grace)."""
        if self in self.admission.delivered:
            self.admission.idle[self] = asyncio.get_running_loop().time()
            self._arm()

    def serving(self) -> None:
        """Its request is in hand: no deadline, and never evicted while it is served."""
        self._cancel_timer()
        self.admission.idle.pop(self, None)

    def _expire(self) -> None:
        self.timer = None
        self.admission.counts["timed_out"] += 1
        self.close()

    def close(self) -> None:
        self._cancel_timer()
        self.admission.forget(self)  # it no longer counts, though its socket closes on the next turn
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        seen = len(self.head)
        self.head += data
        if self.head.find(b"\r\n\r\n", max(0, seen - 3)) < 0:
            if len(self.head) > MAX_HEAD:  # aiohttp would refuse it too; no need to hand it over
                self.admission.counts["head_too_large"] += 1
                self.close()
            return
        if self not in self.admission.fresh:
            return  # evicted or timed out on this turn
        if not self.admission.promote(self):
            assert self.transport is not None
            self.transport.write(BUSY_ANSWER)
            self.close()
            return
        assert self.admission.factory is not None, "admission before the aiohttp server is set up"
        self.inner = self.admission.factory()
        self.admission.by_handler[self.inner] = self
        self.inner.connection_made(self.transport)  # type: ignore[arg-type]
        head, self.head = bytes(self.head), bytearray()
        self.inner.data_received(head)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else False

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.admission.forget(self)
        if self.inner is not None:
            self.admission.by_handler.pop(self.inner, None)
            self.inner.connection_lost(exc)
