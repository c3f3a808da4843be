"""A lab host's libvirtd over ``qemu+ssh://``: the domain is defined and run there, and what lives on that
host follows the domain over the same SSH reach.

- **Host keys** are checked first, by a paramiko session with the URI's known_hosts alone (E221 when the key
  is unknown or different), before anything is defined; libvirt's own ssh and the socket forwarder run the
  ``ssh`` binary with the same file and strict checking (``RemoteUri.ssh_options``).
- **Files**: the kernel, initrd and firmware are copied by SFTP into a cache on the host, named by content
  (``[libvirt] remote_cache``, default ``.cache/teelab/libvirt`` in the login directory), once per content.
- **Sockets**: QEMU binds the console and channel sockets in a private directory on the host; one ``ssh -N``
  forwards each to a socket here (OpenSSH's streamlocal forwarding), the harness connects while the domain is
  paused, and both directories are removed, as with a local URI.
- **Host facts**: the domain type, emulator and machine types come from that libvirtd's capabilities and that
  host's CPU flags; its hugepages and TEE hardware are not probed (``remote_refusal``).
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import paramiko

from harness import config
from harness.aio import EventLoopThread, die_with_parent
from harness.host.model import HostInfo, LibvirtInfo, TeeSupport
from harness.host.probe import choose_accel
from harness.host.remote import RemoteHost, RemoteHostError, RemoteHostKeyUnknown
from harness.libvirt.connection import connect
from harness.libvirt.errors import LibvirtUnavailable, RemoteUnsupported
from harness.libvirt.uri import RemoteUri
from harness.qemu.chardevs import ChardevChannel
from harness.qemu.devices import (
    TpmCrb,
    VhostUserVsockPci,
    VhostVsockPci,
    VirtioBlkPci,
    VirtioNetUser,
    VirtioRngPci,
    VirtioSerialPort,
)
from harness.qemu.spec import VMSpec

FACTS = (
    "id -u && id -g && { test -r /dev/kvm && test -w /dev/kvm && echo kvm || echo no-kvm; } && "
    "{ command -v qemu-system-x86_64 || echo none; } && { grep -m1 '^flags' /proc/cpuinfo || echo; }"
)
REMOTE_CACHE = ".cache/teelab/libvirt"
REMOTE_LOGS = "/var/log/libvirt/qemu"
HOST_KEY_FAILED = "Host key verification failed"
_WHY_NOT = {
    VhostUserVsockPci: "vhost-user vsock shares guest memory by passing descriptors over its socket, which "
    "cannot cross SSH",
    VhostVsockPci: "kernel vsock would connect the guest to that host's kernel (CID 2), not to this harness",
    TpmCrb: "swtpm's control socket passes a descriptor to QEMU, which cannot cross SSH",
    VirtioNetUser: "the NIC's forwarded SSH port would be on that host's loopback",
    VirtioBlkPci: "the disk image is a path on that host, and the harness does not copy disks",
}
_digests: dict[tuple[str, int, int], str] = {}


def remote_refusal(spec: VMSpec) -> None:
    """Raise ``RemoteUnsupported`` (E361) for the first part of ``spec`` that cannot follow a remote URI."""
    for device in spec.devices:
        if isinstance(device, VirtioRngPci):
            continue
        if isinstance(device, VirtioSerialPort) and isinstance(device.chardev, ChardevChannel):
            continue
        why = _WHY_NOT.get(type(device), "its host side is a path or descriptor on this machine")
        raise _unsupported(spec, f"device {device.id} ({type(device).__name__}): {why}")
    if spec.memory is not None and spec.memory.hugepage_demand() is not None:
        raise _unsupported(spec, "hugepage-backed memory: the lab host's hugepage pools are not probed")
    if spec.confidential is not None or spec.epc:
        raise _unsupported(spec, "a hardware TEE guest: the lab host's SEV-SNP, TDX or SGX is not probed")


def _unsupported(spec: VMSpec, why: str) -> RemoteUnsupported:
    return RemoteUnsupported(
        f"{spec.name} cannot run over a remote libvirt URI: {why}",
        hint="run the harness on that host (teelab --host user@host ...), or use a local URI (qemu:///system)",
        vm=spec.name,
    )


class _Session(RemoteHost):
    def sftp(self) -> paramiko.SFTPClient:
        return self._client.open_sftp()


def file_digest(path: Path) -> str:
    """The first 16 hex digits of ``path``'s SHA-256, remembered per path, size and mtime."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()[:16]
    return _digests[key]


