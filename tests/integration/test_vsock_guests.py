"""vsock between real TCG guests and the host through the built-in switch: 64 MiB each way between two
siblings, host<->guest echo, 64 concurrent connections, refusals by reset, routing groups, and a VM that dies
mid-transfer. The kernel backend's tests run on hosts with /dev/vhost-vsock (marker ``vhost_vsock``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from teelab_guest.vsock_peer import Pattern, pattern_sha256

from harness import images
from harness.agent import GuestAgent, GuestJob
from harness.host.model import HostInfo
from harness.lab import GuestBoot, Lab
from harness.qemu.objects import MemoryBackendMemfd
from harness.vsock.errors import VsockConnectionRefused
from harness.vsock.host import VsockHost

pytestmark = [pytest.mark.vm, pytest.mark.slow]
PEER = ["python3", "-m", "teelab_guest.vsock_peer"]
MIB = 1 << 20


@dataclass
class Guests:
    lab: Lab
    vsock: VsockHost
    image: images.BuiltImage
    parent: GuestBoot  # CID 3 in group lab1
    enclave: GuestBoot  # CID 16 in group lab1
    stranger: GuestBoot  # CID 3 in group lab2: unrelated, and a second "CID 3"

    def boot(self, name: str, group: str | None, cid: int | None = None) -> GuestBoot:
        return boot(self.lab, self.vsock, self.image, name, group, cid)


def boot(
    lab: Lab, vsock: VsockHost, image: images.BuiltImage, name: str, group: str | None, cid: int | None = None
) -> GuestBoot:
    attachment = vsock.attach(name, group=group, cid=cid)
    spec = lab.spec_for_image(
        image,
        name=name,
        vcpus=1,
        memory_mib=384,
        memory=MemoryBackendMemfd("ram0", 384, share=True),
        devices=attachment.devices,
    )
    return lab.boot(spec)


@pytest.fixture(scope="module")
def guests(lab_host: HostInfo) -> Iterator[Guests]:
    image = images.build("enclave")
    with Lab(lab_host) as lab, VsockHost(lab_host, backend="builtin") as vsock:
        tag = os.getpid()
        parent = boot(lab, vsock, image, f"parent-{tag}", "lab1", 3)
        enclave = boot(lab, vsock, image, f"enclave-{tag}", "lab1", 16)
        stranger = boot(lab, vsock, image, f"stranger-{tag}", "lab2", 3)
        yield Guests(lab, vsock, image, parent, enclave, stranger)


def in_guest(agent: GuestAgent | None, argv: list[str]) -> GuestJob:
    """A guest command running in the background while the test does its side."""
    assert agent is not None
    return agent.start(argv, timeout=300)


def test_two_guests_exchange_64_mib_each_way(guests: Guests) -> None:
    size = 64 * MIB
    listener = in_guest(guests.parent.agent, [*PEER, "exchange", "--listen", "6000", "--bytes", str(size)])
    dialer = in_guest(
        guests.enclave.agent,
        [*PEER, "exchange", "--cid", "3", "--port", "6000", "--bytes", str(size), "--seed", "enclave"],
    )
    parent, enclave = listener.json(), dialer.json()
    assert parent["received_bytes"] == enclave["received_bytes"] == size
    assert parent["received_sha256"] == enclave["sent_sha256"] == pattern_sha256(size, b"enclave")
    assert enclave["received_sha256"] == parent["sent_sha256"] == pattern_sha256(size)


def test_host_guest_echo(guests: Guests) -> None:
    echo = in_guest(guests.enclave.agent, [*PEER, "echo", "--port", "5000"])
    sock = guests.vsock.connect(16, 5000, group="lab1", wait=60)
    data = os.urandom(MIB)
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    sender.join()
    assert got == data
    assert echo.json()["peers"] == [2]


def test_guest_reaches_a_host_listener(guests: Guests) -> None:
    with guests.vsock.listen(7000, vm=guests.parent.machine.spec.name) as listener:
        source = in_guest(
            guests.parent.agent,
            [*PEER, "source", "--cid", "2", "--port", "7000", "--bytes", str(8 * MIB), "--hash"],
        )
        conn, cid = listener.accept(timeout=60)
        assert cid == 3
        digest = hashlib.sha256()
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
        conn.sendall(b'{"ok": true}\n')
        conn.close()
    assert source.json()["sha256"] == digest.hexdigest() == pattern_sha256(8 * MIB)


def test_sixty_four_concurrent_connections_to_one_guest(guests: Guests) -> None:
    echo = in_guest(guests.parent.agent, [*PEER, "echo", "--port", "5001", "--connections", "64"])
    guests.vsock.connect(3, 5001, group="lab1", wait=60).close()  # the first of the 64
    ok: dict[int, bool] = {}

    def client(i: int) -> None:
        sock = guests.vsock.connect(3, 5001, group="lab1")
        message = f"{i:03d}".encode() * 20_000
        sender = threading.Thread(target=lambda: (sock.sendall(message), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := sock.recv(65536):
            got += chunk
        sender.join()
        ok[i] = bytes(got) == message

    threads = [threading.Thread(target=client, args=(i,)) for i in range(63)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(ok) == 63 and all(ok.values())
    assert echo.json()["connections"] == 64


def test_a_closed_port_fails_at_once_by_reset(guests: Guests) -> None:
    with pytest.raises(VsockConnectionRefused):
        guests.vsock.connect(16, 5999, group="lab1", timeout=60)  # a refusal, not this timeout
    to_host = in_guest(guests.enclave.agent, [*PEER, "refused", "--cid", "2", "--port", "7999"]).json()
    to_sibling = in_guest(guests.enclave.agent, [*PEER, "refused", "--cid", "3", "--port", "7999"]).json()
    assert to_host["outcome"] == to_sibling["outcome"] == "ECONNRESET"
    assert to_host["seconds"] < 5 and to_sibling["seconds"] < 5  # far below the 10 s connect timeout


def test_unrelated_vms_cannot_reach_each_other(guests: Guests) -> None:
    """The stranger (CID 3 of lab2) listens on 6100; from lab1, CID 3 is the parent, which does not: reset."""
    stranger = in_guest(guests.stranger.agent, [*PEER, "echo", "--port", "6100", "--connections", "2"])
    guests.vsock.connect(3, 6100, group="lab2", wait=60).close()  # proves the stranger is listening
    from_enclave = in_guest(guests.enclave.agent, [*PEER, "refused", "--cid", "3", "--port", "6100"]).json()
    assert from_enclave["outcome"] == "ECONNRESET"
    guests.vsock.connect(3, 6100, group="lab2").close()  # still listening: the refusal came from lab1
    assert stranger.json()["peers"] == [2]


def test_a_vm_that_dies_mid_transfer_frees_its_connections(guests: Guests) -> None:
    doomed = guests.boot(f"doomed-{os.getpid()}", "lab1", 17)
    name = doomed.machine.spec.name
    echo = in_guest(doomed.agent, [*PEER, "echo", "--port", "5002"])
    victim = guests.vsock.connect(17, 5002, group="lab1", wait=60)
    victim.sendall(b"x" * 100_000)
    survivor_sink = in_guest(guests.parent.agent, [*PEER, "sink", "--port", "6200", "--hash"])
    survivor = guests.vsock.connect(3, 6200, group="lab1", wait=60)
    pattern = Pattern()
    pattern.send(survivor.sendall, 16 * MIB)
    assert guests.vsock.stats()["vms"][name]["host_connections"] == 1
    guests.lab.stop(doomed.machine, powerdown_timeout=0)  # QEMU killed mid-stream
    victim.settimeout(30)  # the switch closes the host end: EOF or a reset, not this timeout
    with contextlib.suppress(ConnectionResetError):
        while victim.recv(65536):
            pass
    deadline = time.monotonic() + 30
    while guests.vsock.stats()["vms"][name]["host_connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert guests.vsock.stats()["vms"][name]["host_connections"] == 0
    pattern.send(survivor.sendall, 16 * MIB)
    survivor.shutdown(socket.SHUT_WR)
    while survivor.recv(65536):
        pass
    report = survivor_sink.json()
    assert report["bytes"] == 32 * MIB
    assert echo.future.exception(timeout=30) is not None  # the doomed guest's command died with it
    guests.vsock.detach(name)


@pytest.mark.vhost_vsock
def test_kernel_backend_echo(lab_host: HostInfo) -> None:
    """On hosts with /dev/vhost-vsock: the same echo through vhost-vsock-pci."""
    image = images.build("enclave")
    with Lab(lab_host) as lab, VsockHost(lab_host, backend="kernel") as vsock:
        guest = boot(lab, vsock, image, f"kernel-{os.getpid()}", None)
        cid = vsock.attachments[guest.machine.spec.name].cid
        echo = in_guest(guest.agent, [*PEER, "echo", "--port", "5000"])
        sock = vsock.connect(cid, 5000, wait=60)
        sock.sendall(b"kernel vsock")
        assert sock.recv(12) == b"kernel vsock"
        sock.close()
        echo.json()
