"""The switch's bounds against a hostile guest or front end, one finding each: every test here failed
before its fix (see docs/vsock.md, "A hostile guest" and "A hostile front end")."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.aio import EventLoopThread
from harness.vsock import device as device_module
from harness.vsock import hybrid
from harness.vsock import switch as switch_module
from harness.vsock import vhost_user as vu
from harness.vsock.device import TX_QUEUE, VsockDevice
from harness.vsock.fake_guest import FakeFront, FakeGuest, GuestConn
from harness.vsock.hybrid import listener_path
from harness.vsock.packet import HEADER, OP_CREDIT_UPDATE, OP_REQUEST, TYPE_STREAM, Header
from harness.vsock.server import SwitchServer, VmEndpoint
from harness.vsock.switch import Switch


def _run(loop: asyncio.AbstractEventLoop, rounds: int = 4) -> None:
    for _ in range(rounds):
        loop.run_until_complete(asyncio.sleep(0))


def test_a_split_tx_header_copies_only_the_header(tmp_path: Path) -> None:
    """A tx chain whose first descriptor is under 44 bytes, followed by descriptors spanning all of guest
    RAM: the switch gathers the 44 header bytes, not every readable byte of the chain."""
    loop = asyncio.new_event_loop()
    try:
        switch = Switch(loop)
        guest = FakeGuest(5, ram_kib=16384, queue_size=64)
        device = switch.attach("vm5", 5, "g", tmp_path / "vm5.vsock")
        guest.attach(device)
        base = guest.size - 4096
        HEADER.pack_into(guest.ram, base, *Header(5, 7, 1, 2, 0, TYPE_STREAM, OP_REQUEST, 0, 0, 0))
        whole = (0, guest.size, False)
        guest.tx.add([(base, 1, False), (base + 1, 4095, False), *[whole] * 30])
        tracemalloc.start()
        try:
            device.kick(TX_QUEUE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{peak} bytes allocated to read one header"
        assert device.stats["tx_packets"] == 1 and device.stats["unreachable"] == 1  # the header was read
    finally:
        loop.close()


class Served:
    """The switch's server on its own loop thread, with fake QEMU front ends attached by name."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = EventLoopThread("test-vsock-bounds")
        self.dir = tmp_path
        self.server = self.loop.call(lambda: SwitchServer(self.loop.loop))
        self.guests: list[FakeGuest] = []

    def add(self, name: str, cid: int, group: str = "g", **options: object) -> tuple[VmEndpoint, FakeFront]:
        endpoint = VmEndpoint(name, cid, group, self.dir / f"{name}.vhost", self.dir / f"{name}.vsock")
        self.loop.call(self.server.add_vm, endpoint)
        guest = FakeGuest(cid, memfd=True, ram_kib=1024, queue_size=16, **options)  # type: ignore[arg-type]
        self.guests.append(guest)
        return endpoint, FakeFront(guest, str(endpoint.vhost_socket))

    def drops(self, name: str) -> dict[str, int]:
        return self.loop.call(self.server.stats)["vms"][name]["drops"]

    def close(self) -> None:
        self.loop.call(self.server.close)
        for guest in self.guests:
            if guest.front is not None:
                guest.front.close()
            guest.close_ram()
        self.loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


def test_guest_memory_that_could_shrink_is_refused(served: Served) -> None:
    """A memfd without F_SEAL_SHRINK could be truncated under the switch's mapping (SIGBUS ends the whole
    switch): SET_MEM_TABLE fails; a sealed one that is shorter than the region is refused too."""
    _, front = served.add("vm1", 16, seal=False)
    guest = front.guest
    front.request(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(vu.PROTOCOL_F_REPLY_ACK))
    assert front.set_mem_table(guest.fd, guest.size) != 0  # type: ignore[arg-type]
    assert served.drops("vm1") == {"unsealed_memory": 1}
    _, sealed = served.add("vm2", 17)
    sealed.request(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(vu.PROTOCOL_F_REPLY_ACK))
    assert sealed.set_mem_table(sealed.guest.fd, 2 * sealed.guest.size) != 0  # type: ignore[arg-type]
    assert served.drops("vm2") == {"bad_mem_table": 1}
    sealed.start()  # QEMU's sealed memfd of the right size is taken
    assert served.loop.call(served.server.stats)["vms"]["vm2"]["running"]


