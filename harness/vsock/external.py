"""rust-vmm's ``vhost-device-vsock`` as the switch: one daemon per routing group, with the same socket layout
as the built-in switch, so host programs and QEMU cannot tell the two apart.

The daemon takes its VMs on the command line, so attaching a VM to a group restarts that group's daemon:
attach every VM of a group before launching any of them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from harness.aio import EventLoopThread, die_with_parent
from harness.vsock.errors import VsockSwitchError
from harness.vsock.server import VmEndpoint

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0


def daemon_argv(binary: str, endpoints: Sequence[VmEndpoint]) -> list[str]:
    """The command line serving ``endpoints`` (one routing group) with vhost-device-vsock."""
    argv = [binary]
    for ep in endpoints:
        argv += ["--vm", f"guest-cid={ep.cid},socket={ep.vhost_socket},uds-path={ep.uds},groups={ep.group}"]
    return argv


class GroupDaemon:
    """The vhost-device-vsock process of one group; ``restart`` with the group's current VMs."""

    def __init__(self, binary: str, group: str, log_path: Path, loop: EventLoopThread) -> None:
        self.binary = binary
        self.group = group
        self.log_path = log_path
        self.loop = loop
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoints: tuple[VmEndpoint, ...] = ()

    def restart(self, endpoints: Sequence[VmEndpoint]) -> None:
        """Stop the daemon and start one for ``endpoints``; returns once their sockets are there. Only the
        fork runs on the loop thread (PDEATHSIG follows the forking thread); the waiting runs here."""
        self.stop()
        self.endpoints = tuple(endpoints)
        if not self.endpoints:
            return
        argv = daemon_argv(self.binary, self.endpoints)
        self.process = self.loop.call(self._spawn, argv)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(ep.vhost_socket.exists() for ep in self.endpoints):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
                self.stop()
                raise VsockSwitchError(
                    f"{self.binary} for group {self.group} did not start",
                    hint=f"see {self.log_path}",
                    argv=argv,
                    log_tail=tail,
                )
            time.sleep(0.02)
        log.info("vhost-device-vsock for group %s: pid %d", self.group, self.process.pid)

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as logfile:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for ep in self.endpoints:
            for path in (ep.vhost_socket, ep.uds):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
