"""Enclave groups in the built-in switch: an enclave talks to its parent (CID 3) and nothing else, as a Nitro
or QingTian enclave does; a mesh group still routes every VM to every other. Fake guests drive the switch."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_hosts import tcg_host

from harness.aio import EventLoopThread
from harness.host.ledger import Ledger
from harness.vsock import ENCLAVE_GROUP, MESH_GROUP
from harness.vsock.errors import VsockConfigError, VsockConnectionRefused
from harness.vsock.fake_guest import FakeGuest, GuestConn
from harness.vsock.host import VsockHost, connect_hybrid
from harness.vsock.hybrid import listener_path
from harness.vsock.packet import OP_REQUEST, OP_RW, TYPE_STREAM, Header
from harness.vsock.switch import Switch


class Net:
    """A switch on a plain loop with fake guests attached straight to their devices (no vhost-user)."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[object] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.switch = Switch(self.loop)
        self.dir = tmp_path
        self.guests: dict[str, FakeGuest] = {}

    def add(self, name: str, cid: int, group: str = "g", kind: str = ENCLAVE_GROUP) -> FakeGuest:
        guest = FakeGuest(cid, ram_kib=4096, queue_size=64)
        guest.attach(self.switch.attach(name, cid, group, self.dir / f"{name}.vsock", kind))
        self.guests[name] = guest
        return guest

    def settle(self, rounds: int = 6) -> None:
        for _ in range(rounds):
            self.loop.run_until_complete(asyncio.sleep(0))
            for guest in self.guests.values():
                guest.pump()

    def vm(self, name: str) -> dict:
        return self.switch.stats()["vms"][name]  # type: ignore[index]

    def exchange(self, a: str, conn_a: GuestConn, b: str, conn_b: GuestConn) -> None:
        """Each side writes to the other; both must read what the other wrote."""
        ga, gb = self.guests[a], self.guests[b]
        ga.write(conn_a, b"from " + a.encode())
        gb.write(conn_b, b"from " + b.encode())
        self.settle()
        assert ga.read(conn_a) == b"from " + b.encode()
        assert gb.read(conn_b) == b"from " + a.encode()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    yield n
    assert n.errors == []
    n.loop.close()


def requests_seen(guest: FakeGuest) -> list[Header]:
    return [h for h in guest.packets if h.op == OP_REQUEST]


def test_an_enclave_cannot_reach_a_sibling_enclave(net: Net) -> None:
    net.add("parent", 3)
    first = net.add("enclave1", 16)
    second = net.add("enclave2", 17)
    first.listen(5000)
    conn = second.connect(16, 5000)
    second.send_packet(Header(17, 16, 60000, 5000, 5, TYPE_STREAM, OP_RW, 0, 0, 0), b"stray")  # no REQUEST
    net.settle()
    assert conn.reset and conn.state != "established"  # refused by a reset, at once
    assert first.packets == [] and not first.accepted  # nothing reached the first enclave
    assert net.vm("enclave2")["drops"] == {"enclave_isolation": 2}
    assert net.vm("enclave2")["sibling_flows"] == 0 and net.vm("enclave1")["drops"] == {}
    assert net.switch.stats()["drops"] == {"enclave_isolation": 2}
    assert [net.vm(n)["role"] for n in ("parent", "enclave1", "enclave2")] == ["parent", "enclave", "enclave"]


def test_an_enclave_reaches_its_parent_and_the_parent_reaches_it(net: Net) -> None:
    parent = net.add("parent", 3)
    enclave = net.add("enclave", 16)
    parent.listen(5000)
    enclave.listen(6000)
    up = enclave.connect(3, 5000)
    down = parent.connect(16, 6000)
    net.settle()
    assert up.state == "established" and down.state == "established"
    net.exchange("enclave", up, "parent", parent.accepted[0])
    net.exchange("parent", down, "enclave", enclave.accepted[0])
    assert net.vm("enclave")["drops"] == {} and net.vm("parent")["drops"] == {}
    assert net.vm("enclave")["sibling_flows"] == 1 and net.vm("parent")["sibling_flows"] == 1


def test_an_enclave_cannot_reach_another_group_or_the_host_and_its_parent_can(net: Net) -> None:
    parent = net.add("parent", 3)
    enclave = net.add("enclave", 16)
    stranger = net.add("stranger", 17, group="h", kind=MESH_GROUP)  # CID 17 exists, in another group
    stranger.listen(5000)
    host_ports = {}
    for name in ("parent", "enclave"):
        host_ports[name] = socket.socket(socket.AF_UNIX)
        host_ports[name].bind(str(listener_path(net.dir / f"{name}.vsock", 7000)))
        host_ports[name].listen()
        host_ports[name].setblocking(False)
    try:
        other_group = enclave.connect(17, 5000)
        to_host = enclave.connect(2, 7000)
        from_parent = parent.connect(2, 7000)
        net.settle()
        assert other_group.reset and to_host.reset
        assert stranger.packets == []
        with pytest.raises(BlockingIOError):
            host_ports["enclave"].accept()  # the switch never connected the enclave to the host
        assert net.vm("enclave")["drops"] == {"enclave_isolation": 2}
        assert "unreachable" not in net.vm("enclave")["stats"]  # refused as isolation, before any lookup
        assert from_parent.state == "established"
        host_ports["parent"].accept()[0].close()
        assert net.vm("parent")["drops"] == {}
    finally:
        for sock in host_ports.values():
            sock.close()


