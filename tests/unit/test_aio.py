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


def test_a_child_started_with_die_with_parent_dies_with_its_parent(tmp_path) -> None:
    import subprocess
    import sys
    import textwrap
    import time

    parent_code = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        from harness.aio import die_with_parent
        child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent(signal.SIGTERM))
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child_pid}/stat") as stat:
                if stat.read().split(") ")[1][0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the child outlived its parent")
