"""The built-in switch through its vhost-user sockets, driven by a fake QEMU front-end and fake guests:
negotiation, hybrid host connections, guest-to-host listeners, siblings, and VMs that go away."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.aio import EventLoopThread
from harness.vsock import hybrid
from harness.vsock.errors import VsockConnectionRefused
from harness.vsock.fake_guest import FakeFront, FakeGuest, GuestConn, GuestPump, echo
from harness.vsock.host import connect_hybrid
from harness.vsock.hybrid import listener_path
from harness.vsock.server import SwitchServer, VmEndpoint
from harness.vsock.switch import Switch
from harness.vsock.vhost_user import (
    F_PROTOCOL_FEATURES,
    F_RING_EVENT_IDX,
    F_VERSION_1,
    PROTOCOL_F_CONFIG,
    PROTOCOL_F_REPLY_ACK,
)


@dataclass
class Vm:
    endpoint: VmEndpoint
    guest: FakeGuest
    front: FakeFront
    pump: GuestPump


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.loop = EventLoopThread("test-vsock")
        self.dir = tmp_path
        self.server = self.loop.call(lambda: SwitchServer(self.loop.loop))
        self.vms: list[Vm] = []

    def add(
        self, name: str, cid: int, group: str = "g", *, start: bool = True, **guest_options: object
    ) -> Vm:
        endpoint = VmEndpoint(name, cid, group, self.dir / f"{name}.vhost", self.dir / f"{name}.vsock")
        self.loop.call(self.server.add_vm, endpoint)
        guest = FakeGuest(cid, memfd=True, ram_kib=4096, **guest_options)  # type: ignore[arg-type]
        front = FakeFront(guest, str(endpoint.vhost_socket))
        if start:
            front.start()
        vm = Vm(endpoint, guest, front, GuestPump(guest))
        self.vms.append(vm)
        return vm

    def stats(self) -> dict:
        return self.loop.call(self.server.stats)

    def close(self) -> None:
        for vm in self.vms:
            vm.pump.stop()
        self.loop.call(self.server.close)
        for vm in self.vms:
            if vm.guest.front is not None:
                vm.front.close()
            vm.guest.close_ram()
        self.loop.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_negotiates_what_qemu_asks_for(rig: Rig) -> None:
    vm = rig.add("vm1", 16, start=False)
    got = vm.front.start()
    assert got["cid"] == 16
    assert got["features"] & F_VERSION_1 and got["features"] & F_PROTOCOL_FEATURES
    assert got["features"] & F_RING_EVENT_IDX
    assert got["protocol"] & PROTOCOL_F_CONFIG and got["protocol"] & PROTOCOL_F_REPLY_ACK
    assert got["queues"] == 2
    assert rig.stats()["vms"]["vm1"]["running"]


def test_unknown_request_gets_a_failure_reply(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    reply = vm.front.request(99, b"", need_reply=True)
    assert struct.unpack("<Q", reply)[0] != 0
    assert rig.stats()["vms"]["vm1"]["front_end"]


def test_host_connects_and_the_guest_echoes(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    with vm.pump.lock:
        vm.guest.listen(5000)
    vm.pump.behaviours.append(echo)
    sock = connect_hybrid(vm.endpoint.uds, 5000)
    sock.settimeout(30)
    data = os.urandom(4 << 20)
    writer = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
    writer.start()
    got = bytearray()
    while chunk := sock.recv(1 << 20):
        got += chunk
    writer.join()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_connecting_to_a_closed_port_is_refused_by_reset(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    with pytest.raises(VsockConnectionRefused):
        connect_hybrid(vm.endpoint.uds, 5999, timeout=60)  # a refusal, never this timeout
    assert any(h.op == 1 and h.dst_port == 5999 for h in vm.guest.packets)  # the REQUEST reached the guest


def test_bad_connect_line_is_dropped(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(vm.endpoint.uds))
    sock.sendall(b"HELLO there\n")
    sock.settimeout(10)
    assert sock.recv(10) == b""


def test_a_host_connection_still_in_its_handshake_is_closed_when_the_vm_goes() -> None:
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        switch = Switch(loop)
        vm = switch.attach("vm1", 16, "g", Path("/nonexistent/vm1.vsock"))
        switch.host_sides[vm].accept(ours)  # no CONNECT line yet: the handshake waits
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        switch.detach(vm)
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        assert ours.fileno() == -1  # closed by the switch, not left to the garbage collector
        theirs.settimeout(5)
        assert theirs.recv(1) == b""
    finally:
        ours.close()
        theirs.close()
        loop.close()


def _direct_guest(tmp_path: Path) -> tuple[asyncio.AbstractEventLoop, Switch, FakeGuest, list[object]]:
    """A switch on a plain loop with one fake guest attached straight to its device (no vhost-user)."""
    loop = asyncio.new_event_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    switch = Switch(loop)
    guest = FakeGuest(16, ram_kib=256, queue_size=16, max_payload=4096)
    guest.attach(switch.attach("vm1", 16, "g", tmp_path / "vm1.vsock"))
    return loop, switch, guest, errors


def _settle(loop: asyncio.AbstractEventLoop, guest: FakeGuest) -> None:
    for _ in range(4):
        loop.run_until_complete(asyncio.sleep(0))
        guest.pump()


def test_a_vm_has_a_bounded_number_of_host_connections(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hybrid, "MAX_HOST_CONNECTIONS", 2)
    loop, switch, guest, errors = _direct_guest(tmp_path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(listener_path(tmp_path / "vm1.vsock", 7000)))
    listener.listen()
    try:
        conns = [guest.connect(2, 7000) for _ in range(3)]
        _settle(loop, guest)
        assert [c.state for c in conns[:2]] == ["established", "established"]
        assert conns[2].reset
        device = next(iter(switch.host_sides))
        assert device.drops["too_many_flows"] == 1 and len(switch.host_sides[device].connections) == 2
        assert errors == []
    finally:
        listener.close()
        loop.close()


def test_a_guest_connection_without_a_free_descriptor_is_refused(tmp_path: Path, monkeypatch) -> None:
    loop, switch, guest, errors = _direct_guest(tmp_path)

    def no_descriptors(*_args: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(hybrid.socket, "socket", no_descriptors)
    try:
        conn = guest.connect(2, 7000)
        _settle(loop, guest)
        assert conn.reset and errors == []
        assert next(iter(switch.host_sides)).stats["refused"] == 1
    finally:
        loop.close()


def test_guest_reaches_a_host_listener_and_a_closed_host_port_resets(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(listener_path(vm.endpoint.uds, 7000)))
    listener.listen()
    with vm.pump.lock:
        conn = vm.guest.connect(2, 7000)
        closed = vm.guest.connect(2, 7001)
    host, _ = listener.accept()
    vm.pump.wait(lambda: conn.state == "established" and closed.reset)
    with vm.pump.lock:
        vm.guest.write(conn, b"x" * 300_000)
        vm.guest.shutdown(conn)
    got = bytearray()
    while chunk := host.recv(65536):
        got += chunk
    assert got == b"x" * 300_000
    host.sendall(b"bye")
    host.close()
    vm.pump.wait(lambda: conn.eof and bytes(conn.received) == b"bye")


def test_sixty_four_concurrent_connections_to_one_guest(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    with vm.pump.lock:
        vm.guest.listen(5000)
    vm.pump.behaviours.append(echo)
    results: dict[int, bool] = {}

    def client(i: int) -> None:
        sock = connect_hybrid(vm.endpoint.uds, 5000)
        sock.settimeout(30)
        message = f"client {i} ".encode() * 5000
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := sock.recv(65536):
            got += chunk
        results[i] = bytes(got) == message
        sock.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 64 and all(results.values())
    assert rig.stats()["vms"]["vm1"]["stats"]["host_connects"] == 64


def test_siblings_exchange_both_ways(rig: Rig) -> None:
    a = rig.add("parent", 3, split_header=False)
    b = rig.add("enclave", 16)
    with a.pump.lock:
        a.guest.listen(8000)
    with b.pump.lock:
        conn_b = b.guest.connect(3, 8000)
    a.pump.wait(lambda: bool(a.guest.accepted))
    conn_a = a.guest.accepted[0]
    data_a, data_b = os.urandom(3 << 20), os.urandom(3 << 20)
    with a.pump.lock:
        a.guest.write(conn_a, data_a)
    with b.pump.lock:
        b.guest.write(conn_b, data_b)
    got_a, got_b = bytearray(), bytearray()

    deadline = time.monotonic() + 30
    while (len(got_a) < len(data_b) or len(got_b) < len(data_a)) and time.monotonic() < deadline:
        with a.pump.lock:
            got_a += a.guest.read(conn_a)
        with b.pump.lock:
            got_b += b.guest.read(conn_b)
        time.sleep(0.001)
    assert hashlib.sha256(got_a).digest() == hashlib.sha256(data_b).digest()
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(data_a).digest()
    assert conn_a.peer_cid == 16 and conn_b.peer_cid == 3


def test_a_vm_that_dies_frees_its_connections_and_the_others_go_on(rig: Rig) -> None:
    dying = rig.add("dying", 16)
    other = rig.add("other", 17, group="h")
    for vm in (dying, other):
        with vm.pump.lock:
            vm.guest.listen(5000)
        vm.pump.behaviours.append(echo)
    doomed = connect_hybrid(dying.endpoint.uds, 5000)
    doomed.sendall(b"before")
    assert doomed.recv(6) == b"before"
    survivor = connect_hybrid(other.endpoint.uds, 5000)
    survivor.sendall(b"a" * 100_000)
    dying.pump.stop()
    dying.front.close()  # QEMU is gone: its vhost-user socket closes
    doomed.settimeout(10)
    try:
        rest = doomed.recv(100)
    except ConnectionResetError:
        rest = b""
    assert rest == b""
    deadline = time.monotonic() + 10
    while rig.stats()["vms"]["dying"]["host_connections"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.stats()["vms"]["dying"]["host_connections"] == 0
    assert not rig.stats()["vms"]["dying"]["front_end"]
    survivor.sendall(b"b" * 100_000)
    survivor.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := survivor.recv(65536):
        got += chunk
    assert got == b"a" * 100_000 + b"b" * 100_000


def test_stopping_the_rings_resets_connections(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    with vm.pump.lock:
        vm.guest.listen(5000)
    sock = connect_hybrid(vm.endpoint.uds, 5000)
    bases = vm.front.stop()  # GET_VRING_BASE, as on a guest reset
    assert all(b > 0 for b in bases)
    sock.settimeout(10)
    assert sock.recv(10) == b""
    assert rig.stats()["vms"]["vm1"]["host_connections"] == 0


def test_a_new_memory_table_moves_the_running_rings_or_is_refused_whole(rig: Rig) -> None:
    """QEMU sends SET_MEM_TABLE again when guest memory changes (hotplug): the rings go on over the new
    mapping; a table that leaves out a ring is refused, and both rings keep the memory they had."""
    vm = rig.add("vm1", 16)
    with vm.pump.lock:
        vm.guest.listen(5000)
    vm.pump.behaviours.append(echo)
    sock = connect_hybrid(vm.endpoint.uds, 5000)
    sock.settimeout(10)
    session = rig.loop.call(lambda: rig.server._vms["vm1"].session)

    first = session.memory
    assert vm.front.set_mem_table(vm.guest.fd, vm.guest.size) == 0  # type: ignore[arg-type]
    assert session.memory is not first
    sock.sendall(b"moved")
    assert sock.recv(5) == b"moved"
    kept = session.memory
    # a table of the first ring area only: it holds the rx ring, not the tx ring
    assert vm.front.set_mem_table(vm.guest.fd, vm.guest.ring_area) != 0  # type: ignore[arg-type]
    assert session.memory is kept and rig.stats()["vms"]["vm1"]["drops"] == {"bad_address": 1}
    sock.sendall(b"still")
    assert sock.recv(5) == b"still"
    sock.close()


def test_a_second_front_end_is_refused(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    intruder = socket.socket(socket.AF_UNIX)
    intruder.connect(str(vm.endpoint.vhost_socket))
    intruder.settimeout(10)
    assert intruder.recv(10) == b""
    assert rig.stats()["vms"]["vm1"]["sessions"] == 1


def test_connections_in_flight_are_unaffected_by_an_unrelated_reset(rig: Rig) -> None:
    vm = rig.add("vm1", 16)
    with vm.pump.lock:
        vm.guest.listen(5000)
        vm.guest.listen(5001)
    vm.pump.behaviours.append(echo)
    keep = connect_hybrid(vm.endpoint.uds, 5000)
    drop = connect_hybrid(vm.endpoint.uds, 5001)
    with vm.pump.lock:
        victim: GuestConn | None = next(c for c in vm.guest.accepted if c.local_port == 5001)
        vm.guest.send_packet(vm.guest._hdr(victim, 3))  # the guest resets one connection
    drop.settimeout(10)
    assert drop.recv(10) == b""
    keep.sendall(b"ping")
    assert keep.recv(4) == b"ping"