class RemoteLibvirtHost:
    """One machine's reach to a lab host: the paramiko session (opened first: the host key check), libvirt's
    ssh command, the host's run directory for the domain's sockets, the forwarder. ``close`` undoes all."""

    def __init__(self, uri: RemoteUri, *, timeout: float = 30.0) -> None:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise LibvirtUnavailable(
                "qemu+ssh:// needs the ssh client, which is not installed", hint="install openssh-client"
            )
        self.uri, self.ssh = uri, ssh
        self.session = _Session(uri.fleet_host(), known_hosts=uri.known_hosts, timeout=timeout)  # E220, E221
        self.run_dir: str | None = None
        self._forwarder: subprocess.Popen[bytes] | None = None
        self._local = Path(tempfile.mkdtemp(prefix="teelab-ssh-"))
        try:
            self.ssh_command = self._local / "ssh"
            self.ssh_command.write_text(uri.ssh_wrapper(ssh))
            self.ssh_command.chmod(0o700)
            self._take_facts()
        except BaseException:
            self.close()
            raise

    def _take_facts(self) -> None:
        """What the domain needs to know of the host, in one command: the account QEMU will run as (the DAC
        label), whether /dev/kvm is read-write for it, its QEMU and its CPU flags."""
        lines = [*self._run(FACTS).splitlines(), "", "", "", "", ""]
        self.owner = (int(lines[0]), int(lines[1]))
        self.kvm_device = lines[2] == "kvm"
        self.emulator = lines[3]
        self.cpu_flags = frozenset(lines[4].partition(":")[2].split())
        if not self.emulator.startswith("/"):
            raise LibvirtUnavailable(
                f"{self.uri.target} has no qemu-system-x86_64 in its PATH",
                hint="install qemu-system-x86 there (ansible/host-packages.txt lists it)",
            )

    def _run(self, command: str) -> str:
        done = self.session.run(command, timeout=60)
        if done.returncode != 0:
            raise RemoteHostError(
                f"{self.uri.target}: {command[:80]!r} exited {done.returncode}: {done.stderr.strip()[-300:]}",
                hint="check that host's account and disk",
                host=self.uri.host,
            )
        return done.stdout

    def connect(self) -> Any:
        """libvirt's connection to that host's libvirtd through the pinned ssh; E221 if ssh refuses a key."""
        try:
            return connect(self.uri.libvirt_uri(self.ssh_command))
        except LibvirtUnavailable as exc:
            if HOST_KEY_FAILED in str(exc):
                raise RemoteHostKeyUnknown(
                    f"{self.uri.target}: libvirt's ssh refused the host key: {exc.message}",
                    hint=f"add the host's key to {self.uri.known_hosts} after checking it out of band",
                    host=self.uri.host,
                ) from exc
            raise

    def host_info(self, conn: Any, local: HostInfo) -> HostInfo:
        """``local`` with what the domain's XML takes from the lab host instead: KVM where its CPU has vmx or
        svm and /dev/kvm is read-write (the probe's rule, ``choose_accel``), its QEMU; no vhost-vsock,
        hugepages or TEE (not probed there)."""
        accel, reason = choose_accel(self.cpu_flags, self.kvm_device)
        return replace(
            local, accel=accel, accel_reason=f"{self.uri.host}: {reason}", kvm_device=self.kvm_device,
            vhost_vsock=False, hugepages=(), hugetlbfs=(), tee=TeeSupport(), cpu_flags=self.cpu_flags,
            qemu=replace(local.qemu, binary=self.emulator),
            libvirt=LibvirtInfo(True, _version(conn.getLibVersion()), self.uri.uri),
        )  # fmt: skip

    def upload(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Copy each file into the host's cache (named by content, skipped when there); local -> its copy."""
        cache = str(config.setting("libvirt", "remote_cache", REMOTE_CACHE))
        base = self._run(f"mkdir -p -- {shlex.quote(cache)} && cd -- {shlex.quote(cache)} && pwd").strip()
        placed: dict[Path, str] = {}
        try:
            with self.session.sftp() as sftp:
                for path in paths:
                    placed[path] = target = f"{base}/{file_digest(path)}-{path.name}"
                    with contextlib.suppress(OSError):
                        if sftp.stat(target).st_size == path.stat().st_size:
                            continue
                    partial = f"{target}.part-{self._local.name}"
                    sftp.put(str(path), partial)
                    sftp.posix_rename(partial, target)  # whole or absent, also with two harnesses at once
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteHostError(
                f"{self.uri.target}: cannot copy the VM's files to {base}: {exc or type(exc).__name__}",
                hint="enable sshd's sftp subsystem there and check the disk ([libvirt] remote_cache)",
                host=self.uri.host,
            ) from exc
        return placed

    def make_run_dir(self) -> str:
        """A private (0700) directory on the host for the domain's sockets."""
        self.run_dir = self._run("mktemp -d -t teelab-libvirt-XXXXXXXX").strip()
        return self.run_dir

    def forward(self, sockets: Mapping[Path, str], loop: EventLoopThread, timeout: float) -> None:
        """One ``ssh -N`` forwarding each local socket path to the host's socket; returns once all listen.
        Forked from ``loop``'s thread so it dies with the harness."""
        arguments = ["-N", "-T", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5",
                     "-o", "ServerAliveCountMax=3", "-o", "StreamLocalBindMask=0177"]  # fmt: skip
        for local, remote in sockets.items():
            arguments += ["-L", f"{local}:{remote}"]
        argv = self.uri.ssh_argv(self.ssh, *arguments)
        log = self._local / "forward.log"
        with open(log, "wb") as stderr:
            self._forwarder = loop.call(
                lambda: subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    preexec_fn=die_with_parent(signal.SIGTERM),
                )
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(path.exists() for path in sockets):
            if self._forwarder.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace").strip()[-300:] if log.exists() else ""
                error = RemoteHostKeyUnknown if HOST_KEY_FAILED in text else RemoteHostError
                raise error(
                    f"{self.uri.target}: ssh did not forward the domain's sockets: {text or 'no message'}",
                    hint="check the host key, the key file and that sshd there allows stream forwarding",
                    host=self.uri.host,
                )
            time.sleep(0.02)

    @property
    def forwarder_pid(self) -> int | None:
        return self._forwarder.pid if self._forwarder is not None else None

    def remove_run_dir(self) -> None:
        run_dir, self.run_dir = self.run_dir, None
        if run_dir is not None:
            with contextlib.suppress(RemoteHostError):
                self.session.run(f"rm -rf -- {shlex.quote(run_dir)}", timeout=30)

    def settle(self, vcpu_thread: int | None) -> list[str]:
        """Once libvirt and the sockets are connected: remove the ssh command's folder here (nothing on disk
        for a killed harness to leave), and the host's run directory and read the QEMU command line running
        there from its /proc (empty when unreadable) in one round trip."""
        shutil.rmtree(self._local, ignore_errors=True)
        run_dir, self.run_dir = self.run_dir, None
        command = f"rm -rf -- {shlex.quote(run_dir)}; " if run_dir else ""
        if vcpu_thread is not None:
            status = f"/proc/{int(vcpu_thread)}/status"
            command += f"tgid=$(awk '/^Tgid:/{{print $2}}' {status}) && cat /proc/$tgid/cmdline"
        done = self.session.run(command or "true", timeout=30)
        return [a for a in done.stdout.split("\0") if a] if done.returncode == 0 else []

    def fetch_log(self, domain_name: str, target: Path) -> None:
        """Bring the domain's QEMU log (virtlogd's, on the host) here and remove it there, where readable."""
        with contextlib.suppress(OSError, paramiko.SSHException), self.session.sftp() as sftp:
            sftp.get(f"{REMOTE_LOGS}/{domain_name}.log", str(target))
            sftp.remove(f"{REMOTE_LOGS}/{domain_name}.log")

    def close(self) -> None:
        """Stop the forwarder, remove the host's run directory, close the session, remove the ssh command."""
        forwarder, self._forwarder = self._forwarder, None
        if forwarder is not None:
            forwarder.terminate()
            try:
                forwarder.wait(5)
            except subprocess.TimeoutExpired:
                forwarder.kill()
                forwarder.wait()
        self.remove_run_dir()
        self.session.close()
        shutil.rmtree(self._local, ignore_errors=True)


def _version(number: int) -> str:
    major, rest = divmod(number, 1_000_000)
    return f"{major}.{rest // 1000}.{rest % 1000}"
