"""The event-loop thread behind the synchronous API: one asyncio loop serves QMP, consoles and devices."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when the thread that forked it ends. Fork from the
    long-lived loop thread (``EventLoopThread.call``), not a short-lived caller's thread."""
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EventLoopThread:
    """An asyncio loop running in a daemon thread; ``run`` and ``call`` block the caller until done."""

    def __init__(self, name: str = "teelab-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result; TimeoutError after ``timeout`` seconds."""

        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        future = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        return future.result()

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a plain function on the loop thread (for work that must happen there, like forking QEMU)."""
        future: Future[T] = Future()

        def invoke() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return future.result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


_shared: EventLoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> EventLoopThread:
    """The process-wide loop thread, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.loop.is_closed():
            _shared = EventLoopThread()
            atexit.register(_shared.close)
        return _shared
