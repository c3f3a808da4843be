"""One QEMU process: launch with socketpair QMP and console, watch the console, pin vCPUs, shut down.

Phases, as in QEMU's own ``QEMUMachine``: assemble (argv, artifacts), launch (fork with PDEATHSIG, QMP
handshake), run (console, QMP), shutdown (powerdown -> quit -> SIGKILL, each bounded) and cleanup, which
always runs. Every run keeps an artifact folder: ``argv.json``, ``run.sh``, ``console.log``, ``qemu.stderr``,
``qmp.log`` and ``exit.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from harness import paths
from harness.aio import EventLoopThread, die_with_parent, shared_loop
from harness.errors import LabError
from harness.host.model import HostInfo
from harness.qemu.argv import build_argv
from harness.qemu.chardevs import ChardevChannel, ChardevSocket, ChardevStdio
from harness.qemu.errors import (
    ConsoleTimeout,
    LaunchError,
    MachineError,
    MachineStateError,
    QMPCommandError,
    UnexpectedExit,
)
from harness.qemu.spec import VMSpec, refuse_duplicate_ids

log = logging.getLogger(__name__)

QMP_ID, CONSOLE_ID = "qmp", "console"  # the chardevs every machine adds; a spec's own must not reuse them


@dataclass(frozen=True)
class ExitInfo:
    """How a machine ended: the stage that stopped it and QEMU's exit status."""

    stage: str  # "powerdown" | "quit" | "kill" | "exited"
    returncode: int | None
    seconds: float