def _flood(front: FakeFront, message: bytes, stop: threading.Event) -> threading.Thread:
    """Send ``message`` over and over from a thread until ``stop`` (or until the switch hangs up)."""
    chunk = message * ((1 << 20) // len(message))

    def run() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                front.sock.sendall(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_front_end_that_never_reads_its_replies_is_dropped(served: Served) -> None:
    """Replies are sent without blocking: a front end that asks and never reads loses its session once its
    unread replies pass the bound, and the switch goes on setting up other VMs meanwhile."""
    _, deaf = served.add("deaf", 16)
    stop = threading.Event()
    flooder = _flood(deaf, vu.HEADER.pack(vu.GET_FEATURES, vu.FLAG_VERSION, 0), stop)
    try:
        _, honest = served.add("honest", 17, group="h")
        assert honest.start()["cid"] == 17  # FakeFront gives up after 5 s without a reply
        deadline = time.monotonic() + 10
        while served.loop.call(served.server.stats)["vms"]["deaf"]["front_end"]:
            assert time.monotonic() < deadline, "the deaf front end kept its session"
            time.sleep(0.01)
    finally:
        stop.set()
        flooder.join(5)


def test_a_flooding_front_end_does_not_starve_the_others(served: Served) -> None:
    """Messages are read a bounded number at a time per front end, so one that never stops sending cannot
    hold the loop: another VM's whole set-up still completes."""
    _, noisy = served.add("noisy", 16)
    stop = threading.Event()
    flooder = _flood(noisy, vu.HEADER.pack(vu.SET_OWNER, vu.FLAG_VERSION, 0), stop)
    try:
        time.sleep(0.2)  # the flood is under way
        _, honest = served.add("honest", 17, group="h")
        started = time.monotonic()
        assert honest.start()["cid"] == 17
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        flooder.join(5)


class Direct:
    """A switch on a plain loop with fake guests attached straight to their devices (no vhost-user)."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[object] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.switch = Switch(self.loop)
        self.dir = tmp_path
        self.guests: list[FakeGuest] = []

    def add(self, cid: int, group: str = "g", **options: object) -> tuple[FakeGuest, VsockDevice]:
        guest = FakeGuest(cid, **{"ram_kib": 4096, "queue_size": 64, **options})  # type: ignore[arg-type]
        device = self.switch.attach(f"vm{cid}", cid, group, self.dir / f"vm{cid}.vsock")
        guest.attach(device)
        self.guests.append(guest)
        return guest, device

    def settle(self, rounds: int = 4) -> None:
        for _ in range(rounds):
            self.loop.run_until_complete(asyncio.sleep(0))
            for guest in self.guests:
                guest.pump()


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[Direct]:
    d = Direct(tmp_path)
    yield d
    d.loop.close()


def _host_listener(uds: Path, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(listener_path(uds, port)))
    listener.listen(64)
    return listener


def test_a_vms_host_connections_hold_a_bounded_number_of_unread_bytes(
    direct: Direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host sockets that never read: what the switch holds for them is bounded per VM, not per connection
    (4096 connections x a 512 KiB window was 2 GiB); the connection that would pass the bound is reset."""
    monkeypatch.setattr(hybrid, "MAX_HOST_BUFFER", 1 << 20, raising=False)
    guest, device = direct.add(16)
    listener = _host_listener(direct.dir / "vm16.vsock", 7000)  # accepts nothing, reads nothing
    try:
        conns = [guest.connect(2, 7000) for _ in range(6)]
        direct.settle()
        for conn in conns:
            guest.write(conn, bytes(hybrid.HOST_BUF_ALLOC))
        direct.settle(200)
        side = direct.switch.host_sides[device]
        held = sum(len(c.out) for c in side.connections.values())
        assert held <= 1 << 20 and side.buffered == held
        assert device.drops["host_buffer_full"] >= 1 and any(c.reset for c in conns)
        assert direct.errors == []
    finally:
        listener.close()


def test_a_vm_gets_a_share_of_the_descriptors_for_host_connections(
    direct: Direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each host connection holds a descriptor: a VM may open only its share of what the process may
    open (less a reserve for setting up VMs), so one guest cannot take them all from the others."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    monkeypatch.setattr(
        hybrid, "FD_RESERVE", soft - 6, raising=False
    )  # 6 descriptors for host connections: 3 per VM
    greedy, greedy_dev = direct.add(16)
    other, _ = direct.add(17, group="h")
    listeners = [_host_listener(direct.dir / f"vm{cid}.vsock", 7000) for cid in (16, 17)]
    try:
        grabbed = [greedy.connect(2, 7000) for _ in range(5)]
        direct.settle()
        assert [c.state for c in grabbed].count("established") == 3
        assert greedy_dev.drops["too_many_flows"] == 2
        mine = [other.connect(2, 7000) for _ in range(3)]
        direct.settle()
        assert [c.state for c in mine] == ["established"] * 3
    finally:
        for listener in listeners:
            listener.close()


def test_the_switch_raises_its_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        loop = asyncio.new_event_loop()
        try:
            SwitchServer(loop).close()
        finally:
            loop.close()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _established(direct: Direct, src: FakeGuest, dst: FakeGuest, port: int) -> tuple[GuestConn, GuestConn]:
    dst.listen(port)
    conn = src.connect(dst.cid, port)
    direct.settle()
    assert conn.state == "established"
    return conn, dst.find(src.cid, conn.local_port)  # type: ignore[return-value]


def test_sibling_flows_count_against_the_vm_that_opened_them(
    direct: Direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sibling's REQUEST flood uses up its own flow quota, not its target's: the target can still open
    flows of its own."""
    monkeypatch.setattr(switch_module, "MAX_FLOWS_PER_VM", 4)
    hostile, hostile_dev = direct.add(5)
    victim, _ = direct.add(6)
    third, _ = direct.add(7)
    victim.listen(100)
    flood = [hostile.connect(6, 100) for _ in range(6)]
    direct.settle()
    assert [c.state for c in flood].count("established") == 4 and hostile_dev.drops["too_many_flows"] == 2
    own, _ = _established(direct, victim, third, 200)
    assert own.state == "established" and not own.reset


def test_a_sender_fills_only_its_share_of_a_receivers_backlog(
    direct: Direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile sibling that fills an honest receiver's backlog (the receiver is slow to post rx buffers)
    takes only its own share: a third VM's flow to the same receiver keeps its data and is not reset."""
    monkeypatch.setattr(device_module, "MAX_BACKLOG_BYTES", 256 * 1024)
    hostile, _ = direct.add(5, max_payload=1024)  # small packets fill the backlog to the brim
    receiver, receiver_dev = direct.add(6)
    third, _ = direct.add(7)
    floods = [_established(direct, hostile, receiver, 100 + i)[0] for i in range(4)]
    honest, honest_peer = _established(direct, third, receiver, 300)
    direct.guests.remove(receiver)  # the receiver stops reading: its rx ring fills, then its backlog
    for conn in floods:
        hostile.write(conn, bytes(200 * 1024))
    direct.settle(50)
    assert receiver_dev.drops["rx_backlog_full"] >= 1  # the hostile sender hit its share
    third.write(honest, b"still here" * 1000)
    direct.settle(20)
    assert not honest.reset
    direct.guests.append(receiver)
    direct.settle(50)
    assert bytes(honest_peer.received) == b"still here" * 1000 and not honest_peer.reset


def test_a_receiver_that_shrinks_its_window_cannot_get_its_sender_blamed(direct: Direct) -> None:
    """Credit once granted stays granted: data sent within it after the receiver shrinks its window is
    no violation, so the honest sender's flow is not reset and nothing is counted against it."""
    sender, sender_dev = direct.add(5)
    receiver, receiver_dev = direct.add(6)
    conn, peer = _established(direct, sender, receiver, 100)
    receiver.buf_alloc = 0  # "I have no room": sent before the sender saw it
    receiver.send_control(receiver._hdr(peer, OP_CREDIT_UPDATE))
    sender.write(conn, bytes(64 * 1024))  # within the credit granted before
    direct.settle()
    assert not conn.reset and not peer.reset
    assert "credit_violation" not in sender_dev.drops and "credit_violation" not in receiver_dev.drops
