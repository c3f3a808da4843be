"""The host side of the guest agent: run commands inside a booted guest over its ``org.teelab.agent.0`` port.

The port is a ``ChardevChannel`` (a socketpair), so there is no socket file. Requests are JSON lines with ids
(``teelab_guest.protocol``); many may be in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from teelab_guest import protocol

from harness.errors import LabError
from harness.qemu.chardevs import ChardevChannel
from harness.qemu.devices import VirtioSerialPort
from harness.qemu.machine import Machine

AGENT_CHANNEL = "agent"


def agent_port() -> VirtioSerialPort:
    """The device every lab guest carries for its agent."""
    return VirtioSerialPort("agent0", name=protocol.AGENT_PORT, chardev=ChardevChannel(AGENT_CHANNEL))


class AgentError(LabError):
    code = "E600"
    title = "guest agent failed"
    explanation = "The guest agent refused a request, or its channel closed (the guest stopped or crashed)."


class AgentTimeout(AgentError):
    code = "E601"
    title = "guest agent did not answer in time"
    explanation = "A command inside the guest ran past its timeout, or the agent did not answer at all."


class GuestCommandFailed(AgentError):
    code = "E602"
    title = "command in the guest failed"
    explanation = "A command run with check=True exited with a non-zero status; its output is in the error."


@dataclass(frozen=True)
class ExecResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass(frozen=True)
class GuestJob:
    """A command started with ``GuestAgent.start``."""

    argv: tuple[str, ...]
    future: Future[ExecResult]

    def result(self, timeout: float | None = None) -> ExecResult:
        """The finished command (its error, if it failed); TimeoutError if still running after ``timeout``."""
        return self.future.result(timeout)

    def json(self, timeout: float | None = None) -> Any:
        """The command's stdout, read as JSON."""
        return json.loads(self.result(timeout).stdout)


class GuestAgent:
    """Talks to the agent of one machine; thread-safe, synchronous API over the machine's event loop."""

    def __init__(self, machine: Machine, channel: str = AGENT_CHANNEL) -> None:
        self.machine = machine
        self._loop = machine.loop
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = False
        self._loop.run(self._open(machine.channel(channel)), 10)

    async def _open(self, sock: Any) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=protocol.MAX_AGENT_LINE)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                with contextlib.suppress(ValueError):
                    reply = protocol.decode_frame(line)
                    future = self._pending.pop(reply.get("id"), None)  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result(reply)
        finally:
            self._closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(AgentError(f"{self.machine.spec.name}: the agent channel closed"))
            self._pending.clear()

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._closed or self._writer is None:
            raise AgentError(
                f"{self.machine.spec.name}: the agent channel is closed", hint="is the guest up?"
            )
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._writer.write(protocol.encode_frame({**message, "id": request_id}))
        try:
            await self._writer.drain()
            return await future
        finally:
            self._pending.pop(request_id, None)

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            reply = self._loop.run(self._request(message), timeout)
        except TimeoutError:
            raise AgentTimeout(
                f"{self.machine.spec.name}: no answer to {message.get('op')} in {timeout:g} s",
                hint=f"read {self.machine.console_log}",
                request={k: v for k, v in message.items() if k != "stdin"},
            ) from None
        if not reply.get("ok"):
            error = AgentTimeout if reply.get("timeout") else AgentError
            raise error(
                f"{self.machine.spec.name}: agent refused {message.get('op')}: {reply.get('error')}",
                hint="check the argv and the guest's console",
                reply=reply,
            )
        return reply

    def ping(self, timeout: float = 10.0) -> float:
        """The guest-init uptime the agent reports; proves the agent answers."""
        return float(self.request({"op": "ping"}, timeout)["uptime"])

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run ``argv`` in the guest and wait for it; ``check`` raises ``GuestCommandFailed`` on non-zero."""
        message = {"op": "exec", "argv": list(argv), "stdin": protocol.b64(stdin), "timeout": timeout,
                   "env": dict(env or {})}  # fmt: skip
        reply = self.request(message, timeout + 10)
        result = ExecResult(tuple(argv), int(reply["rc"]), protocol.unb64(reply["stdout"]),
                            protocol.unb64(reply["stderr"]))  # fmt: skip
        if check and result.returncode != 0:
            raise GuestCommandFailed(
                f"{' '.join(argv)} exited {result.returncode} in {self.machine.spec.name}: "
                f"{result.stderr.decode(errors='replace')[-500:]}",
                hint="run it by hand through the agent, or read the guest console",
                returncode=result.returncode,
                stdout=result.text[-2000:],
            )
        return result

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> GuestJob:
        """Run ``argv`` in the guest in the background, while the host does its side (a server the host
        connects to, a sender it drains); the job's ``result()`` waits for it."""
        future: Future[ExecResult] = Future()

        def run() -> None:
            try:
                future.set_result(self.exec(argv, stdin=stdin, timeout=timeout, env=env, check=check))
            except BaseException as exc:  # handed to whoever waits for the job
                future.set_exception(exc)

        threading.Thread(target=run, name=f"guest-job-{argv[0]}", daemon=True).start()
        return GuestJob(tuple(argv), future)

    def python(self, code: str, *, timeout: float = 60.0, check: bool = True) -> ExecResult:
        """Run Python ``code`` with the guest's interpreter (teelab_guest importable)."""
        return self.exec(["python3", "-c", code], timeout=timeout, check=check)

    def poweroff(self, timeout: float = 10.0) -> None:
        """Ask guest-init to power the guest off (answered before it does)."""
        self.request({"op": "poweroff"}, timeout)

    def close(self) -> None:
        if self._writer is not None and not self._loop.loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.run(self._close(), 5)

    async def _close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