class Machine:
    """A QEMU guest built from a ``VMSpec``; use as a context manager so cleanup always runs."""

    def __init__(
        self,
        spec: VMSpec,
        host: HostInfo,
        *,
        artifacts: Path | None = None,
        qemu_binary: str | None = None,
        loop: EventLoopThread | None = None,
        serial: bool = True,
    ) -> None:
        spec.validate(host)  # a bad spec raises its SpecError (E3xx) before anything exists, folder included
        refuse_duplicate_ids("chardev", [QMP_ID, CONSOLE_ID, *(c.id for c in spec.chardevs())])
        self.spec = spec
        self.host = host
        self.serial = serial  # False: no serial port, so no console (a production enclave)
        self.qemu_binary = qemu_binary
        self.artifacts = artifacts or _new_artifact_dir(spec.name)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.console_log = self.artifacts / "console.log"
        self._loop = loop or shared_loop()
        self._process: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None
        self._console_sock: socket.socket | None = None
        self._console_task: asyncio.Task[None] | None = None
        self._console_writer: asyncio.StreamWriter | None = None
        self._console = bytearray()
        self._console_cursor = 0
        self._console_changed: asyncio.Condition | None = None
        self._console_closed = False
        self._launched_at = 0.0
        self.argv: list[str] = []
        self.exit_info: ExitInfo | None = None
        self.channels: dict[str, socket.socket] = {}  # ChardevChannel id -> the harness's end

    # -- assemble -------------------------------------------------------------------------------
    def _write_artifacts(self, qmp_fd: int, console_fd: int, channel_fds: dict[str, int]) -> list[str]:
        argv = build_argv(
            self.spec,
            self.host,
            qmp=ChardevSocket(QMP_ID, fd=qmp_fd),
            console=ChardevSocket(CONSOLE_ID, fd=console_fd),
            qemu_binary=self.qemu_binary,
            channels=channel_fds,
            serial=self.serial,
        )
        by_hand = build_argv(
            self.spec,
            self.host,
            qmp=ChardevSocket(QMP_ID, path=Path("qmp.sock"), server=True, wait=False),
            console=ChardevStdio(CONSOLE_ID),
            qemu_binary=self.qemu_binary,
            serial=self.serial,
        )
        (self.artifacts / "argv.json").write_text(json.dumps(argv, indent=1) + "\n")
        run_sh = self.artifacts / "run.sh"
        run_sh.write_text(
            "#!/bin/sh\n# Reproduces this VM by hand: console on stdio, QMP on ./qmp.sock.\n"
            'cd "$(dirname "$0")" || exit 1\nexec ' + " \\\n  ".join(shlex.quote(a) for a in by_hand) + "\n"
        )
        run_sh.chmod(0o755)
        return argv

    # -- launch ---------------------------------------------------------------------------------
    def launch(self, timeout: float = 30.0) -> None:
        """Start QEMU and complete the QMP handshake; raises ``LaunchError`` with argv and stderr."""
        if self._process is not None:
            raise MachineStateError(f"{self.spec.name} is already launched", hint="launch a new Machine")
        qmp_parent, qmp_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        con_parent, con_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel_ids = [c.id for c in self.spec.chardevs() if isinstance(c, ChardevChannel)]
        pairs = {cid: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for cid in channel_ids}
        children = [qmp_child, con_child, *(child for _, child in pairs.values())]
        try:
            channel_fds = {cid: child.fileno() for cid, (_, child) in pairs.items()}
            self.argv = self._write_artifacts(qmp_child.fileno(), con_child.fileno(), channel_fds)
            self._launched_at = time.monotonic()
            with open(self.artifacts / "qemu.stderr", "wb") as stderr:
                fds = tuple(child.fileno() for child in children)
                self._process = self._loop.call(self._spawn, stderr, fds)
            for child in children:
                child.close()
            self.channels = {cid: parent for cid, (parent, _) in pairs.items()}
            self._console_sock = con_parent
            self._loop.run(self._start_console(con_parent), timeout)
            self._loop.run(self._connect_qmp(qmp_parent), timeout)
        except BaseException as exc:
            for child in children:
                child.close()
            for parent, _ in pairs.values():
                parent.close()
            self.channels = {}
            stderr_text = self._stderr_text()
            self._cleanup(stage="launch-failed")
            qmp_parent.close()
            con_parent.close()  # not yet the console's when the failure came before QEMU started
            if isinstance(exc, LabError):
                raise
            raise LaunchError(
                f"QEMU for {self.spec.name} did not start: {_last_line(stderr_text) or exc!r}",
                hint=f"see {self.artifacts}/qemu.stderr; run.sh there reproduces the launch",
                argv=self.argv,
                stderr=stderr_text,
                artifacts=str(self.artifacts),
            ) from exc
        log.info("launched %s pid %d", self.spec.name, self._process.pid)

    def _spawn(self, stderr: Any, pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        # Forked from the loop thread, which lives as long as the harness: PDEATHSIG fires when the
        # forking thread ends, so forking from a short-lived caller thread would kill QEMU early.
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            pass_fds=pass_fds,
            preexec_fn=die_with_parent(signal.SIGKILL),
            cwd=self.artifacts,
        )

    async def _start_console(self, sock: socket.socket) -> None:
        self._console_changed = asyncio.Condition()
        reader, self._console_writer = await asyncio.open_unix_connection(sock=sock)
        self._console_task = asyncio.get_running_loop().create_task(self._pump_console(reader))

    async def _pump_console(self, reader: asyncio.StreamReader) -> None:
        assert self._console_changed is not None
        with open(self.console_log, "ab") as logfile:
            while True:
                chunk = await reader.read(65536)
                async with self._console_changed:
                    if not chunk:
                        self._console_closed = True
                        self._console_changed.notify_all()
                        return
                    self._console += chunk
                    logfile.write(chunk)
                    logfile.flush()
                    self._console_changed.notify_all()

    async def _connect_qmp(self, sock: socket.socket) -> None:
        client = QMPClient(self.spec.name)
        client.logger = log.getChild(f"qmp.{self.spec.name}")
        await client.connect(sock)
        self._qmp = client

    # -- run ------------------------------------------------------------------------------------
    @property
    def loop(self) -> EventLoopThread:
        """The event-loop thread that serves this machine's QMP, console and channels."""
        return self._loop

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def seconds_since_launch(self) -> float:
        return time.monotonic() - self._launched_at

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Run one QMP command and return its result; ``QMPCommandError`` keeps what was sent."""
        if self._qmp is None or not self.running:
            raise MachineStateError(f"{self.spec.name} is not running", hint="launch() it first")
        try:
            result = self._loop.run(self._qmp.execute(command, arguments or None), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise QMPCommandError(
                f"QMP {command} failed on {self.spec.name}: {exc}",
                hint="see qmp.log and qemu.stderr in the artifact folder",
                sent={"execute": command, "arguments": arguments},
                received=str(exc),
            ) from exc
        with open(self.artifacts / "qmp.log", "a") as qmp_log:
            qmp_log.write(json.dumps({"execute": command, "arguments": arguments, "return": result}) + "\n")
        return result

    def wait_for_console(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait for ``pattern`` in console output after the previous match; return the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        try:
            return self._loop.run(self._wait_console(regex), timeout)
        except TimeoutError:
            raise ConsoleTimeout(
                f"{self.spec.name}: {regex.pattern!r} not on the console after {timeout:g} s",
                hint=f"read {self.console_log}",
                console_tail=self.console_text()[-2000:],
            ) from None

    async def _wait_console(self, regex: re.Pattern[str]) -> re.Match[str]:
        assert self._console_changed is not None
        async with self._console_changed:
            while True:
                text = self._console[self._console_cursor :].decode("utf-8", "replace")
                match = regex.search(text)
                if match:
                    self._console_cursor += len(text[: match.end()].encode("utf-8", "replace"))
                    return match
                if self._console_closed:
                    raise UnexpectedExit(
                        f"{self.spec.name} exited before {regex.pattern!r} appeared on the console",
                        hint=f"read {self.console_log} and {self.artifacts}/qemu.stderr",
                        returncode=self._process.poll() if self._process else None,
                        console_tail=self.console_text()[-2000:],
                    )
                await self._console_changed.wait()

    def channel(self, chardev_id: str) -> socket.socket:
        """A duplicate of the harness's end of the ``ChardevChannel`` named ``chardev_id``; the caller owns
        and closes it. Each user holding its own descriptor means the machine's cleanup never closes a socket
        that an event loop is still watching (and never hands its number to something else meanwhile); each
        user sees EOF when QEMU exits."""
        if chardev_id not in self.channels:
            raise MachineStateError(
                f"{self.spec.name} has no open channel {chardev_id!r} (open: {sorted(self.channels)})",
                hint="add a device with ChardevChannel(id) to the spec and launch() the machine",
            )
        return self.channels[chardev_id].dup()

    def console_text(self) -> str:
        return self._console.decode("utf-8", "replace")

    def write_console(self, text: str) -> None:
        """Type ``text`` on the guest's serial console."""
        if self._console_writer is None or not self.running:
            raise MachineStateError(f"{self.spec.name} is not running", hint="launch() it first")
        self._loop.call(self._console_writer.write, text.encode())

    def vcpu_threads(self) -> dict[int, int]:
        """vCPU index -> host thread id, from ``query-cpus-fast``."""
        return {cpu["cpu-index"]: cpu["thread-id"] for cpu in self.qmp("query-cpus-fast")}

    def pin_vcpus(self, host_cpus: Sequence[int]) -> dict[int, int]:
        """Pin vCPU i to ``host_cpus[i]``; returns vCPU index -> host CPU."""
        threads = self.vcpu_threads()
        if len(host_cpus) < len(threads):
            raise MachineStateError(
                f"{self.spec.name} has {len(threads)} vCPUs but {len(host_cpus)} host CPUs were given",
                hint="give one host CPU per vCPU",
            )
        pinned = {}
        for index, tid in sorted(threads.items()):
            os.sched_setaffinity(tid, {host_cpus[index]})
            pinned[index] = host_cpus[index]
        return pinned

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(
        self, powerdown_timeout: float = 10.0, quit_timeout: float = 5.0, kill_timeout: float = 5.0
    ) -> ExitInfo:
        """Stop the guest: ACPI powerdown, then QMP quit, then SIGKILL; cleanup always runs."""
        if self._process is None:
            raise MachineStateError(f"{self.spec.name} was never launched", hint="launch() it first")
        start = time.monotonic()
        stage = "exited"
        try:
            if self.running and powerdown_timeout > 0:
                stage = "powerdown"
                self._request("system_powerdown")
                if self._wait_exit(powerdown_timeout):
                    return self._finish(stage, start)
            if self.running:
                stage = "quit"
                self._request("quit")
                if self._wait_exit(quit_timeout):
                    return self._finish(stage, start)
            if self.running:
                stage = "kill"
                self._process.kill()
                self._wait_exit(kill_timeout)
            return self._finish(stage, start)
        finally:
            self._cleanup(stage)

    def kill(self) -> ExitInfo:
        """SIGKILL QEMU at once and clean up."""
        return self.shutdown(powerdown_timeout=0, quit_timeout=0)

    def _request(self, command: str) -> None:
        with contextlib.suppress(MachineError):
            self.qmp(command, timeout=2.0)

    def _wait_exit(self, timeout: float) -> bool:
        assert self._process is not None
        try:
            self._process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _finish(self, stage: str, start: float) -> ExitInfo:
        assert self._process is not None
        self.exit_info = ExitInfo(stage, self._process.poll(), round(time.monotonic() - start, 3))
        return self.exit_info

    def _close_host_ends(self) -> None:
        """Close the harness's ends of the VM's console and channels (their tasks on the loop first)."""
        if not self._loop.loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.run(self._close_channels(), 5)
        if self._console_sock is not None:
            self._console_sock.close()
            self._console_sock = None
        for channel in self.channels.values():
            channel.close()
        self.channels = {}

    def _cleanup(self, stage: str) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self._close_host_ends()
        returncode = process.poll() if process else None
        (self.artifacts / "exit.json").write_text(
            json.dumps({"stage": stage, "returncode": returncode}) + "\n"
        )

    async def _close_channels(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        if self._console_task is not None:
            self._console_task.cancel()
            with contextlib.suppress(BaseException):
                await self._console_task
            self._console_task = None
        if self._console_writer is not None:
            self._console_writer.close()
            self._console_writer = None

    def _stderr_text(self) -> str:
        path = self.artifacts / "qemu.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self.exit_info is None:
            self.shutdown(powerdown_timeout=5.0)


def _last_line(text: str) -> str:
    """The last non-blank line: where QEMU says why it stopped."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


KEEP_RUNS = 100


def _new_artifact_dir(name: str) -> Path:
    """A fresh folder under the runs dir; only the newest ``KEEP_RUNS`` folders are kept."""
    runs = paths.runs_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    # mkdtemp's random suffix makes the name unique: launches from several threads in one second and one
    # process collided on a clock-derived suffix
    path = Path(tempfile.mkdtemp(prefix=f"{stamp}-{safe}-{os.getpid()}-", dir=runs))
    path.chmod(0o755)
    with paths.exclusive_lock(runs.parent / "runs.lock"):  # one pruner at a time: threads and processes
        old = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for stale in old[:-KEEP_RUNS]:
            shutil.rmtree(stale, ignore_errors=True)
    return path