def test_the_host_cannot_connect_to_an_enclave_and_can_to_its_parent(net: Net) -> None:
    parent = net.add("parent", 3)
    enclave = net.add("enclave", 16)
    parent.listen(5000)
    enclave.listen(5000)
    answers = {}
    for name in ("parent", "enclave"):
        ours, theirs = socket.socketpair()
        device = next(vm for vm in net.switch.host_sides if vm.name == name)
        net.switch.host_sides[device].accept(ours)
        theirs.sendall(b"CONNECT 5000\n")
        theirs.setblocking(False)
        net.settle(12)
        try:
            answers[name] = theirs.recv(64)
        finally:
            theirs.close()
    assert answers["parent"].startswith(b"OK ")
    assert answers["enclave"] == b""  # closed: the hybrid convention's refusal
    assert requests_seen(enclave) == [] and len(requests_seen(parent)) == 1
    assert net.vm("enclave")["stats"]["host_refused"] == 1


def test_a_mesh_group_still_lets_siblings_talk(net: Net) -> None:
    guests = [net.add(f"guest{cid}", cid, kind=MESH_GROUP) for cid in (3, 16, 17)]
    guests[1].listen(5000)
    guests[2].listen(5000)
    there = guests[2].connect(16, 5000)
    back = guests[1].connect(17, 5000)
    net.settle()
    assert there.state == "established" and back.state == "established"
    net.exchange("guest17", there, "guest16", guests[1].accepted[0])
    net.exchange("guest16", back, "guest17", guests[2].accepted[0])
    assert all(net.vm(f"guest{cid}")["drops"] == {} for cid in (3, 16, 17))
    assert {net.vm(f"guest{cid}")["role"] for cid in (3, 16, 17)} == {"guest"}


def test_a_group_keeps_the_kind_its_first_vm_gave_it(net: Net) -> None:
    net.add("parent", 3)
    with pytest.raises(VsockConfigError) as caught:
        net.switch.attach("guest", 16, "g", net.dir / "guest.vsock", MESH_GROUP)
    assert caught.value.code == "E702"
    assert sorted(net.switch.stats()["vms"]) == ["parent"]  # type: ignore[call-overload]
    net.switch.attach("other", 16, "h", net.dir / "other.vsock", MESH_GROUP)  # another group is free


# -- through the host-side API --------------------------------------------------------------------
@pytest.fixture
def vsock(tmp_path: Path) -> Iterator[VsockHost]:
    loop = EventLoopThread("test-vsock-isolation")
    runtime = tmp_path / "rt"
    runtime.mkdir()
    host = VsockHost(
        tcg_host(), backend="builtin", ledger=Ledger(tmp_path / "ledger"), loop=loop, runtime_dir=runtime
    )
    yield host
    host.close()
    loop.close()


def test_an_enclave_attachment_is_closed_to_the_host(vsock: VsockHost) -> None:
    parent = vsock.attach("parent", group="lab1", cid=3, group_kind=ENCLAVE_GROUP)
    enclave = vsock.attach("enclave", group="lab1", group_kind=ENCLAVE_GROUP)
    assert not parent.enclave and parent.host_ports
    assert enclave.enclave and not enclave.host_ports  # no host listener is ever made for it
    with vsock.listen(9000):
        assert (vsock.runtime_dir / "parent.vsock_9000").exists()
        assert not (vsock.runtime_dir / "enclave.vsock_9000").exists()
    with pytest.raises(VsockConnectionRefused, match="only its parent"):
        vsock.connect(enclave.cid, 5000, group="lab1")
    assert enclave.uds is not None
    with pytest.raises(VsockConnectionRefused):
        connect_hybrid(enclave.uds, 5000, timeout=60)  # a raw hybrid client is closed by the switch: no wait
    assert vsock.stats()["vms"]["enclave"]["stats"]["host_refused"] == 1  # type: ignore[index]


def test_bad_group_kinds_are_refused_and_leave_nothing(vsock: VsockHost) -> None:
    vsock.attach("parent", group="lab1", cid=3, group_kind=ENCLAVE_GROUP)
    claims = vsock.ledger.claims()
    for options in (
        {"group": "lab1", "group_kind": MESH_GROUP},  # a mesh VM in an enclave group
        {"group": "lab2", "group_kind": "star"},
        {"group_kind": ENCLAVE_GROUP},  # an enclave group needs a name
    ):
        with pytest.raises(VsockConfigError) as caught:
            vsock.attach("guest", **options)  # type: ignore[arg-type]
        assert caught.value.code == "E702"
        assert sorted(vsock.attachments) == ["parent"] and vsock.ledger.claims() == claims
        assert sorted(p.name for p in vsock.runtime_dir.iterdir()) == ["parent.vhost", "parent.vsock"]


def test_vhost_device_vsock_is_refused_for_enclave_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rust-vmm's daemon routes every VM of a group to every other: it cannot keep enclaves apart."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vhost-device-vsock"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m harness.cli vsock serve "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    loop = EventLoopThread("test-vsock-isolation-external")
    runtime = tmp_path / "rt"
    runtime.mkdir()
    ledger = Ledger(tmp_path / "ledger")
    try:
        with VsockHost(
            tcg_host(), backend="vhost-device-vsock", ledger=ledger, loop=loop, runtime_dir=runtime
        ) as vsock:
            with pytest.raises(VsockConfigError, match="cannot keep enclaves apart") as caught:
                vsock.attach("parent", group="lab1", cid=3, group_kind=ENCLAVE_GROUP)
            assert caught.value.code == "E702" and vsock.attachments == {} and not vsock._daemons
            assert list(runtime.iterdir()) == [] and ledger.claims() == []
    finally:
        loop.close()
