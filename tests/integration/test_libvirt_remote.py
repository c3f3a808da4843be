"""The libvirt backend over a qemu+ssh:// URI, against a stand-in lab host: an sshd on a loopback port whose
libvirtd is this machine's. The domain is defined through libvirt's ssh transport (the harness's pinned ssh
command), it boots from the copies in the host's cache, and the harness reaches its console and agent through
the ssh forwarder: the agent's socket here is connected to ssh, not to QEMU. One boot; the refusals boot
nothing."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import alive
from standin_sshd import StandIn, keygen, privsep_dir, start_sshd

from harness.agent import AGENT_CHANNEL
from harness.host.remote import RemoteHostKeyUnknown
from harness.lab import Lab
from harness.libvirt import LibvirtMachine
from harness.libvirt.machine import QEMU_LOGS
from harness.libvirt.remote import RemoteLibvirtHost
from harness.libvirt.uri import parse_uri

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.usefixtures("libvirt_daemons")]
HARNESS_SCRIPT = textwrap.dedent(
    """
    import sys
    from harness import images
    from harness.lab import Lab
    lab = Lab(backend="libvirt", uri=sys.argv[1])
    machine = lab.launch(lab.spec_for_image(images.build("enclave"), name="lv-remote-killed", memory_mib=256))
    print(machine.domain_name, machine.forwarder_pid, flush=True)
    sys.stdin.read()
    """
)


@dataclass
class SshLabHost:
    folder: Path
    stand_in: StandIn
    cache: Path

    def uri(self, known_hosts: Path | None = None) -> str:
        known = known_hosts or self.folder / "known_hosts"
        return (
            f"qemu+ssh://root@127.0.0.1:{self.stand_in.port}/system"
            f"?keyfile={self.folder}/client_key&known_hosts={known}"
        )

    def logins(self) -> int:
        return self.stand_in.log.read_text().count("Accepted publickey for root")


@pytest.fixture(scope="module")
def ssh_lab_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLabHost]:
    folder = tmp_path_factory.mktemp("lab-host")
    keygen(folder / "client_key")
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    with privsep_dir(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEELAB_LIBVIRT_REMOTE_CACHE", str(folder / "cache"))  # not the account's own cache
        stand_in = start_sshd(folder, "lab-host", folder / "authorized_keys")
        try:
            (folder / "known_hosts").write_text(stand_in.known_hosts_line())
            yield SshLabHost(folder, stand_in, folder / "cache")
        finally:
            stand_in.stop()


@pytest.fixture
def conn() -> Iterator[Any]:
    import libvirt

    connection = libvirt.open("qemu:///system")
    yield connection
    connection.close()


def peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid)


def test_a_guest_boots_on_the_lab_host_and_its_agent_answers_through_the_forwarder(
    ssh_lab_host: SshLabHost, lab_host, enclave_image, conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "t"  # this machine's ends: the forwarded sockets' folder, libvirt's ssh command
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with Lab(lab_host, backend="libvirt", uri=ssh_lab_host.uri()) as lab:
        boot = lab.boot(lab.spec_for_image(enclave_image, name="lv-remote", memory_mib=256))
        machine = boot.machine
        assert isinstance(machine, LibvirtMachine) and machine.pid is None  # QEMU is the lab host's process
        assert boot.agent is not None
        assert boot.agent.exec(["cat", "/proc/sys/kernel/osrelease"], check=True).text.strip()
        with machine.channel(AGENT_CHANNEL) as agent_end:
            forwarder = peer_pid(agent_end)
        assert forwarder == machine.forwarder_pid
        forwarder_argv = Path(f"/proc/{forwarder}/cmdline").read_bytes().split(b"\0")
        assert Path(forwarder_argv[0].decode()).name == "ssh" and b"-L" in forwarder_argv
        assert b"StrictHostKeyChecking=yes" in forwarder_argv
        cache = ssh_lab_host.cache.resolve()
        for tag in ("kernel", "initrd", "loader"):
            assert f">{cache}/" in next(line for line in machine.xml.splitlines() if f"<{tag}" in line)
        console = next(line for line in machine.xml.splitlines() if "console.sock" in line)
        assert not Path(console.split('path="')[1].split('"')[0]).parent.exists()  # gone once connected
        name, folder = machine.domain_name, machine.artifacts
        assert "qemu+ssh://" in (folder / "run.sh").read_text() and name in " ".join(machine.argv)
        assert ssh_lab_host.logins() >= 3  # the harness's session, libvirt's ssh, the forwarder
    assert not alive(forwarder), "the forwarder outlived its machine"
    assert list(private.iterdir()) == [], "sockets or the ssh command were left here"
    assert name not in {d.name() for d in conn.listAllDomains()}
    assert (folder / "qemu.log").exists() and not (QEMU_LOGS / f"{name}.log").exists()


def test_a_remote_domain_ends_with_its_harness(ssh_lab_host: SshLabHost, conn, tmp_path: Path) -> None:
    """A harness SIGKILLed with a domain on the lab host: its libvirt connection (libvirt's ssh) closes, so
    libvirtd there destroys the domain (AUTODESTROY), and the forwarder dies with it (PDEATHSIG)."""
    private = tmp_path / "t"
    private.mkdir()
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS_SCRIPT, ssh_lab_host.uri()], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(private)},
    )  # fmt: skip
    domain, forwarder = harness.stdout.readline().split()  # type: ignore[union-attr]
    assert domain in {d.name() for d in conn.listAllDomains()} and alive(int(forwarder))
    harness.kill()
    harness.wait()
    deadline = time.monotonic() + 30
    while domain in {d.name() for d in conn.listAllDomains()} or alive(int(forwarder)):
        assert time.monotonic() < deadline, "the domain or the forwarder outlived the harness"
        time.sleep(0.1)
    assert list(private.iterdir()) == [], "a killed harness left its sockets or ssh command here"


def test_an_unknown_or_changed_host_key_is_e221_before_anything_is_defined(
    ssh_lab_host: SshLabHost, lab_host, enclave_image, conn, tmp_path: Path
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    other = tmp_path / "other_known_hosts"
    other.write_text(f"[127.0.0.1]:{ssh_lab_host.stand_in.port} {keygen(tmp_path / 'other_key')}")
    logins = ssh_lab_host.logins()
    for known_hosts in (empty, other):
        with Lab(lab_host, backend="libvirt", uri=ssh_lab_host.uri(known_hosts)) as lab:
            spec = lab.spec_for_image(enclave_image, name="lv-remote-refused", memory_mib=256)
            with pytest.raises(RemoteHostKeyUnknown) as caught:
                lab.launch(spec)
            assert caught.value.code == "E221"
    assert ssh_lab_host.logins() == logins, "the harness logged in to a host whose key it does not know"
    assert not [d.name() for d in conn.listAllDomains() if "lv-remote-refused" in d.name()]


def test_libvirts_own_ssh_refuses_a_host_key_not_given(ssh_lab_host: SshLabHost, tmp_path: Path) -> None:
    """Host key checking does not rest on the paramiko session alone: libvirt's ssh, given the harness's
    command with an empty known_hosts, refuses the host too (E221), and libvirt connects nowhere."""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    refusing = parse_uri(ssh_lab_host.uri(empty))
    remote = RemoteLibvirtHost(parse_uri(ssh_lab_host.uri()))  # type: ignore[arg-type]
    try:
        remote.ssh_command.write_text(refusing.ssh_wrapper(shutil.which("ssh") or "ssh"))  # type: ignore[union-attr]
        with pytest.raises(RemoteHostKeyUnknown, match="libvirt's ssh refused the host key") as caught:
            remote.connect()
        assert caught.value.code == "E221"
    finally:
        remote.close()
