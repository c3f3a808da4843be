"""One libvirt domain built from a ``VMSpec``, with the QEMU backend's ``Machine`` interface.

Phases as in ``Machine``: assemble (domain XML, artifacts), launch (define, create paused with AUTODESTROY,
undefine at once so the domain is transient, connect the console and channel sockets, resume), run (console,
QMP through libvirt's monitor passthrough, vCPU pinning through libvirt), shutdown (ACPI power button ->
graceful destroy (SIGTERM) -> destroy, each bounded) and cleanup, which always runs. AUTODESTROY ties the
domain to this harness's connection: when the harness dies, libvirtd destroys it, and nothing stays defined.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shlex
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.aio import EventLoopThread
from harness.host.model import HostInfo
from harness.libvirt.connection import connect, libvirt_module
from harness.libvirt.domain import domain_sockets, domain_xml
from harness.libvirt.errors import DomainStartFailed
from harness.libvirt.remote import RemoteLibvirtHost, remote_refusal
from harness.libvirt.uri import parse_uri
from harness.qemu.errors import MachineStateError, QMPCommandError
from harness.qemu.machine import ExitInfo, Machine
from harness.qemu.spec import VMSpec

log = logging.getLogger(__name__)
EVENT_GRACE = 2.0  # seconds a STOPPED event may trail the domain's end
QEMU_LOGS = Path("/var/log/libvirt/qemu")  # where libvirtd (virtlogd) writes each domain's QEMU stderr
_serial = itertools.count()


class LibvirtMachine(Machine):
    """A guest run by libvirtd (``uri``: ``qemu:///system`` by default, or a lab host's ``qemu+ssh://`` URI,
    see ``harness.libvirt.remote``); use as a context manager."""

    def __init__(
        self,
        spec: VMSpec,
        host: HostInfo,
        *,
        artifacts: Path | None = None,
        uri: str | None = None,
        loop: EventLoopThread | None = None,
        serial: bool = True,
        vcpu_pins: dict[int, int] | None = None,
    ) -> None:
        # a part libvirt cannot express is refused (E360) before anything exists, artifact folder included;
        # so are a URI the backend does not take (E463) and a part that cannot follow a remote one (E361)
        domain_xml(spec, host, name="check", run_dir=Path("/"), owner=(0, 0), serial=serial)
        self.uri = uri or host.libvirt.uri or None
        self.remote_uri = parse_uri(self.uri)
        if self.remote_uri is not None:
            remote_refusal(spec)
        super().__init__(spec, host, artifacts=artifacts, loop=loop, serial=serial)
        self.vcpu_pins = vcpu_pins
        self.domain_name = f"teelab-{spec.name}-{os.getpid()}-{next(_serial)}"
        self.xml = ""
        self.stop_reason: str | None = None  # libvirt's STOPPED detail: shutdown, destroyed, crashed, ...
        self._conn: Any = None
        self._domain: Any = None
        self._callback: int | None = None
        self._run_dir: Path | None = None
        self._stopped = threading.Event()
        self._pid: int | None = None
        self._remote: RemoteLibvirtHost | None = None  # a qemu+ssh:// URI's reach to the lab host
        self._domain_host = host  # the host facts the XML is rendered for (the lab host's, over SSH)
        self._domain_dir: Path | None = None  # where QEMU binds the sockets (on the lab host, over SSH)
        self._files: dict[Path, str] = {}  # kernel, initrd, firmware -> their copies on the lab host

    # -- assemble -------------------------------------------------------------------------------
    def _render(self, run_dir: Path) -> str:
        owner = self._remote.owner if self._remote is not None else (os.getuid(), os.getgid())
        return domain_xml(
            self.spec, self._domain_host, name=self.domain_name, run_dir=run_dir, owner=owner,
            serial=self.serial, vcpu_pins=self.vcpu_pins, emulator=self.qemu_binary, files=self._files,
        )  # fmt: skip

    def _write_domain_artifacts(self) -> None:
        (self.artifacts / "domain.xml").write_text(self.xml)
        uri = shlex.quote(self.uri or "qemu:///system")
        if self.remote_uri is None:
            by_hand = self._render(self.artifacts.resolve())  # sockets beside the script
            script = (
                "# Reproduces this VM by hand under libvirt (a transient domain): the console is\n"
                "# ./console.sock (socat -,raw,echo=0 UNIX-CONNECT:console.sock); stop it with virsh "
                "destroy.\n"
                f'cd "$(dirname "$0")" || exit 1\nexec virsh -c {uri} create run.xml\n'
            )
        else:
            sockets = f"/tmp/{self.domain_name}-by-hand"
            by_hand = self._render(Path(sockets))
            ssh = shlex.join(["ssh", "-p", str(self.remote_uri.port), "-l", self.remote_uri.user])
            script = (
                f"# Reproduces this VM by hand on {self.remote_uri.target} under libvirt (a transient\n"
                f"# domain), with the harness's copies of its files there; its console is\n"
                f"# {sockets}/console.sock there.\n"
                f'cd "$(dirname "$0")" || exit 1\n{ssh} {shlex.quote(self.remote_uri.host)} '
                f"mkdir -p -m 0700 {sockets} || exit 1\nexec virsh -c {uri} create run.xml\n"
            )
        (self.artifacts / "run.xml").write_text(
            by_hand.replace(self.domain_name, f"{self.domain_name}-by-hand")
        )
        run_sh = self.artifacts / "run.sh"
        run_sh.write_text("#!/bin/sh\n" + script)
        run_sh.chmod(0o755)

    def _prepare_remote(self) -> None:
        """Reach the lab host (its host key checked first: E221 before anything is defined), connect libvirt,
        take its host facts, copy the files the domain boots from, make its socket directory, render."""
        assert self.remote_uri is not None
        self._remote = remote = RemoteLibvirtHost(self.remote_uri)
        self._conn = remote.connect()
        self._domain_host = remote.host_info(self._conn, self.host)
        self._files = remote.upload(p for p in (self.spec.kernel, self.spec.initrd, self.spec.firmware) if p)
        self._domain_dir = Path(remote.make_run_dir())
        self.xml = self._render(self._domain_dir)

    # -- launch ---------------------------------------------------------------------------------
    def launch(self, timeout: float = 30.0) -> None:
        """Define, start paused, connect the sockets, resume; raises ``DomainStartFailed`` (E462)."""
        if self._domain is not None or self._run_dir is not None:
            raise MachineStateError(f"{self.spec.name} is already launched", hint="launch a new Machine")
        libvirt = libvirt_module()
        self._run_dir = Path(tempfile.mkdtemp(prefix="teelab-libvirt-"))
        try:
            if self.remote_uri is not None:
                self._prepare_remote()
            else:
                sweep_orphan_logs()
                self.xml = self._render(self._run_dir)
            self._write_domain_artifacts()
            self._launched_at = time.monotonic()
            if self._conn is None:
                self._conn = connect(self.uri)
            domain = self._conn.defineXML(self.xml)
            self._callback = self._conn.domainEventRegisterAny(
                domain, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
            try:
                domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY)
                self._domain = domain
            finally:
                domain.undefine()  # transient from here: nothing stays defined, whatever happens next
            self._attach_sockets(timeout)
            self._record_argv()
            domain.resume()
        except BaseException as exc:
            self._cleanup(stage="launch-failed")
            if isinstance(exc, libvirt.libvirtError):
                raise DomainStartFailed(
                    f"libvirt did not start {self.spec.name}: {exc.get_error_message()}",
                    hint=f"see {self.artifacts}/domain.xml; run.sh there reproduces it with virsh",
                    artifacts=str(self.artifacts),
                    domain=self.domain_name,
                ) from exc
            raise
        log.info("launched %s as libvirt domain %s (pid %s)", self.spec.name, self.domain_name, self._pid)

    def _attach_sockets(self, timeout: float) -> None:
        assert self._run_dir is not None
        sockets = domain_sockets(self.spec, self._run_dir, serial=self.serial)
        if self._remote is not None:  # the sockets are on the lab host: forwarded here, over SSH
            assert self._domain_dir is not None
            there = domain_sockets(self.spec, self._domain_dir, serial=self.serial)
            pairs = {sockets.channels[c]: str(there.channels[c]) for c in sockets.channels}
            if sockets.console is not None and there.console is not None:
                pairs[sockets.console] = str(there.console)
            self._remote.forward(pairs, self._loop, timeout)
        if sockets.console is not None:
            self._console_sock = _connect_unix(sockets.console)
            self._loop.run(self._start_console(self._console_sock), timeout)
        for chardev_id, path in sockets.channels.items():
            self.channels[chardev_id] = _connect_unix(path)
        # connected: as private as a socketpair from now on, and nothing on disk for a killed harness to leave
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def _record_argv(self) -> None:
        """QEMU's pid (None on a lab host: not a process here) and command line, as argv.json; on a lab host,
        the run directory goes in the same round trip."""
        if self._remote is not None:
            threads = self.vcpu_threads()
            self.argv = self._remote.settle(min(threads.values()) if threads else None)
        else:
            self._pid = self._qemu_pid()
            self.argv = _cmdline(self._pid)
        (self.artifacts / "argv.json").write_text(json.dumps(self.argv, indent=1) + "\n")

    def _qemu_pid(self) -> int | None:
        """QEMU's pid: the thread group of a vCPU thread (libvirt has no call for it)."""
        for tid in self.vcpu_threads().values():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{tid}/status").read_text().splitlines():
                    if line.startswith("Tgid:"):
                        return int(line.split()[1])
        return None

    def _on_lifecycle(self, _conn: Any, _domain: Any, event: int, detail: int, _opaque: Any) -> None:
        libvirt = libvirt_module()
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self.stop_reason = _STOPPED.get(detail, str(detail))
            self._stopped.set()

    # -- run ------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def forwarder_pid(self) -> int | None:
        """The ssh forwarding a lab host's sockets here (a ``qemu+ssh://`` URI), while it runs."""
        return self._remote.forwarder_pid if self._remote is not None else None

    @property
    def running(self) -> bool:
        if self._domain is None or self._stopped.is_set():
            return False
        try:
            return bool(self._domain.isActive())
        except libvirt_module().libvirtError:
            return False

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """One QMP command through libvirt's monitor passthrough (libvirt marks the domain tainted)."""
        if not self.running:
            raise MachineStateError(f"{self.spec.name} is not running", hint="launch() it first")
        import libvirt_qemu

        sent = {"execute": command, "arguments": arguments}
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(sent), 0))
        except libvirt_module().libvirtError as exc:
            raise QMPCommandError(
                f"QMP {command} failed on {self.spec.name}: {exc.get_error_message()}",
                hint="see qmp.log in the artifact folder and libvirtd's log",
                sent=sent,
                received=str(exc),
            ) from exc
        if "error" in reply:
            raise QMPCommandError(
                f"QMP {command} failed on {self.spec.name}: {reply['error'].get('desc')}",
                hint="see qmp.log in the artifact folder",
                sent=sent,
                received=reply["error"],
            )
        with open(self.artifacts / "qmp.log", "a") as qmp_log:
            qmp_log.write(json.dumps({**sent, "return": reply.get("return")}) + "\n")
        return reply.get("return")

    def pin_vcpus(self, host_cpus: Sequence[int]) -> dict[int, int]:
        """Pin vCPU i to ``host_cpus[i]`` through libvirt (``virsh vcpupin``); returns vCPU -> host CPU."""
        libvirt = libvirt_module()
        vcpus = sorted(self.vcpu_threads())
        if len(host_cpus) < len(vcpus):
            raise MachineStateError(
                f"{self.spec.name} has {len(vcpus)} vCPUs but {len(host_cpus)} host CPUs were given",
                hint="give one host CPU per vCPU",
            )
        count = self._conn.getCPUMap()[0]
        for index in vcpus:
            cpumap = tuple(cpu == host_cpus[index] for cpu in range(count))
            self._domain.pinVcpuFlags(index, cpumap, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return {index: host_cpus[index] for index in vcpus}

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(
        self, powerdown_timeout: float = 10.0, quit_timeout: float = 5.0, kill_timeout: float = 5.0
    ) -> ExitInfo:
        """ACPI power button, then a graceful destroy (SIGTERM), then destroy; cleanup always runs."""
        if self._domain is None:
            raise MachineStateError(f"{self.spec.name} was never launched", hint="launch() it first")
        libvirt = libvirt_module()
        start = time.monotonic()
        stage = "exited"
        try:
            domain = self._domain
            steps = (
                ("powerdown", powerdown_timeout,
                 lambda: domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)),
                ("quit", quit_timeout, lambda: domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)),
                ("kill", kill_timeout, domain.destroy),
            )  # fmt: skip
            for name, bound, request in steps:
                if not self.running or (bound <= 0 and name != "kill"):
                    continue
                stage = name
                with contextlib.suppress(libvirt.libvirtError):
                    request()
                if self._wait_exit(bound):
                    break
            return self._finish(stage, start)
        finally:
            self._cleanup(stage)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() >= deadline:
                return False
            self._stopped.wait(0.05)
        self._stopped.wait(EVENT_GRACE)  # inactive: its STOPPED event (the reason) follows at once
        return True

    def _finish(self, stage: str, start: float) -> ExitInfo:
        # libvirt does not hand over QEMU's exit status; a guest poweroff (SHUTDOWN) ends QEMU cleanly.
        returncode = 0 if self.stop_reason == "shutdown" else None
        self.exit_info = ExitInfo(stage, returncode, round(time.monotonic() - start, 3))
        return self.exit_info

    def _cleanup(self, stage: str) -> None:
        libvirt = libvirt_module()
        if self._domain is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._domain.isActive():
                    self._domain.destroy()
            self._wait_exit(5.0)
        self._close_host_ends()
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._callback is not None:
                    self._conn.domainEventDeregisterAny(self._callback)
                self._conn.close()
            self._conn = self._callback = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        if self._remote is not None:
            self._remote.fetch_log(self.domain_name, self.artifacts / "qemu.log")
            self._remote.close()
            self._remote = None
        elif self.remote_uri is None:
            qemu_log = QEMU_LOGS / f"{self.domain_name}.log"
            with contextlib.suppress(OSError):
                shutil.move(qemu_log, self.artifacts / "qemu.log")  # libvirtd keeps one per domain otherwise
            sweep_orphan_logs()
        returncode = self.exit_info.returncode if self.exit_info else None
        exit_record = {"stage": stage, "returncode": returncode, "reason": self.stop_reason}
        (self.artifacts / "exit.json").write_text(json.dumps(exit_record) + "\n")

    def _stderr_text(self) -> str:
        path = self.artifacts / "qemu.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self._domain is not None and self.exit_info is None:
            self.shutdown(powerdown_timeout=5.0)


def sweep_orphan_logs(logs: Path = QEMU_LOGS) -> list[Path]:
    """Remove the QEMU logs libvirtd kept for domains of harnesses that died (``teelab-<name>-<pid>-<n>.log``
    whose pid is gone); returns what was removed."""
    removed = []
    for path in logs.glob("teelab-*-*-*.log") if logs.is_dir() else ():
        owner = path.stem.rsplit("-", 2)[-2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _connect_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _cmdline(pid: int | None) -> list[str]:
    """The QEMU command line libvirt ran, from /proc (empty when unknown)."""
    if pid is None:
        return []
    with contextlib.suppress(OSError):
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    return []


_STOPPED = {
    0: "shutdown",
    1: "destroyed",
    2: "crashed",
    3: "migrated",
    4: "saved",
    5: "failed",
    6: "snapshot",
}
