"""The event-loop thread: results, exceptions and timeouts cross back to the caller."""

import asyncio
import threading

import pytest

from harness.aio import EventLoopThread


def test_run_call_and_timeout() -> None:
    loop = EventLoopThread("test-loop")
    try:

        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        assert loop.run(double(21)) == 42
        assert loop.call(threading.current_thread).name == "test-loop"
        with pytest.raises(TimeoutError):
            loop.run(asyncio.sleep(5), timeout=0.05)
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: 1 / 0)
    finally:
        loop.close()
    assert loop.loop.is_closed()
